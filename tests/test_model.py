"""model.py against Hugging Face transformers (the independent reference).

Tiny random Llama (GQA + Llama-3 rope scaling), Mistral (sliding window) and Qwen2 (q/k/v
bias) checkpoints are built with transformers, saved as safetensors, and loaded by our
code; then the real converted SmolLM2 folder is checked the same way.
"""
import json
import shutil

import pytest
import torch

from generate import Tokenizer, generate, score
from model import ModelConfig, Transformer

TINY = dict(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
            rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2, pad_token_id=0)


def tiny_configs():
    from transformers import LlamaConfig, MistralConfig, Qwen2Config
    return {
        "llama": LlamaConfig(**TINY, rope_theta=5e5, rope_scaling=dict(
            rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
            original_max_position_embeddings=32)),
        "llama_tied": LlamaConfig(**TINY, tie_word_embeddings=True),
        "mistral": MistralConfig(**TINY, sliding_window=8),
        "qwen2": Qwen2Config(**TINY, tie_word_embeddings=False),
    }


@pytest.fixture(scope="module", params=list(tiny_configs()))
def tiny(request, tmp_path_factory):
    from transformers import AutoModelForCausalLM
    torch.manual_seed(0)
    cfg = tiny_configs()[request.param]
    hf = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").eval()
    if request.param == "qwen2":  # make sure the q/k/v biases are non-zero
        for layer in hf.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                torch.nn.init.normal_(proj.bias, std=0.5)
    path = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(path, safe_serialization=True)
    return request.param, path, hf


def test_logits_match_transformers(tiny):
    name, path, hf = tiny
    ours = Transformer.from_pretrained(path)
    ids = torch.randint(3, 300, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(ids).logits
        got = ours(ids)
    assert got.shape == (2, 40, 300) and got.dtype == torch.float32
    assert (got - ref).abs().max() < 1e-4, name


def test_greedy_tokens_match_transformers(tiny):
    name, path, hf = tiny
    ours = Transformer.from_pretrained(path)
    prompt = torch.randint(3, 300, (1, 12), generator=torch.Generator().manual_seed(2))
    ref = hf.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                      max_new_tokens=32, min_new_tokens=32, pad_token_id=0)[0, 12:].tolist()

    class NoStop:  # random weights emit eos at random; compare 32 full tokens
        pad_id, eos_ids = 0, [-1]

        def decode(self, ids):
            return ""
    got = generate(ours, NoStop(), [prompt[0].tolist()], max_new_tokens=32).ids
    assert got[0] == ref, name


def test_batch_equals_one_by_one(tiny):
    name, path, _ = tiny
    ours = Transformer.from_pretrained(path)

    class NoStop:
        pad_id, eos_ids = 0, [-1]

        def decode(self, ids):
            return ""
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(3, 300, (n,), generator=g).tolist() for n in (5, 17, 11)]
    batch = generate(ours, NoStop(), prompts, max_new_tokens=12).ids
    single = [generate(ours, NoStop(), [p], max_new_tokens=12).ids[0] for p in prompts]
    assert batch == single, name
    # and with fewer slots than prompts: rows wait, then take the first free slot
    assert generate(ours, NoStop(), prompts, max_new_tokens=12, slots=2).ids == single, name


def test_score_equals_log_softmax_sums(tiny):
    name, path, _ = tiny
    ours = Transformer.from_pretrained(path)
    g = torch.Generator().manual_seed(4)
    prompts = [torch.randint(3, 300, (n,), generator=g).tolist() for n in (6, 9)]
    comps = [torch.randint(3, 300, (n,), generator=g).tolist() for n in (4, 7)]
    total, tok, mask = score(ours, prompts, comps)
    for i, (p, c) in enumerate(zip(prompts, comps)):
        logp = ours(torch.tensor([p + c])).log_softmax(-1)[0]
        ref = sum(logp[len(p) - 1 + j, c[j]] for j in range(len(c)))
        assert abs(total[i] - ref) < 1e-4
        assert mask[i].sum() == len(c)


def test_sliding_window_is_used():
    cfg = ModelConfig(model_type="mistral", vocab_size=10, hidden_size=8, intermediate_size=8,
                      num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, head_dim=4,
                      layer_windows=[3])
    torch.manual_seed(0)
    m = Transformer(cfg).eval()
    ids = torch.randint(0, 10, (1, 8))
    ids2 = ids.clone()
    ids2[0, 0] = (ids[0, 0] + 1) % 10  # outside the window of the last token
    with torch.no_grad():
        assert torch.allclose(m(ids)[0, -1], m(ids2)[0, -1])
        assert not torch.allclose(m(ids)[0, 2], m(ids2)[0, 2])


# ---------------------------------------------------------------- bad input

def test_unknown_model_type(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(ValueError, match=r"config.json: unsupported model_type 'gpt2'"):
        Transformer.from_pretrained(tmp_path)


def test_missing_weights_file(tiny, tmp_path):
    _, path, _ = tiny
    shutil.copy(path / "config.json", tmp_path / "config.json")
    with pytest.raises(FileNotFoundError, match=r"model.safetensors: missing weights file"):
        Transformer.from_pretrained(tmp_path)


def test_truncated_safetensors(tiny, tmp_path):
    _, path, _ = tiny
    shutil.copy(path / "config.json", tmp_path / "config.json")
    data = (path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"model.safetensors: cannot read safetensors"):
        Transformer.from_pretrained(tmp_path)


def test_wrong_shape(tiny, tmp_path):
    _, path, _ = tiny
    for f in path.iterdir():
        shutil.copy(f, tmp_path / f.name)
    cfg = json.loads((path / "config.json").read_text())
    cfg["intermediate_size"] = 128
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"mlp.gate_proj.weight has shape \(96, 64\), config says \(128, 64\)"):
        Transformer.from_pretrained(tmp_path)


def test_offline_repo_id_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(OSError, match="not a local folder; not in the local hub cache and the hub is unreachable"):
        Transformer.from_pretrained("someone/no-such-model-here")


# ---------------------------------------------------------------- the real shipped model

PROMPTS = ["What is the capital of France?", "Write a haiku about rain.", "2+3="]


@pytest.fixture(scope="module")
def smollm2(smollm2_dir):
    return Transformer.from_pretrained(smollm2_dir), Tokenizer.from_pretrained(smollm2_dir)


def test_smollm2_logits_match_transformers(smollm2, smollm2_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    model, tok = smollm2
    hf = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    hf_tok = AutoTokenizer.from_pretrained(smollm2_dir)
    for p in PROMPTS:
        msgs = [{"role": "user", "content": p}]
        ref_ids = hf_tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)
        ref_ids = ref_ids["input_ids"] if isinstance(ref_ids, dict) or hasattr(ref_ids, "keys") else ref_ids
        ids = tok.encode(tok.apply_chat_template(msgs))
        assert ids == list(ref_ids)
        assert ids.count(1) == ids.count(tok.tk.token_to_id("<|im_start|>"))  # no extra BOS
        with torch.no_grad():
            diff = (model(torch.tensor([ids])) - hf(torch.tensor([ids])).logits).abs().max()
        assert diff < 1e-3, (p, float(diff))


def test_smollm2_knows_paris(smollm2):
    model, tok = smollm2
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}])
    texts = generate(model, tok, [prompt], max_new_tokens=24).texts
    assert "Paris" in texts[0]


def test_smollm2_stop_strings_and_eos(smollm2):
    model, tok = smollm2
    prompt = tok.apply_chat_template([{"role": "user", "content": "Count from 1 to 20, separated by commas."}])
    ids, texts, cut = generate(model, tok, [prompt, prompt], max_new_tokens=60, stop=["5"])
    assert cut == [False, False]
    assert texts[0] == texts[1] and "5" not in texts[0] and "4" in texts[0]
    assert "5" in tok.decode(ids[0])  # the ids keep the token that completed the stop string

"""tools/gguf_to_hf.py: the converted folder, read back by Hugging Face `transformers` as the
independent reader (it never sees our code), plus the converter's checks on synthetic inputs.

Needs checkpoints/smollm2-135m-instruct (`make model`). The Qwen test runs only where
checkpoints/qwen2.5-coder-0.5b-instruct was converted (`make model MODEL=qwen2.5-coder-0.5b`,
about 30 s and 2.5 GB; the test itself takes ~17 s); it is skipped otherwise.
"""
import hashlib
import json
import time
import zipfile
from argparse import Namespace

import numpy as np
import pytest
import torch

from conftest import ROOT
from tools import gguf_to_hf as conv

QWEN = ROOT / "checkpoints" / "qwen2.5-coder-0.5b-instruct"
PARAGRAPH = ("The city council met on Tuesday evening to discuss the new library. Most residents "
             "who spoke were in favour of the plan, although several asked how it would be paid "
             "for. The mayor said that the building would open in the spring of next year, and "
             "that the old library would be turned into a community centre for young families.")


def llama_cpp_permute(w, n_head):
    """llama.cpp's convert_hf_to_gguf.py LlamaModel.permute, copied as the reference."""
    return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


# ---- converter checks, no model or network needed ----

def test_unknown_model_is_a_clear_error(tmp_path, capsys):
    with pytest.raises(ValueError, match="known models: smollm2-135m, qwen2.5-coder-0.5b"):
        conv.get_source("llama-7b")
    assert conv.main(Namespace(model="llama-7b", out=str(tmp_path / "x"), cache=str(tmp_path))) == 2
    assert "unknown model 'llama-7b'" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_gguf_is_joined_in_order_and_sha256_checked(tmp_path):
    parts = [b"GGUF first part|", b"second part"]
    wheels = []
    for i, data in enumerate(parts):  # two fake wheels, one GGUF part in each
        wheels.append(tmp_path / f"fake_part{i}-0.1-py3-none-any.whl")
        with zipfile.ZipFile(wheels[-1], "w") as z:
            z.writestr(f"fake_part{i}/data/part{i}.bin", data)
    members = [f"fake_part{i}/data/part{i}.bin" for i in range(2)]
    good = hashlib.sha256(b"".join(parts)).hexdigest()
    conv.extract_gguf(conv.Source([], members, good), wheels, tmp_path / "ok.gguf")
    assert (tmp_path / "ok.gguf").read_bytes() == b"".join(parts)
    with pytest.raises(ValueError, match=f"SHA-256 mismatch .* got {good}, expected 0+$"):
        conv.extract_gguf(conv.Source([], members, "0" * 64), wheels, tmp_path / "bad.gguf")


def test_unpermute_inverts_llama_cpp_permute():
    w = np.random.default_rng(0).standard_normal((3 * 8, 5)).astype(np.float32)  # 3 heads, hd 8
    assert np.array_equal(conv.unpermute(llama_cpp_permute(w, 3), 3), w)
    assert not np.array_equal(conv.unpermute(w, 3), w)  # it does move rows
    b = np.arange(24.0)  # a bias permutes the same way
    assert np.array_equal(conv.unpermute(llama_cpp_permute(b, 3), 3), b)


def test_converted_folder_is_reused_instantly(smollm2_dir, capsys):
    marker = json.loads((smollm2_dir / conv.MARKER).read_text())
    assert marker["gguf_sha256"] == conv.SOURCES["smollm2-135m"].gguf_sha256
    t0 = time.time()
    args = Namespace(model="smollm2-135m", out=str(smollm2_dir), cache="/nonexistent")
    assert conv.main(args) == 0
    assert time.time() - t0 < 0.5
    assert "up to date" in capsys.readouterr().out


# ---- the converted SmolLM2, read by transformers ----

@pytest.fixture(scope="module")
def hf(smollm2_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    model, info = AutoModelForCausalLM.from_pretrained(
        smollm2_dir, dtype=torch.float32, output_loading_info=True)
    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    return model.eval(), tok, info


def test_transformers_loads_every_tensor(hf, smollm2_dir):
    model, _, info = hf
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    c = model.config
    assert (c.model_type, c.num_hidden_layers, c.hidden_size, c.num_attention_heads,
            c.num_key_value_heads, c.vocab_size) == ("llama", 30, 576, 9, 3, 49152)
    assert c.tie_word_embeddings and model.lm_head.weight is model.model.embed_tokens.weight
    assert (c.rope_parameters["rope_theta"], c.rms_norm_eps) == (1e5, 1e-5)


@torch.no_grad()
def test_answers_paris(hf):
    model, tok, _ = hf
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    ids = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt",
                                  return_dict=True)["input_ids"]
    out = model.generate(ids, max_new_tokens=20, do_sample=False)
    answer = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    print(f"SmolLM2: {answer!r}")
    assert "Paris" in answer


@torch.no_grad()
def test_qk_unpermutation_is_right(hf):
    """Permuting Q/K back the llama.cpp way must clearly hurt the paragraph's loss."""
    model, tok, _ = hf
    ids = tok(PARAGRAPH, return_tensors="pt")["input_ids"]
    loss = model(ids, labels=ids).loss.item()
    saved = {}
    try:
        for layer in model.model.layers:
            for proj, nh in [(layer.self_attn.q_proj, 9), (layer.self_attn.k_proj, 3)]:
                saved[proj] = proj.weight.clone()
                proj.weight.copy_(torch.from_numpy(llama_cpp_permute(proj.weight.numpy(), nh)))
        loss_permuted = model(ids, labels=ids).loss.item()
    finally:
        for proj, w in saved.items():
            proj.weight.copy_(w)
    print(f"loss/token: converted {loss:.3f} nats, Q/K permuted as in the GGUF {loss_permuted:.3f}")
    assert loss < 3.5 and loss_permuted > loss + 0.5


def test_tokenizer(hf):
    _, tok, _ = hf
    assert tok("<|im_start|>")["input_ids"] == [1] and tok("<|im_end|>")["input_ids"] == [2]
    assert tok.decode(tok("12345")["input_ids"]) == "12345" and len(tok("12345")["input_ids"]) == 5
    assert tok("Hello")["input_ids"][0] != 1  # no BOS added
    text = "Grüße aus Zürich, naïve café — 東京 🚀 \t x  y\n"
    assert tok.decode(tok(text)["input_ids"]) == text
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<|im_start|>",) + ("<|im_end|>",) * 2
    msgs = [{"role": "user", "content": "Hi there"}]
    rendered = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert rendered.endswith("<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n")


# ---- Qwen2.5-Coder-0.5B, only where it was converted ----

@pytest.mark.skipif(not (QWEN / conv.MARKER).exists(), reason=f"{QWEN} not converted")
@torch.no_grad()
def test_qwen_writes_a_python_function():
    from transformers import AutoModelForCausalLM, AutoTokenizer
    model, info = AutoModelForCausalLM.from_pretrained(QWEN, dtype=torch.float32,
                                                       output_loading_info=True)
    tok = AutoTokenizer.from_pretrained(QWEN)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    assert not model.config.tie_word_embeddings  # Qwen's lm_head is its own tensor
    assert model.model.layers[0].self_attn.q_proj.bias.abs().sum() > 0  # q/k/v biases kept
    assert tok("<|im_end|>")["input_ids"] == [151645] and tok.pad_token_id == 151643
    assert len(tok("12345")["input_ids"]) == 5
    prompt = "Write a Python function is_even(n). Reply with the code only."
    msgs = [{"role": "user", "content": prompt}]
    ids = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt",
                                  return_dict=True)["input_ids"]
    out = model.generate(ids, max_new_tokens=40, do_sample=False)
    answer = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    print(f"Qwen: {answer!r}")
    assert "def is_even(n" in answer and "% 2" in answer

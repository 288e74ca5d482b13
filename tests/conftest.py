"""Shared test setup.

Without CUDA, TRITON_INTERPRET=1 is set before any Triton kernel module is imported, so the
kernels run on the CPU (fp32/fp16 only: the interpreter's bf16 tl.dot is wrong). With CUDA it is
left alone: the kernel tests compile and run the real kernels, bf16 included, and
tests/test_cuda.py runs.
"""
import os
import shutil
import sys
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
torch.set_num_threads(min(2, os.cpu_count() or 1))

SMOLLM2 = ROOT / "checkpoints" / "smollm2-135m-instruct"


@pytest.fixture(scope="session")
def smollm2_dir():
    """The real shipped model, converted by `make model` (a prerequisite of `make test`)."""
    if not (SMOLLM2 / "model.safetensors").exists():
        pytest.fail(f"{SMOLLM2} is missing: run `make model` first (make test does it for you)")
    return SMOLLM2


@pytest.fixture(scope="session")
def tiny_dir(smollm2_dir, tmp_path_factory):
    """A 2-layer random Llama with SmolLM2's real tokenizer: the full pipeline, fast."""
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=49152, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                      bos_token_id=1, eos_token_id=2, pad_token_id=2,
                      initializer_range=0.5)  # large weights: outputs depend on z, not one repeated token
    path = tmp_path_factory.mktemp("tiny")
    LlamaForCausalLM(cfg).save_pretrained(path, safe_serialization=True)
    for f in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        shutil.copy(smollm2_dir / f, path / f)
    return path

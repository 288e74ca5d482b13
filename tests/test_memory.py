"""tools/memory.py: the meta-device Llama-3-8B gives the paper's parameter counts (Table 4) and runs
forward and backward through SVF; the saved-tensor accounting equals a hand count on a small case."""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import memory  # noqa: E402


def test_llama3_8b_on_meta_gives_the_papers_parameter_counts():
    model = memory.meta_model()
    assert sum(p.numel() for p in model.parameters()) == 8_030_261_248  # Meta-Llama-3-8B's published size
    c = memory.trainable_counts(model)
    assert c["SVF z, MLP"] == 32 * 3 * 4096 == 393_216                      # paper: 0.39M
    assert c["SVF z, q,v"] == 32 * (4096 + 1024) == 163_840                 # paper: 0.16M
    assert c["SVF z, q,v + MLP"] == 32 * (3 * 4096 + 4096 + 1024) == 557_056  # paper prints 0.58M
    assert round(c["LoRA r16, q,v"] / 1e6, 2) == 6.82                       # paper: 6.82M
    assert round(c["LoRA r16, q,v + MLP"] / 1e6, 2) == 35.13                # paper: 35.13M


def test_meta_update_runs_forward_and_backward_through_svf():
    model = memory.meta_model(layers=2)
    factors = memory.MetaFactors(model, "mlp")
    fx = memory.fixed_memory(model, factors)
    # U (m, r) and Vh (r, n) in bf16 for gate/up (14336 x 4096) and down (4096 x 14336), r = 4096
    assert fx["U, Vh"] == 2 * 3 * (14336 + 4096) * 4096 * 2
    assert fx["weights"] == sum(p.numel() for p in model.parameters()) * 2
    act, scores, logits = memory.update_memory(model, factors, rows=1, tokens=16, completion=8, kl=False)
    assert act > scores > 0 and logits > 0
    # logits: each chunk's fp32 log_softmax output (8 tokens x vocab) is saved, plus lm_head's bf16 input
    assert logits >= 8 * 128256 * 4
    act2, _, logits2 = memory.update_memory(model, factors, rows=2, tokens=16, completion=8, kl=True)
    assert abs(act2 - 2 * act) < 0.01 * act  # linear in rows (up to the shared RoPE tables)
    assert logits2 > 2 * logits  # KL keeps the reference log-probs too
    assert not memory.svf.svf_modules(model)  # detached again


def test_kv_cache_bytes_are_the_engines_cache():
    model = memory.meta_model()
    # 2 (k, v) x 32 layers x 8 KV heads x 128 dims x 2 bytes = 128 KiB per token
    assert memory.kv_bytes(model, 64, 1000) == 64 * 1000 * 2 * 32 * 8 * 128 * 2


def test_main_prints_a_table(capsys):
    rows = memory.main(["--layers", "1", "--no-kl"])
    out = capsys.readouterr().out
    assert "| GSM8K | 160+512 | fused |" in out and "393,216" not in out  # 1 layer: 12,288 z
    assert all(r["peak"] <= memory.GPU - memory.HEADROOM for r in rows)

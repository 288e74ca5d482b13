"""tools/bench_train.py --sweep-slots on a tiny random model: one row per batch size, and the KV
memory it reports equals what model.KVCache allocates for those positions."""

import argparse
import json
import sys
from pathlib import Path

import torch

from model import KVCache, ModelConfig
from test_svf import tiny_folder

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))
import bench_train  # noqa: E402


def test_sweep_slots_rows_and_kv_memory(tmp_path):
    folder = tiny_folder(tmp_path / "tiny")
    out = tmp_path / "sweep.json"
    args = argparse.Namespace(model=str(folder), sweep_slots=[2, 4], context=12, decode_steps=3,
                              max_new_tokens=8, out=str(out))
    bench_train.sweep_slots(args)
    res = json.loads(out.read_text())
    assert [r["slots"] for r in res["rows"]] == [2, 4] and all(r["tok_s"] > 0 for r in res["rows"])
    cfg = ModelConfig.from_json(folder / "config.json")
    for r in res["rows"]:
        cache = KVCache(cfg, r["slots"], 12 + 8, torch.float32, "cpu")  # context + max_new_tokens positions
        allocated = sum(t.numel() * t.element_size() for t in cache.k + cache.v)
        assert abs(r["kv_mb"] - allocated / 2**20) < 1e-9

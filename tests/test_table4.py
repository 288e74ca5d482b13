"""tools/table4.py: parameter counts read from the adapter files, minutes from metrics, cut and
finished counts and McNemar p against the first two rows, checked by hand."""

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))
import table4  # noqa: E402


def write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_rows_counts_and_paired_tests(tmp_path, capsys):
    # ids 0..5 in every file; lora lacks nothing, base has an extra id 6 (left out)
    write(tmp_path / "base.jsonl", [{"id": i, "correct": i == 0, "cut": i >= 3} for i in range(7)])
    write(tmp_path / "svf.jsonl", [{"id": i, "correct": i < 5, "cut": i == 5} for i in range(6)])
    write(tmp_path / "lora.jsonl", [{"id": i, "correct": i in (0, 1), "cut": False} for i in range(6)])
    save_file({"a": torch.zeros(3), "b": torch.zeros(5)}, tmp_path / "svf.safetensors", metadata={"targets": "mlp"})
    save_file({"m.lora_A": torch.zeros(2, 4), "m.lora_B": torch.zeros(6, 2)}, tmp_path / "lora.safetensors",
              metadata={"kind": "lora", "rank": "2", "targets": "qv", "objective": "sft"})
    write(tmp_path / "metrics.jsonl", [{"step": 0, "valid_acc": 0.1}, {"step": 1, "seconds": 90.0}, {"step": 2, "seconds": 30.0}])
    table4.main([f"base={tmp_path}/base.jsonl", f"svf-rl-mlp={tmp_path}/svf.jsonl:{tmp_path}/svf.safetensors",
                 f"lora-sft-qv={tmp_path}/lora.jsonl:{tmp_path}/lora.safetensors:{tmp_path}/metrics.jsonl"])
    out = capsys.readouterr().out.splitlines()
    assert out[0].endswith("6 items in every file")
    rows = {line.split(" | ")[0].strip("| "): line.split(" | ") for line in out[3:]}
    assert rows["base"][1:8] == ["—", "—", "—", "—", "16.7% [3.0, 56.4] (n=6)", "3/6", "1/3"]
    assert rows["svf-rl-mlp"][1:4] == ["SVF mlp", "rl", "8"]
    assert rows["svf-rl-mlp"][8].startswith("4–0, p = 0.12")  # vs base: 4 wins (ids 1-4), p = 2·0.5⁴
    assert rows["lora-sft-qv"][1:8] == ["LoRA r2 qv", "sft", "20", "2 (2.0)", "33.3% [9.7, 70.0] (n=6)", "0/6", "2/6"]
    assert rows["lora-sft-qv"][8] == "1–0, p = 1" and rows["lora-sft-qv"][9].startswith("0–3, p = 0.25")

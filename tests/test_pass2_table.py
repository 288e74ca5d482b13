"""tools/pass2_table.py: rows on the common items, hand-counted wins/losses and McNemar p."""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))
import pass2_table  # noqa: E402


def write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_table_pairs_common_items(tmp_path, capsys):
    # base: 1,0,0,0,0,0,0 ; uniform: 1,1,1,1,1,1,1 on ids 0..6; a dispatch run lacks id 6
    # base cuts ids 0, 1 and 6 (6 is not common: not counted); uniform records no cut (an older file)
    write(tmp_path / "base.jsonl", [{"id": i, "correct": i == 0, "cut": i in (0, 1, 6)} for i in range(7)])
    write(tmp_path / "uniform.jsonl", [{"id": i, "correct": True} for i in range(7)])
    (tmp_path / "alpha.json").write_text(json.dumps({  # cem.py's, beside its per-item file
        "experts": ["x/math.safetensors", "x/code.safetensors"], "alpha": [0.25, 1.0], "shots": [10, 11, 12],
        "history": [{"best_acc": 1 / 3, "mean_acc": 0.25}, {"best_acc": 2 / 3, "mean_acc": 0.5}]}))
    d = tmp_path / "prompt"
    d.mkdir()
    write(d / "items.jsonl", [{"id": i, "category": "math", "correct": i < 2, "cut": False} for i in range(6)])
    (d / "summary.json").write_text(json.dumps({"dispatch": "50.0% [..]", "pass1_s": 10.0, "pass2_s": 40.0, "ratio": 0.25,
                                                "merged_pass2_s": 55.0, "categories": ["code", "math", "other"],
                                                "confusion": [[0, 0, 0], [2, 3, 1], [0, 0, 0]]}))
    pass2_table.main(["--task", "t", f"base={tmp_path}/base.jsonl", f"uniform={tmp_path}/uniform.jsonl", f"prompt={d}"])
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "t: 6 items in every file"
    rows = {line.split(" | ")[0].strip("| "): line for line in out[3:] if line.startswith("|")}
    assert rows["base"].split(" | ")[2] == "2" and rows["uniform"].split(" | ")[2] == "" and rows["prompt"].split(" | ")[2] == "0"
    assert "| 50.0% [..]: math 3, code 2, other 1 |" in rows["prompt"]  # the true category's row, largest first
    assert out[-1] == (f"CEM ({tmp_path}/alpha.json): α = (math 0.25, code 1.00); 3 shots; fitness per generation, "
                       "best (population mean): 33% (25%) → 67% (50%)")  # once, though two files sit beside it
    # uniform vs base on ids 0..5: 5 wins, 0 losses -> p = 2 * 0.5**5 = 0.0625
    assert "| uniform | 100.0%" in rows["uniform"] and "5–0, p = 0.062" in rows["uniform"]
    # prompt (1,1,0,0,0,0) vs base (1,0,0,0,0,0): 1–0, p = 1; vs uniform: 0–4, p = 0.125
    assert "1–0, p = 1" in rows["prompt"] and "0–4, p = 0.12" in rows["prompt"]
    assert "10 s / 40 s = 0.25" in rows["prompt"]
    assert "| 10 s / 40 s = 0.25 (pass 2 merged per group: 55 s) |" in rows["prompt"]

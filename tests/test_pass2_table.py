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
    write(tmp_path / "base.jsonl", [{"id": i, "correct": i == 0} for i in range(7)])
    write(tmp_path / "uniform.jsonl", [{"id": i, "correct": True} for i in range(7)])
    d = tmp_path / "prompt"
    d.mkdir()
    write(d / "items.jsonl", [{"id": i, "category": "math", "correct": i < 2} for i in range(6)])
    (d / "summary.json").write_text(json.dumps({"dispatch": "50.0% [..]", "pass1_s": 10.0, "pass2_s": 40.0, "ratio": 0.25,
                                                "merged_pass2_s": 55.0}))
    pass2_table.main(["--task", "t", f"base={tmp_path}/base.jsonl", f"uniform={tmp_path}/uniform.jsonl", f"prompt={d}"])
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "t: 6 items in every file"
    rows = {line.split(" | ")[0].strip("| "): line for line in out[3:]}
    # uniform vs base on ids 0..5: 5 wins, 0 losses -> p = 2 * 0.5**5 = 0.0625
    assert "| uniform | 100.0%" in rows["uniform"] and "5–0, p = 0.062" in rows["uniform"]
    # prompt (1,1,0,0,0,0) vs base (1,0,0,0,0,0): 1–0, p = 1; vs uniform: 0–4, p = 0.125
    assert "1–0, p = 1" in rows["prompt"] and "0–4, p = 0.12" in rows["prompt"]
    assert "10 s / 40 s = 0.25" in rows["prompt"]
    assert "| 10 s / 40 s = 0.25 (pass 2 merged per group: 55 s) |" in rows["prompt"]

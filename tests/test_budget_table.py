"""tools/budget_table.py: strict and lenient answers on hand-written completions, and one table row computed by hand."""
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))
import budget_table  # noqa: E402


def test_strict_needs_a_stated_answer_lenient_takes_the_last_number():
    cases = [  # completion, strict, lenient
        ("3 + 4 = 7 eggs, so she sells 9 and makes $18.", None, "18"),
        ("So 16 - 7 = 9.\nThe final answer is 18.", "18", "18"),
        ("Total: \\boxed{1,250} dollars, i.e. 5 days", "1250", "5"),
        ("#### 72", "72", "72"),
        ("The answer: -3 degrees", "-3", "-3"),
        ("no numbers at all", None, None),
    ]
    for text, strict, lenient in cases:
        assert budget_table.strict_answer(text) == strict, text
        assert budget_table.lenient_answer(text) == lenient, text


class WordTokenizer:  # stands in for a tokenizer: one token per whitespace-separated word (+1 stop token when finished)
    def encode(self, text):
        return text.split()


def test_a_row_by_hand(tmp_path, capsys, monkeypatch):
    def write(name, rows):
        path = tmp_path / name
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        return f"{path}"

    gold = ["1", "2", "3", "4"]
    base = [{"id": i, "gold": g, "completion": c, "cut": cut, "correct": ok} for i, (g, c, cut, ok) in
            enumerate(zip(gold, ["so 1", "x y z w", "answer is 3", "the 9"], [False, True, False, False],
                              [True, False, True, False]))]
    expert = [{"id": i, "gold": g, "completion": c, "cut": False, "correct": ok, "tokens": t} for i, (g, c, ok, t) in
              enumerate(zip(gold, ["answer is 1", "answer is 2", "answer is 5", "answer is 4"],
                                [True, True, False, True], [3, 3, 3, 3]))]
    import generate
    monkeypatch.setattr(generate.Tokenizer, "from_pretrained", staticmethod(lambda path: WordTokenizer()))
    budget_table.main(["--model", "unused", f"base@4={write('b.jsonl', base)}", f"math@4={write('m.jsonl', expert)}"])
    out = capsys.readouterr().out.splitlines()
    base_row, expert_row = out[2], out[3]
    # base: 2/4 right; strict: only "answer is 3" -> 1/4; lenient: "so 1", "answer is 3" -> 2/4; one cut (25%);
    # all finished = items 0, 2, 3 (item 1 cut by base): base right on 0 and 2 -> 2/3; tokens 2+1, 4 (cut: budget),
    # 3+1, 2+1: mean and median 3.5 (printed 4), 14 tokens / 2 right = 7
    assert base_row.startswith("| base | 4 | 4 | 50.0% ")
    assert "| 25.0% | 50.0% | 25% | 2/3 = 66.7% | 4 / 4 | 7 |" in base_row
    # expert: 3/4 right, strict 3/4, lenient 3/4, no cut, on items 0, 2, 3 right on 0 and 3; 12 tokens / 3 right = 4;
    # vs base: expert alone right on 1 and 3, base alone on 2 -> "2-1"
    assert "| 75.0% | 75.0% | 0% | 2/3 = 66.7% | 3 / 3 | 4 | 2-1, p = 1 |" in expert_row


def test_a_row_from_parts_of_the_split(tmp_path, capsys, monkeypatch):
    """A split answered in two --offset runs is one row; a part repeating another's items is refused."""
    def write(name, ids, right):
        path = tmp_path / name
        path.write_text("".join(json.dumps({"id": i, "gold": "1", "completion": "answer is 1" if ok else "answer is 2",
                                            "cut": False, "correct": ok, "tokens": 3}) + "\n" for i, ok in zip(ids, right)))
        return f"{path}"
    import generate
    monkeypatch.setattr(generate.Tokenizer, "from_pretrained", staticmethod(lambda path: WordTokenizer()))
    a, b = write("a.jsonl", [0, 1], [True, False]), write("b.jsonl", [2, 3, 4], [True, True, False])
    budget_table.main(["--model", "unused", f"base@4={a},{b}"])
    assert capsys.readouterr().out.splitlines()[2].startswith("| base | 4 | 5 | 60.0% ")
    with pytest.raises(SystemExit, match=r"b\.jsonl repeats items of an earlier file of base@4"):
        budget_table.main(["--model", "unused", f"base@4={a},{b},{b}"])

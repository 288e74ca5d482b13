"""What every script shares: --device/--dtype, the process group's device, and one-line errors.

Every entry point (reinforce.py, cem.py, dispatch.py, `python -m evals`, generate.py, vlm.py,
svf.py, svd_cache.py) uses these things and nothing else from here:

  add_device_args(parser)    --device (default: cuda when available) and --dtype (default: bf16 on
                             CUDA, float32 on CPU); device_and_dtype(args) resolves them, one GPU
                             per local rank under torchrun.
  init_distributed(device)   join torchrun's process group; world() is (rank, world size), (0, 1) alone.
  all_reduce(t)              sum (or max) a tensor over ranks wherever it lives: NCCL only reduces
                             CUDA tensors, so a CPU tensor makes a round trip through the GPU.
  atomic_write(path)         a context manager giving a temp path beside `path`; on success it replaces
                             `path` in one step, so a kill leaves the old file or the new one, never half.
  positive_int, nonneg_int, probability, finite_float, nonneg_float, positive_float, utf8_text
                             argparse types: a bad count, ratio or text is refused where it is parsed, naming the flag.
  refuse_existing(path, flag) a command that would overwrite an existing output stops and says which flag goes on;
                             open_run_dir does the same for a run folder (--resume / --force), load_state reads
                             a saved state with the file's name in every error.
  all_reduce_sums, any_rank  named sums and shared decisions over torchrun's ranks.
  run(main, args)            expected failures (a missing, corrupt or mismatched file, an unknown
                             task or model type) print `error: <file>: <what is wrong>` and exit 2;
                             real bugs keep their traceback. T2_DEBUG=1 shows every traceback.
"""
import argparse
import contextlib
import json
import math
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
          "fp32": torch.float32, "float32": torch.float32}


def add_device_args(parser):
    g = parser.add_argument_group("device")
    g.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    g.add_argument("--dtype", default=None, choices=sorted(DTYPES),
                   help="model weights and activations (default: bf16 on CUDA, fp32 on CPU)")
    return parser


def device_and_dtype(args):
    """(torch.device, torch.dtype) from --device/--dtype. Under torchrun a bare "cuda" means this
    process's GPU (LOCAL_RANK), which also becomes the current device, so NCCL uses it."""
    name = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {name}: CUDA is not available on this machine (use --device cpu)")
        if device.index is None:
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)) % torch.cuda.device_count())
        torch.cuda.set_device(device)
    dtype = DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    return device, dtype


def init_distributed(device):
    """Join the process group when launched by torchrun (WORLD_SIZE > 1): NCCL when this rank runs
    on a GPU, gloo on the CPU (also on a GPU machine with --device cpu)."""
    if int(os.environ.get("WORLD_SIZE", 1)) > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")


def world():
    """(rank, world size) of this process; (0, 1) without a process group."""
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def all_reduce(t, op=dist.ReduceOp.SUM):
    """In place, over all ranks; a no-op on a single process. NCCL rejects CPU tensors, so under
    NCCL a CPU tensor is reduced on this rank's GPU and copied back (they are small: counts,
    rewards, fitness). Returns t."""
    if not dist.is_initialized():
        return t
    if dist.get_backend() == "nccl" and t.device.type != "cuda":
        on_gpu = t.to(f"cuda:{torch.cuda.current_device()}")
        dist.all_reduce(on_gpu, op=op)
        t.copy_(on_gpu)
    else:
        dist.all_reduce(t, op=op)
    return t


# -----------------------------------------------------------------------------
# Files written whole, outputs never overwritten by accident

@contextlib.contextmanager
def atomic_write(path):
    """Yields a temp path in `path`'s folder; when the block ends without an error the temp file
    replaces `path` (os.replace is atomic on one filesystem), otherwise it is removed.
        with atomic_write(out) as tmp: torch.save(state, tmp)"""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def refuse_existing(path, flag="--force"):
    """Stop before a command overwrites an existing file or a non-empty folder."""
    path = Path(path)
    if path.is_file() or (path.is_dir() and any(path.iterdir())):
        raise FileExistsError(f"{path}: already exists; pick another output or pass {flag} to go on")


# -----------------------------------------------------------------------------
# Arguments checked where they are parsed (argparse names the flag in its one-line error)

def _number(kind, ok, what):
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not (math.isfinite(value) and ok(value)):
            raise argparse.ArgumentTypeError(f"{text} is not {what}")
        return value
    parse.__name__ = what  # argparse shows the type's name in some messages
    return parse


positive_int = _number(int, lambda v: v > 0, "a positive integer")
nonneg_int = _number(int, lambda v: v >= 0, "an integer >= 0")
probability = _number(float, lambda v: 0 <= v <= 1, "a number in [0, 1]")
finite_float = _number(float, lambda v: True, "a finite number")
nonneg_float = _number(float, lambda v: v >= 0, "a finite number >= 0")
positive_float = _number(float, lambda v: v > 0, "a number > 0")


def utf8_text(text):
    """argparse type for text the model reads: bytes in argv that are not UTF-8 arrive as lone
    surrogates, which the tokenizer cannot encode (an error only after the model loaded)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise argparse.ArgumentTypeError(f"{text!r} is not valid UTF-8") from None
    return text


# -----------------------------------------------------------------------------
# One-line errors

def _expected(e):
    """The message of an expected failure, or None for a real bug (keep its traceback)."""
    from safetensors import SafetensorError
    if isinstance(e, FileNotFoundError) and e.filename:  # raised by the OS: "[Errno 2] ..." -> "FILE: ..."
        return f"{e.filename}: {e.strerror}"
    if isinstance(e, json.JSONDecodeError):  # a file parsed without our wrapper: no name to give
        return f"not JSON ({e})"
    if isinstance(e, (ValueError, OSError, SafetensorError)):
        return str(e)
    return None


def run(main, *args):
    """main(*args), with expected failures as one line on stderr and exit status 2."""
    try:
        return main(*args)
    except Exception as e:
        msg = _expected(e)
        if msg is None or os.environ.get("T2_DEBUG") == "1":
            raise
        print(f"error: {msg}", file=sys.stderr)
        sys.exit(2)


# -----------------------------------------------------------------------------
# Numbers and decisions every rank shares (torchrun)


def all_reduce_sums(sums):
    """{name: number} summed over all ranks in one all-reduce (float64), returned as {name: float}:
    a loop's counts and losses read by name, not as stats[0]..stats[8]."""
    t = all_reduce(torch.tensor([float(v) for v in sums.values()], dtype=torch.float64))
    return dict(zip(sums, t.tolist()))


def any_rank(flags):
    """{name: bool}, each true on every rank when it is true on any: a decision all ranks take
    together (stop, refuse), so no rank enters a collective that the others never join."""
    t = all_reduce(torch.tensor([float(bool(v)) for v in flags.values()], dtype=torch.float64), op=dist.ReduceOp.MAX)
    return {k: v > 0 for k, v in zip(flags, t.tolist())}


# -----------------------------------------------------------------------------
# A run folder: never overwritten by accident, its checkpoint read with the file's name in every error

def open_run_dir(out, resume, force, state="state.pt", files=()):
    """Get `out` ready for a run and say whether it resumes (out/state exists and --resume). A folder
    that holds files is refused unless --resume (which needs out/state) or --force (which removes
    `files`, glob patterns of the previous run's outputs, so none of them mixes into the new run).
    Every rank decides together, before anything is written."""
    out, problem = Path(out), None
    if out.is_dir() and any(out.iterdir()) and not force:
        if not resume:
            problem = f"{out}: already holds a run; pass --resume to go on from its {state}, or --force to start over"
        elif not (out / state).exists():
            problem = f"{out}: no {state} to resume from; pick another output folder, or --force to start over"
    if any_rank({"refused": problem is not None})["refused"]:
        raise FileExistsError(problem or f"{out}: refused by another rank")
    if force and world()[0] == 0:
        for f in (f for pattern in (state, *files) for f in out.glob(pattern)):
            f.unlink()
    out.mkdir(parents=True, exist_ok=True)
    return resume and (out / state).exists()


def load_state(path, keys, what="checkpoint", fix="--force starts over", weights_only=False):
    """torch.load of a saved state (a run's checkpoint, a CEM search), refused in one line that names
    the file when it is truncated or not one (torch alone says "[Errno 22] Invalid argument")."""
    try:
        st = torch.load(path, weights_only=weights_only, map_location="cpu")
    except Exception as e:  # truncated zip, random bytes, a pickle error: all mean "not readable"
        raise ValueError(f"{path}: not a readable {what} ({type(e).__name__}: {e}); {fix}") from None
    missing = set(keys) - set(st) if isinstance(st, dict) else set(keys)
    if missing:
        raise ValueError(f"{path}: not a {what} file (no {', '.join(sorted(missing))}); {fix}")
    return st

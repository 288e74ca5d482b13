"""SVF, singular value fine-tuning: one learnable scale per singular value of each adapted matrix.

docs/PAPER.md §1 / paper §3.1 (arXiv 2501.06252). With W = U·diag(σ)·Vh from svd_cache.py, an expert is
one vector θ ∈ R^r per matrix (r = min(m, n)) and the adapted weight is

    z  = sigmoid(θ)                      (official code; the paper never mentions it; flag: raw z = θ)
    W′ = U·diag(σ⊙z)·Vh · Σσ / Σ(σ⊙z)    (the official rescale keeps Σσ fixed; flag: no rescale)

so a uniform z gives back W and multiplying z by a constant changes nothing. θ₀ = 0.1 + 0.01·N(0,1).
Three ways to run an adapted model, all on the model.py Transformer:
  merged(model, expert)   W′ written into the weights (zero overhead), base restored bit-exactly;
  attach + set_z(θ→z)     each target nn.Linear computes y = U((σ⊙z)⊙(Vh·x)): gradients reach θ
                          without any m×n weight gradient (the official code builds full dL/dW′);
  set_z with (B, r) z     one z per sequence of a batch (CEM populations, mixed expert batches);
                          base_rows= marks rows that use the base weights W themselves (dispatch's "other").
The factored path uses the Triton kernel of kernels/svf_linear.py on CUDA, plain torch otherwise
(svf_matmul_torch; the kernel file is a leaf with its own reference, tested equal to this one).
Scripts get experts through load_experts (load -> check -> SVD cache -> attach); files are always
named explicitly (--experts), never discovered by a naming convention.

Why ~450 lines, past docs/STYLE.md's 100–200: "anything SVF lives in svf.py", and SVF is more than the
formula: the factored layer with its kernel fallback, per-row z for batches, merging with an exact
restore, the expert file format with its checks, mixing and transfer (paper §3.3, Table 5), the
memory probe that shows no m×n gradient exists, and the init/merge/mix CLI. Each is one short
section below.

An expert file is safetensors: tensor name = target parameter name, value = θ (float32, length r),
string metadata: parametrization, rescale, base_model, base_fingerprint, targets, layers, task, ...

    python svf.py init  --model checkpoints/smollm2-135m-instruct --out runs/init.safetensors
    python svf.py merge --model checkpoints/smollm2-135m-instruct --expert E.safetensors --out DIR2
    python svf.py mix --experts E1 E2 E3 --out uniform.safetensors    # z′ = (z1 + z2 + z3) / 3
    python tools/bench_svf.py     # SVD time, one training step vs (a) no SVF and (b) the official way
"""
import argparse
import json
import os
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file

import cli
import svd_cache

USE_KERNEL = None  # None: Triton kernel when x is on CUDA; True: always (tests, under TRITON_INTERPRET=1)
_kernel = []       # lazily imported svf_linear, or None once it failed to import or to compile


def svf_matmul_torch(x, U, S, Vh, z):
    """y = x·(U·diag(S⊙z)·Vh)ᵀ in plain torch: svf.py's definition of the factored product, the
    path it runs without the kernel (tests/test_kernels.py: equal to the kernel's own reference).

    x (B, T, n), U (m, r), S (r,), Vh (r, n), z (r,) or (B, r)  ->  y (B, T, m) in x.dtype.
    Autograd gives, with a = Vh·x, g = dL/dy, s = Σσ/Σ(σ⊙z) (docs/PAPER.md §1):
      dL/dz_i = s·σ_i·a_i·(Uᵀg)_i − σ_i·(gᵀy)/Σ(σ⊙z)   summed over tokens,   dL/dθ = dL/dz·z(1−z)
    (the second term comes through the rescale in set_z). Only (tokens × r) tensors appear; U, Vh
    do not require grad, so no m×n gradient is ever formed.
    """
    s = (S * z).reshape(-1, 1, S.shape[0]).to(x.dtype)  # (1 or B, 1, r): one row of scales per sequence
    return ((x @ Vh.T) * s) @ U.T                         # (B, T, r) -> (B, T, m)


def svf_matmul(x, U, S, Vh, z):
    """y = x·(U·diag(S⊙z)·Vh)ᵀ for x (B, T, n), z (r,) or (B, r), rescale already folded into z.
    The Triton kernel on CUDA; svf_matmul_torch otherwise, or when the kernel cannot be imported or
    fails at its first call (a compile error on an unusual GPU must not end a training run): then one
    warning names the error and every later call takes the torch path."""
    if USE_KERNEL or (USE_KERNEL is None and x.is_cuda):
        if not _kernel:
            try:
                from kernels.svf_linear import svf_linear
            except Exception as e:  # no Triton, or a broken kernel file
                warnings.warn(f"kernels/svf_linear.py unavailable ({e!r}); SVF uses the torch path")
                svf_linear = None
            _kernel.append(svf_linear)
        if _kernel[0] is not None:
            try:
                return _kernel[0](x, U, S, Vh, z)
            except (ValueError, TypeError):  # the wrapper's own shape/dtype checks: a caller's bug
                raise
            except Exception as e:  # Triton compile/launch errors come as several exception types
                warnings.warn(f"kernels/svf_linear.py failed ({type(e).__name__}: {e}); SVF uses the torch path "
                              f"from now on")
                _kernel[0] = None
    return svf_matmul_torch(x, U, S, Vh, z)


def theta_to_z(theta, parametrization="sigmoid"):
    if parametrization == "sigmoid":
        return torch.sigmoid(theta)
    if parametrization == "raw":
        return theta
    raise ValueError(f"parametrization must be 'sigmoid' or 'raw', got {parametrization!r}")


def fold_rescale(S, z, rescale=True):
    """z·Σσ/Σ(σ⊙z): the official rescale, per matrix and per row of a (B, r) z, folded into z."""
    return z * (S.sum() / (S * z).sum(-1, keepdim=True)) if rescale else z


def init_theta(cache, seed=0):
    """θ₀ = 0.1 + 0.01·N(0,1) per target matrix (official init; z₀ = sigmoid(θ₀) ≈ 0.525)."""
    g = torch.Generator().manual_seed(seed)
    return {n: 0.1 + 0.01 * torch.randn(cache.rank(n), generator=g) for n in cache.names}


# -----------------------------------------------------------------------------
# The factored linear layer

class SVFLinear(nn.Module):
    """Stands in for one target nn.Linear. z None -> the original weights, exactly."""

    def __init__(self, base: nn.Linear, U, S, Vh):
        super().__init__()
        object.__setattr__(self, "base", base)    # not a submodule: parameter names stay HF's
        self.weight, self.bias = base.weight, base.bias  # the same Parameters (merged() writes them)
        dev, dt = base.weight.device, base.weight.dtype
        self.register_buffer("U", U.to(dev, dt), persistent=False)     # (m, r), model dtype
        self.register_buffer("Vh", Vh.to(dev, dt), persistent=False)   # (r, n)
        # σ and z stay at least float32 (the rescale sums r terms); float64 for gradcheck.
        self.register_buffer("S", S.to(dev, torch.promote_types(dt, torch.float32)), persistent=False)
        self.z = None          # (r,) or (B, r), rescale folded in; set by set_z
        self.base_rows = None  # indices of batch rows that use the base weights W exactly; set by set_z

    def forward(self, x):
        if self.z is None:
            return F.linear(x, self.weight, self.bias)
        y = svf_matmul(x, self.U, self.S, self.Vh, self.z)
        if self.base_rows is not None:
            # Rows routed to "no expert" (dispatch's "other", docs/PAPER.md §4) get W·x, not U·diag(σ)·Vh·x:
            # the factors reproduce W only to rounding (~1e-6 relative in float32, ~1e-2 in bf16).
            # The dense product runs on those rows alone, so a routed batch pays only for them.
            y = y.index_put((self.base_rows,), F.linear(x[self.base_rows], self.weight))
        return y if self.bias is None else y + self.bias


def svf_modules(model):
    return [(f"{path}.weight", m) for path, m in model.named_modules() if isinstance(m, SVFLinear)]


def attach(model, cache):
    """Replace each target nn.Linear of `model` by an SVFLinear (in place, idempotent)."""
    cache.check(model)
    for name in cache.names:
        path = name.removesuffix(".weight")
        parent, child = path.rsplit(".", 1)
        mod = model.get_submodule(path)
        if not isinstance(mod, SVFLinear):
            setattr(model.get_submodule(parent), child, SVFLinear(mod, *cache[name]))


def detach(model):
    """Put the original nn.Linear modules back."""
    for name, mod in svf_modules(model):
        parent, child = name.removesuffix(".weight").rsplit(".", 1)
        setattr(model.get_submodule(parent), child, mod.base)


def set_z(model, zs, rescale=True, base_rows=None):
    """zs[name]: applied z, (r,) or (B, r), differentiable. None -> exact base weights everywhere.
    base_rows: with a (B, r) z, the rows (indices or a (B,) bool mask) that use the base weights
    themselves instead of their z (routed batches: "other" questions get W, not its reconstruction)."""
    for name, mod in svf_modules(model):
        mod.base_rows = None
        if base_rows is not None and zs is not None:
            rows = torch.as_tensor(base_rows, device=mod.S.device)
            rows = rows.nonzero().flatten() if rows.dtype == torch.bool else rows.long()
            mod.base_rows = rows if rows.numel() else None
        if zs is None:
            mod.z = None
        elif name not in zs:
            raise KeyError(f"set_z: no z for {name} (attached: {len(svf_modules(model))} matrices, given {len(zs)})")
        else:
            mod.z = fold_rescale(mod.S, zs[name].to(mod.S.device, mod.S.dtype), rescale)


# -----------------------------------------------------------------------------
# Expert files

def model_order(name):  # model.layers.12.mlp.up_proj.weight -> (12, 5)
    parts = name.split(".")
    return int(parts[2]), svd_cache.KINDS["all"].index(".".join(parts[3:5]))


@dataclass
class Expert:
    theta: dict                                # parameter name -> θ (r,) float32
    meta: dict = field(default_factory=dict)   # strings only (safetensors metadata)
    source: str = "<expert>"                   # file it came from, for error messages

    @classmethod
    def new(cls, theta, model, cache, parametrization="sigmoid", rescale=True, task="none", **extra):
        meta = {"parametrization": parametrization, "rescale": str(rescale).lower(),
                "base_model": str(getattr(model, "name_or_path", "?")), "base_fingerprint": cache.fingerprint,
                "targets": cache.targets, "layers": ",".join(str(i) for i in sorted({model_order(n)[0] for n in theta})),
                "task": task, **{k: str(v) for k, v in extra.items()}}
        theta_to_z(torch.zeros(1), parametrization)  # validate
        return cls({n: t.detach().float().cpu() for n, t in theta.items()}, meta)

    @property
    def rescale(self):
        return self.meta.get("rescale", "true") == "true"

    def z(self, name):
        return theta_to_z(self.theta[name], self.meta.get("parametrization", "sigmoid"))

    def zs(self):
        return {n: self.z(n) for n in self.theta}

    def save(self, path):
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + f".tmp{os.getpid()}")
        save_file({n: t.detach().float().cpu().contiguous() for n, t in self.theta.items()}, tmp,
                  metadata={k: str(v) for k, v in self.meta.items()})
        os.replace(tmp, path)  # atomic: a crash never leaves half an expert

    @classmethod
    def load(cls, path):
        if not Path(path).is_file():
            raise FileNotFoundError(f"{path}: no such expert file (train one with `make train TASK=...`, "
                                    f"which writes runs/TASK-MODEL/best.safetensors)")
        try:
            with safe_open(path, framework="pt") as f:
                names = sorted(f.keys(), key=model_order)
                return cls({n: f.get_tensor(n) for n in names}, dict(f.metadata() or {}), str(path))
        except (ValueError, IndexError) as e:  # a key that is not model.layers.I.KIND.weight
            raise ValueError(f"{path}: not an SVF expert file ({e})") from None
        except Exception as e:  # truncated or corrupt: safetensors raises its own error types
            raise ValueError(f"{path}: cannot read safetensors ({e})") from None

    def check(self, model, cache):
        """One clear ValueError when this expert does not fit `model` (other weights or shapes)."""
        missing = [k for k in ("parametrization", "rescale", "base_fingerprint") if k not in self.meta]
        if missing:
            raise ValueError(f"{self.source}: not an SVF expert file (metadata lacks {missing})")
        fp = self.meta["base_fingerprint"]
        if fp != "*" and fp != cache.fingerprint:  # "*": transferred on purpose (transfer())
            raise ValueError(f"{self.source}: expert was trained for base {fp} "
                             f"({self.meta.get('base_model', '?')}), this model is {cache.fingerprint} (the fingerprint "
                             f"hashes the loaded values: a model loaded in bf16 differs from its fp32 load; try --dtype fp32)")
        bad = [f"{n} has r={t.numel()}, the model's matrix {cache.shapes.get(n, 'does not exist')}"
               for n, t in self.theta.items() if n not in cache.shapes or t.shape != (cache.rank(n),)]
        if bad:
            raise ValueError(f"{self.source}: expert does not fit this model: {bad[0]} ({len(bad)} mismatches)")
        cache.check(model)


def mix(experts, alpha, mode="z"):
    """z′ = Σ_k α_k·z_k (docs/PAPER.md §4), α of shape (K,) or (K, n_matrices); returns applied z per name.
    mode "z" mixes the applied z (paper: a one-hot α gives the expert back exactly); mode "theta"
    mixes raw θ, then applies the parametrization (official code)."""
    names = list(experts[0].theta)
    if any(list(e.theta) != names for e in experts):
        raise ValueError("mix: experts adapt different matrices")
    alpha = torch.as_tensor(alpha, dtype=torch.float32)
    alpha = alpha[:, None].expand(-1, len(names)) if alpha.dim() == 1 else alpha  # (K, n_matrices)
    if alpha.shape != (len(experts), len(names)):
        raise ValueError(f"alpha must be ({len(experts)},) or ({len(experts)}, {len(names)}), got {tuple(alpha.shape)}")
    if mode == "z":
        return {n: sum(a[j] * e.z(n) for a, e in zip(alpha, experts)) for j, n in enumerate(names)}
    if mode == "theta":
        params = {e.meta.get("parametrization", "sigmoid") for e in experts}
        if len(params) > 1:
            raise ValueError(f"mix(mode='theta'): experts use different parametrizations {params}")
        p = params.pop()
        return {n: theta_to_z(sum(a[j] * e.theta[n] for a, e in zip(alpha, experts)), p) for j, n in enumerate(names)}
    raise ValueError(f"mix: mode must be 'z' or 'theta', got {mode!r}")


def load_experts(model, experts, cache=None, factored=True, root=None):
    """The one way scripts get experts onto a model: load (paths or Expert objects) -> check that they
    adapt the same matrices with the same rescale rule -> SVD cache of those matrices -> check each
    against the model -> (factored=True) attach the factored layers. Returns (experts, cache).

    One rescale rule for all of them: the experts' own flag (metadata "rescale"). A set that mixes
    flags is refused, since a mixed z′ = Σ α_k z_k would have no single rule to follow."""
    experts = [e if isinstance(e, Expert) else Expert.load(e) for e in experts]
    if not experts:
        raise ValueError("load_experts: no expert files given")
    first, names = experts[0], list(experts[0].theta)
    for e in experts[1:]:
        if list(e.theta) != names:
            raise ValueError(f"{e.source}: adapts other matrices than {first.source} "
                             f"({len(e.theta)} vs {len(names)}, targets {e.meta.get('targets')} vs "
                             f"{first.meta.get('targets')}); experts used together must adapt the same ones")
        if e.rescale != first.rescale:
            raise ValueError(f"{e.source}: rescale={e.meta.get('rescale')}, but {first.source} has "
                             f"rescale={first.meta.get('rescale')}; experts used together must share the Σσ rescale rule")
    cache = cache or svd_cache.load(model, names=names, root=root)
    for e in experts:
        e.check(model, cache)
    if factored:
        attach(model, cache)
    return experts, cache


def transfer(expert, shuffle=False, seed=0):
    """Cross-model transfer (paper Table 5): the same θ for another base model with equal shapes;
    shuffle=True permutes each vector (the control: does the singular-value order matter?)."""
    g = torch.Generator().manual_seed(seed)
    theta = {n: t[torch.randperm(t.numel(), generator=g)] if shuffle else t.clone() for n, t in expert.theta.items()}
    meta = dict(expert.meta, base_fingerprint="*", transferred_from=expert.meta.get("base_fingerprint", "?"),
                transfer=f"shuffled seed={seed}" if shuffle else "in order")
    return Expert(theta, meta, f"{expert.source} (transferred)")


# -----------------------------------------------------------------------------
# Merging W′ into the weights

@contextmanager
def merged(model, expert_or_zs, cache=None, rescale=True):
    """Inside the block the target weights hold W′; on exit the base weights are back, bit for bit.
    An expert (path or Expert) brings its own rescale flag; a dict of z uses `rescale`."""
    if isinstance(expert_or_zs, (str, os.PathLike, Expert)):
        (expert,), cache = load_experts(model, [expert_or_zs], cache, factored=False)
        zs, rescale = expert.zs(), expert.rescale
    else:
        zs = expert_or_zs
        cache = cache or svd_cache.load(model, names=list(zs))
        cache.check(model)
    backup = {}  # on the CPU: a GPU model pays no extra GPU memory for the copy
    try:
        with torch.no_grad():
            for name, z in zs.items():
                if z.dim() != 1:
                    raise ValueError(f"merged: one z per matrix, got {tuple(z.shape)} for {name} (use set_z for (B, r))")
                U, S, Vh = cache[name]
                z = fold_rescale(S, z.to(S.device, torch.float32), rescale)
                W = model.get_parameter(name)
                backup[name] = W.detach().to("cpu", copy=True)
                W.copy_(((U * (S * z)) @ Vh).to(W.dtype))  # (m, r)·(r, n): W′ in float32, then model dtype
        yield model
    finally:
        with torch.no_grad():
            for name, w in backup.items():
                model.get_parameter(name).copy_(w)


# -----------------------------------------------------------------------------
# Memory accounting (tests and tools/bench_svf.py: SVF must not need m×n gradients)

def peak_memory(step):
    """Peak bytes allocated while step() runs, above what was allocated before it.
    CUDA: the caching allocator's counters. CPU: torch.profiler records every malloc/free of
    torch's CPU allocator with its size; a running sum in time order gives the peak. (ru_maxrss
    cannot be reset between runs, and tracemalloc does not see torch's allocator.) The event tree
    is a private profiler API: if it moves, this is the one function to fix."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events, stack = [], list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        ef = node.extra_fields
        if type(ef).__name__ == "_ExtraFields_Allocation" and ef.device.type == "cpu":
            events.append((node.start_time_ns, ef.alloc_size))
        stack.extend(node.children)
    live = peak = 0
    for _, nbytes in sorted(events):
        live += nbytes
        peak = max(peak, live)
    return peak


# -----------------------------------------------------------------------------
# CLI

def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    sub = p.add_subparsers(dest="cmd")
    i = sub.add_parser("init", help="write a freshly initialised expert (the start of training)")
    i.add_argument("--model", default="checkpoints/smollm2-135m-instruct")
    i.add_argument("--out", required=True, help="expert .safetensors to write")
    i.add_argument("--targets", default="mlp", type=svd_cache.targets_type, help=svd_cache.TARGETS_HELP)
    i.add_argument("--layers", default=None, help='"half", "top" or comma-separated indices (default: all)')
    i.add_argument("--seed", type=int, default=0)
    i.add_argument("--raw", action="store_true", help="z = θ instead of sigmoid(θ)")
    i.add_argument("--no-rescale", action="store_true", help="drop the Σσ/Σ(σ⊙z) rescale")
    i.add_argument("--task", default="none")
    m = sub.add_parser("merge", help="write an HF folder with W′ merged in")
    m.add_argument("--model", default="checkpoints/smollm2-135m-instruct")
    m.add_argument("--expert", required=True)
    m.add_argument("--out", required=True, help="new folder (model.safetensors + config/tokenizer copies)")
    x = sub.add_parser("mix", help="write z′ = Σ α_k z_k of trained experts as one expert (default α = 1/K)")
    x.add_argument("--experts", nargs="+", required=True, help="expert files of one base model")
    x.add_argument("--alpha", nargs="+", type=float, default=None, help="one α per expert (default: uniform 1/K)")
    x.add_argument("--mode", default="z", choices=["z", "theta"], help="mix applied z (paper) or raw θ (official)")
    x.add_argument("--out", required=True, help="expert .safetensors to write")
    for q in (i, m):
        q.add_argument("--root", default=None, help="SVD cache root (default $T2_CACHE or ~/.cache/transformer2)")
        cli.add_device_args(q)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    from model import Transformer, save_folder
    if args.cmd in ("init", "merge"):
        device, dtype = cli.device_and_dtype(args)
    if args.cmd == "init":
        model = Transformer.from_pretrained(args.model, dtype=dtype, device=device)
        cache = svd_cache.load(model, args.targets, args.layers, args.root)
        expert = Expert.new(init_theta(cache, args.seed), model, cache, "raw" if args.raw else "sigmoid",
                            not args.no_rescale, args.task, seed=args.seed)
        expert.save(args.out)
        print(f"{args.out} | {len(expert.theta)} matrices | {sum(t.numel() for t in expert.theta.values()):,} "
              f"parameters | base {cache.fingerprint}")
    elif args.cmd == "merge":
        model = Transformer.from_pretrained(args.model, dtype=dtype, device=device)
        (expert,), cache = load_experts(model, [args.expert], root=args.root, factored=False)
        with merged(model, expert, cache):
            save_folder(model, args.model, args.out)
        print(f"{args.out} | {len(expert.theta)} matrices merged from {args.expert}")
    elif args.cmd == "mix":
        experts = [Expert.load(f) for f in args.experts]
        alpha = args.alpha or [1.0 / len(experts)] * len(experts)
        if len(alpha) != len(experts):
            p.error(f"--alpha needs one value per expert ({len(experts)}), got {len(alpha)}")
        fps = {e.meta.get("base_fingerprint") for e in experts}
        if len(fps) > 1:
            raise ValueError(f"{args.experts[0]}: the experts were trained on different base models {sorted(map(str, fps))}")
        if len({e.rescale for e in experts}) > 1:
            raise ValueError(f"{args.experts[0]}: the experts disagree on the Σσ rescale; a mix needs one rule")
        # stored as raw z: a mix of sigmoid z's need not be a sigmoid of anything in range
        meta = {**experts[0].meta, "parametrization": "raw", "task": "mix",
                "mix_alpha": json.dumps(alpha), "mix_experts": json.dumps(args.experts), "mix_mode": args.mode}
        Expert(mix(experts, alpha, args.mode), meta).save(args.out)
        print(f"{args.out} | z′ = " + " + ".join(f"{a:.3f}·{f}" for a, f in zip(alpha, args.experts)))
    else:
        p.print_help()


if __name__ == "__main__":
    cli.run(main)

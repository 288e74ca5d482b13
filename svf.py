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
restore, the expert file format with its checks, mixing and transfer (paper §3.3, Table 5), and
the init/merge/mix CLI. Each is one short section below. (The memory probe that shows no m×n
gradient exists is a benchmark: tools/bench_svf.py.)

An expert file is safetensors: tensor name = target parameter name, value = θ (float32, length r),
string metadata: parametrization, rescale, base_model, base_fingerprint, targets, layers, task, ...
Every θ and α is checked finite where it is read and before it is written: a NaN expert would
merge into NaN weights and answer nothing, with exit status 0.

    python svf.py init  --model checkpoints/smollm2-135m-instruct --out runs/init.safetensors
    python svf.py merge --model checkpoints/smollm2-135m-instruct --expert E.safetensors --out DIR2 [--force]
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
from model import replace_module

USE_KERNEL = None  # None: Triton kernel when x is on CUDA; True: always (tests, under TRITON_INTERPRET=1)
_kernel = []       # lazily imported svf_linear, or None once it failed to import or to compile


def svf_matmul_torch(x, U, S, Vh, z):
    """y = x·(U·diag(S⊙z)·Vh)ᵀ in plain torch: svf.py's definition of the factored product, the
    path it runs without the kernel (tests/test_kernels.py: equal to the kernel's own reference).

    x (B, T, n), U (m, r), S (r,), Vh (r, n), z (r,) or (B, r)  ->  y (B, T, m) in x.dtype.
    Autograd gives, with a = Vh·x, g = dL/dy and the rescale ρ = Σσ/Σ(σ⊙z) (docs/PAPER.md §1):
      dL/dz_i = ρ·σ_i·a_i·(Uᵀg)_i − σ_i·(gᵀy)/Σ(σ⊙z)   summed over tokens,   dL/dθ = dL/dz·z(1−z)
    (the second term comes through the rescale in set_z). Only (tokens × r) tensors appear; U, Vh
    do not require grad, so no m×n gradient is ever formed.
    """
    scales = (S * z).reshape(-1, 1, S.shape[0]).to(x.dtype)  # (1 or B, 1, r): σ⊙z, one row per sequence
    return ((x @ Vh.T) * scales) @ U.T                         # (B, T, r) -> (B, T, m)


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
        if not isinstance(mod := model.get_submodule(path), SVFLinear):
            replace_module(model, path, SVFLinear(mod, *cache[name]))


def detach(model):
    """Put the original nn.Linear modules back."""
    for name, mod in svf_modules(model):
        replace_module(model, name.removesuffix(".weight"), mod.base)


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


def refuse_nonfinite(tensors, what):
    """A NaN or ±inf in θ, z or α is refused by name: merged it gives NaN weights and no error."""
    bad = [n for n, t in tensors.items() if not torch.isfinite(t).all()]
    if bad:
        raise ValueError(f"{what}: {bad[0]} holds NaN or inf ({len(bad)} of {len(tensors)} tensors); refusing it")


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
        refuse_nonfinite(self.theta, f"{path}: not written")
        with cli.atomic_write(path) as tmp:  # a crash never leaves half an expert
            save_file({n: t.detach().float().cpu().contiguous() for n, t in self.theta.items()}, tmp,
                      metadata={k: str(v) for k, v in self.meta.items()})

    @classmethod
    def load(cls, path):
        if not Path(path).is_file():
            raise FileNotFoundError(f"{path}: no such expert file (train one with `make train TASK=...`, "
                                    f"which writes runs/TASK-MODEL/best.safetensors)")
        try:
            with safe_open(path, framework="pt") as f:
                names = sorted(f.keys(), key=model_order)
                expert = cls({n: f.get_tensor(n) for n in names}, dict(f.metadata() or {}), str(path))
        except (ValueError, IndexError) as e:  # a key that is not model.layers.I.KIND.weight
            raise ValueError(f"{path}: not an SVF expert file ({e})") from None
        except Exception as e:  # truncated or corrupt: safetensors raises its own error types
            raise ValueError(f"{path}: cannot read safetensors ({e})") from None
        refuse_nonfinite(expert.theta, str(path))
        return expert

    def check(self, model, cache=None):
        """One clear ValueError when this expert does not fit `model` (other weights, a matrix the model
        lacks, other shapes). It needs only the model's weights, so load_experts runs it before any SVD
        work; with `cache`, the cache is checked against the model too."""
        missing = [k for k in ("parametrization", "rescale", "base_fingerprint") if k not in self.meta]
        if missing:
            raise ValueError(f"{self.source}: not an SVF expert file (metadata lacks {missing})")
        fp, here = self.meta["base_fingerprint"], cache.fingerprint if cache else svd_cache.model_fingerprint(model)
        if fp != "*" and fp != here:  # "*": transferred on purpose (transfer())
            raise ValueError(f"{self.source}: expert was trained for base {fp} "
                             f"({self.meta.get('base_model', '?')}), this model is {here} (the fingerprint "
                             f"hashes the loaded values: a model loaded in bf16 differs from its fp32 load; try --dtype fp32)")
        bad = []
        for n, t in self.theta.items():
            try:
                shape = tuple(model.get_parameter(n).shape)
            except AttributeError:  # e.g. model.layers.40 on a 30-layer model
                bad.append(f"{n}: the model has no such matrix ({model.config.num_hidden_layers} layers)")
                continue
            if t.shape != (min(shape),):
                bad.append(f"{n} has r={t.numel()}, the model's matrix is {shape}")
        if bad:
            raise ValueError(f"{self.source}: expert does not fit this model: {bad[0]} ({len(bad)} mismatches)")
        if cache is not None:
            cache.check(model)


def check_together(experts):
    """Experts used together (mixed, or routed in one batch) must adapt the same matrices with the same
    shapes, follow one Σσ rescale rule (a mixed z′ = Σ α_k z_k has a single rule to follow) and come
    from one base model ("*": transferred on purpose). One ValueError naming the odd file out."""
    first, names = experts[0], list(experts[0].theta)
    fps = {first.meta.get("base_fingerprint")} - {"*"}
    for e in experts[1:]:
        if list(e.theta) != names:
            raise ValueError(f"{e.source}: adapts other matrices than {first.source} "
                             f"({len(e.theta)} vs {len(names)}, targets {e.meta.get('targets')} vs "
                             f"{first.meta.get('targets')}); experts used together must adapt the same ones")
        shape = next(((n, tuple(t.shape)) for n, t in e.theta.items() if t.shape != first.theta[n].shape), None)
        if shape:
            raise ValueError(f"{e.source}: {shape[0]} has shape {shape[1]}, {first.source} has "
                             f"{tuple(first.theta[shape[0]].shape)}; experts used together must fit one model")
        if e.rescale != first.rescale:
            raise ValueError(f"{e.source}: rescale={e.meta.get('rescale')}, but {first.source} has "
                             f"rescale={first.meta.get('rescale')}; experts used together must share the Σσ rescale rule")
        fp = e.meta.get("base_fingerprint")
        if fp != "*" and fps and fp not in fps:
            raise ValueError(f"{e.source}: trained on base {fp}, {first.source} on {fps.pop()}; "
                             f"experts used together must share their base model")
        fps |= {fp} - {"*"}


def mix(experts, alpha, mode="z"):
    """z′ = Σ_k α_k·z_k (docs/PAPER.md §4), α of shape (K,) or (K, n_matrices); returns applied z per name.
    mode "z" mixes the applied z (paper: a one-hot α gives the expert back exactly); mode "theta"
    mixes raw θ, then applies the parametrization (official code)."""
    check_together(experts)
    names = list(experts[0].theta)
    alpha = torch.as_tensor(alpha, dtype=torch.float32)
    refuse_nonfinite({"alpha": alpha}, "mix")
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
    """The one way scripts get experts onto a model: load (paths or Expert objects; θ finite) -> check
    they go together (check_together) -> check each against the model's weights and shapes -> only
    then the SVD cache of those matrices (a mismatched expert costs no SVD) -> (factored=True) attach
    the factored layers. Returns (experts, cache)."""
    experts = [e if isinstance(e, Expert) else Expert.load(e) for e in experts]
    if not experts:
        raise ValueError("load_experts: no expert files given")
    check_together(experts)
    for e in experts:
        e.check(model)
    cache = cache or svd_cache.load(model, names=list(experts[0].theta), root=root)
    cache.check(model)
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

def backup_on_device(weights):
    """Where merged() keeps the base weights while W′ is in: on the weights' own device when it has room
    for the copy with as much to spare (a device-to-device copy costs ~nothing; on the CPU that is the
    only place), otherwise in CPU memory (on Llama-3-8B the MLP is 11 GB: a 22 GB round trip per merge
    over PCIe, so that copy is made once per run and only the restore is paid; see keep())."""
    W = next(iter(weights), None)
    if W is None or W.device.type != "cuda":
        return True
    need = sum(w.numel() * w.element_size() for w in weights)
    return torch.cuda.mem_get_info(W.device)[0] > 2 * need


def keep(W):
    """A CPU copy of W, made once and reused while W holds the same values (its version counter is
    the one merged() stamped after its last restore)."""
    kept = getattr(W, "_t2_backup", None)
    if kept is None or kept[0] != W._version:
        kept = (W._version, W.detach().to("cpu", copy=True))
    return kept[1]


@contextmanager
def merged(model, expert_or_zs, cache=None, rescale=True):
    """Inside the block the target weights hold W′; on exit the base weights are back, bit for bit.
    An expert (path or Expert) brings its own rescale flag; a dict of z uses `rescale`.

    Cheap enough to run before every rollout batch: the factors come from the attached layers when
    the model has them (already on the device; no file is read), else from the SVD cache; the cache
    check hashes nothing once the weights were hashed, because the exit re-stamps each restored
    matrix's digest memo (its values are the hashed ones); the backup sits where it is cheapest."""
    if isinstance(expert_or_zs, (str, os.PathLike, Expert)):
        (expert,), cache = load_experts(model, [expert_or_zs], cache, factored=False)
        zs, rescale = expert.zs(), expert.rescale
    else:
        zs = expert_or_zs
    attached = dict(svf_modules(model))
    if all(n in attached for n in zs):  # the factored layers hold U, S, Vh on the device already
        factors = {n: (attached[n].U, attached[n].S, attached[n].Vh) for n in zs}.__getitem__
    else:
        cache = cache or svd_cache.load(model, names=list(zs))
        factors = cache.__getitem__
    if cache is not None:
        cache.check(model)
    weights = {name: model.get_parameter(name) for name in zs}
    on_device = backup_on_device(weights.values())
    backup, digests = {}, {}
    try:
        with torch.no_grad():
            for name, z in zs.items():
                if z.dim() != 1:
                    raise ValueError(f"merged: one z per matrix, got {tuple(z.shape)} for {name} (use set_z for (B, r))")
                U, S, Vh = factors(name)
                z = fold_rescale(S, z.to(S.device, torch.float32), rescale)
                W = weights[name]
                digests[name] = svd_cache.known_digest(W)
                backup[name] = W.detach().clone() if on_device else keep(W)
                if U.dtype == torch.float32:  # (m, r)·(r, n): W′ in float32
                    W.copy_(((U * (S * z)) @ Vh).to(W.dtype))
                else:  # bf16/fp16 factors (a low-precision model's attached layers): build only the change,
                    # W′ = W + U·diag(σ⊙(z−1))·Vh, so their rounding error scales with the change, not with W
                    delta = (U.float() * (S.float() * (z - 1))) @ Vh.float()
                    W.copy_((W.float() + delta).to(W.dtype))
        yield model
    finally:
        with torch.no_grad():
            for name, w in backup.items():
                W = weights[name]
                W.copy_(w)
                svd_cache.restamp(W, digests[name])
                if not on_device:
                    W._t2_backup = (W._version, w)


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
    m.add_argument("--force", action="store_true", help="replace an existing --out model folder")
    x = sub.add_parser("mix", help="write z′ = Σ α_k z_k of trained experts as one expert (default α = 1/K)")
    x.add_argument("--experts", nargs="+", required=True, help="expert files of one base model")
    x.add_argument("--alpha", nargs="+", type=cli.finite_float, default=None, help="one α per expert (default: uniform 1/K)")
    x.add_argument("--mode", default="z", choices=["z", "theta"], help="mix applied z (paper) or raw θ (official)")
    x.add_argument("--out", required=True, help="expert .safetensors to write")
    for q in (i, x):
        q.add_argument("--force", action="store_true", help="replace an existing --out file")
    for q in (i, m):
        q.add_argument("--root", default=None, help="SVD cache root (default $T2_CACHE or ~/.cache/transformer2)")
        cli.add_device_args(q)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    from model import Transformer, save_folder
    if args.cmd in ("init", "merge", "mix") and not args.force:
        cli.refuse_existing(args.out, "--force")  # before minutes of loading, not after
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
        expert = Expert.load(args.expert)  # a bad file fails before the model loads
        model = Transformer.from_pretrained(args.model, dtype=dtype, device=device)
        (expert,), cache = load_experts(model, [expert], root=args.root, factored=False)
        with merged(model, expert, cache):
            save_folder(model, args.model, args.out, replace=args.force)
        print(f"{args.out} | {len(expert.theta)} matrices merged from {args.expert}")
    elif args.cmd == "mix":
        experts = [Expert.load(f) for f in args.experts]
        alpha = args.alpha or [1.0 / len(experts)] * len(experts)
        if len(alpha) != len(experts):
            p.error(f"--alpha needs one value per expert ({len(experts)}), got {len(alpha)}")
        check_together(experts)  # load_experts' checks: the same matrices, shapes, rescale rule, base model
        # stored as raw z: a mix of sigmoid z's need not be a sigmoid of anything in range
        meta = {**experts[0].meta, "parametrization": "raw", "task": "mix",
                "mix_alpha": json.dumps(alpha), "mix_experts": json.dumps(args.experts), "mix_mode": args.mode}
        Expert(mix(experts, alpha, args.mode), meta).save(args.out)
        print(f"{args.out} | z′ = " + " + ".join(f"{a:.3f}·{f}" for a, f in zip(alpha, args.experts)))
    else:
        p.print_help()


if __name__ == "__main__":
    cli.run(main)

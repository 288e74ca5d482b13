"""LoRA, the baseline of paper Table 4: a trainable low-rank update beside chosen weight matrices.

Hu et al. 2021 (arXiv 2106.09685); docs/PAPER.md §5. For a target W (m×n), A (r×n) and B (m×r):

    y = W·x + (alpha/r)·B·A·dropout(x)       A Kaiming-uniform, B = 0: training starts at the base model

The paper's setting: r = 16, alpha = 32, dropout 0.05, on q_proj and v_proj of every layer, which is
6.82M parameters on Llama-3-8B (32 × 16·(4096+4096 + 4096+1024)); with gate/up/down too, 35.13M.
It mirrors svf.py: `attach` swaps each target nn.Linear for a LoRALinear (HF parameter names kept),
`set_params(model, params, scale)` points them at a dict of tensors (name.lora_A / name.lora_B, the
dict that reinforce.py optimises, like SVF's θ), `merged` writes W + (alpha/r)·B·A into the weights
and restores them bit-exactly. Dropout acts only in model.train() mode. An adapter file is
safetensors, float32 A and B, string metadata: rank, alpha, targets, layers, base_fingerprint, task, ...
A training loop (reinforce.py's shape):

    names = target_names(model, "qv"); attach(model, names, dropout=0.05)
    theta = {k: t.to(device).requires_grad_() for k, t in init_params(model, names, rank=16).items()}
    set_params(model, theta, scale=32 / 16)     # loss.backward() reaches A and B only
    with merged(model, theta, scale=32 / 16):   # fast rollouts: the update folded into W

    python lora.py init  --model checkpoints/smollm2-135m-instruct --targets qv --out runs/lora0.safetensors
    python lora.py merge --model checkpoints/smollm2-135m-instruct --adapter F.safetensors --out DIR2
"""
import argparse
import math
import os
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
from svf import refuse_nonfinite  # NaN or inf in A or B: refused by name where read and before written

def target_names(model, targets="qv", layers=None):
    """Weight names to adapt, in model order: targets "qv" (the paper's LoRA), "mlp", "qv,mlp", "q,k,v,o", ...
    (the same names as SVF's, svd_cache.target_names)."""
    return svd_cache.target_names(model, targets, layers)


def count(model, names, rank):
    """Trainable parameters, r·(m+n) per matrix (works on a meta-device model: nothing is allocated)."""
    return sum(rank * sum(model.get_parameter(n).shape) for n in names)


def init_params(model, names, rank=16, seed=0):
    """A (r, n) as PEFT does (kaiming_uniform_ with a=√5: U(±1/√n)), B (m, r) zeros; float32, CPU."""
    g, params = torch.Generator().manual_seed(seed), {}
    for name in names:
        m, n = model.get_parameter(name).shape
        p = name.removesuffix(".weight")
        params[f"{p}.lora_A"] = nn.init.kaiming_uniform_(torch.empty(rank, n), a=math.sqrt(5), generator=g)
        params[f"{p}.lora_B"] = torch.zeros(m, rank)
    return params


class LoRALinear(nn.Module):
    """Stands in for one target nn.Linear. A None -> the original layer, exactly."""

    def __init__(self, base: nn.Linear, dropout=0.0):
        super().__init__()
        object.__setattr__(self, "base", base)           # not a submodule: parameter names stay HF's
        self.weight, self.bias = base.weight, base.bias  # the same Parameters (merged() writes them)
        self.dropout, self.A, self.B, self.scale = dropout, None, None, 0.0  # A, B: set by set_params

    def forward(self, x):
        y = F.linear(x, self.weight, self.bias)
        if self.A is None:
            return y
        # x in the adapter's dtype, as PEFT does (float32 A, B under a bf16 model): (..., n)->(..., r)->(..., m)
        h = F.dropout(x, self.dropout, self.training).to(self.A.dtype)
        return y + (self.scale * (h @ self.A.T) @ self.B.T).to(y.dtype)


def lora_modules(model):  # (module path, LoRALinear) of every attached layer
    return [(path, m) for path, m in model.named_modules() if isinstance(m, LoRALinear)]


def attach(model, names, dropout=0.0):
    """Replace each target nn.Linear by a LoRALinear (in place, idempotent); inactive until set_params."""
    for name in names:
        path = name.removesuffix(".weight")
        if not isinstance(mod := model.get_submodule(path), LoRALinear):
            replace_module(model, path, LoRALinear(mod, dropout).train(mod.training))  # keep eval mode


def detach(model):
    for path, mod in lora_modules(model):
        replace_module(model, path, mod.base)


def set_params(model, params, scale):
    """params[path.lora_A], params[path.lora_B]: used as they are (differentiable). None: base model."""
    for path, mod in lora_modules(model):
        if params is not None and f"{path}.lora_A" not in params:
            raise KeyError(f"set_params: no LoRA tensors for {path} ({len(params)} tensors given)")
        mod.A, mod.B = (None, None) if params is None else (params[f"{path}.lora_A"], params[f"{path}.lora_B"])
        mod.scale = scale


@dataclass
class Adapter:
    params: dict                               # "<path>.lora_A" (r, n) and "<path>.lora_B" (m, r), float32
    meta: dict = field(default_factory=dict)   # strings only (safetensors metadata)
    source: str = "<adapter>"                  # the file it came from, for error messages

    @classmethod
    def new(cls, params, model, alpha=32.0, targets="qv", dropout=0.0, task="none", **extra):
        rank = next(t.shape[0] for n, t in params.items() if n.endswith("lora_A"))
        layers = sorted({int(n.split(".")[2]) for n in params})
        meta = {"kind": "lora", "rank": rank, "alpha": alpha, "targets": targets, "layers": ",".join(map(str, layers)),
                "dropout": dropout, "base_model": getattr(model, "name_or_path", "?"),
                "base_fingerprint": svd_cache.model_fingerprint(model), "task": task, **extra}
        return cls({n: t.detach().float().cpu() for n, t in params.items()}, {k: str(v) for k, v in meta.items()})

    @property
    def scale(self):
        return float(self.meta["alpha"]) / int(self.meta["rank"])

    def n_params(self):
        return sum(t.numel() for t in self.params.values())

    def save(self, path):
        refuse_nonfinite(self.params, f"{path}: not written")
        with cli.atomic_write(path) as tmp:  # a crash never leaves half an adapter
            save_file({n: t.contiguous() for n, t in self.params.items()}, tmp, metadata=self.meta)

    @classmethod
    def load(cls, path):
        if not Path(path).is_file():
            raise FileNotFoundError(f"{path}: no such adapter file")
        try:
            with safe_open(path, framework="pt") as f:
                adapter = cls({n: f.get_tensor(n) for n in f.keys()}, dict(f.metadata() or {}), str(path))
        except Exception as e:  # truncated or corrupt: safetensors raises its own error types
            raise ValueError(f"{path}: cannot read safetensors ({e})") from None
        refuse_nonfinite(adapter.params, str(path))
        return adapter

    def check(self, model):
        """One clear ValueError when this file does not fit `model` (not LoRA, other weights or shapes)."""
        if self.meta.get("kind") != "lora" or not {"rank", "alpha", "base_fingerprint"} <= set(self.meta):
            raise ValueError(f"{self.source}: not a LoRA adapter file (metadata kind={self.meta.get('kind')!r})")
        if (fp := svd_cache.model_fingerprint(model)) != self.meta["base_fingerprint"]:
            raise ValueError(f"{self.source}: adapter was trained for base {self.meta['base_fingerprint']} "
                             f"({self.meta.get('base_model', '?')}), this model is {fp}")
        r, want = int(self.meta["rank"]), {}
        for name in svd_cache.target_names(model, "all"):  # the matrices LoRA may adapt
            (m, n), p = model.get_parameter(name).shape, name.removesuffix(".weight")
            want[f"{p}.lora_A"], want[f"{p}.lora_B"] = (r, n), (m, r)
        bad = [f"{n} is {tuple(t.shape)}, the model needs {want.get(n, 'no such matrix')}"
               for n, t in self.params.items() if want.get(n) != t.shape]
        if bad:
            raise ValueError(f"{self.source}: adapter does not fit this model: {bad[0]} ({len(bad)} mismatches)")


def is_adapter_file(path):
    """True when `path` is a LoRA adapter file (metadata kind "lora"): lets a tool's --expert take an
    SVF expert or a LoRA adapter. Missing or unreadable: False, and the SVF loader says what is wrong."""
    try:
        with safe_open(path, framework="pt") as f:
            return (f.metadata() or {}).get("kind") == "lora"
    except Exception:
        return False


@contextmanager
def merged(model, adapter_or_params, scale=None):
    """Inside the block the target weights hold W + scale·B·A (attached LoRA paths are paused);
    on exit the base weights are back, bit for bit. An adapter (path or Adapter) brings its scale."""
    if isinstance(adapter_or_params, (str, os.PathLike)):
        adapter_or_params = Adapter.load(adapter_or_params)
    params = adapter_or_params
    if isinstance(params, Adapter):
        params.check(model)
        params, scale = params.params, params.scale
    elif scale is None:
        raise ValueError("merged: a dict of LoRA tensors needs scale=alpha/r")
    paused = {mod: (mod.A, mod.B) for _, mod in lora_modules(model)}
    backup, digests = {}, {}  # backup on the CPU: a GPU model pays no extra GPU memory for the copy
    try:
        with torch.no_grad():
            for mod in paused:
                mod.A = mod.B = None
            for a in [n for n in params if n.endswith(".lora_A")]:
                p = a.removesuffix(".lora_A")
                W = model.get_parameter(f"{p}.weight")
                digests[p] = svd_cache.known_digest(W)
                backup[p] = W.detach().to("cpu", copy=True)
                dt = torch.promote_types(W.dtype, torch.float32)  # float32 at least, then the model's dtype
                A, B = params[a].to(W.device, dt), params[f"{p}.lora_B"].to(W.device, dt)
                W.copy_((W.to(dt) + scale * (B @ A)).to(W.dtype))  # (m, r)·(r, n)
        yield model
    finally:
        with torch.no_grad():
            for p, w in backup.items():
                (W := model.get_parameter(f"{p}.weight")).copy_(w)
                svd_cache.restamp(W, digests[p])  # the same values: the next check hashes nothing
            for mod, (A, B) in paused.items():
                mod.A, mod.B = A, B


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    sub = p.add_subparsers(dest="cmd")
    i = sub.add_parser("init", help="write a freshly initialised adapter (B = 0) and print its size")
    i.add_argument("--out", required=True, help="adapter .safetensors to write")
    i.add_argument("--targets", default="qv", help='paper: "qv"; also "mlp", "qv,mlp", "q,k,v,o", ...')
    i.add_argument("--layers", default=None, help='"half", "top" or comma-separated indices (default: all)')
    i.add_argument("--rank", type=int, default=16, help="paper: 16")
    i.add_argument("--alpha", type=float, default=32.0, help="paper: 32")
    i.add_argument("--dropout", type=float, default=0.05, help="paper: 0.05 (training only)")
    i.add_argument("--seed", type=int, default=0)
    i.add_argument("--task", default="none")
    i.add_argument("--force", action="store_true", help="replace an existing --out file")
    m = sub.add_parser("merge", help="write an HF folder with W + (alpha/r)·B·A merged in")
    m.add_argument("--adapter", required=True)
    m.add_argument("--out", required=True, help="new folder (model.safetensors + config/tokenizer copies)")
    m.add_argument("--force", action="store_true", help="replace an existing --out model folder")
    for q in (i, m):
        q.add_argument("--model", default="checkpoints/smollm2-135m-instruct")
        cli.add_device_args(q)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    from model import Transformer, save_folder
    if args.cmd in ("init", "merge") and not args.force:
        cli.refuse_existing(args.out, "--force")  # before the model loads
    if args.cmd in ("init", "merge"):
        device, dtype = cli.device_and_dtype(args)
    if args.cmd == "init":
        model = Transformer.from_pretrained(args.model, dtype=dtype, device=device)
        names = target_names(model, args.targets, args.layers)
        (adapter := Adapter.new(init_params(model, names, args.rank, args.seed), model, args.alpha, args.targets,
                                args.dropout, args.task, seed=args.seed)).save(args.out)
        print(f"{args.out} | {len(names)} matrices | r={args.rank} alpha={args.alpha:g} | "
              f"{adapter.n_params():,} parameters | base {adapter.meta['base_fingerprint']}")
    elif args.cmd == "merge":
        adapter = Adapter.load(args.adapter)  # a bad file fails before the model loads
        model = Transformer.from_pretrained(args.model, dtype=dtype, device=device)
        with merged(model, adapter):
            save_folder(model, args.model, args.out, replace=args.force)
        print(f"{args.out} | {len(adapter.params) // 2} matrices merged from {args.adapter} (scale {adapter.scale:g})")
    else:
        p.print_help()


if __name__ == "__main__":
    cli.run(main)

"""SVD cache: decompose the adapted weight matrices of a model once, W = U·diag(S)·Vh.

docs/PAPER.md §1 / paper §3.1 (arXiv 2501.06252). SVF learns one scale per singular value of every
adapted matrix, so each matrix is decomposed once with the reduced SVD
(`torch.linalg.svd(W, full_matrices=False)`, r = min(m, n)) and stored in float32. The official code decomposes every
non-norm matrix of the model into one 43 GB `.pt` file; here only the target matrices are done,
one safetensors file per matrix, so a run that is killed keeps what it finished.

Targets: "mlp" (gate/up/down of every layer; the paper's default), "qv" (q/v: the paper's attention
ablation), "attn" (q/k/v/o), "all";
optionally a layer subset (a list of indices, "half" = every other layer, or "top" = the upper half). Norms, embeddings and lm_head never.

Layout (outside git): $T2_CACHE or ~/.cache/transformer2, then
    svd/<fingerprint>/<parameter name>.safetensors    tensors U, S, Vh + metadata (with their checksum)
    svd/<fingerprint>/manifest.json                   for humans: model, shapes, dtype
The fingerprint hashes the values of every adaptable matrix (MLP and attention, all layers),
so one folder serves every target subset of one model, and other weights never find it.
Nothing read back is trusted blindly: each file carries a blake2b checksum of its factors, checked
the first time a process loads it (once per process and file: a merge in a training loop pays
nothing); a file that fails it, is cut short, or predates checksums is rebuilt, with a warning
naming it. What a killed build left behind (a temp file of a dead process) is removed.

Run it (builds what is missing, with a progress bar):
    python svd_cache.py --model checkpoints/smollm2-135m-instruct [--targets mlp] [--layers half]
Why past docs/STYLE.md's 100–200 lines: the factors are trusted only after checks (a fingerprint of the
weights, a checksum per factor verified once per process, orphaned temp files) that a resumable cache on
disk needs.
"""
import argparse
import hashlib
import json
import os
import time
import warnings
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm import tqdm

import cli
from model import Transformer, remove_orphans

KINDS = {"attn": ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"],
         "mlp": ["mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]}
KINDS["all"] = KINDS["attn"] + KINDS["mlp"]  # module order inside a block
# The paper's attention ablation (Table 4: 0.16M parameters on Llama-3-8B = 32 × (4096 + 1024)) adapts
# q and v only; "attn" (q, k, v, o) is ours.
KINDS["qv"] = ["self_attn.q_proj", "self_attn.v_proj"]
KINDS.update({k.split(".")[1].removesuffix("_proj"): [k] for k in KINDS["all"]})  # one projection: q, gate, ...
TARGETS_HELP = ("matrices adapted: mlp (paper default), qv (the paper's attention ablation), attn (q,k,v,o: ours), all, "
                "one projection (q, k, v, o, gate, up, down), or a comma list: qv,mlp (paper Table 4's MLP + attention)")


def parse_layers(layers, n_layers):
    """None / "all" -> every layer; "half" -> every other layer; "top" -> the upper half;
    "0,3,5" or [0, 3, 5] -> those."""
    if layers is None or layers == "all":
        return list(range(n_layers))
    if layers == "half":
        # The paper adapts "half of the layers" for Llama-3-70B and the VLM without saying which.
        # We take every other layer so the adaptation still spans the whole depth (a guess).
        return list(range(0, n_layers, 2))
    if layers == "top":
        # The upper half: the frozen lower half then runs without autograd, so the backward
        # stops at the middle of the network (about half the backward time).
        return list(range(n_layers // 2, n_layers))
    if isinstance(layers, str):
        layers = [int(s) for s in layers.split(",") if s.strip()]
    bad = [i for i in layers if not 0 <= i < n_layers]
    if bad:
        raise ValueError(f"layers {bad} out of range: the model has {n_layers} layers")
    return sorted(set(layers))


def parse_targets(targets):
    """"mlp", "qv", "qv,mlp", "q,k,v,o" ... -> module names, in the order they sit in a block."""
    bad = [t for t in targets.split(",") if t not in KINDS]
    if bad:
        raise ValueError(f"unknown target {bad[0]!r} in {targets!r} (known: {', '.join(KINDS)}, or a comma list)")
    kinds = {k for t in targets.split(",") for k in KINDS[t]}
    return [k for k in KINDS["all"] if k in kinds]


def targets_type(value):
    """argparse type of --targets: a bad value is a usage error that lists the known names."""
    try:
        parse_targets(value)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return value


def target_names(model, targets="mlp", layers=None):
    """Parameter names of the adapted matrices, in model order, e.g. model.layers.0.mlp.gate_proj.weight."""
    kinds = parse_targets(targets)
    L = model.config.num_hidden_layers
    return [f"model.layers.{i}.{k}.weight" for i in parse_layers(layers, L) for k in kinds]


# -----------------------------------------------------------------------------
# Fingerprint: blake2b of the weight values. Hashing 0.5 GB takes ~0.5 s, so each matrix's digest
# is memoised against the tensor's version counter, which every in-place write bumps (svf.merged).

def digest(t):
    """blake2b of a tensor's values as float32 (the one hash of this file: weights and factors)."""
    return hashlib.blake2b(t.detach().float().cpu().contiguous().numpy(), digest_size=16).hexdigest()


def matrix_digest(p):
    key = (p.data_ptr(), p._version)
    hit = getattr(p, "_t2_digest", None)  # memo stored on the Parameter itself
    if hit is None or hit[:2] != key:
        # Hash the float32 values: a model loaded in bf16 from bf16-exact weights matches its fp32 load.
        hit = (*key, digest(p))
        p._t2_digest = hit
    return hit[2]


def known_digest(p):
    """p's digest if it is memoised for p's current values, else None (hashes nothing)."""
    hit = getattr(p, "_t2_digest", None)
    return hit[2] if hit is not None and hit[:2] == (p.data_ptr(), p._version) else None


def restamp(p, value):
    """After an exact restore of p (svf.merged's and lora.merged's exits), keep p's digest memo: the
    values are the ones hashed before, only the version counter moved; without this, every merge
    would re-hash the whole model at its next check. `value`: known_digest(p) from before (None: no memo)."""
    if value is not None:
        p._t2_digest = (p.data_ptr(), p._version, value)


def fingerprint(model, names):
    """One hex string for the values (and names, shapes) of the given matrices."""
    h = hashlib.blake2b(digest_size=16)
    for name in names:
        p = model.get_parameter(name)
        h.update(f"{name}:{tuple(p.shape)}:{matrix_digest(p)};".encode())
    return h.hexdigest()


def model_fingerprint(model):
    """The fingerprint of a base model: all adaptable matrices, so every target subset shares it."""
    return fingerprint(model, target_names(model, "all"))


# -----------------------------------------------------------------------------
# Build and load

def default_root():
    return Path(os.environ.get("T2_CACHE") or Path.home() / ".cache" / "transformer2")


METHOD = "svd-float64-stored-float32"  # in each file's metadata; bump when decompose() changes


def decompose(W):
    """Reduced SVD, stored in float32 (docs/PAPER.md §1) but computed in float64: the float32 LAPACK result
    reconstructs W only to ~1e-6 relative, which over SmolLM2's 90 MLP matrices moves the logits
    by 2.8e-4 at uniform z; float64 then rounding gives 7.9e-5, for ~1.8x the time.
    LAPACK is also 4-10x faster on tall matrices than on wide ones (896x4864: 4 s transposed vs
    17 s as is), so a wide W is done as Wᵀ = U'·S·Vh' and W = Vh'ᵀ·S·U'ᵀ."""
    W = W.double()
    if W.shape[0] < W.shape[1]:
        U, S, Vh = torch.linalg.svd(W.T, full_matrices=False)
        U, Vh = Vh.T, U.T
    else:
        U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    return U.float().contiguous(), S.float(), Vh.float().contiguous()


class SVDCache:
    """Lazy view of one cache folder: `cache[name]` reads (U, S, Vh) float32 from a memory-mapped file."""

    def __init__(self, folder, names, fingerprint, targets, layers, shapes, device):
        self.folder, self.names, self.fingerprint = Path(folder), list(names), fingerprint
        self.targets, self.layers, self.shapes, self.device = targets, layers, shapes, device

    def path(self, name):
        return self.folder / f"{name}.safetensors"

    def rank(self, name):
        return min(self.shapes[name])

    def __getitem__(self, name):
        if name not in self.shapes:
            raise KeyError(f"{name} is not in this SVD cache (targets {self.targets}, {len(self.names)} matrices)")
        try:  # load() verified the file; this catches one cut short since (one line naming it)
            with safe_open(self.path(name), framework="pt", device=str(self.device)) as f:
                return f.get_tensor("U"), f.get_tensor("S"), f.get_tensor("Vh")
        except Exception as e:
            raise ValueError(f"{self.path(name)}: cannot read SVD factors ({e}); delete it to rebuild") from None

    def check(self, model):
        """Refuse a cache that was built for other base weights."""
        fp = model_fingerprint(model)
        if fp != self.fingerprint:
            raise ValueError(f"{self.folder}: SVD cache was built for base weights {self.fingerprint}, "
                             f"this model is {fp}")


FACTORS = ("U", "S", "Vh")
_verified = {}  # path -> (size, mtime, inode) of the files this process has checksummed


def checksum(tensors):
    """One digest of the factors of one matrix, stored in its file's metadata."""
    return hashlib.blake2b("".join(digest(t) for t in tensors).encode(), digest_size=16).hexdigest()


def verify(path):
    """None when the file at `path` is whole and its factors match their stored checksum, else
    what is wrong. Once per process and file: a file already verified (same size, mtime, inode) is
    not read again."""
    st = path.stat()
    stamp = (st.st_size, st.st_mtime_ns, st.st_ino)
    if _verified.get(str(path)) == stamp:
        return None
    try:
        with safe_open(path, framework="pt") as f:
            want, got = (f.metadata() or {}).get("checksum"), checksum([f.get_tensor(k) for k in FACTORS])
    except Exception as e:  # cut short, or not safetensors at all
        return f"unreadable ({type(e).__name__}: {e})"
    if want is None:
        return "made before factor checksums"
    if want != got:
        return "its factors fail their checksum (the file was changed on disk)"
    _verified[str(path)] = stamp
    return None


def load(model, targets="mlp", layers=None, root=None, device=None, names=None):
    """The SVD cache of `model` for these targets: build what is missing or damaged (resumable),
    refuse files of other weights.

    `names` (parameter names) overrides targets/layers, e.g. to load exactly an expert's matrices.
    Tensors come back on `device` (default: the model's device).
    """
    if names is not None:
        names, targets = list(names), "custom"
    else:
        names = target_names(model, targets, layers)
    fp = model_fingerprint(model)
    folder = Path(root or default_root()) / "svd" / fp
    folder.mkdir(parents=True, exist_ok=True)
    remove_orphans(folder)  # temp files of killed builds (cli.atomic_write names them .<file>.tmp<pid>)
    shapes = {n: tuple(model.get_parameter(n).shape) for n in names}
    base_dtype = str(model.get_parameter(names[0]).dtype).removeprefix("torch.")
    todo, bad = [], []
    for name in names:
        path = folder / f"{name}.safetensors"
        if not path.exists():
            todo.append(name)
        elif problem := verify(path):
            bad.append(f"{path}: {problem}")
            todo.append(name)
    if bad:  # one warning, not one per file: a whole cache from before checksums is 72 files on Qwen
        warnings.warn(f"{bad[0]}; rebuilding it" + (f" and {len(bad) - 1} more SVD cache files" if len(bad) > 1 else ""))
    work_device = "cuda" if torch.cuda.is_available() else "cpu"
    for name in tqdm(todo, desc=f"SVD {len(todo)}/{len(names)} matrices", disable=not todo, unit="mat"):
        U, S, Vh = (t.cpu().contiguous() for t in decompose(model.get_parameter(name).detach().to(work_device)))
        meta = {"fingerprint": fp, "name": name, "shape": json.dumps(list(shapes[name])),
                "dtype": base_dtype, "targets": targets, "checksum": checksum([U, S, Vh]),
                "weight_digest": matrix_digest(model.get_parameter(name)), "method": METHOD}
        path = folder / f"{name}.safetensors"
        with cli.atomic_write(path) as tmp:  # a killed run leaves either a whole file or none
            save_file({"U": U, "S": S, "Vh": Vh}, tmp, metadata=meta)
        st = path.stat()
        _verified[str(path)] = (st.st_size, st.st_mtime_ns, st.st_ino)  # written and hashed here
    for name in names:  # metadata: catches files copied in from another model
        with safe_open(folder / f"{name}.safetensors", framework="pt") as f:
            m = f.metadata()
        if m.get("method") != METHOD:
            raise ValueError(f"{folder / name}.safetensors: made by decomposition {m.get('method')!r}, "
                             f"this code makes {METHOD!r}; delete the folder to rebuild")
        if m.get("fingerprint") != fp or m.get("name") != name or \
                m.get("weight_digest") != matrix_digest(model.get_parameter(name)):
            raise ValueError(f"{folder / name}.safetensors: SVD cache entry was built for base weights "
                             f"{m.get('fingerprint')}, this model is {fp}; delete it to rebuild")
    if todo:
        manifest = {"fingerprint": fp, "model": getattr(model, "name_or_path", "?"), "dtype": base_dtype,
                    "shapes": {n: list(s) for n, s in shapes.items()}}
        with cli.atomic_write(folder / "manifest.json") as tmp:
            tmp.write_text(json.dumps(manifest, indent=1))
    device = device or model.get_parameter(names[0]).device
    return SVDCache(folder, names, fp, targets, layers, shapes, device)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="checkpoints/smollm2-135m-instruct", help="HF-layout folder")
    p.add_argument("--targets", default="mlp", type=targets_type, help=TARGETS_HELP)
    p.add_argument("--layers", default=None, help='"half", "top", or comma-separated indices (default: all)')
    p.add_argument("--root", default=None, help="cache root (default $T2_CACHE or ~/.cache/transformer2)")
    p.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    cli.add_device_args(p)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    device, dtype = cli.device_and_dtype(args)
    # the fingerprint hashes the loaded values: build the cache in the dtype the runs will use
    model = Transformer.from_pretrained(args.model, dtype=dtype, device=device)
    t0 = time.perf_counter()
    cache = load(model, args.targets, args.layers, args.root)
    print(f"{cache.folder} | {len(cache.names)} matrices ({args.targets}) | {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    cli.run(main)

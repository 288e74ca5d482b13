"""What one SVF update costs in GPU memory on Llama-3-8B in bf16, counted from the code's own tensors.

Nothing is allocated: the model is built on PyTorch's "meta" device (tensors with shapes and dtypes,
no storage), SVF is attached with factors of the real shapes (U (m, r), S (r,), Vh (r, n), r = min(m, n)),
and one micro-batch runs forward and backward through model.py and svf.py exactly as reinforce.py's
policy_loss does (hidden states, then the vocabulary projection in chunks, KL to the base policy when
λ > 0). `torch.autograd.graph.saved_tensors_hooks` sees every tensor autograd keeps for the backward;
their storages, counted once each, are the activation memory. The KV cache is model.KVCache itself.

    rows       weights, U/Vh factors, KV cache (slots x tokens), saved activations, saved logits
    defaults   the micro-batch, slots and tokens per prefill that fit one 80 GB GPU for GSM8K and
               MATH rollouts + updates, CEM scoring and a LLaVA-NeXT prefill

What this cannot see: the caching allocator's fragmentation, cuBLAS/Triton workspaces, the CUDA
context (~0.5-1 GB), and transients that live inside one op (e.g. a chunk's fp32 logits before
log_softmax). The budget keeps HEADROOM for them. Attention on meta goes through SDPA's reference
decomposition; with CUDA's fused kernels (flash / memory-efficient) the saved scores are replaced by
a (B, heads, T) log-sum-exp, so the activation row is an upper bound there.

    .venv/bin/python tools/memory.py                  # the table for Llama-3-8B-Instruct
    .venv/bin/python tools/memory.py --layers 2       # the same shapes, 2 layers (what gpu_check runs)
"""
import argparse
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import lora  # noqa: E402
import svd_cache  # noqa: E402
import svf  # noqa: E402
from model import KVCache, ModelConfig, Transformer  # noqa: E402

# meta-llama/Meta-Llama-3-8B-Instruct's config.json (the fields model.py reads)
LLAMA3_8B = dict(model_type="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                 num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, rope_theta=500000.0,
                 rms_norm_eps=1e-5, max_position_embeddings=8192, tie_word_embeddings=False)
GB = 1e9
GPU = 80 * GB        # one H100 / A100 80 GB
HEADROOM = 8 * GB    # allocator fragmentation, workspaces, CUDA context, in-op transients (see above)


class MetaFactors:
    """Stands in for svd_cache.SVDCache: the SVD factors of every target matrix, with their real shapes
    on the meta device (svf.attach needs only names, rank, [] and check)."""

    def __init__(self, model, targets="mlp"):
        self.names = svd_cache.target_names(model, targets)
        self.shapes = {n: tuple(model.get_parameter(n).shape) for n in self.names}

    def rank(self, name):
        return min(self.shapes[name])

    def __getitem__(self, name):
        (m, n), r = self.shapes[name], self.rank(name)
        return (torch.empty(m, r, device="meta"), torch.empty(r, device="meta"), torch.empty(r, n, device="meta"))

    def check(self, model):
        pass


def meta_model(config=LLAMA3_8B, layers=None, dtype=torch.bfloat16):
    """model.py's Transformer with the config's shapes, on the meta device (no memory)."""
    c = dict(config, num_hidden_layers=layers or config["num_hidden_layers"])
    with torch.device("meta"):
        model = Transformer(ModelConfig.from_dict(c, "tools/memory.py config")).to(dtype)
    return model.requires_grad_(False)


def trainable_counts(model):
    """Trainable parameters of the paper's Table 4 rows, from the code's own target lists."""
    def svf_count(targets):
        return sum(min(model.get_parameter(n).shape) for n in svd_cache.target_names(model, targets))
    return {"SVF z, MLP": svf_count("mlp"), "SVF z, q,v": svf_count("qv"), "SVF z, q,v + MLP": svf_count("qv,mlp"),
            "LoRA r16, q,v": lora.count(model, lora.target_names(model, "qv"), 16),
            "LoRA r16, q,v + MLP": lora.count(model, lora.target_names(model, "qv,mlp"), 16)}


def nbytes(tensors):
    return sum(t.numel() * t.element_size() for t in tensors)


class Saved:
    """Bytes of the storages autograd saves for the backward inside the `with` block, each counted once
    (q, k and v projections save the same normed input: one storage), the model's own tensors left out."""

    def __init__(self, model):
        # weights and SVF factors that autograd saves (x @ Vh.T keeps Vh) are resident anyway: not counted
        self.resident = {t.untyped_storage()._cdata for t in [*model.parameters(), *model.buffers()]}
        self.storages, self.squares = {}, {}

    def pack(self, t):
        st = t.untyped_storage()
        if st._cdata in self.resident:
            return t
        self.storages[st._cdata] = st.nbytes()
        if t.dim() == 4 and t.shape[-1] == t.shape[-2] > 1:  # (B, heads, T, T): attention scores / probabilities
            self.squares[st._cdata] = st.nbytes()
        return t

    def __enter__(self):
        self.hooks = torch.autograd.graph.saved_tensors_hooks(self.pack, lambda t: t)
        self.hooks.__enter__()
        return self

    def __exit__(self, *exc):
        self.hooks.__exit__(*exc)

    @property
    def bytes(self):
        return sum(self.storages.values())

    @property
    def scores(self):
        """The (T x T) part: what SDPA's math backend keeps and its fused backends (flash, memory-
        efficient) do not (they keep a (B, heads, T) log-sum-exp and recompute the scores)."""
        return sum(self.squares.values())


def update_memory(model, factors, rows, tokens, completion, kl, chunk=512):
    """One micro-batch of `rows` answers, `tokens` long each (prompt + completion), through SVF forward
    and backward as reinforce.policy_loss runs it: (activation bytes, of which attention scores, logit
    bytes) that autograd keeps; θ's gradients are checked to exist with θ's shapes."""
    svf.attach(model, factors)
    theta = {n: torch.zeros(factors.rank(n), device="meta", requires_grad=True) for n in factors.names}
    ids = torch.zeros(rows, tokens, dtype=torch.long, device="meta")
    if kl:  # the base policy's hidden states at the same positions, no grad (policy_loss does this first)
        svf.set_z(model, None)
        with torch.no_grad():
            h_ref = model.hidden(ids)[:, -completion:].reshape(-1, model.config.hidden_size)
    svf.set_z(model, {n: torch.sigmoid(t) for n, t in theta.items()})
    with Saved(model) as act:
        h = model.hidden(ids)[:, -completion:].reshape(-1, model.config.hidden_size)  # (rows*completion, C)
    targets = torch.zeros(h.size(0), dtype=torch.long, device="meta")
    loss = torch.zeros((), device="meta")
    with Saved(model) as logits:
        for s in range(0, h.size(0), chunk):  # the chunked vocabulary projection of policy_loss
            logp = model.lm_head(h[s:s + chunk]).float().log_softmax(-1)
            loss = loss - logp.gather(-1, targets[s:s + chunk, None]).sum()
            if kl:
                ref = model.lm_head(h_ref[s:s + chunk]).float().log_softmax(-1)
                loss = loss + (logp.exp() * (logp - ref)).sum()
    loss.backward()
    assert all(theta[n].grad is not None and theta[n].grad.shape == theta[n].shape for n in theta)
    svf.set_z(model, None)
    svf.detach(model)
    return act.bytes, act.scores, logits.bytes  # h is saved by lm_head: counted with the logits


def fixed_memory(model, factors):
    """Weights and the attached SVF buffers (U, Vh in the model dtype, S in float32)."""
    svf.attach(model, factors)
    mods = [m for _, m in svf.svf_modules(model)]
    out = {"weights": nbytes(model.parameters()), "U, Vh": nbytes([t for m in mods for t in (m.U, m.Vh)]),
           "S": nbytes([m.S for m in mods]), "target W (merge backup)": nbytes([m.weight for m in mods])}
    svf.detach(model)
    return out


def kv_bytes(model, slots, length):
    """model.KVCache for `slots` rows of `length` positions, as generate() allocates it."""
    c = KVCache(model.config, slots, length, next(model.parameters()).dtype, "meta")
    return nbytes(c.k + c.v)


# The workloads: tokens of a prompt (rendered chat template + question, measured on the shipped
# tokenizers: GSM8K ~150, MATH ~200, 3 CEM shots + question ~1,500 with the rendered answers), the
# task's token cap (evals), LLaVA-NeXT: 5 tiles x 576 patches + ~48 row newlines = 2,928 image tokens.
WORKLOADS = {"GSM8K": dict(prompt=160, new=512, train=True), "MATH": dict(prompt=220, new=1024, train=True),
             "CEM scoring": dict(prompt=1536, new=512, train=False),
             "LLaVA-NeXT prefill": dict(prompt=3000, new=64, train=True)}


def choose(model, factors, fixed, w, kl, fused):
    """Largest slots (rollout / scoring) and micro-batch (update) whose peak fits GPU - HEADROOM; with
    `fused`, attention keeps no (T x T) scores (CUDA's flash / memory-efficient SDPA)."""
    budget = GPU - HEADROOM - fixed
    length = w["prompt"] + w["new"]
    slots = max([s for s in (8, 16, 32, 64, 128, 256) if kv_bytes(model, s, length) + s * model.config.vocab_size * 4
                 <= budget] or [0])
    mb, act = 0, (0, 0)
    for m in (1, 2, 4, 8, 16, 32, 64) if w["train"] else ():
        a, scores, logits = update_memory(model, factors, m, length, w["new"], kl)
        a = a - scores if fused else a
        if a + logits > budget:
            break
        mb, act = m, (a, logits)
    return slots, mb, act, kv_bytes(model, slots, length) if slots else 0


def table(layers=None, kl=True):
    """The rows of the memory table (list of dicts) for Llama-3-8B with `layers` layers: per workload,
    with and without the KL term, with SDPA's math backend (scores kept) and with a fused one."""
    model = meta_model(layers=layers)
    factors = MetaFactors(model, "mlp")
    fx = fixed_memory(model, factors)
    fixed = fx["weights"] + fx["U, Vh"] + fx["S"]
    rows = []
    for name, w in WORKLOADS.items():
        for use_kl in ((False, True) if w["train"] and kl else (False,)):
            for fused in ((False, True) if w["train"] else (True,)):
                slots, mb, (act, logit), kv = choose(model, factors, fixed, w, use_kl, fused)
                peak = fixed + max(kv + slots * model.config.vocab_size * 4, act + logit)
                rows.append(dict(workload=name + (" +KL" if use_kl else ""), tokens=f"{w['prompt']}+{w['new']}",
                                 attention=("fused" if fused else "math") if w["train"] else "-",
                                 slots=slots, micro_batch=mb if w["train"] else "-", weights=fx["weights"],
                                 factors=fx["U, Vh"] + fx["S"], kv=kv, activations=act, logits=logit, peak=peak))
    return rows, fx, trainable_counts(model)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=None, help="fewer layers, real widths (default: all 32)")
    p.add_argument("--no-kl", action="store_true", help="skip the rows with the KL term (λ > 0)")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    rows, fx, counts = table(args.layers, kl=not args.no_kl)
    L = args.layers or LLAMA3_8B["num_hidden_layers"]
    print(f"Llama-3-8B shapes, {L} layers, bf16; SVF on the MLP; budget {GPU / GB:.0f} GB - {HEADROOM / GB:.0f} GB headroom")
    print("trainable: " + " | ".join(f"{k} {v:,}" for k, v in counts.items()))
    print(f"fixed: weights {fx['weights'] / GB:.2f} GB | U,Vh {fx['U, Vh'] / GB:.2f} GB | S {fx['S'] / GB:.3f} GB | "
          f"target W {fx['target W (merge backup)'] / GB:.2f} GB (a merge backup, if kept on the GPU)")
    cols = ["workload", "tokens", "attention", "slots", "micro_batch", "weights", "factors", "kv", "activations", "logits", "peak"]
    print("| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(f"{r[c] / GB:.1f} GB" if isinstance(r[c], int) and c not in ("slots", "micro_batch")
                                else str(r[c]) for c in cols) + " |")
    return rows


if __name__ == "__main__":
    main()

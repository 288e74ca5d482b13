"""Benchmark SVF: SVD time per model, and one training step (forward + backward, next-token
cross-entropy) three ways, with time and peak memory:
  (a) no SVF: gradients through the activations only (what any fine-tuning pays at least);
  (b) the official code's way: materialise W′ = U·diag(σ⊙z)·Vh per matrix, full-size dL/dW′, chain into θ;
  ours: svf.py's factored layers, y = U((σ⊙z)⊙(Vh·x)), no m×n tensor; both give the same dL/dθ.
Check the machine is idle first.

    python tools/bench_svf.py                          # SmolLM2 8 x 256 (+ Qwen's SVD time if converted)
    python tools/bench_svf.py --model checkpoints/qwen2.5-coder-0.5b-instruct --batch 4
"""
import argparse
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import svd_cache  # noqa: E402
from svf import attach, detach, fold_rescale, init_theta, set_z  # noqa: E402


def peak_memory(step):
    """Peak bytes allocated while step() runs, above what was allocated before it.
    CUDA: the caching allocator's counters. CPU: torch.profiler records every malloc/free of
    torch's CPU allocator with its size; a running sum in time order gives the peak. (ru_maxrss
    cannot be reset between runs, and tracemalloc does not see torch's allocator.) The event tree
    is a private profiler API: if it moves, this is the one function to fix.
    tests/test_svf.py uses it to show that SVF's factored training step needs no m×n gradient."""
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


def bench(args):
    import tempfile
    import time
    from model import Transformer
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"device {dev} | threads {torch.get_num_threads()} | float32")
    tmp = tempfile.TemporaryDirectory()  # a fresh cache root, so the SVDs are really computed
    for path in [args.model] + [q for q in [args.qwen] if q and Path(q, "model.safetensors").exists()]:
        model = Transformer.from_pretrained(path, device=dev)
        t0 = time.perf_counter()
        cache = svd_cache.load(model, "mlp", root=tmp.name)
        dt = time.perf_counter() - t0
        shapes = sorted({cache.shapes[n] for n in cache.names})
        print(f"SVD | {Path(path).name} | {len(cache.names)} MLP matrices {shapes} | {dt:.1f} s "
              f"({dt / len(cache.names):.2f} s/matrix)")
        if path == args.model:
            main_model, main_cache = model, cache

    model, cache = main_model, main_cache
    factors = {n: cache[n] for n in cache.names}
    theta0 = init_theta(cache)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (args.batch, args.seq), generator=g).to(dev)

    def loss_of(logits):  # next-token cross-entropy: the shape of the REINFORCE log-likelihood term
        return F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())

    def plain():  # (a) gradients through the activations only (embedding output), no SVF
        hook = model.model.embed_tokens.register_forward_hook(lambda m, i, o: o.requires_grad_())
        loss_of(model(ids)).backward()
        hook.remove()

    def official():  # (b) materialise W′ per matrix, full-size dL/dW′, chain into θ (official code)
        theta = {n: t.clone().to(dev).requires_grad_() for n, t in theta0.items()}
        Ws = {}
        for n, (U, S, Vh) in factors.items():
            z = fold_rescale(S, torch.sigmoid(theta[n]))
            Ws[n] = (U * (S * z)) @ Vh                                # (m, n) W′, in the graph
        loss_of(torch.func.functional_call(model, Ws, (ids,))).backward()
        return theta

    def factored():  # ours: SVFLinear, y = U((σ⊙z)⊙(Vh·x)), only tokens×r intermediates
        theta = {n: t.clone().to(dev).requires_grad_() for n, t in theta0.items()}
        set_z(model, {n: torch.sigmoid(t) for n, t in theta.items()})
        loss_of(model(ids)).backward()
        set_z(model, None)
        return theta

    res = {}
    for label, step in [("(a) no SVF", plain), ("(b) official", official), ("SVF factored", factored)]:
        if step is factored:
            attach(model, cache)
        out = step()  # warm-up
        t0 = time.perf_counter()
        for _ in range(args.repeat):
            step()
        sec = (time.perf_counter() - t0) / args.repeat
        res[label] = (sec, peak_memory(step), out)
        print(f"step {args.batch}x{args.seq} | {label:13s} | {sec:6.2f} s | peak {res[label][1] / 2**20:7.0f} MiB")
    detach(model)
    (ta, ma, _), (tb, mb, gb), (ts, ms, gs) = res.values()
    err = max(((gs[n].grad - gb[n].grad).norm() / gb[n].grad.norm()).item() for n in gs)
    static = sum(U.numel() + S.numel() + Vh.numel() for U, S, Vh in factors.values()) * 4
    print(f"SVF vs (a): time {ts / ta:.2f}x, memory {ms / ma:.2f}x (goal <= 1.5x: {'yes' if ms <= 1.5 * ma else 'NO'})")
    print(f"SVF vs (b): time {ts / tb:.2f}x, memory {ms / mb:.2f}x (goal < 1 both: "
          f"{'yes' if ts < tb and ms < mb else 'NO'}) | dL/dθ agree to {err:.1e} (rel.)")
    print(f"static, not in the peaks: U, S, Vh of {len(factors)} matrices = {static / 2**20:.0f} MiB "
          f"(needed by SVF and by (b))")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="checkpoints/smollm2-135m-instruct", help="HF-layout folder")
    p.add_argument("--qwen", default="checkpoints/qwen2.5-coder-0.5b-instruct", help="2nd model: SVD time only")
    p.add_argument("--batch", type=int, default=8, help="sequences per step")
    p.add_argument("--seq", type=int, default=256, help="tokens per sequence")
    p.add_argument("--repeat", type=int, default=1, help="timed steps per variant")
    p.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    bench(args)

"""`make gpu-check`: everything a first GPU day should confirm, in one table, in under 10 minutes on one H100.

  1. the CUDA tests (tests/test_cuda.py: the same bodies CI runs on the CPU, here on the GPU)
  2. the Triton kernel (kernels/svf_linear.py) against the torch path (svf.svf_matmul_torch) in bf16
     at the paper's shapes (M = 4096 tokens, a 14336 x 4096 MLP matrix, r = 4096), forward and
     backward, with its speed against the dense cuBLAS matmul of the same layer
  3. one SVF update (forward, chunked log-probs, backward, Adam step) on a random model with
     Llama-3-8B's widths and 2 layers: time and peak memory, beside tools/memory.py's count of the
     same shapes on the meta device (the accounting the defaults rest on)

    .venv/bin/python tools/gpu_check.py             # on a GPU (make gpu-check)
    .venv/bin/python tools/gpu_check.py --smoke     # tiny shapes on the CPU (tests/test_gpu_check.py)

--smoke runs the same code at tiny shapes in float32 (the Triton interpreter on a CPU), and only
collects the CUDA tests, so the script cannot rot between GPU days.
"""
import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
if not torch.cuda.is_available():  # the kernel then runs in Triton's interpreter (set before its import)
    os.environ.setdefault("TRITON_INTERPRET", "1")
import svf  # noqa: E402
from tools import memory  # noqa: E402


def timed(fn, device, reps):
    """Seconds per call of fn() (after one warm-up call: compilation and autotuning excluded)."""
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / reps


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def cuda_tests(smoke):
    """Run (smoke: only collect) tests/test_cuda.py; the result is pytest's summary line."""
    argv = [sys.executable, "-m", "pytest", "-q", "tests/test_cuda.py"] + (["--collect-only"] if smoke else [])
    r = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True)
    last = (r.stdout.strip().splitlines() or ["no output"])[-1]
    return dict(check="CUDA tests (tests/test_cuda.py)", shape="-", result=last, ok=r.returncode == 0)


def kernel_vs_torch(M, m, n, dtype, device, reps):
    """The kernel's y, dx, dz against the torch path, and fwd+bwd time against dense cuBLAS."""
    from kernels.svf_linear import svf_linear
    g = torch.Generator(device=device).manual_seed(0)
    r = min(m, n)
    x = torch.randn(1, M, n, device=device, dtype=dtype, generator=g)
    U = torch.linalg.qr(torch.randn(m, r, device=device, generator=g))[0].to(dtype)
    Vh = torch.linalg.qr(torch.randn(n, r, device=device, generator=g))[0].T.contiguous().to(dtype)
    S = torch.rand(r, device=device, generator=g) + 0.5
    z0 = torch.rand(r, device=device, generator=g) + 0.5
    dy = torch.randn(1, M, m, device=device, dtype=dtype, generator=g)
    W = (U.float() * S) @ Vh.float()
    W = W.to(dtype)

    def run(f):
        xi, z = x.clone().requires_grad_(), z0.clone().requires_grad_()
        y = f(xi, U, S, Vh, z)
        y.backward(dy)
        return y, xi.grad, z.grad

    (yk, xk, zk), (yt, xt, zt) = run(svf_linear), run(svf.svf_matmul_torch)
    xd = x.clone().requires_grad_()

    def dense():
        xd.grad = None
        torch.nn.functional.linear(xd, W).backward(dy)
    t_k = timed(lambda: run(svf_linear), device, reps)
    t_t = timed(lambda: run(svf.svf_matmul_torch), device, reps)
    t_d = timed(dense, device, reps)
    err = max(rel(yk, yt), rel(xk, xt), rel(zk, zt))
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-4
    return dict(check="kernel vs torch path, fwd+bwd", shape=f"M={M} {m}x{n} r={r} {str(dtype)[6:]}",
                result=f"max rel err {err:.1e} (y, dx, dz) | kernel {t_k * 1e3:.2f} ms, torch {t_t * 1e3:.2f} ms, "
                       f"dense cuBLAS {t_d * 1e3:.2f} ms ({t_d / t_k:.2f}x of dense)", ok=err < tol)


def one_update(layers, widths, rows, tokens, completion, dtype, device):
    """One SVF update on a random model with these widths; time, peak memory, and memory.py's count."""
    from model import ModelConfig, Transformer
    c = dict(memory.LLAMA3_8B, num_hidden_layers=layers, **widths)
    torch.manual_seed(0)
    with torch.device(device):
        model = Transformer(ModelConfig.from_dict(c)).to(dtype)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.02)
    model.inv_freq = model.inv_freq.float()
    model.requires_grad_(False)

    class Factors(memory.MetaFactors):  # the real SVD of the random weights, on the device
        def __getitem__(self, name):
            U, S, Vh = torch.linalg.svd(model.get_parameter(name).float(), full_matrices=False)
            return U, S, Vh
    factors = Factors(model, "mlp")
    svf.attach(model, factors)
    theta = {n: torch.full((factors.rank(n),), 0.1, device=device, requires_grad=True) for n in factors.names}
    opt = torch.optim.Adam(theta.values(), lr=1e-3)
    ids = torch.randint(0, c["vocab_size"], (rows, tokens), device=device)

    def step():
        svf.set_z(model, {n: torch.sigmoid(t) for n, t in theta.items()})
        h = model.hidden(ids)[:, -completion:].reshape(-1, c["hidden_size"])
        tgt = ids[:, -completion:].reshape(-1)
        loss = sum(-model.lm_head(h[s:s + 512]).float().log_softmax(-1).gather(-1, tgt[s:s + 512, None]).sum()
                   for s in range(0, h.size(0), 512))
        loss.backward()
        opt.step()
        opt.zero_grad()
    step()  # warm-up: kernel compilation and autotuning
    if device.type == "cuda":
        torch.cuda.synchronize()
    before = torch.cuda.memory_allocated() if device.type == "cuda" else 0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t = timed(step, device, 1)
    peak = torch.cuda.max_memory_allocated() - before if device.type == "cuda" else float("nan")
    svf.set_z(model, None)
    svf.detach(model)
    meta = memory.meta_model(dict(c), dtype=dtype)
    act, scores, logits = memory.update_memory(meta, memory.MetaFactors(meta, "mlp"), rows, tokens, completion, False)
    return dict(check="one SVF update (random model)", shape=f"{layers} layers, {rows}x{tokens} tokens, "
                f"{str(dtype)[6:]}", result=f"{t:.2f} s | peak above weights {peak / 1e9:.2f} GB | memory.py: "
                f"{(act + logits) / 1e9:.2f} GB math attention, {(act - scores + logits) / 1e9:.2f} GB fused", ok=True)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="tiny shapes, float32, CUDA tests only collected (CPU)")
    args = p.parse_args(argv)
    cuda = torch.cuda.is_available()
    if not cuda and not args.smoke:
        raise SystemExit("error: no CUDA GPU here; `tools/gpu_check.py --smoke` runs the same code at tiny shapes")
    device = torch.device("cuda" if cuda else "cpu")
    name = torch.cuda.get_device_name() if cuda else "CPU (smoke)"
    if args.smoke:  # the interpreter: fp32 only (its bf16 tl.dot is wrong), shapes <= 256
        rows = [cuda_tests(True), kernel_vs_torch(16, 48, 16, torch.float32, device, 1),
                one_update(2, dict(vocab_size=256, hidden_size=64, intermediate_size=96, num_attention_heads=4,
                                   num_key_value_heads=2), 2, 24, 8, torch.float32, device)]
    else:
        rows = [cuda_tests(False), kernel_vs_torch(4096, 14336, 4096, torch.bfloat16, device, 10),
                kernel_vs_torch(4096, 4096, 14336, torch.bfloat16, device, 10),
                one_update(2, {}, 4, 672, 512, torch.bfloat16, device)]
    print(f"gpu-check on {name} | torch {torch.__version__}")
    print("| check | shape | result | ok |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['check']} | {r['shape']} | {r['result']} | {'yes' if r['ok'] else 'NO'} |")
    return rows


if __name__ == "__main__":
    rows = main()
    sys.exit(0 if all(r["ok"] for r in rows) else 1)

"""Benchmark kernels/svf_linear.py on a GPU: bf16, Llama-3-8B MLP and attention shapes.

For each weight shape and token count, four ways to apply an SVF-adapted layer, in µs with the
FLOP/s and bytes/s of each method's own work:
  (a) dense x·W′ᵀ with W′ merged once (the floor: cuBLAS, no SVF cost at all);
  (b) torch factored, (x·Vhᵀ ⊙ σ⊙z)·Uᵀ (svf.py's path without the kernel);
  (c) merge W′ = U·diag(σ⊙z)·Vh at every call, then dense (what the official code does);
  svf_linear, the Triton kernel.
Then mixed batches (8 sequences, 8 different experts): 8 pre-merged W′, 8 merges per call, or the
kernel with one z per sequence. The goals printed are the kernel's reasons to exist: within 1.3× of
dense for one expert, faster than merging per call, faster than per-sequence merges when mixed.
Correctness is tests/test_kernels.py's job; each shape here is also checked against dense once.

    python tools/bench_kernel.py       # needs CUDA; about a minute on an H100 (autotuning included)
"""
import argparse
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

LLAMA3_8B = [("gate/up_proj", 14336, 4096), ("down_proj", 4096, 14336), ("q/o_proj", 4096, 4096)]  # (m, n)
TOKENS, MIXED_B, MIXED_T = [1, 16, 128, 512, 1024, 4096], 8, [1, 16, 128, 512]


def bench():
    if not torch.cuda.is_available():
        sys.exit("error: tools/bench_kernel.py needs a CUDA GPU and none was found; on a CPU run "
                 "`pytest tests/test_kernels.py` (the kernel under the Triton interpreter)")
    from triton.testing import do_bench
    from kernels.svf_linear import svf_linear, svf_linear_ref
    dt, GB, TF = torch.bfloat16, 1e9, 1e12
    merge = lambda U, s, Vh: (U * s) @ Vh  # noqa: E731  W′ = U·diag(s)·Vh  (m, n)

    def row(label, ms, flops, nbytes, ref_ms=None):
        extra = f" | {ms / ref_ms:5.2f}× dense" if ref_ms else ""
        print(f"  {label:26s} {ms * 1e3:9.1f} µs | {flops / ms / 1e-3 / TF:6.1f} TFLOP/s | "
              f"{nbytes / ms / 1e-3 / GB:7.0f} GB/s{extra}")

    print(f"device {torch.cuda.get_device_name()} | bf16")
    for name, m, n in LLAMA3_8B:
        r = min(m, n)
        U = (torch.randn(m, r, device="cuda") / math.sqrt(m)).to(dt)  # timing does not need a real SVD
        Vh = (torch.randn(r, n, device="cuda") / math.sqrt(n)).to(dt)
        S = torch.rand(r, device="cuda") + 0.5
        print(f"\n{name}: W {m}×{n}, r = {r}, bf16; factored/dense work r(m+n)/mn = {r * (m + n) / (m * n):.2f}× "
              f"(µs; FLOP and bytes of each method's own work)")
        for tokens in TOKENS:
            x, z = torch.randn(1, tokens, n, device="cuda", dtype=dt), torch.rand(r, device="cuda")
            s = (S * z).to(dt)
            W = merge(U, s, Vh)
            torch.testing.assert_close(svf_linear(x, U, S, Vh, z), x @ W.T, rtol=5e-2, atol=5e-2)
            fd, ff = 2 * tokens * m * n, 2 * tokens * r * (m + n)  # dense vs factored FLOP
            bd, bf = 2 * (m * n + tokens * (m + n)), 2 * (r * (m + n) + tokens * (m + n + 2 * r))
            t_a = do_bench(lambda: x @ W.T)
            t_b = do_bench(lambda: svf_linear_ref(x, U, S, Vh, z))
            t_c = do_bench(lambda: x @ merge(U, s, Vh).T)
            t_k = do_bench(lambda: svf_linear(x, U, S, Vh, z))
            print(f" tokens {tokens}")
            row("(a) dense, W′ merged once", t_a, fd, bd)
            row("(b) torch factored", t_b, ff, bf, t_a)
            row("(c) merge W′ every call", t_c, fd + 2 * m * n * r, bd + 4 * m * n + 2 * r * (m + n), t_a)
            row("svf_linear (Triton)", t_k, ff, bf, t_a)
            print(f"  goals: ≤1.3× dense {'yes' if t_k <= 1.3 * t_a else 'NO'} | faster than (c) "
                  f"{'yes' if t_k < t_c else 'NO'}")
        B = MIXED_B  # mixed batch: B sequences, B different experts
        for T in MIXED_T:
            x, Z = torch.randn(B, T, n, device="cuda", dtype=dt), torch.rand(B, r, device="cuda")
            sb = (S * Z).to(dt)
            Ws = [merge(U, sb[b], Vh) for b in range(B)]  # B pre-merged weights: B·m·n memory
            t_pre = do_bench(lambda: [x[b] @ Ws[b].T for b in range(B)])
            t_sep = do_bench(lambda: [x[b] @ merge(U, sb[b], Vh).T for b in range(B)])
            t_k = do_bench(lambda: svf_linear(x, U, S, Vh, Z))
            ff = 2 * B * T * r * (m + n)
            print(f" mixed batch B={B} × T={T}")
            row(f"{B} pre-merged W′ (memory)", t_pre, 2 * B * T * m * n, 2 * B * (m * n + T * (m + n)))
            row(f"{B} merges per call", t_sep, 2 * B * (T * m * n + m * n * r), 2 * B * (3 * m * n + r * (m + n)))
            row("svf_linear (Triton)", t_k, ff, 2 * (r * (m + n) + B * T * (m + n + 2 * r)))
            print(f"  goal: faster than separate merges {'yes' if t_k < t_sep else 'NO'} "
                  f"({t_sep / t_k:.1f}×; vs pre-merged {t_pre / t_k:.1f}×)")


if __name__ == "__main__":
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    bench()

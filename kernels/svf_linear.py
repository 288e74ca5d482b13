"""SVF linear layer as two Triton matmuls: y = x·(U·diag(S⊙z)·Vh)ᵀ without ever forming W′.

docs/PAPER.md §1 / paper §3.1 (arXiv 2501.06252): an SVF-adapted weight is W′ = U·diag(σ⊙z)·Vᵀ. The
official code rebuilds W′ (m×n) every step and backpropagates a full-size dL/dW′. Here the layer
is applied in factored form, one GEMM per factor:

    a = x·Vhᵀ                    (tokens × r)   kernel, plain
    y = (a ⊙ s[seq])·Uᵀ          (tokens × m)   kernel, A's columns scaled in the prologue
    with s = S⊙z, one row of s per sequence (z of shape (B, r)) or one for all (z of shape (r,)).

The backward pass is the same two shapes again, with g = dL/dy:

    ga = g·U                     (tokens × r)   kernel, plain
    dx = (ga ⊙ s[seq])·Vh        (tokens × n)   kernel, prologue scale
    dL/dz[b] = S ⊙ Σ_{t in b} ga ⊙ a            torch (tokens × r is small)

so nothing m×n is ever allocated, only tokens×r intermediates. The Σσ/Σ(σ⊙z) rescale of the
official code is folded into z by the caller (svf.py); this file knows nothing about it.

Cost: r(m+n) multiply-adds per token instead of mn (1.29× for 4096×14336 at r = 4096, 2× for a
square matrix). So a single expert should be merged once; this pays off in training (dL/dz
without m×n tensors) and in mixed batches where every sequence carries its own z.

What svf.py does with this file: on CUDA its factored layers call `svf_linear`. If this file cannot
be imported (no Triton), or the kernel raises at a call (e.g. fails to compile for that GPU), svf.py
warns once, naming the error, and from then on runs `svf.svf_matmul_torch`: three torch matmuls
with the same contract, (x·Vhᵀ ⊙ σ⊙z)·Uᵀ, differentiated by autograd. That function is also this
file's reference (`svf_linear_ref`), so there is one definition of the formula. A failure inside the
backward pass (the same kernel, other specialisations) is not caught: it would surface as an error.

    python kernels/svf_linear.py           # correctness check vs the torch reference (CPU: interpreter)
    python kernels/svf_linear.py --bench   # GPU benchmark, bf16, Llama-3-8B MLP/attention shapes
"""
import argparse
import math
import os
import sys

import torch

if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root: svf.py
    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede `import triton`: run kernels on CPU

import triton  # noqa: E402
import triton.language as tl  # noqa: E402


# ----------------------------------------------------------------------------- torch reference
# The reference is svf.py's torch path itself, not a second copy of the formula: the kernel is tested
# against exactly what SVF runs without it (x (B, T, n), U (m, r), S (r,), Vh (r, n), z (r,) or (B, r)
# -> y (B, T, m) in x.dtype, y[b] = x[b]·(U·diag(S⊙z[b])·Vh)ᵀ, differentiable by autograd).
from svf import svf_matmul_torch as svf_linear_ref  # noqa: E402


# ----------------------------------------------------------------------------- Triton kernel
# Under the interpreter autotuning over several configs fails, so there it gets exactly one (small
# blocks, so the odd test shapes cross tile edges and exercise every mask).
if os.environ.get("TRITON_INTERPRET") == "1":
    _CONFIGS = [triton.Config({"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16, "GROUP_M": 2})]
else:  # GPU: large tiles for prefill/training, thin BLOCK_M tiles for decode (few tokens)
    _CONFIGS = [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, num_warps=w, num_stages=st)
        for bm, bn, bk, w, st in [(128, 256, 64, 8, 3), (128, 128, 64, 8, 3), (128, 128, 64, 4, 4),
                                  (64, 128, 64, 4, 4), (64, 64, 64, 4, 4), (32, 128, 128, 4, 4),
                                  (16, 128, 128, 4, 4), (16, 64, 256, 4, 3)]
    ]


@triton.autotune(configs=_CONFIGS, key=["M", "N", "K"])
@triton.jit
def _scaled_matmul_kernel(
    a_ptr, b_ptr, c_ptr, s_ptr,  # C (M×N) = (A ⊙ s[row // T]) (M×K) · B (K×N)
    M, N, K, T,  # T = tokens per sequence: row i belongs to sequence i // T
    stride_am, stride_ak, stride_bk, stride_bn, stride_cm, stride_cn, stride_sb, stride_sk,
    HAS_SCALE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    # Grouped tile order (Triton matmul tutorial): GROUP_M row-tiles share B column-tiles in L2.
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    group = pid // (GROUP_M * num_pid_n)
    first_m = group * GROUP_M
    group_m = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % (GROUP_M * num_pid_n)) % group_m
    pid_n = (pid % (GROUP_M * num_pid_n)) // group_m

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    rows = offs_m.to(tl.int64)  # tokens × 14336 overflows int32 offsets quickly
    a_ptrs = a_ptr + rows[:, None] * stride_am + offs_k[None, :] * stride_ak
    b_ptrs = b_ptr + offs_k[:, None] * stride_bk + offs_n[None, :] * stride_bn
    # Each row looks up its own sequence's scale; stride_sb = 0 when one z serves every row.
    s_ptrs = s_ptr + (rows // T)[:, None] * stride_sb + offs_k[None, :] * stride_sk
    row_ok = offs_m < M

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)  # fp32 accumulation whatever the input
    for k0 in range(0, K, BLOCK_K):
        k_ok = offs_k < K - k0
        a = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=k_ok[:, None] & (offs_n[None, :] < N), other=0.0)
        if HAS_SCALE:
            # Prologue scale: (a ⊙ s)·B. The (B, r) scale table is tiny and stays in cache; the
            # product is rounded back to the input dtype, as the torch factored path does.
            s = tl.load(s_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            a = (a.to(tl.float32) * s).to(a_ptr.dtype.element_ty)
            s_ptrs += BLOCK_K * stride_sk
        # "ieee": fp32 inputs stay exact on GPU (default would be TF32); ignored for fp16/bf16.
        acc = tl.dot(a, b, acc, input_precision="ieee")
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk

    c_ptrs = c_ptr + rows[:, None] * stride_cm + offs_n[None, :] * stride_cn
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=row_ok[:, None] & (offs_n[None, :] < N))


def _scaled_matmul(a, b, s=None, T=1):
    """C = (a ⊙ s[i // T]) · b for a (M, K), b (K, N) (any strides, e.g. a transposed view),
    s (1 or M/T, K) float32 or None. Returns C (M, N) in a.dtype."""
    (M, K), N = a.shape, b.shape[1]
    c = torch.empty((M, N), device=a.device, dtype=a.dtype)
    if c.numel() == 0:
        return c
    has_scale = s is not None
    s_arg = s if has_scale else a  # dummy pointer, never read when HAS_SCALE is False
    stride_sb, stride_sk = (s.stride(0) if s.shape[0] > 1 else 0, s.stride(1)) if has_scale else (0, 0)
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)  # noqa: E731
    _scaled_matmul_kernel[grid](
        a, b, c, s_arg, M, N, K, T,
        a.stride(0), a.stride(1), b.stride(0), b.stride(1), c.stride(0), c.stride(1), stride_sb, stride_sk,
        HAS_SCALE=has_scale,
    )
    return c


# ----------------------------------------------------------------------------- autograd + wrapper
class _SVFLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, U, S, Vh, z):
        B, T, n = x.shape
        m, r = U.shape
        s = (S.float() * z.float()).reshape(-1, r).contiguous()  # (1 or B, r): σ⊙z per sequence
        x2 = x.reshape(B * T, n)  # (BT, n), a view when x is contiguous
        a = _scaled_matmul(x2, Vh.T)  # (BT, r)  a = x·Vhᵀ
        y = _scaled_matmul(a, U.T, s, T)  # (BT, m)  y = (a ⊙ s)·Uᵀ
        ctx.save_for_backward(a, U, S, Vh, z, s)  # tokens×r plus the factors; nothing m×n
        return y.view(B, T, m)

    @staticmethod
    def backward(ctx, g):
        a, U, S, Vh, z, s = ctx.saved_tensors
        B, T, m = g.shape
        r = U.shape[1]
        ga = _scaled_matmul(g.reshape(B * T, m), U)  # (BT, r)  ga = g·U = dL/d(a ⊙ s)
        dx = dz = None
        if ctx.needs_input_grad[0]:
            dx = _scaled_matmul(ga, Vh, s, T).view(B, T, Vh.shape[1])  # (B, T, n)  dx = (ga ⊙ s)·Vh
        if ctx.needs_input_grad[4]:
            # dL/ds[b] = Σ_{t in b} ga ⊙ a  and  s = S⊙z  =>  dL/dz[b] = S ⊙ dL/ds[b]   (docs/PAPER.md §1)
            ds = (ga.float() * a.float()).view(B, T, r).sum(1)  # (B, r)
            dz = ds * S.float()  # (B, r); a shared z (r,) sums over the batch
            dz = (dz if z.dim() == 2 else dz.sum(0)).to(z.dtype)
        return dx, None, None, None, dz


def svf_linear(x, U, S, Vh, z):
    """y = x·(U·diag(S⊙z)·Vh)ᵀ with Triton kernels; same contract as `svf_linear_ref`.

    x (B, T, n) and U (m, r), Vh (r, n) share a dtype (fp32/fp16/bf16; fp16/bf16 accumulate in
    fp32); S (r,) and z (r,) or (B, r) are any float dtype (the product σ⊙z is taken in fp32).
    Gradients flow to x and z only: U, S, Vh are the frozen SVD of the base weight (docs/PAPER.md §1).
    Needs a CUDA tensor, or CPU tensors with TRITON_INTERPRET=1 set before this module's import.
    """
    if x.dim() != 3:
        raise ValueError(f"x must be (B, T, n), got {tuple(x.shape)}")
    B, T, n = x.shape
    m, r = U.shape
    if S.shape != (r,) or Vh.shape != (r, n) or z.shape not in ((r,), (B, r)):
        raise ValueError(f"shapes disagree: x {tuple(x.shape)}, U {tuple(U.shape)}, S {tuple(S.shape)}, "
                         f"Vh {tuple(Vh.shape)}, z {tuple(z.shape)} (z must be ({r},) or ({B}, {r}))")
    if not (x.dtype == U.dtype == Vh.dtype) or x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"x, U, Vh must share one of fp32/fp16/bf16, got {x.dtype}, {U.dtype}, {Vh.dtype}")
    if torch.is_grad_enabled() and (U.requires_grad or S.requires_grad or Vh.requires_grad):
        raise ValueError("svf_linear gives gradients for x and z only; U, S, Vh must be frozen")
    return _SVFLinear.apply(x, U, S, Vh, z)


def svf_linear_supported(x):
    """True where the kernels can run on x's device: CUDA, or CPU under TRITON_INTERPRET=1."""
    return x.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"


# ----------------------------------------------------------------------------- check and bench
def check(device, dtypes):
    """Forward and both gradients against the reference, odd shapes, one z per sequence."""
    torch.manual_seed(0)
    B, T, m, n, r = 3, 5, 37, 70, 29
    for dtype in dtypes:
        tol = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}[dtype]
        U, S, Vh = torch.randn(m, r, device=device), torch.rand(r, device=device) + 0.1, torch.randn(r, n, device=device)
        U, Vh = (U / math.sqrt(m)).to(dtype), (Vh / math.sqrt(n)).to(dtype)
        for zshape in [(r,), (B, r)]:
            x = torch.randn(B, T, n, device=device, dtype=dtype, requires_grad=True)
            z = torch.rand(zshape, device=device, requires_grad=True)
            g = torch.randn(B, T, m, device=device, dtype=dtype)
            y = svf_linear(x, U, S, Vh, z)
            ours = (y, *torch.autograd.grad(y, (x, z), g))
            xr = x.detach().float().requires_grad_()  # reference in fp32 on the same rounded inputs
            y = svf_linear_ref(xr, U.float(), S, Vh.float(), z)
            ref = (y, *torch.autograd.grad(y, (xr, z), g.float()))
            errs = [((o.float() - w).norm() / w.norm()).item() for o, w in zip(ours, ref)]
            ok = max(errs) < tol
            print(f"{str(dtype):15s} z{str(zshape):8s} rel.err y {errs[0]:.1e} | dx {errs[1]:.1e} | dz {errs[2]:.1e}"
                  f"  {'ok' if ok else 'FAIL'} (tol {tol:.0e})")
            if not ok:
                sys.exit(1)


LLAMA3_8B = [("gate/up_proj", 14336, 4096), ("down_proj", 4096, 14336), ("q/o_proj", 4096, 4096)]  # (m, n)
TOKENS, MIXED_B, MIXED_T = [1, 16, 128, 512, 1024, 4096], 8, [1, 16, 128, 512]


def bench():
    if not torch.cuda.is_available():
        sys.exit("--bench needs a CUDA GPU and none was found. On CPU run `python kernels/svf_linear.py` "
                 "(no --bench) for the correctness check under the Triton interpreter.")
    from triton.testing import do_bench
    dt, GB, TF = torch.bfloat16, 1e9, 1e12
    merge = lambda U, s, Vh: (U * s) @ Vh  # noqa: E731  W′ = U·diag(s)·Vh  (m, n)

    def row(label, ms, flops, nbytes, ref_ms=None):
        extra = f" | {ms / ref_ms:5.2f}× dense" if ref_ms else ""
        print(f"  {label:26s} {ms * 1e3:9.1f} µs | {flops / ms / 1e-3 / TF:6.1f} TFLOP/s | "
              f"{nbytes / ms / 1e-3 / GB:7.0f} GB/s{extra}")

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
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--bench", action="store_true", help="GPU benchmark (bf16, Llama-3-8B shapes)")
    args = parser.parse_args()
    if args.bench:
        bench()
    else:
        on_gpu = torch.cuda.is_available()  # bf16 tl.dot is wrong in the interpreter: GPU only
        check("cuda" if on_gpu else "cpu", [torch.float32, torch.float16] + ([torch.bfloat16] if on_gpu else []))

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
warns once, naming the error, and from then on runs its own torch path (`svf.svf_matmul_torch`, the
same formula as `svf_linear_ref` below). A failure inside the backward pass (the same kernel, other
specialisations) is not caught: it would surface as an error.

This file is a leaf, as in the Triton tutorials: torch reference -> kernel -> wrapper -> autograd
Function, importing nothing from the project (svf.py imports it, never the other way round).
Its checks and its benchmark live with the others:

    pytest tests/test_kernels.py         # vs the reference and a float64 dense W′ (CPU: TRITON_INTERPRET=1)
    python tools/bench_kernel.py         # GPU: bf16, Llama-3-8B MLP/attention shapes, vs cuBLAS dense
"""
import os

import torch
import triton
import triton.language as tl


# ----------------------------------------------------------------------------- torch reference
def svf_linear_ref(x, U, S, Vh, z):
    """y = x·(U·diag(S⊙z)·Vh)ᵀ in three torch matmuls, differentiated by autograd: what the kernel
    must equal. x (B, T, n), U (m, r), S (r,), Vh (r, n), z (r,) or (B, r) -> y (B, T, m) in x.dtype;
    y[b] = x[b]·(U·diag(S⊙z[b])·Vh)ᵀ, one row of scales per sequence."""
    s = (S * z).reshape(-1, 1, S.shape[0]).to(x.dtype)  # (1 or B, 1, r)
    return ((x @ Vh.T) * s) @ U.T                         # (B, T, r) -> (B, T, m)


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


# Autotuning keys on M_BUCKET, M rounded up to a power of two, not on M itself: the token count
# changes with nearly every micro-batch and prefill, and each new key costs a full tuning sweep
# (~1 s on a GPU). The best tile for 3000 tokens is the best for 4096, so ~13 buckets cover
# 1..4096 tokens. N, K are weight widths (a handful per model). Triton adds the dtypes to the key.
@triton.autotune(configs=_CONFIGS, key=["M_BUCKET", "N", "K"])
@triton.jit
def _scaled_matmul_kernel(
    a_ptr, b_ptr, c_ptr, s_ptr,  # C (M×N) = (A ⊙ s[row // T]) (M×K) · B (K×N)
    M, N, K, T,  # T = tokens per sequence: row i belongs to sequence i // T
    M_BUCKET,  # next power of two >= M: read by the autotuner only, not by the kernel
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


def m_bucket(M):
    """The autotuner's view of a token count: the next power of two (1, 2, 4, ..., 4096, ...)."""
    return triton.next_power_of_2(M)


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
        a, b, c, s_arg, M, N, K, T, m_bucket(M),
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

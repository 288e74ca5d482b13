"""kernels/svf_linear.py against independent references (docs/STYLE.md, Tests).

On CPU the kernels run under TRITON_INTERPRET=1 (set in conftest.py): fp32 and fp16 only, small
odd shapes so every tile edge is masked. bf16 needs a GPU (the interpreter's bf16 tl.dot is wrong).
    .venv/bin/python -m pytest -q tests/test_kernels.py
"""
import ast
import math
import os
from pathlib import Path

import pytest
import torch

import kernels.svf_linear as K
from kernels.svf_linear import _scaled_matmul_kernel, svf_linear, svf_linear_ref

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
B, T, m, n, r = 3, 5, 37, 70, 29  # odd sizes, r < min(m, n), several tiles of 16 in every dim
TOL = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}  # relative (Frobenius) error


def factors(dtype=torch.float32, seed=0):
    """A real SVD of a random W, truncated to r (so U, Vh have orthonormal columns/rows)."""
    g = torch.Generator().manual_seed(seed)
    U, S, Vh = torch.linalg.svd(torch.randn(m, n, generator=g, dtype=torch.float64), full_matrices=False)
    return U[:, :r].to(DEVICE, dtype), S[:r].float().to(DEVICE), Vh[:r].to(DEVICE, dtype)


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("zshape", ["shared", "per_sequence"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_forward_matches_dense_definition(dtype, zshape):
    # Independent of the factored form: merge W′_b = U·diag(σ⊙z_b)·Vh in float64 per sequence.
    U, S, Vh = factors(dtype)
    x = torch.randn(B, T, n, device=DEVICE).to(dtype)
    z = torch.rand((r,) if zshape == "shared" else (B, r), device=DEVICE)
    zb = z.expand(B, r)
    want = torch.stack([x[b].double() @ (U.double() * (S * zb[b]).double() @ Vh.double()).T for b in range(B)])
    y = svf_linear(x, U, S, Vh, z)
    assert y.shape == (B, T, m) and y.dtype == dtype
    assert rel_err(y, want) < TOL[dtype]


def test_mixed_batch_is_one_expert_per_sequence():
    U, S, Vh = factors()
    x, z = torch.randn(B, T, n, device=DEVICE), torch.rand(B, r, device=DEVICE)
    y = svf_linear(x, U, S, Vh, z)
    for b in range(B):  # row b of the batch sees z[b] and nothing else
        assert rel_err(y[b:b + 1], svf_linear(x[b:b + 1], U, S, Vh, z[b])) < 1e-6
    # ...and the experts really differ, so a kernel that used z[0] everywhere would fail above.
    assert rel_err(svf_linear(x, U, S, Vh, z[0]), y) > 1e-2


@pytest.mark.parametrize("zshape", ["shared", "per_sequence"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_gradients_match_reference(dtype, zshape):
    U, S, Vh = factors(dtype)
    x = torch.randn(B, T, n, device=DEVICE).to(dtype).requires_grad_()
    z = torch.rand((r,) if zshape == "shared" else (B, r), device=DEVICE, requires_grad=True)
    g = torch.randn(B, T, m, device=DEVICE).to(dtype)
    dx, dz = torch.autograd.grad(svf_linear(x, U, S, Vh, z), (x, z), g)
    xr = x.detach().float().requires_grad_()  # reference in fp32 on the same (rounded) inputs
    dx_ref, dz_ref = torch.autograd.grad(svf_linear_ref(xr, U.float(), S, Vh.float(), z), (xr, z), g.float())
    assert dx.dtype == dtype and dz.shape == z.shape
    assert rel_err(dx, dx_ref) < TOL[dtype] and rel_err(dz, dz_ref) < TOL[dtype]


@pytest.mark.parametrize("zshape", [(r,), (2, r)])
def test_reference_gradcheck_float64(zshape):
    # Finite differences for the reference the kernel is checked against (both z layouts).
    U, S, Vh = (t.double() for t in factors())
    x = torch.randn(2, 3, n, dtype=torch.float64, device=DEVICE, requires_grad=True)
    z = torch.rand(zshape, dtype=torch.float64, device=DEVICE, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, z: svf_linear_ref(x, U, S, Vh, z), (x, z))


def test_strided_factors_and_grad_of_z_alone():
    # Strides are runtime arguments: transposed views of U and Vh must work without copies,
    # and backward must cope with x not requiring grad (only dz is wanted, as in SVF training).
    U, S, Vh = factors()
    Ut, Vt = U.T.contiguous().T, Vh.T.contiguous().T  # same values, column-major storage
    x, z = torch.randn(B, T, n, device=DEVICE), torch.rand(B, r, device=DEVICE, requires_grad=True)
    (dz,) = torch.autograd.grad(svf_linear(x, Ut, S, Vt, z).square().sum(), z)
    (dz_ref,) = torch.autograd.grad(svf_linear_ref(x, U, S, Vh, z).square().sum(), z)
    assert rel_err(dz, dz_ref) < 1e-5


def test_nothing_m_by_n_is_saved_for_backward():
    U, S, Vh = factors()
    x = torch.randn(B, T, n, device=DEVICE, requires_grad=True)
    z = torch.rand(r, device=DEVICE, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape) or t, lambda t: t):
        svf_linear(x, U, S, Vh, z)
    assert saved and all(math.prod(s) < m * n for s in saved), saved


def test_rejects_bad_inputs():
    U, S, Vh = factors()
    x = torch.randn(B, T, n, device=DEVICE)
    with pytest.raises(ValueError):
        svf_linear(x, U, S, Vh, torch.rand(B + 1, r, device=DEVICE))  # one z per sequence, not more
    with pytest.raises(ValueError):
        svf_linear(x[..., :-1], U, S, Vh, torch.rand(r, device=DEVICE))
    with pytest.raises(ValueError):
        svf_linear(x, U.requires_grad_(), S, Vh, torch.rand(r, device=DEVICE))  # factors are frozen
    with pytest.raises(TypeError):
        svf_linear(x.double(), U.detach().double(), S, Vh.double(), torch.rand(r, device=DEVICE))


def test_reference_is_svf_torch_path():
    # svf.py falls back to its own torch path when the kernel is unavailable: it must be the same
    # function of (x, U, S, Vh, z) as the reference the kernel is held to, in both z layouts.
    import svf
    U, S, Vh = factors()
    x = torch.randn(B, T, n, device=DEVICE)
    for z in (torch.rand(r, device=DEVICE), torch.rand(B, r, device=DEVICE)):
        assert torch.equal(svf.svf_matmul_torch(x, U, S, Vh, z), svf_linear_ref(x, U, S, Vh, z))


def test_kernel_file_is_a_leaf():
    # Issue 37: svf.py imports the kernel; the kernel must import nothing of the project (no cycle,
    # no sys.path patching), only torch and triton, as the Triton tutorials do.
    tree = ast.parse(Path(K.__file__).read_text())
    imported = {a.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import) for a in node.names}
    imported |= {node.module.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert imported <= {"os", "torch", "triton"}, imported


def test_autotune_keys_on_a_bucket_of_the_token_count(monkeypatch):
    # Issue 36 §2.2: the token count M changes with every micro-batch and prefill; each new autotune
    # key costs a tuning sweep. Give the autotuner two configs and a stand-in benchmark (the
    # interpreter cannot time kernels), then count tunings over many M: one per power-of-two bucket.
    cfg = _scaled_matmul_kernel.configs[0]
    twin = type(cfg)(dict(cfg.kwargs), num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    tunings = []
    monkeypatch.setattr(_scaled_matmul_kernel, "configs", [cfg, twin])
    monkeypatch.setattr(_scaled_matmul_kernel, "cache", {})
    fake_bench = lambda fn, quantiles: tunings.append(1) or [1.0, 1.0, 1.0]  # noqa: E731
    monkeypatch.setitem(vars(_scaled_matmul_kernel), "do_bench", fake_bench)  # over a cached_property
    g = torch.Generator().manual_seed(0)
    b = torch.randn(24, 20, generator=g).to(DEVICE)
    Ms = [1, 2, 3, 5, 7, 9, 12, 16, 17, 23, 31, 33, 40, 47, 58, 64]  # 16 token counts, 7 buckets
    for M in Ms:
        a = torch.randn(M, 24, generator=g).to(DEVICE)
        assert rel_err(K._scaled_matmul(a, b), a.double() @ b.double()) < 1e-5
    buckets = {K.m_bucket(M) for M in Ms}
    assert buckets == {1, 2, 4, 8, 16, 32, 64}
    assert len(_scaled_matmul_kernel.cache) == len(buckets)  # keyed on the bucket, not on M (16 keys)
    assert len(tunings) == 2 * len(buckets)                  # each bucket timed its two configs once


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="interpreter-only limit")
def test_single_autotune_config_under_interpreter():
    assert len(_scaled_matmul_kernel.configs) == 1  # the interpreter fails when autotune has to choose


@pytest.mark.skipif(not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1",
                    reason="bf16 tl.dot needs a GPU (wrong in the interpreter)")
def test_bf16_on_gpu():
    U, S, Vh = factors(torch.bfloat16)
    x = torch.randn(B, T, n, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
    z = torch.rand(B, r, device=DEVICE, requires_grad=True)
    g = torch.randn(B, T, m, device=DEVICE, dtype=torch.bfloat16)
    y = svf_linear(x, U, S, Vh, z)
    dx, dz = torch.autograd.grad(y, (x, z), g)
    xr = x.detach().float().requires_grad_()
    y_ref = svf_linear_ref(xr, U.float(), S, Vh.float(), z)
    dx_ref, dz_ref = torch.autograd.grad(y_ref, (xr, z), g.float())
    for got, want in [(y, y_ref), (dx, dx_ref), (dz, dz_ref)]:
        assert rel_err(got, want) < TOL[torch.bfloat16]

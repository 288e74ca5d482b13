"""svd_cache.py and svf.py: decomposition, the SVF formula and its gradients, merging, expert files.

Tiny random models for almost everything; the real SmolLM2 for uniform z == base logits.
    .venv/bin/python -m pytest -q tests/test_svf.py
"""
import json
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import save_file
from torch.utils._python_dispatch import TorchDispatchMode

import svd_cache
import svf
from model import ModelConfig, Transformer

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
from bench_svf import peak_memory  # noqa: E402  (a benchmark's probe: tools/, not svf.py)


def tiny_config(hidden=32, inter=48, layers=2, model_type="llama"):
    return ModelConfig(model_type=model_type, vocab_size=64, hidden_size=hidden, intermediate_size=inter,
                       num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                       head_dim=hidden // 4, attention_bias=model_type == "qwen2", layer_windows=[None] * layers)


def tiny_model(seed=0, dtype=torch.float32, **kw):
    torch.manual_seed(seed)
    model = Transformer(tiny_config(**kw)).to(dtype).eval().requires_grad_(False)
    model.name_or_path = f"tiny-{seed}"
    return model


def tiny_folder(path, seed=0):
    """A checkpoint folder that Transformer.from_pretrained reads (for the CLI tests)."""
    model = tiny_model(seed)
    c = model.config
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps({
        "model_type": c.model_type, "vocab_size": c.vocab_size, "hidden_size": c.hidden_size,
        "intermediate_size": c.intermediate_size, "num_hidden_layers": c.num_hidden_layers,
        "num_attention_heads": c.num_attention_heads, "num_key_value_heads": c.num_key_value_heads,
        "head_dim": c.head_dim, "tie_word_embeddings": False}))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path / "model.safetensors")
    return path


def ids(B=2, T=7, seed=0):
    return torch.randint(0, 64, (B, T), generator=torch.Generator().manual_seed(seed))


def random_z(cache, seed=0, B=None):
    g = torch.Generator().manual_seed(seed)
    return {n: torch.rand(*((B,) if B else ()), cache.rank(n), generator=g) + 0.2 for n in cache.names}


# ----------------------------------------------------------------------------- svd_cache

def test_svd_reconstructs_tall_and_wide(tmp_path):
    model = tiny_model()
    cache = svd_cache.load(model, "all", root=tmp_path)
    assert len(cache.names) == 2 * 7 and not any("norm" in n or "embed" in n for n in cache.names)
    for name in cache.names:  # gate/up are tall (48×32), down is wide (32×48), q/o square
        U, S, Vh = cache[name]
        W = model.get_parameter(name)
        r = min(W.shape)
        assert U.shape == (W.shape[0], r) and S.shape == (r,) and Vh.shape == (r, W.shape[1])
        assert U.dtype == S.dtype == Vh.dtype == torch.float32
        torch.testing.assert_close(U @ torch.diag(S) @ Vh, W, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(U.T @ U, torch.eye(r), atol=1e-5, rtol=0)
        assert (S[:-1] >= S[1:]).all()


def test_target_names_and_layers():
    model = tiny_model(layers=4)
    assert svd_cache.target_names(model)[:3] == [f"model.layers.0.mlp.{k}_proj.weight" for k in ("gate", "up", "down")]
    assert len(svd_cache.target_names(model, "attn", [1, 3])) == 8
    assert {n.split(".")[2] for n in svd_cache.target_names(model, "mlp", "half")} == {"0", "2"}
    with pytest.raises(ValueError, match="out of range"):
        svd_cache.target_names(model, "mlp", [7])
    # paper Table 4's "MLP + attention" row: a comma list, in block order whatever order it is written in
    assert svd_cache.target_names(model, "mlp,qv", [2]) == [f"model.layers.2.{k}.weight" for k in (
        "self_attn.q_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")]
    assert svd_cache.target_names(model, "qv,mlp") == svd_cache.target_names(model, "mlp,qv")


def test_bad_targets_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as e:
        svd_cache.main(["--model", "x", "--targets", "qv,attention"])
    assert e.value.code == 2 and "unknown target 'attention'" in capsys.readouterr().err


class Killed(Exception):
    pass


def test_cache_resumes_after_kill(tmp_path, monkeypatch):
    model = tiny_model()
    calls, real, kill = [], svd_cache.decompose, True

    def dies_on_third(W):
        calls.append(1)
        if len(calls) == 3 and kill:
            raise Killed  # the process dies during the third SVD
        return real(W)
    monkeypatch.setattr(svd_cache, "decompose", dies_on_third)
    with pytest.raises(Killed):
        svd_cache.load(model, "mlp", root=tmp_path)
    folder = tmp_path / "svd" / svd_cache.model_fingerprint(model)
    assert len(list(folder.glob("*.safetensors"))) == 2 and not list(folder.glob("*.tmp*"))
    calls.clear()
    kill = False
    cache = svd_cache.load(model, "mlp", root=tmp_path)
    assert len(calls) == 6 - 2  # only the missing ones were decomposed
    torch.testing.assert_close(cache[cache.names[0]][1], torch.linalg.svdvals(model.get_parameter(cache.names[0])))


def test_stale_cache_refused(tmp_path):
    a, b = tiny_model(0), tiny_model(1)
    cache_a = svd_cache.load(a, "mlp", root=tmp_path)
    with pytest.raises(ValueError, match="built for base weights"):
        svf.attach(b, cache_a)  # a cache object for other weights
    # files copied into the folder of other weights (e.g. by hand) are refused too
    folder_b = tmp_path / "svd" / svd_cache.model_fingerprint(b)
    folder_b.mkdir(parents=True)
    for f in cache_a.folder.glob("*.safetensors"):
        (folder_b / f.name).write_bytes(f.read_bytes())
    with pytest.raises(ValueError, match="built for base weights"):
        svd_cache.load(b, "mlp", root=tmp_path)
    # an in-place change of the weights changes the fingerprint (memo keyed on the version counter)
    with torch.no_grad():
        a.model.layers[0].mlp.up_proj.weight[0, 0] += 1
    assert svd_cache.model_fingerprint(a) != cache_a.fingerprint


# ----------------------------------------------------------------------------- the SVF formula

def test_uniform_z_gives_base_logits_smollm2(smollm2_dir):
    model = Transformer.from_pretrained(smollm2_dir)
    cache = svd_cache.load(model, "mlp", layers=[0, 14, 29])  # three layers keep a clean build < 30 s
    x = torch.tensor([[1, 504, 3180, 314, 2405, 30, 216, 2, 1489, 28, 253]])
    base = model(x)
    svf.attach(model, cache)
    svf.set_z(model, {n: torch.full((cache.rank(n),), 0.37) for n in cache.names})  # uniform, not 1
    adapted = model(x)
    svf.set_z(model, None)
    assert (adapted - base).abs().max() <= 1e-4
    assert torch.equal(model(x), base)  # z None: exact base path
    svf.detach(model)


def test_scaling_z_changes_nothing(tmp_path):
    model = tiny_model(model_type="qwen2")  # q/k/v carry a bias
    cache = svd_cache.load(model, "all", root=tmp_path)
    svf.attach(model, cache)
    z = random_z(cache)
    svf.set_z(model, z)
    y1 = model(ids())
    svf.set_z(model, {n: 3.7 * v for n, v in z.items()})
    torch.testing.assert_close(model(ids()), y1, atol=1e-5, rtol=1e-5)
    svf.set_z(model, z, rescale=False)  # without the rescale the scale matters: the control
    assert not torch.allclose(model(ids()), y1, atol=1e-3)


def single_linear(m=7, n=5, dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    lin = nn.Linear(n, m, bias=False).to(dtype).requires_grad_(False)
    U, S, Vh = torch.linalg.svd(lin.weight, full_matrices=False)
    return lin, svf.SVFLinear(lin, U, S, Vh), (U, S, Vh)


def materialised(x, theta, U, S, Vh, rescale=True):
    """The official formula: W′ = U·diag(σ⊙z)·Vh·Σσ/Σ(σ⊙z), then a dense matmul."""
    z = torch.sigmoid(theta)
    W = U @ torch.diag(S * z) @ Vh * (S.sum() / (S * z).sum() if rescale else 1)
    return x @ W.T


def test_gradcheck_factored_vs_materialised():
    lin, mod, (U, S, Vh) = single_linear()
    x = torch.randn(2, 3, 5, dtype=torch.float64)
    w = torch.randn(2, 3, 7, dtype=torch.float64)  # a fixed random readout makes the loss generic

    def factored(theta):
        svf.set_z(mod_holder, {"lin.weight": torch.sigmoid(theta)})
        return (mod(x) * w).sum()
    mod_holder = nn.Module()
    mod_holder.lin = mod
    theta = (0.1 + 0.5 * torch.randn(S.numel(), dtype=torch.float64)).requires_grad_()
    assert torch.autograd.gradcheck(factored, (theta,))
    g_fact, = torch.autograd.grad(factored(theta), theta)
    g_mat, = torch.autograd.grad((materialised(x, theta, U, S, Vh) * w).sum(), theta)
    torch.testing.assert_close(g_fact, g_mat, atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("per_sequence", [False, True])
def test_closed_form_dz(per_sequence):
    """docs/PAPER.md §1: dL/dz_i = s·σ_i·a_i·(Uᵀg)_i − σ_i·(gᵀy)/Σ(σ⊙z), summed over the tokens of each z."""
    lin, mod, (U, S, Vh) = single_linear()
    B, T = 2, 4
    x = torch.randn(B, T, 5, dtype=torch.float64)
    g = torch.randn(B, T, 7, dtype=torch.float64)
    z = (torch.rand(B, 5, dtype=torch.float64) + 0.1) if per_sequence else (torch.rand(5, dtype=torch.float64) + 0.1)
    z.requires_grad_()
    holder = nn.Module()
    holder.lin = mod
    svf.set_z(holder, {"lin.weight": z})
    y = mod(x)
    auto, = torch.autograd.grad(y, z, g)
    with torch.no_grad():
        zb = z if per_sequence else z.expand(B, -1)                   # (B, r)
        s = S.sum() / (S * zb).sum(-1)                                # (B,)
        a = x @ Vh.T                                                  # (B, T, r)
        per_tok = s[:, None, None] * S * a * (g @ U) \
            - S * (g * y).sum(-1, keepdim=True) / (S * zb).sum(-1)[:, None, None]  # (B, T, r)
        hand = per_tok.sum(1) if per_sequence else per_tok.sum((0, 1))
    torch.testing.assert_close(auto, hand, atol=1e-12, rtol=1e-10)


def test_per_sequence_z_matches_one_at_a_time(tmp_path):
    model = tiny_model()
    cache = svd_cache.load(model, "all", root=tmp_path)
    svf.attach(model, cache)
    zb = random_z(cache, B=2)
    svf.set_z(model, zb)
    both = model(ids(B=2))
    for b in range(2):
        svf.set_z(model, {n: v[b] for n, v in zb.items()})
        torch.testing.assert_close(model(ids(B=2)[b:b + 1]), both[b:b + 1], atol=1e-5, rtol=1e-5)


class ShapeLog(TorchDispatchMode):
    """Records the shape of every new tensor any aten op allocates (forward and backward); views
    and in-place results are skipped (U itself is m×r = m×n when r = n, but is never allocated)."""

    def __init__(self):
        super().__init__()
        self.shapes = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {a.data_ptr() for a in args if isinstance(a, torch.Tensor)}
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor) and not t._is_view() and t.data_ptr() not in inputs:
                self.shapes.add(tuple(t.shape))
        return out


def test_no_weight_sized_gradient(tmp_path):
    model = tiny_model(hidden=64, inter=96)
    cache = svd_cache.load(model, "mlp", root=tmp_path)
    weight_shapes = {cache.shapes[n] for n in cache.names} | {cache.shapes[n][::-1] for n in cache.names}
    x = ids(B=1, T=5)
    theta = {n: t.requires_grad_() for n, t in svf.init_theta(cache).items()}

    def factored():
        svf.set_z(model, {n: torch.sigmoid(t) for n, t in theta.items()})
        model(x).logsumexp(-1).sum().backward()

    def official():  # the control: materialise W′, full-size dL/dW′
        Ws = {}
        for n in cache.names:
            U, S, Vh = cache[n]
            z = svf.fold_rescale(S, torch.sigmoid(theta[n]))
            Ws[n] = (U * (S * z)) @ Vh
        torch.func.functional_call(model, Ws, (x,)).logsumexp(-1).sum().backward()

    svf.attach(model, cache)
    with ShapeLog() as log:
        factored()
    assert not log.shapes & weight_shapes
    assert all(p.grad is None and not p.requires_grad for p in model.parameters())
    assert all(t.grad is not None and t.grad.abs().sum() > 0 for t in theta.values())
    mem_factored = peak_memory(factored)
    svf.detach(model)
    with ShapeLog() as log:
        official()
    assert log.shapes & weight_shapes  # the control does allocate them
    mem_official = peak_memory(official)
    assert 0 < mem_factored < 0.5 * mem_official, (mem_factored, mem_official)


def count_kernel_launches(monkeypatch):
    """Every Triton matmul of kernels/svf_linear.py goes through _scaled_matmul: count them."""
    K = pytest.importorskip("kernels.svf_linear")
    calls, real = [], K._scaled_matmul
    monkeypatch.setattr(K, "_scaled_matmul", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    monkeypatch.setattr(svf, "_kernel", [])  # import it afresh, as a new process would
    return calls


def test_kernel_path_matches_torch(tmp_path, monkeypatch):
    calls = count_kernel_launches(monkeypatch)
    model = tiny_model()
    cache = svd_cache.load(model, "mlp", root=tmp_path)
    svf.attach(model, cache)
    out = {}
    for use in (False, True):
        monkeypatch.setattr(svf, "USE_KERNEL", use)
        theta = {n: t.requires_grad_() for n, t in svf.init_theta(cache).items()}
        zb = {n: torch.sigmoid(t).expand(2, -1) * torch.tensor([[1.0], [0.5]]) for n, t in theta.items()}
        svf.set_z(model, zb)
        before = len(calls)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # a fallback warning would mean torch was compared with torch
            y = model(ids(B=2))
            y.sum().backward()
        out[use] = (y, theta[cache.names[0]].grad)
        # torch path: no launch. Kernel path, per matrix: 2 forward + g·U backward, + dx where the
        # input needs a gradient: all but layer 0's gate/up, whose input does not depend on θ.
        assert len(calls) - before == (3 * len(cache.names) + len(cache.names) - 2 if use else 0)
    torch.testing.assert_close(out[True][0], out[False][0], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out[True][1], out[False][1], atol=1e-4, rtol=1e-4)


def test_kernel_failure_falls_back_to_torch_with_one_warning(tmp_path, monkeypatch):
    """A kernel that fails at call time (e.g. a Triton compile error on some GPU) must not end a
    run: one warning naming the error, the torch result, and no further kernel attempts."""
    K = pytest.importorskip("kernels.svf_linear")
    monkeypatch.setattr(svf, "_kernel", [])
    monkeypatch.setattr(svf, "USE_KERNEL", True)
    calls = []

    def broken(*a, **kw):
        calls.append(1)
        raise RuntimeError("CompilationError: at 12:8: unsupported layout")
    monkeypatch.setattr(K, "_scaled_matmul", broken)
    g = torch.Generator().manual_seed(0)
    x, U, S, Vh = torch.randn(2, 3, 8, generator=g), torch.randn(6, 5, generator=g), torch.rand(5, generator=g), \
        torch.randn(5, 8, generator=g)
    z = torch.rand(2, 5, generator=g)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        y1 = svf.svf_matmul(x, U, S, Vh, z)
        y2 = svf.svf_matmul(x, U, S, Vh, z)
    assert len(w) == 1 and "CompilationError: at 12:8: unsupported layout" in str(w[0].message)
    assert len(calls) == 1 and svf._kernel == [None]  # tried once, then the torch path for good
    want = torch.stack([x[b] @ ((U * (S * z[b])) @ Vh).T for b in range(2)])  # the dense definition
    torch.testing.assert_close(y1, want)
    torch.testing.assert_close(y2, want)
    # the wrapper's own argument checks are a caller's bug: they still raise
    monkeypatch.setattr(svf, "_kernel", [K.svf_linear])
    with pytest.raises(ValueError, match="shapes disagree"):
        svf.svf_matmul(x, U, S, Vh, torch.rand(3, 5))


def test_routed_other_rows_are_exactly_the_base_weights(tmp_path):
    """set_z(..., base_rows=...) runs those rows on W itself, never on the factors. To show it, the
    factors are broken (U = 0): the base rows still match the unadapted model, the others do not.
    (Not bit-equality: a CPU GEMM's last bits depend on the batch shape, for the base model too.)"""
    model, never = tiny_model(), tiny_model()
    cache = svd_cache.load(model, "mlp", root=tmp_path)
    svf.attach(model, cache)
    for _, m in svf.svf_modules(model):
        m.U = torch.zeros_like(m.U)  # the factored path now outputs 0 for every matrix
    x = ids(B=3)
    base = never(x)
    zs = {n: torch.ones(3, cache.rank(n)) for n in cache.names}
    svf.set_z(model, zs, rescale=False, base_rows=[False, True, False])
    out = model(x)
    torch.testing.assert_close(out[1], base[1], atol=1e-6, rtol=1e-6)
    assert (out[0] - base[0]).abs().max() > 1e-2 and (out[2] - base[2]).abs().max() > 1e-2
    svf.set_z(model, zs, rescale=False, base_rows=torch.tensor([0, 2]))  # indices work too
    out = model(x)
    torch.testing.assert_close(out[[0, 2]], base[[0, 2]], atol=1e-6, rtol=1e-6)
    assert (out[1] - base[1]).abs().max() > 1e-2
    svf.set_z(model, zs, rescale=False)  # without base_rows every row takes the (broken) factors
    assert all((model(x)[b] - base[b]).abs().max() > 1e-2 for b in range(3))
    svf.set_z(model, None)
    assert all(m.base_rows is None for _, m in svf.svf_modules(model))


def test_qv_targets_are_the_papers_attention_ablation():
    model = tiny_model()
    names = svd_cache.target_names(model, "qv")
    assert names == [f"model.layers.{i}.self_attn.{k}_proj.weight" for i in range(2) for k in "qv"]
    # paper Table 4, Llama-3-8B: 32 layers × (4096 + 1024) = 0.16M parameters (r = min(m, n))
    q, v = (4096, 4096), (1024, 4096)
    assert 32 * (min(q) + min(v)) == 163_840


# ----------------------------------------------------------------------------- merging, experts

def test_merge_matches_factored_and_restores_bit_exactly(tmp_path):
    model = tiny_model()
    cache = svd_cache.load(model, "mlp", root=tmp_path)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    expert = svf.Expert.new(svf.init_theta(cache, seed=3), model, cache)
    expert.theta = {n: t + torch.randn_like(t) for n, t in expert.theta.items()}  # far from uniform
    svf.attach(model, cache)
    svf.set_z(model, expert.zs())
    factored = model(ids())
    svf.set_z(model, None)
    with svf.merged(model, expert, cache):
        assert not torch.equal(model.model.layers[0].mlp.up_proj.weight, before["model.layers.0.mlp.up_proj.weight"])
        torch.testing.assert_close(model(ids()), factored, atol=1e-5, rtol=1e-5)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    with pytest.raises(RuntimeError, match="boom"):  # restored on an exception too
        with svf.merged(model, expert.zs(), cache):
            raise RuntimeError("boom")
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_expert_round_trip(tmp_path):
    model = tiny_model()
    cache = svd_cache.load(model, "mlp", root=tmp_path)
    expert = svf.Expert.new(svf.init_theta(cache), model, cache, task="gsm8k", lr=2e-3, valid_acc=0.41)
    path = tmp_path / "e.safetensors"
    expert.save(path)
    with safe_open(path, framework="pt") as f:  # the file format is the interface
        meta = f.metadata()
        assert set(f.keys()) == set(cache.names)
        t = f.get_tensor("model.layers.1.mlp.down_proj.weight")
        assert t.dtype == torch.float32 and t.shape == (32,)
    for k in ("parametrization", "rescale", "base_model", "base_fingerprint", "targets", "task", "lr", "valid_acc"):
        assert k in meta
    assert meta["parametrization"] == "sigmoid" and meta["rescale"] == "true" and meta["layers"] == "0,1"
    back = svf.Expert.load(path)
    assert list(back.theta) == cache.names and back.meta == expert.meta
    assert all(torch.equal(back.theta[n], expert.theta[n]) for n in cache.names)
    torch.testing.assert_close(back.z(cache.names[0]), torch.sigmoid(expert.theta[cache.names[0]]))
    back.check(model, cache)


def test_mismatched_expert_is_refused(tmp_path):
    a, b, wide = tiny_model(0), tiny_model(1), tiny_model(0, hidden=48)  # r = 32 vs 48
    cache_a = svd_cache.load(a, "mlp", root=tmp_path)
    path = tmp_path / "a.safetensors"
    svf.Expert.new(svf.init_theta(cache_a), a, cache_a).save(path)
    cache_b = svd_cache.load(b, "mlp", root=tmp_path)
    with pytest.raises(ValueError, match=r"a\.safetensors: expert was trained for base [0-9a-f]+ \(tiny-0\), this model is"):
        with svf.merged(b, path, cache_b):
            pass
    assert all(torch.equal(b.get_parameter(n), tiny_model(1).get_parameter(n)) for n in cache_b.names)
    moved = svf.transfer(svf.Expert.load(path))  # fingerprint waived: now shapes decide
    moved.check(b, svd_cache.load(b, "mlp", root=tmp_path))
    with pytest.raises(ValueError, match="does not fit this model"):
        moved.check(wide, svd_cache.load(wide, "mlp", root=tmp_path))


def test_load_experts_checks_then_attaches(tmp_path):
    model = tiny_model()
    cache = svd_cache.load(model, "mlp", root=tmp_path)
    files = []
    for k, rescale in enumerate([True, True, False]):
        files.append(tmp_path / f"e{k}.safetensors")
        svf.Expert.new(svf.init_theta(cache, seed=k), model, cache, rescale=rescale).save(files[-1])
    experts, got = svf.load_experts(model, files[:2], root=tmp_path)
    assert [e.source for e in experts] == [str(f) for f in files[:2]] and got.names == cache.names
    assert len(svf.svf_modules(model)) == len(cache.names)  # attached
    with pytest.raises(ValueError, match=r"e2\.safetensors: rescale=false, but .*e0\.safetensors has rescale=true"):
        svf.load_experts(model, files, root=tmp_path)
    qv = svd_cache.load(model, "qv", root=tmp_path)
    svf.Expert.new(svf.init_theta(qv), model, qv).save(tmp_path / "qv.safetensors")
    with pytest.raises(ValueError, match="qv.safetensors: adapts other matrices"):
        svf.load_experts(model, [files[0], tmp_path / "qv.safetensors"], root=tmp_path)
    with pytest.raises(ValueError, match="expert was trained for base"):
        svf.load_experts(tiny_model(1), files[:1], root=tmp_path)


def test_bad_expert_files_are_one_line_naming_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nope\.safetensors: no such expert file .*make train TASK="):
        svf.Expert.load(tmp_path / "nope.safetensors")
    model = tiny_model()
    cache = svd_cache.load(model, "mlp", root=tmp_path)
    good = tmp_path / "good.safetensors"
    svf.Expert.new(svf.init_theta(cache), model, cache).save(good)
    (tmp_path / "cut.safetensors").write_bytes(good.read_bytes()[:100])  # truncated
    with pytest.raises(ValueError, match=r"cut\.safetensors: cannot read safetensors"):
        svf.Expert.load(tmp_path / "cut.safetensors")
    save_file({"lm_head.weight": torch.zeros(3)}, tmp_path / "other.safetensors")  # not an expert
    with pytest.raises(ValueError, match=r"other\.safetensors: not an SVF expert file"):
        svf.Expert.load(tmp_path / "other.safetensors")


def test_transfer_shuffle_is_a_permutation(tmp_path):
    model = tiny_model()
    cache = svd_cache.load(model, "mlp", root=tmp_path)
    e = svf.Expert.new({n: torch.randn(cache.rank(n)) for n in cache.names}, model, cache)
    same, shuf = svf.transfer(e), svf.transfer(e, shuffle=True, seed=1)
    for n in cache.names:
        assert torch.equal(same.theta[n], e.theta[n])
        assert torch.equal(shuf.theta[n].sort().values, e.theta[n].sort().values)
        assert not torch.equal(shuf.theta[n], e.theta[n])
    assert shuf.meta["transfer"] == "shuffled seed=1" and shuf.meta["transferred_from"] == cache.fingerprint


def test_mix(tmp_path):
    model = tiny_model()
    cache = svd_cache.load(model, "mlp", root=tmp_path)
    experts = [svf.Expert.new({n: torch.randn(cache.rank(n)) for n in cache.names}, model, cache) for _ in range(3)]
    one_hot = svf.mix(experts, [0.0, 1.0, 0.0])
    assert all(torch.equal(one_hot[n], experts[1].z(n)) for n in cache.names)  # paper mode: exact
    per_matrix = torch.rand(3, len(cache.names))
    mixed = svf.mix(experts, per_matrix)
    j, n = 4, cache.names[4]
    torch.testing.assert_close(mixed[n], sum(per_matrix[k, j] * experts[k].z(n) for k in range(3)))
    by_theta = svf.mix(experts, [0.5, 0.5, 0.0], mode="theta")
    torch.testing.assert_close(by_theta[n], torch.sigmoid(0.5 * experts[0].theta[n] + 0.5 * experts[1].theta[n]))
    assert not torch.allclose(by_theta[n], svf.mix(experts, [0.5, 0.5, 0.0])[n])
    with pytest.raises(ValueError, match="alpha must be"):
        svf.mix(experts, torch.ones(2))


def test_cli_init_and_merge(tmp_path):
    src = tiny_folder(tmp_path / "base")
    root = str(tmp_path / "cache")
    svf.main(["init", "--model", str(src), "--out", str(tmp_path / "e.safetensors"), "--root", root, "--task", "t"])
    expert = svf.Expert.load(tmp_path / "e.safetensors")
    assert expert.meta["task"] == "t" and len(expert.theta) == 6
    expert.theta = {n: t * 20 for n, t in expert.theta.items()}  # make W′ clearly differ from W
    expert.save(tmp_path / "e.safetensors")
    svf.main(["merge", "--model", str(src), "--expert", str(tmp_path / "e.safetensors"),
              "--out", str(tmp_path / "merged"), "--root", root])
    base, out = Transformer.from_pretrained(src), Transformer.from_pretrained(tmp_path / "merged")
    assert (tmp_path / "merged" / "config.json").read_text() == (src / "config.json").read_text()
    with svf.merged(base, expert, svd_cache.load(base, names=list(expert.theta), root=root)):
        for k, v in base.state_dict().items():
            assert torch.equal(out.state_dict()[k], v), k


def test_cli_mix_writes_the_average_z(tmp_path, capsys):
    model = tiny_model()
    cache = svd_cache.load(model, "mlp", root=tmp_path)
    files = []
    for k in range(3):
        e = svf.Expert.new({n: torch.randn(cache.rank(n)) for n in cache.names}, model, cache, task=f"t{k}")
        e.save(tmp_path / f"e{k}.safetensors")
        files.append(str(tmp_path / f"e{k}.safetensors"))
    experts = [svf.Expert.load(f) for f in files]
    svf.main(["mix", "--experts", *files, "--out", str(tmp_path / "u.safetensors")])
    u = svf.Expert.load(tmp_path / "u.safetensors")
    n = cache.names[2]
    torch.testing.assert_close(u.z(n), sum(e.z(n) for e in experts) / 3)  # by hand: the plain average
    assert u.meta["parametrization"] == "raw" and u.meta["base_fingerprint"] == cache.fingerprint
    u.check(model, cache)
    svf.main(["mix", "--experts", *files, "--alpha", "0", "1", "0", "--out", str(tmp_path / "one.safetensors")])
    assert torch.equal(svf.Expert.load(tmp_path / "one.safetensors").z(n), experts[1].z(n))
    with pytest.raises(SystemExit):  # a bad flag: argparse's usage line and exit status 2
        svf.main(["mix", "--experts", *files, "--alpha", "1", "--out", str(tmp_path / "x.safetensors")])
    assert "error: --alpha needs one value per expert (3), got 1" in capsys.readouterr().err


def test_merge_from_low_precision_factors_changes_only_what_z_changes(tmp_path):
    """A bf16 model's attached layers hold bf16 U, Vh; merged() takes the factors from them (issue 36:
    no cache read per merge) and builds W + U·diag(σ⊙(z−1))·Vh, so a uniform z gives back W bit for
    bit (U·diag(σ)·Vh rebuilt from bf16 factors would not), and a random z lands within bf16 rounding
    of the float64 W′."""
    model = tiny_model(dtype=torch.bfloat16)
    cache = svd_cache.load(model, "mlp", root=tmp_path)
    svf.attach(model, cache)
    name = cache.names[0]
    assert dict(svf.svf_modules(model))[name].U.dtype == torch.bfloat16
    W = model.get_parameter(name)
    before = W.clone()
    with svf.merged(model, {n: torch.full((cache.rank(n),), 0.3) for n in cache.names}):
        assert torch.equal(W, before)
    z = random_z(cache)
    U, S, Vh = (t.double() for t in cache[name])
    want = (before.double() + (U * (S * (svf.fold_rescale(S, z[name].double()) - 1))) @ Vh)  # float64 W′
    with svf.merged(model, z):
        got = W.double()
    ulp = want.abs() * 2 ** -7  # bf16 keeps 8 significant bits
    assert ((got - want).abs() <= ulp + 1e-3 * want.abs().max()).all()

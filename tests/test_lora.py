"""lora.py: the LoRA formula and its gradients, merging, adapter files; and the SFT loss's prompt mask.

Tiny random models (tests/test_svf.py builds them); Llama-3-8B's shapes on the meta device for the
paper's parameter counts.
    .venv/bin/python -m pytest -q tests/test_lora.py
"""
import math

import pytest
import torch
import torch.nn as nn
from safetensors import safe_open

import cli
import generate
import lora
import svd_cache
import svf
from model import ModelConfig, Transformer
from test_svf import ids, tiny_folder, tiny_model


def random_params(model, names, rank=4, seed=0):
    """A as initialised, B random (far from 0) so the update is visible."""
    params = lora.init_params(model, names, rank, seed)
    g = torch.Generator().manual_seed(seed + 1)
    return {n: torch.randn(t.shape, generator=g) if n.endswith("lora_B") else t for n, t in params.items()}


# ----------------------------------------------------------------------------- targets, sizes, init

def test_targets_and_the_papers_parameter_counts():
    model = tiny_model(layers=4)
    assert lora.target_names(model, "qv", [1]) == ["model.layers.1.self_attn.q_proj.weight",
                                                   "model.layers.1.self_attn.v_proj.weight"]
    assert lora.target_names(model, "q,v", "half") == lora.target_names(model, "qv", [0, 2])
    assert lora.target_names(model, "mlp") == svd_cache.target_names(model, "mlp")
    assert len(lora.target_names(model, "qv,mlp")) == 4 * 5 and len(lora.target_names(model, "all")) == 4 * 7
    with pytest.raises(ValueError, match="unknown target 'qkv'"):
        lora.target_names(model, "qkv")
    # Llama-3-8B (32 layers, C 4096, 8 KV heads of 128, MLP 14336), shapes only: docs/PAPER.md §5's 6.82M and 35.13M
    cfg = ModelConfig(model_type="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                      num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                      layer_windows=[None] * 32)
    with torch.device("meta"):
        big = Transformer(cfg)
    # by hand: 32 · 16·((4096+4096) + (1024+4096)) = 6,815,744; MLP adds 32 · 16·3·(4096+14336) = 28,311,552
    assert lora.count(big, lora.target_names(big, "qv"), 16) == 6_815_744
    assert lora.count(big, lora.target_names(big, "qv,mlp"), 16) == 6_815_744 + 28_311_552  # 35.13M


def test_init_is_kaiming_uniform_A_and_zero_B():
    model = tiny_model(hidden=64, inter=96)
    names = lora.target_names(model, "qv,mlp")
    params = lora.init_params(model, names, rank=8, seed=3)
    assert len(params) == 2 * len(names) and all(t.dtype == torch.float32 for t in params.values())
    down = params["model.layers.0.mlp.down_proj.lora_A"]
    assert down.shape == (8, 96) and params["model.layers.0.mlp.down_proj.lora_B"].shape == (64, 8)
    for name in names:
        A, B = params[name.replace(".weight", ".lora_A")], params[name.replace(".weight", ".lora_B")]
        bound = 1 / math.sqrt(A.shape[1])  # kaiming_uniform_(a=√5): gain √(1/3) · √(3/fan_in)
        assert A.abs().max() <= bound and A.abs().max() > 0.9 * bound and A.std() > 0.5 * bound
        assert not B.any()
    again = lora.init_params(model, names, rank=8, seed=3)
    assert all(torch.equal(again[n], t) for n, t in params.items())  # seeded


# ----------------------------------------------------------------------------- the LoRA formula

@pytest.mark.parametrize("model_type", ["llama", "qwen2"])  # qwen2: q/k/v carry a bias
def test_zero_B_gives_base_logits_exactly(model_type):
    model = tiny_model(model_type=model_type)
    x = ids()
    base = model(x)
    names = lora.target_names(model, "all")
    lora.attach(model, names, dropout=0.05)
    hf_names = [n for n, _ in tiny_model(model_type=model_type).named_parameters()]
    assert [n for n, _ in model.named_parameters()] == hf_names  # the base weights keep their HF names
    params = lora.init_params(model, names, rank=4)
    lora.set_params(model, params, scale=8.0)
    assert torch.equal(model(x), base)
    model.train()  # dropout on: still B·A·dropout(x) = 0
    assert torch.equal(model(x), base)
    model.eval()
    lora.set_params(model, random_params(model, names), scale=8.0)
    assert not torch.allclose(model(x), base, atol=1e-3)  # the control: a nonzero B does change them
    lora.set_params(model, None, scale=0.0)
    assert torch.equal(model(x), base)
    lora.detach(model)
    assert not any(isinstance(m, lora.LoRALinear) for m in model.modules()) and torch.equal(model(x), base)


def test_dropout_only_in_training():
    model = tiny_model()
    names = lora.target_names(model, "qv")
    lora.attach(model, names, dropout=0.5)
    lora.set_params(model, random_params(model, names), scale=2.0)
    x = ids()
    assert torch.equal(model(x), model(x))  # eval: deterministic
    model.train()
    torch.manual_seed(0)
    assert not torch.allclose(model(x), model(x))


def test_merged_matches_unmerged_and_restores_bit_exactly():
    model = tiny_model()
    names = lora.target_names(model, "qv,mlp")
    params, scale = random_params(model, names), 0.5
    before = {k: v.clone() for k, v in model.state_dict().items()}
    lora.attach(model, names)
    lora.set_params(model, params, scale)
    unmerged = model(ids())
    # merged while the LoRA path stays attached and set: merged pauses it (the update is not applied twice)
    with lora.merged(model, params, scale):
        assert not torch.equal(model.model.layers[0].self_attn.q_proj.weight,
                               before["model.layers.0.self_attn.q_proj.weight"])
        torch.testing.assert_close(model(ids()), unmerged, atol=1e-5, rtol=1e-5)  # float32, fp summation order
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    torch.testing.assert_close(model(ids()), unmerged, atol=0, rtol=0)  # attached path active again
    with pytest.raises(RuntimeError, match="boom"):  # restored on an exception too
        with lora.merged(model, params, scale):
            raise RuntimeError("boom")
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    with pytest.raises(ValueError, match="needs scale"):
        with lora.merged(model, params):
            pass


def test_gradcheck_against_a_materialised_weight():
    torch.manual_seed(0)
    m, n, r, s = 7, 5, 3, 0.75
    lin = nn.Linear(n, m).double().requires_grad_(False)
    mod = lora.LoRALinear(lin)
    x = torch.randn(2, 4, n, dtype=torch.float64)
    w = torch.randn(2, 4, m, dtype=torch.float64)  # a fixed random readout makes the loss generic
    A = torch.randn(r, n, dtype=torch.float64, requires_grad=True)
    B = torch.randn(m, r, dtype=torch.float64, requires_grad=True)

    def factored(A, B, x):
        mod.A, mod.B, mod.scale = A, B, s
        return (mod(x) * w).sum()
    assert torch.autograd.gradcheck(factored, (A, B, x.clone().requires_grad_()))
    gA, gB = torch.autograd.grad(factored(A, B, x), (A, B))
    # autograd through the materialised W′ = W + s·B·A, then a dense layer
    mA, mB = torch.autograd.grad((nn.functional.linear(x, lin.weight + s * B @ A, lin.bias) * w).sum(), (A, B))
    torch.testing.assert_close(gA, mA, atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(gB, mB, atol=1e-12, rtol=1e-10)
    # and by hand: with G = dL/dW′ = Σ_tokens g·xᵀ, dL/dA = s·Bᵀ·G and dL/dB = s·G·Aᵀ
    G = torch.einsum("btm,btn->mn", w, x)
    torch.testing.assert_close(gA, s * B.detach().T @ G, atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(gB, s * G @ A.detach().T, atol=1e-12, rtol=1e-10)


def test_gradients_reach_only_the_adapter():
    model = tiny_model()
    names = lora.target_names(model, "qv")
    lora.attach(model, names)
    theta = {k: t.requires_grad_() for k, t in lora.init_params(model, names, rank=4).items()}  # reinforce.py's dict
    lora.set_params(model, theta, scale=8.0)
    model(ids()).logsumexp(-1).sum().backward()
    assert all(p.grad is None for p in model.parameters())
    for k, t in theta.items():  # at B = 0: dL/dA = s·Bᵀ·G = 0 exactly, dL/dB = s·G·Aᵀ ≠ 0
        assert (t.grad.abs().sum() > 0) == k.endswith("lora_B"), k


# ----------------------------------------------------------------------------- adapter files

def test_adapter_round_trip(tmp_path):
    model = tiny_model()
    names = lora.target_names(model, "qv", [1])
    adapter = lora.Adapter.new(random_params(model, names), model, alpha=16, targets="qv", dropout=0.05,
                               task="gsm8k", lr=2e-4)
    path = tmp_path / "a.safetensors"
    adapter.save(path)
    with safe_open(path, framework="pt") as f:  # the file format is the interface
        meta = f.metadata()
        assert set(f.keys()) == {"model.layers.1.self_attn.q_proj.lora_A", "model.layers.1.self_attn.q_proj.lora_B",
                                 "model.layers.1.self_attn.v_proj.lora_A", "model.layers.1.self_attn.v_proj.lora_B"}
        assert f.get_tensor("model.layers.1.self_attn.v_proj.lora_B").shape == (16, 4)  # (m = 2 heads · 8, r)
    assert {k: meta[k] for k in ("kind", "rank", "alpha", "targets", "layers", "dropout", "task", "lr")} == \
        {"kind": "lora", "rank": "4", "alpha": "16", "targets": "qv", "layers": "1", "dropout": "0.05",
         "task": "gsm8k", "lr": "0.0002"}
    assert meta["base_fingerprint"] == svd_cache.model_fingerprint(model) and meta["base_model"] == "tiny-0"
    back = lora.Adapter.load(path)
    assert back.meta == adapter.meta and back.scale == 4.0  # alpha 16 / r 4
    assert back.n_params() == 4 * (32 + 32) + 4 * (16 + 32)  # q 32×32, v 16×32 at r 4
    assert all(torch.equal(back.params[k], t) for k, t in adapter.params.items()) and len(back.params) == 4
    back.check(model)
    lora.attach(model, names)
    lora.set_params(model, back.params, back.scale)
    y = model(ids())
    lora.set_params(model, None, 0.0)
    with lora.merged(model, path):  # a path works too
        torch.testing.assert_close(model(ids()), y, atol=1e-5, rtol=1e-5)


def test_mismatched_file_is_one_clear_error(tmp_path):
    a, b = tiny_model(0), tiny_model(1)
    names = lora.target_names(a, "qv")
    path = tmp_path / "a.safetensors"
    lora.Adapter.new(random_params(a, names), a).save(path)
    with pytest.raises(ValueError, match=r"a\.safetensors: adapter was trained for base [0-9a-f]+ \(tiny-0\), "
                                         r"this model is [0-9a-f]+"):
        with lora.merged(b, path):
            pass
    fresh = tiny_model(1).state_dict()
    assert all(torch.equal(v, fresh[k]) for k, v in b.state_dict().items())  # untouched
    bad = lora.Adapter.load(path)  # right base, wrong shape: a rank-4 A beside a file that says rank 8
    bad.meta["rank"] = "8"
    with pytest.raises(ValueError, match=r"does not fit this model: .*lora_A is \(4, 32\), the model needs \(8, 32\)"):
        bad.check(a)
    bad = lora.Adapter.load(path)
    bad.params["model.layers.0.mlp.embed.lora_A"] = torch.zeros(4, 32)
    with pytest.raises(ValueError, match="embed.lora_A is .* no such matrix"):
        bad.check(a)
    cache = svd_cache.load(a, "mlp", root=tmp_path)  # an SVF expert is not a LoRA adapter
    svf.Expert.new(svf.init_theta(cache), a, cache).save(tmp_path / "svf.safetensors")
    with pytest.raises(ValueError, match="svf.safetensors: not a LoRA adapter file"):
        lora.Adapter.load(tmp_path / "svf.safetensors").check(a)


def test_cli_init_and_merge(tmp_path, capsys):
    src = tiny_folder(tmp_path / "base")
    f = str(tmp_path / "a.safetensors")
    lora.main(["init", "--model", str(src), "--out", f, "--rank", "4", "--task", "t"])
    # by hand: 2 layers · (q 32×32 + v 16×32) at r 4 = 2 · (4·(32+32) + 4·(16+32)) = 896
    assert "| 4 matrices | r=4 alpha=32 | 896 parameters |" in capsys.readouterr().out
    adapter = lora.Adapter.load(f)
    assert adapter.n_params() == 896 and adapter.meta["task"] == "t" and adapter.meta["dropout"] == "0.05"
    adapter.params = random_params(tiny_model(), lora.target_names(tiny_model(), "qv"))  # tiny_folder's weights
    adapter.save(f)  # B ≠ 0: the merged weights differ from the base
    lora.main(["merge", "--model", str(src), "--adapter", f, "--out", str(tmp_path / "merged")])
    base, out = Transformer.from_pretrained(src), Transformer.from_pretrained(tmp_path / "merged")
    assert (tmp_path / "merged" / "config.json").read_text() == (src / "config.json").read_text()
    with lora.merged(base, adapter):
        for k, v in base.state_dict().items():
            assert torch.equal(out.state_dict()[k], v), k
    assert not torch.equal(out.model.layers[0].self_attn.q_proj.weight, base.model.layers[0].self_attn.q_proj.weight)


def test_cli_bad_adapter_file_is_one_line(tmp_path, capsys):
    src = tiny_folder(tmp_path / "base")
    bad = tmp_path / "a.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{")  # a truncated safetensors header
    with pytest.raises(SystemExit) as e:  # lora.py's __main__ is cli.run(main)
        cli.run(lora.main, ["merge", "--model", str(src), "--adapter", str(bad), "--out", str(tmp_path / "m"),
                            "--device", "cpu", "--dtype", "fp32"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith(f"error: {bad}: cannot read safetensors") and err.count("\n") == 1, err
    assert not (tmp_path / "m").exists()
    with pytest.raises(SystemExit) as e:
        cli.run(lora.main, ["merge", "--model", str(src), "--adapter", str(tmp_path / "gone.safetensors"),
                            "--out", str(tmp_path / "m")])
    assert e.value.code == 2 and capsys.readouterr().err == f"error: {tmp_path}/gone.safetensors: no such adapter file\n"


# ----------------------------------------------------------------------------- the SFT loss's prompt mask

def test_sft_score_counts_only_completion_tokens():
    """generate.score on (prompt, completion) must sum log p of the completion tokens only. The same
    12 tokens split at every boundary k: the total must be Σ_{t≥k} log p(s_t | s_<t) from one plain
    forward. Counting prompt tokens would give the same total for every k, and fail."""
    model = tiny_model()
    s = ids(B=1, T=12, seed=5)[0].tolist()
    logp = model(torch.tensor([s])).log_softmax(-1)[0, :-1].gather(-1, torch.tensor(s[1:])[:, None])[:, 0]  # (11,)
    totals = []
    for k in range(1, 12):
        total, token_logp, mask = generate.score(model, [s[:k]], [s[k:]])
        assert mask.sum() == 12 - k and token_logp.shape == (1, 12 - k)
        torch.testing.assert_close(total[0], logp[k - 1:].sum(), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(token_logp[0], logp[k - 1:], atol=1e-5, rtol=1e-5)
        totals.append(total[0].item())
    # the control: moving the boundary by one drops exactly the token that joined the prompt
    assert all(abs(a - b) > 1e-3 for a, b in zip(totals, totals[1:]))
    # a batch of two prompts of different lengths: the mask covers exactly each completion, and an
    # SFT loss (mean over completion tokens) equals the one computed row by row
    prompts, comps = [s[:3], s[:7]], [s[3:5], s[7:12]]
    total, token_logp, mask = generate.score(model, prompts, comps)
    assert mask.tolist() == [[1, 1, 0, 0, 0], [1, 1, 1, 1, 1]] and not token_logp[0, 2:].any()
    loss = -(token_logp * mask).sum() / mask.sum()
    torch.testing.assert_close(loss, -(logp[2:4].sum() + logp[6:11].sum()) / 7, atol=1e-5, rtol=1e-5)

"""Faults, bad inputs and hostile files (issue 40): each test is one class of fault on a tiny model,
and each fails without its fix.

Sections, one per area (each owned by the engineer who wrote the fix):
  - experts, SVD factors and merged models (svf.py, svd_cache.py, lora.py, model.save_folder)
  - script arguments (checked where they are parsed)

    OMP_NUM_THREADS=1 .venv/bin/python -m pytest -q tests/test_faults.py
"""
import json
import os
import warnings

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import cli
import lora
import svd_cache
import svf
from model import Transformer
from test_svf import ids, tiny_folder, tiny_model


# ============================================================================= experts, SVD factors, merged models
# svf.py, svd_cache.py, lora.py, model.save_folder (issue 40 §2, §3, §4 merge, §6; issue 36 §1.5, §2.3)

DEAD_PID = 2 ** 30  # above Linux's pid_max (2^22): never a live process


def run_cli(main, argv, capsys):
    """A script as a user runs it: (exit status, stderr). Expected failures are one line via cli.run."""
    capsys.readouterr()  # what the test's own setup printed is not the script's
    with pytest.raises(SystemExit) as e:
        cli.run(main, argv)
        raise SystemExit(0)
    return e.value.code, capsys.readouterr().err


def saved_expert(model, root, path, scale=1.0, **kw):
    cache = svd_cache.load(model, "mlp", root=root)
    e = svf.Expert.new({n: scale * torch.randn(cache.rank(n)) for n in cache.names}, model, cache, **kw)
    e.save(path)
    return e, cache


# ----------------------------------------------------------------------------- numbers that are not numbers (§2)

@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_nonfinite_theta_is_refused_at_load_and_before_write(tmp_path, bad, capsys):
    model = tiny_model()
    e, cache = saved_expert(model, tmp_path, tmp_path / "good.safetensors")
    name = cache.names[3]
    with safe_open(tmp_path / "good.safetensors", framework="pt") as f:
        theta, meta = {n: f.get_tensor(n) for n in f.keys()}, f.metadata()
    theta[name][5] = bad
    save_file(theta, tmp_path / "nan.safetensors", metadata=meta)  # written by some other tool
    with pytest.raises(ValueError, match=rf"nan\.safetensors: {name} holds NaN or inf"):
        svf.Expert.load(tmp_path / "nan.safetensors")
    with pytest.raises(ValueError, match=r"bad\.safetensors: not written: .* holds NaN or inf"):
        svf.Expert(theta, meta).save(tmp_path / "bad.safetensors")
    assert not (tmp_path / "bad.safetensors").exists()
    # merge, the path every script takes: one line, no folder written
    src = tiny_folder(tmp_path / "base")
    rc, err = run_cli(svf.main, ["merge", "--model", str(src), "--expert", str(tmp_path / "nan.safetensors"),
                                 "--out", str(tmp_path / "merged"), "--root", str(tmp_path)], capsys)
    assert rc == 2 and "nan.safetensors" in err and "NaN or inf" in err and not (tmp_path / "merged").exists()


def test_nonfinite_alpha_is_refused(tmp_path, capsys):
    model = tiny_model()
    files = [tmp_path / f"e{k}.safetensors" for k in range(2)]
    experts = [saved_expert(model, tmp_path, f)[0] for f in files]
    with pytest.raises(ValueError, match="mix: alpha holds NaN or inf"):
        svf.mix(experts, [float("nan"), 1.0])
    with pytest.raises(ValueError, match="mix: alpha holds NaN or inf"):  # per-matrix alpha too
        svf.mix(experts, torch.full((2, len(experts[0].theta)), float("inf")))
    with pytest.raises(SystemExit) as e:  # the CLI: argparse names the flag
        svf.main(["mix", "--experts", *map(str, files), "--alpha", "nan", "1", "--out", str(tmp_path / "m.safetensors")])
    assert e.value.code == 2 and "--alpha" in capsys.readouterr().err and not (tmp_path / "m.safetensors").exists()


def test_nonfinite_lora_adapter_is_refused(tmp_path):
    model = tiny_model()
    params = lora.init_params(model, lora.target_names(model, "qv"), rank=2)
    params[next(iter(params))][0, 0] = float("nan")
    adapter = lora.Adapter.new(params, model, targets="qv")
    with pytest.raises(ValueError, match="a.safetensors: not written: .* holds NaN or inf"):
        adapter.save(tmp_path / "a.safetensors")
    save_file(adapter.params, tmp_path / "a.safetensors", metadata=adapter.meta)
    with pytest.raises(ValueError, match="a.safetensors: .* holds NaN or inf"):
        lora.Adapter.load(tmp_path / "a.safetensors")


# ----------------------------------------------------------------------------- the SVD cache, checked (§3)

def data_start(path):
    """Byte offset of the tensor data in a safetensors file (8-byte header length, then the JSON header)."""
    return 8 + int.from_bytes(path.read_bytes()[:8], "little")


def reconstructs(cache, model, name):
    U, S, Vh = cache[name]
    return torch.allclose(U @ torch.diag(S) @ Vh, model.get_parameter(name), atol=1e-5)


def fresh_process(monkeypatch):
    """What a new process knows: nothing verified yet."""
    monkeypatch.setattr(svd_cache, "_verified", {}, raising=False)


def test_corrupt_factor_is_rebuilt(tmp_path, monkeypatch):
    model = tiny_model(hidden=64, inter=96)  # U of gate_proj: 96 x 64 floats, 24 KB
    cache = svd_cache.load(model, "mlp", root=tmp_path)
    name = cache.names[0]
    path = cache.path(name)
    size, start = path.stat().st_size, data_start(path)
    with open(path, "r+b") as f:  # 4 KB overwritten inside the factors: same size, header intact
        f.seek(start + 1000)
        f.write(torch.randn(1024).numpy().tobytes())
    assert path.stat().st_size == size and not reconstructs(cache, model, name)
    fresh_process(monkeypatch)
    with pytest.warns(UserWarning, match=rf"{name}\.safetensors: its factors fail their checksum.*rebuilding"):
        cache = svd_cache.load(model, "mlp", root=tmp_path)
    assert reconstructs(cache, model, name)


def test_truncated_factor_is_rebuilt_or_refused_by_name(tmp_path, monkeypatch):
    model = tiny_model()
    cache = svd_cache.load(model, "mlp", root=tmp_path)
    name = cache.names[1]
    path = cache.path(name)
    whole = path.read_bytes()
    path.write_bytes(whole[:len(whole) // 2])
    with pytest.raises(ValueError, match=rf"{name}\.safetensors: cannot read SVD factors"):
        cache[name]  # cut short after load() checked it: refused, naming the file
    fresh_process(monkeypatch)
    with pytest.warns(UserWarning, match=rf"{name}\.safetensors: unreadable"):
        cache = svd_cache.load(model, "mlp", root=tmp_path)
    assert reconstructs(cache, model, name)


def test_factor_without_checksum_is_upgraded(tmp_path, monkeypatch):
    """Files written before checksums (the shared ~/.cache of older checkouts) are rebuilt once."""
    model = tiny_model()
    cache = svd_cache.load(model, "mlp", root=tmp_path)
    for name in cache.names:
        with safe_open(cache.path(name), framework="pt") as f:
            tensors, meta = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
        del meta["checksum"]
        save_file(tensors, cache.path(name), metadata=meta)
    fresh_process(monkeypatch)
    with pytest.warns(UserWarning, match="made before factor checksums; rebuilding it and 5 more") as record:
        cache = svd_cache.load(model, "mlp", root=tmp_path)
    assert len(record) == 1  # one line for the whole cache, not one per file
    for name in cache.names:
        with safe_open(cache.path(name), framework="pt") as f:
            assert f.metadata()["checksum"] == svd_cache.checksum([f.get_tensor(k) for k in ("U", "S", "Vh")])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # verified once: no second rebuild, no warning
        fresh_process(monkeypatch)
        svd_cache.load(model, "mlp", root=tmp_path)


def test_verified_once_per_process(tmp_path, monkeypatch):
    model = tiny_model()
    svd_cache.load(model, "mlp", root=tmp_path)
    fresh_process(monkeypatch)
    calls = []
    real = svd_cache.checksum
    monkeypatch.setattr(svd_cache, "checksum", lambda ts: calls.append(1) or real(ts))
    for _ in range(3):
        svd_cache.load(model, "mlp", root=tmp_path)
    assert len(calls) == 6  # each of the 6 files once


def test_orphan_temp_files_are_removed(tmp_path):
    model = tiny_model()
    folder = tmp_path / "svd" / svd_cache.model_fingerprint(model)
    folder.mkdir(parents=True)
    dead = [folder / f".model.layers.0.mlp.up_proj.weight.safetensors.tmp{DEAD_PID}",  # cli.atomic_write's
            folder / f"model.layers.0.mlp.up_proj.weight.tmp{DEAD_PID}"]              # the older naming
    live = folder / f".model.layers.1.mlp.up_proj.weight.safetensors.tmp{os.getppid()}"  # another live build
    for f in dead + [live]:
        f.write_bytes(b"x" * 1000)
    svd_cache.load(model, "mlp", root=tmp_path)
    assert not any(f.exists() for f in dead) and live.exists()


def test_mismatched_expert_is_refused_before_any_svd(tmp_path, monkeypatch, capsys):
    wide, model = tiny_model(0, hidden=48), tiny_model(0)
    saved_expert(wide, tmp_path / "other", tmp_path / "wide.safetensors")  # "a Qwen expert on SmolLM2"
    layer5 = svf.transfer(saved_expert(tiny_model(0, layers=6), tmp_path / "other", tmp_path / "six.safetensors")[0])
    layer5.source = str(tmp_path / "six.safetensors")

    def no_svd(W):
        raise AssertionError("an SVD was computed for an expert that does not fit")
    monkeypatch.setattr(svd_cache, "decompose", no_svd)
    root = tmp_path / "cache"
    with pytest.raises(ValueError, match=r"wide\.safetensors: expert was trained for base"):
        svf.load_experts(model, [tmp_path / "wide.safetensors"], root=root)
    with pytest.raises(ValueError, match=r"wide\.safetensors .*transferred.*: expert does not fit .*has r=48"):
        svf.load_experts(model, [svf.transfer(svf.Expert.load(tmp_path / "wide.safetensors"))], root=root)
    # an expert naming a layer the model lacks (§6): one line naming the file, never a traceback
    with pytest.raises(ValueError, match=r"six\.safetensors: expert does not fit .*model\.layers\.2\..* no such matrix"):
        svf.load_experts(model, [layer5], root=root)
    assert not list(root.rglob("*.safetensors"))  # no SVD work, no cache files
    layer5.save(tmp_path / "six-moved.safetensors")
    rc, err = run_cli(svf.main, ["merge", "--model", str(tiny_folder(tmp_path / "base")), "--expert",
                                 str(tmp_path / "six-moved.safetensors"), "--out", str(tmp_path / "m"),
                                 "--root", str(root)], capsys)
    assert rc == 2 and err.count("\n") == 1 and "six-moved.safetensors: expert does not fit" in err


def test_mix_of_experts_with_other_shapes_is_one_line(tmp_path, capsys):
    a = svf.transfer(saved_expert(tiny_model(0), tmp_path, tmp_path / "a0.safetensors")[0])
    b = svf.transfer(saved_expert(tiny_model(0, hidden=48), tmp_path, tmp_path / "b0.safetensors")[0])
    a.save(tmp_path / "a.safetensors")  # both transferred ("*"): no fingerprint tells them apart
    b.save(tmp_path / "b.safetensors")
    rc, err = run_cli(svf.main, ["mix", "--experts", str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors"),
                                 "--out", str(tmp_path / "m.safetensors")], capsys)
    assert rc == 2 and err.count("\n") == 1 and "b.safetensors: model.layers.0.mlp.gate_proj.weight has shape (48,)" in err
    assert not (tmp_path / "m.safetensors").exists()


# ----------------------------------------------------------------------------- a merge per rollout is cheap (36 §2.3)

def count_hashes_and_reads(monkeypatch):
    """Count weight-sized hashes (blake2b over an array, not the short strings of a fingerprint) and
    safetensors opens of the SVD cache."""
    counts = {"hash": 0, "read": 0}
    real_hash, real_open = svd_cache.hashlib.blake2b, svd_cache.safe_open

    def blake2b(*a, **kw):
        counts["hash"] += bool(a) and not isinstance(a[0], bytes)
        return real_hash(*a, **kw)

    def safe_open(*a, **kw):
        counts["read"] += 1
        return real_open(*a, **kw)
    monkeypatch.setattr(svd_cache.hashlib, "blake2b", blake2b)
    monkeypatch.setattr(svd_cache, "safe_open", safe_open)
    return counts


def test_merge_in_a_training_loop_rehashes_and_rereads_nothing(tmp_path, monkeypatch):
    model = tiny_model()
    cache = svd_cache.load(model, "mlp", root=tmp_path)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    svf.attach(model, cache)  # reinforce.py's model: factored layers attached for the update
    zs = {n: torch.rand(cache.rank(n)) + 0.2 for n in cache.names}
    svf.set_z(model, zs)
    factored = model(ids())
    svf.set_z(model, None)
    counts = count_hashes_and_reads(monkeypatch)
    for _ in range(3):  # three rollout batches
        with svf.merged(model, zs, cache):
            torch.testing.assert_close(model(ids()), factored, atol=1e-5, rtol=1e-5)
        assert all(torch.equal(v, base[k]) for k, v in model.state_dict().items())
    assert counts == {"hash": 0, "read": 0}
    svf.detach(model)  # dispatch's way: no factored layers, the factors come from the files
    with svf.merged(model, zs, cache):
        pass
    counts.update(hash=0, read=0)
    with svf.merged(model, zs, cache):
        torch.testing.assert_close(model(ids()), factored, atol=1e-5, rtol=1e-5)
    assert counts == {"hash": 0, "read": len(zs)}
    # the in-place change of a weight outside merged() is still seen
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight[0, 0] += 1
    with pytest.raises(ValueError, match="built for base weights"):
        cache.check(model)


def test_cpu_backup_is_made_once_per_run(tmp_path, monkeypatch):
    """Where the device has no room for the backup (a GPU on 8B), the CPU copy is made once and only
    the restore is paid per merge; the restore is still bit-exact."""
    model = tiny_model()
    cache = svd_cache.load(model, "mlp", root=tmp_path)
    svf.attach(model, cache)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    monkeypatch.setattr(svf, "backup_on_device", lambda weights: False)
    copies = []
    real = svf.keep
    monkeypatch.setattr(svf, "keep", lambda W: copies.append(getattr(W, "_t2_backup", None) is None) or real(W))
    for seed in range(3):
        with svf.merged(model, {n: torch.rand(cache.rank(n)) + 0.2 for n in cache.names}, cache):
            assert not torch.equal(model.model.layers[0].mlp.up_proj.weight, base["model.layers.0.mlp.up_proj.weight"])
        assert all(torch.equal(v, base[k]) for k, v in model.state_dict().items())
    assert copies == [True] * 6 + [False] * 12  # made at the first merge only


# ----------------------------------------------------------------------------- merged folders (36 §1.5, 40 §4)

def sharded_tiny(path):
    """A random HF Llama saved in several shards with an index, as 7-8B checkpoints are."""
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, tie_word_embeddings=False, initializer_range=0.3)
    LlamaForCausalLM(cfg).save_pretrained(path, safe_serialization=True, max_shard_size="20KB")
    assert len(list(path.glob("model-*.safetensors"))) > 1 and (path / "model.safetensors.index.json").exists()
    return path


def test_merge_of_a_sharded_model_holds_only_merged_weights(tmp_path, capsys):
    from transformers import LlamaForCausalLM
    src, root, out = sharded_tiny(tmp_path / "base"), tmp_path / "cache", tmp_path / "merged"
    model = Transformer.from_pretrained(src)
    expert, cache = saved_expert(model, root, tmp_path / "e.safetensors", scale=3.0)
    (out.parent / f".{out.name}.tmp{DEAD_PID}").mkdir()  # what a killed merge left
    (out.parent / f".{out.name}.tmp{DEAD_PID}" / "model.safetensors").write_bytes(b"x" * 1000)
    svf.main(["merge", "--model", str(src), "--expert", str(tmp_path / "e.safetensors"), "--out", str(out),
              "--root", str(root)])
    weights = sorted(f.name for f in out.iterdir() if f.suffix == ".safetensors" or "index" in f.name)
    assert weights == ["model.safetensors"] and (out / "config.json").exists()
    assert sorted(f.name for f in tmp_path.iterdir() if ".tmp" in f.name) == []  # the orphan is gone
    svf.attach(model, cache)
    svf.set_z(model, expert.zs())
    x = ids(B=2, T=9)
    ours = model(x)
    with torch.no_grad():
        theirs = LlamaForCausalLM.from_pretrained(out).eval()(x).logits
    torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=1e-4)
    svf.set_z(model, None)
    assert (model(x) - ours).abs().max() > 1e-2  # the expert matters: base weights would fail the check above

    # an existing --out is refused before anything is loaded; --force replaces the model folder
    before = (out / "model.safetensors").read_bytes()
    rc, err = run_cli(svf.main, ["merge", "--model", str(src), "--expert", str(tmp_path / "e.safetensors"),
                                 "--out", str(out), "--root", str(root)], capsys)
    assert rc == 2 and f"{out}: already exists" in err and "--force" in err
    assert (out / "model.safetensors").read_bytes() == before
    (out / "stale.safetensors").write_bytes(b"x")
    svf.main(["merge", "--model", str(src), "--expert", str(tmp_path / "e.safetensors"), "--out", str(out),
              "--root", str(root), "--force"])
    assert not (out / "stale.safetensors").exists() and (out / "model.safetensors").read_bytes() == before
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("mine")
    rc, err = run_cli(svf.main, ["merge", "--model", str(src), "--expert", str(tmp_path / "e.safetensors"),
                                 "--out", str(tmp_path / "notes"), "--root", str(root), "--force"], capsys)
    assert rc == 2 and "not a model folder" in err and (tmp_path / "notes" / "todo.txt").read_text() == "mine"


def test_merge_from_a_hub_id(tmp_path, monkeypatch):
    import huggingface_hub
    src = tiny_folder(tmp_path / "snapshot")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda repo, **kw: str(src))
    monkeypatch.chdir(tmp_path)
    model = Transformer.from_pretrained("org/tiny")
    saved_expert(model, tmp_path / "cache", tmp_path / "e.safetensors")
    svf.main(["merge", "--model", "org/tiny", "--expert", str(tmp_path / "e.safetensors"), "--out",
              str(tmp_path / "merged"), "--root", str(tmp_path / "cache")])
    assert (tmp_path / "merged" / "config.json").read_text() == (src / "config.json").read_text()
    Transformer.from_pretrained(tmp_path / "merged")


def test_killed_merge_leaves_no_folder(tmp_path, monkeypatch):
    import safetensors.torch
    src = tiny_folder(tmp_path / "base")
    model = Transformer.from_pretrained(src)
    saved_expert(model, tmp_path / "cache", tmp_path / "e.safetensors")

    def killed(*a, **kw):
        raise KeyboardInterrupt  # the user's ^C while the weights are written
    monkeypatch.setattr(safetensors.torch, "save_file", killed)
    with pytest.raises(KeyboardInterrupt):
        svf.main(["merge", "--model", str(src), "--expert", str(tmp_path / "e.safetensors"),
                  "--out", str(tmp_path / "merged"), "--root", str(tmp_path / "cache")])
    assert not (tmp_path / "merged").exists() and not list(tmp_path.glob(".merged.tmp*"))


def test_lora_merge_refuses_an_existing_folder(tmp_path, capsys):
    src = tiny_folder(tmp_path / "base")
    model = Transformer.from_pretrained(src)
    lora.Adapter.new(lora.init_params(model, lora.target_names(model, "qv"), rank=2), model).save(tmp_path / "a.safetensors")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "config.json").write_text("{}")
    rc, err = run_cli(lora.main, ["merge", "--model", str(src), "--adapter", str(tmp_path / "a.safetensors"),
                                  "--out", str(tmp_path / "out")], capsys)
    assert rc == 2 and "already exists" in err and (tmp_path / "out" / "config.json").read_text() == "{}"
    lora.main(["merge", "--model", str(src), "--adapter", str(tmp_path / "a.safetensors"),
               "--out", str(tmp_path / "out"), "--force"])
    assert json.loads((tmp_path / "out" / "config.json").read_text())["model_type"] == "llama"


def test_expert_and_adapter_files_are_not_overwritten(tmp_path, capsys):
    """svf.py init / mix and lora.py init refuse an existing --out (40 §4) and --force replaces it."""
    src = tiny_folder(tmp_path / "base")
    model = Transformer.from_pretrained(src)
    files = [tmp_path / f"e{k}.safetensors" for k in range(2)]
    for f in files:
        saved_expert(model, tmp_path / "cache", f)
    out = tmp_path / "taken.safetensors"
    for main, argv in [
            (svf.main, ["init", "--model", str(src), "--root", str(tmp_path / "cache")]),
            (svf.main, ["mix", "--experts", *map(str, files)]),
            (lora.main, ["init", "--model", str(src)])]:
        out.write_bytes(b"someone's file")
        rc, err = run_cli(main, [*argv, "--out", str(out)], capsys)
        assert rc == 2 and f"{out}: already exists" in err and out.read_bytes() == b"someone's file"
        main([*argv, "--out", str(out), "--force"])
        assert out.read_bytes() != b"someone's file"


# ============================================================================= script arguments

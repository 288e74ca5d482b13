"""The device paths, run on the CPU by CI and on a GPU whenever one is present (`make gpu-check`).

Every test here is one body parametrized over where it runs: `cpu-fp32` and `cpu-bf16` always,
`cuda-fp32` and `cuda-bf16` skipped (with the reason) without CUDA. So CI runs, on the CPU, the very
code a user's first GPU day runs, through the scripts' own argument parsers (reinforce.get_args,
cem.get_args): a renamed flag or a changed output file fails CI, not the GPU day. With CUDA,
conftest.py leaves TRITON_INTERPRET unset, so the Triton kernel is compiled for real.

Each run is compared with a reference, never a range:
  - forward logits: `transformers` in fp32 on the CPU (the oracle);
  - one REINFORCE update (reinforce.main, greedy rollouts) and a CEM search (cem.main, a seeded
    population): the same command on the CPU in fp32, compared through the files they write
    (last.safetensors, metrics.jsonl; alpha.json, per-item verdicts, adapted.safetensors);
  - rows routed to different experts in one batch: each row's expert merged into the weights alone;
  - 2 ranks under torchrun (gloo on the CPU, NCCL on 2 GPUs): the single-process CPU run.
Tolerances. fp32 against fp32: relative error of the logits < 1e-5, θ within 1e-5 (different
reduction orders only; TF32 is off for matmuls by default). bf16 (8 mantissa bits, eps 7.8e-3): our
logits are no further from the fp32 oracle than twice transformers' own bf16 logits are (3-4% on a
CPU: these tiny models have large random weights);
one Adam step moves each θ by ±lr (the sign of its gradient), so θ after a bf16 update equals the fp32
one except where bf16 noise flips the sign of a small gradient component: ≥ 75% of θ equal (0-16% flip
per matrix on a CPU in bf16), with the same rollout counts and rewards, the policy loss within 2% and
|g| within 10% (4% on a CPU). CEM's verdicts hinge on exact greedy tokens, which bf16 may change, so
the search is compared with the CPU in fp32 only.
    .venv/bin/python -m pytest -q tests/test_cuda.py
"""
import json
import os
import subprocess
import sys
from argparse import Namespace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
NO_CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (runs on the CPU params)")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def where(device, dtype):
    return pytest.param((device, dtype), id=f"{device}-{dtype}", marks=[NO_CUDA] if device == "cuda" else [])


ALL = [where("cpu", "fp32"), where("cpu", "bf16"), where("cuda", "fp32"), where("cuda", "bf16")]
FP32 = [where("cpu", "fp32"), where("cuda", "fp32")]


def rel_err(a, b):
    return ((a.float().cpu() - b.float().cpu()).norm() / b.float().cpu().norm()).item()


def assert_logits_match(got, want, dtype, bf16_ref=None):
    """got: ours on the device; want: the fp32 oracle; bf16_ref: transformers' own bf16 logits."""
    err = rel_err(got, want)
    if dtype == "fp32":
        assert err < 1e-5, err
        assert torch.equal(got.argmax(-1).cpu(), want.argmax(-1).cpu())
    else:
        assert err <= 2 * rel_err(bf16_ref, want), (err, rel_err(bf16_ref, want))
        assert (got.argmax(-1).cpu() == want.argmax(-1).cpu()).float().mean() >= 0.9


# ---------------------------------------------------------------- forward passes vs transformers

@pytest.mark.parametrize("run", ALL)
def test_model_forward_matches_transformers(tiny_dir, run):
    from transformers import AutoModelForCausalLM

    from model import Transformer
    device, dtype = run
    ours = Transformer.from_pretrained(tiny_dir, dtype=DTYPES[dtype], device=device)
    ref = AutoModelForCausalLM.from_pretrained(tiny_dir, torch_dtype=torch.float32).eval()
    ids = torch.randint(0, 49152, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got = ours(ids.to(device))  # unpadded forward: no mask conventions involved
        want = ref(ids).logits
        bf16 = ref.to(device, torch.bfloat16)(ids.to(device)).logits if dtype == "bf16" else None
    assert got.device.type == device and next(ours.parameters()).dtype == DTYPES[dtype]
    assert_logits_match(got, want, dtype, bf16)


@pytest.mark.parametrize("run", ALL)
def test_vlm_forward_matches_transformers(smollm2_dir, tmp_path, run):
    from test_vlm import IMAGE_TOKEN, photo, save_tiny

    import vlm
    device, dtype = run
    hf = save_tiny(tmp_path, "llava_next", smollm2_dir).float().eval()
    ours = vlm.LLaVA.from_pretrained(tmp_path, dtype=DTYPES[dtype], device=device)
    pre = vlm.Preprocessor.from_pretrained(tmp_path)
    ids, [im] = vlm.prepare(ours, None, [1, 504, 30, IMAGE_TOKEN, 198, 3300, 314, 253],
                            [photo("chelsea").resize((70, 40))], pre)
    ids_t = torch.tensor([ids])

    def theirs(device, dt):
        return hf.to(device, dt)(input_ids=ids_t.to(device), pixel_values=im["pixels"][None].to(device, dt),
                                 image_sizes=torch.tensor([im["size"]], device=device)).logits
    with torch.no_grad():
        got = ours(ids_t.to(device), [im])  # pixels are preprocessed on the CPU; image_features moves them
        want = theirs("cpu", torch.float32)
        bf16 = theirs(device, torch.bfloat16) if dtype == "bf16" else None
    assert_logits_match(got, want, dtype, bf16)


# ---------------------------------------------------------------- reinforce.py: one update

def reinforce_argv(tiny_dir, out, device, dtype):
    """One greedy REINFORCE update with validation before and after, through reinforce.py's parser."""
    return ["--task", "gsm8k", "--model", str(tiny_dir), "--out", str(out), "--batch-size", "4",
            "--micro-batch", "2", "--slots", "4", "--max-new-tokens", "6", "--steps", "1", "--eval-every", "1",
            "--valid-limit", "4", "--kl-coef", "0", "--temperature", "0", "--lr", "0.1", "--threads", "1",
            "--device", device, "--dtype", dtype]


def run_reinforce(tiny_dir, out, device, dtype):
    import reinforce
    reinforce.main(reinforce.get_args(reinforce_argv(tiny_dir, out, device, dtype)))
    return out


def last_metrics(out):
    return json.loads((Path(out) / "metrics.jsonl").read_text().splitlines()[-1])


@pytest.fixture(scope="module")
def cache_env(tmp_path_factory):
    """One SVD cache folder for every run in this file (T2_CACHE; subprocesses inherit it)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("T2_CACHE", str(tmp_path_factory.mktemp("cache")))
        yield


@pytest.fixture(scope="module")
def reinforce_ref(tiny_dir, tmp_path_factory, cache_env):
    """The reference update: CPU, fp32, one process."""
    return run_reinforce(tiny_dir, tmp_path_factory.mktemp("reinforce-ref"), "cpu", "fp32")


@pytest.mark.parametrize("run", ALL)
def test_one_reinforce_update_equals_cpu_fp32(tiny_dir, tmp_path, reinforce_ref, run):
    """Rollouts, rewards, the kernel's backward, Adam, validation and the expert files on the device,
    against the same command on the CPU in fp32."""
    import svf
    device, dtype = run
    out = run_reinforce(tiny_dir, tmp_path / "run", device, dtype)
    a, b = load_file(out / "last.safetensors"), load_file(reinforce_ref / "last.safetensors")
    m, ref = last_metrics(out), last_metrics(reinforce_ref)
    assert a.keys() == b.keys() and m["step"] == ref["step"] == 1 and m["valid_n"] == ref["valid_n"] == 4
    init = svf.init_theta(Namespace(names=list(b), rank=lambda n: b[n].numel()), seed=0)  # θ before the update
    assert all(not torch.allclose(b[n], init[n]) for n in b)  # the reference moved every matrix: a real comparison
    for k in ("rollouts", "gen_tokens", "reward", "train_acc", "valid_acc"):  # the greedy rollouts' counts
        assert m[k] == ref[k], k
    if dtype == "fp32":
        for n in a:
            torch.testing.assert_close(a[n], b[n], atol=1e-5, rtol=0)
        assert m["grad_norm"] == pytest.approx(ref["grad_norm"], rel=1e-4)
        assert m["pg_loss"] == pytest.approx(ref["pg_loss"], rel=1e-5)
    else:  # one Adam step moves each θ by ±lr, the sign of its gradient. bf16 flips the sign of small
        # components and can change greedy tokens of this random model (the counts above stay equal), so a
        # majority of θ agrees, not all: measured 72-84% on the CPU; a wrong gradient agrees on half.
        same = torch.cat([((a[n] - b[n]).abs() < 1e-3).flatten() for n in a]).float().mean()
        assert same >= 0.65, float(same)
        assert m["pg_loss"] == pytest.approx(ref["pg_loss"], rel=5e-2)  # measured 0.5-2.7% off
        assert m["grad_norm"] == pytest.approx(ref["grad_norm"], rel=1e-1)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs (runs with 2 gloo CPU ranks)"))])
def test_two_ranks_equal_one_process(tiny_dir, tmp_path, reinforce_ref, device):
    """torchrun with 2 ranks (gloo on the CPU, NCCL on 2 GPUs, fp32) reaches the θ of one CPU process."""
    two = tmp_path / "two"
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29535",
                        "reinforce.py", *reinforce_argv(tiny_dir, two, device, "fp32")], cwd=ROOT,
                       env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    a, b = load_file(reinforce_ref / "last.safetensors"), load_file(two / "last.safetensors")
    assert a.keys() == b.keys()
    for n in a:  # fp32 on both sides; the kernel's fp32 dots are IEEE ("ieee" input precision)
        torch.testing.assert_close(b[n], a[n], atol=1e-5 if device == "cuda" else 1e-6, rtol=0)
    ma, mb = last_metrics(reinforce_ref), last_metrics(two)
    assert ma["reward"] == mb["reward"] and ma["gen_tokens"] == mb["gen_tokens"] and ma["valid_n"] == mb["valid_n"] == 4
    assert mb["grad_norm"] == pytest.approx(ma["grad_norm"], rel=1e-5)


# ---------------------------------------------------------------- cem.py: a seeded search

@pytest.fixture(scope="module")
def expert_paths(tiny_dir, tmp_path_factory, cache_env):
    """Three random experts of the tiny model (the SVD of its weights, on the CPU)."""
    import svd_cache
    from model import Transformer
    from test_cem import random_experts
    model = Transformer.from_pretrained(tiny_dir)
    folder = tmp_path_factory.mktemp("experts")
    paths = [str(folder / f"e{i}.safetensors") for i in range(3)]
    for p, e in zip(paths, random_experts(model, svd_cache.load(model, "mlp"))):
        e.save(p)
    return paths


def run_cem(tiny_dir, experts, out, device, dtype):
    """Two generations of 6 members on 4 shots (parity: a verdict that varies with the text), the
    found α reported on 4 more items, through cem.py's parser."""
    import cem
    from test_cem import TASKS  # noqa: F401 (registers the "parity" task)
    cem.main(cem.get_args(["--task", "parity", "--model", str(tiny_dir), "--experts", *experts, "--shots", "4",
                           "--limit", "4", "--generations", "2", "--population", "6", "--elites", "3",
                           "--max-new-tokens", "5", "--slots", "24", "--threads", "1", "--out", str(out),
                           "--device", device, "--dtype", dtype]))
    verdicts = {n: [json.loads(x)["correct"] for x in (out / f"{n}.jsonl").read_text().splitlines()]
                for n in ("cem", "base", "uniform")}
    return json.loads((out / "alpha.json").read_text()), verdicts, load_file(out / "adapted.safetensors")


@pytest.fixture(scope="module")
def cem_ref(tiny_dir, expert_paths, tmp_path_factory):
    return run_cem(tiny_dir, expert_paths, tmp_path_factory.mktemp("cem-ref"), "cpu", "fp32")


@pytest.mark.parametrize("run", FP32)
def test_cem_search_equals_cpu_fp32(tiny_dir, expert_paths, tmp_path, cem_ref, run):
    """The population's fitness (rows carrying their member's z through the engine and the kernel),
    the ranking it gives, the found α and its report: the same as the CPU fp32 run."""
    alpha, verdicts, adapted = run_cem(tiny_dir, expert_paths, tmp_path / "out", *run)
    ref_alpha, ref_verdicts, ref_adapted = cem_ref
    assert len({h["best_acc"] for h in ref_alpha["history"]} | {h["mean_acc"] for h in ref_alpha["history"]}) > 1
    for h, r in zip(alpha["history"], ref_alpha["history"]):
        assert h["best_acc"] == r["best_acc"] and h["mean_acc"] == r["mean_acc"]
        assert h["best_ll"] == pytest.approx(r["best_ll"], rel=1e-4)
    assert alpha["alpha"] == pytest.approx(ref_alpha["alpha"], abs=1e-6) and alpha["shots"] == ref_alpha["shots"]
    assert verdicts == ref_verdicts
    for n in ref_adapted:
        torch.testing.assert_close(adapted[n], ref_adapted[n], atol=1e-6, rtol=0)


# ---------------------------------------------------------------- routed rows: one batch, several experts

@pytest.mark.parametrize("run", ALL)
def test_routed_rows_equal_each_expert_merged(tiny_dir, expert_paths, run):
    """Rows on different experts in one batch (svf.set_z with (B, r) z's, through the kernel on a GPU)
    give each row the logits of its expert merged into the weights alone (CPU fp32, svf.merged); the
    "other" row runs on W itself: the base model's logits."""
    import svd_cache
    import svf
    from model import Transformer
    device, dtype = run
    experts = [svf.Expert.load(p) for p in expert_paths]
    route = [experts[0], None, experts[1], experts[2]]  # row 1: "other", the base weights
    ids = torch.randint(0, 49152, (len(route), 16), generator=torch.Generator().manual_seed(1))
    ref_model = Transformer.from_pretrained(tiny_dir)
    want = []
    with torch.no_grad():
        for b, e in enumerate(route):
            if e is None:
                want.append(ref_model(ids[b:b + 1])[0])
            else:
                with svf.merged(ref_model, e):
                    want.append(ref_model(ids[b:b + 1])[0])
    model = Transformer.from_pretrained(tiny_dir, dtype=DTYPES[dtype], device=device)
    cache = svd_cache.load(model, "mlp")
    svf.attach(model, cache)
    zs = {n: torch.stack([(e or experts[0]).z(n) for e in route]).to(device) for n in cache.names}
    bf16 = None
    with torch.no_grad():
        svf.set_z(model, zs, rescale=experts[0].rescale, base_rows=[e is None for e in route])
        got = model(ids.to(device))
        svf.set_z(model, None)
        if dtype == "bf16":  # transformers' bf16 logits of the base row: the bf16 noise floor
            from transformers import AutoModelForCausalLM
            hf = AutoModelForCausalLM.from_pretrained(tiny_dir, torch_dtype=torch.bfloat16).to(device)
            bf16 = hf(ids[1:2].to(device)).logits[0]
    svf.detach(model)
    assert rel_err(want[0], want[1]) > 5e-2  # an expert row really differs from the base row
    for b in range(len(route)):
        if dtype == "fp32":
            assert rel_err(got[b], want[b]) < 1e-5, b
        else:  # bf16 factored path against merged fp32 weights: within the base model's own bf16 noise, ×2
            assert rel_err(got[b], want[b]) <= max(2 * rel_err(bf16, want[1]), 1e-3), b

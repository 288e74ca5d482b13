"""The CUDA paths: skipped without a GPU, run whenever one is present (`make test` on a GPU box).

CI has no GPU, so these are the only checks of what a user's first GPU run does: bf16 weights,
tensors on the right device, NCCL all-reduces, the Triton kernel compiled for real (conftest.py
leaves TRITON_INTERPRET unset when CUDA is present). Tiny random models (conftest.py's tiny_dir).
Tolerances, bf16 vs bf16: relative Frobenius error of the logits < 2e-2 (bf16 has 8 mantissa bits,
eps 7.8e-3; two implementations round in different places over 2 layers), and argmax agreement on
≥ 90% of positions.
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

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

ROOT = Path(__file__).resolve().parents[1]
BF16 = torch.bfloat16


def rel_err(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def assert_logits_close(ours, ref):
    assert rel_err(ours, ref) < 2e-2, rel_err(ours, ref)
    assert (ours.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.9


def test_model_forward_bf16_matches_transformers_bf16(tiny_dir):
    from transformers import AutoModelForCausalLM

    from model import Transformer
    ours = Transformer.from_pretrained(tiny_dir, dtype=BF16, device="cuda")
    ref = AutoModelForCausalLM.from_pretrained(tiny_dir, torch_dtype=BF16).cuda().eval()
    ids = torch.randint(0, 49152, (2, 24), generator=torch.Generator().manual_seed(0)).cuda()
    with torch.no_grad():
        got, want = ours(ids), ref(ids).logits  # unpadded forward: no mask conventions involved
    assert got.device.type == "cuda"
    assert_logits_close(got, want)


def test_vlm_forward_bf16_matches_transformers_bf16(smollm2_dir, tmp_path):
    from test_vlm import IMAGE_TOKEN, photo, save_tiny

    import vlm
    hf = save_tiny(tmp_path, "llava_next", smollm2_dir).to("cuda", BF16)
    ours = vlm.LLaVA.from_pretrained(tmp_path, dtype=BF16, device="cuda")
    pre = vlm.Preprocessor.from_pretrained(tmp_path)
    ids, [im] = vlm.prepare(ours, None, [1, 504, 30, IMAGE_TOKEN, 198, 3300, 314, 253], [photo("chelsea").resize((70, 40))], pre)
    ids_t = torch.tensor([ids], device="cuda")
    with torch.no_grad():
        got = ours(ids_t, [im])  # pixels are preprocessed on the CPU; image_features moves them
        want = hf(input_ids=ids_t, pixel_values=im["pixels"][None].to("cuda", BF16),
                  image_sizes=torch.tensor([im["size"]], device="cuda")).logits
    assert_logits_close(got, want)


def test_one_reinforce_update_bf16(tiny_dir, tmp_path):
    """One update end to end on the GPU in bf16: rollouts, rewards indexed by device rows, the
    kernel's backward, validation counts, checkpoint and expert files."""
    import reinforce
    out = tmp_path / "run"
    args = reinforce.get_args(["--task", "gsm8k", "--model", str(tiny_dir), "--out", str(out), "--batch-size", "4",
                               "--micro-batch", "2", "--slots", "4", "--max-new-tokens", "6", "--steps", "1",
                               "--eval-every", "1", "--valid-limit", "4", "--kl-coef", "0.1", "--temperature", "1.0",
                               "--lr", "1e-1", "--device", "cuda", "--dtype", "bf16"])
    st = reinforce.main(args)
    m = st["metrics"][-1]
    assert st["step"] == 1 and m["grad_norm"] > 0 and m["valid_n"] == 4
    import svf
    theta = svf.Expert.load(out / "last.safetensors").theta  # in model order, as init_theta draws
    init = svf.init_theta(Namespace(names=list(theta), rank=lambda n: theta[n].numel()), seed=0)
    assert all(not torch.allclose(theta[n], init[n]) for n in theta)  # every θ moved (lr 0.1)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_two_nccl_ranks_equal_one_process(tiny_dir, tmp_path):
    """torchrun with 2 GPUs (NCCL) reaches the θ of one process on one GPU, within bf16 noise."""
    env = dict(os.environ, T2_CACHE=str(tmp_path / "cache"))
    common = ["--task", "gsm8k", "--model", str(tiny_dir), "--batch-size", "4", "--micro-batch", "2",
              "--slots", "4", "--max-new-tokens", "6", "--steps", "1", "--eval-every", "1",
              "--valid-limit", "4", "--kl-coef", "0.1", "--temperature", "0", "--device", "cuda", "--dtype", "fp32"]
    one = subprocess.run([sys.executable, "reinforce.py", *common, "--out", str(tmp_path / "one")], cwd=ROOT,
                         env=env, capture_output=True, text=True)
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29535",
                          "reinforce.py", *common, "--out", str(tmp_path / "two")], cwd=ROOT, env=env,
                         capture_output=True, text=True)
    assert two.returncode == 0, two.stderr[-2000:]
    from safetensors.torch import load_file
    a, b = load_file(tmp_path / "one" / "last.safetensors"), load_file(tmp_path / "two" / "last.safetensors")
    for n in a:  # fp32 on both sides; the kernel's fp32 dots are IEEE ("ieee" input precision)
        torch.testing.assert_close(a[n], b[n], atol=1e-5, rtol=0)
    ma = json.loads((tmp_path / "one" / "metrics.jsonl").read_text().splitlines()[-1])
    mb = json.loads((tmp_path / "two" / "metrics.jsonl").read_text().splitlines()[-1])
    assert ma["reward"] == mb["reward"] and ma["valid_n"] == mb["valid_n"] == 4


@pytest.fixture(scope="module")
def gpu_tiny(tiny_dir, tmp_path_factory):
    """The tiny model in bf16 on the GPU, its tokenizer, SVD cache and three random experts."""
    import svd_cache
    import svf
    from generate import Tokenizer
    from model import Transformer
    model = Transformer.from_pretrained(tiny_dir, dtype=BF16, device="cuda")
    cache = svd_cache.load(model, "mlp", root=tmp_path_factory.mktemp("cache"))
    g = torch.Generator().manual_seed(0)
    experts = [svf.Expert.new({n: 2 * torch.randn(cache.rank(n), generator=g) for n in cache.names}, model, cache)
               for _ in range(3)]
    svf.attach(model, cache)
    return model, Tokenizer.from_pretrained(tiny_dir), cache, experts


def test_one_cem_generation_on_gpu(gpu_tiny):
    import cem
    from evals import get_task
    model, tok, _, experts = gpu_tiny
    task = get_task("gsm8k")
    shots = task.load("test")[:3]
    args = Namespace(population=4, elites=2, init_std=0.5, generations=1, normalize=False, seed=0, mode="z",
                     rescale=True, slots=12, max_new_tokens=4)
    fitness = lambda pop: cem.sharded_fitness(model, tok, task, shots, experts, pop, args)  # noqa: E731
    best, history = cem.cem(fitness, (3,), args, log=lambda *_: None)
    assert best.shape == (3,) and len(history) == 1 and 0 <= history[0]["best_acc"] <= 1


def test_one_routed_dispatch_batch_on_gpu(gpu_tiny):
    """Rows on different experts in one bf16 batch through the compiled kernel; "other" rows run on
    W itself, so their logits equal the unadapted model's up to bf16 GEMM-shape noise."""
    import dispatch
    import svf
    from evals import get_task
    model, tok, cache, experts = gpu_tiny
    by_cat = dict(zip(("math", "code", "reasoning"), experts))
    cats = ["math", "other", "code", "reasoning"]
    task = get_task("gsm8k")
    items = task.load("test")[:len(cats)]
    args = Namespace(slots=len(cats), max_new_tokens=4)
    records = dispatch.pass2(model, tok, task, items, cats, by_cat, cache, args)
    assert len(records) == len(cats) and all(isinstance(r["completion"], str) for r in records)
    ids = torch.randint(0, 49152, (len(cats), 16), generator=torch.Generator().manual_seed(1)).cuda()
    with torch.no_grad():
        svf.set_z(model, None)
        base = model(ids)
        svf.set_z(model, dispatch.row_zs(by_cat, cats, cache), rescale=False,
                  base_rows=[c not in by_cat for c in cats])
        routed = model(ids)
        svf.set_z(model, None)
    assert rel_err(routed[1], base[1]) < 1e-2                       # "other": the base weights
    assert rel_err(routed[0], base[0]) > 5e-2                       # an expert row really differs

"""reinforce.py: the update moves log-probabilities the right way on the real model; KL is zero
at a uniform z; a SIGKILLed run resumes to the same result; 2 gloo ranks = 1 process."""
import json
import os
import signal
import subprocess
import sys
import time
from argparse import Namespace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import reinforce  # noqa: E402
import svd_cache  # noqa: E402
import svf  # noqa: E402
from evals import TASKS  # noqa: E402
from evals.gsm8k import GSM8K  # noqa: E402
from generate import Tokenizer, score  # noqa: E402
from model import Transformer  # noqa: E402


class Parity(GSM8K):
    """Real GSM8K prompts; 'correct' iff the completion has an even number of characters, so a
    tiny random model gets both verdicts and its validation accuracy moves with θ."""

    def check(self, items, completions):
        return [len(c) % 2 == 0 for c in completions]


TASKS["parity"] = Parity("parity", splits=("train", "valid", "test"), max_new_tokens=6)


def tiny_args(tiny_dir, out, **kw):
    argv = ["--task", "gsm8k", "--model", str(tiny_dir), "--out", str(out), "--batch-size", "4",
            "--micro-batch", "2", "--slots", "4", "--max-new-tokens", "6", "--steps", "3",
            "--eval-every", "2", "--valid-limit", "4", "--kl-coef", "0.1", "--temperature", "1.0",
            "--threads", "1", "--device", "cpu"]  # gloo on the CPU, also on a GPU machine
    for k, v in kw.items():
        argv += [f"--{k.replace('_', '-')}", str(v)]
    return argv


def thetas(path):
    return load_file(path)


def test_unknown_task_lists_known_ones(tmp_path):
    with pytest.raises(ValueError, match=r"unknown task 'poetry' \(known: .*gsm8k.*\)"):
        reinforce.main(reinforce.get_args(["--task", "poetry", "--out", str(tmp_path)]))


@pytest.fixture(scope="module")
def real(smollm2_dir):
    model = Transformer.from_pretrained(smollm2_dir)
    tok = Tokenizer.from_pretrained(smollm2_dir)
    cache = svd_cache.load(model, "mlp")
    svf.attach(model, cache)
    yield model, tok, cache
    svf.detach(model)


@pytest.mark.parametrize("reward", [+1.0, -1.0])
def test_one_update_moves_logprob_the_right_way(real, reward):
    model, tok, cache = real
    prompt = tok.encode(tok.apply_chat_template([{"role": "user", "content": "What is 7 plus 5?"}]))
    answer = tok.encode("7 plus 5 is 12.")
    theta = {n: t.requires_grad_(True) for n, t in svf.init_theta(cache, seed=0).items()}
    args = Namespace(parametrization="sigmoid", kl_coef=0.0, kl_direction="paper", adapter="svf")

    def logp():
        with torch.no_grad():
            svf.set_z(model, {n: svf.theta_to_z(t) for n, t in theta.items()})
            return float(score(model, [prompt], [answer])[0][0])
    before = logp()
    opt = torch.optim.Adam(theta.values(), lr=2e-3)
    reinforce.policy_loss(model, theta, [prompt], [answer], [reward], 1, args)[0].backward()
    torch.nn.utils.clip_grad_norm_(theta.values(), 1e-3)
    opt.step()
    after = logp()
    svf.set_z(model, None)
    assert (after - before) * reward > 0.01, (before, after)


def test_kl_is_zero_at_uniform_z(real):
    model, tok, cache = real
    prompt = tok.encode(tok.apply_chat_template([{"role": "user", "content": "Name a colour."}]))
    answer = tok.encode("Blue is a colour.")
    theta = {n: torch.full((cache.rank(n),), 0.3, requires_grad=True) for n in cache.names}
    for direction in ("paper", "official"):
        args = Namespace(parametrization="sigmoid", kl_coef=1.0, kl_direction=direction, adapter="svf")
        _, _, kl = reinforce.policy_loss(model, theta, [prompt], [answer], [1.0], 1, args)
        assert abs(kl) < 1e-4, (direction, kl)
    # ...and clearly positive away from uniform: the test can fail
    theta = {n: 0.3 + torch.randn(cache.rank(n), generator=torch.Generator().manual_seed(0)) for n in cache.names}
    theta = {n: t.requires_grad_(True) for n, t in theta.items()}
    _, _, kl = reinforce.policy_loss(model, theta, [prompt], [answer], [1.0], 1, args)
    svf.set_z(model, None)
    assert kl > 1e-3


def test_kl_directions_against_torch_kl_div():
    """paper KL(π′‖π) and official KL(π‖π′), on random log-probabilities, against F.kl_div
    (which computes KL(target‖input) from log-probabilities with log_target=True)."""
    g = torch.Generator().manual_seed(0)
    logp = torch.randn(5, 7, 11, generator=g).mul(2).log_softmax(-1)     # π′: the adapted policy
    ref = torch.randn(5, 7, 11, generator=g).mul(2).log_softmax(-1)      # π: the base policy
    paper = F.kl_div(ref, logp, log_target=True, reduction="none").sum(-1)     # KL(π′‖π)
    official = F.kl_div(logp, ref, log_target=True, reduction="none").sum(-1)  # KL(π‖π′)
    torch.testing.assert_close(reinforce.kl_per_token(logp, ref, "paper"), paper)
    torch.testing.assert_close(reinforce.kl_per_token(logp, ref, "official"), official)
    assert (paper - official).abs().min() > 1e-3  # the two directions really differ here


def test_leave_one_out_baseline_by_hand():
    # two prompts x 3 answers: [+1, -1, -1] and [+1, +1, +1]
    r = [1.0, -1.0, -1.0, 1.0, 1.0, 1.0]
    assert reinforce.advantages(r, 3, None) == r  # the paper: the reward itself
    # prompt 1: 1 - (-1 - 1)/2 = 2, -1 - (1 - 1)/2 = -1, same for the third; prompt 2: no contrast
    assert reinforce.advantages(r, 3, "loo") == [2.0, -1.0, -1.0, 0.0, 0.0, 0.0]
    with pytest.raises(ValueError, match="needs --samples 2"):
        reinforce.main(reinforce.get_args(["--task", "gsm8k", "--out", "/tmp/x", "--baseline", "loo"]))


def test_cut_reward_scores_unfinished_answers_apart():
    args = reinforce.get_args(["--task", "gsm8k", "--out", "/tmp/x", "--wrong-reward", "0", "--cut-reward", "-1"])
    # (right, cut): right and finished, wrong and finished, cut with a lucky number, cut and wrong
    answers = [(True, False), (False, False), (True, True), (False, True)]
    assert [reinforce.reward(c, k, args) for c, k in answers] == [1.0, 0.0, -1.0, -1.0]
    # unset, a cut answer is scored like any other (the paper)
    paper = reinforce.get_args(["--task", "gsm8k", "--out", "/tmp/x"])
    assert [reinforce.reward(c, k, paper) for c, k in answers] == [1.0, -1.0, 1.0, -1.0]
    # one question, 4 answers [1, 0, -1, -1]: leave-one-out 1 - (-2)/3, 0 - (-1)/3, -1 - 0/3, -1 - 0/3
    r = [reinforce.reward(c, k, args) for c, k in answers]
    assert reinforce.advantages(r, 4, "loo") == pytest.approx([5 / 3, 1 / 3, -1.0, -1.0])


def test_batches_are_without_replacement():
    seen = [i for step in range(5) for i in reinforce.batch_indices(step, 10, 4, seed=1)]
    assert sorted(seen[:8]) == sorted(set(seen[:8]))  # first 8 draws: no repeats within the epoch
    assert sorted(seen[:10]) == list(range(10))       # one epoch covers every item once
    assert reinforce.batch_indices(3, 10, 4, 1) == reinforce.batch_indices(3, 10, 4, 1)


def test_sigkill_then_resume_equals_uninterrupted(tiny_dir, tmp_path):
    env = dict(os.environ, T2_CACHE=str(tmp_path / "cache"))
    full = tmp_path / "full"
    subprocess.run([sys.executable, "reinforce.py", *tiny_args(tiny_dir, full, steps=4)], cwd=ROOT, env=env, check=True,
                   capture_output=True)
    cut = tmp_path / "cut"
    proc = subprocess.Popen([sys.executable, "reinforce.py", *tiny_args(tiny_dir, cut, steps=4)], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline:  # kill it once update 1 is checkpointed, mid-way through the run
        m = cut / "metrics.jsonl"
        if m.exists() and any(json.loads(line)["step"] >= 1 for line in m.read_text().splitlines()):
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    state = torch.load(cut / "state.pt", weights_only=False)
    assert 1 <= state["step"] < 4, state["step"]  # killed mid-run: --resume has updates left to redo
    subprocess.run([sys.executable, "reinforce.py", *tiny_args(tiny_dir, cut, steps=4), "--resume"], cwd=ROOT, env=env,
                   check=True, capture_output=True)
    a, b = thetas(full / "last.safetensors"), thetas(cut / "last.safetensors")
    assert a.keys() == b.keys()
    for n in a:
        assert torch.equal(a[n], b[n]), n
    init = svf.init_theta(svd_cache.load(Transformer.from_pretrained(tiny_dir), "mlp", root=tmp_path / "cache"))
    assert any(not torch.allclose(a[n], init[n]) for n in a)  # it did train
    ma = [json.loads(line) for line in (full / "metrics.jsonl").read_text().splitlines()]
    mb = [json.loads(line) for line in (cut / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in ma] == [m["step"] for m in mb] == [0, 1, 2, 3, 4]
    assert (full / "best.safetensors").exists() and (full / "curve.png").exists()
    meta = safe_open(full / "best.safetensors", "pt").metadata()
    assert meta["task"] == "gsm8k" and meta["lr"] == "0.002" and "valid_acc" in meta


@pytest.mark.parametrize("sampled", [False, True])
def test_two_gloo_ranks_equal_one_process(tiny_dir, tmp_path, sampled):
    env = dict(os.environ, T2_CACHE=str(tmp_path / "cache"), OMP_NUM_THREADS="1")
    one, two = tmp_path / "one", tmp_path / "two"
    common = dict(steps=1, eval_every=1, temperature=0.0)
    script = "reinforce.py"
    if sampled:  # each rank answers whole questions; the engine seeds a question's samples by its place in
        # the update, not by the rank, so both runs draw the same answers; sampled answers to the parity
        # task get mixed verdicts, so the leave-one-out weights are not all zero and a real gradient is compared
        common = dict(steps=1, eval_every=1, temperature=1.0, samples=2, baseline="loo", kl_coef=0, task="parity",
                      batch_size=8, slots=8)
        script = __file__
    subprocess.run([sys.executable, script, *tiny_args(tiny_dir, one, **common)], cwd=ROOT, env=env,
                   check=True, capture_output=True)
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29533",
                        script, *tiny_args(tiny_dir, two, **common)], cwd=ROOT, env=env, capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    a, b = thetas(one / "last.safetensors"), thetas(two / "last.safetensors")
    for n in a:
        assert torch.allclose(a[n], b[n], atol=1e-7, rtol=0), n
    ma = json.loads((one / "metrics.jsonl").read_text().splitlines()[-1])
    mb = json.loads((two / "metrics.jsonl").read_text().splitlines()[-1])
    assert ma["reward"] == mb["reward"] and abs(ma["kl"] - mb["kl"]) < 1e-6
    if sampled:
        assert ma["mixed"] == mb["mixed"] > 0, ma  # some prompts had a right and a wrong answer
        assert ma["pg_loss"] == pytest.approx(mb["pg_loss"], rel=1e-5) and ma["grad_norm"] > 0
        init = svf.init_theta(svd_cache.load(Transformer.from_pretrained(tiny_dir), "mlp", root=tmp_path / "cache"))
        assert any(not torch.allclose(a[n], init[n]) for n in a)  # θ moved: the gradient was not zero


def test_patience_stops_and_best_is_the_best_validation(tiny_dir, tmp_path, monkeypatch):
    """--patience 2: training stops after two validations without a strict improvement, and
    best.safetensors is the expert of the best (first best, on ties) validation in metrics.jsonl."""
    monkeypatch.setenv("T2_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "run"
    st = reinforce.main(reinforce.get_args(tiny_args(tiny_dir, out, task="parity", steps=12, eval_every=1,
                                                     valid_limit=8, patience=2, lr=1.0, optimizer="adam")))
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    accs = [m["valid_acc"] for m in metrics]
    best = max(range(len(accs)), key=lambda i: (accs[i], -i))  # the first of the best
    assert 0 < best < len(accs) - 1, accs  # validation improved, then fell: "best" is neither the first nor the last
    assert len(metrics) == best + 3 < 13, accs  # two validations after the best, then the stop
    assert all(a <= accs[best] for a in accs[best + 1:]) and st["best"] == accs[best]
    meta = safe_open(out / "best.safetensors", "pt").metadata()
    assert int(meta["step"]) == metrics[best]["step"] and float(meta["valid_acc"]) == pytest.approx(accs[best])
    last = safe_open(out / "last.safetensors", "pt").metadata()
    assert int(last["step"]) == metrics[-1]["step"] == best + 2
    b, l = thetas(out / "best.safetensors"), thetas(out / "last.safetensors")
    assert any(not torch.equal(b[n], l[n]) for n in b)  # the best expert is not the last one



def test_shuffle_options_reaches_the_rollouts(tiny_dir, tmp_path, monkeypatch):
    """--shuffle-options: the update's prompts show the options in a new order (gold moved with its
    option); without it they are the dataset's; a task without options is refused."""
    monkeypatch.setenv("T2_CACHE", str(tmp_path / "cache"))
    seen = []

    def spy(tok, task, items, vision=None):
        seen.append(items)
        return build(tok, task, items, vision)

    build = reinforce.build_prompts
    monkeypatch.setattr(reinforce, "build_prompts", spy)
    common = dict(task="arc_easy_direct", steps=1, eval_every=5, valid_limit=2, max_new_tokens=2, samples=2,
                  kl_coef=0)
    by_id = {it["id"]: it for it in TASKS["arc_easy_direct"].load("train")}
    reinforce.main(reinforce.get_args(tiny_args(tiny_dir, tmp_path / "plain", **common)))
    reinforce.main(reinforce.get_args(tiny_args(tiny_dir, tmp_path / "shuffled", **common) + ["--shuffle-options"]))
    # the update's questions (training ids; validation also renders its prompts here)
    plain, shuffled = [items for items in seen if all(it["id"] in by_id for it in items)]
    assert [it["id"] for it in plain] == [it["id"] for it in shuffled] and len(plain) == 2
    assert all(it == by_id[it["id"]] for it in plain)
    assert any(it["choices"] != by_id[it["id"]]["choices"] for it in shuffled)
    for it in shuffled:
        orig = by_id[it["id"]]
        assert it["choices"][ord(it["gold"]) - 65] == orig["choices"][ord(orig["gold"]) - 65]
    with pytest.raises(ValueError, match="needs a multiple-choice task"):
        reinforce.main(reinforce.get_args(tiny_args(tiny_dir, tmp_path / "x", steps=1) + ["--shuffle-options"]))


# ---------------------------------------------------------------- the baselines of paper Table 4

def test_lora_rl_update_trains_only_b_first(tiny_dir, tmp_path):
    """--adapter lora: one REINFORCE update through the same loop; B starts at 0 and moves, the
    adapter file loads back and fits the model."""
    import lora
    env_out = tmp_path / "lora"
    st = reinforce.main(reinforce.get_args(tiny_args(tiny_dir, env_out, steps=1, eval_every=1, adapter="lora",
                                                     targets="qv", lora_rank=2, kl_coef=0, device="cpu")))
    assert st["step"] == 1
    a = lora.Adapter.load(env_out / "last.safetensors")
    model = Transformer.from_pretrained(tiny_dir)
    a.check(model)
    assert a.meta["rank"] == "2" and a.meta["adapter"] == "lora" and a.n_params() > 0
    assert any(float(t.abs().max()) > 0 for n, t in a.params.items() if n.endswith("lora_B"))


def test_sft_objective_lowers_the_reference_nll(tiny_dir, tmp_path):
    """--objective sft: updates on the same reference solutions lower their per-token NLL; the
    prompt tokens are not in the loss (token counts = reference tokens only)."""
    from evals import get_task
    out = tmp_path / "sft"
    argv = tiny_args(tiny_dir, out, steps=4, eval_every=4, objective="sft", train_limit=2, batch_size=2, lr=0.05,
                     device="cpu")
    st = reinforce.main(reinforce.get_args(argv))
    nll = [m["nll"] for m in st["metrics"] if "nll" in m]
    assert len(nll) == 4 and nll[-1] < nll[0] - 0.05, nll
    tok = Tokenizer.from_pretrained(tiny_dir)
    task = get_task("gsm8k")
    items = task.load("train")[:2]
    want = sum(len(tok.encode(task.reference(it) + tok.eos_token)) for it in items)
    assert all(m["tokens"] == want for m in st["metrics"] if "tokens" in m)


def test_minutes_budget_and_no_validation(tiny_dir, tmp_path):
    """--minutes: no update starts once the updates so far took the budget (here: any time at all, so
    exactly one update runs); --eval-every 0: no validation at any step, the expert is last.safetensors;
    resuming with the budget spent adds no update."""
    out = tmp_path / "budget"
    argv = tiny_args(tiny_dir, out, steps=5, eval_every=0, minutes=1e-9, objective="sft", train_limit=2,
                     batch_size=2)
    st = reinforce.main(reinforce.get_args(argv))
    assert st["step"] == 1 and [m["step"] for m in st["metrics"]] == [1]
    assert not any("valid_acc" in m for m in st["metrics"])
    assert not list(out.glob("valid-step*.jsonl")) and not (out / "best.safetensors").exists()
    assert (out / "last.safetensors").exists()
    st = reinforce.main(reinforce.get_args(argv + ["--resume"]))
    assert st["step"] == 1


def _rank_with_its_own_clock(rank, port, argv, cache, out):
    """One of 2 gloo ranks (torch.multiprocessing.spawn). Rank 1's clock jumps an hour at every
    reading, so by its own clock every update takes hours: it alone would decide --minutes is spent."""
    import datetime
    import torch.distributed as dist
    os.environ.update(T2_CACHE=cache, WORLD_SIZE="2", RANK=str(rank), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    # a short timeout: a rank left alone in a collective fails this test in seconds, not 30 minutes
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=30))
    if rank == 1:
        class FastClock:
            now = time.time()

            def time(self):
                FastClock.now += 3600
                return FastClock.now
        reinforce.time = FastClock()
    st = reinforce.main(reinforce.get_args(argv))
    (Path(out) / f"rank{rank}.json").write_text(json.dumps({"step": st["step"]}))


def test_two_gloo_ranks_whose_clocks_disagree_stop_together(tiny_dir, tmp_path):
    """--minutes under torchrun: rank 1 measures hours per update, rank 0 seconds. The decision to
    stop is taken by both (any rank's reason stops all), so both stop after the same update instead
    of rank 0 starting an update whose all-reduce rank 1 never joins (issue 36 §1.6)."""
    import socket
    import torch.multiprocessing as mp
    with socket.socket() as s:  # a free port for the process group
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "run"
    argv = tiny_args(tiny_dir, out, steps=3, eval_every=0, minutes=1, kl_coef=0)
    mp.spawn(_rank_with_its_own_clock, args=(port, argv, str(tmp_path / "cache"), str(tmp_path)), nprocs=2)
    steps = [json.loads((tmp_path / f"rank{r}.json").read_text())["step"] for r in range(2)]
    assert steps == [1, 1], steps  # one update each: rank 1's budget was spent after it, by its clock
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1]


# Run as a script (`python tests/test_reinforce.py ARGS`), this file is reinforce.py's CLI with the
# parity task registered (the 2-rank tests need it in every rank). The engine seeds each question's
# samples by its index in the update, not by the rank, so 1 process and 2 ranks draw the same answers.
if __name__ == "__main__":
    reinforce.cli.run(reinforce.main, reinforce.get_args())

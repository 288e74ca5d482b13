"""cem.py: CEM finds a known optimum; ties go to the higher log-likelihood; a one-hot α is the
expert; the batched population scores equal member-by-member scores; 2 gloo ranks = 1 process.

Run as a script (`python tests/test_cem.py ARGS`), this file is cem.py's CLI with one extra task,
"parity", whose verdict depends on the generated text, so tiny random models give varied scores.
"""
import json
import os
import shutil
import subprocess
import sys
from argparse import Namespace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from scipy.stats import binomtest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import cem  # noqa: E402
import cli  # noqa: E402
import svd_cache  # noqa: E402
import svf  # noqa: E402
from evals import TASKS  # noqa: E402
from evals.gsm8k import GSM8K  # noqa: E402
from generate import Tokenizer  # noqa: E402
from model import Transformer  # noqa: E402


class Parity(GSM8K):
    """Real GSM8K prompts; 'correct' iff the completion has an even number of characters."""

    def check(self, items, completions):
        return [len(c) % 2 == 0 for c in completions]


TASKS["parity"] = Parity("parity", splits=("train", "valid", "test"), max_new_tokens=5)


def cem_args(**kw):
    a = dict(population=8, elites=3, init_std=0.5, generations=30, normalize=False, seed=0, mode="z", rescale=True,
             slots=16, max_new_tokens=5)
    a.update(kw)
    return Namespace(**a)


def test_cem_finds_the_optimum_of_a_toy_objective():
    target = torch.tensor([0.2, 0.9, 0.5])

    def fitness(pop):  # "accuracy" quantised to 10 levels, log-likelihood = closeness: ties matter
        d = (pop - target).pow(2).sum(1)
        return (1 - d).mul(10).floor() / 10, -d
    best, hist = cem.cem(fitness, (3,), cem_args(population=32, elites=6, generations=40), log=lambda *_: None)
    assert (best - target).abs().max() < 0.05, best
    acc, ll = fitness(best[None])  # the last record describes the α returned
    assert (hist[-1]["best_acc"], hist[-1]["best_ll"]) == (float(acc), float(ll))
    # the search distribution itself moved onto the optimum (mean and std follow the elites)
    assert hist[0]["mean_acc"] < 0.5 and hist[-1]["mean_acc"] == 1.0, (hist[0]["mean_acc"], hist[-1]["mean_acc"])
    assert hist[-1]["best_ll"] > hist[0]["best_ll"]  # the ties at 0.9 were broken towards the target


def test_expert_names_in_logs():
    assert cem.expert_name("experts/qwen2.5-coder-0.5b-instruct/math.safetensors") == "math"
    assert cem.expert_name("runs/gsm8k-qwen2.5-coder-0.5b/best.safetensors") == "gsm8k-qwen2.5-coder-0.5b"
    assert cem.expert_name("runs/mbpp-x/last.safetensors") == "mbpp-x"


def test_ties_are_broken_by_log_likelihood():
    acc = torch.tensor([0.5, 0.7, 0.7, 0.1])
    ll = torch.tensor([-0.1, -2.0, -1.0, 0.0])
    assert cem.ranking(acc, ll) == [2, 1, 0, 3]
    assert cem.ranking(torch.zeros(3), torch.zeros(3)) == [0, 1, 2]  # equals keep their order: the incumbent first


def test_incumbent_is_member_zero_and_reevaluated():
    seen = []

    def fitness(pop):
        seen.append(pop.clone())
        return pop[:, 0], torch.zeros(len(pop))
    best, _ = cem.cem(fitness, (2,), cem_args(generations=3), log=lambda *_: None)
    assert torch.equal(seen[1][0], seen[0][seen[0][:, 0].argmax()])
    assert torch.equal(seen[2][0], seen[1][seen[1][:, 0].argmax()])


def test_a_generation_without_signal_is_reported():
    """Every member ties (no shot solved: acc 0, ll -inf): the log says so, once per such generation."""
    lines = []
    flat = lambda pop: (torch.zeros(len(pop)), torch.full((len(pop),), float("-inf")))  # noqa: E731
    cem.cem(flat, (3,), cem_args(generations=2), log=lines.append)
    assert sum("every member scored the same" in line for line in lines) == 2
    lines.clear()
    cem.cem(lambda pop: (pop[:, 0], torch.zeros(len(pop))), (3,), cem_args(generations=2), log=lines.append)
    assert not any("every member scored the same" in line for line in lines)


def test_a_killed_search_resumes_where_it_stopped(tmp_path):
    """3 generations, then the same search raised to 6 from the saved state = 6 in one go (the
    random stream is saved too); a state file from a search with other settings is refused."""
    target = torch.tensor([0.2, 0.9, 0.5])
    calls = []

    def fitness(pop):
        calls.append(1)
        d = (pop - target).pow(2).sum(1)
        return (1 - d).mul(10).floor() / 10, -d
    quiet = lambda *_: None  # noqa: E731
    whole, h_whole = cem.cem(fitness, (3,), cem_args(generations=6), quiet, state=tmp_path / "a.pt", config={"x": 1})
    cem.cem(fitness, (3,), cem_args(generations=3), quiet, state=tmp_path / "b.pt", config={"x": 1})
    calls.clear()
    resumed, h_resumed = cem.cem(fitness, (3,), cem_args(generations=6), quiet, state=tmp_path / "b.pt", config={"x": 1})
    assert len(calls) == 3  # only the 3 missing generations were scored
    assert torch.equal(whole, resumed)
    drop = lambda h: [{k: v for k, v in r.items() if k != "seconds"} for r in h]  # noqa: E731
    assert drop(h_whole) == drop(h_resumed) and len(h_resumed) == 6
    with pytest.raises(ValueError, match=r"b\.pt: a search with other settings \(x differ\)"):
        cem.cem(fitness, (3,), cem_args(generations=6), quiet, state=tmp_path / "b.pt", config={"x": 2})


def test_a_rerun_reuses_what_a_killed_run_finished(tiny_dir, tmp_path, monkeypatch):
    """cem.py run to the end, then run again into the same --out: the search is loaded and the three
    report rows are read back (nothing is generated: answer_all would fail), with the same summary."""
    paths = expert_files(tiny_dir, tmp_path, monkeypatch)
    argv = ["--task", "parity", "--model", str(tiny_dir), "--experts", *paths, "--shots", "2", "--limit", "4",
            "--generations", "2", "--population", "4", "--elites", "2", "--max-new-tokens", "3",
            "--out", str(tmp_path / "out")]
    first = cem.main(cem.get_args(argv))
    (tmp_path / "out" / "summary.json").unlink()  # as if killed after the last row

    def fail(*a, **k):
        raise AssertionError("a finished row was generated again")
    monkeypatch.setattr(cem, "answer_all", fail)
    monkeypatch.setattr(cem, "sharded_fitness", fail)
    assert cem.main(cem.get_args(argv)) == first
    with pytest.raises(ValueError, match="population differ"):  # the same --out, another search
        cem.main(cem.get_args([*argv[:-2], "--population", "6", "--out", str(tmp_path / "out")]))


def test_a_row_with_the_same_weights_as_another_is_not_generated_twice(tiny_dir, tmp_path, monkeypatch):
    """A search whose shots no member solves keeps its uniform start (member 0, the incumbent, ranks
    first among equals), so the cem row has uniform α's weights: it is answered once, and the uniform
    row's file holds the same answers that generating it again gives."""
    paths = expert_files(tiny_dir, tmp_path, monkeypatch)
    flat = lambda *a: (torch.zeros(4), torch.full((4,), float("-inf")))  # noqa: E731
    monkeypatch.setattr(cem, "sharded_fitness", flat)
    calls = []
    real = cem.answer_all
    monkeypatch.setattr(cem, "answer_all", lambda *a: calls.append(a[4]) or real(*a))
    argv = ["--task", "parity", "--model", str(tiny_dir), "--experts", *paths, "--shots", "2", "--limit", "6",
            "--generations", "2", "--population", "4", "--elites", "2", "--max-new-tokens", "4",
            "--out", str(tmp_path / "out")]
    cem.main(cem.get_args(argv))
    alpha = json.loads((tmp_path / "out" / "alpha.json").read_text())["alpha"]
    assert alpha == [torch.tensor(1 / 3).item()] * 3
    assert len(calls) == 2 and calls[1] is None  # cem (= uniform), base
    rows = lambda n: [json.loads(x) for x in (tmp_path / "out" / f"{n}.jsonl").read_text().splitlines()]  # noqa: E731
    assert rows("uniform") == rows("cem")
    monkeypatch.setattr(cem, "same_weights", lambda *a: False)  # the uniform row generated for real, apart
    cem.main(cem.get_args([*argv[:-1], str(tmp_path / "out2")]))
    assert len(calls) == 5
    assert [json.loads(x) for x in (tmp_path / "out2" / "uniform.jsonl").read_text().splitlines()] == rows("uniform")


def expert_files(tiny_dir, tmp_path, monkeypatch):
    """Three random experts of the tiny model saved under tmp_path (SVD cache there too): their paths."""
    monkeypatch.setenv("T2_CACHE", str(tmp_path / "cache"))
    model = Transformer.from_pretrained(tiny_dir)
    paths = []
    for i, e in enumerate(random_experts(model, svd_cache.load(model, "mlp"))):
        paths.append(str(tmp_path / f"e{i}.safetensors"))
        e.save(paths[-1])
    return paths


def random_experts(model, cache, k=3):
    out = []
    for i in range(k):
        g = torch.Generator().manual_seed(100 + i)
        theta = {n: 2 * torch.randn(cache.rank(n), generator=g) for n in cache.names}
        out.append(svf.Expert.new(theta, model, cache, task=f"e{i}"))
    return out


@pytest.fixture(scope="module")
def tiny(tiny_dir, tmp_path_factory):
    model = Transformer.from_pretrained(tiny_dir)
    tok = Tokenizer.from_pretrained(tiny_dir)
    cache = svd_cache.load(model, "mlp", root=tmp_path_factory.mktemp("cache"))
    experts = random_experts(model, cache)
    svf.attach(model, cache)
    return model, tok, cache, experts


def test_one_hot_alpha_is_the_expert(tiny):
    _, _, _, experts = tiny
    for k, e in enumerate(experts):
        zs = svf.mix(experts, torch.eye(3)[k])
        assert all(torch.equal(zs[n], e.z(n)) for n in zs)


def test_batched_population_equals_member_by_member(tiny):
    model, tok, _, experts = tiny
    shots = TASKS["parity"].load("test")[:4]
    pop = torch.rand(5, 3, generator=torch.Generator().manual_seed(1))
    args = cem_args(slots=20)
    acc, ll = cem.population_fitness(model, tok, TASKS["parity"], shots, experts, pop, args)
    alone = [cem.population_fitness(model, tok, TASKS["parity"], shots, experts, pop[i:i + 1], args) for i in range(5)]
    assert torch.equal(acc, torch.cat([a for a, _ in alone]))
    assert torch.allclose(ll, torch.cat([l for _, l in alone]), atol=1e-4)
    assert len(set(acc.tolist())) > 1  # members really differ, so the comparison means something


def test_bad_expert_files_are_one_line(tiny_dir, tmp_path, capsys, monkeypatch):
    """A missing file fails before the model loads; a set with mixed rescale flags is refused."""
    monkeypatch.setenv("T2_CACHE", str(tmp_path / "cache"))

    def run(files):
        with pytest.raises(SystemExit) as e:
            cli.run(cem.main, cem.get_args(["--task", "parity", "--model", str(tiny_dir), "--experts", *files]))
        return e.value.code, capsys.readouterr().err
    code, err = run([str(tmp_path / "gone.safetensors")])
    assert code == 2 and err.startswith(f"error: {tmp_path}/gone.safetensors: no such expert file") and "make train" in err
    model = Transformer.from_pretrained(tiny_dir)
    cache = svd_cache.load(model, "mlp")
    files = []
    for i, e in enumerate(random_experts(model, cache, k=2)):
        e.meta["rescale"] = "false" if i else "true"
        files.append(str(tmp_path / f"e{i}.safetensors"))
        e.save(files[-1])
    code, err = run(files)
    assert code == 2 and f"error: {files[1]}: rescale=false, but {files[0]} has rescale=true" in err


def test_two_gloo_ranks_equal_one_process(tiny_dir, tmp_path):
    env = dict(os.environ, T2_CACHE=str(tmp_path / "cache"), OMP_NUM_THREADS="1")
    model = Transformer.from_pretrained(tiny_dir)
    cache = svd_cache.load(model, "mlp", root=tmp_path / "cache")
    paths = []
    for i, e in enumerate(random_experts(model, cache)):
        paths.append(str(tmp_path / f"e{i}.safetensors"))
        e.save(paths[-1])
    common = ["--task", "parity", "--model", str(tiny_dir), "--experts", *paths, "--shots", "4", "--limit", "8",
              "--generations", "2", "--population", "6", "--elites", "3", "--max-new-tokens", "5", "--threads", "1",
              "--device", "cpu"]  # gloo on the CPU, also on a GPU machine
    subprocess.run([sys.executable, __file__, *common, "--out", str(tmp_path / "one")], cwd=ROOT, env=env,
                   check=True, capture_output=True)
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29534",
                        __file__, *common, "--out", str(tmp_path / "two")], cwd=ROOT, env=env, capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    one = json.loads((tmp_path / "one" / "alpha.json").read_text())
    two = json.loads((tmp_path / "two" / "alpha.json").read_text())
    assert one["alpha"] == two["alpha"]
    assert [h["best_acc"] for h in one["history"]] == [h["best_acc"] for h in two["history"]]
    assert (tmp_path / "one" / "alpha.png").exists() and (tmp_path / "one" / "adapted.safetensors").exists()
    summary = json.loads((tmp_path / "one" / "summary.json").read_text())
    verdicts = {name: [json.loads(line)["correct"] for line in (tmp_path / "one" / f"{name}.jsonl").read_text().splitlines()]
                for name in ("cem", "base", "uniform")}
    for name, v in verdicts.items():
        assert summary[name]["n"] == len(v) == 8 and summary[name]["correct"] == sum(v), name
        rows = [json.loads(line) for line in (tmp_path / "one" / f"{name}.jsonl").read_text().splitlines()]
        # format apart from accuracy, per item and counted in the summary
        assert all(isinstance(r["answered"], bool) and isinstance(r["cut"], bool) for r in rows), name
        assert summary[name]["cut"] == sum(r["cut"] for r in rows) and summary[name]["answered"] == sum(r["answered"] for r in rows)
    for other in ("base", "uniform"):  # exact McNemar = two-sided binomial test on the discordant pairs (scipy)
        wins = sum(a and not b for a, b in zip(verdicts["cem"], verdicts[other]))
        losses = sum(b and not a for a, b in zip(verdicts["cem"], verdicts[other]))
        want = binomtest(wins, wins + losses, 0.5).pvalue if wins + losses else 1.0
        assert summary[f"p_vs_{other}"] == pytest.approx(want, abs=1e-12), other
    # the report is the first 8 items of the split in file order, minus the 4 shots
    reported = [json.loads(line)["id"] for line in (tmp_path / "one" / "base.jsonl").read_text().splitlines()]
    ids = [it["id"] for it in TASKS["parity"].load("test")]
    assert not set(one["shots"]) & set(reported) and len(one["shots"]) == 4
    assert reported == [i for i in ids if i not in one["shots"]][:8]


@pytest.mark.parametrize("flags", [["--per-layer"], ["--mode", "theta"]])
def test_cli_per_layer_and_theta_mode(tiny_dir, tmp_path, monkeypatch, flags):
    """The saved expert is the mix the flags ask for, recomputed by hand from the expert files:
    --per-layer: z′(m) = Σ_k α[k, m]·sigmoid(θ_k(m)), one α per expert and matrix;
    --mode theta: z′ = sigmoid(Σ_k α_k·θ_k) (the official code's mix), not Σ_k α_k·sigmoid(θ_k).
    dispatch.py --strategy fewshot reads the same α back to the same z′."""
    import dispatch
    monkeypatch.setenv("T2_CACHE", str(tmp_path / "cache"))
    model = Transformer.from_pretrained(tiny_dir)
    cache = svd_cache.load(model, "mlp")
    paths = []
    for i, e in enumerate(random_experts(model, cache)):
        paths.append(str(tmp_path / f"e{i}.safetensors"))
        e.save(paths[-1])
    out = tmp_path / "out"
    summary = cem.main(cem.get_args(["--task", "parity", "--model", str(tiny_dir), "--experts", *paths, "--shots", "2",
                                     "--limit", "2", "--generations", "2", "--population", "4", "--elites", "2",
                                     "--max-new-tokens", "3", "--out", str(out), *flags]))
    assert summary["cem"]["n"] == 2
    spec = json.loads((out / "alpha.json").read_text())
    alpha = torch.tensor(spec["alpha"])
    thetas = [load_file(p) for p in paths]
    names = list(svf.Expert.load(paths[0]).theta)  # the model's order of matrices: α's columns
    assert sorted(names) == sorted(cache.names) and len(names) == 6  # 2 layers x gate, up, down
    adapted = load_file(out / "adapted.safetensors")
    assert sorted(adapted) == sorted(names)
    for j, n in enumerate(names):
        if "--per-layer" in flags:
            assert alpha.shape == (3, len(names)) and spec["per_layer"]
            want = sum(float(alpha[k, j]) * torch.sigmoid(thetas[k][n]) for k in range(3))
        else:
            assert alpha.shape == (3,) and spec["mode"] == "theta"
            want = torch.sigmoid(sum(float(alpha[k]) * thetas[k][n] for k in range(3)))
        torch.testing.assert_close(adapted[n], want, rtol=1e-5, atol=1e-6)
    if "--per-layer" in flags:  # the columns really differ, so a per-expert α would not pass
        assert not torch.allclose(alpha[:, 0], alpha[:, 1])
    zs = dispatch.fewshot_z(out / "alpha.json", Transformer.from_pretrained(tiny_dir)).zs
    for n in names:
        torch.testing.assert_close(zs[n], adapted[n], rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- flags, defaults, bad files

@pytest.mark.parametrize("flags, flag", [
    (["--elites", "5", "--population", "2"], "--elites"), (["--elites", "1"], "--elites"),
    (["--population", "0"], "--population"), (["--shots", "0"], "--shots"), (["--generations", "-2"], "--generations"),
    (["--limit", "-1"], "--limit"), (["--max-new-tokens", "0"], "--max-new-tokens"),
    (["--max-new-tokens", "-5"], "--max-new-tokens"), (["--init-std", "0"], "--init-std"),
    (["--init-std", "nan"], "--init-std"), (["--slots", "0"], "--slots"),
])
def test_bad_counts_are_refused_where_parsed(flags, flag, capsys):
    """Each was accepted (and ran wrong: --limit -1 the whole split but one, --max-new-tokens 0 the
    default) or a traceback minutes later (--population 0, --shots 0, --elites > --population)."""
    with pytest.raises(SystemExit) as e:
        cem.get_args(["--task", "math", *flags])
    err = capsys.readouterr().err
    assert e.value.code == 2 and f"argument {flag}" in err and "Traceback" not in err, err


def test_shots_must_leave_items_to_report():
    items = [{"id": i} for i in range(5)]
    shots, rest = cem.draw_shots(items, 2, seed=0)
    assert len(shots) == 2 and [it["id"] for it in rest] == sorted(set(range(5)) - {it["id"] for it in shots})
    with pytest.raises(ValueError, match="--shots 5: the split has 5 items"):
        cem.draw_shots(items, 5, seed=0)


def test_a_damaged_search_file_is_one_line_naming_it(tmp_path, capsys):
    """search.pt cut short by a full disk (or any other file under that name): refused by name, not
    a zip/unpickling traceback."""
    fit = lambda pop: (pop[:, 0], torch.zeros(len(pop)))  # noqa: E731
    state = tmp_path / "search.pt"
    cem.cem(fit, (3,), cem_args(generations=1), lambda *_: None, state=state, config={"x": 1})
    state.write_bytes(state.read_bytes()[:300])
    with pytest.raises(SystemExit) as e:
        cli.run(cem.cem, fit, (3,), cem_args(generations=2), lambda *_: None, state, {"x": 1})
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith(f"error: {state}: not a readable CEM search") and err.count("\n") == 1
    torch.save({"some": "thing"}, state)
    with pytest.raises(ValueError, match=r"search\.pt: not a CEM search file"):
        cem.cem(fit, (3,), cem_args(generations=2), lambda *_: None, state=state, config={"x": 1})


def test_no_flags_means_the_shipped_experts_on_their_base_model(tmp_path, monkeypatch):
    """`python cem.py --task math`: the shipped math/code/reasoning experts; the model is the one their
    metadata names, under checkpoints/ (missing: the make command that fetches it)."""
    args = cem.get_args(["--task", "math"])
    assert [Path(f).name for f in args.experts] == ["math.safetensors", "code.safetensors", "reasoning.safetensors"]
    assert all(Path(f).parent == ROOT / "experts" / "qwen2.5-coder-0.5b-instruct" for f in args.experts)
    experts = [svf.Expert.load(f) for f in args.experts]
    if (ROOT / "checkpoints" / "qwen2.5-coder-0.5b-instruct" / "config.json").exists():
        assert cem.base_model(experts) == ROOT / "checkpoints" / "qwen2.5-coder-0.5b-instruct"
    monkeypatch.setattr(cem, "ROOT", tmp_path)  # a fresh clone before `make model MODEL=qwen2.5-coder-0.5b`
    with pytest.raises(FileNotFoundError, match=r"qwen2.5-coder-0.5b-instruct: missing.*`make model MODEL=qwen2.5-coder-0.5b`"):
        cem.base_model(experts)


def test_experts_of_another_model_are_refused_before_it_loads(smollm2_dir, capsys, monkeypatch):
    """The shipped (Qwen) experts on SmolLM2: refused from config.json, before the model loads or any SVD."""
    def fail(*a, **k):
        raise AssertionError("loaded the model or built an SVD cache for experts that cannot fit it")
    monkeypatch.setattr(Transformer, "from_pretrained", fail)
    monkeypatch.setattr(svd_cache, "load", fail)
    with pytest.raises(SystemExit) as e:
        cli.run(cem.main, cem.get_args(["--task", "math", "--model", str(smollm2_dir)]))
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("error: ") and "math.safetensors: does not fit" in err
    assert "qwen2.5-coder-0.5b-instruct" in err and err.count("\n") == 1


def test_same_shapes_other_weights_are_refused_before_any_svd(tiny_dir, tmp_path, capsys, monkeypatch):
    """Experts of the tiny model on a copy with one weight changed: the shapes fit, the fingerprint
    does not, and that is found before svf.load_experts builds an SVD cache for the copy."""
    paths = expert_files(tiny_dir, tmp_path, monkeypatch)
    other = tmp_path / "other"
    shutil.copytree(tiny_dir, other)
    state = load_file(other / "model.safetensors")
    state["model.layers.0.mlp.up_proj.weight"] *= 1.01
    save_file(state, other / "model.safetensors")

    def fail(*a, **k):
        raise AssertionError("built an SVD cache for the wrong base model")
    monkeypatch.setattr(svd_cache, "load", fail)
    capsys.readouterr()  # the experts' own SVD progress
    with pytest.raises(SystemExit) as e:
        cli.run(cem.main, cem.get_args(["--task", "parity", "--model", str(other), "--experts", *paths]))
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith(f"error: {paths[0]}: trained on base weights") and str(other) in err


def test_bench_tool_times_one_generation(tiny_dir, tmp_path, monkeypatch, capsys):
    """tools/bench_cem.py (was cem.py --bench): both ways run one generation and report a speed-up."""
    sys.path.insert(0, str(ROOT / "tools"))
    import bench_cem
    paths = expert_files(tiny_dir, tmp_path, monkeypatch)
    batched, single = bench_cem.bench(cem.get_args(["--task", "parity", "--model", str(tiny_dir), "--experts", *paths,
                                                    "--shots", "2", "--population", "3", "--elites", "2",
                                                    "--max-new-tokens", "2"]))
    assert batched > 0 and single > 0 and "speed-up" in capsys.readouterr().out


if __name__ == "__main__":
    cem.main(cem.get_args())

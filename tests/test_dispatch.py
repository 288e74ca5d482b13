"""dispatch.py and evals/classify.py: parsing pass 1, "other" = base weights, routed batches, the cls task.

Tiny random models and random experts; the real SmolLM2 tokenizer for the end-to-end CLI run.
    .venv/bin/python -m pytest -q tests/test_dispatch.py
"""
import json
import shutil
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import cli
import dispatch
import svd_cache
import svf
from evals import get_task
from evals.classify import CATEGORIES, classification_messages, cls_task, parse_category
from model import ModelConfig, Transformer

ROOT = Path(__file__).resolve().parents[1]


def tiny_model(seed=0, vocab=64):
    torch.manual_seed(seed)
    cfg = ModelConfig(model_type="llama", vocab_size=vocab, hidden_size=32, intermediate_size=48,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                      tie_word_embeddings=True, layer_windows=[None, None])
    model = Transformer(cfg).eval().requires_grad_(False)
    model.name_or_path = f"tiny-{seed}"
    return model


def random_experts(model, cache, seed=0, mixed_rescale=False):
    """Three experts far from uniform z (θ ~ N(0, 1)), so each one visibly changes the logits.
    mixed_rescale: "code" without the Σσ rescale (row_zs folds each row's own flag; the CLI refuses
    such a set)."""
    g = torch.Generator().manual_seed(seed)
    return {c: svf.Expert.new({n: torch.randn(cache.rank(n), generator=g) for n in cache.names}, model, cache,
                              task=c, rescale=not (mixed_rescale and c == "code"))
            for c in ("math", "code", "reasoning")}


def ids(B=5, T=9):
    return torch.randint(0, 64, (B, T), generator=torch.Generator().manual_seed(1))


# ----------------------------------------------------------------------------- parsing pass 1

@pytest.mark.parametrize("text, want", [
    ("\\boxed{math}", "math"), ("\\boxed{Math}", "math"), ("The answer: \\boxed{ CODE }.", "code"),
    ("\\boxed{\\text{Reasoning}}", "reasoning"), ("\\boxed{{math}}", "math"),   # nested braces
    ("\\boxed{code} but maybe \\boxed{math}", "code"),                           # the first box counts
    ("\\boxed{poetry}", "other"), ("\\boxed{mathematics}", "other"), ("\\boxed{x^{2}}", "other"),
    ("\\boxed{}", "other"), ("math", "other"), ("", "other"), ("}{\\boxed", "other"), (None, "other"),
    ("\\boxed{other}", "other"),
])
def test_parse_category(text, want):
    assert parse_category(text) == want


def test_one_prompt_definition():
    """dispatch.py's pass 1 and the cls task show the model the very same chat."""
    item = {"question": "What is 2 + 2?", "gold": "math"}
    assert dispatch.cls_task is cls_task and dispatch.free_form.messages(item) == cls_task.messages(item)
    assert cls_task.messages(item) == classification_messages("What is 2 + 2?")
    assert "What is 2 + 2?" in cls_task.messages(item)[-1]["content"] and "\\boxed{" in cls_task.messages(item)[-1]["content"]
    # completions come after the "\boxed{" prefill and are cut at the stop "}"
    assert cls_task.check([item] * 3, ["Math", " code", "\\text{math"]) == [True, False, True]
    assert dispatch.free_form.check([item] * 2, ["It adds. \\boxed{math}", "math"]) == [True, False]
    assert get_task("cls") is cls_task


# ----------------------------------------------------------------------------- pass 2

def test_other_is_exactly_the_base_weights(tmp_path):
    """After a merged expert and with a leftover per-row z, "other" gives bit-identical logits to a
    model that was never adapted (the official code would keep the last expert here)."""
    model, never = tiny_model(), tiny_model()
    x = ids()
    base = never(x)
    cache = svd_cache.load(model, "mlp", root=tmp_path)
    experts = random_experts(model, cache)
    with dispatch.adapted(model, "math", experts):
        assert not torch.allclose(model(x), base, atol=1e-3)  # the expert really acts
    with dispatch.adapted(model, "other", experts):
        assert torch.equal(model(x), base)
    svf.attach(model, cache)
    svf.set_z(model, experts["code"].zs())  # a stale expert left on the factored layers
    assert not torch.allclose(model(x), base, atol=1e-3)
    with dispatch.adapted(model, "other", experts):
        assert torch.equal(model(x), base)


def test_routed_batch_equals_each_row_alone(tmp_path):
    """One batch, rows on different experts (and "other"), equals each row with its expert merged."""
    model, ref = tiny_model(), tiny_model()
    cache = svd_cache.load(model, "mlp", root=tmp_path)
    experts = random_experts(model, cache, mixed_rescale=True)
    cats = ["math", "other", "code", "reasoning", "math"]
    x = ids(B=len(cats))
    svf.attach(model, cache)
    svf.set_z(model, dispatch.row_zs(experts, cats, cache), rescale=False)
    batched = model(x)
    svf.set_z(model, dispatch.row_zs(experts, cats, cache), rescale=False,
              base_rows=[c not in experts for c in cats])  # as dispatch.answer does: "other" on W itself
    exact_other = model(x)
    for b, c in enumerate(cats):
        with dispatch.adapted(ref, c, experts):
            alone = ref(x[b:b + 1])[0]
        # the experts' rows: float32 factors vs merged W′, equal up to rounding
        torch.testing.assert_close(batched[b], alone, atol=2e-5, rtol=1e-4)
        # "other": W itself, so only the GEMM's batch-shape-dependent last bits differ
        torch.testing.assert_close(exact_other[b], alone, **({"atol": 1e-6, "rtol": 1e-6} if c == "other" else {}))
    assert not torch.allclose(batched[0], batched[2], atol=1e-3)  # different experts really differ


def test_fewshot_reads_cem_json(tmp_path, monkeypatch):
    """cem.py's alpha.json -> z′ = Σ α_k z_k; a one-hot α gives that expert's z back exactly."""
    monkeypatch.setenv("T2_CACHE", str(tmp_path))
    model = tiny_model()
    experts = random_experts(model, svd_cache.load(model, "mlp", root=tmp_path))
    paths = []
    for c, e in experts.items():
        e.save(tmp_path / f"{c}.safetensors")
        paths.append(str(tmp_path / f"{c}.safetensors"))
    spec = tmp_path / "alpha.json"
    spec.write_text(json.dumps({"experts": paths, "alpha": [0.0, 0.0, 2.0], "mode": "z", "per_layer": False,
                                "normalize": True}))
    mix = dispatch.fewshot_z(spec, model)
    assert mix.rescale and all(torch.equal(mix.zs[n], experts["reasoning"].z(n)) for n in mix.zs)
    spec.write_text("[1, 2]")
    with pytest.raises(ValueError, match=r"alpha\.json: not cem\.py's alpha\.json"):
        dispatch.fewshot_z(spec, model)


# ----------------------------------------------------------------------------- the cls task

def test_cls_task_is_balanced_and_never_sees_a_test_item():
    train, valid = cls_task.load("train"), cls_task.load("valid")
    for items in (train, valid):
        counts = Counter(it["gold"] for it in items)
        assert set(counts) == {"math", "code", "reasoning"} and len(set(counts.values())) == 1, counts
    assert not {it["id"] for it in train} & {it["id"] for it in valid}
    seen = {it["question"] for it in train + valid}
    for name in ("gsm8k", "mbpp", "arc_easy", "arc_challenge", "humaneval"):
        task = get_task(name)
        test_questions = {task.messages(it)[-1]["content"] for it in task.load("test")}
        assert not seen & test_questions, name
    assert cls_task.load("train") == train  # seeded: the same items in the same order every time
    with pytest.raises(ValueError, match="no split 'test'"):
        cls_task.load("test")


# ----------------------------------------------------------------------------- CLI

def run_cli(argv, capsys):
    """dispatch.py as its __main__ runs it: (exit status, stderr)."""
    with pytest.raises(SystemExit) as e:
        cli.run(dispatch.main, dispatch.get_args(argv))
    return e.value.code, capsys.readouterr().err


def test_bad_input_is_one_line_naming_the_file(tmp_path, capsys):
    # --model does not exist either: the experts are read first, before minutes of model loading
    files = [f"{c}={tmp_path}/{c}.safetensors" for c in ("math", "code", "reasoning")]
    code, err = run_cli(["--task", "humaneval", "--model", str(tmp_path / "nope"), "--experts", *files], capsys)
    assert code == 2 and err.startswith(f"error: {tmp_path}/math.safetensors: no such expert file")
    assert "make train TASK=" in err and err.count("\n") == 1 and "Traceback" not in err
    (tmp_path / "math.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{")  # truncated header
    code, err = run_cli(["--task", "humaneval", "--model", str(tmp_path), "--experts", *files], capsys)
    assert code == 2 and err.startswith(f"error: {tmp_path}/math.safetensors: cannot read safetensors")
    # bad flags: argparse's usage line + "error: ...", exit 2
    code, err = run_cli(["--task", "math", "--model", str(tmp_path), "--experts", files[0]], capsys)
    assert code == 2 and "error: --experts lacks code=FILE, reasoning=FILE" in err
    code, err = run_cli(["--task", "math", "--strategy", "fewshot", "--model", str(tmp_path)], capsys)
    assert code == 2 and "error: --strategy fewshot needs --alpha FILE" in err
    code, err = run_cli(["--task", "nosuchtask", "--classify-only"], capsys)
    assert code == 2 and err.startswith("error: unknown task 'nosuchtask'")
    # a question after --experts (nargs *) is read as one more expert: say so rather than "no prompt"
    code, err = run_cli(["--model", str(tmp_path), "--experts", *files, "Reverse a string."], capsys)
    assert code == 2 and "error: --experts swallowed 'Reverse a string.': put the question before the flags" in err
    code, err = run_cli(["--task", "math", "--experts", "math"], capsys)
    assert code == 2 and "error: --experts takes CAT=FILE" in err


def test_experts_with_mixed_rescale_flags_are_refused(tiny_run, capsys):
    folder, specs, tmp = tiny_run
    model = Transformer.from_pretrained(folder)
    mixed = random_experts(model, svd_cache.load(model, "mlp"), mixed_rescale=True)
    mixed["code"].save(tmp / "code.safetensors")  # now code has rescale=false, math and reasoning true
    code, err = run_cli(["--task", "gsm8k", "--limit", "1", "--model", str(folder), "--experts", *specs], capsys)
    assert code == 2 and f"error: {tmp}/code.safetensors: rescale=false, but {tmp}/math.safetensors has rescale=true" in err


@pytest.fixture
def tiny_run(smollm2_dir, tmp_path, monkeypatch):
    """A tiny random model folder with SmolLM2's tokenizer, and three expert files for it."""
    monkeypatch.setenv("T2_CACHE", str(tmp_path / "cache"))
    model = tiny_model(vocab=49152)
    folder = tmp_path / "tiny"
    folder.mkdir()
    c = model.config
    (folder / "config.json").write_text(json.dumps({
        "model_type": "llama", "vocab_size": c.vocab_size, "hidden_size": c.hidden_size,
        "intermediate_size": c.intermediate_size, "num_hidden_layers": c.num_hidden_layers,
        "num_attention_heads": c.num_attention_heads, "num_key_value_heads": c.num_key_value_heads,
        "head_dim": c.head_dim, "tie_word_embeddings": True}))
    state = {k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    save_file(state, folder / "model.safetensors")
    for f in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        shutil.copy(smollm2_dir / f, folder / f)
    loaded = Transformer.from_pretrained(folder)
    experts = random_experts(loaded, svd_cache.load(loaded, "mlp"))
    specs = []
    for cat, e in experts.items():
        e.save(tmp_path / f"{cat}.safetensors")
        specs.append(f"{cat}={tmp_path / cat}.safetensors")
    return folder, specs, tmp_path


def test_cli_task_and_prompt_end_to_end(tiny_run):
    folder, specs, tmp = tiny_run
    common = ["--model", str(folder), "--experts", *specs, "--threads", "1"]
    s = dispatch.main(dispatch.get_args(["--task", "gsm8k", "--limit", "3", "--slots", "2",
                                         "--max-new-tokens", "3", "--compare-base",
                                         "--out", str(tmp / "out"), *common]))
    assert s["n"] == 3 and sum(map(sum, s["confusion"])) == 3 and s["categories"] == list(CATEGORIES)
    assert sum(s["confusion"][CATEGORIES.index("math")]) == 3  # gsm8k's true category is math
    assert s["pass1_s"] > 0 and s["pass2_s"] > 0 and "mcnemar_p" in s and "(n=3)" in s["acc"]
    rows = [json.loads(line) for line in (tmp / "out" / "items.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and [r["category"] for r in rows] == [cls_task.extract(r["pass1"]) for r in rows]
    # format apart from accuracy: answered = the task finds a final answer in the row's completion
    gsm8k = get_task("gsm8k")
    assert [r["answered"] for r in rows] == [gsm8k.extract(r["completion"]) is not None for r in rows]
    assert s["answered"] == sum(r["answered"] for r in rows) and s["cut"] == sum(r["cut"] for r in rows)
    predicted = Counter(r["category"] for r in rows)  # the confusion's columns are the rows' categories
    assert [sum(row[j] for row in s["confusion"]) for j in range(len(CATEGORIES))] == [predicted[c] for c in CATEGORIES]
    assert (tmp / "out" / "confusion.png").stat().st_size > 0
    assert json.loads((tmp / "out" / "summary.json").read_text())["n"] == 3
    one = dispatch.main(dispatch.get_args(["Write a function that adds two numbers.", "--max-new-tokens", "3", *common]))
    assert one["expert"] == ("base weights" if one["category"] == "other" else f"{tmp / one['category']}.safetensors")


def test_bench_tool_times_pass2_merged_per_category(tiny_run):
    """tools/bench_dispatch.py (was dispatch.py --time-merged): pass 2 again, one weight merge per
    category group, the official way: the same answers as the routed batch, its time added to summary.json."""
    sys.path.insert(0, str(ROOT / "tools"))
    import bench_dispatch
    folder, specs, tmp = tiny_run
    s = dispatch.main(dispatch.get_args(["--task", "gsm8k", "--limit", "3", "--slots", "2", "--max-new-tokens", "3",
                                         "--model", str(folder), "--experts", *specs, "--threads", "1",
                                         "--out", str(tmp / "out")]))
    b = bench_dispatch.main(bench_dispatch.get_args([str(tmp / "out"), "--threads", "1"]))
    assert b["merged_pass2_s"] > 0 and b["merged_same"] == 3 and b["pass2_s"] == s["pass2_s"]
    assert json.loads((tmp / "out" / "summary.json").read_text()) == b
    dispatch.main(dispatch.get_args(["--task", "gsm8k", "--limit", "2", "--classify-only", "--model", str(folder),
                                     "--threads", "1", "--out", str(tmp / "p1")]))
    with pytest.raises(ValueError, match="no routed pass 2 to time against"):
        bench_dispatch.main(bench_dispatch.get_args([str(tmp / "p1")]))


def test_fewshot_task_leaves_out_the_cem_shots(tiny_run):
    folder, specs, tmp = tiny_run
    paths = [s.split("=", 1)[1] for s in specs]
    items = get_task("gsm8k").load("test")
    shots = [items[1]["id"], items[3]["id"]]  # two of the first five were CEM's shots
    spec = tmp / "alpha.json"
    spec.write_text(json.dumps({"experts": paths, "alpha": [0.2, 0.3, 0.5], "mode": "z", "task": "gsm8k",
                                "shots": shots}))
    s = dispatch.main(dispatch.get_args(["--task", "gsm8k", "--strategy", "fewshot", "--alpha", str(spec),
                                         "--limit", "3", "--max-new-tokens", "2", "--model", str(folder),
                                         "--threads", "1", "--out", str(tmp / "few")]))
    rows = [json.loads(line)["id"] for line in (tmp / "few" / "items.jsonl").read_text().splitlines()]
    assert s["n"] == 3 and rows == [items[0]["id"], items[2]["id"], items[4]["id"]]


@pytest.fixture
def varied_run(tiny_dir, tmp_path, monkeypatch):
    """conftest's tiny model (large random weights: its texts vary with the prompt and the expert)
    and three expert files for it."""
    monkeypatch.setenv("T2_CACHE", str(tmp_path / "cache"))
    loaded = Transformer.from_pretrained(tiny_dir)
    specs = []
    for cat, e in random_experts(loaded, svd_cache.load(loaded, "mlp")).items():
        e.save(tmp_path / f"{cat}.safetensors")
        specs.append(f"{cat}={tmp_path / cat}.safetensors")
    return tiny_dir, specs, tmp_path


def test_cli_classify_only_cls_and_free_form(varied_run):
    """--classify-only writes pass 1 only (no domain experts needed); --strategy cls answers pass 1
    with z^c merged (other texts than the base prompt's); --free-form drops the "\\boxed{" prefill.
    Each row's category is the parse of its own pass-1 text."""
    folder, specs, tmp = varied_run
    common = ["--task", "gsm8k", "--limit", "4", "--slots", "2", "--model", str(folder), "--threads", "1"]

    def run(name, *flags):
        s = dispatch.main(dispatch.get_args([*common, "--out", str(tmp / name), *flags]))
        rows = [json.loads(line) for line in (tmp / name / "items.jsonl").read_text().splitlines()]
        assert s["n"] == len(rows) == 4 and sum(map(sum, s["confusion"])) == 4
        return s, rows

    cls_file = specs[0].split("=", 1)[1]  # any expert serves as z^c
    prompt, rows_p = run("prompt", "--classify-only")
    cls, rows_c = run("cls", "--classify-only", "--strategy", "cls", "--cls-expert", cls_file)
    free, rows_f = run("free", "--classify-only", "--free-form", "--experts", *specs)
    for s, rows, task in ((prompt, rows_p, cls_task), (cls, rows_c, cls_task), (free, rows_f, dispatch.free_form)):
        assert "pass2_s" not in s and "acc" not in s and all("completion" not in r for r in rows)  # pass 1 only
        assert [r["category"] for r in rows] == [task.extract(r["pass1"]) for r in rows]
        assert s["dispatch_acc"] == sum(r["category"] == "math" for r in rows) / 4  # gsm8k is math
    assert [r["id"] for r in rows_c] == [r["id"] for r in rows_p]
    assert [r["pass1"] for r in rows_c] != [r["pass1"] for r in rows_p]  # z^c was merged for pass 1
    assert [r["pass1"] for r in rows_f] != [r["pass1"] for r in rows_p]  # another prompt (no prefill)
    # --strategy cls end to end: pass 2 routed by z^c's labels
    s, rows = run("cls2", "--strategy", "cls", "--cls-expert", cls_file, "--experts", *specs, "--max-new-tokens", "2")
    assert s["strategy"] == "cls" and "(n=4)" in s["acc"] and all("completion" in r for r in rows)
    assert [r["pass1"] for r in rows] == [r["pass1"] for r in rows_c]


# ----------------------------------------------------------------------------- the reader, defaults, bad input

def test_the_docstring_shows_the_adaptation_prompt():
    """dispatch.py quotes the paper's pass-1 prompt (Figure 3) as evals/classify.py defines it, word for word."""
    from evals.classify import INSTRUCTION
    words = lambda s: " ".join(s.split())  # noqa: E731
    assert words(INSTRUCTION.format(question="{question}")) in words(dispatch.__doc__)
    assert "evals/classify.py" in dispatch.__doc__ and '"\\boxed{"' in dispatch.__doc__


def test_no_flags_means_the_shipped_experts():
    shipped = ROOT / "experts" / "qwen2.5-coder-0.5b-instruct"
    args = dispatch.get_args(["What is 2 + 2?"])
    assert args.model is None and args.experts == {c: str(shipped / f"{c}.safetensors") for c in ("math", "code", "reasoning")}
    assert args.cls_expert is None
    assert dispatch.get_args(["Hi", "--strategy", "cls"]).cls_expert == str(shipped / "cls.safetensors")


def test_shipped_experts_on_another_model_are_refused_before_it_loads(smollm2_dir, capsys, monkeypatch):
    def fail(*a, **k):
        raise AssertionError("loaded a model or built an SVD cache for experts that cannot fit it")
    monkeypatch.setattr(Transformer, "from_pretrained", fail)
    monkeypatch.setattr(svd_cache, "load", fail)
    code, err = run_cli(["What is 2 + 2?", "--model", str(smollm2_dir)], capsys)
    assert code == 2 and "math.safetensors: does not fit" in err and err.count("\n") == 1


@pytest.mark.parametrize("flags, flag", [(["--limit", "-1"], "--limit"), (["--limit", "0"], "--limit"),
                                         (["--max-new-tokens", "0"], "--max-new-tokens"),
                                         (["--max-new-tokens", "-5"], "--max-new-tokens"),
                                         (["--slots", "0"], "--slots"), (["--threads", "0"], "--threads")])
def test_bad_counts_are_refused_where_parsed(flags, flag, capsys):
    """--limit -1 ran the whole split but one, --max-new-tokens 0 silently meant the default."""
    with pytest.raises(SystemExit) as e:
        dispatch.get_args(["--task", "gsm8k", *flags])
    assert e.value.code == 2 and f"argument {flag}" in capsys.readouterr().err


def test_a_prompt_that_is_not_utf8_is_a_usage_error(capsys):
    """Bytes that are not UTF-8 in argv arrive as lone surrogates; the tokenizer raised a TypeError."""
    with pytest.raises(SystemExit) as e:
        dispatch.get_args(["Hello \udcff world"])
    assert e.value.code == 2 and "is not valid UTF-8" in capsys.readouterr().err


def test_a_prompt_over_the_context_is_refused_before_the_model_loads(tiny_run, capsys, monkeypatch):
    """The tiny model's context is 4,096 tokens (config.json has none: the default): a longer question
    is refused with its length and the limit, before the model loads."""
    folder, specs, tmp = tiny_run
    monkeypatch.setattr(Transformer, "from_pretrained", lambda *a, **k: pytest.fail("loaded the model"))
    code, err = run_cli(["word " * 5000, "--model", str(folder), "--experts", *specs], capsys)
    assert code == 2 and "the question needs" in err and "is 4,096 (config.json max_position_embeddings)" in err
    code, err = run_cli(["word " * 3900, "--model", str(folder), "--experts", *specs, "--max-new-tokens", "300"], capsys)
    assert code == 2 and "lower --max-new-tokens" in err  # fits alone, not with 300 new tokens

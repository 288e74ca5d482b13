"""tools/table5.py (paper Table 5, cross-model transfer): experts of a tiny model A on a tiny model B
of the same shapes and other weights, in order and shuffled, against B's base model.

    .venv/bin/python -m pytest -q tests/test_table5.py
"""
import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
import table5  # noqa: E402

import cli  # noqa: E402
import svd_cache  # noqa: E402
import svf  # noqa: E402
from evals import TASKS  # noqa: E402
from evals.common import answer  # noqa: E402
from evals.gsm8k import GSM8K  # noqa: E402
from generate import Tokenizer  # noqa: E402
from model import Transformer  # noqa: E402


class Parity(GSM8K):
    """Real GSM8K prompts; 'correct' iff the completion has an even number of characters, so the
    tiny random models get varied verdicts."""

    def check(self, items, completions):
        return [len(c) % 2 == 0 for c in completions]


TASKS["parity5"] = Parity("parity5", splits=("test",), max_new_tokens=6)


@pytest.fixture
def two_models(tiny_dir, tmp_path, monkeypatch):
    """A = conftest's tiny model with one expert file; B = the same shapes, every weight re-drawn."""
    monkeypatch.setenv("T2_CACHE", str(tmp_path / "cache"))
    a = Transformer.from_pretrained(tiny_dir)
    cache = svd_cache.load(a, "mlp")
    g = torch.Generator().manual_seed(7)
    expert = svf.Expert.new({n: 2 * torch.randn(cache.rank(n), generator=g) for n in cache.names}, a, cache, task="e")
    expert.save(tmp_path / "e.safetensors")
    b = tmp_path / "b"
    shutil.copytree(tiny_dir, b)
    state = load_file(b / "model.safetensors")
    g = torch.Generator().manual_seed(1)
    save_file({k: 0.5 * torch.randn(v.shape, generator=g) for k, v in state.items()}, b / "model.safetensors")
    return b, tmp_path / "e.safetensors", tmp_path


def test_rows_in_order_and_shuffled_against_the_base(two_models):
    b, efile, tmp = two_models
    res = table5.main(table5.get_args(["--model", str(b), "--experts", str(efile), "--task", "parity5", "--limit", "8",
                                       "--max-new-tokens", "6", "--out", str(tmp / "out")]))
    assert list(res) == ["base", "e in order", "e shuffled"] and all(len(r) == 8 for r in res.values())
    # the in-order row is A's θ on B's singular values: the same answers as merging sigmoid(θ_A) into B by hand
    model, tok = Transformer.from_pretrained(b), Tokenizer.from_pretrained(b)
    items = TASKS["parity5"].load("test")[:8]
    theta = svf.Expert.load(efile).theta
    with svf.merged(model, {n: torch.sigmoid(t) for n, t in theta.items()}):
        by_hand = answer(model, tok, TASKS["parity5"], items, max_new_tokens=6)
    assert [r["correct"] for r in res["e in order"]] == [r["correct"] for r in by_hand]
    base = answer(model, tok, TASKS["parity5"], items, max_new_tokens=6)
    assert [r["correct"] for r in res["base"]] == [r["correct"] for r in base]
    table = (tmp / "out" / "table.md").read_text()
    assert "| e in order |" in table and "| e shuffled |" in table and "(n=8)" in table
    assert [json.loads(x)["correct"] for x in (tmp / "out" / "e-shuffled.jsonl").read_text().splitlines()] == \
        [r["correct"] for r in res["e shuffled"]]


def test_shuffled_is_a_permutation_of_each_vector(two_models):
    _, efile, _ = two_models
    (_, same), (_, shuffled) = table5.transferred([efile], seed=3)
    theta = svf.Expert.load(efile).theta
    for n, t in theta.items():
        assert torch.equal(same.theta[n], t)
        assert torch.equal(shuffled.theta[n].sort().values, t.sort().values) and not torch.equal(shuffled.theta[n], t)
    assert same.meta["base_fingerprint"] == "*" and shuffled.meta["transfer"] == "shuffled seed=3"


def test_without_transfer_the_fingerprint_refuses_and_shapes_are_checked_first(two_models, tmp_path, capsys,
                                                                               monkeypatch):
    """Why transfer exists: A's expert on B as is is refused (other base weights). An expert of other
    shapes is refused from B's config.json, before B loads."""
    b, efile, _ = two_models
    with pytest.raises(ValueError, match="expert was trained for base"):
        with svf.merged(Transformer.from_pretrained(b), efile):
            pass
    bad = svf.Expert({"model.layers.0.mlp.up_proj.weight": torch.zeros(7)},
                     {"parametrization": "sigmoid", "rescale": "true", "base_fingerprint": "x"})
    bad.save(tmp_path / "bad.safetensors")
    monkeypatch.setattr(Transformer, "from_pretrained", lambda *a, **k: pytest.fail("loaded B"))
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        cli.run(table5.main, table5.get_args(["--model", str(b), "--experts", str(tmp_path / "bad.safetensors"),
                                              "--task", "parity5"]))
    err = capsys.readouterr().err
    assert e.value.code == 2 and "bad.safetensors (transferred): does not fit" in err and "r=7" in err

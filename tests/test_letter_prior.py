"""tools/letter_prior.py: the bias fit against its closed form, option masking, and the letter
log-probabilities against a plain forward of each prompt."""
import json
import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))
import letter_prior  # noqa: E402


def test_fit_bias_matches_gold_frequencies():
    # a model with no opinion (equal log-probs) on 3-option questions whose gold is A 5x, B 3x, C 2x:
    # the maximum-likelihood biases make softmax(bias) the gold frequencies, so bias[B] - bias[A] =
    # log(3/5) and bias[C] - bias[A] = log(2/5); D and E are never options and keep 0
    gold = torch.tensor([0] * 5 + [1] * 3 + [2] * 2)
    bias = letter_prior.fit_bias(torch.zeros(10, 5), [3] * 10, gold)
    assert torch.allclose(bias, torch.tensor([0.0, math.log(3 / 5), math.log(2 / 5), 0.0, 0.0]), atol=1e-4)


def letter_habit():
    """20 four-option questions, gold A-D five times each: the gold letter at log-prob -1, "C" at
    -0.5 (when not gold), the rest at -3, so argmax answers C everywhere (right only when C is gold)."""
    gold = torch.tensor([0, 1, 2, 3] * 5)
    lp = torch.full((20, 5), -3.0)
    lp[:, 2] = -0.5
    lp[torch.arange(20), gold] = -1.0
    return lp, gold


def test_fitted_bias_removes_a_letter_habit():
    lp, gold = letter_habit()  # a negative bias on C makes every answer right
    assert (letter_prior.predict(lp, [4] * 20) == 2).all()
    bias = letter_prior.fit_bias(lp, [4] * 20, gold)
    assert bias[2] < -0.5
    assert (letter_prior.predict(lp, [4] * 20, bias) == gold).all()


def test_predict_only_picks_options():
    lp = torch.tensor([[-5.0, -4.0, -3.0, 0.0, 0.0]])  # D and E favoured, but the question has 3 options
    assert letter_prior.predict(lp, [3]).tolist() == [2]


def test_letter_logprobs_equal_a_forward_of_the_prompt(tiny_dir):
    from evals import get_task
    from evals.common import render_prompt
    from generate import Tokenizer
    from model import Transformer

    model, tok = Transformer.from_pretrained(tiny_dir), Tokenizer.from_pretrained(tiny_dir)
    task = get_task("arc_easy_direct")
    items = task.load("valid")[:3]
    lp = letter_prior.letter_logprobs(model, tok, task, items, batch=2)  # batches of unequal prompt lengths
    letters = [tok.encode(c)[0] for c in "ABCDE"]
    for i, it in enumerate(items):
        ids = torch.tensor([tok.encode(render_prompt(tok, task, it))])
        with torch.no_grad():
            ref = model(ids)[0, -1].log_softmax(-1)[letters]
        torch.testing.assert_close(lp[i], ref, atol=1e-4, rtol=1e-4)


def test_load_writes_per_item_files_evals_can_compare(tmp_path, capsys):
    lp, gold = letter_habit()  # saved as --out would; reported with --load
    split = {"ids": [f"q{i}" for i in range(20)], "gold": gold.tolist(), "n_choices": [4] * 20, "lp": lp.tolist()}
    saved = tmp_path / "letters.json"
    saved.write_text(json.dumps({"task": "arc_easy_direct", "expert": None, "splits": {"train": split, "valid": split}}))
    letter_prior.main(letter_prior.parse_args(["--load", str(saved), "--per-item", str(tmp_path / "items")]))
    out = capsys.readouterr().out
    assert "valid (n=20) | argmax 25.0%" in out and "with the fitted bias 100.0%" in out
    from evals.common import paired
    xs, ys = paired(tmp_path / "items" / "valid-argmax.jsonl", tmp_path / "items" / "valid-calibrated.jsonl")
    assert sum(xs) == 5 and sum(ys) == 20  # C right only when C is gold; calibrated: all


def test_load_names_a_missing_split(tmp_path):
    saved = tmp_path / "letters.json"
    saved.write_text(json.dumps({"task": "arc_easy_direct", "expert": None, "splits": {"train": {}}}))
    with pytest.raises(ValueError, match="has no split 'valid'"):
        letter_prior.main(letter_prior.parse_args(["--load", str(saved)]))


def test_load_refuses_another_tasks_letters(tmp_path):
    saved = tmp_path / "letters.json"
    saved.write_text(json.dumps({"task": "arc_challenge_direct", "expert": None, "splits": {}}))
    with pytest.raises(ValueError, match="holds arc_challenge_direct letters"):
        letter_prior.main(letter_prior.parse_args(["--load", str(saved)]))

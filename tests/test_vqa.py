"""evals/vqa.py (scoring, easy-vqa data) and the VLM through reinforce.py and the evals runner."""
import json

import pytest
import torch
from safetensors.torch import load_file

import reinforce
import svd_cache
import svf
import vlm
from evals import get_task
from evals.vqa import normalize, vqa_score
from test_vlm import save_tiny


def test_normalize_follows_vqa_rules():
    assert normalize("The Red car.") == "red car"
    assert normalize("two") == "2"
    assert normalize("3.5") == "3.5"
    assert normalize("yes!") == "yes"
    assert normalize("don't") == "dont"


def test_vqa_score_hand_computed():
    # 3 of 10 annotators said "two": leaving out one of them leaves 2 matches (2/3), leaving out
    # any of the other 7 leaves 3 (1.0): (3 * 2/3 + 7 * 1) / 10 = 0.9
    answers = ["two"] * 3 + ["three"] * 7
    assert vqa_score("2", answers) == pytest.approx(0.9)
    assert vqa_score("three", answers) == pytest.approx(1.0)
    assert vqa_score("four", answers) == 0.0
    assert vqa_score("One", ["one"]) == 1.0   # single reference: exact match after normalising
    assert vqa_score("circle", ["rectangle"]) == 0.0


def test_easy_vqa_splits_are_real_and_disjoint():
    task = get_task("easy_vqa")
    train, valid, test = task.load("train"), task.load("valid"), task.load("test")
    assert (len(train), len(valid), len(test)) == (34717, 3858, 9673)
    assert not {it["id"] for it in train} & {it["id"] for it in valid}
    from pathlib import Path
    assert all(Path(it["image"]).exists() for it in train[:50] + test[:50])
    assert task.check(test[:2], [test[0]["answers"][0] + ".", "banana"]) == [True, False]


def test_wrong_reward_option():
    import reinforce
    default = reinforce.get_args(["--task", "easy_vqa", "--out", "/tmp/x"])
    vlm_runs = reinforce.get_args(["--task", "easy_vqa", "--out", "/tmp/x", "--wrong-reward", "-0.1"])
    assert [reinforce.reward(c, False, default) for c in (True, False)] == [1.0, -1.0]
    assert [reinforce.reward(c, False, vlm_runs) for c in (True, False)] == [1.0, -0.1]


@pytest.fixture(scope="module")
def tiny_llava(smollm2_dir, tmp_path_factory):
    path = tmp_path_factory.mktemp("llava_vqa")
    save_tiny(path, "llava_next", smollm2_dir)
    return path


def test_svf_adapts_the_language_model_of_a_vlm(tiny_llava):
    """SVF on half the layers of the LM (as the paper's VLM runs): a non-uniform z changes the
    answer logits, a uniform z gives back the base model."""
    model, tok, pre = vlm.load(tiny_llava)
    lm = model.language_model
    cache = svd_cache.load(lm, targets="mlp", layers="half")
    assert sorted({n.split(".")[2] for n in cache.names}) == ["0"]        # layer 0 of 2
    ids, [im] = vlm.prepare(model, tok, "<image>\nwhat shape?", [get_task("easy_vqa").load("test")[0]["image"]], pre)
    x = torch.tensor([ids])
    base = model(x, [im])
    svf.attach(lm, cache)
    svf.set_z(lm, {n: torch.full_like(cache[n][1], 0.3) for n in cache.names})
    torch.testing.assert_close(model(x, [im]), base, atol=1e-4, rtol=1e-4)
    g = torch.Generator().manual_seed(0)
    svf.set_z(lm, {n: torch.rand(cache[n][1].shape, generator=g) for n in cache.names})
    assert (model(x, [im]) - base).abs().max() > 1e-2
    svf.detach(lm)


def test_reinforce_trains_a_vlm_expert_on_easy_vqa(tiny_llava, tmp_path):
    argv = ["--task", "easy_vqa", "--model", str(tiny_llava), "--out", str(tmp_path), "--batch-size", "4",
            "--micro-batch", "2", "--slots", "4", "--max-new-tokens", "3", "--steps", "1",
            "--valid-limit", "2", "--temperature", "1.0", "--layers", "half", "--wrong-reward", "-0.1",
            "--threads", "1"]
    st = reinforce.main(reinforce.get_args(argv))
    m = st["metrics"][-1]
    assert m["step"] == 1 and m["gen_tokens"] > 0 and m["grad_norm"] > 0
    # mean reward is the mean of +1 / -0.1 rewards over the 4 rollouts
    assert m["reward"] == pytest.approx(m["train_acc"] * 1.0 + (1 - m["train_acc"]) * -0.1)
    z = load_file(tmp_path / "last.safetensors")
    assert z and all(".layers.0." in n for n in z)


def test_task_and_checkpoint_kinds_must_match(tiny_llava, tiny_dir, tmp_path):
    with pytest.raises(ValueError, match="needs a LLaVA checkpoint"):
        reinforce.main(reinforce.get_args(["--task", "easy_vqa", "--model", str(tiny_dir), "--out", str(tmp_path)]))
    with pytest.raises(ValueError, match="needs a text checkpoint"):
        reinforce.main(reinforce.get_args(["--task", "gsm8k", "--model", str(tiny_llava), "--out", str(tmp_path)]))


def test_evals_runner_scores_a_vlm_on_easy_vqa(tiny_llava, tmp_path, capsys):
    from evals.__main__ import main, parse_args
    main(parse_args(["--task", "easy_vqa", "--model", str(tiny_llava), "--limit", "4", "--slots", "2",
                     "--out", str(tmp_path / "rows.jsonl"), "--threads", "1"]))
    out = capsys.readouterr().out
    assert "easy_vqa test" in out and "(n=4)" in out and "VQA accuracy" in out
    rows = [json.loads(line) for line in (tmp_path / "rows.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and all(isinstance(r["correct"], bool) for r in rows)


def test_textvqa_and_okvqa_loaders_read_the_official_formats(tmp_path):
    """Field layout of TextVQA_0.5.1_val.json and OK-VQA's questions/annotations files; the
    images must be in place (they are not available offline), else one clear error."""
    from evals.vqa import okvqa, textvqa
    tv = tmp_path / "textvqa"
    (tv / "train_images").mkdir(parents=True)
    rows = [{"question_id": 7, "question": "what brand is it?", "image_id": "abc", "answers": ["nokia"] * 10}]
    (tv / "TextVQA_0.5.1_val.json").write_text(json.dumps({"dataset_name": "textvqa", "data": rows}))
    with pytest.raises(FileNotFoundError, match="textvqa: images not found"):
        textvqa.load("test", data_dir=tmp_path)
    (tv / "train_images" / "abc.jpg").write_bytes(b"")
    [it] = textvqa.load("test", data_dir=tmp_path)
    assert it["answers"] == ["nokia"] * 10 and it["image"].endswith("train_images/abc.jpg")
    ok = tmp_path / "okvqa"
    with pytest.raises(FileNotFoundError, match="okvqa: put"):
        okvqa.load("test", data_dir=tmp_path)
    (ok / "val2014").mkdir(parents=True)
    (ok / "OpenEnded_mscoco_val2014_questions.json").write_text(json.dumps(
        {"questions": [{"question_id": 5, "question": "what sport?", "image_id": 42}]}))
    (ok / "mscoco_val2014_annotations.json").write_text(json.dumps(
        {"annotations": [{"question_id": 5, "answers": [{"answer": "tennis"}] * 10}]}))
    (ok / "val2014" / "COCO_val2014_000000000042.jpg").write_bytes(b"")
    [it] = okvqa.load("test", data_dir=tmp_path)
    assert it["answers"] == ["tennis"] * 10 and okvqa.check([it], ["Tennis."]) == [True]


def test_textvqa_valid_and_test_are_disjoint(tmp_path):
    """valid is held out of TextVQA's train file (1 in 10), test is its val file: early stopping
    never selects on the reported items, and train never sees valid."""
    from evals.vqa import textvqa
    tv = tmp_path / "textvqa"
    (tv / "train_images").mkdir(parents=True)
    (tv / "train_images" / "im.jpg").write_bytes(b"")

    def write(part, first_id, n):
        rows = [{"question_id": first_id + i, "question": "q?", "image_id": "im", "answers": ["a"] * 10} for i in range(n)]
        (tv / f"TextVQA_0.5.1_{part}.json").write_text(json.dumps({"dataset_name": "textvqa", "data": rows}))

    write("train", 0, 25)
    write("val", 1000, 4)
    train, valid, test = (textvqa.load(s, data_dir=tmp_path) for s in ("train", "valid", "test"))
    ids = [{it["id"] for it in x} for x in (train, valid, test)]
    assert ids[1] == {0, 10, 20} and ids[2] == {1000, 1001, 1002, 1003} and len(ids[0]) == 22
    assert not ids[0] & ids[1] and not ids[1] & ids[2] and not ids[0] & ids[2]

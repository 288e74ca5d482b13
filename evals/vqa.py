"""Visual question answering for vlm.py: easy-vqa offline, TextVQA / OKVQA from local files.

The paper trains SVF on LLaVA-NeXT's language model with TextVQA and transfers to OKVQA; neither
dataset's images ship offline (docs/DATA.md). Sources, per task:
  easy_vqa   the `easy-vqa` package (MIT): 64x64 images of one coloured shape, questions about its
             shape, colour and presence; one answer each. train = its train questions with
             index % 10 != 0, valid = index % 10 == 0, test = its test questions (9,673).
  textvqa    TextVQA 0.5.1 annotation JSON (`TextVQA_0.5.1_{train,val}.json`, fetched online into
             cache/ when missing) + images in <data-dir>/textvqa/train_images/<image_id>.jpg.
             train = its train questions with index % 10 != 0, valid = index % 10 == 0, test = val
             (the test split has no public answers). valid and test are disjoint, so early stopping
             never selects on the reported items.
  okvqa      OK-VQA val2014 questions + annotations (`OpenEnded_mscoco_val2014_questions.json`,
             `mscoco_val2014_annotations.json` in <data-dir>/okvqa/) + COCO images in
             <data-dir>/okvqa/val2014/. Transfer only: test = val.

Prompt: LLaVA-1.5's short-answer instruction ("Answer the question using a single word or
phrase."), the image first. Score: the VQA accuracy, min(1, #annotators who gave the answer / 3)
averaged over the 10 leave-one-out subsets of the 10 human answers, after the VQA answer
normalisation (lower case, punctuation, number words, articles); with a single reference answer
(easy-vqa) it is exact match after normalisation. "correct" (for rewards and paired tests) means
a score of 1. The training reward is reinforce.py's: +1 correct, -1 otherwise (the paper's VLM runs
use -0.1 for a wrong answer: `--wrong-reward -0.1`).

    python -m evals --task easy_vqa --model LLAVA_DIR --limit 200      # LLaVA checkpoints only
"""
import json
import re
from pathlib import Path

from evals.common import Task, fetch, find_data_dir

PROMPT = "<image>\n{question}\nAnswer the question using a single word or phrase."
NUMBERS = {w: str(i) for i, w in enumerate("zero one two three four five six seven eight nine ten".split())}
ARTICLES = {"a", "an", "the"}
TEXTVQA_URL = "https://dl.fbaipublicfiles.com/textvqa/data/TextVQA_0.5.1_{}.json"


def normalize(answer: str) -> str:
    """The VQA answer normalisation, condensed: lower case, drop punctuation (a period only when it
    is not a decimal point), number words -> digits, drop articles, squeeze spaces."""
    a = answer.lower().replace("\n", " ").replace("\t", " ").strip()
    a = re.sub(r"(?<!\d)\.(?!\d)", "", a)
    a = re.sub(r"[;/\[\]\"{}()=+\\_\-><@`,?!*#%^&$']", lambda m: "" if m.group() == "'" else " ", a)
    words = [NUMBERS.get(w, w) for w in a.split() if w not in ARTICLES]
    return " ".join(words)


def vqa_score(pred: str, answers: list[str]) -> float:
    """VQA accuracy of one prediction against the human answers."""
    p = normalize(pred)
    refs = [normalize(a) for a in answers]
    if len(refs) < 10:  # not a 10-annotator question: exact match after normalisation
        return float(p in refs)
    scores = []
    for i in range(len(refs)):  # leave annotator i out, score against the other 9
        matches = sum(r == p for j, r in enumerate(refs) if j != i)
        scores.append(min(1.0, matches / 3))
    return sum(scores) / len(scores)


def _easy_vqa(split):
    import importlib.util
    spec = importlib.util.find_spec("easy_vqa")
    if spec is None:
        raise FileNotFoundError("easy_vqa: the `easy-vqa` package is not installed (run `make setup`)")
    root = Path(list(spec.submodule_search_locations)[0]) / "data"
    part = "test" if split == "test" else "train"
    qs = json.loads((root / part / "questions.json").read_text())
    items = [{"id": f"{part}-{i}", "question": q, "answers": [a], "gold": [a],
              "image": str(root / part / "images" / f"{img}.png")} for i, (q, a, img) in enumerate(qs)]
    if split == "train":
        return [it for i, it in enumerate(items) if i % 10]
    if split == "valid":
        return [it for i, it in enumerate(items) if i % 10 == 0]
    return items


def _textvqa(split, data_dir):
    root = Path(data_dir) / "textvqa"
    part = "val" if split == "test" else "train"
    ann = root / f"TextVQA_0.5.1_{part}.json"
    if not ann.exists():
        ann = fetch(TEXTVQA_URL.format(part), ann.name)
    rows = json.loads(ann.read_text())["data"]
    items = [{"id": r["question_id"], "question": r["question"], "answers": r["answers"], "gold": r["answers"],
              "image": str(root / "train_images" / f"{r['image_id']}.jpg")} for r in rows]
    if split != "test":  # train and valid share the train file, one question in ten held out
        items = [it for i, it in enumerate(items) if (i % 10 == 0) == (split == "valid")]
    return _require_images(items, "textvqa", root / "train_images")


def _okvqa(split, data_dir):
    root = Path(data_dir) / "okvqa"
    q, a = root / "OpenEnded_mscoco_val2014_questions.json", root / "mscoco_val2014_annotations.json"
    if not (q.exists() and a.exists()):
        raise FileNotFoundError(f"okvqa: put {q.name} and {a.name} (okvqa.allenai.org) in {root}")
    answers = {x["question_id"]: [y["answer"] for y in x["answers"]] for x in json.loads(a.read_text())["annotations"]}
    items = [{"id": x["question_id"], "question": x["question"], "answers": answers[x["question_id"]],
              "gold": answers[x["question_id"]], "image": str(root / "val2014" / f"COCO_val2014_{x['image_id']:012d}.jpg")}
             for x in json.loads(q.read_text())["questions"]]
    return _require_images(items, "okvqa", root / "val2014")


def _require_images(items, name, folder):
    if not items or not Path(items[0]["image"]).exists():
        raise FileNotFoundError(f"{name}: images not found in {folder} (download them there; not available offline)")
    return items


class VQA(Task):
    def load(self, split, data_dir=None):
        self._check_split(split)
        if self.name == "easy_vqa":
            return _easy_vqa(split)
        data_dir = find_data_dir(data_dir)
        return _textvqa(split, data_dir) if self.name == "textvqa" else _okvqa(split, data_dir)

    def messages(self, item):
        return [{"role": "user", "content": PROMPT.format(question=item["question"])}]

    def extract(self, completion):
        line = completion.strip().split("\n")[0].strip()
        return line or None

    def score(self, items, completions) -> list[float]:
        return [vqa_score(self.extract(c) or "", it["answers"]) for it, c in zip(items, completions, strict=True)]

    def check(self, items, completions):
        return [s >= 1.0 for s in self.score(items, completions)]


easy_vqa = VQA("easy_vqa", splits=("train", "valid", "test"), max_new_tokens=10, stop=["\n"], images=True)
textvqa = VQA("textvqa", splits=("train", "valid", "test"), max_new_tokens=16, stop=["\n"], images=True)
okvqa = VQA("okvqa", splits=("test",), max_new_tokens=16, stop=["\n"], images=True)


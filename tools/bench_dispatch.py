"""Benchmark dispatch.py's pass 2: the one routed batch (rows on different experts, svf.py's per-row z)
against the official code's way, one weight merge per category group (merge that expert's W′,
answer its questions alone, restore). Check the machine is idle first.

It reads a finished `dispatch.py --task ... --out OUT` folder (summary.json: task, split, model,
experts, token cap and the routed pass 2's seconds; items.jsonl: each item's category and answer),
runs pass 2 again merged per category, and adds to OUT/summary.json `merged_pass2_s` (seconds,
against `pass2_s`) and `merged_same` (answers identical to the routed batch's; greedy, so all of
them up to float rounding). tools/pass2_table.py prints the time beside the routed one.

    python dispatch.py --task humaneval --strategy cls --limit 20 --out runs/dispatch-cls
    python tools/bench_dispatch.py runs/dispatch-cls
"""
import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import cli  # noqa: E402
import svf  # noqa: E402
from dispatch import adapted  # noqa: E402
from evals import get_task  # noqa: E402
from evals.common import answer, read_jsonl  # noqa: E402
from generate import Tokenizer  # noqa: E402
from model import Transformer  # noqa: E402


def pass2_merged(model, tok, task, items, categories, experts, cache, max_new_tokens=None, slots=64):
    """Pass 2 the official code's way: per category, merge that expert into the weights (svf.merged;
    "other" = the base weights) and answer its questions alone. Returns the completions in item order."""
    svf.detach(model)  # merging writes W′ into the plain nn.Linear weights
    texts = [None] * len(items)
    try:
        for c in sorted(set(categories)):
            group = [i for i, p in enumerate(categories) if p == c]
            with adapted(model, c, experts, cache):  # the SVD factors loaded once, not per group
                records = answer(model, tok, task, [items[i] for i in group], max_new_tokens=max_new_tokens,
                                 slots=slots, check=False, progress=f"pass 2 merged, {c}")
            for i, r in zip(group, records):
                texts[i] = r["completion"]
    finally:
        svf.attach(model, cache)
    return texts


def main(args):
    torch.set_num_threads(args.threads)
    out = Path(args.run)
    summary = json.loads((out / "summary.json").read_text())
    rows = read_jsonl(out / "items.jsonl")
    if "pass2_s" not in summary or not summary.get("experts"):
        raise ValueError(f"{out}: no routed pass 2 to time against (a --classify-only or fewshot run)")
    task = get_task(summary["task"])
    by_id = {json.dumps(it["id"]): it for it in task.load(summary.get("split", "test"))}
    items = [by_id[json.dumps(r["id"])] for r in rows]
    device, dtype = cli.device_and_dtype(args)
    model = Transformer.from_pretrained(summary["model"], dtype=dtype, device=device)
    tok = Tokenizer.from_pretrained(summary["model"])
    loaded, cache = svf.load_experts(model, list(summary["experts"].values()))
    experts = dict(zip(summary["experts"], loaded))
    categories, routed = [r["category"] for r in rows], [r["completion"] for r in rows]
    t0 = time.perf_counter()
    merged = pass2_merged(model, tok, task, items, categories, experts, cache, summary.get("max_new_tokens"), args.slots)
    summary.update(merged_pass2_s=time.perf_counter() - t0, merged_same=sum(a == b for a, b in zip(merged, routed)))
    print(f"pass 2, merged per category ({len(set(categories))} groups) | {summary['merged_pass2_s']:.1f} s vs "
          f"{summary['pass2_s']:.1f} s in one routed batch | same answer {summary['merged_same']}/{len(items)}")
    with cli.atomic_write(out / "summary.json") as tmp:
        tmp.write_text(json.dumps(summary, indent=1))
    return summary


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", help="a dispatch.py --task ... --out folder (summary.json, items.jsonl)")
    p.add_argument("--slots", type=cli.positive_int, default=64, help="sequences decoded together")
    p.add_argument("--threads", type=cli.positive_int, default=min(2, os.cpu_count() or 1))
    cli.add_device_args(p)
    return p.parse_args(argv)


if __name__ == "__main__":
    cli.run(main, get_args())

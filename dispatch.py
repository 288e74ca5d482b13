"""Two-pass inference (Transformer² paper §3.3, docs/PAPER.md §4): pass 1 picks z′, pass 2 answers with W′(z′).

Strategies for pass 1:
  prompt    the base model labels the question code / math / reasoning / other inside \\boxed{}
            (prompt and parser: evals/classify.py; the answer is pre-filled with "\\boxed{", since a
            135M model never writes the box itself: --free-form for the paper's version); unparseable -> other
  cls       the same question, asked with the classification expert z^c merged
            (trained by `python reinforce.py --task cls`)
  fewshot   z′ = Σ_k α_k·z_k with α found by cem.py for the task (--alpha runs/cem-*/alpha.json)
"other" answers with exactly the base weights, as the paper says, in routed batches too (svf.set_z's
base_rows). (The official code keeps whichever expert it loaded last, so "other" silently reuses a
stale expert: a bug we fix.) All experts of one run share one Σσ rescale rule, their own flag: a set
that mixes flags is refused (svf.load_experts).

Experts are always named explicitly (--experts math=F code=F reasoning=F, --cls-expert F); `make dispatch`
passes the shipped experts/<model>/*.safetensors (the Makefile states which file is the default and why).
With the shipped ones:
    M=checkpoints/qwen2.5-coder-0.5b-instruct X=experts/qwen2.5-coder-0.5b-instruct
    E="--experts math=$X/math.safetensors code=$X/code.safetensors reasoning=$X/reasoning.safetensors"

One prompt: merged weights, prints category, expert, answer and both passes' times:
    python dispatch.py "Write a function that reverses a linked list." --model $M $E   # the question first
A whole task: accuracy (95% CI), dispatch confusion matrix (rows true, columns predicted),
pass-1 / pass-2 seconds (paper Table 3), with --compare-base a McNemar test vs the base, and with
--time-merged the time of pass 2 done the official way (one weight merge per category group) against
the one routed batch (rows on different experts, svf.py's per-row z):
    python dispatch.py --model $M $E --task humaneval --strategy prompt --limit 20 --out runs/dispatch-humaneval
    python dispatch.py --model $M $E --task humaneval --strategy cls --cls-expert $X/cls.safetensors --limit 20
    python dispatch.py --model $M --task math --classify-only --limit 30       # pass 1 only: no experts needed
"""
import argparse
import json
import os
import time
from contextlib import nullcontext
from pathlib import Path

import torch

import cli
import svf
from evals import get_task
from evals.classify import CATEGORIES, cls_task, free_form
from evals.common import answer, fmt_acc, format_counts, format_tally, mcnemar, read_jsonl, write_jsonl
from evals.plots import plot_confusion
from generate import Tokenizer, generate
from model import Transformer

TRUE_CATEGORY = {"math": "math", "gsm8k": "math", "humaneval": "code", "mbpp": "code",
                 "arc_easy": "reasoning", "arc_challenge": "reasoning",
                 "arc_easy_direct": "reasoning", "arc_challenge_direct": "reasoning"}
EXPERT_CATEGORIES = ("math", "code", "reasoning")  # pass 1's categories that have an expert ("other" has none)


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("what to answer")
    g.add_argument("prompt", nargs="?", help="one question (else --task)")
    g.add_argument("--task", help="a whole benchmark: math, gsm8k, humaneval, mbpp, arc_easy, arc_challenge "
                                   "(or arc_*_direct: letter only)")
    g.add_argument("--split", default="test")
    g.add_argument("--limit", type=int, default=None, help="first N items")
    g.add_argument("--model", default="checkpoints/smollm2-135m-instruct")
    g = p.add_argument_group("pass 1: choosing z′")
    g.add_argument("--strategy", default="prompt", choices=["prompt", "cls", "fewshot"])
    g.add_argument("--experts", nargs="*", default=[], metavar="CAT=FILE",
                   help="math=F code=F reasoning=F (strategies prompt and cls; not needed with --classify-only)")
    g.add_argument("--cls-expert", default=None, metavar="FILE", help="strategy cls: the classification expert z^c")
    g.add_argument("--alpha", default=None, help="strategy fewshot: cem.py's JSON (experts, alpha, mode)")
    g.add_argument("--classify-only", action="store_true", help="task: pass 1 only (dispatch accuracy)")
    g.add_argument("--free-form", action="store_true", help="pass 1 without the \\boxed{ prefill (evals/classify.py)")
    g = p.add_argument_group("generation and output")
    g.add_argument("--slots", type=int, default=64, help="sequences decoded together (continuous batching)")
    g.add_argument("--max-new-tokens", type=int, default=None, help="pass 2 (default: the task's, or 512)")
    g.add_argument("--compare-base", action="store_true", help="also answer with the base model (McNemar)")
    g.add_argument("--time-merged", action="store_true",
                   help="also run pass 2 the official way (merge each category's expert, answer its group) and "
                        "report its time against the one routed batch")
    g.add_argument("--out", default=None, help="folder: items.jsonl, summary.json, confusion.png; passes 1 and 2 "
                   "are saved first (passes.json), so rerunning a killed command skips them")
    g.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    cli.add_device_args(p)
    args = p.parse_args(argv)
    # flags that cannot work together are usage errors, before anything is loaded
    bad = [s for s in args.experts if "=" not in s or s.split("=", 1)[0] not in EXPERT_CATEGORIES]
    if bad and not args.prompt and not args.task and bad[-1] == args.experts[-1] and "=" not in bad[-1]:
        p.error(f"--experts swallowed {bad[-1]!r}: put the question before the flags (dispatch.py \"...\" --experts ...)")
    if bad:
        p.error(f"--experts takes CAT=FILE with CAT in {', '.join(EXPERT_CATEGORIES)}; got {bad[0]!r}")
    if bool(args.prompt) == bool(args.task):
        p.error("give either one prompt or --task NAME")
    args.experts = dict(s.split("=", 1) for s in args.experts)
    if args.strategy == "fewshot" and not args.alpha:
        p.error("--strategy fewshot needs --alpha FILE (cem.py's alpha.json)")
    if args.strategy == "cls" and not args.cls_expert:
        p.error("--strategy cls needs --cls-expert FILE (the classification expert: `make train TASK=cls`)")
    missing = [c for c in EXPERT_CATEGORIES if c not in args.experts]
    if args.strategy != "fewshot" and not args.classify_only and missing:
        p.error(f"--experts lacks {', '.join(f'{c}=FILE' for c in missing)} (`make dispatch` passes the shipped "
                f"experts/ files; --classify-only needs none)")
    return args


# -----------------------------------------------------------------------------
# Experts

def fewshot_z(alpha_file, model):
    """z′ per matrix from cem.py's JSON: {"experts": [...], "alpha": ..., "mode": "z", "normalize": ...};
    returns (z′, the experts' shared rescale flag)."""
    try:
        spec = json.loads(Path(alpha_file).read_text())
        files = spec["experts"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"{alpha_file}: not cem.py's alpha.json ({type(e).__name__}: {e})") from None
    experts, _ = svf.load_experts(model, files, factored=False)
    alpha = torch.tensor(spec["alpha"], dtype=torch.float32)
    alpha = alpha.reshape(len(experts)) if alpha.numel() == len(experts) else alpha  # (K,) or (K, n_matrices)
    if spec.get("normalize"):  # idempotent when cem.py already saved α normalised to sum 1
        alpha = alpha / alpha.sum(0, keepdim=True)
    return svf.mix(experts, alpha, spec.get("mode", "z")), experts[0].rescale


# -----------------------------------------------------------------------------
# Pass 1 and pass 2

def classify(model, tok, questions, cls_expert=None, slots=64, task=cls_task):
    """Pass 1: a category per question, base weights or with z^c merged in (the cls task's prompt)."""
    ctx = svf.merged(model, cls_expert) if cls_expert is not None else nullcontext()
    with ctx:
        records = answer(model, tok, task, [{"question": q} for q in questions], slots=slots, check=False,
                         progress="pass 1")
    return [r["extracted"] for r in records], [r["completion"] for r in records]


def adapted(model, category, experts, cache=None):
    """Single prompt: W′ of the chosen expert merged in, or for "other" the base weights, exactly
    (cache: the experts' SVD cache, when already loaded)."""
    if category == "other" or category not in experts:
        svf.set_z(model, None)  # a no-op unless attached; never any leftover expert (official bug)
        return nullcontext(model)
    return svf.merged(model, experts[category], cache)


def row_zs(experts, categories, cache):
    """Batch routed to several experts: {name: (B, r)}, row b carrying its category's z with the
    rescale already folded in (so set_z(..., rescale=False)). "other" rows get a placeholder z = 1:
    answer() marks them base_rows, so they run on W itself, exactly as the single-prompt path."""
    out = {}
    for name in cache.names:
        S = cache[name][1]
        rows = [svf.fold_rescale(S, experts[c].z(name).to(S), experts[c].rescale) if c in experts
                else torch.ones_like(S) for c in categories]
        out[name] = torch.stack(rows)  # (B, r)
    return out


def pass2(model, tok, task, items, categories, experts, cache, args):
    """Pass 2 for a task: one engine call whose rows may use different experts (svf.py's per-row z);
    "other" rows run on the base weights W exactly (base_rows), not on its reconstruction.
    Returns evals.common.answer's records (completion, extracted, cut, correct per item)."""
    zs = row_zs(experts, categories, cache) if experts else None
    base = [c not in experts for c in categories] if experts else None
    return answer(model, tok, task, items, max_new_tokens=args.max_new_tokens, slots=args.slots, zs=zs,
                  rescale=False, base_rows=base, progress="pass 2")


def pass2_merged(model, tok, task, items, categories, experts, cache, args):
    """Pass 2 the official code's way, for timing against pass2's one batch: per category, merge that
    expert into the weights (svf.merged; "other" = the base weights) and answer its questions alone."""
    svf.detach(model)  # merging writes W′ into the plain nn.Linear weights
    texts = [None] * len(items)
    try:
        for c in sorted(set(categories)):
            group = [i for i, p in enumerate(categories) if p == c]
            with adapted(model, c, experts, cache):  # the SVD factors loaded once, not per group
                records = answer(model, tok, task, [items[i] for i in group], max_new_tokens=args.max_new_tokens,
                                 slots=args.slots, check=False, progress=f"pass 2 merged, {c}")
            for i, r in zip(group, records):
                texts[i] = r["completion"]
    finally:
        svf.attach(model, cache)
    return texts


def passes(model, tok, task, items, true, experts, cache, cls_expert, mixed, pass1, args):
    """Pass 1 (a category per item, batched) and pass 2 (answers in routed batches) over a task's items:
    the summary (dispatch accuracy, confusion, times, accuracy) and one row per item."""
    t0 = time.perf_counter()
    if mixed:  # few-shot: α was searched offline by cem.py; pass 1 here is only the mixing
        pred, raw = ["mixed"] * len(items), [""] * len(items)
    else:
        pred, raw = classify(model, tok, [task.messages(it)[-1]["content"] for it in items], cls_expert, args.slots, pass1)
    t1 = time.perf_counter()
    matrix = confusion([true] * len(items), pred)
    k_dispatch = sum(p == true for p in pred)
    summary = {"task": task.name, "strategy": args.strategy, "n": len(items), "model": args.model,
               "experts": {c: e.source for c, e in experts.items()}, "pass1_s": t1 - t0,
               "categories": list(CATEGORIES), "confusion": matrix,
               "dispatch_acc": k_dispatch / max(len(items), 1), "dispatch": fmt_acc(k_dispatch, len(items))}
    print(f"pass 1 | {args.strategy} | {t1 - t0:.1f} s | " + ("one z′ for all (cem.py's α)" if mixed else
          f"dispatch accuracy {summary['dispatch']} (true: {true})"))
    print("confusion (rows true, cols predicted)\n" + f"{'':>10}" + "".join(f"{c:>10}" for c in CATEGORIES))
    print("\n".join(f"{a:>10}" + "".join(f"{v:>10}" for v in row) for a, row in zip(CATEGORIES, matrix)))
    rows = [{"id": it["id"], "category": p, "pass1": r} for it, p, r in zip(items, pred, raw)]
    if args.classify_only:
        return summary, rows
    if mixed:  # one z′ for every row: merge it once (zero overhead)
        with svf.merged(model, mixed[0], rescale=mixed[1]):
            records = pass2(model, tok, task, items, pred, {}, None, args)
    else:  # rows routed to different experts: the factored layers (attached above), one z per row
        records = pass2(model, tok, task, items, pred, experts, cache, args)
    t2 = time.perf_counter()
    correct = [r["correct"] for r in records]
    k = sum(correct)
    # format apart from accuracy: answered (a final answer was found), cut (ran into the token cap)
    summary.update(pass2_s=t2 - t1, ratio=(t1 - t0) / (t2 - t1), accuracy=k / max(len(items), 1),
                   acc=fmt_acc(k, len(items)), **format_tally(records))
    print(f"pass 2 | {t2 - t1:.1f} s | pass 1 / pass 2 = {summary['ratio']:.2f} | {format_counts(records)}")
    for row, r in zip(rows, records):
        row.update(completion=r["completion"], answered=r["extracted"] is not None, cut=r["cut"],
                   correct=r["correct"])
    if args.compare_base:  # the same items, exact base weights, paired test
        base = [r["correct"] for r in pass2(model, tok, task, items, pred, {}, None, args)]
        summary.update(base_acc=fmt_acc(sum(base), len(items)), mcnemar_p=mcnemar(correct, base))
        print(f"base   | accuracy {summary['base_acc']} | McNemar p = {summary['mcnemar_p']:.3g} (paired, n={len(items)})")
        for row, ok in zip(rows, base):
            row["base_correct"] = ok
    return summary, rows


def write_json(path, obj):
    """JSON written to a temporary file and renamed: the file is whole or absent."""
    tmp = Path(path).with_name(Path(path).name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


def confusion(true, pred):
    return [[sum(1 for t, p in zip(true, pred) if (t, p) == (a, b)) for b in CATEGORIES] for a in CATEGORIES]


# -----------------------------------------------------------------------------

def main(args):
    torch.set_num_threads(args.threads)
    task = get_task(args.task) if args.task else None
    # read the expert files before minutes of model loading: a missing or corrupt one fails now
    routed = {} if args.strategy == "fewshot" or args.classify_only else \
        {c: svf.Expert.load(args.experts[c]) for c in EXPERT_CATEGORIES}
    cls_expert = svf.Expert.load(args.cls_expert) if args.strategy == "cls" else None
    if args.strategy == "fewshot" and not Path(args.alpha).is_file():
        raise FileNotFoundError(f"{args.alpha}: no such file (cem.py writes runs/cem-TASK/alpha.json)")
    device, dtype = cli.device_and_dtype(args)
    model = Transformer.from_pretrained(args.model, dtype=dtype, device=device)
    tok = Tokenizer.from_pretrained(args.model)
    experts, cache = {}, None
    if routed:  # one rescale rule, checked against the model; a task's routed batches need the factored layers
        loaded, cache = svf.load_experts(model, list(routed.values()), factored=task is not None)
        experts = dict(zip(routed, loaded))
    if cls_expert is not None:
        (cls_expert,), _ = svf.load_experts(model, [cls_expert], factored=False)
    mixed = fewshot_z(args.alpha, model) if args.strategy == "fewshot" else None
    pass1 = free_form if args.free_form else cls_task

    if task is None:  # ---- one prompt: exact base or merged weights
        t0 = time.perf_counter()
        category = "mixed" if mixed else classify(model, tok, [args.prompt], cls_expert, task=pass1)[0][0]
        t1 = time.perf_counter()
        ctx = svf.merged(model, mixed[0], rescale=mixed[1]) if mixed else adapted(model, category, experts)
        with ctx:
            prompt = tok.apply_chat_template([{"role": "user", "content": args.prompt}])
            text = generate(model, tok, [prompt], max_new_tokens=args.max_new_tokens or 512).texts[0]
        t2 = time.perf_counter()
        used = args.alpha if mixed else experts[category].source if category in experts else "base weights"
        print(f"category {category} | expert {used}\n{text}\npass 1 {t1 - t0:.1f} s | pass 2 {t2 - t1:.1f} s")
        return {"category": category, "expert": used, "answer": text, "pass1_s": t1 - t0, "pass2_s": t2 - t1}

    # ---- a whole task: classify everything (batched), then answer in routed batches
    items = task.load(args.split)
    if mixed:  # the shots CEM adapted on are never scored: the first --limit items without them (as cem.py)
        spec = json.loads(Path(args.alpha).read_text())
        shots = {json.dumps(i) for i in spec.get("shots", [])} if spec.get("task") == task.name else set()
        items = [it for it in items if json.dumps(it["id"]) not in shots]
        print(f"fewshot: α from {args.alpha}; its {len(shots)} shots are left out")
    items = items[:args.limit]
    true = TRUE_CATEGORY.get(task.name, "other")
    out = Path(args.out) if args.out else None
    # what passes 1 and 2 depend on: a rerun into the same --out with the same settings reuses them
    run = {"task": task.name, "split": args.split, "ids": [json.dumps(it["id"]) for it in items],
           "strategy": args.strategy, "model": str(args.model), "experts": {c: e.source for c, e in experts.items()},
           "cls_expert": args.cls_expert, "alpha": args.alpha, "free_form": args.free_form,
           "max_new_tokens": args.max_new_tokens, "classify_only": args.classify_only, "compare_base": args.compare_base}
    done = out / "passes.json" if out else None
    if done is not None and done.exists() and json.loads(done.read_text()).get("run") == run:
        summary = {k: v for k, v in json.loads(done.read_text()).items() if k != "run"}
        rows = read_jsonl(out / "items.jsonl")
        print(f"passes 1 and 2 reused from {done} (a rerun of the same command; delete it to redo them)")
    else:
        summary, rows = passes(model, tok, task, items, true, experts, cache, cls_expert, mixed, pass1, args)
        if out is not None:  # saved before the optional timing below: a run killed there keeps its results
            write_jsonl(out / "items.jsonl", rows)
            write_json(done, {"run": run, **summary})
    if args.time_merged and experts and not args.classify_only and "merged_pass2_s" not in summary:
        # the same pass 2, one weight merge per category group (the official code's way), timed
        pred, texts = [r["category"] for r in rows], [r["completion"] for r in rows]
        t3 = time.perf_counter()
        merged = pass2_merged(model, tok, task, items, pred, experts, cache, args)
        summary.update(merged_pass2_s=time.perf_counter() - t3, merged_same=sum(a == b for a, b in zip(merged, texts)))
        print(f"pass 2, merged per category ({len(set(pred))} groups) | {summary['merged_pass2_s']:.1f} s vs "
              f"{summary['pass2_s']:.1f} s in one batch | same answer {summary['merged_same']}/{len(items)}")

    if out is not None:
        write_json(out / "summary.json", summary)
        plot_confusion(out / "confusion.png", summary["confusion"], CATEGORIES,
                       f"{task.name} | {args.strategy} | n={len(items)}")
        print(f"wrote {out}/items.jsonl, summary.json, confusion.png")
    return summary


if __name__ == "__main__":
    cli.run(main, get_args())

"""Two-pass inference (Transformer² paper §3.3, docs/PAPER.md §4): pass 1 picks z′, pass 2 answers with W′(z′).

Pass 1 asks the model itself which expert a question needs, with the paper's adaptation prompt
(its Figure 3: the structure kept, the wording ours). It lives in evals/classify.py (INSTRUCTION,
after a one-line system turn), shared with the cls task that trains z^c, so pass 1 at dispatch
time is exactly what z^c was trained on:

    Do not answer the question below. Only decide which kind of question it is.

    Question:
    {question}

    Categories:
    - code: the question asks to write, complete or fix a computer program
    - math: the question needs arithmetic, algebra or another calculation to reach a number
    - reasoning: the question needs scientific or common-sense reasoning to pick an option
    - other: anything else

    Answer with the category name inside \\boxed{}. Which category fits the question best: code,
    math, reasoning or other?

and the answer is pre-filled with "\\boxed{", so the next word IS the label (a 135M model never
writes the box itself; --free-form is the paper's unprefilled version). The first boxed word is
the category; anything unparseable is "other". Strategies for pass 1:
  prompt    the base model answers that prompt
  cls       the same prompt with the classification expert z^c merged (`make train TASK=cls`)
  fewshot   no question asked: z′ = Σ_k α_k·z_k with α found by cem.py (--alpha runs/cem-*/alpha.json)
"other" answers with exactly the base weights, as the paper says, in routed batches too (svf.set_z's
base_rows). (The official code keeps whichever expert it loaded last, so "other" silently reuses a
stale expert: a bug we fix.) All experts of one run share one Σσ rescale rule, their own flag: a set
that mixes flags is refused (svf.load_experts).

With no flags the shipped experts answer, experts/qwen2.5-coder-0.5b-instruct/{math,code,reasoning}
(and cls.safetensors for --strategy cls), on the base model their metadata names (checkpoints/<name>;
`make model MODEL=qwen2.5-coder-0.5b` fetches it); experts that do not fit --model are refused before
it loads. A question longer than the model's context is refused before it loads, too.

One prompt: merged weights, prints category, expert, answer and both passes' times:
    python dispatch.py "Write a function that reverses a linked list."   # the question first
A whole task: accuracy (95% CI), dispatch confusion matrix (rows true, columns predicted),
pass-1 / pass-2 seconds (paper Table 3), with --compare-base a McNemar test vs the base:
    python dispatch.py --task humaneval --strategy prompt --limit 20 --out runs/dispatch-humaneval
    python dispatch.py --task humaneval --strategy cls --limit 20
    python dispatch.py --task math --classify-only --limit 30       # pass 1 only: no experts loaded
    python dispatch.py --model DIR --experts math=F code=F reasoning=F --cls-expert F ...   # your own
Pass 2 the official way (one weight merge per category group), timed against the routed batch:
tools/bench_dispatch.py OUT.
Why past docs/STYLE.md's 150–250 lines: three pass-1 strategies, pass 2 with per-row z, and the checks that
refuse a bad question or mismatched experts before the model loads.
"""
import argparse
import json
import os
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch

import cem
import cli
import svf
from evals import get_task
from evals.classify import CATEGORIES, cls_task, free_form
from evals.common import Task, answer, fmt_acc, format_counts, format_tally, mcnemar, render_prompt, write_jsonl
from evals.plots import plot_confusion
from generate import Tokenizer, generate
from model import ModelConfig, Transformer

TRUE_CATEGORY = {"math": "math", "gsm8k": "math", "humaneval": "code", "mbpp": "code",
                 "arc_easy": "reasoning", "arc_challenge": "reasoning",
                 "arc_easy_direct": "reasoning", "arc_challenge_direct": "reasoning"}
EXPERT_CATEGORIES = ("math", "code", "reasoning")  # pass 1's categories that have an expert ("other" has none)


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("what to answer")
    g.add_argument("prompt", nargs="?", type=cli.utf8_text, help="one question (else --task)")
    g.add_argument("--task", help="a whole benchmark: math, gsm8k, humaneval, mbpp, arc_easy, arc_challenge "
                                   "(or arc_*_direct: letter only)")
    g.add_argument("--split", default="test")
    g.add_argument("--limit", type=cli.positive_int, default=None, help="first N items (default: the whole split)")
    g.add_argument("--model", default=None, help="default: the experts' base model, checkpoints/<name in their metadata>")
    g = p.add_argument_group("pass 1: choosing z′")
    g.add_argument("--strategy", default="prompt", choices=["prompt", "cls", "fewshot"])
    g.add_argument("--experts", nargs="*", default=None, metavar="CAT=FILE",
                   help="math=F code=F reasoning=F (default: the shipped ones in experts/qwen2.5-coder-0.5b-instruct/)")
    g.add_argument("--cls-expert", default=None, metavar="FILE",
                   help="strategy cls: the classification expert z^c (default: the shipped cls.safetensors)")
    g.add_argument("--alpha", default=None, help="strategy fewshot: cem.py's JSON (experts, alpha, mode)")
    g.add_argument("--classify-only", action="store_true", help="task: pass 1 only (dispatch accuracy)")
    g.add_argument("--free-form", action="store_true", help="pass 1 without the \\boxed{ prefill (evals/classify.py)")
    g = p.add_argument_group("generation and output")
    g.add_argument("--slots", type=cli.positive_int, default=64, help="sequences decoded together (continuous batching)")
    g.add_argument("--max-new-tokens", type=cli.positive_int, default=None, help="pass 2 (default: the task's, or 512)")
    g.add_argument("--compare-base", action="store_true", help="also answer with the base model (McNemar)")
    g.add_argument("--out", default=None, help="folder: items.jsonl, summary.json, confusion.png")
    g.add_argument("--force", action="store_true", help="replace the results in an existing --out folder")
    g.add_argument("--threads", type=cli.positive_int, default=min(2, os.cpu_count() or 1))
    cli.add_device_args(p)
    args = p.parse_args(argv)
    # flags that cannot work together are usage errors, before anything is loaded
    given = args.experts or []
    bad = [s for s in given if "=" not in s or s.split("=", 1)[0] not in EXPERT_CATEGORIES]
    if bad and not args.prompt and not args.task and bad[-1] == given[-1] and "=" not in bad[-1]:
        p.error(f"--experts swallowed {bad[-1]!r}: put the question before the flags (dispatch.py \"...\" --experts ...)")
    if bad:
        p.error(f"--experts takes CAT=FILE with CAT in {', '.join(EXPERT_CATEGORIES)}; got {bad[0]!r}")
    if bool(args.prompt) == bool(args.task):
        p.error("give either one prompt or --task NAME")
    if args.strategy == "fewshot" and not args.alpha:
        p.error("--strategy fewshot needs --alpha FILE (cem.py's alpha.json)")
    missing = [c for c in EXPERT_CATEGORIES if c not in dict(s.split("=", 1) for s in given)]
    if args.experts and missing and not args.classify_only and args.strategy != "fewshot":
        p.error(f"--experts lacks {', '.join(f'{c}=FILE' for c in missing)} (with no --experts: the shipped ones)")
    # no --experts: the shipped ones (and their z^c for --strategy cls)
    args.experts = dict(s.split("=", 1) for s in given) if args.experts else \
        {c: str(cem.SHIPPED / f"{c}.safetensors") for c in EXPERT_CATEGORIES}
    if args.strategy == "cls" and args.cls_expert is None:
        args.cls_expert = str(cem.SHIPPED / "cls.safetensors")
    return args


# -----------------------------------------------------------------------------
# Experts: what pass 1 can choose from

@dataclass
class Mix:
    """Few-shot z′ = Σ_k α_k·z_k (one z per adapted matrix), its experts' Σσ rule and α's file."""
    zs: dict
    rescale: bool
    source: str


@dataclass
class Choices:
    """What pass 1 chooses between and how it asks: the pass-1 task (the prompt above, prefilled or
    free-form), routed experts by category (their SVD cache: the factored layers), the
    classification expert z^c (strategy cls), or one few-shot mix (strategy fewshot)."""
    pass1: Task
    experts: dict = field(default_factory=dict)
    cache: object = None
    cls_expert: svf.Expert | None = None
    mix: Mix | None = None


def read_alpha(alpha_file):
    """cem.py's JSON {"experts": [...], "alpha": ..., "mode": "z", "normalize": ..., "shots": ...} and its
    expert files, read (not yet checked against a model)."""
    try:
        spec = json.loads(Path(alpha_file).read_text())
        files = spec["experts"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"{alpha_file}: not cem.py's alpha.json ({type(e).__name__}: {e})") from None
    return spec, [svf.Expert.load(f) for f in files]


def fewshot_z(alpha_file, model):
    """The Mix of cem.py's alpha.json, its experts checked against `model`."""
    spec, experts = read_alpha(alpha_file)
    experts, _ = svf.load_experts(model, experts, factored=False)
    alpha = torch.tensor(spec["alpha"], dtype=torch.float32)
    alpha = alpha.reshape(len(experts)) if alpha.numel() == len(experts) else alpha  # (K,) or (K, n_matrices)
    if spec.get("normalize"):  # idempotent when cem.py already saved α normalised to sum 1
        alpha = alpha / alpha.sum(0, keepdim=True)
    return Mix(svf.mix(experts, alpha, spec.get("mode", "z")), experts[0].rescale, str(alpha_file))


def check_context(tok, model_dir, question, pass1, max_new_tokens):
    """A question the model cannot hold (prompt + new tokens past its context) is refused now, with the
    numbers, rather than answered with garbage after minutes: pass 1's prompt wraps it in the
    instruction, pass 2's is the question alone."""
    limit = ModelConfig.from_json(Path(model_dir) / "config.json").max_position_embeddings
    p1 = len(tok.encode(render_prompt(tok, pass1, {"question": question}))) + pass1.max_new_tokens
    p2 = len(tok.encode(tok.apply_chat_template([{"role": "user", "content": question}]))) + max_new_tokens
    if max(p1, p2) > limit:
        raise ValueError(f"the question needs {max(p1, p2):,} tokens (pass 1 with the instruction: {p1:,}, pass 2: "
                         f"{p2:,}, new tokens included), the context of {model_dir} is {limit:,} "
                         f"(config.json max_position_embeddings); shorten it or lower --max-new-tokens")


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


def passes(model, tok, task, items, choices, args):
    """Pass 1 (a category per item, batched) and pass 2 (answers in routed batches) over a task's items:
    the summary (dispatch accuracy, confusion, times, accuracy) and one row per item."""
    true = TRUE_CATEGORY.get(task.name, "other")
    t0 = time.perf_counter()
    if choices.mix:  # few-shot: α was searched offline by cem.py; pass 1 here is only the mixing
        pred, raw = ["mixed"] * len(items), [""] * len(items)
    else:
        pred, raw = classify(model, tok, [task.messages(it)[-1]["content"] for it in items], choices.cls_expert,
                             args.slots, choices.pass1)
    t1 = time.perf_counter()
    matrix = confusion([true] * len(items), pred)
    k_dispatch = sum(p == true for p in pred)
    summary = {"task": task.name, "split": args.split, "strategy": args.strategy, "n": len(items),
               "model": str(args.model), "experts": {c: e.source for c, e in choices.experts.items()},
               "max_new_tokens": args.max_new_tokens, "pass1_s": t1 - t0, "categories": list(CATEGORIES),
               "confusion": matrix, "dispatch_acc": k_dispatch / max(len(items), 1), "dispatch": fmt_acc(k_dispatch, len(items))}
    print(f"pass 1 | {args.strategy} | {t1 - t0:.1f} s | " + ("one z′ for all (cem.py's α)" if choices.mix else
          f"dispatch accuracy {summary['dispatch']} (true: {true})"))
    print("confusion (rows true, cols predicted)\n" + f"{'':>10}" + "".join(f"{c:>10}" for c in CATEGORIES))
    print("\n".join(f"{a:>10}" + "".join(f"{v:>10}" for v in row) for a, row in zip(CATEGORIES, matrix)))
    rows = [{"id": it["id"], "category": p, "pass1": r} for it, p, r in zip(items, pred, raw)]
    if args.classify_only:
        return summary, rows
    if choices.mix:  # one z′ for every row: merge it once (zero overhead)
        with svf.merged(model, choices.mix.zs, rescale=choices.mix.rescale):
            records = pass2(model, tok, task, items, pred, {}, None, args)
    else:  # rows routed to different experts: the factored layers (attached above), one z per row
        records = pass2(model, tok, task, items, pred, choices.experts, choices.cache, args)
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


def confusion(true, pred):
    return [[sum(1 for t, p in zip(true, pred) if (t, p) == (a, b)) for b in CATEGORIES] for a in CATEGORIES]


# -----------------------------------------------------------------------------

def load(args, task):
    """Read the expert files, find and check the model (shapes, context, fingerprint: nothing costly on
    a mismatch), load it and attach what pass 1 chooses from. Returns (model, tokenizer, Choices)."""
    routed = {} if args.strategy == "fewshot" or args.classify_only else \
        {c: svf.Expert.load(args.experts[c]) for c in EXPERT_CATEGORIES}
    cls_expert = svf.Expert.load(args.cls_expert) if args.strategy == "cls" else None
    mixed = read_alpha(args.alpha)[1] if args.strategy == "fewshot" else []
    used = [*routed.values(), *([cls_expert] if cls_expert else []), *mixed]
    # the model the experts name (the shipped ones' if none is loaded, e.g. --classify-only), refused when
    # they do not fit it; then a question too long for it, both before minutes of loading
    if used or args.model is None:
        args.model = cem.base_model(used or [svf.Expert.load(args.experts["math"])], args.model)
    tok = Tokenizer.from_pretrained(args.model)
    pass1 = free_form if args.free_form else cls_task
    if task is None:
        check_context(tok, args.model, args.prompt, pass1, args.max_new_tokens or 512)
    device, dtype = cli.device_and_dtype(args)
    model = Transformer.from_pretrained(args.model, dtype=dtype, device=device)
    cem.check_fingerprint(used, model)  # before svf.load_experts builds an SVD cache
    choices = Choices(pass1)
    if routed:  # one rescale rule, checked against the model; a task's routed batches need the factored layers
        loaded, choices.cache = svf.load_experts(model, list(routed.values()), factored=task is not None)
        choices.experts = dict(zip(routed, loaded))
    if cls_expert is not None:
        (choices.cls_expert,), _ = svf.load_experts(model, [cls_expert], factored=False)
    if args.strategy == "fewshot":
        choices.mix = fewshot_z(args.alpha, model)
    return model, tok, choices


def main(args):
    if args.out and not args.force:  # a finished run is never overwritten by accident
        cli.refuse_existing(Path(args.out) / "items.jsonl", "--force")
    torch.set_num_threads(args.threads)
    task = get_task(args.task) if args.task else None
    model, tok, choices = load(args, task)

    if task is None:  # ---- one prompt: exact base or merged weights
        t0 = time.perf_counter()
        mix = choices.mix
        category = "mixed" if mix else classify(model, tok, [args.prompt], choices.cls_expert, task=choices.pass1)[0][0]
        t1 = time.perf_counter()
        ctx = svf.merged(model, mix.zs, rescale=mix.rescale) if mix else adapted(model, category, choices.experts)
        with ctx:
            prompt = tok.apply_chat_template([{"role": "user", "content": args.prompt}])
            text = generate(model, tok, [prompt], max_new_tokens=args.max_new_tokens or 512).texts[0]
        t2 = time.perf_counter()
        used = mix.source if mix else choices.experts[category].source if category in choices.experts else "base weights"
        print(f"category {category} | expert {used}\n{text}\npass 1 {t1 - t0:.1f} s | pass 2 {t2 - t1:.1f} s")
        return {"category": category, "expert": used, "answer": text, "pass1_s": t1 - t0, "pass2_s": t2 - t1}

    # ---- a whole task: classify everything (batched), then answer in routed batches
    items = task.load(args.split)
    if choices.mix:  # the shots CEM adapted on are never scored: the first --limit items without them (as cem.py)
        spec = json.loads(Path(args.alpha).read_text())
        shots = {json.dumps(i) for i in spec.get("shots", [])} if spec.get("task") == task.name else set()
        items = [it for it in items if json.dumps(it["id"]) not in shots]
        print(f"fewshot: α from {args.alpha}; its {len(shots)} shots are left out")
    items = items[:args.limit]
    summary, rows = passes(model, tok, task, items, choices, args)
    if args.out is not None:
        out = Path(args.out)
        write_jsonl(out / "items.jsonl", rows)
        with cli.atomic_write(out / "summary.json") as tmp:
            tmp.write_text(json.dumps(summary, indent=1))
        plot_confusion(out / "confusion.png", summary["confusion"], CATEGORIES,
                       f"{task.name} | {args.strategy} | n={len(items)}")
        print(f"wrote {out}/items.jsonl, summary.json, confusion.png")
    return summary


if __name__ == "__main__":
    cli.run(main, get_args())

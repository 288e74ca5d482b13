"""How much of a multiple-choice score is the letter prior: a model's letter distribution on a
letter-only task (arc_easy_direct, arc_challenge_direct) and what a per-letter bias alone changes.

For each question, one forward of the prompt (which ends with the pre-filled "The answer is (")
gives the next-token log-probabilities of the letters A-E; no generation. Greedy decoding answers
their argmax whenever the letters hold nearly all the probability (the "letter mass" column says
so). Per split it reports: accuracy, how often each letter is predicted against how often it is
gold, how often the gold letter is among the top two, and the accuracy after adding one bias per
letter fitted by maximum likelihood on --fit-split: a calibration that knows nothing about any
question. An expert that does no better than the calibrated base model has learned a letter prior.

    python tools/letter_prior.py --model checkpoints/qwen2.5-coder-0.5b-instruct --splits train valid test \\
        --limit 1000 --out runs/letters-base.json
    python tools/letter_prior.py --model ... --expert experts/qwen2.5-coder-0.5b-instruct/reasoning.safetensors ...
    python tools/letter_prior.py --load runs/letters-base.json --splits valid test --per-item runs/letters-base
    python -m evals --compare runs/letters-base/test-calibrated.jsonl runs/eval/EXPERT.jsonl   # expert vs calibration
"""
import argparse
import collections
import contextlib
import json
import sys
from pathlib import Path

import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import cli  # noqa: E402
from evals import get_task  # noqa: E402
from evals.arc import LETTERS  # noqa: E402
from evals.common import fmt_acc, render_prompt, write_jsonl  # noqa: E402
from generate import Tokenizer, completion_hidden  # noqa: E402
from model import Transformer  # noqa: E402


@torch.no_grad()
def letter_logprobs(model, tok, task, items, batch=16, progress=None):
    """(N, 5) log-probabilities of the tokens "A" ... "E" as the next token after each item's prompt."""
    letter_ids = [tok.encode(c) for c in LETTERS]
    if any(len(ids) != 1 for ids in letter_ids):
        raise ValueError(f"tokenizer splits a letter into several tokens: {letter_ids}")
    letter_ids = [ids[0] for ids in letter_ids]
    out = []
    for s in tqdm(range(0, len(items), batch), desc=progress, disable=progress is None, leave=False):
        prompts = [tok.encode(render_prompt(tok, task, it)) for it in items[s:s + batch]]
        h = completion_hidden(model, prompts, [[letter_ids[0]]] * len(prompts))[0]  # the state before the answer
        out.append(model.lm_head(h).float().log_softmax(-1)[:, letter_ids])
    return torch.cat(out)


def choice_mask(n_choices):
    """(N, 5) bool: which letters are options of each question (ARC has 3-5)."""
    return torch.arange(len(LETTERS))[None, :] < torch.tensor(n_choices)[:, None]


def predict(lp, n_choices, bias=None):
    """The argmax letter index among each question's options, after adding `bias` (5,)."""
    scores = lp + (0 if bias is None else bias)
    return scores.masked_fill(~choice_mask(n_choices), float("-inf")).argmax(-1)


def fit_bias(lp, n_choices, gold, steps=300):
    """One additive bias per letter (bias[A] = 0) maximising the mean log-likelihood of the gold
    letters under softmax(lp + bias) over each question's options. Convex: L-BFGS finds it."""
    free = torch.zeros(len(LETTERS) - 1, dtype=torch.float64, requires_grad=True)
    lp, mask = lp.double(), choice_mask(n_choices)
    opt = torch.optim.LBFGS([free], max_iter=steps, line_search_fn="strong_wolfe")

    def nll():
        opt.zero_grad()
        b = torch.cat([free.new_zeros(1), free])
        loss = -(lp + b).masked_fill(~mask, float("-inf")).log_softmax(-1).gather(-1, gold[:, None]).mean()
        loss.backward()
        return loss

    opt.step(nll)
    return torch.cat([free.new_zeros(1), free]).detach().float()


def report(name, lp, n_choices, gold, bias):
    """One line per split: accuracy plain and calibrated, the top two, the letter counts."""
    k = len(gold)
    pred = predict(lp, n_choices)
    counts = lambda idx: " ".join(f"{LETTERS[i]} {c}" for i, c in sorted(collections.Counter(idx.tolist()).items()))
    top2 = (lp.masked_fill(~choice_mask(n_choices), float("-inf")).topk(2, -1).indices == gold[:, None]).any(-1)
    return (f"{name} (n={k}) | argmax {fmt_acc(int((pred == gold).sum()), k)} | with the fitted bias "
            f"{fmt_acc(int((predict(lp, n_choices, bias) == gold).sum()), k)} | gold in top two "
            f"{int(top2.sum())}/{k} | letter mass {float(lp.exp().sum(-1).mean()):.3f} | predicted {counts(pred)} | "
            f"gold {counts(gold)}")


def compute(args, task):
    """{split: {ids, gold, n_choices, lp}} for the fit split and every reported split."""
    device, dtype = cli.device_and_dtype(args)
    model = Transformer.from_pretrained(args.model, dtype=dtype, device=device)
    tok = Tokenizer.from_pretrained(args.model)
    ctx = contextlib.nullcontext()
    if args.expert:
        import svf
        ctx = svf.merged(model, args.expert)
    data = {}
    with ctx:
        for split in dict.fromkeys([args.fit_split, *args.splits]):  # the fit split first, once
            items = task.load(split)[:args.limit]
            lp = letter_logprobs(model, tok, task, items, progress=f"{split} prompts").cpu()
            data[split] = {"ids": [it["id"] for it in items], "gold": [LETTERS.index(it["gold"]) for it in items],
                           "n_choices": [len(it["choices"]) for it in items], "lp": lp.tolist()}
    return data


def main(args):
    if args.threads:
        torch.set_num_threads(args.threads)
    task = get_task(args.task)
    if not getattr(task, "direct", False):
        raise ValueError(f"--task {args.task}: needs a letter-only task (arc_easy_direct, arc_challenge_direct)")
    if args.load:  # letters measured before: no model needed
        saved = json.loads(Path(args.load).read_text())
        if saved["task"] != task.name:
            raise ValueError(f"{args.load}: holds {saved['task']} letters, not {task.name} (--task)")
        data, args.expert = saved["splits"], saved["expert"]
        missing = [s for s in [args.fit_split, *args.splits] if s not in data]
        if missing:
            raise ValueError(f"{args.load}: has no split {missing[0]!r} (it has {', '.join(data)})")
    else:
        if not args.model:
            raise SystemExit("error: --model DIR is required (or --load JSON)")
        data = compute(args, task)
    f = data[args.fit_split]
    bias = fit_bias(torch.tensor(f["lp"]), f["n_choices"], torch.tensor(f["gold"]))
    print(f"{task.name}{' + ' + args.expert if args.expert else ''} | bias fitted on {args.fit_split}: "
          + " ".join(f"{c} {b:+.2f}" for c, b in zip(LETTERS, bias.tolist())))
    for split in args.splits:
        d = data[split]
        lp, gold = torch.tensor(d["lp"]), torch.tensor(d["gold"])
        print(report(split, lp, d["n_choices"], gold, bias))
        if args.per_item:  # per-item files as `python -m evals` writes them, for its --compare
            for name, b in (("argmax", None), ("calibrated", bias)):
                pred = predict(lp, d["n_choices"], b).tolist()
                write_jsonl(Path(args.per_item) / f"{split}-{name}.jsonl",
                            [{"id": i, "extracted": LETTERS[p], "gold": LETTERS[g], "correct": p == g}
                             for i, p, g in zip(d["ids"], pred, d["gold"])])
    if args.out and not args.load:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"task": task.name, "expert": args.expert, "bias": bias.tolist(),
                                              "splits": data}))
    return data, bias


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="model folder (config.json, tokenizer, safetensors)")
    ap.add_argument("--load", metavar="JSON", help="report from a file --out wrote before instead of running the model")
    ap.add_argument("--task", default="arc_easy_direct", help="a letter-only task: arc_easy_direct, arc_challenge_direct")
    ap.add_argument("--expert", default=None, help="SVF expert file merged into the weights")
    ap.add_argument("--splits", nargs="+", default=["valid"], help="splits to report")
    ap.add_argument("--fit-split", default="train", help="split the per-letter bias is fitted on")
    ap.add_argument("--limit", type=int, default=None, help="first N items of each split")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default=None, help="JSON with every question's letter log-probabilities (for --load)")
    ap.add_argument("--per-item", metavar="DIR", default=None,
                    help="write DIR/{split}-argmax.jsonl and {split}-calibrated.jsonl (python -m evals --compare reads them)")
    cli.add_device_args(ap)
    return ap.parse_args(argv)


if __name__ == "__main__":
    cli.run(main, parse_args())

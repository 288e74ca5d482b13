"""Benchmark the RL workload of one REINFORCE update: where the rollouts per hour go.

The workload (issue: rollout engine): --questions GSM8K training questions × --samples answers
sampled at --temperature, ≤ --max-new-tokens each, generated four ways on the same prompts:
  (a) static batches, the loop main had before the engine: --static-batch rows at a time, every
      sample prefilled on its own, finished rows stepping until the batch's longest answer ends;
  (b) transformers `generate` (eager, same weights, same sampling settings, top_k off), one batch
      of all rows (num_return_sequences = samples): its best case, the decode ceiling's batch size;
  (c) generate.py's engine: --slots rows kept busy, each question prefilled once for its samples;
  (d) the pure-decode ceiling: decode steps of --slots rows, nothing else.
Then the backward of the update on the engine's answers (leave-one-out weights, as `make train`):
its time with and without the shared prompt forward (generate.completion_hidden), and with SVF on
the top half of the layers vs all of them; and the update's time split (prefill / decode /
backward) and rollouts per hour. Run it alone on the machine (2 jobs on 2 cores distort everything).

    make bench-train      # Qwen2.5-Coder-0.5B, 16 questions x 4 samples, T=0.7, <= 256 tokens, 64 slots
    python tools/bench_train.py --model checkpoints/qwen2.5-coder-0.5b-instruct --questions 16 --samples 4
    python tools/bench_train.py --sweep-slots 8,16,32,64,128    # (d) alone: where more slots stop paying
"""
import argparse
import contextlib
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import reinforce  # noqa: E402
import svd_cache  # noqa: E402
import svf  # noqa: E402
from evals import get_task, render_prompt  # noqa: E402
from generate import StopStrings, Tokenizer, generate, right_pad, sample  # noqa: E402
from model import KVCache, Transformer  # noqa: E402


@torch.inference_mode()
def static_generate(model, tok, seqs, max_new, temperature, seed, stop):
    """The static-batch loop (before the engine): prefill every row, then step all rows until the
    last one ends; a finished row keeps stepping. Returns (generated tokens, row-steps computed)."""
    ids, lens = right_pad(seqs, tok.pad_id, "cpu")
    B = len(seqs)
    cache = KVCache(model.config, B, ids.size(1) + max_new, next(model.parameters()).dtype, "cpu")
    logits = model.lm_head(model.hidden(ids, None, cache)[torch.arange(B), lens - 1]).float()
    pos, g, stops = lens.clone(), torch.Generator().manual_seed(seed), StopStrings(tok, stop)
    out, done, steps = [[] for _ in range(B)], [False] * B, 0
    for _ in range(max_new):
        nxt = sample(logits, temperature, 1.0, torch.rand(B, generator=g)).tolist()
        for i, t in enumerate(nxt):
            if not done[i]:
                out[i].append(t)
                done[i] = t in tok.eos_ids or stops(out[i]) is not None
        if all(done):
            break
        logits = model.lm_head(model.hidden(torch.tensor(nxt)[:, None], pos[:, None], cache)[:, -1]).float()
        pos += 1
        steps += B
    return sum(map(len, out)), steps


def timed(fn):
    t0 = time.perf_counter()
    r = fn()
    return r, time.perf_counter() - t0


def decode_tok_s(model, B, ctx, n_steps):
    """Tokens per second of `n_steps` plain decode steps (forward + lm_head) of B rows at context ctx."""
    cache = KVCache(model.config, B, ctx + n_steps + 1, torch.float32, "cpu")
    with torch.inference_mode():
        V = model.config.vocab_size  # random tokens: the step's cost does not depend on which
        model.hidden(torch.randint(0, V, (B, ctx)), None, cache)
        x = torch.randint(0, V, (B, 1))

        def steps():
            for i in range(n_steps):
                model.lm_head(model.hidden(x, torch.full((B, 1), ctx + i), cache)[:, -1])
        _, t = timed(steps)
    return B * n_steps / t


def sweep_slots(args):
    """(d) alone at several batch sizes: where adding slots stops buying tokens per second."""
    model = Transformer.from_pretrained(args.model)
    c = model.config
    ctx = args.context
    print(f"{Path(args.model).name} | pure decode, context {ctx}, {args.decode_steps} steps | "
          f"threads {torch.get_num_threads()} | fp32")
    print("| slots | tok/s | vs the previous row | KV cache (MB) |\n|---|---|---|---|")
    res, prev = [], None
    for B in args.sweep_slots:
        tok_s = decode_tok_s(model, B, ctx, args.decode_steps)
        kv_mb = 2 * c.num_hidden_layers * B * (ctx + args.max_new_tokens) * c.num_key_value_heads * c.head_dim * 4 / 2**20  # k and v, fp32
        print(f"| {B} | {tok_s:.1f} | {'' if prev is None else f'{tok_s / prev:.2f}x'} | {kv_mb:.0f} |", flush=True)
        res.append(dict(slots=B, tok_s=tok_s, kv_mb=kv_mb))
        prev = tok_s
    if args.out:
        Path(args.out).write_text(json.dumps(dict(context=ctx, steps=args.decode_steps, rows=res), indent=1))


@contextlib.contextmanager
def engine_phases(stats):
    """Seconds and tokens of the engine's prefills (Engine.admit) and decode steps (Engine.step) while
    the block runs, added to `stats` (prefill_s, prefill_tokens, decode_s, decode_tokens): the two
    methods are wrapped with a timer and put back after."""
    import generate as G

    def timed_phase(phase, method):
        def run(self, *a):
            t0, before = time.perf_counter(), self.tokens[phase]
            out = method(self, *a)
            stats[phase + "_s"] = stats.get(phase + "_s", 0.0) + time.perf_counter() - t0
            stats[phase + "_tokens"] = stats.get(phase + "_tokens", 0) + self.tokens[phase] - before
            return out
        return run
    admit, step = G.Engine.admit, G.Engine.step
    G.Engine.admit, G.Engine.step = timed_phase("prefill", admit), timed_phase("decode", step)
    try:
        yield stats
    finally:
        G.Engine.admit, G.Engine.step = admit, step


def bench(args):
    task = get_task(args.task)
    model = Transformer.from_pretrained(args.model)
    tok = Tokenizer.from_pretrained(args.model)
    items = task.load("train")[:args.questions]
    prompts = [tok.encode(render_prompt(tok, task, it)) for it in items]
    R = len(items) * args.samples
    stop = list(task.stop) or None
    print(f"{Path(args.model).name} | {args.task} train | {len(items)} questions x {args.samples} samples = {R} rollouts | "
          f"T={args.temperature} | <= {args.max_new_tokens} new tokens | threads {torch.get_num_threads()} | fp32")
    res = {}

    # (c) the engine
    stats = {}
    with engine_phases(stats):
        g, t = timed(lambda: generate(model, tok, prompts, max_new_tokens=args.max_new_tokens,
                                      temperature=args.temperature, seed=0, stop=stop, samples=args.samples,
                                      slots=args.slots))
    n_tok = sum(map(len, g.ids))
    res["engine"] = dict(seconds=t, tokens=n_tok, tok_s=n_tok / t, cut=sum(g.cut), **stats)
    print(f"(c) engine, {args.slots} slots: {n_tok} tokens in {t:.1f} s = {n_tok / t:.1f} tok/s | prefill "
          f"{stats['prefill_tokens']} tokens {stats['prefill_s']:.1f} s | decode {stats['decode_s']:.1f} s | "
          f"cut {sum(g.cut)}/{R}", flush=True)

    # (a) static batches of --static-batch rows, each sample its own row and prefill
    rows = [p for p in prompts for _ in range(args.samples)]
    t0, n_a, steps = time.perf_counter(), 0, 0
    for s in range(0, R, args.static_batch):
        a, b = static_generate(model, tok, rows[s:s + args.static_batch], args.max_new_tokens, args.temperature, s, stop)
        n_a, steps = n_a + a, steps + b
    t = time.perf_counter() - t0
    res["static"] = dict(seconds=t, tokens=n_a, tok_s=n_a / t, row_steps=steps)
    print(f"(a) static batches of {args.static_batch}: {n_a} tokens in {t:.1f} s = {n_a / t:.1f} tok/s "
          f"({steps} row-steps computed for {n_a} tokens kept)", flush=True)

    # (b) transformers generate, one batch of all rows
    from transformers import AutoModelForCausalLM
    hf = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32, attn_implementation="eager").eval()
    T = max(map(len, prompts))
    ids = torch.tensor([[tok.pad_id] * (T - len(p)) + p for p in prompts])          # left-padded, as HF expects
    mask = torch.tensor([[0] * (T - len(p)) + [1] * len(p) for p in prompts])
    torch.manual_seed(0)
    with torch.inference_mode():
        out, t = timed(lambda: hf.generate(ids, attention_mask=mask, do_sample=True, temperature=args.temperature,
                                           top_k=0, top_p=1.0, max_new_tokens=args.max_new_tokens,
                                           num_return_sequences=args.samples, pad_token_id=tok.pad_id,
                                           eos_token_id=tok.eos_ids))
    gen = out[:, T:]
    n_b = sum(int(next((j + 1 for j, x in enumerate(r.tolist()) if x in tok.eos_ids), len(r))) for r in gen)
    res["transformers"] = dict(seconds=t, tokens=n_b, tok_s=n_b / t)
    print(f"(b) transformers generate, one batch of {R}: {n_b} tokens in {t:.1f} s = {n_b / t:.1f} tok/s", flush=True)
    hf = None  # free its memory before the backward runs

    # (d) the decode ceiling at the same number of slots
    B = min(args.slots, R)
    ctx = T + args.max_new_tokens // 2  # a mid-answer context length
    res["ceiling"] = dict(tok_s=decode_tok_s(model, B, ctx, args.decode_steps), batch=B, context=ctx)
    print(f"(d) pure decode, batch {B}, context {ctx}: {res['ceiling']['tok_s']:.1f} tok/s", flush=True)

    # the backward of the update on the engine's answers
    e, a, b, c = (res[k]["tok_s"] for k in ("engine", "static", "transformers", "ceiling"))
    print(f"engine / static {e / a:.2f}x | engine / transformers {e / b:.2f}x | engine / ceiling {e / c:.0%}")
    correct = task.check([it for it in items for _ in range(args.samples)], g.texts)
    ra = reinforce.get_args(["--task", args.task, "--out", "/dev/null", "--kl-coef", "0"])
    weights = reinforce.advantages([reinforce.reward(x, c, ra) for x, c in zip(correct, g.cut)], args.samples, "loo")
    prompt_ids = [p for p in prompts for _ in range(args.samples)]

    def backward(layers, share, rows):
        svf.detach(model)
        cache = svd_cache.load(model, "mlp", layers=layers)
        svf.attach(model, cache)
        theta = {n: t.requires_grad_(True) for n, t in svf.init_theta(cache).items()}
        ra.parametrization = "sigmoid"

        def run():
            for mb in reinforce.micro_batches(rows, args.samples, args.micro_batch):
                loss = reinforce.policy_loss(model, theta, [prompt_ids[r] for r in mb], [g.ids[r] for r in mb],
                                             [weights[r] for r in mb], R, ra, share=share)[0]
                loss.backward()
            svf.set_z(model, None)
        return timed(run)[1]

    sub = list(range(min(R, args.backward_questions * args.samples)))  # a fixed subset, all rows
    t_shared = backward(None, True, sub)
    t_alone = backward(None, False, sub)
    t_top = backward("top", True, sub)
    print(f"backward, {len(sub)} rollouts ({args.backward_questions} questions), all layers: shared prompt "
          f"{t_shared:.1f} s vs one prompt forward per answer {t_alone:.1f} s = {t_alone / t_shared:.2f}x | "
          f"SVF on the top half of the layers {t_top:.1f} s = {t_shared / t_top:.2f}x faster than all")
    live = [r for r in range(R) if weights[r] != 0]
    t_back = backward(None, True, live)
    t_update = res["engine"]["seconds"] + t_back
    res["backward"] = dict(shared=t_shared, unshared=t_alone, top_half=t_top, rows=len(sub), update_rows=len(live),
                           update_backward=t_back)
    res["update"] = dict(seconds=t_update, rollouts_per_hour=R / t_update * 3600)
    print(f"one update: rollouts {res['engine']['seconds']:.0f} s (prefill {stats['prefill_s']:.0f} s, decode "
          f"{stats['decode_s']:.0f} s) + backward {t_back:.0f} s on the {len(live)} rollouts with a non-zero "
          f"leave-one-out weight = {t_update:.0f} s ({t_update / 60:.1f} min) | {R / t_update * 3600:.0f} rollouts per hour")
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=1))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="checkpoints/qwen2.5-coder-0.5b-instruct")
    p.add_argument("--task", default="gsm8k")
    p.add_argument("--questions", type=int, default=16)
    p.add_argument("--samples", type=int, default=4)
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--slots", type=int, default=64, help="engine slots (and the ceiling's batch)")
    p.add_argument("--static-batch", type=int, default=16, help="(a): rows per static batch (make train's old recipe: 16)")
    p.add_argument("--decode-steps", type=int, default=16, help="(d): steps timed")
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--backward-questions", type=int, default=4, help="questions (all samples) in the backward comparison")
    p.add_argument("--out", default=None, help="write the numbers as JSON")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--sweep-slots", type=lambda s: [int(x) for x in s.split(",")], default=None, metavar="N,N,...",
                   help="only (d), at each of these batch sizes (e.g. 8,16,32,64,128): how many slots pay")
    p.add_argument("--context", type=int, default=277, help="--sweep-slots: context length of the decode steps")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.sweep_slots:
        sweep_slots(args)
    else:
        bench(args)


if __name__ == "__main__":
    main()

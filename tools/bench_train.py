"""Benchmark one REINFORCE update of reinforce.py: rollouts and the policy-gradient step.

For one model and task (greedy rollouts, the official setting), on the same prompts:
  - rollout tokens/s: the prompts generated as one batch vs one by one (same tokens: greedy);
  - seconds and peak memory of the backward step (loss_on over micro-batches, SVF factored
    path, gradients only into θ), with and without the KL term (which adds a base-model pass);
  - seconds per whole update = rollout (batched) + backward step.
Peak memory is measured as svf.py's benchmark does (torch allocator events on CPU, the
allocator's counters on CUDA), above what the loaded model already holds. Run it on an idle
machine: two jobs sharing two cores make the numbers meaningless.

    make bench-train                                    # SmolLM2 and Qwen-0.5B, GSM8K, 8 prompts
    python tools/bench_train.py --model checkpoints/qwen2.5-coder-0.5b-instruct --prompts 8 --max-new-tokens 128
"""
import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import reinforce  # noqa: E402
import svd_cache  # noqa: E402
import svf  # noqa: E402
from evals import get_task, render_prompt  # noqa: E402
from generate import Tokenizer  # noqa: E402
from model import Transformer  # noqa: E402


def bench(args):
    task = get_task(args.task)
    model = Transformer.from_pretrained(args.model)
    tok = Tokenizer.from_pretrained(args.model)
    cache = svd_cache.load(model)
    svf.attach(model, cache)
    theta = {n: t.requires_grad_(True) for n, t in svf.init_theta(cache).items()}
    items = task.load("train")[:args.prompts]
    prompts = [render_prompt(tok, task, it) for it in items]
    ra = reinforce.get_args(["--task", args.task, "--out", "/dev/null", "--max-new-tokens", str(args.max_new_tokens),
                             "--rollout-batch", str(args.prompts), "--micro-batch", str(args.micro_batch)])
    ra.max_new_tokens = args.max_new_tokens
    name = Path(args.model).name
    print(f"{name} | {args.task} | {args.prompts} prompts x <= {args.max_new_tokens} new tokens | "
          f"threads {torch.get_num_threads()} | fp32 | {len(theta)} SVF matrices")

    t0 = time.time()
    comp, correct = reinforce.rollout(model, tok, task, items, prompts, theta, cache, ra, seed=0)
    t_batch = time.time() - t0
    n_tok = sum(len(c) for c in comp)
    one = reinforce.argparse.Namespace(**{**vars(ra), "rollout_batch": 1})
    t0 = time.time()
    comp1, _ = reinforce.rollout(model, tok, task, items, prompts, theta, cache, one, seed=0)
    t_one = time.time() - t0
    same = comp1 == comp
    print(f"rollout  batched {n_tok / t_batch:6.1f} tok/s ({t_batch:.1f} s) | one by one {sum(map(len, comp1)) / t_one:6.1f} tok/s "
          f"({t_one:.1f} s) | batched/one-by-one {t_one / t_batch:.2f}x | identical greedy tokens: {same}")

    prompt_ids = [tok.encode(p) for p in prompts]
    rewards = [task.reward(c) for c in correct]
    for kl in (0.0, 0.1):
        ra.kl_coef = kl

        def step():
            for t in theta.values():
                t.grad = None
            for s in range(0, len(items), args.micro_batch):
                sl = slice(s, s + args.micro_batch)
                reinforce.loss_on(model, theta, prompt_ids[sl], comp[sl], rewards[sl], len(items), ra)
            svf.set_z(model, None)

        t0 = time.time()
        step()
        t_step = time.time() - t0
        peak = svf.peak_memory(step) if args.memory else float("nan")  # a second run, under the profiler
        print(f"backward step (kl {kl}) {t_step:6.1f} s, peak {peak / 2**20:7.0f} MiB over the model | "
              f"update = rollout + step = {t_batch + t_step:.1f} s")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="checkpoints/smollm2-135m-instruct")
    p.add_argument("--task", default="gsm8k")
    p.add_argument("--prompts", type=int, default=8, help="rollouts in the update")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--no-memory", dest="memory", action="store_false", help="skip the profiler (it adds time)")
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    bench(args)


if __name__ == "__main__":
    main()

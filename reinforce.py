"""Train an SVF expert with REINFORCE (Transformer² paper §3.2, docs/PAPER.md §2).

One update:
  1. draw a batch of training prompts (without replacement, epoch by epoch; --shuffle-options
     shows a multiple-choice question's options in a fresh order each time);
  2. roll out answers with the current expert merged into the weights (greedy as the official
     code, or sampled with --temperature, --samples per prompt);
  3. reward each answer +1 / -1 with the task's checker (evals/);
  4. loss = -Σ_t log π′(y_t)·r / B  +  λ·KL, with KL over the vocabulary at the generated
     positions, KL(π′‖π) (paper) or KL(π‖π′) (official code, --kl-direction official);
     --baseline loo (not in the paper) replaces r by r minus the mean reward of the prompt's
     other --samples answers, so only prompts with right AND wrong answers push θ;
  5. backpropagate into θ only (svf.py's factored path: no m×n weight gradient), clip the
     gradient norm (1e-3), and step Adam (official, constant lr) or AdamW (paper, cosine decay).
Every --eval-every updates the expert is scored greedily on the validation split; the best one
is kept (best.safetensors) and training stops after --patience evaluations without progress.

After every update the run directory holds an atomic checkpoint (state.pt): kill the run at any
moment and `--resume` redoes the unfinished update exactly (batches and sampling seeds are
functions of (seed, step)), reaching the same result as an uninterrupted run.

The same loop trains the baselines of paper Table 4: --adapter lora (lora.py's A, B on --targets,
e.g. qv, instead of SVF's θ) and --objective sft (the next-token loss on the task's reference
solutions, teacher-forced, instead of rollouts and rewards); validation and checkpoints are shared.

Why this file is past docs/STYLE.md's 250–350 lines: it is the whole training concept in one place, the
RL loop (rollout -> reward -> advantage -> policy loss + KL -> all-reduce -> step), its SFT baseline
objective (sft_update), the SVF/LoRA switch (use, merged) and the run around them (sharding over
ranks, validation with paired tests, exact resume). Each piece is short; splitting one out would send
a reader to a second file to follow one update.

A LLaVA checkpoint (vlm.py) trains the same way on the VQA tasks: SVF adapts its language model,
the image reaches rollouts and the policy gradient through the prompt embeddings.

    make train TASK=gsm8k       # Qwen2.5-Coder-0.5B with the CPU recipe of the README (Makefile)
    python reinforce.py --task gsm8k --model checkpoints/qwen2.5-coder-0.5b-instruct --out runs/math \\
        --batch-size 32 --steps 20 --valid-limit 100 --max-new-tokens 320
    torchrun --nproc_per_node=2 reinforce.py ...   # rollouts sharded over ranks, θ grads all-reduced
    python reinforce.py --task easy_vqa --model LLAVA_DIR --out runs/vqa --layers half --wrong-reward -0.1
    python reinforce.py --task gsm8k --adapter lora --targets qv --objective sft --lr 2e-4 --out runs/lora-sft ...
"""
import argparse
import json
import math
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

import cli
import lora
import svd_cache
import svf
import vlm
from evals import get_task, TASKS
from evals.arc import ARC, shuffle_options
from evals.common import answer, discordant, fmt_acc, mcnemar, paired, render_prompt, wilson, write_jsonl
from evals.plots import plot_curve
from generate import Tokenizer, completion_hidden
from model import Transformer


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("what to train")
    g.add_argument("--task", required=True, help=f"training task: {', '.join(TASKS)}")
    g.add_argument("--model", default="checkpoints/smollm2-135m-instruct", help="HF-layout model folder")
    g.add_argument("--out", required=True, help="run directory (experts, metrics, checkpoint)")
    g.add_argument("--targets", default="mlp", type=svd_cache.targets_type, help=svd_cache.TARGETS_HELP)
    g.add_argument("--layers", default=None,
                   help="layer subset: 'half' (every other), 'top' (upper half) or comma-separated indices (default: all)")
    g.add_argument("--parametrization", default="sigmoid", choices=["sigmoid", "raw"], help="z = sigmoid(θ) (official) or z = θ")
    g.add_argument("--adapter", default="svf", choices=["svf", "lora"],
                   help="what is trained: SVF's θ (the method) or LoRA's A, B (paper Table 4's baseline; lora.py)")
    g.add_argument("--lora-rank", type=int, default=16, help="LoRA r (paper: 16)")
    g.add_argument("--lora-alpha", type=float, default=32.0, help="LoRA α, scale α/r (paper: 32)")
    g.add_argument("--objective", default="rl", choices=["rl", "sft"],
                   help="rl: REINFORCE on rollouts (the method); sft: next-token loss on the task's reference "
                        "solutions, no rollouts (paper Table 4's 'next-token' rows)")
    g = p.add_argument_group("optimisation (defaults: paper, Table 6)")
    g.add_argument("--steps", type=int, default=100, help="number of updates")
    g.add_argument("--minutes", type=float, default=None,
                   help="wall-clock budget of the updates (validation excluded): no update starts once the updates "
                        "so far took this long (paper Table 4's rows are compared at one budget; resume-safe)")
    g.add_argument("--batch-size", type=int, default=256, help="rollouts per update (global, all ranks)")
    g.add_argument("--micro-batch", type=int, default=8,
                   help="rollouts per forward/backward (memory knob; a question's samples stay together)")
    g.add_argument("--slots", type=int, default=64,
                   help="sequences decoded together by the engine (speed knob; 128 decodes 5-9%% faster than 64 for twice the KV memory: docs/RESULTS.md)")
    g.add_argument("--lr", type=float, default=2e-3)
    g.add_argument("--optimizer", default="adamw", choices=["adamw", "adam"], help="adamw + cosine decay (paper) or adam, constant lr (official)")
    g.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay on θ")
    g.add_argument("--clip", type=float, default=1e-3, help="max gradient norm")
    g.add_argument("--kl-coef", type=float, default=0.1, help="λ; the paper sweeps {0, 0.1, 0.2, 0.3}, the official code uses 0")
    g.add_argument("--wrong-reward", type=float, default=-1.0,
                   help="reward of a wrong answer (paper: -1; the paper's VLM runs: -0.1)")
    g.add_argument("--cut-reward", type=float, default=None,
                   help="not in the paper: reward of an answer that ran into --max-new-tokens, right or not "
                        "(default: scored like any other answer); below --wrong-reward it rewards finishing")
    g.add_argument("--baseline", default=None, choices=["loo"],
                   help="not in the paper: 'loo' subtracts from each reward the mean reward of the other "
                        "--samples answers to the same prompt (needs --samples >= 2)")
    g.add_argument("--kl-direction", default="paper", choices=["paper", "official"], help="KL(π′‖π) or KL(π‖π′)")
    g = p.add_argument_group("rollouts")
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (official code)")
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--samples", type=int, default=1, help="rollouts per prompt (use with --temperature > 0)")
    g.add_argument("--max-new-tokens", type=int, default=None, help="default: the task's")
    g.add_argument("--train-limit", type=int, default=None, help="use only the first N training items")
    g.add_argument("--shuffle-options", action="store_true",
                   help="not in the paper; multiple choice (ARC): every update shows each question's options in a "
                        "fresh seeded order, the same for its --samples answers, so a preferred letter earns nothing "
                        "in expectation and only the content can (validation keeps the dataset's order)")
    g = p.add_argument_group("validation and checkpoints")
    g.add_argument("--eval-every", type=int, default=10,
                   help="updates between validations (official: 10); 0 = none, not even at the start and the end "
                        "(a run scored on the test split only; the expert is last.safetensors)")
    g.add_argument("--valid-limit", type=int, default=None, help="validate on the first N items only (CPU budget)")
    g.add_argument("--patience", type=int, default=5, help="stop after this many validations without improvement")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--resume", action="store_true", help="continue from OUT/state.pt")
    g.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    cli.add_device_args(p)
    return p.parse_args(argv)


# -----------------------------------------------------------------------------
# The pieces of one update

def batch_indices(step, n_items, batch_size, seed):
    """Prompts of update `step`: a seeded permutation per epoch, consumed in order (no RNG state
    to checkpoint, so a resumed run draws exactly the same batches)."""
    per_step = min(batch_size, n_items)
    out, pos = [], step * per_step
    while len(out) < per_step:
        epoch, offset = divmod(pos, n_items)
        perm = torch.randperm(n_items, generator=torch.Generator().manual_seed(seed * 100003 + epoch))
        take = perm[offset:offset + per_step - len(out)].tolist()
        out += take
        pos += len(take)
    return out


def build_prompts(tok, task, items, vision=None):
    """(prompts, embed) for `items`: rendered strings and no hook for a text model; for a VLM
    (vision = (LLaVA, Preprocessor)) id lists with the image tokens expanded, and the hook that
    splices each prompt's image into its embeddings (vlm.prompts_with_images)."""
    prompts = [render_prompt(tok, task, it) for it in items]
    if vision is None:
        return prompts, None
    return vlm.prompts_with_images(vision[0], tok, prompts, [[it["image"]] for it in items], vision[1])


def use(model, theta, args):
    """Run the model with the trainable tensors in the forward (differentiable): SVF's z = f(θ) on the
    factored layers, or LoRA's A, B beside the weights. theta None: exactly the base weights."""
    if args.adapter == "lora":
        lora.set_params(model, theta, args.lora_alpha / args.lora_rank)
    else:
        svf.set_z(model, None if theta is None else {n: svf.theta_to_z(t, args.parametrization) for n, t in theta.items()})


def merged(model, theta, cache, args):
    """The current adapter folded into the weights (zero-overhead generation), restored on exit."""
    use(model, None, args)  # the factored / LoRA paths off: the merged weights do the work
    if args.adapter == "lora":
        return lora.merged(model, {n: t.detach() for n, t in theta.items()}, scale=args.lora_alpha / args.lora_rank)
    return svf.merged(model, {n: svf.theta_to_z(t.detach(), args.parametrization) for n, t in theta.items()}, cache)


def rollout(model, tok, task, items, prompts, embed, theta, cache, args, seed, progress=None):
    """args.samples answers per item (prompts, embed from build_prompts) with the current expert
    merged into the weights (zero overhead), through the engine (every slot busy; each item's
    prompt prefilled once). Returns evals.common.answer's records, item-major."""
    with merged(model, theta, cache, args):
        return answer(model, tok, task, items, samples=args.samples, temperature=args.temperature, top_p=args.top_p,
                      seed=seed, max_new_tokens=args.max_new_tokens, slots=args.slots, prompts=prompts, embed=embed,
                      progress=progress if cli.world()[0] == 0 else None)


def reward(correct, cut, args):
    """The paper's reward: +1 for a right answer, -1 (--wrong-reward) for a wrong one. With
    --cut-reward, an answer cut off by the token budget gets that instead, even when the number
    picked from its unfinished text happens to be right: finishing becomes part of the task."""
    if cut and args.cut_reward is not None:
        return args.cut_reward
    return 1.0 if correct else args.wrong_reward


def advantages(rewards, samples, baseline):
    """The weight of each rollout in the policy gradient. The paper uses the reward itself (±1).
    baseline "loo" (leave-one-out, as in RLOO): r_i − mean of the other answers to the same
    prompt, so a prompt whose answers are all right or all wrong contributes nothing, and the
    gradient is the contrast between better and worse answers to one question. `rewards` is
    prompt-major (the samples of prompt j at j*samples ... j*samples + samples-1)."""
    r = torch.tensor(rewards, dtype=torch.float64).view(-1, samples)  # (prompts, samples)
    if baseline == "loo":
        r = r - (r.sum(1, keepdim=True) - r) / (samples - 1)
    return r.flatten().tolist()


def kl_per_token(logp, ref_logp, direction):
    """Σ_v over the vocabulary at each position; paper KL(π′‖π), official KL(π_ref‖π′)."""
    if direction == "paper":
        return (logp.exp() * (logp - ref_logp)).sum(-1)
    return (ref_logp.exp() * (ref_logp - logp)).sum(-1)


def policy_loss(model, theta, prompt_ids, comp_ids, weights, B, args, chunk=512, embed=None, share=True):
    """Policy-gradient + KL loss of one micro-batch, divided by the global batch B:
    (-Σ_t log π′(y_t)·w + λ·KL) / B. Returns (loss, pg, kl); the caller runs backward.
    Answers to the same prompt share that prompt's forward (generate.completion_hidden; share=False
    runs one prompt forward per answer, for the benchmark)."""
    if args.kl_coef > 0:  # the base policy at the same positions (no grad, exact base weights)
        use(model, None, args)
        with torch.no_grad():
            h_ref = completion_hidden(model, prompt_ids, comp_ids, embed, share)[0]
    use(model, theta, args)
    h, targets, row, _ = completion_hidden(model, prompt_ids, comp_ids, embed, share)
    w = torch.tensor(weights, dtype=torch.float32, device=h.device)[row]  # row lives on the model's device
    pg, kl = h.new_zeros((), dtype=torch.float32), h.new_zeros((), dtype=torch.float32)
    for s in range(0, len(targets), chunk):  # chunks keep tokens × vocab logits small
        logp = model.lm_head(h[s:s + chunk]).float().log_softmax(-1)
        chosen = logp.gather(-1, targets[s:s + chunk, None]).squeeze(-1)
        pg = pg - (chosen * w[s:s + chunk]).sum()
        if args.kl_coef > 0:
            ref = model.lm_head(h_ref[s:s + chunk]).float().log_softmax(-1)
            kl = kl + kl_per_token(logp, ref, args.kl_direction).sum()
    return (pg + args.kl_coef * kl) / B, float(pg.detach()) / B, float(kl.detach()) / B


def micro_batches(rows, samples, size):
    """Split rows (prompt-major) into micro-batches of about `size` rows that keep the answers of one
    prompt together, so each prompt is run forward once."""
    out, cur = [], []
    for i, r in enumerate(rows):
        if cur and len(cur) >= size and r // samples != rows[i - 1] // samples:
            out.append(cur)
            cur = []
        cur.append(r)
    return out + [cur] if cur else out


# -----------------------------------------------------------------------------
# The steps of a run

def load_policy(args, task, device, dtype):
    """The base model (or a LLaVA's language model) with the adapter's modules on the target matrices:
    SVFLinear (and the SVD cache of the targets) or LoRALinear (cache = the target names)."""
    vision = None
    if vlm.is_vlm(args.model):  # LLaVA: SVF adapts its language model; images ride in the prompts
        llava, tok, pre = vlm.load(args.model, device=device, dtype=dtype)
        model, vision = llava.language_model, (llava, pre)
    else:
        model = Transformer.from_pretrained(args.model, dtype=dtype, device=device)
        tok = Tokenizer.from_pretrained(args.model)
    if task.images != (vision is not None):
        raise ValueError(f"task {args.task} needs a {'LLaVA' if task.images else 'text'} checkpoint; {args.model} is "
                         f"{'a LLaVA' if vision else 'a text model'}")
    if args.adapter == "lora":
        cache = lora.target_names(model, args.targets, args.layers)
        lora.attach(model, cache)
    else:
        cache = svd_cache.load(model, targets=args.targets, layers=args.layers)
        svf.attach(model, cache)
    return model, tok, vision, cache


def init_params(model, cache, args):
    """θ₀ (SVF, official init: z ≈ 0.525 everywhere, ≈ the base model) or A₀, B₀ = 0 (LoRA: the base model)."""
    if args.adapter == "lora":
        return lora.init_params(model, cache, rank=args.lora_rank, seed=args.seed)
    return svf.init_theta(cache, seed=args.seed)


def save_adapter(path, theta, model, cache, args, hparams, **extra):
    """The trained tensors as an expert (SVF) or adapter (LoRA) file, with the run's settings as metadata."""
    theta = {n: t.detach() for n, t in theta.items()}
    if args.adapter == "lora":
        lora.Adapter.new(theta, model, alpha=args.lora_alpha, **hparams, **extra).save(path)
    else:
        # the expert records the layers it adapts itself (indices), not the --layers shorthand
        hp = {k: v for k, v in hparams.items() if k != "layers"}
        svf.Expert.new(theta, model, cache, args.parametrization, **hp, **extra).save(path)


def save_ckpt(path, state):
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)  # atomic: a kill leaves the previous checkpoint or the new one


def make_optimizer(params, args):
    """AdamW with cosine decay (paper) or Adam with a constant learning rate (official code)."""
    if args.optimizer == "adamw":
        opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)
        return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / args.steps)))
    opt = torch.optim.Adam(params, lr=args.lr)
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)


def optimizer_step(theta, opt, sched, args):
    """Sum the gradients of all ranks (each already divided by the global batch), clip their norm
    (--clip), step the optimizer and the schedule. Returns the norm before clipping."""
    params = list(theta.values())
    for t in params:
        if t.grad is None:  # no rows on this rank took part
            t.grad = torch.zeros_like(t)
        cli.all_reduce(t.grad)
    gnorm = float(torch.nn.utils.clip_grad_norm_(params, args.clip))
    opt.step()
    sched.step()
    return gnorm


def update(step, model, tok, task, train, theta, opt, sched, cache, args, vision=None):
    """One REINFORCE update: roll out, reward, weigh, backpropagate into θ, clip, step. Returns its metrics."""
    rank, ws = cli.world()
    t0 = time.time()
    idx = batch_indices(step, len(train), args.batch_size // args.samples, args.seed)  # this update's questions
    mine = list(range(rank, len(idx), ws))  # each rank answers whole questions, so their samples stay together
    # one sampling seed per question (not per rank), so any number of ranks draws the same answers
    seeds = [args.seed * 7919 + step * 1009 + q * args.samples for q in mine]
    items = [train[idx[q]] for q in mine]
    if args.shuffle_options:  # a fresh option order per question and update, shared by its samples
        items = [shuffle_options(it, f"{args.seed}-{step}-{it['id']}") for it in items]
    prompts, embed = build_prompts(tok, task, items, vision)  # a VLM's images are preprocessed once
    records = rollout(model, tok, task, items, prompts, embed, theta, cache, args, seeds, f"update {step + 1} rollouts")
    t_rollout = time.time() - t0
    rewards = [reward(r["correct"], r["cut"], args) for r in records]
    weights = advantages(rewards, args.samples, args.baseline)
    B = len(idx) * args.samples
    opt.zero_grad(set_to_none=True)
    pg = kl = 0.0
    # a rollout with weight 0 (a baseline cancelled its reward) adds nothing to the policy
    # gradient: skip its forward/backward, unless the KL term still needs it
    rows = [r for r in range(len(records)) if weights[r] != 0 or args.kl_coef > 0]
    for mb in micro_batches(rows, args.samples, args.micro_batch):
        mb_embed = None if embed is None else (lambda ids, p, mb=mb: embed(ids, [mb[i] // args.samples for i in p]))
        loss, a, b = policy_loss(model, theta, [records[r]["prompt_ids"] for r in mb], [records[r]["ids"] for r in mb],
                                 [weights[r] for r in mb], B, args, embed=mb_embed)
        loss.backward()
        pg, kl = pg + a, kl + b
    use(model, None, args)
    by_q = torch.tensor(rewards, dtype=torch.float64).view(-1, args.samples)
    mixed = int((by_q.max(1).values > by_q.min(1).values).sum()) if len(rewards) else 0
    stats = cli.all_reduce(torch.tensor([sum(r["correct"] for r in records), len(records), pg, kl, sum(rewards), mixed,
                                  len(mine), sum(r["cut"] for r in records), sum(len(r["ids"]) for r in records)],
                                 dtype=torch.float64))
    gnorm = optimizer_step(theta, opt, sched, args)
    n = max(float(stats[1]), 1.0)
    m = {"step": step + 1, "train_acc": float(stats[0]) / n, "reward": float(stats[4]) / n, "cut": float(stats[7]) / n,
         "pg_loss": float(stats[2]), "kl": float(stats[3]), "grad_norm": gnorm, "lr": sched.get_last_lr()[0],
         "gen_tokens": int(stats[8]), "rollouts": int(stats[1]), "t_rollout": t_rollout,
         "t_backward": time.time() - t0 - t_rollout, "seconds": time.time() - t0}
    if args.samples > 1:  # questions whose answers disagree: the only ones with a +1/−1 contrast
        m["mixed"] = float(stats[5]) / max(float(stats[6]), 1.0)
    return m


def sft_update(step, model, tok, task, train, theta, opt, sched, args):
    """One next-token update (--objective sft, paper Table 4): the mean negative log-likelihood of the
    task's reference solutions (task.reference) given their prompts, teacher-forced; no rollouts."""
    rank, ws = cli.world()
    t0 = time.time()
    idx = batch_indices(step, len(train), args.batch_size, args.seed)
    items = [train[i] for i in idx[rank::ws]]
    end = "" if task.stop else (tok.eos_token or "")  # GSM8K: the answer ends the turn; code ends at its fence
    prompts = [tok.encode(render_prompt(tok, task, it)) for it in items]
    targets = [tok.encode(task.reference(it) + end) for it in items]
    n_tok = float(cli.all_reduce(torch.tensor([float(sum(map(len, targets)))], dtype=torch.float64))[0])
    opt.zero_grad(set_to_none=True)
    nll = 0.0
    for s in range(0, len(items), args.micro_batch):
        use(model, theta, args)
        h, tgt, _, _ = completion_hidden(model, prompts[s:s + args.micro_batch], targets[s:s + args.micro_batch])
        loss = sum(-model.lm_head(h[c:c + 512]).float().log_softmax(-1).gather(-1, tgt[c:c + 512, None]).sum()
                   for c in range(0, len(tgt), 512)) / n_tok  # prompt tokens never count (completion only)
        loss.backward()
        nll += float(loss.detach())
    use(model, None, args)
    nll = float(cli.all_reduce(torch.tensor([nll], dtype=torch.float64))[0])
    gnorm = optimizer_step(theta, opt, sched, args)
    return {"step": step + 1, "nll": nll, "tokens": int(n_tok), "grad_norm": gnorm, "lr": sched.get_last_lr()[0],
            "seconds": time.time() - t0}


def validate(step, model, tok, task, valid, theta, cache, args, vision=None):
    """Greedy accuracy of the current expert on the validation items (sharded over ranks), with the
    per-item verdicts (rank 0 writes valid-step{N}.jsonl, for paired tests between steps)."""
    rank, ws = cli.world()
    greedy = argparse.Namespace(**{**vars(args), "temperature": 0.0, "samples": 1})
    mine = valid[rank::ws]
    records = rollout(model, tok, task, mine, *build_prompts(tok, task, mine, vision), theta, cache, greedy, seed=0,
                      progress=f"validation, step {step}")
    verdicts = torch.zeros(len(valid), 2, dtype=torch.long)  # (correct, cut) per item, gathered over ranks
    for i, r in zip(range(rank, len(valid), ws), records):
        verdicts[i] = torch.tensor([bool(r["correct"]), bool(r["cut"])])
    verdicts = cli.all_reduce(verdicts)
    k, n, cut = int(verdicts[:, 0].sum()), len(valid), int(verdicts[:, 1].sum())
    lo, hi = wilson(k, n)
    if rank == 0:
        write_jsonl(Path(args.out) / f"valid-step{step}.jsonl",
                    [{"id": it["id"], "correct": bool(v[0]), "cut": bool(v[1])} for it, v in zip(valid, verdicts)])
    return {"valid_acc": k / max(n, 1), "valid_lo": lo, "valid_hi": hi, "valid_n": n, "valid_cut": cut / max(n, 1),
            "valid": fmt_acc(k, n)}


def base_vs_expert(out, first, last):
    """The validation verdicts of step `first` (initial z ≈ base model) against step `last`, paired."""
    xs, ys = paired(out / f"valid-step{first}.jsonl", out / f"valid-step{last}.jsonl")
    only_first, only_last = discordant(xs, ys)
    return (f"valid step {first} {fmt_acc(sum(xs), len(xs))} -> step {last} {fmt_acc(sum(ys), len(ys))} | "
            f"only step {first} right {only_first}, only step {last} right {only_last} | "
            f"McNemar exact p = {mcnemar(xs, ys):.3g}")


# -----------------------------------------------------------------------------
# Training

def main(args):
    if args.threads:
        torch.set_num_threads(args.threads)
    task = get_task(args.task)  # unknown task -> ValueError listing the known ones
    device, dtype = cli.device_and_dtype(args)  # under torchrun: this rank's GPU
    cli.init_distributed(device)
    rank, ws = cli.world()
    if args.batch_size % args.samples or (args.batch_size // args.samples) % ws:
        raise ValueError(f"--batch-size {args.batch_size} must be a multiple of --samples {args.samples} "
                         f"times the {ws} rank(s): each rank answers whole questions")
    if args.objective == "sft" and not hasattr(task, "reference"):
        raise ValueError(f"--objective sft needs reference solutions; task {args.task} has none (gsm8k and mbpp do)")
    if args.shuffle_options and not isinstance(task, ARC):
        raise ValueError(f"--shuffle-options needs a multiple-choice task (arc_*); {args.task} has no options")
    if args.baseline and args.samples < 2:
        raise ValueError("--baseline loo compares answers to the same prompt: it needs --samples 2 or more")
    args.max_new_tokens = args.max_new_tokens or task.max_new_tokens
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model, tok, vision, cache = load_policy(args, task, device, dtype)
    train = task.load("train")[:args.train_limit]
    valid = task.load("valid")[:args.valid_limit]
    theta = {n: t.to(device).requires_grad_(True) for n, t in init_params(model, cache, args).items()}
    opt, sched = make_optimizer(list(theta.values()), args)

    hparams = {k: getattr(args, k) for k in ("task", "targets", "layers", "steps", "batch_size", "lr", "optimizer",
                                             "weight_decay", "clip", "kl_coef", "kl_direction", "temperature",
                                             "samples", "max_new_tokens", "seed", "wrong_reward", "cut_reward",
                                             "baseline")}
    if args.shuffle_options:
        hparams.update(shuffle_options=True)
    if args.minutes is not None:
        hparams.update(minutes=args.minutes)
    if args.adapter != "svf" or args.objective != "rl":  # recorded when not the method's defaults
        hparams.update(adapter=args.adapter, objective=args.objective)
    if args.adapter == "lora":
        hparams.update(lora_rank=args.lora_rank)
    st = {"step": 0, "metrics": [], "best": -1.0, "since_best": 0}
    ckpt = out / "state.pt"
    if args.resume and ckpt.exists():
        st = torch.load(ckpt, weights_only=False, map_location="cpu")  # θ and Adam state move to `device` below
        # settings added after a checkpoint was written compare equal when left at their default (None)
        if st["hparams"] != {k: v for k, v in hparams.items() if k in st["hparams"] or v is not None}:
            raise ValueError(f"{ckpt}: was written with other settings {st['hparams']}, not {hparams}")
        with torch.no_grad():
            for n, t in theta.items():
                t.copy_(st["theta"][n])
        opt.load_state_dict(st["opt"])
        sched.load_state_dict(st["sched"])
        if rank == 0:
            print(f"resumed {ckpt} at update {st['step']}")

    def save(name, **extra):  # the current θ as an expert (adapter) file, with the run's settings as metadata
        save_adapter(out / name, theta, model, cache, args, hparams, **extra)

    def keep(m, step):  # the validation bookkeeping: best expert, patience
        if m["valid_acc"] > st["best"]:
            st["best"], st["since_best"] = m["valid_acc"], 0
            if rank == 0:
                save("best.safetensors", valid_acc=f"{m['valid_acc']:.4f}", valid_n=m["valid_n"], step=step)
        else:
            st["since_best"] += 1

    def checkpoint():
        st.update(theta={n: t.detach().cpu().clone() for n, t in theta.items()}, opt=opt.state_dict(),
                  sched=sched.state_dict(), hparams=hparams)
        if rank == 0:
            save_ckpt(ckpt, st)
            (out / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in st["metrics"]))

    if rank == 0:
        print(f"task {args.task} | train {len(train)} | valid {len(valid)} | {len(theta)} matrices, "
              f"{sum(t.numel() for t in theta.values()):,} parameters | {ws} rank(s) | device {device}")
    if st["step"] == 0 and not st["metrics"] and args.eval_every:
        m = {"step": 0, **validate(0, model, tok, task, valid, theta, cache, args, vision)}
        keep(m, 0)
        st["metrics"].append(m)
        if rank == 0:
            print(f"step 0 | valid {m['valid']} | cut {m['valid_cut']:.0%} (initial z: ≈ the base model)")
        checkpoint()

    def minutes_spent():  # the updates' own time (validation excluded), kept in the metrics: resume-safe
        return sum(m.get("seconds", 0.0) for m in st["metrics"]) / 60

    bar = tqdm(range(st["step"], args.steps), initial=st["step"], total=args.steps, desc="updates", disable=rank > 0)
    for step in bar:
        if args.minutes is not None and minutes_spent() >= args.minutes:
            if rank == 0:
                tqdm.write(f"budget spent: {step} updates took {minutes_spent():.1f} min (--minutes {args.minutes:g})")
            break
        if args.objective == "sft":
            m = sft_update(step, model, tok, task, train, theta, opt, sched, args)
        else:
            m = update(step, model, tok, task, train, theta, opt, sched, cache, args, vision)
        if args.eval_every and ((step + 1) % args.eval_every == 0 or step + 1 == args.steps):
            m.update(validate(step + 1, model, tok, task, valid, theta, cache, args, vision))
            keep(m, step + 1)
        st["step"] = step + 1
        st["metrics"].append(m)
        checkpoint()
        if rank == 0:
            save("last.safetensors", step=step + 1)
            plot_curve(out / "curve.png", st["metrics"])
            if args.objective == "sft":
                line = f"step {step + 1} | nll {m['nll']:.3f}/token | {m['tokens']} tokens | |g| {m['grad_norm']:.2e} | {m['seconds']:.0f} s"
            else:
                line = (f"step {step + 1} | reward {m['reward']:+.2f} | right {m['train_acc']:.1%} | cut {m['cut']:.0%} | "
                        f"kl {m['kl']:.4f} | |g| {m['grad_norm']:.2e} | {m['rollouts']} rollouts, {m['gen_tokens']} tokens | "
                        f"{m['t_rollout']:.0f} s rollout + {m['t_backward']:.0f} s backward"
                        + (f" | mixed {m['mixed']:.0%}" if "mixed" in m else ""))
            tqdm.write(line + (f" | valid {m['valid']}, cut {m['valid_cut']:.0%}" if "valid" in m else ""))
        if st["since_best"] >= args.patience:
            if rank == 0:
                tqdm.write(f"early stop: {args.patience} validations without improvement")
            break
    if rank == 0:
        steps = [m["step"] for m in st["metrics"] if "valid_acc" in m]
        if len(steps) > 1 and (out / f"valid-step{steps[-1]}.jsonl").exists() and (out / "valid-step0.jsonl").exists():
            print(base_vs_expert(out, 0, steps[-1]))
        if steps:
            print(f"best valid accuracy {st['best']:.1%} -> {out / 'best.safetensors'}")
        print(f"{st['step']} updates in {minutes_spent():.1f} min "
              f"-> {out / 'last.safetensors'}")
    if dist.is_initialized():
        dist.destroy_process_group()
    return st


if __name__ == "__main__":
    cli.run(main, get_args())

"""Train an SVF expert with REINFORCE (Transformer² paper §3.2, SPEC.md §2).

One update:
  1. draw a batch of training prompts (without replacement, epoch by epoch);
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

A LLaVA checkpoint (vlm.py) trains the same way on the VQA tasks: SVF adapts its language model,
the image reaches rollouts and the policy gradient through the prompt embeddings.

    make train TASK=gsm8k       # Qwen2.5-Coder-0.5B with the CPU recipe of the README (Makefile)
    python reinforce.py --task gsm8k --model checkpoints/qwen2.5-coder-0.5b-instruct --out runs/math \\
        --batch-size 32 --steps 20 --valid-limit 100 --max-new-tokens 320
    torchrun --nproc_per_node=2 reinforce.py ...   # rollouts sharded over ranks, θ grads all-reduced
    python reinforce.py --task easy_vqa --model LLAVA_DIR --out runs/vqa --layers half --wrong-reward -0.1
"""
import argparse
import dataclasses
import json
import math
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

import cli
import svd_cache
import svf
import vlm
from evals import get_task, TASKS
from evals.common import fmt_acc, render_prompt, wilson
from generate import Tokenizer, completion_hidden, generate
from model import Transformer


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("what to train")
    g.add_argument("--task", required=True, help=f"training task: {', '.join(TASKS)}")
    g.add_argument("--model", default="checkpoints/smollm2-135m-instruct", help="HF-layout model folder")
    g.add_argument("--out", required=True, help="run directory (experts, metrics, checkpoint)")
    g.add_argument("--targets", default="mlp", choices=sorted(svd_cache.KINDS), help=svd_cache.TARGETS_HELP)
    g.add_argument("--layers", default=None, help="layer subset: 'half' or comma-separated indices (default: all)")
    g.add_argument("--parametrization", default="sigmoid", choices=["sigmoid", "raw"], help="z = sigmoid(θ) (official) or z = θ")
    g = p.add_argument_group("optimisation (defaults: paper, Table 6)")
    g.add_argument("--steps", type=int, default=100, help="number of updates")
    g.add_argument("--batch-size", type=int, default=256, help="rollouts per update (global, all ranks)")
    g.add_argument("--micro-batch", type=int, default=8, help="sequences per forward/backward (memory knob)")
    g.add_argument("--rollout-batch", type=int, default=16, help="prompts generated together (speed knob)")
    g.add_argument("--lr", type=float, default=2e-3)
    g.add_argument("--optimizer", default="adamw", choices=["adamw", "adam"], help="adamw + cosine decay (paper) or adam, constant lr (official)")
    g.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay on θ")
    g.add_argument("--clip", type=float, default=1e-3, help="max gradient norm")
    g.add_argument("--kl-coef", type=float, default=0.1, help="λ; the paper sweeps {0, 0.1, 0.2, 0.3}, the official code uses 0")
    g.add_argument("--wrong-reward", type=float, default=None,
                   help="reward of a wrong answer (default -1; the paper's VLM runs: -0.1)")
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
    g = p.add_argument_group("validation and checkpoints")
    g.add_argument("--eval-every", type=int, default=10, help="updates between validations (official: 10)")
    g.add_argument("--valid-limit", type=int, default=None, help="validate on the first N items only (CPU budget)")
    g.add_argument("--patience", type=int, default=5, help="stop after this many validations without improvement")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--resume", action="store_true", help="continue from OUT/state.pt")
    g.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    cli.add_device_args(p)
    return p.parse_args(argv)


# -----------------------------------------------------------------------------
# Distributed helpers (a no-op on a single process)

def world():
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def all_sum(t):
    """Sum over ranks in place (CPU tensors included: cli.all_reduce takes them through the GPU under NCCL)."""
    return cli.all_reduce(t)


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
    """Rendered prompts; with a VLM (vision = (LLaVA, Preprocessor)) each becomes its id list with
    the image tokens expanded, and its preprocessed image rides along in the item ("_image")."""
    prompts = [render_prompt(tok, task, it) for it in items]
    if vision is None:
        return prompts
    out = []
    for p, it in zip(prompts, items):
        ids, it["_image"] = vlm.prepare(vision[0], tok, p, [it["image"]], vision[1])
        out.append(ids)
    return out


def embedder(items, vision):
    """None for a text model; for a VLM: padded ids -> embeddings with the items' images spliced in."""
    if vision is None:
        return None
    images = [im for it in items for im in it["_image"]]
    return lambda ids: vision[0].embed(ids, images)


def rollout(model, tok, task, items, prompts, theta, cache, args, seed, vision=None):
    """Generate answers with the current expert merged in; returns completion ids and rewards."""
    zs = {n: svf.theta_to_z(t.detach(), args.parametrization) for n, t in theta.items()}
    ids, correct = [], []
    svf.set_z(model, None)  # the SVFLinear modules run on their (merged) weights
    with svf.merged(model, zs, cache):
        for s in range(0, len(items), args.rollout_batch):
            out, texts = generate(model, tok, prompts[s:s + args.rollout_batch], max_new_tokens=args.max_new_tokens,
                                  temperature=args.temperature, top_p=args.top_p, seed=seed + s, stop=list(task.stop),
                                  embed=embedder(items[s:s + args.rollout_batch], vision))
            ids += out
            correct += task.check(items[s:s + args.rollout_batch], texts)
    return ids, correct


def advantages(rewards, samples, baseline):
    """The weight of each rollout in the policy gradient. The paper uses the reward itself (±1).
    baseline "loo" (leave-one-out, as in RLOO): r_i − mean of the other answers to the same
    prompt, so a prompt whose answers are all right or all wrong contributes nothing, and the
    gradient is the contrast between better and worse answers to one question. `rewards` is the
    global batch, prompt-major (the samples of prompt j at j*samples ... j*samples + samples-1)."""
    r = torch.tensor(rewards, dtype=torch.float64).view(-1, samples)  # (prompts, samples)
    if baseline == "loo":
        r = r - (r.sum(1, keepdim=True) - r) / (samples - 1)
    return r.flatten().tolist()


def kl_per_token(logp, ref_logp, direction):
    """Σ_v over the vocabulary at each position; paper KL(π′‖π), official KL(π_ref‖π′)."""
    if direction == "paper":
        return (logp.exp() * (logp - ref_logp)).sum(-1)
    return (ref_logp.exp() * (ref_logp - logp)).sum(-1)


def loss_on(model, theta, prompt_ids, comp_ids, rewards, B, args, chunk=512, embed=None):
    """Policy-gradient + KL loss of one micro-batch, already divided by the global batch B."""
    if args.kl_coef > 0:  # the base policy at the same positions (no grad, exact base weights)
        svf.set_z(model, None)
        with torch.no_grad():
            h_ref = completion_hidden(model, prompt_ids, comp_ids, embed)[0]
    zs = {n: svf.theta_to_z(t, args.parametrization) for n, t in theta.items()}
    svf.set_z(model, zs)
    h, targets, row, _ = completion_hidden(model, prompt_ids, comp_ids, embed)
    r = torch.tensor(rewards, dtype=torch.float32, device=h.device)[row]  # row lives on the model's device
    pg, kl = h.new_zeros(()), h.new_zeros(())
    for s in range(0, len(targets), chunk):  # chunks keep tokens × vocab logits small
        logp = model.lm_head(h[s:s + chunk]).float().log_softmax(-1)
        chosen = logp.gather(-1, targets[s:s + chunk, None]).squeeze(-1)
        pg = pg - (chosen * r[s:s + chunk]).sum()
        if args.kl_coef > 0:
            ref = model.lm_head(h_ref[s:s + chunk]).float().log_softmax(-1)
            kl = kl + kl_per_token(logp, ref, args.kl_direction).sum()
    loss = (pg + args.kl_coef * kl) / B
    loss.backward()
    return float(pg.detach()) / B, float(kl.detach()) / B


def evaluate(model, tok, task, items, theta, cache, args, vision=None):
    """Greedy accuracy of the current expert on `items` (sharded over ranks); returns (k, n)."""
    rank, ws = world()
    mine = items[rank::ws]
    prompts = build_prompts(tok, task, mine, vision)
    greedy = argparse.Namespace(**{**vars(args), "temperature": 0.0})
    _, correct = rollout(model, tok, task, mine, prompts, theta, cache, greedy, seed=0, vision=vision)
    k = all_sum(torch.tensor([sum(correct), len(correct)], dtype=torch.long))
    return int(k[0]), int(k[1])


def save_ckpt(path, state):
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)  # atomic: a kill leaves the previous checkpoint or the new one


def plot_curve(out, metrics):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 3.5))
    t = [m for m in metrics if "train_acc" in m]
    ax.plot([m["step"] for m in t], [m["train_acc"] for m in t], label="rollouts rewarded +1", alpha=0.6)
    v = [m for m in metrics if "valid_acc" in m]
    ax.errorbar([m["step"] for m in v], [m["valid_acc"] for m in v],
                yerr=[[m["valid_acc"] - m["valid_lo"] for m in v], [m["valid_hi"] - m["valid_acc"] for m in v]],
                fmt="o-", label="valid accuracy (95% CI)")
    ax.set_xlabel("update")
    ax.set_ylabel("accuracy")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "curve.png", dpi=100)
    plt.close(fig)


# -----------------------------------------------------------------------------
# Training

def main(args):
    if args.threads:
        torch.set_num_threads(args.threads)
    task = get_task(args.task)  # unknown task -> ValueError listing the known ones
    device, dtype = cli.device_and_dtype(args)  # under torchrun: this rank's GPU
    cli.init_distributed(device)
    rank, ws = world()
    if args.batch_size % ws:
        raise ValueError(f"--batch-size {args.batch_size} must be divisible by the {ws} ranks")
    if args.baseline and args.samples < 2:
        raise ValueError("--baseline loo compares answers to the same prompt: it needs --samples 2 or more")
    args.max_new_tokens = args.max_new_tokens or task.max_new_tokens
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

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
    if args.wrong_reward is not None:
        task = dataclasses.replace(task, wrong_reward=args.wrong_reward)
    cache = svd_cache.load(model, targets=args.targets, layers=args.layers)
    svf.attach(model, cache)
    train = task.load("train")[:args.train_limit]
    valid = task.load("valid")[:args.valid_limit]
    theta = {n: t.to(device).requires_grad_(True) for n, t in svf.init_theta(cache, seed=args.seed).items()}
    params = list(theta.values())
    if args.optimizer == "adamw":
        opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / args.steps)))
    else:
        opt = torch.optim.Adam(params, lr=args.lr)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)

    hparams = {k: getattr(args, k) for k in ("task", "targets", "layers", "steps", "batch_size", "lr", "optimizer",
                                             "weight_decay", "clip", "kl_coef", "kl_direction", "temperature",
                                             "samples", "max_new_tokens", "seed", "wrong_reward", "baseline")}
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

    def expert(**extra):
        return svf.Expert.new({n: t.detach() for n, t in theta.items()}, model, cache, args.parametrization,
                              **hparams, **extra)

    def checkpoint():
        st.update(theta={n: t.detach().cpu().clone() for n, t in theta.items()}, opt=opt.state_dict(),
                  sched=sched.state_dict(), hparams=hparams)
        if rank == 0:
            save_ckpt(ckpt, st)
            (out / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in st["metrics"]))

    def validate(step):
        k, n = evaluate(model, tok, task, valid, theta, cache, args, vision)
        acc = k / max(n, 1)
        lo, hi = wilson(k, n)
        if acc > st["best"]:
            st["best"], st["since_best"] = acc, 0
            if rank == 0:
                expert(valid_acc=f"{acc:.4f}", valid_n=n, step=step).save(out / "best.safetensors")
        else:
            st["since_best"] += 1
        return {"valid_acc": acc, "valid_lo": lo, "valid_hi": hi, "valid_n": n, "valid": fmt_acc(k, n)}

    if rank == 0:
        print(f"task {args.task} | train {len(train)} | valid {len(valid)} | {len(theta)} matrices, "
              f"{sum(t.numel() for t in params):,} parameters | {ws} rank(s) | device {device}")
    if st["step"] == 0 and not st["metrics"]:
        st["metrics"].append({"step": 0, **validate(0)})
        if rank == 0:
            print(f"step 0 | valid {st['metrics'][-1]['valid']} (initial z: ≈ the base model)")
        checkpoint()

    bar = tqdm(range(st["step"], args.steps), initial=st["step"], total=args.steps, desc="updates", disable=rank > 0)
    for step in bar:
        t0 = time.time()
        idx = batch_indices(step, len(train), args.batch_size // args.samples, args.seed)
        items = [train[i] for i in idx for _ in range(args.samples)][rank::ws]
        prompts = build_prompts(tok, task, items, vision)
        comp_ids, correct = rollout(model, tok, task, items, prompts, theta, cache, args,
                                    seed=args.seed * 7919 + step * 1009 + rank, vision=vision)
        rewards = [task.reward(c) for c in correct]
        # the whole batch's rewards on every rank (rows are dealt round-robin), then each rank's weights
        glob = torch.zeros(len(idx) * args.samples, dtype=torch.float64)
        glob[rank::ws] = torch.tensor(rewards, dtype=torch.float64)
        glob = all_sum(glob).view(-1, args.samples)
        weights = advantages(glob.flatten().tolist(), args.samples, args.baseline)[rank::ws]
        prompt_ids = [tok.encode(p) if isinstance(p, str) else p for p in prompts]
        B = len(idx) * args.samples
        opt.zero_grad(set_to_none=True)
        pg = kl = 0.0
        # a rollout with weight 0 (a baseline cancelled its reward) adds nothing to the policy
        # gradient: skip its forward/backward, unless the KL term still needs it
        rows = [i for i in range(len(items)) if weights[i] != 0 or args.kl_coef > 0]
        for s in range(0, len(rows), args.micro_batch):
            mb = rows[s:s + args.micro_batch]
            a, b = loss_on(model, theta, [prompt_ids[i] for i in mb], [comp_ids[i] for i in mb],
                           [weights[i] for i in mb], B, args, embed=embedder([items[i] for i in mb], vision))
            pg, kl = pg + a, kl + b
        svf.set_z(model, None)
        for t in params:  # sum the θ gradients of all ranks (each already divided by the global B)
            if t.grad is None:  # no rows on this rank took part
                t.grad = torch.zeros_like(t)
            all_sum(t.grad)
        stats = all_sum(torch.tensor([sum(correct), len(correct), pg, kl, sum(rewards)], dtype=torch.float64))
        gnorm = float(torch.nn.utils.clip_grad_norm_(params, args.clip))
        opt.step()
        sched.step()
        st["step"] = step + 1
        m = {"step": step + 1, "train_acc": float(stats[0] / stats[1]), "reward": float(stats[4] / stats[1]),
             "pg_loss": float(stats[2]), "kl": float(stats[3]), "grad_norm": gnorm, "lr": sched.get_last_lr()[0],
             "gen_tokens": sum(len(c) for c in comp_ids), "seconds": time.time() - t0}
        if args.samples > 1:  # prompts whose answers disagree: the only ones with a +1/−1 contrast
            m["mixed"] = float(((glob.max(1).values > glob.min(1).values).double()).mean())
        if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
            m.update(validate(step + 1))
        st["metrics"].append(m)
        checkpoint()
        if rank == 0:
            expert(step=step + 1).save(out / "last.safetensors")
            if "valid" in m:
                plot_curve(out, st["metrics"])
            tqdm.write(f"step {step + 1} | reward {m['reward']:+.2f} | train acc {m['train_acc']:.1%} | kl {m['kl']:.4f} | "
                       f"|g| {gnorm:.2e} | {m['seconds']:.1f} s" + (f" | mixed {m['mixed']:.0%}" if "mixed" in m else "")
                       + (f" | valid {m['valid']}" if "valid" in m else ""))
        if st["since_best"] >= args.patience:
            if rank == 0:
                tqdm.write(f"early stop: {args.patience} validations without improvement")
            break
    if rank == 0:
        print(f"best valid accuracy {st['best']:.1%} -> {out / 'best.safetensors'}")
    if dist.is_initialized():
        dist.destroy_process_group()
    return st


if __name__ == "__main__":
    cli.run(main, get_args())

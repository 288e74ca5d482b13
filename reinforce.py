"""Train an SVF expert with REINFORCE (Transformer² paper §3.2, Eq. 1; docs/PAPER.md §2).

Eq. 1 over θ (one vector per adapted matrix; z = sigmoid(θ) scales its singular values), π′ the
adapted policy, π the base model:  J(θ) = E_{ŷ ~ π′}[ log π′(ŷ|x) · r(ŷ, y) ] − λ·KL(π′‖π).
One update minimises its estimate on B rollouts (policy_loss), both terms under the 1/B:

    loss = ( −Σ_i Σ_t log π′(ŷ_it | x_i, ŷ_i,<t) · w_i  +  λ · Σ_i Σ_t KL_t ) / B

w_i is the reward r_i = +1 / −1 (--wrong-reward, --cut-reward) or, with --baseline loo (not in the
paper), r_i minus the mean reward of the prompt's other --samples answers; KL_t is summed over the
vocabulary at each generated position, KL(π′‖π) (paper) or KL(π‖π′) (official, --kl-direction).
update(): draw prompts (without replacement), roll out with the expert merged into the weights,
reward, backpropagate into θ only (svf.py's factored path), sum gradients over ranks, clip (1e-3),
step Adam (official: constant lr) or AdamW (paper: cosine). Every --eval-every updates a greedy
validation keeps the best expert (best.safetensors).

Greedy rollouts (the default, as the official code) are not an on-policy REINFORCE estimate: the
identity ∇E_{ŷ~π′}[r] = E_{ŷ~π′}[r·∇log π′(ŷ)] needs answers drawn from π′, and the greedy answer
is π′'s mode. Weighting it by r only raises (r = +1) or lowers (r = −1) the answer the model already
prefers: a biased gradient of J, with no exploration. --temperature 1 samples from π′ (unbiased);
--samples k with --baseline loo also lowers the variance.
The shipped experts use none of the defaults (Makefile RECIPE_*, docs/RESULTS.md): Adam at a
constant lr, λ = 0 (no KL), sampled rollouts (T 0.7-1.0, 4-8 per prompt) and, for math, code and
reasoning, the leave-one-out baseline: on 2 CPU cores what moved validation in a few updates.

The same loop trains paper Table 4's baselines (--adapter lora: lora.py's A, B; --objective sft: the
next-token loss on reference solutions) and LLaVA experts (vlm.py: the image reaches rollouts and
gradient through the prompt embeddings). The run around it (exact --resume, no overwritten run,
collective stopping under torchrun, plots) sits at the end of the file.
This file is past docs/STYLE.md's 350 lines because the whole update, its two baselines and the run that
checkpoints it are one concept; each piece is short and a reader follows an update in one file.

    make first-run              # ~5 min: reward and validation moving on the real model, then CEM
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
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

import cli
import lora
import svd_cache
import svf
import vlm
from cli import finite_float, nonneg_float, nonneg_int, positive_float, positive_int, probability
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
    g.add_argument("--lora-rank", type=positive_int, default=16, help="LoRA r (paper: 16)")
    g.add_argument("--lora-alpha", type=positive_float, default=32.0, help="LoRA α, scale α/r (paper: 32)")
    g.add_argument("--objective", default="rl", choices=["rl", "sft"],
                   help="rl: REINFORCE on rollouts; sft: next-token loss on reference solutions (paper Table 4)")
    g = p.add_argument_group("optimisation (defaults: paper, Table 6)")
    g.add_argument("--steps", type=positive_int, default=100, help="number of updates")
    g.add_argument("--minutes", type=positive_float, default=None,
                   help="no update starts once the updates (validation excluded) took this long (Table 4's budget)")
    g.add_argument("--batch-size", type=positive_int, default=256, help="rollouts per update (global, all ranks)")
    g.add_argument("--micro-batch", type=positive_int, default=4,
                   help="rollouts per forward/backward (memory knob; a question's samples stay together). 4 fits "
                        "Llama-3-8B in bf16 on one 80 GB GPU at GSM8K's and MATH's budgets (tools/memory.py)")
    g.add_argument("--slots", type=positive_int, default=64,
                   help="sequences decoded together by the engine (a speed knob, KV memory grows with it)")
    g.add_argument("--lr", type=positive_float, default=2e-3)
    g.add_argument("--optimizer", default="adamw", choices=["adamw", "adam"], help="adamw + cosine decay (paper) or adam, constant lr (official)")
    g.add_argument("--weight-decay", type=nonneg_float, default=0.0, help="AdamW weight decay on θ")
    g.add_argument("--clip", type=positive_float, default=1e-3, help="max gradient norm")
    g.add_argument("--kl-coef", type=nonneg_float, default=0.1, help="λ; the paper sweeps {0, 0.1, 0.2, 0.3}, the official code uses 0")
    g.add_argument("--wrong-reward", type=finite_float, default=-1.0,
                   help="reward of a wrong answer (paper: -1; the paper's VLM runs: -0.1)")
    g.add_argument("--cut-reward", type=finite_float, default=None,
                   help="not in the paper: reward of an answer cut by --max-new-tokens (default: scored as any other)")
    g.add_argument("--baseline", default=None, choices=["loo"],
                   help="not in the paper: 'loo' subtracts the mean reward of the prompt's other --samples answers")
    g.add_argument("--kl-direction", default="paper", choices=["paper", "official"], help="KL(π′‖π) or KL(π‖π′)")
    g = p.add_argument_group("rollouts")
    g.add_argument("--temperature", type=nonneg_float, default=0.0,
                   help="0 = greedy (official code; not on-policy, see above); 1 = sampled from the policy")
    g.add_argument("--top-p", type=probability, default=1.0)
    g.add_argument("--samples", type=positive_int, default=1, help="rollouts per prompt (use with --temperature > 0)")
    g.add_argument("--max-new-tokens", type=positive_int, default=None, help="default: the task's")
    g.add_argument("--train-limit", type=positive_int, default=None, help="use only the first N training items")
    g.add_argument("--shuffle-options", action="store_true",
                   help="not in the paper; ARC: each update shows a question's options in a fresh seeded order, so a "
                        "preferred letter earns nothing in expectation (validation keeps the dataset's order)")
    g = p.add_argument_group("validation and checkpoints")
    g.add_argument("--eval-every", type=nonneg_int, default=10,
                   help="updates between validations (official: 10); 0 = none at all (the expert is last.safetensors)")
    g.add_argument("--valid-limit", type=positive_int, default=None, help="validate on the first N items only (CPU budget)")
    g.add_argument("--patience", type=positive_int, default=5, help="stop after this many validations without improvement")
    g.add_argument("--seed", type=nonneg_int, default=0)
    again = g.add_mutually_exclusive_group()
    again.add_argument("--resume", action="store_true", help="continue the run in OUT from its state.pt")
    again.add_argument("--force", action="store_true", help="start over in an OUT that holds a run (its files are removed)")
    g.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads")
    cli.add_device_args(p)
    return p.parse_args(argv)


# -----------------------------------------------------------------------------
# The objective: paper Eq. 1 on one batch of rollouts

def reward(correct, cut, args):
    """The paper's reward: +1 for a right answer, -1 (--wrong-reward) for a wrong one. With
    --cut-reward, an answer cut off by the token budget gets that instead, even when the number
    picked from its unfinished text happens to be right: finishing becomes part of the task."""
    if cut and args.cut_reward is not None:
        return args.cut_reward
    return 1.0 if correct else args.wrong_reward


def advantages(rewards, samples, baseline):
    """The weight w of each rollout in the policy gradient. The paper uses the reward itself (±1).
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
    """Eq. 1's loss on one micro-batch, divided by the global batch B:
    (-Σ_t log π′(y_t)·w + λ·Σ_t KL_t) / B. Returns (loss, pg, kl), pg and kl already / B; the caller
    runs backward. Answers to the same prompt share that prompt's forward (generate.completion_hidden;
    share=False runs one prompt forward per answer, for the benchmark)."""
    if args.kl_coef > 0:  # the base policy π at the same positions (no grad, exact base weights)
        use(model, None, args)
        with torch.no_grad():
            h_ref = completion_hidden(model, prompt_ids, comp_ids, embed, share)[0]
    use(model, theta, args)
    h, targets, row, _ = completion_hidden(model, prompt_ids, comp_ids, embed, share)  # (N tokens, C)
    w = torch.tensor(weights, dtype=torch.float32, device=h.device)[row]  # each token carries its answer's w
    pg, kl = h.new_zeros((), dtype=torch.float32), h.new_zeros((), dtype=torch.float32)
    for s in range(0, len(targets), chunk):  # chunks keep tokens × vocab logits small
        logp = model.lm_head(h[s:s + chunk]).float().log_softmax(-1)  # log π′, (chunk, vocab)
        chosen = logp.gather(-1, targets[s:s + chunk, None]).squeeze(-1)  # log π′(y_t)
        pg = pg - (chosen * w[s:s + chunk]).sum()
        if args.kl_coef > 0:
            ref = model.lm_head(h_ref[s:s + chunk]).float().log_softmax(-1)  # log π
            kl = kl + kl_per_token(logp, ref, args.kl_direction).sum()
    return (pg + args.kl_coef * kl) / B, float(pg.detach()) / B, float(kl.detach()) / B


# -----------------------------------------------------------------------------
# One update

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


def rollout(policy, task, items, prompts, embed, theta, args, seed, progress=None):
    """args.samples answers per item (prompts, embed from build_prompts) with the current expert
    merged into the weights (zero overhead), through the engine (every slot busy; each item's
    prompt prefilled once). Returns evals.common.answer's records, item-major."""
    with merged(policy, theta, args):
        return answer(policy.model, policy.tok, task, items, samples=args.samples, temperature=args.temperature,
                      top_p=args.top_p, seed=seed, max_new_tokens=args.max_new_tokens, slots=args.slots,
                      prompts=prompts, embed=embed, progress=progress if cli.world()[0] == 0 else None)


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


def update(step, policy, task, train, theta, opt, sched, args):
    """One REINFORCE update: roll out, reward, weigh, backpropagate Eq. 1 into θ, step. Returns its metrics."""
    rank, ws = cli.world()
    t0 = time.time()
    # 1. this update's questions; each rank answers whole questions, so their samples stay together
    idx = batch_indices(step, len(train), args.batch_size // args.samples, args.seed)
    mine = list(range(rank, len(idx), ws))
    items = [train[idx[q]] for q in mine]
    if args.shuffle_options:  # a fresh option order per question and update, shared by its samples
        items = [shuffle_options(it, f"{args.seed}-{step}-{it['id']}") for it in items]
    # 2. roll out; one sampling seed per question (not per rank), so any number of ranks draws the same answers
    seeds = [args.seed * 7919 + step * 1009 + q * args.samples for q in mine]
    prompts, embed = build_prompts(policy.tok, task, items, policy.vision)  # a VLM's images preprocessed once
    records = rollout(policy, task, items, prompts, embed, theta, args, seeds, f"update {step + 1} rollouts")
    t_rollout = time.time() - t0
    # 3. reward r and policy-gradient weight w of every answer
    r = [reward(x["correct"], x["cut"], args) for x in records]
    w = advantages(r, args.samples, args.baseline)
    # 4. the loss over the global batch B, micro-batch by micro-batch, gradients accumulating in θ.grad;
    # an answer with w = 0 adds nothing to the policy gradient: skip it unless the KL term needs it
    B = len(idx) * args.samples
    opt.zero_grad(set_to_none=True)
    pg = kl = 0.0
    rows = [i for i in range(len(records)) if w[i] != 0 or args.kl_coef > 0]
    for mb in micro_batches(rows, args.samples, args.micro_batch):
        mb_embed = None if embed is None else (lambda ids, p, mb=mb: embed(ids, [mb[i] // args.samples for i in p]))
        loss, mb_pg, mb_kl = policy_loss(policy.model, theta, [records[i]["prompt_ids"] for i in mb],
                                         [records[i]["ids"] for i in mb], [w[i] for i in mb], B, args, embed=mb_embed)
        loss.backward()
        pg, kl = pg + mb_pg, kl + mb_kl
    use(policy.model, None, args)
    # 5. gradients summed over ranks, clipped, one optimizer step
    gnorm = optimizer_step(theta, opt, sched, args)
    by_q = torch.tensor(r, dtype=torch.float64).view(-1, args.samples)  # (questions, samples)
    s = cli.all_reduce_sums({"rollouts": len(records), "right": sum(x["correct"] for x in records),
                             "cut": sum(x["cut"] for x in records), "reward": sum(r), "pg": pg, "kl": kl,
                             "tokens": sum(len(x["ids"]) for x in records), "questions": len(mine),
                             "mixed": int((by_q.max(1).values > by_q.min(1).values).sum()) if r else 0})
    n = max(s["rollouts"], 1.0)
    m = {"step": step + 1, "train_acc": s["right"] / n, "reward": s["reward"] / n, "cut": s["cut"] / n,
         "pg_loss": s["pg"], "kl": s["kl"], "grad_norm": gnorm, "lr": sched.get_last_lr()[0],
         "gen_tokens": int(s["tokens"]), "rollouts": int(s["rollouts"]), "t_rollout": t_rollout,
         "t_backward": time.time() - t0 - t_rollout, "seconds": time.time() - t0}
    if args.samples > 1:  # questions whose answers disagree: the only ones with a +1/−1 contrast
        m["mixed"] = s["mixed"] / max(s["questions"], 1.0)
    return m


def sft_update(step, policy, task, train, theta, opt, sched, args):
    """One next-token update (--objective sft, paper Table 4): the mean negative log-likelihood of the
    task's reference solutions (task.reference) given their prompts, teacher-forced; no rollouts."""
    rank, ws = cli.world()
    t0 = time.time()
    idx = batch_indices(step, len(train), args.batch_size, args.seed)
    items = [train[i] for i in idx[rank::ws]]
    end = "" if task.stop else (policy.tok.eos_token or "")  # GSM8K: the answer ends the turn; code ends at its fence
    prompts = [policy.tok.encode(render_prompt(policy.tok, task, it)) for it in items]
    targets = [policy.tok.encode(task.reference(it) + end) for it in items]
    n_tok = cli.all_reduce_sums({"tokens": sum(map(len, targets))})["tokens"]
    opt.zero_grad(set_to_none=True)
    nll = 0.0
    for s in range(0, len(items), args.micro_batch):
        use(policy.model, theta, args)
        h, tgt, _, _ = completion_hidden(policy.model, prompts[s:s + args.micro_batch], targets[s:s + args.micro_batch])
        loss = sum(-policy.model.lm_head(h[c:c + 512]).float().log_softmax(-1).gather(-1, tgt[c:c + 512, None]).sum()
                   for c in range(0, len(tgt), 512)) / n_tok  # prompt tokens never count (completion only)
        loss.backward()
        nll += float(loss.detach())
    use(policy.model, None, args)
    gnorm = optimizer_step(theta, opt, sched, args)
    return {"step": step + 1, "nll": cli.all_reduce_sums({"nll": nll})["nll"], "tokens": int(n_tok),
            "grad_norm": gnorm, "lr": sched.get_last_lr()[0], "seconds": time.time() - t0}


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


def validate(step, policy, task, valid, theta, args):
    """Greedy accuracy of the current expert on the validation items (sharded over ranks), with the
    per-item verdicts (rank 0 writes valid-step{N}.jsonl, for paired tests between steps)."""
    rank, ws = cli.world()
    greedy = argparse.Namespace(**{**vars(args), "temperature": 0.0, "samples": 1})
    mine = valid[rank::ws]
    records = rollout(policy, task, mine, *build_prompts(policy.tok, task, mine, policy.vision), theta, greedy,
                      seed=0, progress=f"validation, step {step}")
    verdicts = torch.zeros(len(valid), 2, dtype=torch.long)  # (correct, cut) per item, gathered over ranks
    for i, x in zip(range(rank, len(valid), ws), records):
        verdicts[i] = torch.tensor([bool(x["correct"]), bool(x["cut"])])
    verdicts = cli.all_reduce(verdicts)
    k, n, cut = int(verdicts[:, 0].sum()), len(valid), int(verdicts[:, 1].sum())
    lo, hi = wilson(k, n)
    if rank == 0:
        write_jsonl(Path(args.out) / f"valid-step{step}.jsonl",
                    [{"id": it["id"], "correct": bool(v[0]), "cut": bool(v[1])} for it, v in zip(valid, verdicts)])
    return {"valid_acc": k / max(n, 1), "valid_lo": lo, "valid_hi": hi, "valid_n": n, "valid_cut": cut / max(n, 1),
            "valid": fmt_acc(k, n)}


# -----------------------------------------------------------------------------
# Training

def main(args):
    if args.threads:
        torch.set_num_threads(args.threads)
    task = get_task(args.task)  # unknown task -> ValueError listing the known ones
    device, dtype = cli.device_and_dtype(args)  # under torchrun: this rank's GPU
    cli.init_distributed(device)
    rank, ws = cli.world()
    check_args(task, args, ws)  # everything about the flags, before any model is loaded
    args.max_new_tokens = args.max_new_tokens or task.max_new_tokens
    out, hparams = Path(args.out), run_settings(args)
    st = open_run(out, args, hparams)  # refuses to overwrite a run; the checkpoint with --resume
    policy = load_policy(args, task, device, dtype)
    train = task.load("train")[:args.train_limit]
    valid = task.load("valid")[:args.valid_limit]
    theta = {n: t.to(device).requires_grad_(True) for n, t in init_params(policy, args).items()}
    opt, sched = make_optimizer(list(theta.values()), args)
    if "theta" in st:  # resumed: θ, the optimizer's moments and the schedule as they were
        with torch.no_grad():
            for n, t in theta.items():
                t.copy_(st["theta"][n])
        opt.load_state_dict(st["opt"])
        sched.load_state_dict(st["sched"])
        if rank == 0:
            print(f"resumed {out / 'state.pt'} at update {st['step']}")

    def save(name, **extra):  # the current θ as an expert (adapter) file, with the run's settings as metadata
        save_adapter(out / name, theta, policy, args, hparams, **extra)

    def validation(step):  # score the current expert, keep it if it is the best so far, count patience
        v = validate(step, policy, task, valid, theta, args)
        if v["valid_acc"] > st["best"]:
            st["best"], st["since_best"] = v["valid_acc"], 0
            if rank == 0:
                save("best.safetensors", valid_acc=f"{v['valid_acc']:.4f}", valid_n=v["valid_n"], step=step)
        else:
            st["since_best"] += 1
        return v

    if rank == 0:
        print(f"task {args.task} | train {len(train)} | valid {len(valid)} | {len(theta)} matrices, "
              f"{sum(t.numel() for t in theta.values()):,} parameters | {ws} rank(s) | device {device}")
    if st["step"] == 0 and not st["metrics"] and args.eval_every:
        st["metrics"].append(m := {"step": 0, **validation(0)})
        if rank == 0:
            print(f"step 0 | valid {m['valid']} | cut {m['valid_cut']:.0%} (initial z: ≈ the base model)")
        checkpoint(out, st, theta, opt, sched, hparams)

    one_update = sft_update if args.objective == "sft" else update
    bar = tqdm(initial=st["step"], total=args.steps, desc="updates", disable=rank > 0)
    while not (why := stop_reason(st, args)):  # decided by all ranks together
        step = st["step"]
        m = one_update(step, policy, task, train, theta, opt, sched, args)
        if args.eval_every and ((step + 1) % args.eval_every == 0 or step + 1 == args.steps):
            m.update(validation(step + 1))
        st["step"] = step + 1
        st["metrics"].append(m)
        checkpoint(out, st, theta, opt, sched, hparams)
        if rank == 0:
            save("last.safetensors", step=step + 1)
            plot_curve(out / "curve.png", st["metrics"])
            tqdm.write(progress_line(m))
        bar.update()
    bar.close()
    if rank == 0:
        report(out, st, why, args)
    if dist.is_initialized():
        dist.destroy_process_group()
    return st


# -----------------------------------------------------------------------------
# Below the algorithm: the adapter switch, flags, the run folder, stopping, printing

@dataclass
class Policy:  # svd: the SVD cache of the targets (SVF), None for LoRA (its A, B sit beside the weights)
    model: Transformer
    tok: Tokenizer
    vision: tuple | None
    names: list
    svd: svd_cache.SVDCache | None


def load_policy(args, task, device, dtype):
    """The base model with the adapter's modules on the target matrices (SVFLinear or LoRALinear)."""
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
        names = lora.target_names(model, args.targets, args.layers)
        lora.attach(model, names)
        return Policy(model, tok, vision, names, None)
    svd = svd_cache.load(model, targets=args.targets, layers=args.layers)
    svf.attach(model, svd)
    return Policy(model, tok, vision, svd.names, svd)


def use(model, theta, args):
    """Run the model with the trainable tensors in the forward (differentiable): SVF's z = f(θ) on the
    factored layers, or LoRA's A, B beside the weights. theta None: exactly the base weights."""
    if args.adapter == "lora":
        lora.set_params(model, theta, args.lora_alpha / args.lora_rank)
    else:
        svf.set_z(model, None if theta is None else {n: svf.theta_to_z(t, args.parametrization) for n, t in theta.items()})


def merged(policy, theta, args):
    """The current adapter folded into the weights (zero-overhead generation), restored on exit."""
    use(policy.model, None, args)  # the factored / LoRA paths off: the merged weights do the work
    detached = {n: t.detach() for n, t in theta.items()}
    if args.adapter == "lora":
        return lora.merged(policy.model, detached, scale=args.lora_alpha / args.lora_rank)
    return svf.merged(policy.model, {n: svf.theta_to_z(t, args.parametrization) for n, t in detached.items()},
                      policy.svd)


def init_params(policy, args):
    """θ₀ (SVF, official init: z ≈ 0.525 everywhere, ≈ the base model) or A₀, B₀ = 0 (LoRA: the base model)."""
    if args.adapter == "lora":
        return lora.init_params(policy.model, policy.names, rank=args.lora_rank, seed=args.seed)
    return svf.init_theta(policy.svd, seed=args.seed)


def make_optimizer(params, args):
    """AdamW with cosine decay (paper) or Adam with a constant learning rate (official code)."""
    if args.optimizer == "adamw":
        opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)
        return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / args.steps)))
    opt = torch.optim.Adam(params, lr=args.lr)
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)


def save_adapter(path, theta, policy, args, hparams, **extra):
    """The trained tensors as an expert (SVF) or adapter (LoRA) file, with the run's settings as metadata."""
    theta = {n: t.detach() for n, t in theta.items()}
    if args.adapter == "lora":
        lora.Adapter.new(theta, policy.model, alpha=args.lora_alpha, **hparams, **extra).save(path)
    else:  # the expert records the layers it adapts itself (indices), not the --layers shorthand
        hp = {k: v for k, v in hparams.items() if k != "layers"}
        svf.Expert.new(theta, policy.model, policy.svd, args.parametrization, **hp, **extra).save(path)


def check_args(task, args, ws):
    """The flags that depend on each other, the task or the number of ranks (each flag alone is checked by argparse)."""
    if args.batch_size % args.samples or (args.batch_size // args.samples) % ws:
        raise ValueError(f"--batch-size {args.batch_size} must be a multiple of --samples {args.samples} "
                         f"times the {ws} rank(s): each rank answers whole questions")
    if args.objective == "sft" and not hasattr(task, "reference"):
        raise ValueError(f"--objective sft needs reference solutions; task {args.task} has none (gsm8k and mbpp do)")
    if args.shuffle_options and not isinstance(task, ARC):
        raise ValueError(f"--shuffle-options needs a multiple-choice task (arc_*); {args.task} has no options")
    if args.baseline and args.samples < 2:
        raise ValueError("--baseline loo compares answers to the same prompt: it needs --samples 2 or more")


def run_settings(args):
    """The settings a resumed run must share with the checkpoint (and every expert file records)."""
    hp = {k: getattr(args, k) for k in ("task", "targets", "layers", "steps", "batch_size", "lr", "optimizer",
                                        "weight_decay", "clip", "kl_coef", "kl_direction", "temperature", "samples",
                                        "max_new_tokens", "seed", "wrong_reward", "cut_reward", "baseline")}
    if args.shuffle_options:
        hp.update(shuffle_options=True)
    if args.minutes is not None:
        hp.update(minutes=args.minutes)
    if args.adapter != "svf" or args.objective != "rl":  # recorded when not the method's defaults
        hp.update(adapter=args.adapter, objective=args.objective)
    if args.adapter == "lora":
        hp.update(lora_rank=args.lora_rank)
    return hp


def open_run(out, args, hparams):
    """A fresh state, or OUT/state.pt with --resume (same settings); an existing run is refused
    without --resume or --force (cli.open_run_dir), before any model is loaded."""
    files = ("metrics.jsonl", "best.safetensors", "last.safetensors", "curve.png", "valid-step*.jsonl")
    if not cli.open_run_dir(out, args.resume, args.force, "state.pt", files):
        return {"step": 0, "metrics": [], "best": -1.0, "since_best": 0}
    st = cli.load_state(out / "state.pt", ("step", "metrics", "best", "since_best", "theta", "opt", "sched", "hparams"))
    # settings added after a checkpoint was written compare equal when left at their default (None)
    if st["hparams"] != {k: v for k, v in hparams.items() if k in st["hparams"] or v is not None}:
        raise ValueError(f"{out / 'state.pt'}: was written with other settings {st['hparams']}, not {hparams}")
    return st


def checkpoint(out, st, theta, opt, sched, hparams):
    """After every update: everything --resume needs, atomically (a kill leaves the previous one or the
    new one), and metrics.jsonl. Batches and sampling seeds are functions of (seed, step), so a resumed
    run redoes the unfinished update exactly and reaches the same θ as an uninterrupted one."""
    st.update(theta={n: t.detach().cpu().clone() for n, t in theta.items()}, opt=opt.state_dict(),
              sched=sched.state_dict(), hparams=hparams)
    if cli.world()[0] == 0:
        with cli.atomic_write(out / "state.pt") as tmp:
            torch.save(st, tmp)
        with cli.atomic_write(out / "metrics.jsonl") as tmp:
            tmp.write_text("".join(json.dumps(m) + "\n" for m in st["metrics"]))


def minutes_spent(st):  # the updates' own time (validation excluded), kept in the metrics: resume-safe
    return sum(m.get("seconds", 0.0) for m in st["metrics"]) / 60


def stop_reason(st, args):
    """Why no more update starts ("steps", "budget", "patience"), or None. Under torchrun every rank
    must agree: each measures --minutes on its own clock, and a rank that stopped alone would leave
    the others waiting in an all-reduce forever. So a reason seen by any rank stops all of them."""
    seen = cli.any_rank({"steps": st["step"] >= args.steps,
                         "budget": args.minutes is not None and minutes_spent(st) >= args.minutes,
                         "patience": st["since_best"] >= args.patience})
    return next((why for why, yes in seen.items() if yes), None)


def progress_line(m):
    """`step 12 | reward +0.31 | right 40.6% | ... | valid 41.2% [..]` for one update's metrics."""
    if "nll" in m:
        line = f"step {m['step']} | nll {m['nll']:.3f}/token | {m['tokens']} tokens | |g| {m['grad_norm']:.2e} | {m['seconds']:.0f} s"
    else:
        line = (f"step {m['step']} | reward {m['reward']:+.2f} | right {m['train_acc']:.1%} | cut {m['cut']:.0%} | "
                f"kl {m['kl']:.4f} | |g| {m['grad_norm']:.2e} | {m['rollouts']} rollouts, {m['gen_tokens']} tokens | "
                f"{m['t_rollout']:.0f} s rollout + {m['t_backward']:.0f} s backward"
                + (f" | mixed {m['mixed']:.0%}" if "mixed" in m else ""))
    return line + (f" | valid {m['valid']}, cut {m['valid_cut']:.0%}" if "valid" in m else "")


def report(out, st, why, args):
    """The end of a run: why it stopped, the base-vs-expert paired test, where the experts are."""
    if why == "budget":
        print(f"budget spent: {st['step']} updates took {minutes_spent(st):.1f} min (--minutes {args.minutes:g})")
    elif why == "patience":
        print(f"early stop: {args.patience} validations without improvement")
    steps = [m["step"] for m in st["metrics"] if "valid_acc" in m]
    if len(steps) > 1 and (out / f"valid-step{steps[-1]}.jsonl").exists() and (out / "valid-step0.jsonl").exists():
        xs, ys = paired(out / "valid-step0.jsonl", out / f"valid-step{steps[-1]}.jsonl")
        first, last = discordant(xs, ys)  # the initial z (≈ base model) against the last validated one
        print(f"valid step 0 {fmt_acc(sum(xs), len(xs))} -> step {steps[-1]} {fmt_acc(sum(ys), len(ys))} | "
              f"only step 0 right {first}, only step {steps[-1]} right {last} | McNemar exact p = {mcnemar(xs, ys):.3g}")
    if steps:
        print(f"best valid accuracy {st['best']:.1%} -> {out / 'best.safetensors'}")
    print(f"{st['step']} updates in {minutes_spent(st):.1f} min -> {out / 'last.safetensors'}")


if __name__ == "__main__":
    cli.run(main, get_args())

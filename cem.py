"""Few-shot self-adaptation: search mixing weights α over trained experts with CEM (paper §3.3,
docs/PAPER.md §4).

Given K experts z_1..z_K (from reinforce.py) and a handful of held-out examples ("shots") of a
new task, find α so that the mixed vector z′ = Σ_k α_k·z_k answers the shots best:

  population of 32 α's ~ N(mean, std), clamped to [0, 1] (optionally normalised to sum 1);
  member 0 is always the incumbent best, so the search never loses it (fitness is deterministic:
  greedy answers to the same shots, up to the last bits of batched float arithmetic), and it
  stays until a member scores strictly better;
  fitness = greedy accuracy on the shots; ties -> the higher mean per-token log-likelihood of
  the member's own correct answers; mean/std <- statistics of the 6 elites; repeat.

α is one number per expert (K) or, with --per-layer, one per expert and adapted matrix
(K × #matrices). The whole population is scored in one batched pass: every row of a batch
carries its member's z (svf.set_z with (B, r) vectors), so 32 members × 10 shots are one
generation call instead of 32 (tools/bench_cem.py times the two). The best α is then reported
on the remaining N − shots items against the base model and uniform α (paired McNemar tests),
and saved as JSON + an expert file.
A row whose weights equal an earlier row's (a search that never solved a shot keeps its uniform
start, member 0) reuses that row's answers: greedy decoding gives the same ones.
A killed run resumes when rerun with the same command: the search is saved to OUT/search.pt after
every generation and each report row to OUT/{cem,base,uniform}.jsonl as it finishes (a search.pt
made with other settings is refused; a larger --generations continues the search).

Which experts and which model: by default the shipped experts,
experts/qwen2.5-coder-0.5b-instruct/{math,code,reasoning}.safetensors, and the base model their
metadata names ("base_model"), looked up as checkpoints/<name> (`make model MODEL=qwen2.5-coder-0.5b`
fetches it). Experts that do not fit the model are refused before the model loads (their matrix
shapes against its config.json) and before any SVD work (their base fingerprint against its weights).
The Σσ rescale follows the experts' own flag (metadata "rescale"; svf.load_experts refuses a set
that mixes flags), in the search and in the report, as dispatch.py does.

    python cem.py --task math                  # the shipped experts on their base model
    python cem.py --task math --light          # the paper's light variant: 3 shots, 10 generations
    python cem.py --task math --model DIR --experts E1 E2 E3 --shots 10 --generations 100
    make cem TASK=math                         # the same, through the Makefile (EXPERT_DIR=... for yours)
    torchrun --nproc_per_node=2 cem.py ...     # population sharded over ranks
Why past docs/STYLE.md's 150–250 lines: the search, its resume after a kill (search.pt) and the held-out
report, with the checks that refuse experts of another model before any SVD work.
"""
import argparse
import json
import time
from pathlib import Path

import torch
import torch.distributed as dist

import cli
import svd_cache
import svf
from evals import TASKS, get_task
from evals.common import answer, fmt_acc, format_counts, format_tally, mcnemar, read_jsonl, write_jsonl
from evals.plots import plot_alpha
from generate import Tokenizer, score
from model import ModelConfig, Transformer

ROOT = Path(__file__).resolve().parent
SHIPPED = ROOT / "experts" / "qwen2.5-coder-0.5b-instruct"  # math, code, reasoning, cls .safetensors
SHIPPED_MIX = [SHIPPED / f"{c}.safetensors" for c in ("math", "code", "reasoning")]


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("what to adapt")
    g.add_argument("--task", required=True, help=f"target task: {', '.join(TASKS)}")
    g.add_argument("--experts", nargs="+", default=[str(f) for f in SHIPPED_MIX], metavar="FILE",
                   help="expert files of one base model (default: the shipped math, code, reasoning in "
                        "experts/qwen2.5-coder-0.5b-instruct/)")
    g.add_argument("--model", default=None,
                   help="HF-layout model folder (default: the experts' base model, checkpoints/<name in metadata>)")
    g.add_argument("--split", default="test", help="--shots items drawn at random (seeded) adapt, the rest report")
    g.add_argument("--limit", type=cli.positive_int, default=None,
                   help="report on the first N items of the split, in file order, shots left out (CPU budget)")
    g.add_argument("--out", default=None, help="output directory (default runs/cem-TASK)")
    g = p.add_argument_group("CEM (defaults: paper / official code)")
    g.add_argument("--shots", type=cli.positive_int, default=10, help="held-out examples that define fitness")
    g.add_argument("--generations", type=cli.positive_int, default=100)
    g.add_argument("--population", type=cli.positive_int, default=32)
    g.add_argument("--elites", type=cli.positive_int, default=6, help="at least 2 (their std is the next spread), "
                   "at most --population")
    g.add_argument("--init-std", type=cli.nonneg_float, default=0.5, help="> 0: the first population's spread")
    g.add_argument("--per-layer", action="store_true", help="one α per expert and adapted matrix (K × #matrices)")
    g.add_argument("--normalize", action="store_true", help="α sums to 1 (per matrix)")
    g.add_argument("--mode", default="z", choices=["z", "theta"], help="mix applied z (paper) or raw θ (official)")
    g.add_argument("--light", action="store_true", help="3 shots, 10 generations")
    g.add_argument("--seed", type=int, default=0)
    g = p.add_argument_group("speed")
    g.add_argument("--slots", type=cli.positive_int, default=64, help="sequences decoded together (continuous batching)")
    g.add_argument("--max-new-tokens", type=cli.positive_int, default=None, help="default: the task's")
    g.add_argument("--threads", type=cli.positive_int, default=None)
    cli.add_device_args(p)
    args = p.parse_args(argv)
    if args.light:
        args.shots, args.generations = 3, 10
    # CEM's own constraints, refused here rather than as a NaN std or an index error minutes later
    if not 2 <= args.elites <= args.population:
        p.error(f"argument --elites: {args.elites} must be between 2 (the std of one elite is undefined) "
                f"and --population ({args.population})")
    if args.init_std == 0:
        p.error("argument --init-std: 0 would make every member the same α (the search could never move)")
    return args


# -----------------------------------------------------------------------------
# Which model: the one the experts were trained on

def base_model(experts, model=None):
    """The model folder to run `experts` on: `model` if given, else the one their metadata names
    ("base_model": "checkpoints/qwen2.5-coder-0.5b-instruct"), looked up in this repo's checkpoints/.
    Then the experts' matrices are checked against its config.json, before minutes of loading."""
    if model is None:
        names = sorted({Path(e.meta.get("base_model", "")).name for e in experts})
        if len(names) > 1 or not names[0]:
            raise ValueError(f"{experts[0].source}: the experts' metadata names base models {names}; pass --model")
        model = ROOT / "checkpoints" / names[0]
        if not (model / "config.json").is_file():
            raise FileNotFoundError(f"{model}: missing, the base model of {experts[0].source}; fetch it with "
                                    f"`make model MODEL={names[0].removesuffix('-instruct')}` or pass --model")
    check_shapes(experts, model)
    return Path(model)


def check_shapes(experts, model):
    """Each expert's θ must name a matrix the model has, of rank r = min(m, n): from config.json alone."""
    c = ModelConfig.from_json(Path(model) / "config.json")
    C, I = c.hidden_size, c.intermediate_size
    q, kv = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim  # q/o and k/v widths
    rank = {"self_attn.q_proj": min(q, C), "self_attn.k_proj": min(kv, C), "self_attn.v_proj": min(kv, C),
            "self_attn.o_proj": min(C, q), "mlp.gate_proj": min(I, C), "mlp.up_proj": min(I, C),
            "mlp.down_proj": min(C, I)}
    for e in experts:
        for name, theta in e.theta.items():
            layer, kind = svf.model_order(name)[0], ".".join(name.split(".")[3:5])
            if layer >= c.num_hidden_layers or theta.numel() != rank[kind]:
                raise ValueError(f"{e.source}: does not fit {model} ({name} has r={theta.numel()}; the model has "
                                 f"{c.num_hidden_layers} layers, r={rank[kind]} for {kind}); it was trained on "
                                 f"{e.meta.get('base_model', 'another model')}")


def check_fingerprint(experts, model):
    """The experts' base weights against the loaded ones (a hash, seconds): a model of the same shapes
    but other weights is refused here, before svf.load_experts builds an SVD cache for it."""
    fp = svd_cache.model_fingerprint(model)
    for e in experts:
        if "base_fingerprint" not in e.meta:
            raise ValueError(f"{e.source}: not an SVF expert file (its metadata has no base_fingerprint)")
        if e.meta["base_fingerprint"] not in (fp, "*"):  # "*": transferred on purpose (svf.transfer)
            raise ValueError(f"{e.source}: trained on base weights {e.meta['base_fingerprint']} "
                             f"({e.meta.get('base_model', '?')}), {model.name_or_path} is {fp} (the fingerprint "
                             f"hashes the loaded values: a bf16 load differs from an fp32 one; try --dtype fp32)")


def load(args):
    """Experts, their checked base model (factored layers attached) and its tokenizer."""
    experts = [svf.Expert.load(p) for p in args.experts]  # a missing or corrupt file fails before the model loads
    args.model = base_model(experts, args.model)
    device, dtype = cli.device_and_dtype(args)  # under torchrun: this rank's GPU
    cli.init_distributed(device)
    model = Transformer.from_pretrained(args.model, dtype=dtype, device=device)
    check_fingerprint(experts, model)
    experts, _ = svf.load_experts(model, experts)
    return model, Tokenizer.from_pretrained(args.model), experts


def draw_shots(items, n, seed):
    """(shots, rest): shots a seeded random draw from the whole split; rest the split in file order
    without them, so `--limit N` reports on the same first-N items as `python -m evals` / dispatch.py."""
    if n >= len(items):
        raise ValueError(f"--shots {n}: the split has {len(items)} items, none would be left to report on")
    perm = torch.randperm(len(items), generator=torch.Generator().manual_seed(seed)).tolist()
    shots = [items[i] for i in perm[:n]]
    shot_ids = {json.dumps(it["id"]) for it in shots}
    return shots, [it for it in items if json.dumps(it["id"]) not in shot_ids]


# -----------------------------------------------------------------------------
# Fitness: a whole population on the shots, one z per sequence

def population_fitness(model, tok, task, shots, experts, alphas, args):
    """(accuracy, mean log-likelihood of own correct answers) for each α in `alphas` (P, ...).

    Rows = (member, shot) pairs, each carrying its member's mixed z (svf.set_z with (B, r)), all
    through one engine call: the whole population is one batch instead of P weight merges.
    """
    mixes = [svf.mix(experts, a, args.mode) for a in alphas]
    rows = [(m, s) for m in range(len(alphas)) for s in range(len(shots))]
    zs = {n: torch.stack([mixes[m][n] for m, _ in rows]) for n in mixes[0]}  # (P·S, r) each
    records = answer(model, tok, task, [shots[s] for _, s in rows], max_new_tokens=args.max_new_tokens,
                     slots=args.slots, zs=zs, rescale=args.rescale, progress="population × shots")
    correct, answers = {}, {}
    for (m, _), r in zip(rows, records):
        correct[m] = correct.get(m, 0) + int(r["correct"])
    # tie-break: log-likelihood of each member's own correct answers under its own z
    right = [j for j, r in enumerate(records) if r["correct"]]
    for i in range(0, len(right), args.slots):
        chunk = right[i:i + args.slots]
        svf.set_z(model, {n: z[chunk] for n, z in zs.items()}, args.rescale)
        with torch.no_grad():
            _, tok_lp, mask = score(model, [records[j]["prompt_ids"] for j in chunk], [records[j]["ids"] for j in chunk],
                                    share=False)  # one z per row: equal prompts have different keys/values
        for j, lp, mk in zip(chunk, tok_lp, mask):
            answers.setdefault(rows[j][0], []).append(float((lp * mk).sum() / mk.sum()))
    svf.set_z(model, None)
    acc = torch.tensor([correct.get(m, 0) / len(shots) for m in range(len(alphas))])
    ll = torch.tensor([sum(answers[m]) / len(answers[m]) if m in answers else float("-inf")
                       for m in range(len(alphas))])
    return acc, ll


def sharded_fitness(model, tok, task, shots, experts, alphas, args):
    """Each rank scores its slice of the population; results are gathered on every rank."""
    rank, ws = cli.world()
    P = len(alphas)
    acc, ll = torch.zeros(P), torch.full((P,), float("-inf"))
    mine = list(range(rank, P, ws))
    if mine:
        a, l = population_fitness(model, tok, task, shots, experts, alphas[mine], args)
        acc[mine], ll[mine] = a, l
    # members not scored here stay 0 / -inf, so a max-reduce gathers them (via the GPU under NCCL)
    cli.all_reduce(acc, op=dist.ReduceOp.MAX)
    cli.all_reduce(ll, op=dist.ReduceOp.MAX)
    return acc, ll


def ranking(acc, ll):
    """Member indices, best first: accuracy, then log-likelihood breaks ties (both higher is better)."""
    return sorted(range(len(acc)), key=lambda i: (float(acc[i]), float(ll[i])), reverse=True)


def cem(fitness, shape, args, log=print, state=None, config=None):
    """Cross-entropy method over α of `shape`; `fitness(alphas (P, *shape)) -> (acc, ll)`.

    state: a file the search is saved to after every generation (atomically) and resumed from, so a
    killed run loses at most one generation; `config` (what the search depends on) must match the
    file's, or the file belongs to another search and is refused. Raising --generations continues it.
    """
    g = torch.Generator().manual_seed(args.seed)
    mean = torch.full(shape, 1.0 / shape[0])
    std = torch.full(shape, args.init_std)
    best, best_fit = mean.clone(), (-1.0, float("-inf"))
    history = []
    if state is not None and Path(state).exists():
        s = read_state(state)
        if s["config"] != config:
            diff = sorted(k for k in set(s["config"]) | set(config) if s["config"].get(k) != config.get(k))
            raise ValueError(f"{state}: a search with other settings ({', '.join(diff)} differ); "
                             f"remove it or pick another --out")
        mean, std, best, best_fit, history = s["mean"], s["std"], s["best"], tuple(s["best_fit"]), s["history"]
        g.set_state(s["rng"])
        log(f"resuming the search from {state}: {len(history)} generations done")
    for gen in range(len(history), args.generations):
        t0 = time.time()
        pop = (mean + std * torch.randn((args.population, *shape), generator=g)).clamp(0, 1)
        # elitism: the incumbent stays a member; its fitness comes out the same again (greedy answers
        # to the same shots), and ranking() keeps member 0 first among equals, so only a strictly
        # better member replaces it
        pop[0] = best
        if args.normalize:
            pop = pop / pop.sum(1, keepdim=True).clamp(min=1e-8)
        acc, ll = fitness(pop)
        order = ranking(acc, ll)
        elites = pop[order[:args.elites]]
        mean, std = elites.mean(0), elites.std(0)
        best, best_fit = pop[order[0]].clone(), (float(acc[order[0]]), float(ll[order[0]]))
        history.append({"generation": gen, "best_acc": best_fit[0], "best_ll": best_fit[1],
                        "mean_acc": float(acc.mean()), "seconds": time.time() - t0})
        log(f"gen {gen} | best {best_fit[0]:.1%} (ll {best_fit[1]:.3f}) | population mean {float(acc.mean()):.1%} "
            f"| {history[-1]['seconds']:.1f} s")
        if bool((acc == acc[0]).all() and (ll == ll[0]).all()):  # e.g. no member solved any shot
            log(f"gen {gen}: every member scored the same on the shots, so the elites are simply the first "
                f"{args.elites} members and the search drifts; more or easier --shots would give it a signal")
        if state is not None and cli.world()[0] == 0:
            with cli.atomic_write(state) as tmp:  # whole or absent: a kill loses at most this generation
                torch.save({"config": config, "mean": mean, "std": std, "best": best, "best_fit": list(best_fit),
                            "history": history, "rng": g.get_state()}, tmp)
    return best, history


STATE_KEYS = {"config", "mean", "std", "best", "best_fit", "history", "rng"}


def read_state(path):
    """A saved search, or one line naming the file when it is not one (cut short, or another file)."""
    return cli.load_state(path, STATE_KEYS, "CEM search", "delete it to start the search over", weights_only=True)


# -----------------------------------------------------------------------------
# Reporting

def expert_name(path):
    """An expert file's label in logs and the α plot: experts/<model>/math.safetensors -> "math";
    a run's runs/gsm8k-qwen/best.safetensors (or last) -> "gsm8k-qwen"."""
    path = Path(path)
    return path.parent.name if path.stem in ("best", "last") else path.stem


def answer_all(model, tok, task, items, zs, args):
    """Greedy answers to `items` with z's merged (None = the base model): evals.common.answer's records."""
    svf.set_z(model, None)
    ctx = svf.merged(model, zs, rescale=args.rescale) if zs is not None else torch.no_grad()
    with ctx:
        return answer(model, tok, task, items, max_new_tokens=args.max_new_tokens, slots=args.slots, progress="test items")


def same_weights(a, b):
    """Two z's (name -> tensor, None = the base model) that give the same network."""
    if a is None or b is None:
        return a is b
    return a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)


def report(model, tok, task, rest, experts, zs, shape, out, resumed, args, log=print):
    """The found z′ on the items CEM never saw, against the base model and uniform α: one per-item file
    each (for paired tests against other runs, python -m evals --compare), written as it finishes, so
    a resumed run reuses it; summary.json with accuracies, format counts and paired McNemar p."""
    uniform = svf.mix(experts, torch.full(shape, 1.0 / len(experts)), args.mode)
    records, done = {}, []  # done: (z, name) of the rows so far
    for name, z in [("cem", zs), ("base", None), ("uniform", uniform)]:
        path = out / f"{name}.jsonl"
        twin = next((n for z2, n in done if same_weights(z, z2)), None)
        if resumed and path.exists() and [r["id"] for r in read_jsonl(path)] == [it["id"] for it in rest]:
            log(f"{name:8s} reusing {path}")
            records[name] = read_jsonl(path)
        elif twin is not None:  # e.g. a search without signal kept the uniform start: greedy answers are equal
            log(f"{name:8s} the same weights as {twin}: its answers")
            records[name] = [dict(r) for r in records[twin]]
            write_jsonl(path, records[name])
        else:  # format apart from accuracy: answered (a final answer was found), cut (ran into the token cap)
            records[name] = [{"id": it["id"], "answered": r["extracted"] is not None, "cut": r["cut"],
                              "correct": r["correct"]} for it, r in zip(rest, answer_all(model, tok, task, rest, z, args))]
            write_jsonl(path, records[name])
        done.append((z, name))
    res = {name: [r["correct"] for r in recs] for name, recs in records.items()}
    summary = {}
    for name, recs in records.items():
        summary[name] = {"correct": sum(res[name]), "n": len(recs), "acc": fmt_acc(sum(res[name]), len(recs)),
                         **format_tally(recs)}
    summary["p_vs_base"] = mcnemar(res["cem"], res["base"])
    summary["p_vs_uniform"] = mcnemar(res["cem"], res["uniform"])
    for name in ("cem", "base", "uniform"):
        log(f"{name:8s} {format_counts(records[name])}")
    log(f"paired McNemar: cem vs base p={summary['p_vs_base']:.3f}, vs uniform p={summary['p_vs_uniform']:.3f}")
    with cli.atomic_write(out / "summary.json") as tmp:
        tmp.write_text(json.dumps(summary, indent=1))
    return summary


def main(args):
    if args.threads:
        torch.set_num_threads(args.threads)
    task = get_task(args.task)
    args.max_new_tokens = args.max_new_tokens or task.max_new_tokens
    model, tok, experts = load(args)
    rank = cli.world()[0]
    args.rescale = experts[0].rescale  # one rule: the experts' flag (a mix was refused above)
    shots, rest = draw_shots(task.load(args.split), args.shots, args.seed)
    rest = rest[:args.limit]
    K, M = len(experts), len(experts[0].theta)
    shape = (K, M) if args.per_layer else (K,)
    names = [expert_name(p) for p in args.experts]
    log = print if rank == 0 else (lambda *a: None)

    def fitness(pop):
        return sharded_fitness(model, tok, task, shots, experts, pop, args)

    log(f"task {args.task} | {K} experts {names} on {args.model} | α {tuple(shape)} | {len(shots)} shots, "
        f"{len(rest)} to report")
    out = Path(args.out or f"runs/cem-{args.task}")
    # what the search depends on: a saved search.pt with other values is another search
    config = {"task": args.task, "split": args.split, "model": str(args.model), "experts": list(args.experts),
              "shots": [json.dumps(it["id"]) for it in shots], "shape": list(shape), "population": args.population,
              "elites": args.elites, "init_std": args.init_std, "normalize": args.normalize, "mode": args.mode,
              "seed": args.seed, "max_new_tokens": args.max_new_tokens}
    resumed = (out / "search.pt").exists()  # else files already in `out` are an older run's, not reused
    alpha, history = cem(fitness, shape, args, log, state=out / "search.pt", config=config)
    if rank > 0:
        return None
    out.mkdir(parents=True, exist_ok=True)
    old = out / "alpha.json"  # report rows of an earlier, shorter search are stale (resumed with more --generations)
    if old.exists() and json.loads(old.read_text()).get("alpha") != alpha.tolist():
        (out / "cem.jsonl").unlink(missing_ok=True)
    log("α per expert: " + ", ".join(f"{n} {float(a):.3f}" for n, a in zip(names, alpha if alpha.dim() == 1 else alpha.mean(1))))
    # the adapted expert, stored as raw z (a mix of sigmoid z's may leave (0, 1) when α is not normalised)
    zs = svf.mix(experts, alpha, args.mode)
    meta = {**experts[0].meta, "parametrization": "raw", "task": args.task, "cem_alpha": json.dumps(alpha.tolist()),
            "cem_experts": json.dumps(args.experts), "cem_shots": str(args.shots)}
    svf.Expert(zs, meta).save(out / "adapted.safetensors")
    with cli.atomic_write(out / "alpha.json") as tmp:
        tmp.write_text(json.dumps({"experts": args.experts, "alpha": alpha.tolist(), "mode": args.mode,
                                   "per_layer": args.per_layer, "normalize": args.normalize, "task": args.task,
                                   "split": args.split, "shots": [it["id"] for it in shots], "history": history},
                                  indent=1))
    plot_alpha(out / "alpha.png", alpha, names)
    summary = report(model, tok, task, rest, experts, zs, shape, out, resumed, args, log)
    if dist.is_initialized():
        dist.destroy_process_group()
    return summary


if __name__ == "__main__":
    cli.run(main, get_args())

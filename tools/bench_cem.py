"""Benchmark one CEM generation (cem.py): the whole population in one batched engine call, one z
per row (svf.set_z with (B, r)), against the official code's way, member by member (merge each
member's weights, then answer the shots). Takes cem.py's flags; runs one generation of random α's
and exits (nothing is written). Check the machine is idle first; docs/RESULTS.md has the numbers.

    python tools/bench_cem.py --task math --light --max-new-tokens 64           # the shipped experts
    python tools/bench_cem.py --task math --model DIR --experts E1 E2 E3 --light --max-new-tokens 64
"""
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import cem  # noqa: E402
import svf  # noqa: E402
from evals import get_task  # noqa: E402
from evals.common import answer  # noqa: E402


def bench(args):
    """(batched seconds, member-by-member seconds) for one generation of args.population members."""
    if args.threads:
        torch.set_num_threads(args.threads)
    task = get_task(args.task)
    args.max_new_tokens = args.max_new_tokens or task.max_new_tokens
    model, tok, experts = cem.load(args)
    args.rescale = experts[0].rescale
    shots, _ = cem.draw_shots(task.load(args.split), args.shots, args.seed)
    shape = (len(experts), len(experts[0].theta)) if args.per_layer else (len(experts),)
    pop = torch.rand((args.population, *shape), generator=torch.Generator().manual_seed(0))
    t0 = time.perf_counter()
    cem.population_fitness(model, tok, task, shots, experts, pop, args)
    batched = time.perf_counter() - t0
    t0 = time.perf_counter()
    for a in pop:  # the official way: merge each member's weights, then answer the shots
        with svf.merged(model, svf.mix(experts, a, args.mode), rescale=args.rescale):
            answer(model, tok, task, shots, max_new_tokens=args.max_new_tokens, slots=args.slots)
    single = time.perf_counter() - t0
    print(f"one generation, {args.population} members × {len(shots)} shots, {args.max_new_tokens} new tokens max: "
          f"batched {batched:.1f} s | member by member {single:.1f} s | speed-up {single / batched:.2f}x")
    return batched, single


if __name__ == "__main__":
    cem.cli.run(bench, cem.get_args())

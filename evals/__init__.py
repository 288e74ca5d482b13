"""Benchmarks of docs/PAPER.md §3, one file per family, one shared helper (common.py), one sandbox.

    from evals import get_task, render_prompt
    task = get_task("gsm8k")
    items = task.load("test")
    prompts = [render_prompt(tok, task, it) for it in items]
    ... generate ...
    correct = task.check(items, completions)      # reinforce.py turns these into ±1 rewards

Runner: `python -m evals --help` (evals/__main__.py).
"""
from evals.arc import arc_challenge, arc_challenge_direct, arc_easy, arc_easy_direct
from evals.classify import cls_task
from evals.common import Task, fmt_acc, mcnemar, render_prompt, wilson
from evals.gsm8k import gsm8k
from evals.humaneval import humaneval
from evals.math import math_task
from evals.mbpp import mbpp
from evals.vqa import easy_vqa, okvqa, textvqa

TASKS: dict[str, Task] = {"gsm8k": gsm8k, "math": math_task, "mbpp": mbpp, "humaneval": humaneval,
                          "arc_easy": arc_easy, "arc_challenge": arc_challenge,
                          "arc_easy_direct": arc_easy_direct, "arc_challenge_direct": arc_challenge_direct,
                          "cls": cls_task, "easy_vqa": easy_vqa, "textvqa": textvqa, "okvqa": okvqa}


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r} (known: {', '.join(TASKS)})")
    return TASKS[name]


__all__ = ["TASKS", "Task", "get_task", "render_prompt", "wilson", "mcnemar", "fmt_acc"]

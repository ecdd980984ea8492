"""The five demo tasks (sql, sentiment, extract, arith, shout): training data, held-out sets, metrics.

    from tasks import get_task, write_jsonl
    task = get_task("sql")
    train = task.generate(random.Random(0), 2000)        # list[Example(prompt, response)]
    write_jsonl("sql-train.jsonl", (e.as_json() for e in train))
    heldout = task.heldout()                              # the hand-written held-out set
    task.score(answer, heldout[0])                        # in [0, 1]

`loramux eval` (tasks/evaluate.py) runs a held-out set against a server. Task modules are
imported lazily so that `loramux eval` loads only the one it scores.
"""

from __future__ import annotations

import importlib

from tasks.base import Example, Task, prompt_key, write_jsonl

TASK_NAMES = ("sql", "sentiment", "extract", "arith", "shout")

__all__ = ["TASK_NAMES", "Example", "Task", "get_task", "prompt_key", "write_jsonl"]


def get_task(name: str) -> Task:
    """The task called `name`; ValueError naming the tasks there are otherwise."""
    if name not in TASK_NAMES:
        raise ValueError(f"unknown task {name!r}; the tasks are {', '.join(TASK_NAMES)}")
    task: Task = importlib.import_module(f"tasks.{name}").TASK
    return task

"""The registry of checkable tasks: `TASKS` by name and `get_task(name, **knobs)`.

    task = get_task("countdown", count=4)
    problems = task.problems("train", 1000, seed=0)
    score = task.check(problems[0], completion_text)   # score.reward, score.reason

The format, the reward table and the reasons are in answer.py; generation, splits and prompts in
base.py. Left out: registration by decorator or entry point; three tasks fit in one dict.
"""

from __future__ import annotations

import dataclasses

from seekling.r1.tasks.answer import Reason, Score, render_completion
from seekling.r1.tasks.arithmetic import AdditionTask
from seekling.r1.tasks.base import SPLITS, SYSTEM_PROMPT, Problem, Task
from seekling.r1.tasks.countdown import CountdownTask
from seekling.r1.tasks.multiplication import MultiplicationTask

TASKS: dict[str, type[Task]] = {cls.name: cls for cls in (AdditionTask, MultiplicationTask, CountdownTask)}


def get_task(name: str, **knobs) -> Task:
    """The task called name with these difficulty knobs (the rest at their defaults)."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; choose one of {sorted(TASKS)}")
    cls = TASKS[name]
    known = sorted(f.name for f in dataclasses.fields(cls))
    unknown = sorted(set(knobs) - set(known))
    if unknown:
        raise ValueError(f"task {name!r} has no knob {', '.join(unknown)}; its knobs are {', '.join(known)}")
    return cls(**knobs)


__all__ = ["SPLITS", "SYSTEM_PROMPT", "TASKS", "Problem", "Reason", "Score", "Task", "get_task", "render_completion"]

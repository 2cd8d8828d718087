"""Countdown (task "countdown"): reach a target from given numbers with + - * / and parentheses.

    Using the numbers 3, 5, 7, each at most once, and + - * / with parentheses, make 56.
    Answer with the expression only.
    ->  <think>5+3=8
        8*7=56
        (5+3)*7=56</think>(5+3)*7

Each given number may be used at most once (not all need be used), as in the game; a number given
twice may be used twice. The answer is the expression alone, without "= 56". It is parsed and
evaluated by expression.py (never eval), whose rules decide the reward's reason: a reused or
foreign number, division by zero, a non-integer step or a huge value is well-formed but wrong.

Every problem is solvable by construction: the generator draws `count` numbers in [1, max_number],
combines them pairwise at random into one expression over all of them, and the value is the
target. It picks only steps the rules accept, with a positive result and no division by 1. It
redraws if the target is outside [1, max_target] or is one of the numbers (a one-number answer
would be trivial). That expression is the reference answer, and its steps are the solution trace.

The trace shows only the path to the answer, not the search a solver does to find it. Teaching the
search is what RL is for; the trace teaches the format and how to write correct arithmetic steps.

Left out: the game's fixed number cards (25, 50, 75, 100 and two of each of 1-10) and its timer; a
check that a target is not reachable by a shorter expression (any correct expression scores 1.0).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import ClassVar

from seekling.r1.tasks import expression
from seekling.r1.tasks.answer import Reason
from seekling.r1.tasks.base import Problem, Task, is_int
from seekling.r1.tasks.expression import BinOp, Num
from seekling.validate import require

MAX_COUNT = 6  # 100**6 = expression.MAX_MAGNITUDE: no product of the numbers can be refused as huge
MAX_NUMBER = 100
MAX_TARGET = 10**6
# Redraws allowed per problem. Measured over 300 problems each: the defaults take 2.2 draws on
# average (worst 13); count=6, max_number=100 takes 40 (worst 278) with max_target=100 and 415
# (worst 2329) with max_target=10, the hardest knobs allowed; draw counts do not depend on the machine.
MIN_TARGET_CAP = 10
_MAX_TRIES = 10_000


@dataclass(frozen=True, kw_only=True)
class CountdownTask(Task):
    """`count` numbers in [1, max_number] and a target in [1, max_target]; the answer is an expression."""

    name: ClassVar[str] = "countdown"
    count: int = 3
    max_number: int = 30
    max_target: int = 100

    def __post_init__(self):
        require(is_int(self.count) and 2 <= self.count <= MAX_COUNT, "CountdownTask", "count",
                f"must be an int in [2, {MAX_COUNT}], got {self.count!r}")
        require(is_int(self.max_number) and 2 <= self.max_number <= MAX_NUMBER, "CountdownTask", "max_number",
                f"must be an int in [2, {MAX_NUMBER}], got {self.max_number!r}")
        require(is_int(self.max_target) and MIN_TARGET_CAP <= self.max_target <= MAX_TARGET, "CountdownTask",
                "max_target", f"must be an int in [{MIN_TARGET_CAP}, {MAX_TARGET}] (below that, random expressions "
                f"rarely land on a target that is not one of the numbers), got {self.max_target!r}")

    def _draw(self, rng: random.Random) -> Problem:
        for _ in range(_MAX_TRIES):
            numbers = sorted(rng.randint(1, self.max_number) for _ in range(self.count))
            node, target = _random_expression(rng, numbers)
            if 1 <= target <= self.max_target and target not in numbers:
                listed = ", ".join(map(str, numbers))
                statement = f"{','.join(map(str, numbers))}->{target}"
                prompt = (f"Using the numbers {listed}, each at most once, and + - * / with parentheses, "
                          f"make {target}. Answer with the expression only.")
                return self._problem(statement=statement, key=statement, prompt=prompt, numbers=tuple(numbers),
                                     op="", target=target, answer=expression.render(node))
        raise ValueError(f"{self!r} found no solvable problem in {_MAX_TRIES} draws; raise max_target or max_number")

    def parse_answer(self, text: str) -> expression.Node:
        return expression.parse(text)

    def _judge(self, problem: Problem, answer: str) -> Reason:
        node = expression.parse(answer)
        expression.check_numbers(node, problem.numbers)
        value, _ = expression.evaluate(node)
        return Reason.CORRECT if value == problem.target else Reason.WRONG

    def solution_trace(self, problem: Problem) -> tuple[str, str]:
        _, steps = expression.evaluate(expression.parse(problem.answer))
        lines = [f"{a}{op}{b}={v}" for a, op, b, v in steps]
        lines.append(f"{problem.answer}={problem.target}")
        return "\n".join(lines), problem.answer


def _random_expression(rng: random.Random, numbers: list[int]) -> tuple[expression.Node, int]:
    """A random expression using every number once, every step a positive integer; and its value."""
    items: list[tuple[expression.Node, int]] = [(Num(x), x) for x in numbers]
    while len(items) > 1:
        i, j = rng.sample(range(len(items)), 2)
        (left, a), (right, b) = items[i], items[j]
        ops = ["+", "*"] + (["-"] if a > b else []) + (["/"] if b > 1 and a % b == 0 else [])
        op = rng.choice(ops)
        value = {"+": a + b, "-": a - b, "*": a * b, "/": a // b}[op]
        items = [item for k, item in enumerate(items) if k not in (i, j)] + [(BinOp(op, left, right), value)]
    return items[0]

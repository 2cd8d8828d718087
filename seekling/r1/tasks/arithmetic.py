"""Multi-digit addition and subtraction (task "addition"), with column-by-column solution traces.

    Compute 478 + 356.   ->   <think>8+6=14 write 4 carry 1
                              7+5+1=13 write 3 carry 1
                              4+3+1=8 write 8
                              478+356=834</think>834

Knobs: `digits` (each operand has exactly that many digits; 1 means 0..9), `ops` ("+", "-" or
"+-": which operations are drawn, evenly), `allow_negative` (if False, a subtraction puts the
larger operand first so the result is never negative).

The trace is school column arithmetic from the units up, one line per column, stating every carry
or borrow: a small model can copy it token by token, which is what cold-start SFT is for. A
negative difference is computed as the positive one with the sign put in front, as by hand.

Left out: more than two operands (the trace would need multi-row columns; two operands already
give the difficulty curve through `digits`), and decimals.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import ClassVar

from seekling.r1.tasks.base import IntegerTask, Problem, is_int
from seekling.validate import require

MAX_DIGITS = 12  # keeps every answer within answer.MAX_INTEGER_DIGITS and traces a few hundred characters


def random_operand(rng: random.Random, digits: int) -> int:
    """A number with exactly `digits` digits (0..9 for one digit), uniformly."""
    return rng.randint(0 if digits == 1 else 10 ** (digits - 1), 10**digits - 1)


def addition_steps(a: int, b: int) -> list[str]:
    """Column addition of a + b (both >= 0) from the units up, one line per column."""
    lines = []
    xs, ys = str(a)[::-1], str(b)[::-1]
    carry = 0
    for i in range(max(len(xs), len(ys))):
        x = int(xs[i]) if i < len(xs) else 0
        y = int(ys[i]) if i < len(ys) else 0
        s = x + y + carry
        line = f"{x}+{y}" + (f"+{carry}" if carry else "") + f"={s} write {s % 10}"
        carry = s // 10
        lines.append(line + (f" carry {carry}" if carry else ""))
    if carry:
        lines.append(f"write carry {carry}")
    return lines


def subtraction_steps(a: int, b: int) -> list[str]:
    """Column subtraction of a - b (a >= b >= 0) from the units up, one line per column."""
    lines = []
    xs, ys = str(a)[::-1], str(b)[::-1]
    borrow = 0
    for i in range(len(xs)):
        x = int(xs[i])
        y = int(ys[i]) if i < len(ys) else 0
        line = f"{x}-1={x - 1}, " if borrow else ""
        x -= borrow
        borrow = int(x < y)
        line += f"{x + 10 * borrow}-{y}={x + 10 * borrow - y}"
        lines.append(line + (" borrow 1" if borrow else ""))
    return lines


@dataclass(frozen=True, kw_only=True)
class AdditionTask(IntegerTask):
    """a + b and a - b with `digits`-digit operands; the answer is the integer result."""

    name: ClassVar[str] = "addition"
    digits: int = 3
    ops: str = "+-"
    allow_negative: bool = False

    def __post_init__(self):
        require(is_int(self.digits) and 1 <= self.digits <= MAX_DIGITS, "AdditionTask", "digits",
                f"must be an int in [1, {MAX_DIGITS}], got {self.digits!r}")
        require(isinstance(self.ops, str) and self.ops in ("+", "-", "+-", "-+"), "AdditionTask", "ops",
                f"must be '+', '-' or '+-', got {self.ops!r}")
        require(isinstance(self.allow_negative, bool), "AdditionTask", "allow_negative",
                f"must be True or False, got {self.allow_negative!r}")
        object.__setattr__(self, "ops", "".join(sorted(self.ops)))  # "-+" is "+-": one task, one spelling

    def _draw(self, rng: random.Random) -> Problem:
        op = rng.choice(self.ops)
        a, b = random_operand(rng, self.digits), random_operand(rng, self.digits)
        if op == "-" and a < b and not self.allow_negative:
            a, b = b, a
        # a+b and b+a share a key (and so a split); a-b and b-a do not, they are different sums.
        key = f"{min(a, b)}+{max(a, b)}" if op == "+" else f"{a}-{b}"
        target = a + b if op == "+" else a - b
        return self._problem(statement=f"{a}{op}{b}", key=key, prompt=f"Compute {a} {op} {b}.",
                             numbers=(a, b), op=op, target=target, answer=str(target))

    def solution_trace(self, problem: Problem) -> tuple[str, str]:
        a, b = problem.numbers
        if problem.op == "+":
            lines = addition_steps(a, b)
        elif a >= b:
            lines = subtraction_steps(a, b)
        else:
            lines = [f"{a}<{b}, so {a}-{b}=-({b}-{a})", *subtraction_steps(b, a), f"{b}-{a}={b - a}"]
        lines.append(f"{a}{problem.op}{b}={problem.target}")
        return "\n".join(lines), str(problem.target)

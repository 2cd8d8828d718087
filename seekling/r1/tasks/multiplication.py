"""Multi-digit multiplication (task "multiplication"), with long-multiplication traces.

    Compute 47 * 23.   ->   <think>47*3: 7*3=21 write 1 carry 2, 4*3+2=14, so 141
                            47*20: 7*2=14 write 4 carry 1, 4*2+1=9, so 940
                            141+940=1081
                            47*23=1081</think>1081

Knobs: `digits_a` and `digits_b`, the exact number of digits of the first and second factor (1
means 0..9). The trace multiplies the first factor by each non-zero digit of the second, digit by
digit with carries, shifts the partial product by that digit's place, then adds the partials in one
line. A zero digit contributes nothing and gets no line, as by hand.

The final sum of partials is one step, not a column addition: with 2-digit factors that addition
is what the "addition" task trains, and spelling it out would double the trace for little gain.

Left out: negative factors (the sign rule is not what makes multiplication hard) and more than two
factors.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import ClassVar

from seekling.r1.tasks.arithmetic import MAX_DIGITS, random_operand
from seekling.r1.tasks.base import IntegerTask, Problem, is_int
from seekling.validate import require


def partial_product_line(a: int, digit: int, place: int) -> tuple[str, int]:
    """One line of long multiplication: a times one digit of the multiplier, shifted by its place."""
    steps = []
    xs = str(a)[::-1]
    carry = 0
    for i, ch in enumerate(xs):
        p = int(ch) * digit + carry
        step = f"{ch}*{digit}" + (f"+{carry}" if carry else "") + f"={p}"
        carry = p // 10
        if i < len(xs) - 1:  # the last digit's product is written whole, so no carry is left
            step += f" write {p % 10}" + (f" carry {carry}" if carry else "")
        steps.append(step)
    value = a * digit * 10**place
    return f"{a}*{digit}{'0' * place}: {', '.join(steps)}, so {value}", value


@dataclass(frozen=True, kw_only=True)
class MultiplicationTask(IntegerTask):
    """a * b with a of `digits_a` digits and b of `digits_b` digits; the answer is the product."""

    name: ClassVar[str] = "multiplication"
    digits_a: int = 2
    digits_b: int = 2

    def __post_init__(self):
        for f in ("digits_a", "digits_b"):
            v = getattr(self, f)
            require(is_int(v) and 1 <= v <= MAX_DIGITS, "MultiplicationTask", f,
                    f"must be an int in [1, {MAX_DIGITS}], got {v!r}")

    def _draw(self, rng: random.Random) -> Problem:
        a, b = random_operand(rng, self.digits_a), random_operand(rng, self.digits_b)
        return self._problem(statement=f"{a}*{b}", key=f"{min(a, b)}*{max(a, b)}", prompt=f"Compute {a} * {b}.",
                             numbers=(a, b), op="*", target=a * b, answer=str(a * b))

    def solution_trace(self, problem: Problem) -> tuple[str, str]:
        a, b = problem.numbers
        lines, partials = [], []
        for place, ch in enumerate(str(b)[::-1]):
            if ch != "0":
                line, value = partial_product_line(a, int(ch), place)
                lines.append(line)
                partials.append(value)
        if len(partials) > 1:
            lines.append("+".join(map(str, partials)) + f"={sum(partials)}")
        lines.append(f"{a}*{b}={a * b}")
        return "\n".join(lines), str(a * b)

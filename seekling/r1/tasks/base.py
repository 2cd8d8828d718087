"""What every checkable task shares: the Problem, seeded generation, disjoint splits, prompts, check().

A task is a frozen, keyword-only dataclass whose fields are its difficulty knobs, with these methods:

    task.problems(split, n, seed)   n distinct problems of "train" or "test", the same for the same seed
    task.prompt_messages(problem)   the chat, in the format SeeklingTokenizer.apply_chat_template takes
    task.check(problem, text)       a Score: reward and reason (answer.py has the table)
    task.solution_trace(problem)    (reasoning, answer): a worked solution for cold-start SFT
    task.render_trace(problem)      that solution as completion text, which check() scores 1.0
    task.sft_messages(problem)      the chat plus that solution as the assistant turn

Splits are disjoint by construction: a hash of the problem's canonical key (its statement up to
commutativity, so 3+5 and 5+3 share a key) puts it in "test" with probability HELDOUT_FRACTION,
whatever the seed, the knobs or the order of generation. A generator draws from the whole space
and keeps the draws that fall in the asked split; no seed can make a held-out problem leak into
training. Within one call the problems are distinct (by id), so pass@1 is over distinct problems.

Left out on purpose: a dataset on disk (generation is cheap and the seed is the dataset), and
difficulty curricula (a driver can ask for problems from tasks with different knobs).
"""

from __future__ import annotations

import hashlib
import random
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

from seekling.r1.tasks.answer import AnswerError, Reason, Score, parse_integer, render_completion, split_completion
from seekling.validate import require

SPLITS = ("train", "test")
# One problem in ten is held out. A constant, not a knob: were it a knob, the same problem could
# be held out in one run and trained on in another.
HELDOUT_FRACTION = 0.1
# The system turn every task uses. It names the tags so the format is asked for, not only rewarded;
# short because a tiny model's context is short.
SYSTEM_PROMPT = "Think step by step inside <think> </think>. After </think>, write only the final answer."
# How many draws problems() may spend per problem asked before it gives up: the test split keeps
# one draw in ten, and a small space (1-digit sums) runs out of distinct problems.
_DRAWS_PER_PROBLEM = 50


def is_int(x) -> bool:
    """An int that is not a bool (True would otherwise pass as 1)."""
    return isinstance(x, int) and not isinstance(x, bool)


def split_of(key: str) -> str:
    """The split a canonical key belongs to, forever: the first 8 bytes of its SHA-256 decide."""
    u = int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big") / 2**64
    return "test" if u < HELDOUT_FRACTION else "train"


@dataclass(frozen=True, kw_only=True)
class Problem:
    """One checkable problem. `answer` is a reference answer; check() gives it 1.0."""

    id: str  # "<task>:<statement>", readable in logs and the same under any seed
    task: str
    split: str
    prompt: str  # the user turn
    numbers: tuple[int, ...]  # the operands in order (arithmetic) or the given numbers (countdown)
    op: str  # "+", "-" or "*" for arithmetic; "" for countdown, where any of + - * / may be used
    target: int  # the value a correct answer has
    answer: str

    def __post_init__(self):
        object.__setattr__(self, "numbers", tuple(self.numbers))  # accept lists, e.g. from JSON
        for f in ("id", "task", "prompt", "answer"):
            require(isinstance(getattr(self, f), str) and getattr(self, f).strip() != "", "Problem", f,
                    f"must be a non-empty string, got {getattr(self, f)!r}")
        require(self.split in SPLITS, "Problem", "split", f"must be one of {SPLITS}, got {self.split!r}")
        require(len(self.numbers) > 0 and all(is_int(x) for x in self.numbers), "Problem", "numbers",
                f"must be a non-empty tuple of ints, got {self.numbers!r}")
        require(self.op in ("+", "-", "*", ""), "Problem", "op", f"must be '+', '-', '*' or '', got {self.op!r}")
        require(is_int(self.target), "Problem", "target", f"must be an int, got {self.target!r}")


class Task(ABC):
    """Base of the task dataclasses; subclasses set `name` and implement the abstract methods."""

    name: ClassVar[str]

    # -- what a subclass provides --------------------------------------------------------------

    @abstractmethod
    def _draw(self, rng: random.Random) -> Problem:
        """One random problem from the whole space (either split), made with `_problem`."""

    @abstractmethod
    def parse_answer(self, text: str) -> object:
        """The parsed answer text, or AnswerError with a malformed reason (syntax only)."""

    @abstractmethod
    def _judge(self, problem: Problem, answer: str) -> Reason:
        """CORRECT or WRONG for a non-empty answer text; AnswerError for anything else."""

    @abstractmethod
    def solution_trace(self, problem: Problem) -> tuple[str, str]:
        """(reasoning, answer): a short worked solution that check() scores 1.0."""

    # -- shared --------------------------------------------------------------------------------

    def _problem(self, *, statement: str, key: str, **fields) -> Problem:
        """A Problem whose id comes from its exact statement and whose split comes from its key."""
        return Problem(id=f"{self.name}:{statement}", task=self.name, split=split_of(f"{self.name}:{key}"), **fields)

    def problems(self, split: str, n: int, seed: int) -> list[Problem]:
        """n distinct problems of the split, a pure function of (knobs, split, n, seed)."""
        require(split in SPLITS, type(self).__name__, "problems(split)", f"must be one of {SPLITS}, got {split!r}")
        require(is_int(n) and n >= 0, type(self).__name__, "problems(n)", f"must be an int >= 0, got {n!r}")
        require(is_int(seed), type(self).__name__, "problems(seed)", f"must be an int, got {seed!r}")
        # A string seed is hashed with SHA-512 by random.seed: stable across runs and PYTHONHASHSEED.
        rng = random.Random(f"{self.name}/{split}/{seed}")
        out: list[Problem] = []
        seen: set[str] = set()
        for _ in range(_DRAWS_PER_PROBLEM * n + 1000):
            if len(out) == n:
                return out
            p = self._draw(rng)
            if p.split == split and p.id not in seen:
                seen.add(p.id)
                out.append(p)
        if len(out) == n:
            return out
        raise ValueError(
            f"{self!r} gave only {len(out)} distinct {split!r} problems of the {n} asked; "
            "ask for fewer or raise a difficulty knob (more digits or numbers)"
        )

    def prompt_messages(self, problem: Problem) -> list[dict[str, str]]:
        """The chat to generate from: the shared system turn and the problem's user turn."""
        return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": problem.prompt}]

    def sft_messages(self, problem: Problem) -> list[dict[str, str]]:
        """The prompt plus the worked solution as an assistant turn (reasoning_content renders as <think>)."""
        reasoning, answer = self.solution_trace(problem)
        return [*self.prompt_messages(problem),
                {"role": "assistant", "reasoning_content": reasoning, "content": answer}]

    def render_trace(self, problem: Problem) -> str:
        """The solution trace as completion text, what check() sees from a model that learned it."""
        return render_completion(*self.solution_trace(problem))

    def check(self, problem: Problem, completion: str) -> Score:
        """Score one completion; only a bug raises, never the text (a malformed one scores 0.0)."""
        if problem.task != self.name:
            raise ValueError(f"problem {problem.id!r} belongs to task {problem.task!r}, not {self.name!r}")
        if not isinstance(completion, str):
            raise ValueError(f"completion must be the decoded text (str), got {type(completion).__name__}")
        answer = None
        try:
            reasoning, answer = split_completion(completion)
            if not answer:
                in_think = self._answer_in(reasoning)
                raise AnswerError(Reason.ANSWER_IN_THINK if in_think else Reason.EMPTY_ANSWER,
                                  "the answer must come after </think>" if in_think else "nothing after </think>")
            return Score(reason=self._judge(problem, answer), answer=answer)
        except AnswerError as e:
            return Score(reason=e.reason, answer=answer or None, detail=e.detail)

    def _answer_in(self, reasoning: str) -> bool:
        # Diagnostic only (both outcomes score 0.0): does the reasoning end in something that
        # parses as an answer, the way a model that closed </think> one step late would write it?
        lines = [line.strip() for line in reasoning.splitlines() if line.strip()]
        if not lines:
            return False
        last = lines[-1]
        tails = (last, last.rsplit("=", 1)[-1], last.rsplit(":", 1)[-1], last.split()[-1])
        for tail in tails:
            tail = tail.strip().rstrip(".").strip()
            try:
                if tail:
                    self.parse_answer(tail)
                    return True
            except AnswerError:
                pass
        return False


class IntegerTask(Task):
    """A task whose answer is one integer, correct when it equals the problem's target."""

    def parse_answer(self, text: str) -> int:
        return parse_integer(text)

    def _judge(self, problem: Problem, answer: str) -> Reason:
        return Reason.CORRECT if parse_integer(answer) == problem.target else Reason.WRONG

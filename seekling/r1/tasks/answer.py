"""The completion format every R1 task shares, how a completion is split, and the reward it earns.

A completion is the text the model writes after `<|assistant|>`, decoded with the think tags kept
(`serve.textstream.render_text`, or `tokenizer.decode` without `skip_special`):

    completion := ws "<think>" reasoning "</think>" ws answer ws [stop]
    reasoning  := any text without "<think>" or "</think>" (may be empty)
    answer     := the task's answer and nothing else: an integer for arithmetic and multiplication
                  (`parse_integer` below), an expression for countdown (`expression.py`)
    stop       := one "<|end_of_turn|>" or "<|end_of_text|>", in case the caller kept the stop token
    ws         := any whitespace, tolerated and ignored

The answer stands bare after `</think>`, with no `<answer>` tag (TinyZero has one). That is exactly
how the chat template renders an assistant message with `reasoning_content` and how the server
splits `reasoning_content` from `content`. So an SFT trace is an ordinary assistant message, a
served answer needs nothing stripped, and a tiny model has two tags to learn, not four. Generation
stops at the end of the turn, so the answer needs no closing tag.

Rewards (TinyZero's countdown scheme: correctness plus a small format reward):

    | outcome               | reasons                                                  | reward |
    |-----------------------|----------------------------------------------------------|--------|
    | correct, well-formed  | correct                                                  | 1.0    |
    | well-formed, wrong    | wrong; countdown: reused_number, foreign_number,         | 0.1    |
    |                       | division_by_zero, non_integer, out_of_range              |        |
    | malformed             | missing_think, text_before_think, unclosed_think,        | 0.0    |
    |                       | multiple_think, empty_answer, answer_in_think,           |        |
    |                       | two_answers, trailing_text, malformed_answer             |        |

Every outcome carries its `Reason`, so a GRPO driver can log how often each parse failure happens
instead of seeing an anonymous 0. Against reward hacking: an empty answer or several answers
("42 42", "12\\n13") is malformed and earns no format reward, so the 0.1 is paid only for one
committed answer. An empty `<think></think>` is allowed: the reward pays for the answer, and R1
itself does not require a minimum length of reasoning.

Left out on purpose: partial credit (digits right, close values), which peers show invites reward
hacking; a length penalty (the GRPO loss type deals with length bias); answers in other notations
("1,000", "1e3", "+5", leading zeros, non-ASCII digits), refused so that an answer has one spelling.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass

from seekling.tokenizer import END_OF_TURN, END_THINK, EOS, THINK

CORRECT_REWARD = 1.0
FORMAT_REWARD = 0.1  # TinyZero's countdown reward for a well-formed but wrong answer

# Larger than any answer a task here can produce (two 12-digit factors give at most 24 digits) and
# far below Python's 4300-digit limit on int(str), which would raise instead of scoring.
MAX_INTEGER_DIGITS = 32
_INTEGER = re.compile(r"0|-?[1-9][0-9]*")  # [0-9], not \d: "١٢" (Arabic-Indic digits) is refused


class Reason(enum.StrEnum):
    """Why a completion earned its reward; the value is what logs show."""

    CORRECT = "correct"
    WRONG = "wrong"
    REUSED_NUMBER = "reused_number"
    FOREIGN_NUMBER = "foreign_number"
    DIVISION_BY_ZERO = "division_by_zero"
    NON_INTEGER = "non_integer"
    OUT_OF_RANGE = "out_of_range"
    MISSING_THINK = "missing_think"
    TEXT_BEFORE_THINK = "text_before_think"
    UNCLOSED_THINK = "unclosed_think"
    MULTIPLE_THINK = "multiple_think"
    EMPTY_ANSWER = "empty_answer"
    ANSWER_IN_THINK = "answer_in_think"
    TWO_ANSWERS = "two_answers"
    TRAILING_TEXT = "trailing_text"
    MALFORMED_ANSWER = "malformed_answer"


WELL_FORMED_WRONG = frozenset({
    Reason.WRONG, Reason.REUSED_NUMBER, Reason.FOREIGN_NUMBER,
    Reason.DIVISION_BY_ZERO, Reason.NON_INTEGER, Reason.OUT_OF_RANGE,
})


def reward_of(reason: Reason) -> float:
    """The reward table above, as a function."""
    if reason is Reason.CORRECT:
        return CORRECT_REWARD
    return FORMAT_REWARD if reason in WELL_FORMED_WRONG else 0.0


class AnswerError(ValueError):
    """A completion that does not earn full reward, with the reason; `Task.check` turns it into a Score."""

    def __init__(self, reason: Reason, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else str(reason))
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True, kw_only=True)
class Score:
    """The verdict on one completion: the reward follows from the reason, so the two cannot disagree."""

    reason: Reason
    answer: str | None = None  # the answer text after </think>, stripped; None if the format failed first
    detail: str = ""  # a short human explanation for logs, e.g. "7 is used more often than given"

    def __post_init__(self):
        if not isinstance(self.reason, Reason):
            raise ValueError(f"Score.reason: must be a Reason (seekling.r1.tasks.answer), got {self.reason!r}")

    @property
    def reward(self) -> float:
        return reward_of(self.reason)

    @property
    def correct(self) -> bool:
        return self.reason is Reason.CORRECT

    @property
    def well_formed(self) -> bool:
        return self.reward > 0


def render_completion(reasoning: str, answer: str) -> str:
    """The completion text an assistant turn with this reasoning and answer stands for."""
    if THINK in reasoning or END_THINK in reasoning:
        raise ValueError("reasoning must not contain <think> or </think>; the tags are added here")
    if not answer.strip() or THINK in answer or END_THINK in answer:
        raise ValueError(f"answer must be non-empty text without think tags, got {answer!r}")
    return f"{THINK}{reasoning}{END_THINK}{answer}"


def split_completion(text: str) -> tuple[str, str]:
    """(reasoning, answer) of a completion, the answer stripped; raises AnswerError on a bad frame."""
    body = text.rstrip()
    for stop in (END_OF_TURN, EOS):
        if body.endswith(stop):
            body = body[: -len(stop)].rstrip()
            break
    opens, closes = body.count(THINK), body.count(END_THINK)
    if opens > 1 or closes > 1:
        raise AnswerError(Reason.MULTIPLE_THINK, f"{opens} <think> and {closes} </think>; write exactly one of each")
    if opens == 0:
        raise AnswerError(Reason.MISSING_THINK, "the completion must start with <think>")
    start = body.index(THINK)
    if body[:start].strip():
        raise AnswerError(Reason.TEXT_BEFORE_THINK, f"{body[:start].strip()[:40]!r} before <think>")
    if closes == 0:
        raise AnswerError(Reason.UNCLOSED_THINK, "<think> is never closed by </think>")
    end = body.index(END_THINK)  # after start: anything before start was refused above
    return body[start + len(THINK):end], body[end + len(END_THINK):].strip()


def parse_integer(text: str) -> int:
    """The integer an answer spells (`0` or `-?[1-9][0-9]*`, ASCII, stripped), or AnswerError."""
    if _is_integer(text):
        return int(text)
    words = text.split()
    if len(words) > 1 and _is_integer(words[0]):
        if _is_integer(words[1]):
            raise AnswerError(Reason.TWO_ANSWERS, f"{words[0]} then {words[1]}; give one answer")
        raise AnswerError(Reason.TRAILING_TEXT, f"{text[len(words[0]):].strip()[:40]!r} after the answer")
    if _INTEGER.fullmatch(text):
        raise AnswerError(Reason.MALFORMED_ANSWER, f"more than {MAX_INTEGER_DIGITS} digits")
    raise AnswerError(Reason.MALFORMED_ANSWER, f"{text[:40]!r} is not an integer like 123 or -45")


def _is_integer(word: str) -> bool:
    return len(word.lstrip("-")) <= MAX_INTEGER_DIGITS and _INTEGER.fullmatch(word) is not None

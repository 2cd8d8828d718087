"""Countdown expressions: our own recursive-descent parser and an exact integer evaluator, never eval.

Grammar (ASCII only; spaces, tabs and newlines between tokens are ignored):

    expr   := term (("+" | "-") term)*
    term   := factor (("*" | "/") factor)*
    factor := NUMBER | "(" expr ")"
    NUMBER := "0" | [1-9][0-9]*

so * and / bind tighter than + and -, and operators of one level group from the left, as in school.
Anything else is refused: other characters ("x", "=", "**", "١٢", "__import__('os')"), leading zeros,
and unary minus or plus. The given numbers are positive, so a negative value can only come from a
subtraction, and unary minus would add nothing but another way to write the same thing ("a - -b").

Evaluation rules (the classic Countdown rules, except for the sign):
- every step must be an integer: 7/2 is refused even inside (7/2)*2, whose total is whole;
- division by zero is refused;
- negative and zero intermediates are allowed: the check is about arithmetic, not a game show's
  convention, and TinyZero's checker allows them too;
- |every intermediate| <= MAX_MAGNITUDE, so no answer can make the checker work with huge integers.

Size caps bound the work and the recursion whatever a model writes: MAX_CHARS characters,
MAX_DEPTH nested parentheses (the parser recurses once per level; a 10,000-deep nest would
otherwise hit Python's recursion limit), MAX_LITERAL_DIGITS per number. Syntax errors and caps
raise AnswerError with a malformed reason; rule violations raise it with a well-formed-but-wrong
reason (answer.py's table).

Left out: exponentiation, concatenation of digits and other operators (not in the game), and
floating point (Fractions or integers only: 1/3*3 must not equal 1 by rounding).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from seekling.r1.tasks.answer import AnswerError, Reason

MAX_CHARS = 200  # several times the longest sensible answer for 6 numbers: (100+75)*(50-25)/(10-5)
MAX_DEPTH = 10  # 6 numbers need at most 5 levels; a few more tolerate redundant parentheses
MAX_LITERAL_DIGITS = 6  # given numbers have at most 3 digits (countdown.MAX_NUMBER)
MAX_MAGNITUDE = 10**12  # 6 numbers of at most 100 multiply to at most 10**12, so no honest step is refused
PRECEDENCE = {"+": 1, "-": 1, "*": 2, "/": 2}
_SPACE = " \t\n\r"


@dataclass(frozen=True)
class Num:
    value: int


@dataclass(frozen=True)
class BinOp:
    op: str
    left: Num | BinOp
    right: Num | BinOp


Node = Num | BinOp


class _Parser:
    """Recursive descent over the text; `pos` only moves forward, so parsing is linear."""

    def __init__(self, text: str):
        self.text, self.pos, self.depth = text, 0, 0

    def peek(self) -> str:
        while self.pos < len(self.text) and self.text[self.pos] in _SPACE:
            self.pos += 1
        return self.text[self.pos] if self.pos < len(self.text) else ""

    def fail(self, what: str):
        got = repr(self.text[self.pos:self.pos + 10]) if self.pos < len(self.text) else "the end"
        raise AnswerError(Reason.MALFORMED_ANSWER, f"expected {what} at character {self.pos}, got {got}")

    def expr(self) -> Node:
        node = self.term()
        while self.peek() in ("+", "-"):
            op = self.text[self.pos]
            self.pos += 1
            node = BinOp(op, node, self.term())
        return node

    def term(self) -> Node:
        node = self.factor()
        while self.peek() in ("*", "/"):
            op = self.text[self.pos]
            self.pos += 1
            node = BinOp(op, node, self.factor())
        return node

    def factor(self) -> Node:
        ch = self.peek()
        if ch == "(":
            self.depth += 1
            if self.depth > MAX_DEPTH:
                raise AnswerError(Reason.MALFORMED_ANSWER, f"parentheses nested deeper than {MAX_DEPTH}")
            self.pos += 1
            node = self.expr()
            if self.peek() != ")":
                self.fail("')'")
            self.pos += 1
            self.depth -= 1
            return node
        if ch in ("-", "+"):
            self.fail("a number or '(' (unary minus and plus are not allowed)")
        start = self.pos
        while self.pos < len(self.text) and self.text[self.pos] in "0123456789":
            self.pos += 1
        digits = self.text[start:self.pos]
        if not digits:
            self.fail("a number or '('")
        if len(digits) > 1 and digits[0] == "0":
            raise AnswerError(Reason.MALFORMED_ANSWER, f"number {digits!r} has a leading zero")
        if len(digits) > MAX_LITERAL_DIGITS:
            raise AnswerError(Reason.MALFORMED_ANSWER, f"number longer than {MAX_LITERAL_DIGITS} digits")
        return Num(int(digits))


def _parse_prefix(text: str) -> tuple[Node, str]:
    """The expression at the start of text and the text left after it (stripped)."""
    parser = _Parser(text)
    node = parser.expr()
    parser.peek()
    return node, text[parser.pos:]


def parse(text: str) -> Node:
    """The expression tree of text (one expression, nothing else), or AnswerError."""
    if len(text) > MAX_CHARS:
        raise AnswerError(Reason.MALFORMED_ANSWER, f"expression longer than {MAX_CHARS} characters")
    node, rest = _parse_prefix(text)
    if rest:
        try:
            _parse_prefix(rest)
        except AnswerError:
            raise AnswerError(Reason.TRAILING_TEXT, f"{rest[:40]!r} after the expression") from None
        raise AnswerError(Reason.TWO_ANSWERS, f"{rest[:40]!r} is a second expression; give one")
    return node


def literals(node: Node) -> list[int]:
    """The numbers written in the expression, left to right."""
    if isinstance(node, Num):
        return [node.value]
    return literals(node.left) + literals(node.right)


def check_numbers(node: Node, given: tuple[int, ...]) -> None:
    """AnswerError unless every number written is one of `given`, used at most as often as given."""
    have = Counter(given)
    for value, used in Counter(literals(node)).items():
        if value not in have:
            raise AnswerError(Reason.FOREIGN_NUMBER, f"{value} is not one of the given numbers {sorted(given)}")
        if used > have[value]:
            raise AnswerError(Reason.REUSED_NUMBER, f"{value} is used {used} times but given {have[value]}")


def evaluate(node: Node) -> tuple[int, list[tuple[int, str, int, int]]]:
    """(value, steps): the value and each step (left, op, right, result) in evaluation order."""
    steps: list[tuple[int, str, int, int]] = []
    return _eval(node, steps), steps


def _eval(node: Node, steps: list) -> int:
    if isinstance(node, Num):
        return node.value
    a, b = _eval(node.left, steps), _eval(node.right, steps)
    if node.op == "+":
        v = a + b
    elif node.op == "-":
        v = a - b
    elif node.op == "*":
        v = a * b
    else:
        if b == 0:
            raise AnswerError(Reason.DIVISION_BY_ZERO, f"{a}/{b}")
        if a % b:
            raise AnswerError(Reason.NON_INTEGER, f"{a}/{b} is not a whole number")
        v = a // b
    if abs(v) > MAX_MAGNITUDE:
        raise AnswerError(Reason.OUT_OF_RANGE, f"{a}{node.op}{b} is beyond +-{MAX_MAGNITUDE}")
    steps.append((a, node.op, b, v))
    return v


def render(node: Node, parent: str = "", right: bool = False) -> str:
    """The expression with only the parentheses it needs; parse(render(t)) == t."""
    if isinstance(node, Num):
        return str(node.value)
    text = render(node.left, node.op) + node.op + render(node.right, node.op, right=True)
    if parent and (PRECEDENCE[node.op] < PRECEDENCE[parent] or (right and PRECEDENCE[node.op] == PRECEDENCE[parent])):
        # A right operand of equal precedence keeps its parentheses even where they could go
        # (a+(b+c)): the tree, and so the steps and which of them must be whole, stay as drawn.
        return f"({text})"
    return text

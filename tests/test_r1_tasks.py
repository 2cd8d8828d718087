"""R1 tasks: seeded, disjoint splits; the completion format and reward table; hostile countdown
expressions; the evaluator against Fraction arithmetic; solution traces that check() accepts."""

import dataclasses
import random
import re
from fractions import Fraction

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from seekling.r1.tasks import SPLITS, TASKS, Problem, Reason, Score, get_task, render_completion
from seekling.r1.tasks import expression
from seekling.r1.tasks.answer import AnswerError
from seekling.r1.tasks.arithmetic import AdditionTask
from seekling.r1.tasks.base import HELDOUT_FRACTION
from seekling.r1.tasks.countdown import CountdownTask
from seekling.r1.tasks.multiplication import MultiplicationTask
from seekling.tokenizer import ASSISTANT, END_OF_TURN, load_default_tokenizer

# Each task with its defaults and with other knobs, so generation and traces are exercised broadly.
VARIANTS = [
    AdditionTask(), AdditionTask(digits=1), AdditionTask(digits=7, ops="-", allow_negative=True),
    MultiplicationTask(), MultiplicationTask(digits_a=4, digits_b=3), MultiplicationTask(digits_a=1, digits_b=1),
    CountdownTask(), CountdownTask(count=5, max_number=100, max_target=1000), CountdownTask(count=2, max_number=9),
]
# Spaces with about ten held-out problems (1-digit operands): tests ask them for fewer.
SMALL = {AdditionTask(digits=1), MultiplicationTask(digits_a=1, digits_b=1), CountdownTask(count=2, max_number=9)}
TRACE_CHARS = 400  # "a few hundred characters" at the default knobs, so a tiny model's context holds them

SUM = Problem(id="addition:478+356", task="addition", split="train", prompt="Compute 478 + 356.",
              numbers=(478, 356), op="+", target=834, answer="834")
THOUSAND = Problem(id="addition:999+1", task="addition", split="train", prompt="Compute 999 + 1.",
                   numbers=(999, 1), op="+", target=1000, answer="1000")
GAME = Problem(id="countdown:2,3,5,5,7->56", task="countdown", split="train", prompt="make 56",
               numbers=(2, 3, 5, 5, 7), op="", target=56, answer="(5+3)*7")


def think(answer: str, reasoning: str = "some steps") -> str:
    return f"<think>{reasoning}</think>{answer}"


# -- registry and knobs ---------------------------------------------------------------------------

def test_registry_names_and_errors():
    assert sorted(TASKS) == ["addition", "countdown", "multiplication"]
    assert all(cls.name == name for name, cls in TASKS.items())
    assert get_task("countdown", count=4) == CountdownTask(count=4)
    assert get_task("addition", ops="-+") == AdditionTask(ops="+-")
    with pytest.raises(ValueError, match="unknown task 'gsm8k'.*addition"):
        get_task("gsm8k")
    with pytest.raises(ValueError, match="no knob operands.*digits"):
        get_task("addition", operands=3)


@pytest.mark.parametrize("name, knobs, field", [
    ("addition", {"digits": 0}, "digits"),
    ("addition", {"digits": 13}, "digits"),
    ("addition", {"ops": "*"}, "ops"),
    ("addition", {"allow_negative": 1}, "allow_negative"),
    ("multiplication", {"digits_b": 0}, "digits_b"),
    ("multiplication", {"digits_a": 2.0}, "digits_a"),
    ("countdown", {"count": 7}, "count"),
    ("countdown", {"max_number": 101}, "max_number"),
    ("countdown", {"max_target": 5}, "max_target"),
])
def test_bad_knobs_name_the_field(name, knobs, field):
    with pytest.raises(ValueError, match=rf"\.{field}: must be"):
        get_task(name, **knobs)


def test_problem_and_score_validate():
    with pytest.raises(ValueError, match=r"Problem\.split: must be one of"):
        Problem(id="x", task="addition", split="dev", prompt="p", numbers=(1,), op="+", target=1, answer="1")
    with pytest.raises(ValueError, match=r"Problem\.numbers"):
        Problem(id="x", task="addition", split="train", prompt="p", numbers=(), op="+", target=1, answer="1")
    with pytest.raises(ValueError, match=r"Score\.reason"):
        Score(reason="correct")
    with pytest.raises(ValueError, match="must not contain"):
        render_completion("a </think> b", "1")
    with pytest.raises(ValueError, match="belongs to task 'addition'"):
        CountdownTask().check(SUM, think("834"))


# -- generation: determinism and disjoint splits --------------------------------------------------

@pytest.mark.parametrize("task", VARIANTS, ids=repr)
def test_problems_are_seeded_and_distinct(task):
    n = 5 if task in SMALL else 20
    for split in SPLITS:
        a = task.problems(split, n, seed=7)
        assert a == task.problems(split, n, seed=7)
        assert len(a) == n and len({p.id for p in a}) == n
        assert all(p.split == split and p.task == task.name for p in a)
        assert {p.id for p in a} != {p.id for p in task.problems(split, n, seed=8)}


@pytest.mark.parametrize("task", VARIANTS, ids=repr)
def test_splits_are_disjoint_whatever_the_seeds(task):
    train = {p.id for seed in range(4) for p in task.problems("train", 30, seed)}
    test = {p.id for seed in range(4) for p in task.problems("test", 5 if task in SMALL else 15, seed)}
    assert test and not train & test


def test_heldout_fraction_and_commuted_problems_share_a_split():
    task = MultiplicationTask(digits_a=1, digits_b=1)
    rng = random.Random(0)
    drawn = {p.numbers: p.split for p in (task._draw(rng) for _ in range(3000))}
    assert len(drawn) == 100  # every ordered pair of digits
    assert all(drawn[(b, a)] == split for (a, b), split in drawn.items())
    big = [AdditionTask(digits=6)._draw(rng).split for _ in range(4000)]
    assert abs(big.count("test") / len(big) - HELDOUT_FRACTION) < 0.03


def test_asking_for_more_problems_than_exist_is_a_clear_error():
    with pytest.raises(ValueError, match="distinct 'test' problems.*raise a difficulty knob"):
        AdditionTask(digits=1, ops="+").problems("test", 50, seed=0)


def test_knobs_shape_the_problems():
    probs = CountdownTask(count=5, max_number=100, max_target=1000).problems("train", 50, seed=1)
    assert all(len(p.numbers) == 5 and max(p.numbers) <= 100 and 1 <= p.target <= 1000 for p in probs)
    assert all(p.target not in p.numbers for p in probs)
    assert all(p.target >= 0 for p in AdditionTask(ops="-").problems("train", 100, seed=0))
    assert any(p.target < 0 for p in AdditionTask(ops="-", allow_negative=True).problems("train", 100, seed=0))
    assert {len(str(n)) for p in MultiplicationTask(digits_a=4, digits_b=3).problems("train", 50, 0)
            for n in p.numbers} == {3, 4}


# -- prompts and traces ---------------------------------------------------------------------------

def test_prompts_and_sft_turns_render_with_the_chat_template():
    tok = load_default_tokenizer()
    for task in (AdditionTask(), MultiplicationTask(), CountdownTask()):
        p = task.problems("train", 1, seed=0)[0]
        ids = tok.apply_chat_template(task.prompt_messages(p))
        assert tok.think_id in ids and tok.end_think_id in ids  # the system turn names the tags
        chat = tok.render_chat(task.sft_messages(p), add_generation_prompt=False)
        # The SFT target is exactly the completion text that check() scores 1.0.
        assert chat.endswith(ASSISTANT + task.render_trace(p) + END_OF_TURN)
        assert task.check(p, chat.split(ASSISTANT)[-1]).correct


_EQUATION = re.compile(r"([0-9+\-*/()]+)=(-?[0-9]+)(?![0-9])")


@pytest.mark.parametrize("task", VARIANTS, ids=repr)
def test_traces_are_true_and_check_out(task, monkeypatch):
    # The countdown caps guard answers; here the evaluator is only a calculator for the trace's lines.
    monkeypatch.setattr(expression, "MAX_LITERAL_DIGITS", 40)
    n = 5 if task in SMALL else 60
    for p in task.problems("train", 2 * n, seed=3) + task.problems("test", n, seed=3):
        reasoning, answer = task.solution_trace(p)
        score = task.check(p, render_completion(reasoning, answer))
        assert score.reason is Reason.CORRECT and score.reward == 1.0, (p, score)
        assert task.check(p, think(p.answer, "")).correct
        # Every equation the trace states is true arithmetic.
        equations = _EQUATION.findall(reasoning)
        assert equations
        for lhs, rhs in equations:
            assert expression.evaluate(expression.parse(lhs))[0] == int(rhs), (p.id, lhs, rhs)
        # A model that learned the trace but stopped at </think> wrote its answer inside the think.
        assert task.check(p, f"<think>{reasoning}</think>").reason is Reason.ANSWER_IN_THINK


def test_traces_stay_short_at_the_default_knobs():
    for task in (AdditionTask(), MultiplicationTask(), CountdownTask()):
        assert max(len(task.render_trace(p)) for p in task.problems("train", 200, seed=0)) <= TRACE_CHARS


def test_trace_examples():
    assert AdditionTask().solution_trace(SUM) == (
        "8+6=14 write 4 carry 1\n7+5+1=13 write 3 carry 1\n4+3+1=8 write 8\n478+356=834", "834")
    minus = Problem(id="addition:45-123", task="addition", split="train", prompt="Compute 45 - 123.",
                    numbers=(45, 123), op="-", target=-78, answer="-78")
    assert AdditionTask(allow_negative=True).solution_trace(minus)[0] == (
        "45<123, so 45-123=-(123-45)\n13-5=8 borrow 1\n2-1=1, 11-4=7 borrow 1\n1-1=0, 0-0=0\n123-45=78\n45-123=-78")
    times = Problem(id="multiplication:47*203", task="multiplication", split="train", prompt="Compute 47 * 203.",
                    numbers=(47, 203), op="*", target=9541, answer="9541")
    assert MultiplicationTask().solution_trace(times)[0] == (
        "47*3: 7*3=21 write 1 carry 2, 4*3+2=14, so 141\n47*200: 7*2=14 write 4 carry 1, 4*2+1=9, so 9400\n"
        "141+9400=9541\n47*203=9541")
    assert CountdownTask().solution_trace(GAME) == ("5+3=8\n8*7=56\n(5+3)*7=56", "(5+3)*7")


# -- the completion format and the reward table ---------------------------------------------------

@pytest.mark.parametrize("completion, reason", [
    ("834", Reason.MISSING_THINK),
    ("</think>834", Reason.MISSING_THINK),
    ("<think>8+6=14", Reason.UNCLOSED_THINK),
    ("<think>a</think><think>b</think>834", Reason.MULTIPLE_THINK),
    ("<think><think>a</think>834", Reason.MULTIPLE_THINK),
    ("<think>a</think>834</think>", Reason.MULTIPLE_THINK),
    ("Sure! <think>a</think>834", Reason.TEXT_BEFORE_THINK),
    ("</think><think>a", Reason.TEXT_BEFORE_THINK),
    (think(""), Reason.EMPTY_ANSWER),
    (think(" \n\t "), Reason.EMPTY_ANSWER),
    (think("", "no idea"), Reason.EMPTY_ANSWER),
    (think("", "478+356=834"), Reason.ANSWER_IN_THINK),
    (think("", "so the answer is 834."), Reason.ANSWER_IN_THINK),
    (think("834 834"), Reason.TWO_ANSWERS),
    (think("834\n834"), Reason.TWO_ANSWERS),
    (think("834 835"), Reason.TWO_ANSWERS),
    (think("834 is the answer"), Reason.TRAILING_TEXT),
    (think("834 = 478 + 356"), Reason.TRAILING_TEXT),
    (think("The answer is 834"), Reason.MALFORMED_ANSWER),
    (think("834."), Reason.MALFORMED_ANSWER),
    (think("12a"), Reason.MALFORMED_ANSWER),
    (think("--3"), Reason.MALFORMED_ANSWER),
    (think("+834"), Reason.MALFORMED_ANSWER),
    (think("0834"), Reason.MALFORMED_ANSWER),
    (think("-0"), Reason.MALFORMED_ANSWER),
    (think("٨٣٤"), Reason.MALFORMED_ANSWER),
    (think("8٣٤"), Reason.MALFORMED_ANSWER),  # int() would read this as 834
    (think("８３４"), Reason.MALFORMED_ANSWER),  # full-width digits
    (think("<answer>834</answer>"), Reason.MALFORMED_ANSWER),
    (think("9" * 5000), Reason.MALFORMED_ANSWER),
    (think("835"), Reason.WRONG),
    (think("-834"), Reason.WRONG),
    (think("834"), Reason.CORRECT),
    (think("834", ""), Reason.CORRECT),
    ("\n <think>\n8+6=14 ...\n</think>\n\n  834 \n", Reason.CORRECT),
    (think("834") + "<|end_of_turn|>", Reason.CORRECT),
    (think("834") + "<|end_of_text|>", Reason.CORRECT),
    (think("834") + "<|end_of_turn|><|end_of_turn|>", Reason.MALFORMED_ANSWER),
])
def test_integer_answers(completion, reason):
    score = AdditionTask().check(SUM, completion)
    assert score.reason is reason, score
    assert score.reward == {Reason.CORRECT: 1.0, Reason.WRONG: 0.1}.get(reason, 0.0)
    assert score.correct == (reason is Reason.CORRECT) and score.well_formed == (score.reward > 0)


@pytest.mark.parametrize("answer", ["1,000", "1e3", "1000.0", "1 000", "01000", "0x3E8", "1_000", "", "½"])
def test_other_spellings_of_the_right_number_are_not_rewarded(answer):
    assert AdditionTask().check(THOUSAND, think("1000")).correct
    assert AdditionTask().check(THOUSAND, think(answer)).reward == 0.0


def test_score_keeps_the_answer_and_says_why():
    score = AdditionTask().check(SUM, think(" 834 is it "))
    assert score.answer == "834 is it" and "is it" in score.detail
    assert AdditionTask().check(SUM, "834").answer is None


@given(n=st.integers(-10**40, 10**40), pad=st.sampled_from(["", " ", "\n", "\t \n"]))
@settings(max_examples=200, deadline=None)
def test_any_integer_is_right_or_wrong_never_malformed(n, pad):
    score = MultiplicationTask().check(dataclasses.replace(SUM, task="multiplication"), think(f"{pad}{n}{pad}"))
    if len(str(abs(n))) > 32:
        assert score.reason is Reason.MALFORMED_ANSWER
    else:
        assert score.reason is (Reason.CORRECT if n == 834 else Reason.WRONG)


# -- countdown: hostile expressions ---------------------------------------------------------------

@pytest.mark.parametrize("answer, reason", [
    ("(5+3)*7", Reason.CORRECT),
    (" ( 5 + 3 ) *\t7 ", Reason.CORRECT),
    ("7*(3+5)", Reason.CORRECT),
    ("7*(2*3+2)", Reason.REUSED_NUMBER),
    ("7*7+7", Reason.REUSED_NUMBER),
    ("5*5+2*3*7-5", Reason.REUSED_NUMBER),
    ("5*5", Reason.WRONG),  # 5 is given twice
    ("8*7", Reason.FOREIGN_NUMBER),
    ("1/0", Reason.FOREIGN_NUMBER),
    ("7/(5-5)", Reason.DIVISION_BY_ZERO),
    ("7/2", Reason.NON_INTEGER),
    ("(7/2)*(5-3)", Reason.NON_INTEGER),  # the total would be whole; the step is not
    ("2-7", Reason.WRONG),  # negative results are allowed, just not 56
    ("(2-7)*(3-5)*5", Reason.WRONG),
    ("(((((((((((7)))))))))))", Reason.MALFORMED_ANSWER),  # 11 levels
    ("((((((((((7))))))))))", Reason.WRONG),  # 10 levels
    ("(" * 10_000 + "7" + ")" * 10_000, Reason.MALFORMED_ANSWER),
    ("9" * 1000, Reason.MALFORMED_ANSWER),
    ("2**100", Reason.MALFORMED_ANSWER),
    ("2^5", Reason.TRAILING_TEXT),
    ("__import__('os')", Reason.MALFORMED_ANSWER),
    ("__import__('os').system('rm -rf /')", Reason.MALFORMED_ANSWER),
    ("-3+59", Reason.MALFORMED_ANSWER),
    ("7*-3", Reason.MALFORMED_ANSWER),
    ("--3", Reason.MALFORMED_ANSWER),
    ("+7", Reason.MALFORMED_ANSWER),
    ("07*8", Reason.MALFORMED_ANSWER),
    ("١٢", Reason.MALFORMED_ANSWER),
    ("٧*(٥+٣)", Reason.MALFORMED_ANSWER),
    ("7×8", Reason.TRAILING_TEXT),
    ("7.0*8", Reason.TRAILING_TEXT),
    ("(5+3)*7=56", Reason.TRAILING_TEXT),
    ("(5+3)*7 (5+3)*7", Reason.TWO_ANSWERS),
    ("(5+3)*7\n7*(5+3)", Reason.TWO_ANSWERS),
    ("(5+3)*", Reason.MALFORMED_ANSWER),
    ("(5+3*7", Reason.MALFORMED_ANSWER),
    ("5+3)*7", Reason.TRAILING_TEXT),
    ("()", Reason.MALFORMED_ANSWER),
    ("", Reason.EMPTY_ANSWER),
])
def test_countdown_answers(answer, reason):
    score = CountdownTask().check(GAME, think(answer))
    assert score.reason is reason, score


def test_unary_minus_is_refused_with_a_reason():
    assert "unary minus" in CountdownTask().check(GAME, think("7*-3")).detail


def test_countdown_caps_intermediate_values():
    huge = Problem(id="countdown:2,999999,999999->1", task="countdown", split="train", prompt="p",
                   numbers=(2, 999999, 999999), op="", target=1, answer="999999/999999")
    assert CountdownTask().check(huge, think("999999*999999")).reason is Reason.WRONG  # just under 10**12
    assert CountdownTask().check(huge, think("999999*999999*2")).reason is Reason.OUT_OF_RANGE
    assert CountdownTask().check(huge, think("9999999")).reason is Reason.MALFORMED_ANSWER  # 7-digit literal


# A test-side model of expressions: ints and (op, left, right) tuples, valued with Fractions.
_trees = st.recursive(
    st.integers(0, 120),
    lambda sub: st.tuples(st.sampled_from("+-*/"), sub, sub),
    max_leaves=8,
)


class _Refused(Exception):
    pass


def _value(tree) -> Fraction:
    """Fraction arithmetic with the documented rules: whole steps, no /0, |step| <= 10**12."""
    if isinstance(tree, int):
        return Fraction(tree)
    op, left, right = tree
    a, b = _value(left), _value(right)
    if op == "/" and b == 0:
        raise _Refused(Reason.DIVISION_BY_ZERO)
    v = a + b if op == "+" else a - b if op == "-" else a * b if op == "*" else a / b
    if v.denominator != 1:
        raise _Refused(Reason.NON_INTEGER)
    if abs(v) > 10**12:
        raise _Refused(Reason.OUT_OF_RANGE)
    return v


def _fully_parenthesised(tree) -> str:
    if isinstance(tree, int):
        return str(tree)
    op, left, right = tree
    return f"({_fully_parenthesised(left)} {op} {_fully_parenthesised(right)})"


@given(tree=_trees)
@settings(max_examples=300, deadline=None)
def test_evaluator_agrees_with_fraction_arithmetic(tree):
    text = _fully_parenthesised(tree)
    node = expression.parse(text)
    try:
        expected = _value(tree)
    except _Refused as refused:
        with pytest.raises(AnswerError) as got:
            expression.evaluate(node)
        assert got.value.reason is refused.args[0]
    else:
        assert expression.evaluate(node)[0] == expected
    # The minimal-parentheses rendering parses back to the same tree.
    assert expression.parse(expression.render(node)) == node


_pieces = st.lists(st.sampled_from([
    "<think>", "</think>", "<|end_of_turn|>", "0", "1", "2", "3", "5", "7", "8", "9", "56", "834",
    "+", "-", "*", "/", "(", ")", " ", "\n", "=", ".", ",", "e", "a", "١", "**", "'",
]), max_size=40).map("".join)


@given(text=st.one_of(st.text(max_size=300), _pieces))
@settings(max_examples=300, deadline=None)
def test_junk_never_raises(text):
    for task, problem in ((AdditionTask(), SUM), (CountdownTask(), GAME)):
        for completion in (text, think(text), "<think>" + text):
            assert task.check(problem, completion).reward in (0.0, 0.1, 1.0)
    try:
        expression.parse(text)
    except AnswerError as e:
        assert e.reason in (Reason.MALFORMED_ANSWER, Reason.TRAILING_TEXT, Reason.TWO_ANSWERS)

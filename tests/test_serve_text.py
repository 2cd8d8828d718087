"""Streaming text pipeline of the server vs whole-text references: stop strings, reasoning split, UTF-8."""

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from seekling.serve.textstream import ChoiceText, ReasoningSplitter, StopMatcher, render_text
from seekling.tokenizer import load_default_tokenizer


@pytest.fixture(scope="module")
def tok():
    return load_default_tokenizer()


# ---------------------------------------------------------------- slow, obvious references


def ref_stop(text: str, stops) -> tuple[str, bool]:
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    return (text[:min(hits)], True) if hits else (text, False)


def ref_split(text: str) -> tuple[str, str]:
    reasoning, content, inside = [], [], False
    for piece in re.split(r"(<think>|</think>)", text):
        if piece == "<think>":
            inside = True
        elif piece == "</think>":
            inside = False
        else:
            (reasoning if inside else content).append(piece)
    return "".join(reasoning), "".join(content)


def chunked(text: str, cuts: list[int]) -> list[str]:
    cuts = sorted({c % (len(text) + 1) for c in cuts} | {0, len(text)})
    return [text[a:b] for a, b in zip(cuts, cuts[1:])]


# Text built from tag fragments, so tags and near-tags are split every possible way.
pieces = st.sampled_from(["<", "/", "think", ">", "<think>", "</think>", "th", "ink>", "a", " b", "é", "\n", "END", "EN"])
texts = st.lists(pieces, max_size=30).map("".join)


@settings(max_examples=300, deadline=None)
@given(texts, st.lists(st.integers(0, 400), max_size=12))
def test_reasoning_split_matches_whole_text_reference(text, cuts):
    s = ReasoningSplitter()
    r, c = [], []
    for chunk in chunked(text, cuts):
        a, b = s.feed(chunk)
        r.append(a)
        c.append(b)
    a, b = s.flush()
    assert ("".join(r) + a, "".join(c) + b) == ref_split(text)


@settings(max_examples=300, deadline=None)
@given(texts, st.lists(st.integers(0, 400), max_size=12),
       st.lists(st.sampled_from(["END", "</think>", "b\n", "a a", "ink"]), min_size=1, max_size=3))
def test_stop_strings_match_whole_text_reference(text, cuts, stops):
    m = StopMatcher(stops)
    out = []
    for chunk in chunked(text, cuts):
        out.append(m.feed(chunk))
        # Emitted text never contains a stop string, and never runs past the reference's cut.
        assert not any(s in "".join(out) for s in stops)
    if not m.stopped:
        out.append(m.flush())
    assert ("".join(out), m.stopped) == ref_stop(text, stops)


def test_earlier_stop_string_still_arriving_wins():
    """'ink' completes first in the stream, but '</think>' started earlier: the cut is at '</think>'."""
    m = StopMatcher(["</think>", "ink"])
    assert m.feed("<<</think") == "<<"
    assert not m.stopped
    assert m.feed(">") == "" and m.stopped
    m = StopMatcher(["</think>", "ink"])
    assert m.feed("<<</think") + m.flush() == "<<</th" and m.stopped  # stream ended: 'ink' was the first match


def test_tags_split_across_chunks():
    s = ReasoningSplitter()
    got = [s.feed(x) for x in ["Hi <", "thi", "nk>plan", "ning</th", "ink", "> done <"]]
    assert "".join(r for r, _ in got) == "planning"
    assert "".join(c for _, c in got) == "Hi  done "
    assert s.flush() == ("", "<")  # a lone "<" at the end is content, released at flush


def test_choice_text_special_think_tokens(tok):
    ids = [tok.think_id, *tok.encode("plan it"), tok.end_think_id, *tok.encode("The answer."), tok.eot_id]
    ct = ChoiceText(tok)
    deltas = [ct.feed([t]) for t in ids] + [ct.finish()]
    assert ct.reasoning == "plan it" and ct.content == "The answer."
    assert "".join(d.reasoning for d in deltas) == "plan it"
    assert ct.n_tokens == len(ids)
    # the think tags and the reasoning text: counted as reasoning tokens
    assert ct.n_reasoning_tokens == len(tok.encode("plan it")) + 2


def test_choice_text_plain_text_tags_token_by_token(tok):
    text = "<think>weigh both</think>Yes."
    ids = tok.encode(text)  # tags as ordinary byte-level tokens: '<', 'th', 'ink', '>' ...
    assert tok.think_id not in ids
    ct = ChoiceText(tok)
    streamed = "".join(d.reasoning + d.content for d in [ct.feed([t]) for t in ids] + [ct.finish()])
    assert (ct.reasoning, ct.content) == ("weigh both", "Yes.")
    assert "<" not in streamed and "ink" not in streamed  # no fragment of a tag ever went out


def test_choice_text_completions_mode_keeps_tags(tok):
    ids = [tok.think_id, *tok.encode("x"), tok.end_think_id, *tok.encode("y")]
    ct = ChoiceText(tok, split_reasoning=False)
    ct.feed(ids)
    ct.finish()
    assert ct.content == "<think>x</think>y" and ct.reasoning == ""


def test_choice_text_utf8_split_inside_characters(tok):
    text = "naïve 漢字 🙂 ok"
    # one token per byte (the base byte tokens), so multi-byte characters arrive in pieces
    byte_ids = {tok.token_bytes(i): i for i in range(tok.vocab_size) if len(tok.token_bytes(i)) == 1}
    ids = [byte_ids[bytes([b])] for b in text.encode("utf-8")]
    ct = ChoiceText(tok)
    pieces = [ct.feed([t]).content for t in ids]
    ct.finish()
    assert "".join(pieces) == text == ct.content
    assert "\ufffd" not in "".join(pieces)  # never a half character on the wire


def test_choice_text_stop_string_counts_tokens_up_to_the_stop(tok):
    ids = tok.encode("one two three four")
    ct = ChoiceText(tok, stop=["three"])
    ct.feed(ids)
    ct.finish()
    assert ct.content == "one two " and ct.stopped
    n_until = next(k for k in range(1, len(ids) + 1) if "three" in tok.decode(ids[:k]))
    assert ct.n_tokens == n_until


def test_render_text_drops_structure_tokens(tok):
    ids = [tok.bos_id, *tok.encode("a"), tok.think_id, *tok.encode("b"), tok.end_think_id, tok.eot_id]
    assert render_text(tok, ids) == "a<think>b</think>"

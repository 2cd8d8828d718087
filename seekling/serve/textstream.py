"""Generated token ids -> text deltas: UTF-8 reassembly, stop strings, and the reasoning split.

One `ChoiceText` per choice turns the engine's tokens into what an OpenAI stream sends, in three
stages, each holding back only as much text as it must:

1. Bytes to text. A byte-level BPE token can end half-way through a UTF-8 character, so bytes go
   through an incremental decoder that keeps an incomplete tail for the next token. Special
   tokens (turn markers, end of text) never reach the text; `<think>`/`</think>` do, as their
   tag strings, so stage 3 handles them exactly like tags the model spelled out in plain bytes.
2. Stop strings (OpenAI semantics: the text ends before the first stop string, which is not
   returned). Any tail that could still grow into a stop string is held back until it cannot.
3. Reasoning split, as DeepSeek's API: text between `<think>` and `</think>` is reasoning, the
   rest is content. A tail that could be the start of a tag (say "</thi") is held back, so a tag
   split across tokens never leaks into either field.

`finish()` releases everything held back. Left out: stop strings that span the reasoning and
content boundary are matched on the raw text (tags included), which is what a client that sees
the whole completion would expect.
"""

from __future__ import annotations

import codecs
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

THINK_TAG, END_THINK_TAG = "<think>", "</think>"


def silent_ids(tokenizer) -> frozenset[int]:
    """Special tokens that carry structure, not text; the think tags stay, as their tag strings."""
    return frozenset(tokenizer.special_ids.values()) - {tokenizer.think_id, tokenizer.end_think_id}


def render_text(tokenizer, ids: Iterable[int]) -> str:
    """The whole text of ids as the server shows it (before the reasoning split): the engine's
    `decode` for stop strings, so it finds them exactly where `ChoiceText` does."""
    silent = silent_ids(tokenizer)
    return tokenizer.decode_bytes(t for t in ids if t not in silent).decode("utf-8", errors="replace")


def _held_tail(text: str, patterns: Sequence[str]) -> int:
    """Length of the longest suffix of text that is a proper prefix of some pattern."""
    longest = min(len(text), max((len(p) for p in patterns), default=1) - 1)
    for k in range(longest, 0, -1):
        tail = text[-k:]
        if any(p.startswith(tail) for p in patterns):
            return k
    return 0


class StopMatcher:
    """Cuts a text stream before the first occurrence of any stop string."""

    def __init__(self, stops: Sequence[str]):
        self.stops = tuple(stops)
        self.pending = ""
        self.stopped = False

    def feed(self, text: str) -> str:
        """Text that is safe to emit now; sets `stopped` once a stop string has appeared."""
        if self.stopped:
            return ""
        if not self.stops:
            return text
        buf = self.pending + text
        # A match can only start inside `pending` or the new text: anything already emitted
        # was checked not to be the start of a stop string.
        hits = [i for i in (buf.find(s) for s in self.stops) if i >= 0]
        if hits:
            first = min(hits)
            # A stop string starting earlier may still be arriving ("</thin" while "ink" already
            # matched): it would win, so hold from its start until it completes or breaks off.
            earlier = next((j for j in range(first) if any(s.startswith(buf[j:]) for s in self.stops)), None)
            if earlier is None:
                self.stopped, self.pending = True, ""
                return buf[:first]
            self.pending = buf[earlier:]
            return buf[:earlier]
        hold = _held_tail(buf, self.stops)
        self.pending = buf[len(buf) - hold:]
        return buf[:len(buf) - hold]

    def flush(self) -> str:
        """The held-back tail at the end of the stream (cut at a stop string it may complete)."""
        buf, self.pending = self.pending, ""
        if self.stopped:
            return ""
        hits = [i for i in (buf.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.stopped = True
            return buf[:min(hits)]
        return buf


class ReasoningSplitter:
    """Routes text inside <think>...</think> to reasoning and the rest to content."""

    def __init__(self):
        self.in_think = False
        self.pending = ""

    def feed(self, text: str) -> tuple[str, str]:
        """(reasoning, content) deltas of text, tags removed."""
        reasoning: list[str] = []
        content: list[str] = []
        buf = self.pending + text
        while True:
            starts = [(i, tag) for tag in (THINK_TAG, END_THINK_TAG) if (i := buf.find(tag)) >= 0]
            if not starts:
                hold = _held_tail(buf, (THINK_TAG, END_THINK_TAG))
                (reasoning if self.in_think else content).append(buf[:len(buf) - hold])
                self.pending = buf[len(buf) - hold:]
                return "".join(reasoning), "".join(content)
            i, tag = min(starts)
            (reasoning if self.in_think else content).append(buf[:i])
            # A second <think> inside reasoning, or a stray </think> in content, is dropped:
            # it carries no text and switching on it would only be surprising.
            self.in_think = tag == THINK_TAG
            buf = buf[i + len(tag):]

    def flush(self) -> tuple[str, str]:
        out, self.pending = self.pending, ""
        return (out, "") if self.in_think else ("", out)


@dataclass(frozen=True)
class Delta:
    """What one batch of tokens adds to a choice."""

    reasoning: str = ""
    content: str = ""
    stopped: bool = False  # a stop string appeared; generation for this choice is over

    def __bool__(self) -> bool:
        return bool(self.reasoning or self.content)


class ChoiceText:
    """Incremental detokenizer for one choice: feed token ids, get reasoning/content deltas."""

    def __init__(self, tokenizer, *, stop: Sequence[str] = (), split_reasoning: bool = True):
        self.tokenizer = tokenizer
        self._bytes = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._silent = silent_ids(tokenizer)
        self._stop = StopMatcher(stop)
        self._split = ReasoningSplitter() if split_reasoning else None
        self.n_tokens = 0
        self.n_reasoning_tokens = 0
        self._held = 0  # tokens whose text is all in the splitter's hold-back
        self.reasoning = ""  # the whole text so far, for non-streaming responses
        self.content = ""

    @property
    def stopped(self) -> bool:
        return self._stop.stopped

    def token_text_bytes(self, token_id: int) -> bytes:
        return b"" if token_id in self._silent else self.tokenizer.token_bytes(token_id)

    def feed(self, token_ids: Iterable[int]) -> Delta:
        """Consume generated tokens up to a stop string; later ones are neither counted nor shown."""
        reasoning: list[str] = []
        content: list[str] = []
        for t in token_ids:
            if self.stopped:
                break
            self.n_tokens += 1
            was_thinking = self._split is not None and self._split.in_think
            text = self._stop.feed(self._bytes.decode(self.token_text_bytes(t)))
            self._route(text, reasoning, content)
            if self._split is not None:
                self._count_reasoning(t, was_thinking)
        return self._delta(reasoning, content)

    def _count_reasoning(self, token_id: int, was_thinking: bool):
        # A token is reasoning if it is a tag or the splitter is inside <think> before or after it.
        # A plain-text "<think>" spelled over several tokens sits in the splitter's hold-back until
        # its last piece: those earlier tokens (`_held`) are counted when the tag completes.
        now = self._split.in_think
        if was_thinking or now or token_id in (self.tokenizer.think_id, self.tokenizer.end_think_id):
            self.n_reasoning_tokens += 1 + (self._held if now and not was_thinking else 0)
        self._held = self._held + 1 if self._split.pending else 0

    def finish(self) -> Delta:
        """Release every held-back character; call once when the choice ends."""
        reasoning: list[str] = []
        content: list[str] = []
        if not self.stopped:
            tail = self._stop.feed(self._bytes.decode(b"", final=True))
            self._route(tail + self._stop.flush(), reasoning, content)
        if self._split is not None:
            r, c = self._split.flush()
            reasoning.append(r)
            content.append(c)
        return self._delta(reasoning, content)

    def _route(self, text: str, reasoning: list[str], content: list[str]):
        if not text:
            return
        if self._split is None:
            content.append(text)
        else:
            r, c = self._split.feed(text)
            reasoning.append(r)
            content.append(c)

    def _delta(self, reasoning: list[str], content: list[str]) -> Delta:
        d = Delta("".join(reasoning), "".join(content), self.stopped)
        self.reasoning += d.reasoning
        self.content += d.content
        return d

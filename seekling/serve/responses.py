"""OpenAI response objects: whole completions, stream chunks, usage, logprobs, and SSE framing.

Streams follow OpenAI's chat format chunk for chunk: each choice first gets a chunk whose delta
carries `role` (and empty content), then content deltas, then a chunk with an empty delta and the
`finish_reason`; with `stream_options.include_usage` every chunk has `"usage": null` and a last
chunk with no choices carries the usage; `data: [DONE]` ends the stream. Reasoning travels as
DeepSeek's API sends it, in `reasoning_content` next to `content` (in `delta` and in `message`).

Logprobs are the raw model's (log-softmax of the logits before temperature and truncation), as
OpenAI and vLLM report them. Tokens that are not valid UTF-8 on their own (a byte-level BPE piece
of a multi-byte character) show U+FFFD in `token`; `bytes` has the exact bytes.
Left out: `system_fingerprint` and `service_tier` (meaningless for a local model).
"""

from __future__ import annotations

import json
import secrets
import time
from dataclasses import dataclass, field

from seekling.serve.protocol import GenerationRequest
from seekling.serve.textstream import Delta

DONE = b"data: [DONE]\n\n"


def sse(obj: dict) -> bytes:
    """One server-sent event carrying a JSON object."""
    return b"data: " + json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"


def new_id(endpoint: str) -> str:
    return ("chatcmpl-" if endpoint == "chat" else "cmpl-") + secrets.token_hex(12)


@dataclass
class ChoiceResult:
    """Everything a finished choice returns in a non-streaming response."""

    index: int
    reasoning: str = ""
    content: str = ""
    finish_reason: str | None = None
    logprob_entries: list = field(default_factory=list)  # per token, already formatted


@dataclass
class Usage:
    prompt_tokens: int
    completion_tokens: int = 0
    reasoning_tokens: int = 0

    def as_dict(self) -> dict:
        d = {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
             "total_tokens": self.prompt_tokens + self.completion_tokens}
        if self.reasoning_tokens:
            d["completion_tokens_details"] = {"reasoning_tokens": self.reasoning_tokens}
        return d


class LogprobFormatter:
    """Turns (token id, logprob, top alternatives) into OpenAI's two logprob layouts."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def _text(self, token_id: int) -> tuple[str, list[int]]:
        b = self.tokenizer.token_bytes(token_id)
        return b.decode("utf-8", errors="replace"), list(b)

    def chat_entry(self, token_id: int, logprob: float, top: list[tuple[int, float]]) -> dict:
        text, raw = self._text(token_id)
        alts = []
        for tid, lp in top:
            t, r = self._text(tid)
            alts.append({"token": t, "logprob": lp, "bytes": r})
        return {"token": text, "logprob": logprob, "bytes": raw, "top_logprobs": alts}


def completion_logprobs(entries: list[dict], offset: int = 0) -> dict:
    """The legacy completions layout of chat-style entries; `offset` is the text length before them."""
    offsets = []
    for e in entries:
        offsets.append(offset)
        offset += len(e["token"])
    return {"tokens": [e["token"] for e in entries], "token_logprobs": [e["logprob"] for e in entries],
            # Alternatives that decode to the same string collapse in the dict; OpenAI's layout has the same limit.
            "top_logprobs": [{a["token"]: a["logprob"] for a in e["top_logprobs"]} for e in entries],
            "text_offset": offsets}


class ChunkMaker:
    """Stream chunks of one request (chat or completions) with a shared id and timestamp."""

    def __init__(self, req: GenerationRequest, request_id: str):
        self.req, self.id, self.created = req, request_id, int(time.time())
        self.chat = req.endpoint == "chat"
        self.text_offsets = [0] * req.n  # completions logprobs text_offset, per choice

    def _chunk(self, choices: list[dict]) -> dict:
        obj = {"id": self.id, "object": "chat.completion.chunk" if self.chat else "text_completion",
               "created": self.created, "model": self.req.model, "choices": choices}
        if self.req.include_usage:
            obj["usage"] = None
        return obj

    def role(self, index: int) -> bytes | None:
        """The first chunk of a chat choice; completions streams have no role chunk."""
        if not self.chat:
            return None
        return sse(self._chunk([{"index": index, "delta": {"role": "assistant", "content": ""},
                                 "logprobs": None, "finish_reason": None}]))

    def delta(self, index: int, d: Delta, entries: list[dict] | None) -> bytes | None:
        """A text chunk, or None when there is neither text nor logprobs to send."""
        if not d and not entries:
            return None
        if self.chat:
            delta = {}
            if d.reasoning:
                delta["reasoning_content"] = d.reasoning
            if d.content or not d.reasoning:
                delta["content"] = d.content
            lp = {"content": entries, "refusal": None} if entries is not None else None
            return sse(self._chunk([{"index": index, "delta": delta, "logprobs": lp, "finish_reason": None}]))
        lp = None
        if entries is not None:
            lp = completion_logprobs(entries, self.text_offsets[index])
            self.text_offsets[index] += sum(len(e["token"]) for e in entries)
        return sse(self._chunk([{"index": index, "text": d.content, "logprobs": lp, "finish_reason": None}]))

    def finish(self, index: int, reason: str) -> bytes:
        if self.chat:
            choice = {"index": index, "delta": {}, "logprobs": None, "finish_reason": reason}
        else:
            choice = {"index": index, "text": "", "logprobs": None, "finish_reason": reason}
        return sse(self._chunk([choice]))

    def usage(self, usage: Usage) -> bytes:
        obj = self._chunk([])
        obj["usage"] = usage.as_dict()
        return sse(obj)


def full_response(req: GenerationRequest, request_id: str, choices: list[ChoiceResult], usage: Usage) -> dict:
    """The non-streaming response body."""
    out = []
    for c in sorted(choices, key=lambda c: c.index):
        if req.endpoint == "chat":
            lp = {"content": c.logprob_entries, "refusal": None} if req.logprobs else None
            out.append({"index": c.index, "message": {"role": "assistant", "content": c.content,
                                                      "reasoning_content": c.reasoning or None, "refusal": None},
                        "logprobs": lp, "finish_reason": c.finish_reason})
        else:
            lp = completion_logprobs(c.logprob_entries) if req.logprobs else None
            out.append({"index": c.index, "text": c.content, "logprobs": lp, "finish_reason": c.finish_reason})
    return {"id": request_id, "object": "chat.completion" if req.endpoint == "chat" else "text_completion",
            "created": int(time.time()), "model": req.model, "choices": out, "usage": usage.as_dict()}

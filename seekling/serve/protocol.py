"""OpenAI request bodies -> validated generation requests, with a 400 that names any bad field.

Parameters, for both POST /v1/chat/completions and POST /v1/completions:

- Supported: model, messages (chat) / prompt (completions), max_tokens, max_completion_tokens
  (chat; wins over max_tokens), temperature, top_p, n, stop (string or up to 4 strings), seed,
  presence_penalty, frequency_penalty, stream, stream_options.include_usage; chat logprobs (bool)
  and top_logprobs (0-20); completions logprobs (int 0-20).
- Extensions, as vLLM names them: top_k, min_p, repetition_penalty, ignore_eos.
- Accepted and ignored (they change nothing a local model could honour): user, metadata, store,
  service_tier, safety_identifier, prompt_cache_key, prompt_cache_retention, reasoning_effort,
  verbosity, parallel_tool_calls, stream_options.include_obfuscation; and message "name".
- Accepted only at their no-op value, else a 400 naming them: tools and functions (empty),
  tool_choice and function_call ("none"), response_format ({"type": "text"}), logit_bias (empty),
  modalities (["text"]), audio, prediction, web_search_options (null); completions echo (false),
  best_of (equal to n), suffix (empty).
- Anything else is a 400 "Unrecognized request argument", as OpenAI answers. An explicit JSON
  null means "not given" for every optional field (the official client sends none, others do).

Prompts: a chat is rendered with the tokenizer's chat template (system and developer roles both
become the system turn; message content may be a string or a list of text parts). A completions
prompt string is encoded with special tokens parsed and a BOS put in front unless it starts with
one (the model saw BOS at every document start in training); a prompt of token ids is used as
given. Usage counts exactly those prompt ids once, however many choices (OpenAI's convention).

Seeds: choice i of a request with seed s samples with seed s + i, so n > 1 gives n different
completions and the same request always gives the same n.
Each choice's sampling is a plain dict in the engine's SamplingParams field names; `backend.py`
turns it into the engine's type, so this module knows OpenAI and nothing of the engine.
Left out: several prompts in one completions request, tool calling, JSON mode, logit bias.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

from seekling.serve.errors import APIError, bad_param

MAX_STOP = 4  # OpenAI's limit on stop sequences
MAX_TOP_LOGPROBS = 20  # OpenAI's limit on top_logprobs

_COMMON = {"model", "max_tokens", "temperature", "top_p", "n", "stop", "seed", "presence_penalty",
           "frequency_penalty", "stream", "stream_options", "logprobs", "top_k", "min_p",
           "repetition_penalty", "ignore_eos", "logit_bias", "user", "metadata", "store", "service_tier",
           "safety_identifier", "prompt_cache_key", "prompt_cache_retention"}
CHAT_FIELDS = _COMMON | {"messages", "max_completion_tokens", "top_logprobs", "reasoning_effort", "verbosity",
                         "parallel_tool_calls", "tools", "tool_choice", "functions", "function_call",
                         "response_format", "modalities", "audio", "prediction", "web_search_options"}
COMPLETION_FIELDS = _COMMON | {"prompt", "echo", "best_of", "suffix"}


@dataclass(frozen=True, kw_only=True)
class GenerationRequest:
    """One validated request: prompt ids, sampling options per choice, and how to answer."""

    endpoint: str  # "chat" or "completions"
    model: str
    prompt_ids: tuple[int, ...]
    choices: tuple[dict, ...]  # per choice: SamplingParams keyword arguments
    stream: bool = False
    include_usage: bool = False
    logprobs: bool = False
    top_logprobs: int = 0
    stop: tuple[str, ...] = ()

    def __post_init__(self):
        assert self.endpoint in ("chat", "completions") and self.prompt_ids and self.choices

    @property
    def n(self) -> int:
        return len(self.choices)

    @property
    def split_reasoning(self) -> bool:
        return self.endpoint == "chat"


@dataclass(frozen=True, kw_only=True)
class Limits:
    """What the loaded model and server allow; the parser checks requests against it."""

    model_name: str
    context: int  # most tokens one sequence may hold: prompt + completion
    vocab_size: int
    max_n: int = 8


# ---------------------------------------------------------------- field readers


class _Fields:
    """Typed access to a JSON object; each reader raises a 400 naming the field."""

    def __init__(self, body: Mapping, prefix: str = ""):
        self.body, self.prefix = body, prefix

    def name(self, key: str) -> str:
        return f"{self.prefix}{key}"

    def raw(self, key: str):
        return self.body.get(key)  # JSON null and absent are the same: "not given"

    def _type_error(self, key: str, want: str, v):
        return bad_param(self.name(key), f"expected {want}, got {_kind(v)}", code="invalid_type")

    def bool(self, key: str, default: bool) -> bool:
        v = self.raw(key)
        if v is None:
            return default
        if not isinstance(v, bool):
            raise self._type_error(key, "a boolean", v)
        return v

    def int(self, key: str, default, lo: int, hi: int | None = None):
        v = self.raw(key)
        if v is None:
            return default
        # 3.0 is an integer to JavaScript clients; 3.5 is not.
        if isinstance(v, float) and v.is_integer():
            v = int(v)
        if isinstance(v, bool) or not isinstance(v, int):
            raise self._type_error(key, "an integer", v)
        if v < lo or (hi is not None and v > hi):
            rng = f"at least {lo}" if hi is None else f"between {lo} and {hi}"
            raise bad_param(self.name(key), f"must be {rng}, got {v}")
        return v

    def num(self, key: str, default: float, lo: float, hi: float, *, lo_open: bool = False) -> float:
        v = self.raw(key)
        if v is None:
            return default
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise self._type_error(key, "a number", v)
        v = float(v)
        if not math.isfinite(v) or v > hi or v < lo or (lo_open and v == lo):
            raise bad_param(self.name(key), f"must be in {'(' if lo_open else '['}{lo:g}, {hi:g}], got {v:g}")
        return v


def _kind(v) -> str:
    if v is None:
        return "null"
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "an array",
            dict: "an object"}.get(type(v), type(v).__name__)


def _check_keys(body: Mapping, allowed: set[str]):
    for key in body:
        if key not in allowed:
            raise APIError(400, f"Unrecognized request argument supplied: {key}", param=key,
                           code="unknown_parameter")


def _check_noop(body: Mapping, key: str, ok, what: str):
    """A field we cannot honour is accepted only at its no-op value, else a 400 that says so."""
    v = body.get(key)
    if v is not None and not ok(v):
        raise bad_param(key, f"is not supported by this server; {what}", code="unsupported_parameter")


# ---------------------------------------------------------------- shared sampling fields


def _model(f: _Fields, limits: Limits) -> str:
    v = f.raw("model")
    if v is None:
        raise bad_param("model", f"is required; this server serves {limits.model_name!r}", code="missing_required")
    if not isinstance(v, str):
        raise f._type_error("model", "a string", v)
    if v != limits.model_name:
        raise APIError(404, f"The model {v!r} does not exist; this server serves {limits.model_name!r} "
                            "(see GET /v1/models)", param="model", code="model_not_found")
    return v


def _stop(f: _Fields) -> tuple[str, ...]:
    v = f.raw("stop")
    if v is None:
        return ()
    stops = [v] if isinstance(v, str) else v
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise f._type_error("stop", "a string or an array of strings", v)
    if len(stops) > MAX_STOP:
        raise bad_param("stop", f"at most {MAX_STOP} stop sequences, got {len(stops)}")
    if any(s == "" for s in stops):
        raise bad_param("stop", "stop sequences must be non-empty strings")
    return tuple(dict.fromkeys(stops))


def _stream(f: _Fields) -> tuple[bool, bool]:
    stream = f.bool("stream", False)
    opts = f.raw("stream_options")
    if opts is None:
        return stream, False
    if not isinstance(opts, dict):
        raise f._type_error("stream_options", "an object", opts)
    if not stream:
        raise bad_param("stream_options", "is only allowed when stream is true")
    of = _Fields(opts, "stream_options.")
    _check_keys_prefixed(opts, {"include_usage", "include_obfuscation"}, "stream_options.")
    of.bool("include_obfuscation", False)  # accepted, ignored: loopback needs no padding
    return stream, of.bool("include_usage", False)


def _check_keys_prefixed(body: Mapping, allowed: set[str], prefix: str):
    for key in body:
        if key not in allowed:
            raise APIError(400, f"Unrecognized request argument supplied: {prefix}{key}", param=f"{prefix}{key}",
                           code="unknown_parameter")


def _sampling(f: _Fields, *, max_tokens: int, stop_ids: tuple[int, ...], stop: tuple[str, ...],
              logprobs: int, n: int) -> tuple[dict, ...]:
    seed = f.int("seed", None, -(1 << 63), (1 << 63) - 1)
    ignore_eos = f.bool("ignore_eos", False)
    common = dict(
        max_tokens=max_tokens,
        temperature=f.num("temperature", 1.0, 0.0, 2.0),
        # top_p = 0 is legal for OpenAI and means "only the most likely token"; the sampler keeps
        # the top token whatever the threshold, so a tiny positive value is the same thing.
        top_p=max(f.num("top_p", 1.0, 0.0, 1.0), 1e-9),
        top_k=f.int("top_k", 0, 0),
        min_p=f.num("min_p", 0.0, 0.0, 1.0),
        presence_penalty=f.num("presence_penalty", 0.0, -2.0, 2.0),
        frequency_penalty=f.num("frequency_penalty", 0.0, -2.0, 2.0),
        repetition_penalty=f.num("repetition_penalty", 1.0, 0.0, 10.0, lo_open=True),
        ignore_eos=ignore_eos,
        # ignore_eos (benchmarks: fixed-length outputs) must also ignore the end-of-turn token.
        stop_token_ids=() if ignore_eos else stop_ids,
        stop=stop,
        logprobs=logprobs,
    )
    # Seeds wrap into torch's int64 range; the mapping is fixed, so determinism is kept.
    return tuple({**common, "seed": None if seed is None else (seed + i) % (1 << 63)} for i in range(n))


def _max_tokens(f: _Fields, key: str, default: int | None, prompt_len: int, limits: Limits) -> int:
    room = limits.context - prompt_len
    if room < 1:
        param = "messages" if "messages" in f.body else "prompt"
        raise APIError(400, f"{param}: the prompt is {prompt_len} tokens, but this model's context is "
                            f"{limits.context} tokens and at least one must be left to generate; shorten it",
                       param=param, code="context_length_exceeded")
    v = f.int(key, None, 1)
    if v is None:
        return room if default is None else min(default, room)
    if v > room:
        raise bad_param(key, f"{v} is too many: the prompt is {prompt_len} tokens and the context "
                             f"{limits.context}, so at most {room} can be generated", code="context_length_exceeded")
    return v


def _common_noops(body: Mapping):
    _check_noop(body, "logit_bias", lambda v: v == {}, "logit bias is not implemented")


# ---------------------------------------------------------------- chat


def _message_text(content, where: str, role: str) -> str:
    if content is None and role == "assistant":
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for j, part in enumerate(content):
            if not isinstance(part, dict) or not isinstance(part.get("type"), str):
                raise bad_param(f"{where}.content[{j}]", "each content part must be an object with a 'type'",
                                code="invalid_type")
            if part["type"] not in ("text", "input_text", "output_text"):
                raise bad_param(f"{where}.content[{j}].type", f"{part['type']!r} parts are not supported; "
                                "this model reads text only", code="unsupported_parameter")
            if not isinstance(part.get("text"), str):
                raise bad_param(f"{where}.content[{j}].text", "must be a string", code="invalid_type")
            parts.append(part["text"])
        return "".join(parts)
    raise bad_param(f"{where}.content", f"expected a string or an array of text parts, got {_kind(content)}",
                    code="invalid_type")


def _messages(body: Mapping) -> list[dict]:
    msgs = body.get("messages")
    if msgs is None:
        raise bad_param("messages", "is required: a non-empty array of {role, content} objects",
                        code="missing_required")
    if not isinstance(msgs, list):
        raise bad_param("messages", f"expected an array, got {_kind(msgs)}", code="invalid_type")
    if not msgs:
        raise bad_param("messages", "must contain at least one message", code="empty_array")
    out = []
    for i, m in enumerate(msgs):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise bad_param(where, f"expected an object with role and content, got {_kind(m)}", code="invalid_type")
        role = m.get("role")
        if role in ("tool", "function"):
            raise bad_param(f"{where}.role", f"{role!r} messages are not supported; this model has no tool calling",
                            code="unsupported_parameter")
        if role not in ("system", "developer", "user", "assistant"):
            raise bad_param(f"{where}.role", f"must be 'system', 'developer', 'user' or 'assistant', got {role!r}")
        for key in ("tool_calls", "function_call", "audio"):
            if m.get(key):
                raise bad_param(f"{where}.{key}", "is not supported; this model has no tool calling or audio",
                                code="unsupported_parameter")
        if "name" in m and m["name"] is not None and not isinstance(m["name"], str):
            raise bad_param(f"{where}.name", f"expected a string, got {_kind(m['name'])}", code="invalid_type")
        msg = {"role": "system" if role == "developer" else role,
               "content": _message_text(m.get("content"), where, role)}
        reasoning = m.get("reasoning_content")
        if reasoning is not None:
            if role != "assistant" or not isinstance(reasoning, str):
                raise bad_param(f"{where}.reasoning_content", "must be a string, on an assistant message only")
            msg["reasoning_content"] = reasoning
        out.append(msg)
    return out


def parse_chat(body: Mapping, limits: Limits, tokenizer) -> GenerationRequest:
    """Validate a /v1/chat/completions body and tokenize its messages."""
    _check_keys(body, CHAT_FIELDS)
    f = _Fields(body)
    model = _model(f, limits)
    messages = _messages(body)
    _common_noops(body)
    _check_noop(body, "tools", lambda v: v == [], "this model has no tool calling")
    _check_noop(body, "functions", lambda v: v == [], "this model has no tool calling")
    _check_noop(body, "tool_choice", lambda v: v == "none", "this model has no tool calling")
    _check_noop(body, "function_call", lambda v: v == "none", "this model has no tool calling")
    _check_noop(body, "response_format", lambda v: v == {"type": "text"}, "only {\"type\": \"text\"} is available")
    _check_noop(body, "modalities", lambda v: v == ["text"], "this model produces text only")
    for key in ("audio", "prediction", "web_search_options"):
        _check_noop(body, key, lambda v: False, "send null or leave it out")
    f.bool("parallel_tool_calls", True)
    stream, include_usage = _stream(f)
    logprobs = f.bool("logprobs", False)
    top = f.int("top_logprobs", 0, 0, MAX_TOP_LOGPROBS)
    if f.raw("top_logprobs") is not None and not logprobs:
        raise bad_param("top_logprobs", "needs logprobs set to true")
    n = f.int("n", 1, 1, limits.max_n)
    stop = _stop(f)
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    key = "max_completion_tokens" if f.raw("max_completion_tokens") is not None else "max_tokens"
    max_tokens = _max_tokens(f, key, None, len(prompt), limits)
    # A chat turn ends at end-of-turn; end-of-text also ends it (a model may emit either).
    stop_ids = (tokenizer.eot_id, tokenizer.eos_id)
    choices = _sampling(f, max_tokens=max_tokens, stop_ids=stop_ids, stop=stop, logprobs=top, n=n)
    return GenerationRequest(endpoint="chat", model=model, prompt_ids=tuple(prompt), choices=choices,
                             stream=stream, include_usage=include_usage, logprobs=logprobs, top_logprobs=top,
                             stop=stop)


# ---------------------------------------------------------------- completions


def _prompt_ids(body: Mapping, limits: Limits, tokenizer) -> list[int]:
    p = body.get("prompt")
    if p is None:
        raise bad_param("prompt", "is required: a string or an array of token ids", code="missing_required")
    # OpenAI allows a batch of prompts; one prompt per request keeps choices and usage simple.
    if isinstance(p, list) and p and isinstance(p[0], (str, list)):
        if len(p) != 1:
            raise bad_param("prompt", f"got {len(p)} prompts; this server takes one prompt per request",
                            code="unsupported_parameter")
        p = p[0]
    if isinstance(p, str):
        ids = tokenizer.encode(p, allow_special=True)
        return ids if ids[:1] == [tokenizer.bos_id] else [tokenizer.bos_id, *ids]
    if isinstance(p, list):
        if not p:
            raise bad_param("prompt", "an array of token ids must not be empty", code="empty_array")
        for i, t in enumerate(p):
            if isinstance(t, bool) or not isinstance(t, int):
                raise bad_param(f"prompt[{i}]", f"expected a token id (integer), got {_kind(t)}", code="invalid_type")
            if not 0 <= t < limits.vocab_size:
                raise bad_param(f"prompt[{i}]", f"token id {t} is outside the vocabulary 0..{limits.vocab_size - 1}")
        return list(p)
    raise bad_param("prompt", f"expected a string or an array of token ids, got {_kind(p)}", code="invalid_type")


def parse_completion(body: Mapping, limits: Limits, tokenizer) -> GenerationRequest:
    """Validate a /v1/completions body and tokenize its prompt."""
    _check_keys(body, COMPLETION_FIELDS)
    f = _Fields(body)
    model = _model(f, limits)
    prompt = _prompt_ids(body, limits, tokenizer)
    _common_noops(body)
    _check_noop(body, "echo", lambda v: v is False, "echo of the prompt is not implemented")
    _check_noop(body, "suffix", lambda v: v == "", "this model does not fill in the middle")
    n = f.int("n", 1, 1, limits.max_n)
    best_of = f.int("best_of", n, 1)
    if best_of != n:
        raise bad_param("best_of", f"only best_of equal to n ({n}) is supported, got {best_of}",
                        code="unsupported_parameter")
    stream, include_usage = _stream(f)
    top = f.int("logprobs", None, 0, MAX_TOP_LOGPROBS)
    stop = _stop(f)
    max_tokens = _max_tokens(f, "max_tokens", 16, len(prompt), limits)  # OpenAI's completions default
    choices = _sampling(f, max_tokens=max_tokens, stop_ids=(tokenizer.eos_id,), stop=stop, logprobs=top or 0, n=n)
    return GenerationRequest(endpoint="completions", model=model, prompt_ids=tuple(prompt), choices=choices,
                             stream=stream, include_usage=include_usage, logprobs=top is not None,
                             top_logprobs=top or 0, stop=stop)

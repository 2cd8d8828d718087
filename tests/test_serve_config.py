"""Server settings and request parsing without a server: validation errors name the field."""

import pytest

from seekling.inference.sampling import SamplingParams
from seekling.serve.config import ServeConfig
from seekling.serve.errors import APIError
from seekling.serve.protocol import Limits, parse_chat, parse_completion
from seekling.tokenizer import load_default_tokenizer

LIMITS = Limits(model_name="m", context=64, vocab_size=4096, max_n=4)
MSGS = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def tok():
    return load_default_tokenizer()


@pytest.mark.parametrize("field,value", [
    ("port", 70000), ("port", "80"), ("max_concurrency", 0), ("max_queue", -1), ("max_n", True),
    ("api_key", ""), ("model_name", ""), ("max_body_bytes", 0), ("torch_threads", 0), ("engine_options", [1]),
])
def test_serve_config_names_the_bad_field(field, value):
    with pytest.raises(ValueError, match=f"ServeConfig.{field}"):
        ServeConfig(model_dir="x", **{field: value})


def test_serve_config_defaults(tmp_path):
    cfg = ServeConfig(model_dir=tmp_path / "my-model", engine_options={"max_seqs": 8})
    assert cfg.served_name == "my-model" and cfg.host == "127.0.0.1" and cfg.threads >= 1
    assert cfg.engine_options == (("max_seqs", 8),)
    assert ServeConfig(model_dir="x", model_name="alias").served_name == "alias"


def test_ignored_and_noop_fields_are_accepted(tok):
    body = {"model": "m", "messages": MSGS, "user": "u", "metadata": {"a": "b"}, "store": True, "service_tier": "auto",
            "safety_identifier": "s", "prompt_cache_key": "k", "reasoning_effort": "high", "verbosity": "low",
            "parallel_tool_calls": False, "tools": [], "tool_choice": "none", "response_format": {"type": "text"},
            "modalities": ["text"], "logit_bias": {}, "audio": None, "prediction": None, "functions": [],
            "stream": True, "stream_options": {"include_usage": True, "include_obfuscation": False}}
    req = parse_chat(body, LIMITS, tok)
    assert req.stream and req.include_usage and req.n == 1
    assert req.prompt_ids == tuple(tok.apply_chat_template(MSGS))


def test_sampling_fields_reach_the_engine_params(tok):
    body = {"model": "m", "messages": MSGS, "temperature": 0, "top_p": 0, "n": 3, "seed": 5, "stop": "x",
            "presence_penalty": 1.5, "frequency_penalty": -1, "top_k": 7, "min_p": 0.1, "repetition_penalty": 1.2,
            "max_completion_tokens": 9, "max_tokens": 20, "logprobs": True, "top_logprobs": 3}
    req = parse_chat(body, LIMITS, tok)
    assert [c["seed"] for c in req.choices] == [5, 6, 7]  # choice i samples with seed + i
    p = SamplingParams(**req.choices[0])  # the engine accepts every choice as it is
    assert (p.temperature, p.top_k, p.min_p, p.repetition_penalty, p.max_tokens) == (0.0, 7, 0.1, 1.2, 9)
    assert 0 < p.top_p < 1e-6 and p.presence_penalty == 1.5 and p.frequency_penalty == -1
    assert p.stop == ("x",) and p.logprobs == 3 and req.logprobs and req.top_logprobs == 3
    assert p.stop_token_ids == (tok.eot_id, tok.eos_id)
    assert parse_chat({**body, "ignore_eos": True}, LIMITS, tok).choices[0]["stop_token_ids"] == ()


def test_defaults_fill_the_context(tok):
    req = parse_chat({"model": "m", "messages": MSGS}, LIMITS, tok)
    assert req.choices[0]["max_tokens"] == LIMITS.context - len(req.prompt_ids)
    c = parse_completion({"model": "m", "prompt": "hi"}, LIMITS, tok)
    assert c.choices[0]["max_tokens"] == 16 and c.prompt_ids[0] == tok.bos_id  # OpenAI's default, BOS in front
    assert c.choices[0]["stop_token_ids"] == (tok.eos_id,)
    assert parse_completion({"model": "m", "prompt": "<|begin_of_text|>hi"}, LIMITS, tok).prompt_ids == c.prompt_ids


@pytest.mark.parametrize("body,param,status", [
    ({"model": "m", "messages": MSGS, "max_tokens": 64}, "max_tokens", 400),  # prompt + 64 > context
    ({"model": "m", "messages": [{"role": "user", "content": "word " * 80}]}, "messages", 400),
    ({"model": "other", "messages": MSGS}, "model", 404),
    ({"model": "m", "messages": MSGS, "n": 5}, "n", 400),
    ({"model": "m", "messages": MSGS, "temperature": float("nan")}, "temperature", 400),
    ({"model": "m", "messages": MSGS, "seed": 2**64}, "seed", 400),
    ({"model": "m", "messages": [{"role": "user", "content": "x", "reasoning_content": "r"}]},
     "messages[0].reasoning_content", 400),
    ({"model": "m", "messages": [{"role": "assistant", "content": "x", "tool_calls": [{}]}]}, "messages[0].tool_calls",
     400),
])
def test_parse_errors(tok, body, param, status):
    with pytest.raises(APIError) as e:
        parse_chat(body, LIMITS, tok)
    assert (e.value.status, e.value.param) == (status, param)
    assert e.value.message.startswith(param) or status == 404

"""The OpenAI-compatible server end to end: the official client against uvicorn on loopback, real engine.

The main server runs a scripted model (seekling.serve.testing): after the chat template's
<|assistant|> it writes a plain-text "<think>" (four ordinary tokens), reasoning, the special
</think> token, an answer and <|end_of_turn|>; anywhere else its output is random. So chat
answers are exact and checkable, and completions of ordinary text are random, for seeds and n.
"""

import json
import socket
import threading
import time

import httpx2
import openai
import pytest

from seekling.serve import create_app
from seekling.serve.testing import ServerThread, StepGate, save_scripted_model
from seekling.tokenizer import load_default_tokenizer

REASONING, ANSWER = "The user said hi.", " Hello there!"
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def tok():
    return load_default_tokenizer()


@pytest.fixture(scope="module")
def script(tok):
    return [*tok.encode("<think>"), *tok.encode(REASONING), tok.end_think_id, *tok.encode(ANSWER), tok.eot_id]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tok, script):
    return save_scripted_model(tmp_path_factory.mktemp("serve") / "scripted", script, after=tok.role_ids["assistant"])


@pytest.fixture(scope="module")
def server(model_dir):
    with ServerThread(create_app(model_dir, model_name="seekling-test")) as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def health(server) -> dict:
    return httpx2.get(server.url + "/health").json()


def wait_for(cond, what: str, timeout: float = 30.0):
    """Poll until cond() holds; the timeout only turns a hang into a failure, it asserts no speed."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def assert_idle(server):
    wait_for(lambda: health(server)["requests_generating"] == 0, "all requests to finish")
    h = health(server)
    assert h["kv_blocks_used"] == 0 and h["sequences_running"] == 0 and h["sequences_queued"] == 0, h


def assert_error(r: httpx2.Response, status: int, param=None):
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    if param is not None:
        assert body["error"]["param"] == param, body
    return body["error"]


# ---------------------------------------------------------------- happy paths


def test_models_and_health(server, client):
    assert [m.id for m in client.models.list().data] == ["seekling-test"]
    assert client.models.retrieve("seekling-test").id == "seekling-test"
    h = health(server)
    assert h["status"] == "ok" and h["kv_blocks_total"] > 0


def test_chat_reasoning_content_and_usage(client, tok, script):
    r = client.chat.completions.create(model="seekling-test", messages=MESSAGES)
    msg = r.choices[0].message
    assert msg.role == "assistant"
    assert msg.reasoning_content == REASONING and msg.content == ANSWER
    assert r.choices[0].finish_reason == "stop" and r.object == "chat.completion"
    assert r.usage.prompt_tokens == len(tok.apply_chat_template(MESSAGES, add_generation_prompt=True))
    assert r.usage.completion_tokens == len(script)  # the end-of-turn token is generated too
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert r.usage.completion_tokens_details.reasoning_tokens == len(tok.encode("<think>" + REASONING)) + 1


def test_chat_stream_chunks_are_openai_shaped(server, script):
    body = {"model": "seekling-test", "messages": MESSAGES, "stream": True, "stream_options": {"include_usage": True}}
    with httpx2.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        raw = "".join(r.iter_text())
    events = [e for e in raw.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"
    chunks = [json.loads(e[6:]) for e in events[:-1]]
    assert len({c["id"] for c in chunks}) == 1 and all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    *body_chunks, finish, usage = chunks
    assert finish["choices"][0]["finish_reason"] == "stop" and finish["choices"][0]["delta"] == {}
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == len(script)
    assert all(c["usage"] is None for c in chunks[:-1])
    deltas = [c["choices"][0]["delta"] for c in body_chunks[1:]]
    assert "".join(d.get("reasoning_content", "") for d in deltas) == REASONING
    assert "".join(d.get("content") or "" for d in deltas) == ANSWER
    # the tag arrived as four tokens; none of its pieces may leak into either field
    assert not any(frag in json.dumps(deltas) for frag in ("<", "ink>", "think"))
    assert len(deltas) > 5  # streamed token by token, not in one piece


def test_openai_client_stream_with_usage(client):
    stream = client.chat.completions.create(model="seekling-test", messages=MESSAGES, stream=True,
                                            stream_options={"include_usage": True})
    reasoning, content, usage, finish = "", "", None, None
    for chunk in stream:
        if chunk.usage:
            usage = chunk.usage
        for c in chunk.choices:
            reasoning += getattr(c.delta, "reasoning_content", None) or ""
            content += c.delta.content or ""
            finish = c.finish_reason or finish
    assert (reasoning, content, finish) == (REASONING, ANSWER, "stop")
    assert usage.completion_tokens > 0


def test_n_choices(client, tok):
    r = client.chat.completions.create(model="seekling-test", messages=MESSAGES, n=3)
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert all(c.message.content == ANSWER for c in r.choices)
    single = client.chat.completions.create(model="seekling-test", messages=MESSAGES).usage
    assert r.usage.prompt_tokens == single.prompt_tokens  # the prompt is counted once
    assert r.usage.completion_tokens == 3 * single.completion_tokens
    c = client.completions.create(model="seekling-test", prompt="To be or not", n=3, max_tokens=12, seed=3,
                                  temperature=1.0, extra_body={"ignore_eos": True})
    assert len({ch.text for ch in c.choices}) == 3  # seeds s, s+1, s+2: different samples
    assert c.usage.completion_tokens == 3 * 12


def test_n_choices_streaming(server):
    body = {"model": "seekling-test", "messages": MESSAGES, "stream": True, "n": 2}
    with httpx2.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=60) as r:
        chunks = [json.loads(e[6:]) for e in "".join(r.iter_text()).split("\n\n") if e and e != "data: [DONE]"]
    for i in range(2):
        mine = [c["choices"][0] for c in chunks if c["choices"] and c["choices"][0]["index"] == i]
        assert mine[0]["delta"]["role"] == "assistant" and mine[-1]["finish_reason"] == "stop"
        assert "".join(m["delta"].get("content") or "" for m in mine) == ANSWER


def test_stop_strings(client, server, tok):
    r = client.chat.completions.create(model="seekling-test", messages=MESSAGES, stop=[" there", "zzz"])
    assert r.choices[0].message.content == " Hello" and r.choices[0].finish_reason == "stop"
    assert r.choices[0].message.reasoning_content == REASONING
    full = client.chat.completions.create(model="seekling-test", messages=MESSAGES).usage.completion_tokens
    # generation ends at the token that completed the stop string: " there" and "!" + eot are not generated
    assert r.usage.completion_tokens == full - 2
    s = client.chat.completions.create(model="seekling-test", messages=MESSAGES, stop="llo", stream=True)
    content = "".join(c.choices[0].delta.content or "" for c in s if c.choices)
    assert content == " He"
    assert_idle(server)


def test_max_tokens_truncates(client):
    for key in ("max_tokens", "max_completion_tokens"):
        r = client.chat.completions.create(model="seekling-test", messages=MESSAGES, **{key: 6})
        assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 6
        assert r.choices[0].message.reasoning_content == "The us"  # '<','th','ink','>','The',' us'
        assert r.choices[0].message.content == ""


def test_seed_determinism(client):
    def sample(seed):
        return client.completions.create(model="seekling-test", prompt="Once upon", max_tokens=16, temperature=1.0,
                                         seed=seed).choices[0].text

    first = sample(7)
    assert sample(7) == first
    assert sample(8) != first
    # the same seed gives the same text when the request shares its batch with others
    results = {}
    threads = [threading.Thread(target=lambda i=i: results.__setitem__(i, sample(7))) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert set(results.values()) == {first}


def test_logprobs(client, tok, script):
    r = client.chat.completions.create(model="seekling-test", messages=MESSAGES, logprobs=True, top_logprobs=2)
    entries = r.choices[0].logprobs.content
    assert len(entries) == len(script)
    assert [e.token for e in entries[:4]] == ["<", "th", "ink", ">"]
    assert all(len(e.top_logprobs) == 2 and e.logprob <= 0 for e in entries)
    assert entries[0].top_logprobs[0].token == "<"  # the script is the argmax
    assert bytes(entries[1].bytes) == b"th"
    c = client.completions.create(model="seekling-test", prompt="Hello", max_tokens=5, logprobs=3)
    lp = c.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 5
    assert all(len(t) <= 3 for t in lp.top_logprobs) and lp.text_offset[0] == 0


def test_completions_stream(server, tok):
    body = {"model": "seekling-test", "prompt": "Hello", "max_tokens": 7, "stream": True,
            "stream_options": {"include_usage": True}}
    with httpx2.stream("POST", server.url + "/v1/completions", json=body, timeout=60) as r:
        events = [e for e in "".join(r.iter_text()).split("\n\n") if e]
    assert events[-1] == "data: [DONE]"
    chunks = [json.loads(e[6:]) for e in events[:-1]]
    assert all(c["object"] == "text_completion" for c in chunks)
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"
    n_prompt = 1 + len(tok.encode("Hello"))  # BOS + "Hello"
    assert chunks[-1]["usage"] == {"prompt_tokens": n_prompt, "completion_tokens": 7, "total_tokens": n_prompt + 7}


def test_token_id_prompt_and_content_parts(client, tok):
    ids = tok.apply_chat_template(MESSAGES, add_generation_prompt=True)
    r = client.completions.create(model="seekling-test", prompt=ids, max_tokens=40)
    # Raw text keeps the tags; end-of-turn is silent and does not stop a completion (only
    # end-of-text does), so random text follows.
    assert r.choices[0].text.startswith("<think>" + REASONING + "</think>" + ANSWER)
    assert r.usage.prompt_tokens == len(ids) and r.choices[0].finish_reason == "length"
    parts = [{"role": "developer", "content": [{"type": "text", "text": "Be "}, {"type": "text", "text": "brief."}]},
             {"role": "user", "content": "hi", "name": "ann"}]
    r = client.chat.completions.create(model="seekling-test", messages=parts, user="ann", metadata={"k": "v"},
                                       store=False)
    assert r.usage.prompt_tokens == len(ids) and r.choices[0].message.content == ANSWER


def test_requests_share_forward_passes(server, client):
    before = health(server)["engine_steps"]
    n_req, n_tok = 8, 60

    def one():
        client.completions.create(model="seekling-test", prompt="Once", max_tokens=n_tok, extra_body={"ignore_eos": True})

    threads = [threading.Thread(target=one) for _ in range(n_req)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    steps = health(server)["engine_steps"] - before
    assert steps < n_req * n_tok / 2, f"{steps} engine steps for {n_req * n_tok} tokens: requests were not batched"


# ---------------------------------------------------------------- errors


LONG = "word " * 400  # ~400 tokens against a 256-token context


@pytest.mark.parametrize("path,body,status,param", [
    ("/v1/chat/completions", {"model": "seekling-test"}, 400, "messages"),
    ("/v1/chat/completions", {"model": "seekling-test", "messages": []}, 400, "messages"),
    ("/v1/chat/completions", {"model": "seekling-test", "messages": "hi"}, 400, "messages"),
    ("/v1/chat/completions", {"model": "nope", "messages": MESSAGES}, 404, "model"),
    ("/v1/chat/completions", {"messages": MESSAGES}, 400, "model"),
    ("/v1/chat/completions", {"model": 3, "messages": MESSAGES}, 400, "model"),
    ("/v1/chat/completions", {"model": "seekling-test", "messages": MESSAGES, "temperature": "hot"}, 400, "temperature"),
    ("/v1/chat/completions", {"model": "seekling-test", "messages": MESSAGES, "temperature": 3}, 400, "temperature"),
    ("/v1/chat/completions", {"model": "seekling-test", "messages": MESSAGES, "max_tokens": 0}, 400, "max_tokens"),
    ("/v1/chat/completions", {"model": "seekling-test", "messages": MESSAGES, "max_tokens": -3}, 400, "max_tokens"),
    ("/v1/chat/completions", {"model": "seekling-test", "messages": MESSAGES, "max_tokens": 1.5}, 400, "max_tokens"),
    ("/v1/chat/completions", {"model": "seekling-test", "messages": MESSAGES, "max_tokens": 10**6}, 400, "max_tokens"),
    ("/v1/chat/completions", {"model": "seekling-test", "messages": MESSAGES, "max_completion_tokens": 0}, 400,
     "max_completion_tokens"),
    ("/v1/chat/completions", {"model": "seekling-test", "messages": [{"role": "user", "content": LONG}]}, 400,
     "messages"),
    ("/v1/completions", {"model": "seekling-test", "prompt": LONG}, 400, "prompt"),
    ("/v1/completions", {"model": "seekling-test", "prompt": [1, 2, 99999]}, 400, "prompt[2]"),
    ("/v1/completions", {"model": "seekling-test", "prompt": []}, 400, "prompt"),
    ("/v1/completions", {"model": "seekling-test", "prompt": ["a", "b"]}, 400, "prompt"),
    ("/v1/completions", {"model": "seekling-test"}, 400, "prompt"),
    ("/v1/completions", {"model": "seekling-test", "prompt": "x", "echo": True}, 400, "echo"),
    ("/v1/completions", {"model": "seekling-test", "prompt": "x", "best_of": 3}, 400, "best_of"),
    ("/v1/completions", {"model": "seekling-test", "prompt": "x", "logprobs": 50}, 400, "logprobs"),
    ("/v1/chat/completions", {"model": "seekling-test", "messages": MESSAGES, "foo": 1}, 400, "foo"),
    ("/v1/chat/completions", {"model": "seekling-test", "messages": MESSAGES, "tools": [{"type": "function"}]}, 400,
     "tools"),
    ("/v1/chat/completions", {"model": "seekling-test", "messages": MESSAGES, "response_format": {"type": "json_object"}},
     400, "response_format"),
    ("/v1/chat/completions", {"model": "seekling-test", "messages": MESSAGES, "logit_bias": {"5": 1}}, 400, "logit_bias"),
    ("/v1/chat/completions", {"model": "seekling-test", "messages": MESSAGES, "top_logprobs": 2}, 400, "top_logprobs"),
    ("/v1/chat/completions", {"model": "seekling-test", "messages": MESSAGES, "stream_options": {"include_usage": True}},
     400, "stream_options"),
    ("/v1/chat/completions", {"model": "seekling-test", "messages": MESSAGES, "stream": True,
                              "stream_options": {"bogus": True}}, 400, "stream_options.bogus"),
    ("/v1/chat/completions", {"model": "seekling-test", "messages": MESSAGES, "n": 99}, 400, "n"),
    ("/v1/chat/completions", {"model": "seekling-test", "messages": MESSAGES, "stream": "yes"}, 400, "stream"),
    ("/v1/chat/completions", {"model": "seekling-test", "messages": MESSAGES, "stop": ["a", "b", "c", "d", "e"]}, 400,
     "stop"),
    ("/v1/chat/completions", {"model": "seekling-test", "messages": MESSAGES, "stop": [""]}, 400, "stop"),
    ("/v1/chat/completions", {"model": "seekling-test", "messages": MESSAGES, "seed": "x"}, 400, "seed"),
    ("/v1/chat/completions", {"model": "seekling-test", "messages": [{"role": "tool", "content": "x"}]}, 400,
     "messages[0].role"),
    ("/v1/chat/completions", {"model": "seekling-test", "messages": [{"role": "user", "content": 5}]}, 400,
     "messages[0].content"),
    ("/v1/chat/completions", {"model": "seekling-test", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
     400, "messages[0].content[0].type"),
    ("/v1/chat/completions", {"model": "seekling-test", "messages": [{"role": "user"}]}, 400, "messages[0].content"),
    ("/v1/chat/completions", {"model": "seekling-test", "messages": ["hi"]}, 400, "messages[0]"),
])
def test_bad_requests_are_4xx_with_openai_error_shape(server, path, body, status, param):
    assert_error(httpx2.post(server.url + path, json=body), status, param)


@pytest.mark.parametrize("content,ctype", [
    (b'{"model": "seekling-test", "messages": [', "application/json"),
    (b"[1, 2]", "application/json"),
    (b"", "application/json"),
    (b"\xff\xfe\x00garbage", "application/json"),
    (b"model=x", "application/x-www-form-urlencoded"),
    (b"[" * 100000 + b"]" * 100000, "application/json"),
])
def test_malformed_bodies(server, content, ctype):
    r = httpx2.post(server.url + "/v1/chat/completions", content=content, headers={"content-type": ctype})
    assert_error(r, 400)


def test_oversized_body_is_413(server):
    big = {"model": "seekling-test", "messages": [{"role": "user", "content": "x" * (2 << 20)}]}
    assert_error(httpx2.post(server.url + "/v1/chat/completions", json=big), 413)

    def chunks():  # no Content-Length: the limit must hold while reading
        for _ in range(40):
            yield b" " * 65536

    r = httpx2.post(server.url + "/v1/chat/completions", content=chunks(), headers={"content-type": "application/json"})
    assert_error(r, 413)


def test_routing_errors_are_json(server):
    assert_error(httpx2.get(server.url + "/v1/nothing"), 404)
    assert_error(httpx2.get(server.url + "/v1/chat/completions"), 405)
    assert_error(httpx2.get(server.url + "/v1/models/other"), 404, "model")


def test_openai_client_sees_typed_errors(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="seekling-test", messages=MESSAGES, max_tokens=0)
    assert e.value.body["param"] == "max_tokens"
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4o", messages=MESSAGES)


# ---------------------------------------------------------------- disconnects


def test_stream_disconnect_cancels_and_frees_blocks(server):
    before = health(server)["sequences_cancelled"]
    body = {"model": "seekling-test", "prompt": "Once", "max_tokens": 200, "ignore_eos": True, "stream": True}
    with StepGate(server.app.state.backend) as gate:
        gate.allow(4)
        with httpx2.stream("POST", server.url + "/v1/completions", json=body, timeout=60) as r:
            lines = (line for line in r.iter_lines() if line)
            assert all(next(lines).startswith("data: {") for _ in range(3))
            assert health(server)["kv_blocks_used"] > 0
        # leaving the block closed the connection mid-stream; the gate keeps the request from finishing
        wait_for(lambda: health(server)["sequences_cancelled"] == before + 1, "the stream to be cancelled")
    assert_idle(server)


def test_non_stream_disconnect_cancels(server):
    before = health(server)["sequences_cancelled"]
    body = json.dumps({"model": "seekling-test", "prompt": "Once", "max_tokens": 240, "ignore_eos": True, "n": 2})
    with StepGate(server.app.state.backend) as gate:
        s = socket.create_connection(("127.0.0.1", server.port))
        s.sendall(f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  f"Content-Length: {len(body)}\r\n\r\n{body}".encode())
        wait_for(lambda: health(server)["sequences_queued"] + health(server)["sequences_running"] == 2,
                 "the request to reach the engine")
        gate.allow(3)
        s.close()
        wait_for(lambda: health(server)["sequences_cancelled"] == before + 2, "cancellation")
    assert_idle(server)


# ---------------------------------------------------------------- auth and admission


@pytest.fixture(scope="module")
def small_server(model_dir):
    app = create_app(model_dir, model_name="seekling-test", api_key="sk-secret", max_concurrency=1, max_queue=1)
    with ServerThread(app) as s:
        yield s


def test_api_key(small_server):
    body = {"model": "seekling-test", "prompt": "x", "max_tokens": 2}
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "sk-secret"}):
        e = assert_error(httpx2.post(small_server.url + "/v1/completions", json=body, headers=headers), 401)
        assert e["code"] == "invalid_api_key"
    assert_error(httpx2.get(small_server.url + "/v1/models"), 401)
    bad = openai.OpenAI(base_url=small_server.url + "/v1", api_key="nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    good = openai.OpenAI(base_url=small_server.url + "/v1", api_key="sk-secret", max_retries=0)
    assert good.completions.create(model="seekling-test", prompt="x", max_tokens=2).usage.completion_tokens == 2
    assert httpx2.get(small_server.url + "/health").status_code == 200  # health and the page stay open
    assert httpx2.get(small_server.url + "/").status_code == 200


def test_queue_bound_gives_429(small_server):
    auth = {"Authorization": "Bearer sk-secret"}
    url = small_server.url + "/v1/completions"
    holder = {"model": "seekling-test", "messages": MESSAGES, "stream": True}
    queued_result = {}

    def queued():
        r = httpx2.post(url, json={"model": "seekling-test", "prompt": "x", "max_tokens": 3}, headers=auth, timeout=60)
        queued_result["status"] = r.status_code

    with StepGate(small_server.app.state.backend) as gate:
        with httpx2.stream("POST", small_server.url + "/v1/chat/completions", json=holder, headers=auth,
                           timeout=60) as first:
            lines = first.iter_lines()  # keep a reference: a collected iterator closes the connection
            assert '"role":"assistant"' in next(lines)  # admitted: it holds the only slot
            t = threading.Thread(target=queued)
            t.start()
            wait_for(lambda: health(small_server)["requests_waiting"] == 1, "the second request to queue")
            e = assert_error(httpx2.post(url, json={"model": "seekling-test", "prompt": "x"}, headers=auth), 429)
            assert e["code"] == "rate_limit_exceeded"
            client = openai.OpenAI(base_url=small_server.url + "/v1", api_key="sk-secret", max_retries=0)
            with pytest.raises(openai.RateLimitError):
                client.completions.create(model="seekling-test", prompt="x", max_tokens=1)
            gate.open()
            assert [line for line in lines if line][-1] == "data: [DONE]"
    t.join(timeout=60)
    assert queued_result["status"] == 200  # the queued request ran once the slot came free
    assert_idle(small_server)


def test_engine_failure_is_a_clean_500_and_the_server_recovers(server, client):
    engine = server.app.state.backend.engine
    real_step = engine.step

    def broken_step():
        del engine.step  # fail once, then the real step again
        raise RuntimeError("simulated engine bug")

    engine.step = broken_step
    r = httpx2.post(server.url + "/v1/chat/completions", json={"model": "seekling-test", "messages": MESSAGES})
    assert assert_error(r, 500)["code"] == "engine_error"
    engine.step = broken_step
    body = {"model": "seekling-test", "messages": MESSAGES, "stream": True}
    with httpx2.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=60) as s:
        events = [e for e in "".join(s.iter_text()).split("\n\n") if e]
    assert s.status_code == 200 and events[-1] == "data: [DONE]"
    assert json.loads(events[-2][6:])["error"]["code"] == "engine_error"  # in-stream error, as OpenAI sends
    assert engine.step == real_step
    assert client.chat.completions.create(model="seekling-test", messages=MESSAGES).choices[0].message.content == ANSWER
    assert_idle(server)


def test_request_that_can_never_fit_the_cache_is_400(model_dir):
    app = create_app(model_dir, model_name="seekling-test", engine_options={"kv_cache_tokens": 64, "block_size": 16})
    with ServerThread(app) as s:
        body = {"model": "seekling-test", "prompt": "Once", "max_tokens": 100}
        e = assert_error(httpx2.post(s.url + "/v1/completions", json=body), 400)
        assert "never fit" in e["message"]
        body["max_tokens"] = 20  # fits: the same server still answers
        assert httpx2.post(s.url + "/v1/completions", json=body).status_code == 200
        assert_idle(s)

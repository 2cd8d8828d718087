"""Bounded load on loopback: many concurrent streaming clients, some of which hang up mid-stream.

Asserts correctness under load, never speed: every request answers 200 with a well-formed
stream ending in [DONE], nothing is logged as an error, and afterwards no request, sequence or
cache block is left behind. The default run is short; the @slow one runs a minute with 64 clients.
"""

import asyncio
import json
import logging
import random
import time

import httpx2
import pytest

from seekling.serve import create_app
from seekling.serve.testing import ServerThread, save_random_model


class _Errors(logging.Handler):
    def __init__(self):
        super().__init__(level=logging.ERROR)
        self.records = []

    def emit(self, record):
        self.records.append(record)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    model_dir = save_random_model(tmp_path_factory.mktemp("load") / "random")
    errors = _Errors()
    loggers = [logging.getLogger(n) for n in ("seekling.serve", "uvicorn.error", "uvicorn")]
    for lg in loggers:
        lg.addHandler(errors)
    try:
        with ServerThread(create_app(model_dir, model_name="rand", max_concurrency=32, max_queue=256)) as s:
            s.errors = errors
            yield s
    finally:
        for lg in loggers:
            lg.removeHandler(errors)


async def _one_request(client: httpx2.AsyncClient, rng: random.Random, stats: dict):
    chat = rng.random() < 0.6
    body = {"model": "rand", "max_tokens": rng.randint(1, 40), "temperature": rng.choice([0.0, 0.7, 1.0]),
            "stream": rng.random() < 0.85, "n": 2 if rng.random() < 0.1 else 1}
    if rng.random() < 0.3:
        body["seed"] = rng.randint(0, 100)
    if chat:
        body["messages"] = [{"role": "user", "content": rng.choice(["hi", "tell me a tale", "to be or not"])}]
    else:
        body["prompt"] = rng.choice(["Once upon a time", "KING:", "The"])
    if body["stream"]:
        body["stream_options"] = {"include_usage": True}
    hang_up = body["stream"] and rng.random() < 0.1
    path = "/v1/chat/completions" if chat else "/v1/completions"
    if not body["stream"]:
        r = await client.post(path, json=body)
        stats["status"][r.status_code] = stats["status"].get(r.status_code, 0) + 1
        if r.status_code == 200:
            stats["tokens"] += r.json()["usage"]["completion_tokens"]
        return
    async with client.stream("POST", path, json=body) as r:
        stats["status"][r.status_code] = stats["status"].get(r.status_code, 0) + 1
        if r.status_code != 200:
            return
        events = []
        async for line in r.aiter_lines():
            if not line:
                continue
            assert line.startswith("data: "), line
            events.append(line[6:])
            if hang_up and len(events) == 2:
                stats["hung_up"] += 1
                return  # leaving the block closes the connection mid-stream
        assert events[-1] == "[DONE]", events[-3:]
        chunks = [json.loads(e) for e in events[:-1]]
        assert not any("error" in c for c in chunks), chunks
        finishes = [ch["finish_reason"] for c in chunks for ch in c["choices"] if ch["finish_reason"]]
        assert len(finishes) == body["n"] and set(finishes) <= {"stop", "length"}
        stats["tokens"] += chunks[-1]["usage"]["completion_tokens"]


async def _load(url: str, clients: int, seconds: float, seed: int = 0) -> dict:
    stats = {"status": {}, "tokens": 0, "hung_up": 0, "requests": 0}
    deadline = time.monotonic() + seconds  # bounds the run's length; nothing asserts on time

    async def worker(i):
        rng = random.Random(seed * 1000 + i)
        while time.monotonic() < deadline:
            await _one_request(http, rng, stats)
            stats["requests"] += 1

    limits = httpx2.Limits(max_connections=clients + 8, max_keepalive_connections=clients + 8)
    async with httpx2.AsyncClient(base_url=url, timeout=120, limits=limits) as http:
        await asyncio.gather(*(worker(i) for i in range(clients)))
    return stats


def _run_and_check(server, clients: int, seconds: float):
    stats = asyncio.run(_load(server.url, clients, seconds))
    print(f"load: {stats}")
    assert stats["requests"] >= clients and set(stats["status"]) == {200}, stats
    assert stats["tokens"] > 0 and stats["hung_up"] > 0, stats
    deadline = time.monotonic() + 30
    while httpx2.get(server.url + "/health").json()["requests_generating"] and time.monotonic() < deadline:
        time.sleep(0.05)
    h = httpx2.get(server.url + "/health").json()
    assert h["requests_generating"] == 0 and h["requests_waiting"] == 0, h
    assert h["sequences_running"] == 0 and h["sequences_queued"] == 0, h
    assert h["kv_blocks_used"] == 0 and h["kv_blocks_free"] == h["kv_blocks_total"], h
    assert h["sequences_cancelled"] >= 1, h  # the hang-ups were cancelled, not run to the end
    backend = server.app.state.backend
    backend.engine.cache.check()  # every block free or owned once: nothing leaked or double-freed
    assert not backend.engine._requests, "the engine still remembers finished requests"
    assert not server.errors.records, [r.getMessage() for r in server.errors.records]


def test_load_48_streaming_clients(server):
    _run_and_check(server, clients=48, seconds=12)


@pytest.mark.slow
def test_load_64_clients_one_minute(server):
    _run_and_check(server, clients=64, seconds=60)

"""Fixtures for the server's tests and benchmark: tiny model directories and a server in a thread.

`save_random_model` writes a small random DeepSeek-V3-layout model with the default tokenizer:
the shape of a trained checkpoint, at a size that decodes in milliseconds on a CPU.

`save_scripted_model` writes one whose greedy (and, in practice, sampled) continuation of a given
token is a fixed script, e.g. `<think>` reasoning `</think>` answer `<|end_of_turn|>` after the
chat template's `<|assistant|>`, so end-to-end tests can assert exact reasoning and content
through the real engine. It works by making the network a lookup table: every block's output
projections are zero, so the final hidden state is norm(embedding); each script token's embedding
is its own basis vector, and the head row of its successor points along it. Other tokens embed
away from those basis vectors, so text that is not on the script stays random.

`ServerThread` runs uvicorn on a pre-bound loopback socket (no port race) in a daemon thread.
Left out: a mock engine; the tests drive the real one, which is the point of testing a server.
"""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

import torch
import uvicorn

from seekling.checkpoint import save
from seekling.model.transformer import Transformer
from seekling.presets import tiny
from seekling.tokenizer import load_default_tokenizer

TEST_DIMS = dict(n_layers=2, dim=64, inter_dim=128, n_heads=2, kv_lora_rank=32, qk_nope_head_dim=16,
                 qk_rope_head_dim=8, v_head_dim=16, moe_inter_dim=32, n_routed_experts=4, n_activated_experts=2,
                 max_seq_len=256, original_seq_len=256, n_mtp_layers=0)


def save_random_model(out_dir, *, seed: int = 0, **changes) -> Path:
    """A random model (tiny preset with `changes`, default TEST_DIMS) plus the default tokenizer."""
    model = Transformer(tiny().replace(**(changes or TEST_DIMS)))
    model.init_weights(seed=seed)
    save(model, out_dir)
    load_default_tokenizer().save(out_dir)
    return Path(out_dir)


@torch.no_grad()
def save_scripted_model(out_dir, script: list[int], *, after: int, seed: int = 0) -> Path:
    """A model that continues token `after` with `script` (tokens must be distinct, at most dim-1)."""
    chain = [after, *script]
    model = Transformer(tiny().replace(**TEST_DIMS))
    model.init_weights(seed=seed)
    D = model.cfg.dim
    if len(set(chain)) != len(chain) or len(chain) >= D:
        raise ValueError(f"script tokens must be distinct and fewer than dim ({D}), got {chain}")
    for name, p in model.named_parameters():
        if name.endswith(("attn.wo.weight", "w2", "w2.weight")):
            p.zero_()
    K = len(chain)
    emb, head = model.embed.weight, model.head.weight
    emb[:, :K] = 0.0  # off-script tokens live in dimensions K.. only
    for slot, tok in enumerate(chain):
        emb[tok] = 0.0
        emb[tok, slot] = 1.0
    for slot in range(K - 1):
        # RMSNorm scales a unit basis vector to sqrt(D); 10 * sqrt(64) = 80 logits over noise ~0.2.
        head[chain[slot + 1], slot] = 10.0
    save(model, out_dir)
    load_default_tokenizer().save(out_dir)
    return Path(out_dir)


class ServerThread:
    """`with ServerThread(app) as s:` serves app on 127.0.0.1 at s.url until the block ends."""

    def __init__(self, app, *, startup_timeout: float = 60.0):
        # proto IPPROTO_TCP, not 0: asyncio only sets TCP_NODELAY on sockets that say they are TCP,
        # and without it every keep-alive response waits ~40 ms for a delayed ACK.
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", 0))
        self.port = self._sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.app = app
        # backlog: the load tests open 64 connections at once.
        config = uvicorn.Config(app, log_level="warning", access_log=False, timeout_graceful_shutdown=3,
                                backlog=512)
        self.server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self._sock]},
                                        name="seekling-uvicorn", daemon=True)
        self._timeout = startup_timeout

    def __enter__(self) -> ServerThread:
        self._thread.start()
        deadline = time.monotonic() + self._timeout
        while not self.server.started:
            if not self._thread.is_alive():
                raise RuntimeError("the test server exited during startup; see the log above")
            if time.monotonic() > deadline:
                raise RuntimeError(f"the test server did not start within {self._timeout:.0f} s")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self._thread.join(timeout=15)
        self._sock.close()


class StepGate:
    """Holds a backend's engine still: while closed, a step does nothing (but submits and cancels
    still apply between steps), so a test can hold a request mid-generation without racing it.

    `with StepGate(backend) as gate:` starts closed; `gate.allow(k)` lets k steps run;
    `gate.open()` lets everything run. The engine's own step is restored on exit.
    """

    def __init__(self, backend):
        self.engine = backend.engine
        self._orig = self.engine.step
        self._lock = threading.Lock()
        self._permits = 0
        self._open = False

    def _step(self):
        with self._lock:
            go = self._open or self._permits > 0
            if go and not self._open:
                self._permits -= 1
        if not go:
            time.sleep(0.002)  # the engine thread spins here; keep it from starving the server
            return []
        return self._orig()

    def allow(self, steps: int):
        with self._lock:
            self._permits += steps

    def open(self):
        self._open = True

    def __enter__(self) -> StepGate:
        self.engine.step = self._step
        return self

    def __exit__(self, *exc):
        self.open()
        del self.engine.step  # back to the class's method

"""The engine, seen from asyncio: one thread drives `Engine.step()`, requests get async event queues.

This file is the server's only coupling to `seekling.inference`. The engine is single-threaded by
design, so exactly one background thread ever touches it: HTTP handlers hand it operations
(submit, cancel) through a locked inbox and are woken through `loop.call_soon_threadsafe`. Every
step packs all running sequences into one forward (the engine's continuous batching), so
concurrent HTTP requests share forward passes; between steps the thread applies the inbox, which
is how a new request joins a running batch and how a cancelled one leaves it.

A request with n choices becomes n engine requests, ids "<request id>-<i>". Their events reach
the handler as `(choice index, TokenEvent)` batches, one batch per step, so a busy server costs
one event-loop callback per request per step rather than per token. A request whose client
disconnects is cancelled: the engine frees its cache blocks before its next step.

Admission is separate from the engine: `Admission` lets `max_concurrency` requests generate at
once and `max_queue` wait; beyond that `acquire` raises a 429 without waiting. The engine's own
queue (`max_seqs`, cache blocks) still applies underneath; its scheduler never lets a request
wait forever, because `add_request` refuses one that could never fit.
Left out: several engines (data parallel) behind one server; one process per engine is simpler.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import defaultdict
from collections.abc import AsyncIterator, Callable

import torch

from seekling.checkpoint import load as load_model
from seekling.device import cpu_has_fast_bf16
from seekling.inference.engine import Engine, EngineConfig
from seekling.inference.sampling import MAX_TOP_LOGPROBS as ENGINE_MAX_TOP_LOGPROBS
from seekling.inference.sampling import SamplingParams
from seekling.serve.config import ServeConfig
from seekling.serve.errors import APIError
from seekling.serve.protocol import MAX_TOP_LOGPROBS as OPENAI_MAX_TOP_LOGPROBS
from seekling.serve.protocol import GenerationRequest, Limits
from seekling.serve.textstream import render_text
from seekling.tokenizer import SeeklingTokenizer

log = logging.getLogger("seekling.serve")


class Admission:
    """At most `slots` requests generating, at most `max_queue` waiting (FIFO); beyond that, 429."""

    def __init__(self, slots: int, max_queue: int):
        self.slots, self.max_queue = slots, max_queue
        self._sem = asyncio.Semaphore(slots)
        self.waiting = 0
        self.in_use = 0

    async def acquire(self):
        if self._sem.locked() and self.waiting >= self.max_queue:
            raise APIError(429, f"the server is busy: {self.in_use} requests are generating and {self.waiting} are "
                                "waiting, its limit; retry shortly", code="rate_limit_exceeded")
        self.waiting += 1
        try:
            await self._sem.acquire()
        finally:
            self.waiting -= 1
        self.in_use += 1

    def release(self):
        self.in_use -= 1
        self._sem.release()


class Generation:
    """One HTTP request's engine sequences, as an async stream of (choice index, TokenEvent) batches."""

    def __init__(self, backend: Backend, request_id: str, n: int):
        self.backend, self.request_id = backend, request_id
        self.engine_ids = [f"{request_id}-{i}" for i in range(n)]
        self._queue: asyncio.Queue = asyncio.Queue()
        self._open = set(range(n))  # choices whose last event has not arrived
        self._closed = False

    def _push(self, batch):  # runs on the event loop
        self._queue.put_nowait(batch)

    async def batches(self) -> AsyncIterator[list]:
        """Yield lists of (choice index, TokenEvent) until every choice has finished."""
        while self._open:
            batch = await self._queue.get()
            if isinstance(batch, Exception):
                raise batch
            for index, event in batch:
                if event.finish_reason is not None:
                    self._open.discard(index)
            yield batch

    def cancel(self, indices=None):
        """Stop the given choices (default: all) and free their cache blocks. Safe to call twice."""
        if self._closed:
            return
        picked = [i for i in (range(len(self.engine_ids)) if indices is None else indices) if i in self._open]
        if indices is None:
            self._closed = True
        if not picked:  # every choice already finished: nothing for the engine thread to do
            return
        self._open.difference_update(picked)
        ids = [self.engine_ids[i] for i in picked]
        self.backend._post(lambda: self.backend._cancel(ids))


class Backend:
    """The engine, its tokenizer and limits, and the thread that steps it."""

    def __init__(self, engine, tokenizer, *, model_name: str, max_concurrency: int, max_queue: int, max_n: int = 8):
        self.engine, self.tokenizer = engine, tokenizer
        cfg = engine.model.cfg
        self.limits = Limits(model_name=model_name, context=cfg.max_seq_len, vocab_size=cfg.vocab_size, max_n=max_n)
        self.max_concurrency, self.max_queue = max_concurrency, max_queue
        self.admission: Admission | None = None  # made on the event loop in start()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._inbox: list[Callable[[], None]] = []
        self._wake = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._owner: dict[str, tuple[Generation, int]] = {}  # engine request id -> (generation, choice)
        self.n_cancelled = 0  # engine sequences cancelled before they finished
        self.n_finished = 0
        self.failed: str | None = None  # set if the engine thread crashed

    @classmethod
    def load(cls, cfg: ServeConfig) -> Backend:
        """Load the model and tokenizer of cfg.model_dir and build an engine for them."""
        # On CPUs without native bf16 a bf16 checkpoint runs ~10x slower than fp32 (seekling/device.py).
        model = load_model(cfg.model_dir, dtype=None if cpu_has_fast_bf16() else torch.float32)
        tokenizer = SeeklingTokenizer.load(cfg.model_dir)
        if tokenizer.vocab_size > model.cfg.vocab_size:
            raise ValueError(f"{cfg.model_dir}: the tokenizer has {tokenizer.vocab_size} ids but the model only "
                             f"{model.cfg.vocab_size}; save the tokenizer the model was trained with into it")
        options = dict(cfg.engine_options)
        # Every running request should fit one decode step, or the engine's own queue adds latency.
        options.setdefault("max_seqs", max(64, cfg.max_concurrency))
        per_step = options["max_seqs"] * (1 + options.get("speculative_tokens", 0))
        options.setdefault("max_batch_tokens", max(512, per_step))
        engine = Engine(model, EngineConfig(**options), decode=lambda ids: render_text(tokenizer, ids))
        engine.warm_up()  # with compile=True: compile before the first client waits on it
        assert ENGINE_MAX_TOP_LOGPROBS >= OPENAI_MAX_TOP_LOGPROBS, "the engine reports fewer alternatives than OpenAI allows"
        return cls(engine, tokenizer, model_name=cfg.served_name, max_concurrency=cfg.max_concurrency,
                   max_queue=cfg.max_queue, max_n=cfg.max_n)

    # ------------------------------------------------------------ lifecycle (event loop side)

    def start(self):
        """Start the engine thread; call from the event loop that will serve requests."""
        assert self._thread is None, "Backend.start called twice"
        self._loop = asyncio.get_running_loop()
        self.admission = Admission(self.max_concurrency, self.max_queue)
        self._thread = threading.Thread(target=self._run, name="seekling-engine", daemon=True)
        self._thread.start()

    async def stop(self):
        """Cancel everything in flight and join the engine thread."""
        if self._thread is None:
            return
        with self._wake:
            self._stopping = True
            self._wake.notify()
        await asyncio.to_thread(self._thread.join)
        self._thread = None

    async def submit(self, req: GenerationRequest, request_id: str) -> Generation:
        """Queue req's choices in the engine; raises APIError(400) for a request it refuses."""
        if self.failed or self._thread is None:
            why = self.failed or "server not started"
            raise APIError(503, f"the engine is not running ({why}); restart the server", code="engine_dead")
        try:
            params = [SamplingParams(**choice) for choice in req.choices]
        except ValueError as e:  # protocol.py checks OpenAI's ranges; this is the engine's own word
            raise APIError(400, str(e), code="invalid_value") from None
        gen = Generation(self, request_id, req.n)
        accepted = self._loop.create_future()

        def op():
            added = []
            try:
                for i, p in enumerate(params):
                    self.engine.add_request(list(req.prompt_ids), p, request_id=gen.engine_ids[i])
                    self._owner[gen.engine_ids[i]] = (gen, i)
                    added.append(gen.engine_ids[i])
            except Exception as e:
                self._cancel(added, count=False)
                if isinstance(e, ValueError):  # the engine's "this request can never run"
                    err = APIError(400, str(e), code="invalid_request")
                else:
                    log.exception("engine.add_request failed")
                    err = APIError(500, f"the engine could not take the request ({type(e).__name__}: {e})",
                                   code="engine_error")
                self._call(accepted.set_exception, err)
                return
            self._call(accepted.set_result, gen)

        self._post(op)
        try:
            return await accepted
        except asyncio.CancelledError:
            gen.cancel()  # the client left while we waited; the cancel runs after the submit op
            raise

    def stats(self) -> dict:
        """Counters for /health and the tests; read without locking (ints and list lengths only)."""
        cache = self.engine.cache
        adm = self.admission
        return {"status": "error: " + self.failed if self.failed else "ok",
                "requests_generating": adm.in_use if adm else 0, "requests_waiting": adm.waiting if adm else 0,
                "sequences_running": len(self.engine.scheduler.running),
                "sequences_queued": len(self.engine.scheduler.waiting),
                "kv_blocks_used": cache.num_used_blocks, "kv_blocks_free": cache.num_free_blocks,
                "kv_blocks_total": cache.n_blocks, "sequences_cancelled": self.n_cancelled,
                "sequences_finished": self.n_finished, "engine_steps": self.engine.n_steps}

    # ------------------------------------------------------------ the engine thread

    def _post(self, op: Callable[[], None]):
        with self._wake:
            self._inbox.append(op)
            self._wake.notify()

    def _call(self, fn, *args):
        """Run fn(*args) on the event loop, unless the loop is gone (server shutting down)."""
        if self._loop is not None and not self._loop.is_closed():
            try:
                self._loop.call_soon_threadsafe(_unless_done, fn, *args)
            except RuntimeError:  # loop closed between the check and the call
                pass

    def _cancel(self, engine_ids: list[str], count: bool = True):
        for rid in engine_ids:
            if self.engine.cancel(rid) and count:
                self.n_cancelled += 1
            self._forget(rid)

    def _forget(self, rid: str):
        """Drop our record and the engine's (it keeps outputs until popped)."""
        self._owner.pop(rid, None)
        try:
            self.engine.output(rid, pop=True)
        except KeyError:  # never added, or already popped
            pass

    def _run(self):
        try:
            self._loop_forever()
        except BaseException as e:  # a bug here would otherwise leave every client waiting forever
            log.exception("the engine thread crashed")
            self.failed = f"{type(e).__name__}: {e}"
            self._fail_all(APIError(503, f"the engine thread stopped ({self.failed}); restart the server",
                                    code="engine_dead"))

    def _loop_forever(self):
        while True:
            with self._wake:
                while not (self._inbox or self._stopping or self.engine.has_unfinished()):
                    self._wake.wait()
                ops, self._inbox = self._inbox, []
                stopping = self._stopping
            for op in ops:
                op()
            if stopping:
                self._fail_all(APIError(503, "the server is shutting down", code="server_shutdown"))
                return
            if not self.engine.has_unfinished():
                continue
            try:
                events = self.engine.step()
            except Exception as e:  # a bug in the engine: fail the requests in flight, keep serving
                log.exception("engine step failed")
                self._fail_all(APIError(500, f"the inference engine failed ({type(e).__name__}: {e}); "
                                             "this is a bug, the server log has the traceback", code="engine_error"))
                continue
            batches: dict[Generation, list] = defaultdict(list)
            for ev in events:
                owner = self._owner.get(ev.request_id)
                if owner is None:  # cancelled while this step ran
                    continue
                gen, index = owner
                batches[gen].append((index, ev))
                if ev.finish_reason is not None:
                    self.n_finished += 1
                    self._forget(ev.request_id)
            for gen, batch in batches.items():
                self._call(gen._push, batch)

    def _fail_all(self, error: APIError):
        gens = {gen for gen, _ in self._owner.values()}
        self._cancel(list(self._owner), count=False)
        for gen in gens:
            self._call(gen._push, error)


def _unless_done(fn, *args):
    # A future whose waiter was cancelled (client gone) must not be resolved again.
    owner = getattr(fn, "__self__", None)
    if isinstance(owner, asyncio.Future) and owner.done():
        return
    fn(*args)

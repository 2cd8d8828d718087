"""The HTTP server: an OpenAI-compatible API and a chat page over one engine.

Routes: GET / (chat page), GET /health (liveness and engine counters), GET /v1/models,
POST /v1/chat/completions, POST /v1/completions. Request fields are documented in
`protocol.py`, response shapes in `responses.py`, the engine coupling in `backend.py`.

A request's life: auth, read and validate the body (400/401/404/413 before anything is queued),
wait for a generation slot (429 when the wait queue is full), submit its n choices to the engine,
then either stream chunks as steps produce tokens or collect them into one response. The client
is watched the whole time: when it goes away, its sequences are cancelled and the slot is freed,
whether it was waiting for a slot, streaming, or waiting for a whole response.
Left out: TLS and multiple workers; put a reverse proxy in front for the former, and the engine
batches across requests already, which is what extra workers would otherwise buy.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import time
from collections.abc import AsyncIterator, Callable

import anyio
import torch
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse

from seekling.serve.backend import Backend, Generation
from seekling.serve.config import ServeConfig
from seekling.serve.errors import APIError, install_error_handlers, read_json_object
from seekling.serve.protocol import GenerationRequest, parse_chat, parse_completion
from seekling.serve.responses import (DONE, ChoiceResult, ChunkMaker, LogprobFormatter, Usage, full_response, new_id,
                                      sse)
from seekling.serve.textstream import ChoiceText, Delta
from seekling.serve.webui import PAGE

log = logging.getLogger("seekling.serve")


class ClientGone(Exception):
    """The client closed the connection before its answer was ready."""


class _Choice:
    """One choice in flight: its detokenizer, logprob entries, and how it ended."""

    def __init__(self, index: int, req: GenerationRequest, backend: Backend, fmt: LogprobFormatter | None):
        self.index, self.fmt = index, fmt
        self.text = ChoiceText(backend.tokenizer, stop=req.stop, split_reasoning=req.split_reasoning)
        self.entries: list[dict] = []
        self.finish_reason: str | None = None

    def feed(self, events, gen: Generation) -> tuple[Delta, list[dict] | None]:
        """Consume this step's events; returns the text delta and the new logprob entries."""
        parts, entries = [], ([] if self.fmt else None)
        for ev in events:
            if self.finish_reason is not None or self.text.stopped:
                break
            parts.append(self.text.feed([ev.token_id]))
            if self.fmt:
                entries.append(self.fmt.chat_entry(ev.token_id, ev.logprob, list(ev.top_logprobs)))
            if ev.finish_reason is not None:
                self.finish_reason = ev.finish_reason
        if self.finish_reason is None and self.text.stopped:
            # Our stop-string check saw the stop first (it matches on the same text as the
            # engine's, so this is rare): end the choice here and let the engine drop it.
            self.finish_reason = "stop"
            gen.cancel([self.index])
        if self.finish_reason is not None:
            parts.append(self.text.finish())
        if entries:
            self.entries += entries
        delta = Delta("".join(d.reasoning for d in parts), "".join(d.content for d in parts), self.text.stopped)
        return delta, entries


def _by_choice(batch) -> dict[int, list]:
    grouped: dict[int, list] = {}
    for index, ev in batch:
        grouped.setdefault(index, []).append(ev)
    return grouped


def _usage(req: GenerationRequest, choices: list[_Choice]) -> Usage:
    return Usage(prompt_tokens=len(req.prompt_ids), completion_tokens=sum(c.text.n_tokens for c in choices),
                 reasoning_tokens=sum(c.text.n_reasoning_tokens for c in choices))


async def _stream_chunks(req: GenerationRequest, rid: str, gen: Generation, backend: Backend) -> AsyncIterator[bytes]:
    maker = ChunkMaker(req, rid)
    fmt = LogprobFormatter(backend.tokenizer) if req.logprobs else None
    choices = [_Choice(i, req, backend, fmt) for i in range(req.n)]
    for i in range(req.n):
        if (chunk := maker.role(i)) is not None:
            yield chunk
    try:
        async for batch in gen.batches():
            for index, events in _by_choice(batch).items():
                c = choices[index]
                if c.finish_reason is not None:
                    continue
                delta, entries = c.feed(events, gen)
                if (chunk := maker.delta(index, delta, entries)) is not None:
                    yield chunk
                if c.finish_reason is not None:
                    yield maker.finish(index, c.finish_reason)
    except APIError as e:
        # Headers are sent: the error can only travel in the stream, as OpenAI does it.
        yield sse(e.body())
        yield DONE
        return
    if req.include_usage:
        yield maker.usage(_usage(req, choices))
    yield DONE


async def _collect(req: GenerationRequest, rid: str, gen: Generation, backend: Backend) -> dict:
    fmt = LogprobFormatter(backend.tokenizer) if req.logprobs else None
    choices = [_Choice(i, req, backend, fmt) for i in range(req.n)]
    async for batch in gen.batches():
        for index, events in _by_choice(batch).items():
            if choices[index].finish_reason is None:
                choices[index].feed(events, gen)
    results = [ChoiceResult(index=c.index, reasoning=c.text.reasoning, content=c.text.content,
                            finish_reason=c.finish_reason, logprob_entries=c.entries) for c in choices]
    return full_response(req, rid, results, _usage(req, choices))


async def _until_disconnect(request: Request):
    # After the body is read, the next ASGI message is http.disconnect, sent when the client leaves.
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _unless_disconnected(request: Request, coro):
    """Await coro, but cancel it and raise ClientGone if the client disconnects first."""
    task = asyncio.ensure_future(coro)
    watcher = asyncio.ensure_future(_until_disconnect(request))
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        task.cancel()
        raise
    finally:
        watcher.cancel()
    if task in done:
        return task.result()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError, APIError):
        await task
    raise ClientGone


class EventStream(StreamingResponse):
    """Server-sent events that stop when the client disconnects and always run `on_close` once.

    Starlette's own disconnect handling depends on the server's ASGI spec version; this watches
    `receive` itself, so cancellation of the generation does not depend on which server runs us.
    """

    def __init__(self, chunks: AsyncIterator[bytes], on_close: Callable[[], None]):
        super().__init__(chunks, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self._on_close = on_close

    async def __call__(self, scope, receive, send):
        try:
            async with anyio.create_task_group() as tg:
                async def watch():
                    while (await receive())["type"] != "http.disconnect":
                        pass
                    tg.cancel_scope.cancel()

                tg.start_soon(watch)
                await self.stream_response(send)
                tg.cancel_scope.cancel()
        except OSError:  # the socket died while we wrote to it: the client is gone
            pass
        finally:
            with contextlib.suppress(Exception):
                await self.body_iterator.aclose()
            self._on_close()


def build_app(cfg: ServeConfig, backend: Backend) -> FastAPI:
    """The FastAPI app over an already-loaded backend (create_app loads one from cfg.model_dir)."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        backend.start()
        yield
        await backend.stop()

    app = FastAPI(title="seekling", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.backend, app.state.config = backend, cfg
    install_error_handlers(app)
    expected = f"Bearer {cfg.api_key}".encode() if cfg.api_key else None
    created = int(time.time())

    def check_auth(request: Request):
        if expected is None:
            return
        got = request.headers.get("authorization", "").encode()
        if not hmac.compare_digest(got, expected):
            why = "no API key was sent" if not got else "the API key is not valid"
            raise APIError(401, f"{why}; send the server's key as 'Authorization: Bearer <key>'",
                           code="invalid_api_key")

    def model_card() -> dict:
        return {"id": backend.limits.model_name, "object": "model", "created": created, "owned_by": "seekling",
                "max_model_len": backend.limits.context}

    @app.get("/", include_in_schema=False)
    async def chat_page():
        return HTMLResponse(PAGE)

    @app.get("/health")
    async def health():
        stats = backend.stats()
        return JSONResponse({"model": backend.limits.model_name, **stats},
                            status_code=200 if stats["status"] == "ok" else 503)

    @app.get("/v1/models")
    async def list_models(request: Request):
        check_auth(request)
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str, request: Request):
        check_auth(request)
        if model_id != backend.limits.model_name:
            raise APIError(404, f"The model {model_id!r} does not exist; this server serves "
                                f"{backend.limits.model_name!r}", param="model", code="model_not_found")
        return model_card()

    async def generate(request: Request, parse) -> Response:
        check_auth(request)
        body = await read_json_object(request, cfg.max_body_bytes)
        req = parse(body, backend.limits, backend.tokenizer)
        rid = new_id(req.endpoint)
        admission = backend.admission

        async def admit_and_submit() -> Generation:
            await admission.acquire()
            try:
                return await backend.submit(req, rid)
            except BaseException:
                admission.release()
                raise

        try:
            gen = await _unless_disconnected(request, admit_and_submit())
        except ClientGone:
            return Response(status_code=499)  # nginx's "client closed request"; nobody reads it
        released = False

        def close():
            nonlocal released
            if not released:
                released = True
                gen.cancel()
                admission.release()

        if req.stream:
            return EventStream(_stream_chunks(req, rid, gen, backend), on_close=close)
        try:
            return JSONResponse(await _unless_disconnected(request, _collect(req, rid, gen, backend)))
        except ClientGone:
            return Response(status_code=499)
        finally:
            close()

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await generate(request, parse_chat)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await generate(request, parse_completion)

    return app


def create_app(model_dir, *, api_key: str | None = None, max_concurrency: int = 32, max_queue: int = 256,
               model_name: str | None = None, **options) -> FastAPI:
    """Load the model in model_dir and return the FastAPI app serving it (options: other ServeConfig fields)."""
    cfg = ServeConfig(model_dir=str(model_dir), api_key=api_key, max_concurrency=max_concurrency,
                      max_queue=max_queue, model_name=model_name, **options)
    return build_app(cfg, Backend.load(cfg))


def run_server(model_dir, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
               max_concurrency: int = 32, max_queue: int = 256, model_name: str | None = None,
               log_level: str = "info", **options) -> None:
    """Serve model_dir over HTTP until interrupted (the `seekling serve` command)."""
    cfg = ServeConfig(model_dir=str(model_dir), host=host, port=port, api_key=api_key,
                      max_concurrency=max_concurrency, max_queue=max_queue, model_name=model_name, **options)
    torch.set_num_threads(cfg.threads)  # process-wide, hence here and not in create_app
    app = build_app(cfg, Backend.load(cfg))
    shown = f"[{host}]" if ":" in host else host
    print(f"seekling: serving {cfg.served_name!r} on http://{shown}:{port} - chat page at /, OpenAI API at /v1"
          f" ({cfg.threads} torch threads{', API key required' if api_key else ''})", flush=True)
    uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5)

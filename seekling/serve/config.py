"""Server settings: one frozen, validated dataclass (the `seekling serve` flags land here).

Two limits shape the server under load. `max_concurrency` is how many requests generate at once:
they share every forward pass through the engine's continuous batching, so on a CPU it is also
the decode batch size. Up to `max_queue` more requests wait for a slot, first come first served;
beyond that a request is refused at once with 429, so an overloaded server answers quickly
instead of letting clients time out. A request with n > 1 takes one slot (its n choices run as n
engine sequences in the same batch).
Left out: per-key rate limits and multiple models per server; a proxy in front does the former,
and one server process per model keeps the latter simple.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from seekling.validate import checker


@dataclass(frozen=True, kw_only=True)
class ServeConfig:
    """How `seekling serve` runs: the model, the socket, auth, and admission limits."""

    model_dir: str
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None  # when set, /v1/* requires "Authorization: Bearer <api_key>"
    model_name: str | None = None  # the id clients send as "model"; default: the directory's name
    max_concurrency: int = 32  # requests generating at once (32: the bench's largest batch)
    max_queue: int = 256  # requests waiting for a slot before new ones get 429
    max_n: int = 8  # choices per request
    max_body_bytes: int = 1 << 20  # 1 MiB: a full 1024-token context is ~4 KiB of text
    # torch intra-op threads, set by run_server for the whole process; None: CPUs - 1 (at least 1).
    # The HTTP event loop needs a core of its own. Measured on the 2-core AVX2 machine while it was
    # busy: the tiny engine alone took 85 ms/token with 2 OpenMP threads vs 15 ms with 1 (a thread
    # waiting for a descheduled peer), and the server at 32 clients gave 476-557 tok/s with 1 thread
    # vs 410-459 with 2.
    torch_threads: int | None = None
    # Engine overrides (seekling.inference EngineConfig fields), e.g. {"kv_cache_tokens": 131072}.
    engine_options: tuple[tuple[str, object], ...] = ()

    def __post_init__(self):
        need = checker("ServeConfig")

        need(isinstance(self.model_dir, (str, Path)) and str(self.model_dir) != "", "model_dir",
             "must be the path of a model directory (config.json, model.safetensors, tokenizer.json)")
        object.__setattr__(self, "model_dir", str(self.model_dir))
        need(isinstance(self.host, str) and self.host != "", "host", f"must be a host name or IP, got {self.host!r}")
        need(isinstance(self.port, int) and 0 <= self.port <= 65535, "port",
             f"must be an integer in [0, 65535] (0 picks a free port), got {self.port!r}")
        need(self.api_key is None or (isinstance(self.api_key, str) and self.api_key.strip() != ""), "api_key",
             "must be a non-empty string, or None to serve without authentication")
        need(self.model_name is None or (isinstance(self.model_name, str) and self.model_name != ""),
             "model_name", f"must be a non-empty string or None, got {self.model_name!r}")
        for f in ("max_concurrency", "max_n", "max_body_bytes"):
            v = getattr(self, f)
            need(isinstance(v, int) and not isinstance(v, bool) and v >= 1, f, f"must be a positive integer, got {v!r}")
        need(self.torch_threads is None or (isinstance(self.torch_threads, int) and self.torch_threads >= 1),
             "torch_threads", f"must be a positive integer or None (CPUs - 1), got {self.torch_threads!r}")
        need(isinstance(self.max_queue, int) and not isinstance(self.max_queue, bool) and self.max_queue >= 0,
             "max_queue", f"must be an integer >= 0 (0: refuse whenever all slots are busy), got {self.max_queue!r}")
        opts = self.engine_options
        if isinstance(opts, dict):
            opts = tuple(sorted(opts.items()))
        need(isinstance(opts, tuple) and all(isinstance(kv, tuple) and len(kv) == 2 and isinstance(kv[0], str)
                                             for kv in opts),
             "engine_options", "must be a dict (or tuple of pairs) of engine setting names to values")
        object.__setattr__(self, "engine_options", opts)

    @property
    def threads(self) -> int:
        return self.torch_threads or max(1, (os.cpu_count() or 2) - 1)

    @property
    def served_name(self) -> str:
        """The model id of /v1/models and the "model" field of responses."""
        return self.model_name or Path(self.model_dir).resolve().name

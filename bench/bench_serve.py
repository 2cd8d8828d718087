"""The HTTP server under concurrent streaming clients: aggregate output tokens/s and time to first token.

    python bench/bench_serve.py [--model DIR] [--clients 1,8,32] [--seconds 5] [--rounds 3] [--max-tokens 64]
    python bench/bench_serve.py --compile   # server and engine peer with the compiled decode step

The server runs as its own process (`python -m seekling.serve`), as in production, so clients
and server do not share a GIL. Each level runs N clients that send streaming chat requests back
to back for the given seconds (`ignore_eos`, so every reply is exactly --max-tokens long) and
reports: output tokens/s summed over clients, its ratio to one client (the batching win: all
clients share each forward pass), and p50/p99 time to the first content token. The peer is the
engine alone (`Engine.generate` on a batch of N in this process, while the server idles), so
"of engine" shows what HTTP, JSON and streaming cost. Any non-200 status is counted and shown.
Levels and peers are interleaved over rounds and the median round kept, so a busy machine slows
every contestant alike (as bench_moe.py does).

The clients are a minimal asyncio HTTP/1.1 reader rather than the openai package, so that on a
2-core machine the clients take little CPU from the server they measure.
Default model: a random `tiny` preset model written to a temporary directory.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

PROMPT = [{"role": "user", "content": "Tell me about the sea, the sky, and the ships that sail between them."}]


async def stream_chat(port: int, body: bytes) -> tuple[int, float | None, int]:
    """One streaming request: (HTTP status, seconds to first content token, completion tokens)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    t0 = time.perf_counter()
    writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\n"
                 b"Connection: close\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
    status = int((await reader.readline()).split()[1])
    chunked = False
    while (line := await reader.readline()) not in (b"\r\n", b""):
        chunked |= line.lower().startswith(b"transfer-encoding:") and b"chunked" in line.lower()
    ttft, tokens, buf = None, 0, b""
    try:
        while True:
            if chunked:
                size = int((await reader.readline()).strip() or b"0", 16)
                if size == 0:
                    break
                data = await reader.readexactly(size + 2)
                buf += data[:-2]
            else:
                data = await reader.read(65536)
                if not data:
                    break
                buf += data
            while b"\n\n" in buf:
                event, buf = buf.split(b"\n\n", 1)
                payload = event[6:]
                if payload == b"[DONE]" or status != 200:
                    continue
                chunk = json.loads(payload)
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
                for c in chunk.get("choices", []):
                    d = c.get("delta", {})
                    if ttft is None and (d.get("content") or d.get("reasoning_content")):
                        ttft = time.perf_counter() - t0
    finally:
        writer.close()
    return status, ttft, tokens


async def run_level(port: int, clients: int, seconds: float, max_tokens: int) -> dict:
    body = json.dumps({"model": "bench", "messages": PROMPT, "max_tokens": max_tokens, "temperature": 0.8,
                       "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}).encode()
    ttfts, statuses, tokens = [], {}, 0
    start = time.perf_counter()
    deadline = start + seconds

    async def client():
        nonlocal tokens
        while time.perf_counter() < deadline:
            status, ttft, n = await stream_chat(port, body)
            statuses[status] = statuses.get(status, 0) + 1
            tokens += n
            if ttft is not None:
                ttfts.append(ttft)

    await asyncio.gather(*(client() for _ in range(clients)))
    wall = time.perf_counter() - start
    return {"clients": clients, "requests": sum(statuses.values()), "tok_s": tokens / wall, "ttfts": ttfts,
            "statuses": statuses}


class EnginePeer:
    """Engine.generate on `batch` copies of the bench prompt, no HTTP: what the server is measured against."""

    def __init__(self, model_dir: str, max_batch: int, max_tokens: int, compile: bool):
        import torch

        from seekling.checkpoint import load
        from seekling.device import cpu_has_fast_bf16
        from seekling.inference.engine import Engine, EngineConfig
        from seekling.inference.sampling import SamplingParams
        from seekling.tokenizer import SeeklingTokenizer

        # The same model dtype, engine settings and thread count as the server (ServeConfig.threads).
        torch.set_num_threads(max(1, (os.cpu_count() or 2) - 1))
        model = load(model_dir, dtype=None if cpu_has_fast_bf16() else torch.float32)
        self.prompt = SeeklingTokenizer.load(model_dir).apply_chat_template(PROMPT)
        self.engine = Engine(model, EngineConfig(max_seqs=max(64, max_batch), max_batch_tokens=max(512, max_batch),
                                                 compile=compile))
        self.engine.warm_up()
        self.params = SamplingParams(max_tokens=max_tokens, temperature=0.8, ignore_eos=True)
        self.engine.generate([self.prompt], self.params)  # warm-up

    def tok_s(self, batch: int, seconds: float) -> float:
        tokens, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            tokens += sum(len(o.output_ids) for o in self.engine.generate([self.prompt] * batch, self.params))
        return tokens / (time.perf_counter() - start)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model_dir: str, port: int, max_concurrency: int, compile: bool) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "seekling.serve", "--model", model_dir, "--port", str(port), "--model-name", "bench",
           "--max-concurrency", str(max_concurrency)] + (["--compile"] if compile else [])
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    started = time.monotonic()
    deadline = started + (600 if compile else 120)  # a cold compile takes a minute or two
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited during startup:\n{proc.stderr.read()}")
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1).read()
            print(f"server ready after {time.monotonic() - started:.1f} s", flush=True)
            return proc
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError(f"the server did not answer /health within {deadline - started:.0f} s")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help="model directory (default: a random tiny preset model in a temp dir)")
    ap.add_argument("--clients", default="1,8,32", help="comma-separated concurrency levels")
    ap.add_argument("--seconds", type=float, default=5.0, help="length of one level in one round")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds; the median round is reported")
    ap.add_argument("--max-tokens", type=int, default=64, help="completion tokens per request")
    ap.add_argument("--no-engine-peer", action="store_true", help="skip the engine-only measurement")
    ap.add_argument("--compile", action="store_true", help="server and engine peer with EngineConfig(compile=True)")
    args = ap.parse_args()
    levels = [int(c) for c in args.clients.split(",")]

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = args.model
        if model_dir is None:
            from seekling.presets import tiny
            from seekling.serve.testing import save_random_model

            model_dir = str(save_random_model(Path(tmp) / "tiny-random", **vars(tiny())))
        port = free_port()
        proc = start_server(model_dir, port, max(levels), args.compile)
        runs = {c: [] for c in levels}
        peer_runs = {c: [] for c in levels}
        try:
            peer = None if args.no_engine_peer else EnginePeer(model_dir, max(levels), args.max_tokens, args.compile)
            asyncio.run(run_level(port, 1, 1.0, 8))  # warm-up: first forward, allocator, caches
            for _ in range(args.rounds):
                for c in levels:
                    runs[c].append(asyncio.run(run_level(port, c, args.seconds, args.max_tokens)))
                    if peer is not None:  # the server is idle meanwhile: its engine thread sleeps
                        peer_runs[c].append(peer.tok_s(c, args.seconds / 2))
        finally:
            proc.terminate()
            proc.wait(timeout=30)

    rows = []
    for c in levels:
        r = sorted(runs[c], key=lambda x: x["tok_s"])[len(runs[c]) // 2]  # the median round
        ttfts = sorted(t for run in runs[c] for t in run["ttfts"])
        bad = sum(n for run in runs[c] for s, n in run["statuses"].items() if s != 200)
        eng = statistics.median(peer_runs[c]) if peer_runs[c] else None
        rows.append((c, sum(run["requests"] for run in runs[c]), r["tok_s"], ttfts, eng, bad))
    base = rows[0][2]
    print(f"\nseekling serve{' --compile' if args.compile else ''}: {os.path.basename(model_dir.rstrip('/'))}, "
          f"{args.max_tokens} tokens per request, "
          f"median of {args.rounds} rounds x {args.seconds:g} s per level, {os.cpu_count()} CPUs")
    head = (f"{'clients':>7} {'requests':>8} {'output tok/s':>12} {'vs 1 client':>11} {'TTFT p50 ms':>11} "
            f"{'TTFT p99 ms':>11} {'engine tok/s':>12} {'of engine':>9} {'non-200':>7}")
    print(head)
    print("-" * len(head))
    for c, n_req, tok_s, ttfts, eng, bad in rows:
        p50 = statistics.median(ttfts) * 1e3
        p99 = ttfts[min(len(ttfts) - 1, round(0.99 * (len(ttfts) - 1)))] * 1e3
        eng_s = f"{eng:>12.0f} {tok_s / eng:>8.0%}" if eng else f"{'-':>12} {'-':>9}"
        print(f"{c:>7} {n_req:>8} {tok_s:>12.0f} {tok_s / base:>10.1f}x {p50:>11.0f} {p99:>11.0f} {eng_s} {bad:>7}")


if __name__ == "__main__":
    main()

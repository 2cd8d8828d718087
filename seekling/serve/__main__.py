"""`python -m seekling.serve --model DIR`: the same flags `seekling serve` takes, for use before the CLI has them."""

from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m seekling.serve",
                                description="Serve a model over an OpenAI-compatible API with a chat page at /.")
    p.add_argument("--model", required=True, metavar="DIR",
                   help="model directory (config.json, safetensors, tokenizer files)")
    p.add_argument("--host", default="127.0.0.1", help="interface to bind (default: loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1")
    p.add_argument("--max-concurrency", type=int, default=32, help="requests generating at once (default 32)")
    p.add_argument("--max-queue", type=int, default=256, help="requests waiting for a slot before 429 (default 256)")
    p.add_argument("--model-name", default=None, help="model id clients send (default: the directory name)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: CPUs - 1, at least 1)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from seekling.serve.app import run_server

    try:
        run_server(args.model, host=args.host, port=args.port, api_key=args.api_key,
                   max_concurrency=args.max_concurrency, max_queue=args.max_queue, model_name=args.model_name,
                   torch_threads=args.threads)
    except (FileNotFoundError, ValueError) as e:
        print(f"seekling serve: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())

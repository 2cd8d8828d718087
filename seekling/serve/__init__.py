"""OpenAI-compatible HTTP serving and a web chat page: `create_app` for ASGI, `run_server` for the CLI."""

from seekling.serve.app import build_app, create_app, run_server
from seekling.serve.config import ServeConfig

__all__ = ["ServeConfig", "build_app", "create_app", "run_server"]

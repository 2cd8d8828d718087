"""OpenAI-shaped errors: one exception type, the handlers that render every failure, and body limits.

Every error leaves the server as `{"error": {"message", "type", "param", "code"}}` with a 4xx
status when the client can fix it, so the official client raises its typed exceptions
(BadRequestError, AuthenticationError, NotFoundError, RateLimitError) and a person reading curl
output learns which field to change. Handlers are installed for our own `APIError`, for
Starlette's routing errors (404 route, 405 method) and for FastAPI's validation error, so none
of them falls through to a bare text page. Anything else is a bug in the server: it becomes a
JSON 500 of type "server_error" and its traceback goes to the log.

The body is read here, not by a framework model, for two reasons: the size limit must hold for
chunked uploads that send no Content-Length, and malformed JSON must say where it broke.
Left out: error codes for billing and quota; a local server has neither.
"""

from __future__ import annotations

import json
import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger("seekling.serve")

# OpenAI's "type" per status; the client only looks at the status, people read the type.
_TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 404: "invalid_request_error",
          405: "invalid_request_error", 413: "invalid_request_error", 415: "invalid_request_error",
          422: "invalid_request_error", 429: "rate_limit_error", 500: "server_error", 503: "server_error"}


class APIError(Exception):
    """A request the server refuses: HTTP status plus OpenAI's error fields."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 type: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type or _TYPES.get(status, "invalid_request_error" if status < 500 else "server_error")

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if self.status == 401 else None
        return JSONResponse(self.body(), status_code=self.status, headers=headers)


def bad_param(param: str, message: str, code: str | None = "invalid_value") -> APIError:
    """A 400 about one request field; the message starts with the field so it reads on its own."""
    return APIError(400, f"{param}: {message}", param=param, code=code)


def install_error_handlers(app: FastAPI) -> None:
    """Render every exception a request can raise as an OpenAI-shaped JSON error."""

    async def on_api_error(request: Request, exc: APIError):
        return exc.response()

    async def on_http_error(request: Request, exc: StarletteHTTPException):
        if exc.status_code == 404:
            msg = f"no route {request.method} {request.url.path}; see GET /v1/models, POST /v1/chat/completions, " \
                  "POST /v1/completions, GET /health"
            return APIError(404, msg, code="not_found").response()
        if exc.status_code == 405:
            return APIError(405, f"{request.method} is not allowed on {request.url.path}",
                            code="method_not_allowed").response()
        return APIError(exc.status_code, str(exc.detail)).response()

    async def on_validation_error(request: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        param = ".".join(str(p) for p in first.get("loc", ()) if p != "body") or None
        return APIError(400, f"{param}: {first.get('msg', 'invalid request')}", param=param).response()

    async def on_unexpected(request: Request, exc: Exception):
        log.exception("internal error on %s %s", request.method, request.url.path)
        return APIError(500, f"internal server error ({type(exc).__name__}); this is a bug in the server, "
                             "the log has the traceback", code="internal_error").response()

    app.add_exception_handler(APIError, on_api_error)
    app.add_exception_handler(StarletteHTTPException, on_http_error)
    app.add_exception_handler(RequestValidationError, on_validation_error)
    app.add_exception_handler(Exception, on_unexpected)


async def read_json_object(request: Request, limit: int) -> dict:
    """The request body as a JSON object, refusing bodies over `limit` bytes before reading them whole."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise APIError(400, f"invalid Content-Length header {declared!r}", code="invalid_header")
        if int(declared) > limit:
            raise _too_large(limit)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise _too_large(limit)
        chunks.append(chunk)
    raw = b"".join(chunks)
    if not raw.strip():
        raise APIError(400, "the request body is empty; send a JSON object", code="invalid_json")
    try:
        body = json.loads(raw)
    except UnicodeDecodeError:
        raise APIError(400, "the request body is not UTF-8 text; send a JSON object", code="invalid_json") from None
    except json.JSONDecodeError as e:
        raise APIError(400, f"the request body is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}",
                       code="invalid_json") from None
    except RecursionError:
        raise APIError(400, "the request body nests JSON too deeply", code="invalid_json") from None
    if not isinstance(body, dict):
        raise APIError(400, f"the request body must be a JSON object, got a JSON {_json_kind(body)}",
                       code="invalid_json")
    return body


def _too_large(limit: int) -> APIError:
    return APIError(413, f"the request body is larger than the server's limit of {limit} bytes",
                    code="request_too_large")


def _json_kind(v) -> str:
    return {list: "array", str: "string", bool: "boolean", int: "number", float: "number"}.get(type(v), "null")

"""The OpenAI error envelope every role answers with, and the middleware that applies it."""
from __future__ import annotations

import json
import logging
from typing import Any, Mapping

from aiohttp import web

from .wire import dumps

log = logging.getLogger(__name__)

# Status -> OpenAI-style error type, for errors raised as aiohttp HTTP exceptions.
_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    409: "conflict_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
}


def error_body(message: str, type_: str, code: Any = None, **extra: Any) -> dict:
    """The OpenAI envelope as a dict: {"error": {"message", "type", "code", ...}}."""
    err = {"message": message, "type": type_, "code": code}
    err.update(extra)
    return {"error": err}


def error_response(
    status: int,
    message: str,
    type_: str | None = None,
    code: Any = None,
    headers: Mapping[str, str] | None = None,
    **extra: Any,
) -> web.Response:
    """A JSON response carrying the OpenAI error envelope."""
    if type_ is None:
        type_ = _TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return web.Response(
        status=status,
        text=dumps(error_body(message, type_, code, **extra)),
        content_type="application/json",
        headers=headers,
    )


class ApiError(Exception):
    """Raise from a handler to answer with the envelope (caught by the error middleware)."""

    def __init__(
        self,
        status: int,
        message: str,
        type_: str | None = None,
        code: Any = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type_ = type_
        self.code = code
        self.headers = headers

    def response(self) -> web.Response:
        return error_response(self.status, self.message, self.type_, self.code, self.headers)


def _http_exception_message(exc: web.HTTPException) -> str:
    if isinstance(exc, web.HTTPRequestEntityTooLarge):
        return f"request body too large: {exc.text or ''}".strip().rstrip(":")
    if isinstance(exc, web.HTTPNotFound):
        return "no such endpoint"
    if isinstance(exc, web.HTTPMethodNotAllowed):
        return f"method {exc.method} not allowed; allowed: {', '.join(sorted(exc.allowed_methods))}"
    return exc.reason or exc.text or "error"


def error_answer(request: web.BaseRequest, exc: Exception) -> web.StreamResponse:
    """The envelope answer for an error a handler raised (re-raises what must propagate)."""
    if isinstance(exc, ApiError):
        return exc.response()
    if isinstance(exc, web.HTTPException):
        if exc.status < 400:
            raise exc
        headers = {k: v for k, v in exc.headers.items() if k.lower() in ("allow", "retry-after", "www-authenticate")}
        return error_response(exc.status, _http_exception_message(exc), headers=headers or None)
    if isinstance(exc, ConnectionResetError):
        raise exc
    # The last line of defence: never a bare 500 page.
    log.error("unhandled error on %s %s", request.method, request.path, exc_info=exc)
    return error_response(500, f"internal error: {type(exc).__name__}", "server_error")


@web.middleware
async def error_middleware(request: web.Request, handler):
    """Turn every error into the OpenAI envelope; streamed bodies are left alone."""
    try:
        return await handler(request)
    except Exception as exc:  # noqa: BLE001 - error_answer decides what propagates
        return error_answer(request, exc)


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


async def expect_continue(request: web.Request) -> web.StreamResponse | None:
    """The `expect_handler` of routes that take a body: a declared body over the app's limit is
    refused with 413 before the client sends it (aiohttp's default says 100 Continue first)."""
    limit = request.app._client_max_size
    if request.content_length is not None and request.content_length > limit:
        resp = error_response(413, f"request body too large: {request.content_length} bytes declared, "
                                   f"the limit is {limit}", code="body_too_large")
        resp.force_close()  # the body is never read: the connection cannot be reused
        return resp
    expect = request.headers.get("Expect", "")
    if expect.lower() != "100-continue":
        resp = error_response(417, f"unsupported Expect: {expect[:100]!r}", code="expectation_failed")
        resp.force_close()
        return resp
    if request.version >= (1, 1):
        await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        request.writer.output_size = 0  # the real answer is still to come
    return None


def parse_json_object(raw: bytes, strict: bool = False) -> dict:
    """Parse a request body that must be a JSON object, or raise ApiError 400 saying what is wrong.

    `strict` also refuses NaN and Infinity, which Python accepts but strict parsers reject. A body
    nested too deeply for the parser is a 400 like any other invalid JSON, never a crash.
    """
    try:
        data = json.loads(raw, parse_constant=_refuse_constant) if strict else json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ApiError(400, f"invalid JSON: {exc}", code="invalid_json") from None
    except RecursionError:
        raise ApiError(400, "invalid JSON: nested too deeply", code="invalid_json") from None
    if not isinstance(data, dict):
        raise ApiError(400, "request body must be a JSON object", code="invalid_json")
    return data


async def read_json_object(request: web.Request, strict: bool = True) -> dict:
    """Read the request body as a JSON object, or raise ApiError 400/413 saying what is wrong."""
    try:
        raw = await request.read()
    except web.HTTPRequestEntityTooLarge as exc:
        raise ApiError(413, f"request body too large (limit {request.app._client_max_size} bytes)",
                       code="body_too_large") from exc
    if not raw.strip():
        raise ApiError(400, "request body is empty; a JSON object is required", code="invalid_json")
    return parse_json_object(raw, strict)

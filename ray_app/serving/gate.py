"""The front door of the inference API: one ASGI middleware in front of every engine's app.

For each HTTP request, in order:

1. ``/v1/*`` needs a known API key (401): nothing of an unauthenticated request is read.
2. The generation routes take POST only (405, with ``Allow``), a JSON content type when one
   is sent (415), at most ``max_request_bytes`` (413, from Content-Length before reading, else
   while reading), then :func:`protocol.parse_body` (400 naming the field) and the server's
   limits (message count, ``max_tokens``; 400 naming the field).
3. The app gets the validated body in ``scope[BODY_KEY]`` and the raw bytes replayed, and
   later messages (a client's disconnect) from the real connection.
4. Every response carries the model-version headers; an exception the app let escape
   becomes an OpenAI-shaped 500 (when no response had started) instead of a bare text body.
5. Every response's status is counted (``on_response(route, status, model_version)``, the request metric);
   paths other than the API's are counted as ``other``, so a scan cannot grow the label set.

So the transformers and vLLM engines refuse exactly the same bodies with the same errors.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

from ray_app.serving.protocol import (
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    OpenAIRequest,
    bearer_key_error,
    error_response,
    parse_body,
)

log = logging.getLogger("ray.serve")

BODY_KEY = "llmops.openai_request"  # where the validated body waits in the ASGI scope
ROUTES: dict[str, type[OpenAIRequest]] = {
    "/v1/chat/completions": ChatCompletionRequest,
    "/v1/completions": CompletionRequest,
}
COUNTED_ROUTES = {*ROUTES, "/v1/models", "/v1/stats", "/healthz"}  # their own label; any other path is "other"


@dataclass(frozen=True)
class Limits:
    """The server's bounds on a request (ServeArgs holds the configured values)."""

    max_request_bytes: int = 1 << 20
    max_messages: int = 2048
    max_tokens_limit: int = 1024


def check_limits(body: OpenAIRequest, limits: Limits) -> None:
    """Bounds that depend on the server's configuration; raises APIError(400) naming the field."""
    if isinstance(body, ChatCompletionRequest) and len(body.messages) > limits.max_messages:
        raise APIError(
            400,
            f"messages: {len(body.messages)} messages is above this server's limit of {limits.max_messages}",
            param="messages",
        )
    if body.max_tokens is not None and body.max_tokens > limits.max_tokens_limit:
        raise APIError(
            400,
            f"max_tokens {body.max_tokens} is above this server's limit of {limits.max_tokens_limit}",
            param="max_completion_tokens" if getattr(body, "max_completion_tokens", None) else "max_tokens",
        )


def route_path(scope) -> str:
    """The request's path inside the app: Serve mounts an app under its ``route_prefix`` (the ASGI
    ``root_path``) and passes the full path, so ``/chat/v1/models`` is ``/v1/models`` to the app."""
    path, root = scope["path"], scope.get("root_path") or ""
    if root and (path == root or path.startswith(root.rstrip("/") + "/")):
        return path[len(root.rstrip("/")) :] or "/"
    return path


class ApiGate:
    """ASGI middleware: authentication, body intake and validation, version headers, error shape."""

    def __init__(
        self,
        app,
        key_hashes: list[str],
        version_headers: dict[str, str],
        limits: Limits,
        on_response: Callable[[str, int, str], None] | None = None,
    ):
        self.app, self.key_hashes, self.limits, self.on_response = app, key_hashes, limits, on_response
        self.extra = [(name.encode(), value.encode()) for name, value in version_headers.items()]

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = False

        async def send_with_headers(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                headers = list(message.get("headers", []))
                named = {name.lower() for name, _ in headers}  # the app's own (a canary's answer) win
                headers += [(name, value) for name, value in self.extra if name not in named]
                message = {**message, "headers": headers}
                self._count(scope, message["status"], dict(headers).get(b"x-model-version", b"").decode())
            await send(message)

        try:
            receive = await self._admit(scope, receive)
            await self.app(scope, receive, send_with_headers)
        except APIError as exc:
            if started:
                raise
            await exc.response()(scope, receive, send_with_headers)
        except Exception:
            log.exception("request to %s failed", scope.get("path"))
            if started:
                raise
            response = error_response(500, "the server failed to handle the request", kind="server_error")
            await response(scope, receive, send_with_headers)

    def _count(self, scope, status: int, version: str) -> None:
        if self.on_response is None:
            return
        path = route_path(scope).rstrip("/") or "/"
        try:
            self.on_response(path if path in COUNTED_ROUTES else "other", status, version)
        except Exception:  # a metric must never fail a request
            log.warning("counting a response failed", exc_info=True)

    async def _admit(self, scope, receive):
        """Check the request; returns the receive callable the app should use. Raises APIError."""
        path = route_path(scope)
        if path.startswith("/v1"):
            headers = dict(scope["headers"])
            reason = bearer_key_error(headers.get(b"authorization", b"").decode("latin-1"), self.key_hashes)
            if reason:
                raise APIError(401, reason, code="invalid_api_key")
        model = ROUTES.get(path.rstrip("/") or path)
        if model is None:
            return receive
        if scope["method"] != "POST":
            raise APIError(
                405, f"{scope['method']} is not allowed on {path}: use POST", code="method_not_allowed",
                headers={"Allow": "POST"},
            )  # fmt: skip
        headers = dict(scope["headers"])
        content_type = headers.get(b"content-type", b"").decode("latin-1").split(";")[0].strip().lower()
        if content_type and content_type != "application/json" and not content_type.endswith("+json"):
            raise APIError(415, f"Content-Type {content_type!r} is not supported: send application/json")
        raw = await self._read_body(headers, receive)
        body = parse_body(raw, model)
        check_limits(body, self.limits)
        scope[BODY_KEY] = body
        return replay(raw, receive)

    async def _read_body(self, headers: dict[bytes, bytes], receive) -> bytes:
        limit = self.limits.max_request_bytes
        too_large = APIError(
            413, f"the request body is larger than this server's limit of {limit} bytes", code="request_too_large"
        )
        declared = headers.get(b"content-length", b"").decode("latin-1").strip()
        if declared.isdigit() and int(declared) > limit:
            raise too_large
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise APIError(400, "the client disconnected while sending the body")
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise too_large
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)


def replay(raw: bytes, receive):
    """A receive callable that gives the app the body already read, then the real connection's messages."""
    sent = False

    async def replayed():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": raw, "more_body": False}
        return await receive()

    return replayed

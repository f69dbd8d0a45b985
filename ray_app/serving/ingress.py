"""The HTTP side of the Serve app: OpenAI routes in a light deployment in front of the model replicas.

``OpenAIIngress`` takes every HTTP request (behind the :class:`ApiGate`), asks a ``ChatServer``
replica for the answer through a streaming deployment handle, and writes OpenAI's bodies and
Server-Sent Events. Keeping HTTP out of the model replicas is what lets a failure stay
OpenAI-shaped:

- a model replica that dies (or is unavailable) before a request's first token: the request
  goes to another replica, unseen by the client, while its deadline allows;
- one that dies mid-answer: a non-streaming answer starts over elsewhere (nothing was sent);
  a stream, whose headers are gone, ends with an error event instead of a torn connection;
- a full deployment (every replica at ``max_ongoing_requests`` and the handle's queue at
  ``max_queued_requests``) is a 503 with ``Retry-After`` in OpenAI's JSON, not Serve's text.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator

from fastapi import Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel
from ray import serve
from ray.exceptions import RayActorError, RayTaskError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError

from ray_app.adapters import SEPARATOR, adapter_card, list_adapters, split_model_id
from ray_app.credentials import as_serve_identity
from ray_app.serving.admission import DeadlineExceeded, failure
from ray_app.serving.config import ServeArgs, ServedModel, parse_routing
from ray_app.serving.engine import Delta
from ray_app.serving.gate import BODY_KEY, ApiGate
from ray_app.serving.metrics import RequestMetrics
from ray_app.serving.protocol import APIError, OpenAIRequest, error_response
from ray_app.serving.responses import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    Completion,
    DeltaMessage,
    FunctionCallDelta,
    ModelList,
    TextChoice,
    ToolCall,
    ToolCallDelta,
    Usage,
)
from ray_app.serving.routing import CONVERSATION_HEADER, AdapterRoutes, answers_as_canary
from ray_app.serving.tools import AutoCalls, ToolUse, parse_calls, tool_calls
from ray_app.settings import get_settings

logger = logging.getLogger("ray.serve")

INGRESS_NAME = "OpenAIIngress"
REPLICA_GONE = (RayActorError, DeploymentUnavailableError)  # the model replica died or cannot be reached
REPLICA_FAILED = APIError(
    500, "the model replica serving this answer failed: ask again", code="replica_failed", kind="server_error"
)


ADAPTER_LIST_TTL_S = 5.0  # how old the ingress's list of stored adapters may be; a new adapter waits at most this


class StoredAdapters:
    """The adapters stored for the served version, as the ingress knows them: listed from the store at most
    once per ADAPTER_LIST_TTL_S, so requests naming adapters that do not exist (a typo, a client probing names)
    are refused here, without a store request each; a newly published adapter is served within the TTL.
    A store that cannot be listed keeps the last list (None before any: the replica decides, as without)."""

    def __init__(self, served: ServedModel):
        self.served, self.names, self.listed_at, self.listings = served, None, None, 0
        self._lock = asyncio.Lock()

    async def get(self) -> frozenset[str] | None:
        async with self._lock:
            if self.listed_at is None or time.monotonic() - self.listed_at >= ADAPTER_LIST_TTL_S:
                served, settings = self.served, as_serve_identity(get_settings())
                try:
                    names = await asyncio.to_thread(list_adapters, served.registry_name, served.version, settings)
                    self.names = frozenset(names)
                except Exception as exc:
                    logger.warning("cannot list the adapters of %s (%s); keeping the last list", served.label, exc)
                self.listed_at, self.listings = time.monotonic(), self.listings + 1
        return self.names


@serve.deployment(
    name=INGRESS_NAME,
    num_replicas=1,
    # It only parses, routes and relays: admission is the model replicas' (ray_app.serving.admission).
    max_ongoing_requests=512,
    ray_actor_options={"num_cpus": 0},
    graceful_shutdown_timeout_s=120,
)
@serve.ingress()
class OpenAIIngress:
    def __init__(
        self,
        server,
        args: ServeArgs,
        served: ServedModel,
        key_hashes: list[str],
        canary_server=None,
        canary: ServedModel | None = None,
    ):
        self.server, self.args, self.served, self.key_hashes = server, args, served, key_hashes
        self.canary_server, self.canary = canary_server, canary
        self.reconfigure({})
        self._card: dict | None = None
        self.stored_adapters = StoredAdapters(served)

    def reconfigure(self, user_config: dict) -> None:
        """Serve calls this with the deployment's ``user_config`` (AdapterRouting) when a replica starts and, in
        place, whenever it changes: an alias moved or an adapter canary started or ended restarts nothing."""
        self.adapters = AdapterRoutes.of(self.served, parse_routing(user_config, self.args))

    def route(self, body: OpenAIRequest, conversation_id: str | None) -> tuple[object, ServedModel]:
        """The model deployment (and what it serves) answering ``body``: the canary for its share of conversations."""
        if self.canary is not None and answers_as_canary(self.args.canary, body, conversation_id):
            return self.canary_server, self.canary
        return self.server, self.served

    async def model_card(self) -> dict:
        if self._card is None:
            self._card = await self.server.model_card.remote()
        return self._card

    async def model_cards(self) -> list[dict]:
        """The served model's card, then one per LoRA adapter stored for its version (listed from the store)."""
        card = await self.model_card()
        if not self.args.max_adapters_per_replica:
            return [card]
        stored = await self.stored_adapters.get()
        names = sorted({*(stored or ()), *self.adapters.aliases})  # an alias is a model clients may send too
        return [card, *(adapter_card(card, self.served.name, name) for name in names)]

    def model_replicas(self) -> dict:
        """Replica counts of the champion's deployment from Serve's controller (blocking; no replica is asked).

        ``waking_up``: none is running, so a request waits for one to start (min_replicas: 0 scaled it
        to zero while idle, or every replica is being replaced); the chat says so instead of spinning.
        """
        app_name = serve.get_replica_context().app_name
        deployment = serve.status().applications[app_name].deployments[self.server.deployment_name]
        states = {str(getattr(state, "value", state)): count for state, count in deployment.replica_states.items()}
        running = states.get("RUNNING", 0)
        return {"deployment": self.server.deployment_name, "running": running, "replica_states": states,
                "waking_up": running == 0}  # fmt: skip

    # --- asking the model replicas ------------------------------------------------------------
    async def open(self, body: OpenAIRequest, server=None) -> tuple[dict, Delta, object]:
        """Start ``body`` on a replica of ``server`` (default: the champion's): (header, first delta, the rest).

        A replica that is gone before the first token is replaced by another, within the deadline.
        Raises APIError.
        """
        server = server or self.server
        deadline = time.monotonic() + self.args.request_timeout_s
        attempt = 0
        while True:
            stream = server.options(stream=True).generate.remote(body)
            try:
                header = await stream.__anext__()
                first = await stream.__anext__()
                return header, first, stream
            except BaseException as exc:
                stream.cancel()
                attempt += 1
                if isinstance(exc, REPLICA_GONE) and time.monotonic() + attempt < deadline:
                    logger.warning("a model replica failed before the first token (%s); trying another", type(exc))
                    await asyncio.sleep(min(attempt, 5))
                    continue
                raise self._as_api_error(exc) from None

    def _as_api_error(self, exc: BaseException) -> BaseException:
        """The OpenAI error for what a model replica raised; a BaseException (cancellation) as it is."""
        cause = exc.cause if isinstance(exc, RayTaskError) else exc
        if isinstance(cause, APIError) or not isinstance(cause, Exception):
            return cause
        if isinstance(cause, BackPressureError | DeploymentUnavailableError | RayActorError):
            return APIError(
                503,
                "the model server is busy or restarting: retry shortly",
                code="overloaded",
                kind="server_error",
                headers={"Retry-After": str(self.args.retry_after_s)},
            )
        if not isinstance(cause, DeadlineExceeded):
            logger.error("request failed", exc_info=exc)
        return failure(cause, self.args.request_timeout_s)

    async def answer(self, body: OpenAIRequest, chat: bool, conversation_id: str | None = None):
        """The answer to ``body`` from the version routed to; every response (errors too) names that version."""
        base, adapter = split_model_id(body.model)
        if base != self.served.name or (adapter is not None and not self.args.max_adapters_per_replica):
            offered = self.served.name + (f" and its LoRA adapters ({self.served.name}:ADAPTER)" if
                                          self.args.max_adapters_per_replica else "")  # fmt: skip
            raise APIError(
                404,
                f"model {body.model!r} does not exist; this endpoint serves {offered}",
                param="model",
                code="model_not_found",
            )
        sent = body.model
        if adapter is None:
            server, served = self.route(body, conversation_id)
        else:  # adapters are the champion's: the replica loads the stored adapter routed to, and answers as it
            stored = self.adapters.adapter_for(adapter, body, conversation_id)
            server, served = self.server, self.served.with_adapter(stored)
            body = body.model_copy(update={"model": f"{base}{SEPARATOR}{stored}"})
            known = await self.stored_adapters.get()  # None: the store could never be listed; the replica decides
            if known is not None and stored not in known:
                raise APIError(404, f"model {sent!r} does not exist: no adapter {stored!r} is stored for "
                               f"{self.served.label}", param="model", code="model_not_found",
                               headers=served.version_headers)  # fmt: skip
        try:
            return await self._answer(body, chat, server, served, sent)
        except APIError as exc:
            exc.headers = {**(exc.headers or {}), **served.version_headers}
            raise

    async def _answer(self, body: OpenAIRequest, chat: bool, server, served: ServedModel, model: str):
        """``body`` answered by ``server`` as ``served``, the answers naming ``model`` (what the client sent)."""
        from fastapi.responses import JSONResponse

        header, first, stream = await self.open(body, server)
        tools = body.tool_use() if chat else ToolUse()
        answer = _Answer(served, request_id(), chat, header["prompt_tokens"], tools, model=model)
        if body.stream:
            return ClosingStreamingResponse(
                self._events(body, answer, first, stream),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", **served.version_headers},
            )
        retries = 2  # nothing is sent yet: a replica lost mid-answer is asked again
        while True:
            try:
                text, finish, tokens = await _collect(first, stream)
                whole = answer.whole(text, finish, tokens).model_dump(mode="json")
                return JSONResponse(whole, headers=served.version_headers)
            except REPLICA_GONE as exc:
                if not retries:
                    raise self._as_api_error(exc) from None
                retries -= 1
                logger.warning("a model replica failed mid-answer; asking another")
                header, first, stream = await self.open(body, server)
            except BaseException as exc:
                stream.cancel()
                raise self._as_api_error(exc) from None

    async def _events(self, body, answer: _Answer, first: Delta, stream) -> AsyncIterator[str]:
        """The SSE stream; a failure after the headers went out ends it with an error event, as OpenAI does."""
        tokens = 0
        try:
            if answer.chat:
                yield _sse(answer.chunk(DeltaMessage(role="assistant", content=""), None))
            async for chunk, count in _chunks(answer, first, stream):
                tokens = count
                yield _sse(chunk)
        except Exception as exc:
            if isinstance(exc, REPLICA_GONE):
                logger.warning("request %s: the model replica failed mid-stream", answer.request_id)
                error = REPLICA_FAILED
            else:
                error = self._as_api_error(exc)
            yield _sse(error.model())
            return
        finally:
            stream.cancel()  # the client left (or we are done): the replica drops the row
        if body.include_usage:
            yield _sse(answer.usage_chunk(tokens))
        yield "data: [DONE]\n\n"

    # --- HTTP routes, built once per replica ----------------------------------------------------
    def __serve_build_asgi_app__(self):
        return build_api(self)


class ClosingStreamingResponse(StreamingResponse):
    """A StreamingResponse that closes its generator however the response ends.

    Starlette stops iterating when the client leaves (or Serve cancels the request) but leaves
    the generator suspended for the garbage collector to close, which can be a minute later:
    until then the model replica kept decoding the abandoned answer. Closing it here runs its
    ``finally`` (which cancels the replica's stream) at once.
    """

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.body_iterator.aclose()


async def _deltas(first: Delta, stream) -> AsyncIterator[Delta]:
    yield first
    if first.finish_reason:
        return
    async for batch in stream:
        for delta in batch:
            yield delta


async def _chunks(answer: _Answer, first: Delta, stream) -> AsyncIterator[tuple[BaseModel, int]]:
    """The answer's stream chunks, each with the completion tokens so far; tool calls once whole."""
    if answer.tools.required:
        text, finish, tokens = await _collect(first, stream)
        for chunk in answer.tool_chunks(text, finish):
            yield chunk, tokens
        return
    if answer.tools.names:
        async for chunk, tokens in _auto_chunks(answer, first, stream):
            yield chunk, tokens
        return
    async for delta in _deltas(first, stream):
        if delta.text or delta.finish_reason:
            yield answer.chunk(delta.text, delta.finish_reason), delta.completion_tokens


async def _auto_chunks(answer: _Answer, first: Delta, stream) -> AsyncIterator[tuple[BaseModel, int]]:
    """An answer that may call tools ("auto"): its text as it comes, but for what may be a call."""
    reader, finish, tokens = AutoCalls(answer.tools.names, answer.tools.most), "stop", 0
    async for delta in _deltas(first, stream):
        shown = reader.feed(delta.text)
        finish, tokens = delta.finish_reason or finish, delta.completion_tokens
        if shown:
            yield answer.chunk(shown, None), tokens
    rest, calls = reader.finish(finish)
    if rest:
        yield answer.chunk(rest, None), tokens
    for chunk in answer.call_chunks(calls) if calls else [answer.chunk("", finish)]:
        yield chunk, tokens


async def _collect(first: Delta, stream) -> tuple[str, str, int]:
    text, finish, tokens = [], "stop", 0
    async for delta in _deltas(first, stream):
        text.append(delta.text)
        finish, tokens = delta.finish_reason or finish, delta.completion_tokens
    return "".join(text), finish, tokens


def build_api(ingress: OpenAIIngress):
    """The FastAPI app of the ingress, behind the ApiGate (keys, body checks, headers, error shape).

    Module-level on purpose: Serve rewrites routes whose functions are named inside the
    deployment class (it treats them as methods and drops their first parameter).
    """
    from fastapi import FastAPI
    from starlette.exceptions import HTTPException

    app = FastAPI(title="ray-llmops inference API", version="1")
    canary = ingress.canary
    counted = RequestMetrics(ingress.served.label, ingress.served.alias, canary.label if canary else None).start()
    gate = {"key_hashes": ingress.key_hashes, "version_headers": ingress.served.version_headers,
            "limits": ingress.args.limits(), "on_response": counted}  # fmt: skip
    app.add_middleware(ApiGate, **gate)

    @app.exception_handler(APIError)
    async def _api_error(_request: Request, exc: APIError):
        return exc.response()

    @app.exception_handler(HTTPException)
    async def _http_error(_request: Request, exc: HTTPException):  # unknown paths (404) and the like
        return error_response(exc.status_code, str(exc.detail), code=_HTTP_CODES.get(exc.status_code))

    @app.get("/healthz")
    async def healthz():
        return {"status": "ok", "model": ingress.served.name, "version": ingress.served.label}

    @app.get("/v1/models")
    async def models():
        return ModelList(data=await ingress.model_cards()).model_dump()

    @app.get("/v1/replicas")
    async def replicas():  # a ray-llmops extension: how many model replicas are up, without waking one
        return await asyncio.to_thread(ingress.model_replicas)

    @app.get("/v1/stats")
    async def stats():  # a ray-llmops extension: one model replica's decode loop and admission counters
        listings = (
            {"adapter_listings": ingress.stored_adapters.listings} if ingress.args.max_adapters_per_replica else {}
        )
        return {"version": ingress.served.label, **await ingress.server.batching_stats.remote(), **listings}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await ingress.answer(request.scope[BODY_KEY], True, request.headers.get(CONVERSATION_HEADER))

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await ingress.answer(request.scope[BODY_KEY], False, request.headers.get(CONVERSATION_HEADER))

    return app


_HTTP_CODES = {404: "not_found", 405: "method_not_allowed"}


class _Answer:
    """The OpenAI bodies of one answer (ray_app.serving.responses): whole, or chunk by chunk."""

    def __init__(self, served: ServedModel, request_id: str, chat: bool, prompt_tokens: int, tools=None, model=None):
        self.request_id, self.chat, self.prompt_tokens = request_id, chat, prompt_tokens
        self.tools = tools or ToolUse()  # how the answer is read for tool calls (ray_app.serving.tools)
        self.common = {
            "id": f"{'chatcmpl' if chat else 'cmpl'}-{request_id}",
            "created": int(time.time()),
            "model": model or served.name,  # NAME, or NAME:ADAPTER
            "system_fingerprint": served.label,
        }

    def whole(self, text: str, finish: str, tokens: int) -> ChatCompletion | Completion:
        usage = Usage.of(self.prompt_tokens, tokens)
        if not self.chat:
            return Completion(**self.common, choices=[TextChoice(text=text, finish_reason=finish)], usage=usage)
        content, calls = self._message(text, finish)
        message = AssistantMessage(content=content, tool_calls=calls or None)
        choice = ChatChoice(message=message, finish_reason="tool_calls" if calls else finish)
        return ChatCompletion(**self.common, choices=[choice], usage=usage)

    def _message(self, text: str, finish: str) -> tuple[str | None, list[ToolCall]]:
        """The message's content and its tool calls (none: a text answer, or one cut short by max_tokens)."""
        if finish != "stop":
            return text, []
        if self.tools.required:
            calls = tool_calls(text)
            return (None, calls) if calls else (text, [])
        if self.tools.names:
            return parse_calls(text, self.tools.names, self.tools.most)
        return text, []

    def tool_chunks(self, text: str, finish: str) -> list[ChatCompletionChunk]:
        """A whole required answer as stream chunks: its calls, or (cut short) its text."""
        calls = self._message(text, finish)[1]
        return self.call_chunks(calls) if calls else [self.chunk(text, None), self.chunk("", finish)]

    def call_chunks(self, calls: list[ToolCall]) -> list[ChatCompletionChunk]:
        """Tool calls as stream chunks: per call its id and name, then its arguments; then the finish."""
        chunks = []
        for index, call in enumerate(calls):
            named = ToolCallDelta(index=index, id=call.id, type="function",
                                  function=FunctionCallDelta(name=call.function.name, arguments=""))  # fmt: skip
            arguments = ToolCallDelta(index=index, function=FunctionCallDelta(arguments=call.function.arguments))
            chunks += [self.chunk(DeltaMessage(tool_calls=[named]), None),
                       self.chunk(DeltaMessage(tool_calls=[arguments]), None)]  # fmt: skip
        return [*chunks, self.chunk("", "tool_calls")]

    def chunk(self, delta: DeltaMessage | str, finish: str | None) -> ChatCompletionChunk | Completion:
        if self.chat:
            message = delta if isinstance(delta, DeltaMessage) else DeltaMessage(content=delta or None)
            return ChatCompletionChunk(**self.common, choices=[ChatChunkChoice(delta=message, finish_reason=finish)])
        return Completion(**self.common, choices=[TextChoice(text=delta, finish_reason=finish)])

    def usage_chunk(self, tokens: int) -> ChatCompletionChunk | Completion:
        usage = Usage.of(self.prompt_tokens, tokens)
        kind = ChatCompletionChunk if self.chat else Completion
        return kind(**self.common, choices=[], usage=usage)


def request_id() -> str:
    try:  # Serve's id, the one in its access log and in the x-request-id response header
        request_id = serve.context._get_serve_request_context().request_id
    except Exception:  # private API; a fresh id still makes the logs joinable
        request_id = ""
    return request_id or uuid.uuid4().hex


def _sse(payload: BaseModel) -> str:
    return f"data: {payload.model_dump_json()}\n\n"

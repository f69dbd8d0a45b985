"""The Serve application: an OpenAI-compatible API in front of a chat model.

`serve run serve_configs/local.yaml` calls :func:`build_app` with the config's ``args``.
The app pins the model when it is built (``models:/NAME@champion`` becomes one registry
version, so all replicas answer with the same weights), then each replica loads it once.

Endpoints: ``POST /v1/chat/completions``, ``POST /v1/completions`` (both with ``stream``),
``GET /v1/models`` and ``GET /healthz``. Every ``/v1`` call needs ``Authorization: Bearer
<key>``; every answer names the model version and MLflow run in the ``x-model-version`` /
``x-mlflow-run-id`` headers and in ``system_fingerprint``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from ray import serve
from ray.serve import Application

from ray_app.credentials import as_serve_identity, kept_out_of_runtime_envs, serve_api_keys
from ray_app.serving.config import ServeArgs, ServedModel, parse_args, pin_model
from ray_app.serving.engine import Delta, GenerationRequest, SamplingParams
from ray_app.serving.protocol import (
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    bearer_key_error,
    error_response,
    hash_key,
)
from ray_app.settings import get_settings

logger = logging.getLogger("ray.serve")

DEPLOYMENT_NAME = "ChatServer"


@serve.deployment(
    name=DEPLOYMENT_NAME,
    # Generation requests are long; a replica takes a whole batch at once, and more queue there.
    max_ongoing_requests=32,
    autoscaling_config={"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 8},
    ray_actor_options={"num_cpus": 1},
    graceful_shutdown_wait_loop_s=2,
    graceful_shutdown_timeout_s=120,
)
@serve.ingress()
class ChatServer:
    """One replica: the model in memory, an engine that batches, and the HTTP routes."""

    def __init__(self, args: ServeArgs, served: ServedModel, key_hashes: list[str]):
        import ray
        import torch

        from ray_app.models import resolve_model
        from ray_app.serving.engine import ContinuousBatcher, TransformersEngine

        self.args, self.served, self.key_hashes = args, served, key_hashes
        device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
        threads = args.torch_threads or max(1, int(ray.get_runtime_context().get_assigned_resources().get("CPU", 1)))
        started = time.monotonic()

        def build() -> TransformersEngine:
            # On the batcher's thread, where it decodes: all torch work of this process on one
            # thread (see ContinuousBatcher). Resolving may convert the default model with torch.
            model_dir = resolve_model(served.source, as_serve_identity(get_settings()))
            return TransformersEngine(
                model_dir, device=device, dtype=args.dtype, threads=threads, prepack=args.prepack_weights
            )

        self.batcher = ContinuousBatcher(build, args.max_batch_size, gather_s=args.batch_wait_timeout_s)
        self.engine = self.batcher.engine
        self.context = min(args.max_context or self.engine.context_length, self.engine.context_length)
        self.headers = {"x-model-version": served.label, "x-mlflow-run-id": served.run_id or ""}
        self._metrics()
        logger.info(
            "serving %s (%s) from %s on %s with %d thread(s), %d prepacked linear layers, loaded in %.1fs",
            served.name,
            served.label,
            self.engine.model_dir,
            device,
            threads,
            self.engine.prepacked,
            time.monotonic() - started,
        )

    def _metrics(self) -> None:
        from ray.serve.metrics import Counter, Histogram

        # Serve adds its own tags into the dict it is given: one dict per metric.
        self.tokens_counter = Counter("llmops_generated_tokens", "tokens generated", tag_keys=("model_version",))
        self.tokens_counter.set_default_tags({"model_version": self.served.label})
        self.ttft = Histogram(
            "llmops_time_to_first_token_s",
            "time to first token (s)",
            boundaries=[0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10],
            tag_keys=("model_version",),
        )
        self.ttft.set_default_tags({"model_version": self.served.label})

    # --- batching: one decode loop per replica; a new request joins it at the next step ------
    async def _stream(self, request: GenerationRequest) -> AsyncIterator[Delta]:
        started = time.monotonic()
        first = True
        loop = asyncio.get_running_loop()
        deltas: asyncio.Queue[Delta | BaseException] = asyncio.Queue()
        self.batcher.submit(request, lambda item: loop.call_soon_threadsafe(deltas.put_nowait, item))
        try:
            while True:
                delta = await deltas.get()
                if isinstance(delta, BaseException):
                    raise delta
                if first and delta.text:
                    self.ttft.observe(time.monotonic() - started)
                    first = False
                yield delta
                if delta.finish_reason:
                    self.tokens_counter.inc(delta.completion_tokens)
                    return
        finally:
            request.cancelled.set()  # the client left (or we are done): the loop drops the row

    def batching_stats(self) -> dict[str, int]:
        """The decode loop's counters (a handle method, for benchmarks and debugging)."""
        return dataclasses.asdict(self.batcher.stats)

    def __del__(self):
        batcher = getattr(self, "batcher", None)
        if batcher is not None:
            batcher.stop()

    # --- request checks ---------------------------------------------------------------------
    def authorize(self, authorization: str | None) -> None:
        reason = bearer_key_error(authorization, self.key_hashes)
        if reason:
            raise APIError(401, reason, code="invalid_api_key")

    def plan(self, body: ChatCompletionRequest | CompletionRequest, prompt_ids: list[int]) -> GenerationRequest:
        if body.model != self.served.name:
            raise APIError(
                404,
                f"model {body.model!r} does not exist; this endpoint serves {self.served.name!r}",
                param="model",
                code="model_not_found",
            )
        prompt = len(prompt_ids)
        if prompt >= self.context:
            raise APIError(
                400,
                f"prompt is {prompt} tokens; this model's context is {self.context} tokens",
                param="messages" if isinstance(body, ChatCompletionRequest) else "prompt",
                code="context_length_exceeded",
            )
        if body.max_tokens is not None and body.max_tokens > self.args.max_tokens_limit:
            raise APIError(
                400,
                f"max_tokens {body.max_tokens} is above this server's limit of {self.args.max_tokens_limit}",
                param="max_tokens",
            )
        if body.max_tokens is not None and prompt + body.max_tokens > self.context:
            raise APIError(
                400,
                f"prompt ({prompt} tokens) + max_tokens ({body.max_tokens}) exceeds this model's "
                f"context of {self.context} tokens",
                param="max_tokens",
                code="context_length_exceeded",
            )
        max_tokens = body.max_tokens or min(self.args.default_max_tokens, self.context - prompt)
        params = SamplingParams(
            max_tokens=max_tokens,
            temperature=body.temperature,
            top_p=body.top_p,
            stop=list(body.stop or []),
            seed=body.seed,
        )
        return GenerationRequest(prompt_ids, params)

    # --- responses ----------------------------------------------------------------------------
    async def respond(self, body: ChatCompletionRequest | CompletionRequest, request: GenerationRequest, chat: bool):
        from fastapi.responses import JSONResponse, StreamingResponse

        request_id = _request_id()
        kind = "chat.completion" if chat else "text_completion"
        common = {
            "id": f"{'chatcmpl' if chat else 'cmpl'}-{request_id}",
            "created": int(time.time()),
            "model": self.served.name,
            "system_fingerprint": self.served.label,
        }
        prompt_tokens = len(request.prompt_ids)
        if not body.stream:
            text, finish, tokens = [], "stop", 0
            async for delta in self._stream(request):
                text.append(delta.text)
                finish, tokens = delta.finish_reason or finish, delta.completion_tokens
            answer = "".join(text)
            choice = (
                {"index": 0, "message": {"role": "assistant", "content": answer}, "finish_reason": finish}
                if chat
                else {"index": 0, "text": answer, "finish_reason": finish, "logprobs": None}
            )
            self._log(request_id, prompt_tokens, tokens, finish)
            return JSONResponse(
                {**common, "object": kind, "choices": [choice], "usage": _usage(prompt_tokens, tokens)},
                headers=self.headers,
            )

        async def events() -> AsyncIterator[str]:
            chunk_kind = "chat.completion.chunk" if chat else "text_completion"
            if chat:
                yield _sse(
                    {
                        **common,
                        "object": chunk_kind,
                        "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}],
                    }
                )
            tokens, finish = 0, None
            try:
                async for delta in self._stream(request):
                    tokens, finish = delta.completion_tokens, delta.finish_reason
                    if not delta.text and not finish:
                        continue
                    choice = (
                        {"index": 0, "delta": {"content": delta.text} if delta.text else {}, "finish_reason": finish}
                        if chat
                        else {"index": 0, "text": delta.text, "finish_reason": finish, "logprobs": None}
                    )
                    yield _sse({**common, "object": chunk_kind, "choices": [choice]})
            except Exception as exc:  # headers are gone: report in-band, as OpenAI does
                logger.exception("generation failed for request %s", request_id)
                yield _sse(
                    {
                        "error": {
                            "message": f"generation failed: {exc.__class__.__name__}",
                            "type": "server_error",
                            "param": None,
                            "code": None,
                        }
                    }
                )
                return
            if body.include_usage:
                yield _sse({**common, "object": chunk_kind, "choices": [], "usage": _usage(prompt_tokens, tokens)})
            yield "data: [DONE]\n\n"
            self._log(request_id, prompt_tokens, tokens, finish)

        return StreamingResponse(
            events(), media_type="text/event-stream", headers={**self.headers, "Cache-Control": "no-cache"}
        )

    def _log(self, request_id: str, prompt: int, completion: int, finish: str | None) -> None:
        # Never the text: prompts and answers may be personal data.
        logger.info(
            "request %s: %s prompt=%d completion=%d finish=%s",
            request_id,
            self.served.label,
            prompt,
            completion,
            finish,
        )

    # --- HTTP routes, built once per replica with access to its state ---------------------------
    def __serve_build_asgi_app__(self):
        return build_api(self)


def build_api(server: ChatServer):
    """The FastAPI app of one replica.

    Module-level on purpose: Serve rewrites routes whose functions are named inside the
    deployment class (it treats them as methods and drops their first parameter).
    """
    from fastapi import FastAPI, Header, Request
    from fastapi.exceptions import RequestValidationError

    app = FastAPI(title="ray-llmops inference API", version="1")

    @app.exception_handler(APIError)
    async def _api_error(_request: Request, exc: APIError):
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid_body(_request: Request, exc: RequestValidationError):
        return error_response(400, _validation_message(exc), param=_validation_param(exc))

    @app.get("/healthz")
    async def healthz():
        return {"status": "ok", "model": server.served.name, "version": server.served.label}

    @app.get("/v1/models")
    async def models(authorization: str | None = Header(default=None)):
        server.authorize(authorization)
        card = {
            "id": server.served.name,
            "object": "model",
            "created": 0,
            "owned_by": "ray-llmops",
            "version": server.served.label,
            "run_id": server.served.run_id,
            "max_model_len": server.context,
            "max_tokens_limit": server.args.max_tokens_limit,
        }
        return {"object": "list", "data": [card]}

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, authorization: str | None = Header(default=None)):
        server.authorize(authorization)
        request = server.plan(body, server.engine.chat_prompt_ids(body.chat_messages()))
        return await server.respond(body, request, chat=True)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, authorization: str | None = Header(default=None)):
        server.authorize(authorization)
        request = server.plan(body, server.engine.text_prompt_ids(body.prompt))
        return await server.respond(body, request, chat=False)

    return app


def _request_id() -> str:
    try:  # Serve's id, the one in its access log and in the x-request-id response header
        request_id = serve.context._get_serve_request_context().request_id
    except Exception:  # private API; a fresh id still makes the logs joinable
        request_id = ""
    return request_id or uuid.uuid4().hex


def _usage(prompt: int, completion: int) -> dict[str, int]:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _sse(payload: dict) -> str:
    return f"data: {json.dumps(payload, separators=(',', ':'))}\n\n"


def _validation_param(exc) -> str | None:
    for error in exc.errors():
        loc = [str(part) for part in error.get("loc", ()) if part != "body"]
        if loc:
            return ".".join(loc)
    return None


def _validation_message(exc) -> str:
    parts = []
    for error in exc.errors():
        loc = ".".join(str(part) for part in error.get("loc", ()) if part != "body")
        message = str(error.get("msg", "invalid")).removeprefix("Value error, ")
        parts.append(f"{loc}: {message}" if loc else message)
    return "invalid request body: " + "; ".join(parts)


def _key_hashes(args: ServeArgs) -> list[str]:
    if args.allow_unauthenticated:
        logger.warning("the inference API is OPEN: allow_unauthenticated is set")
        return []
    keys = [key.get_secret_value() for key in args.api_keys] if args.api_keys else serve_api_keys(get_settings())
    return [hash_key(key) for key in keys]


def build_app(args: dict[str, Any] | None = None) -> Application:
    """The Serve application for ``args`` (see :class:`ServeArgs`); raises ServeConfigError on bad args."""
    parsed = parse_args(args)
    settings = as_serve_identity(get_settings())  # Serve reads the registry; it never writes to it
    served = pin_model(parsed, settings)
    if parsed.engine == "vllm":
        from ray_app.serving.vllm_app import build_vllm_app

        with kept_out_of_runtime_envs():  # Serve LLM copies HF tokens into its engines' runtime envs
            return build_vllm_app(parsed, served, _key_hashes(parsed), settings)
    return ChatServer.bind(parsed, served, _key_hashes(parsed))

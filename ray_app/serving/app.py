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

import dataclasses
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request
from ray import serve
from ray.serve import Application

from ray_app.credentials import as_serve_identity, kept_out_of_runtime_envs, serve_api_keys
from ray_app.serving.admission import Admission, DeadlineExceeded, Generation, failure
from ray_app.serving.config import ServeArgs, ServedModel, parse_args, pin_model
from ray_app.serving.engine import Delta, GenerationRequest, SamplingParams
from ray_app.serving.gate import BODY_KEY, ApiGate
from ray_app.serving.protocol import APIError, ChatCompletionRequest, CompletionRequest, error_response, hash_key
from ray_app.settings import get_settings

logger = logging.getLogger("ray.serve")

DEPLOYMENT_NAME = "ChatServer"


@serve.deployment(
    name=DEPLOYMENT_NAME,
    # Above the replica's own admission bound (max_batch_size + max_queued_requests, ray_app.serving.admission),
    # so that overload is answered by the replica in OpenAI's error JSON; the proxy's queue is the last line.
    max_ongoing_requests=64,
    max_queued_requests=256,
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
        self.admission = Admission(
            capacity=args.max_batch_size + args.max_queued_requests,
            timeout_s=args.request_timeout_s,
            retry_after_s=args.retry_after_s,
        )
        self.engine = self.batcher.engine
        self.context = min(args.max_context or self.engine.context_length, self.engine.context_length)
        self.limits = args.limits()
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

    def batching_stats(self) -> dict[str, int]:
        """The decode loop's and admission's counters (a handle method, for benchmarks, tests and debugging)."""
        admitted = {"active_requests": self.admission.active, "rejected_requests": self.admission.rejected}
        return {**dataclasses.asdict(self.batcher.stats), **admitted}

    def __del__(self):
        batcher = getattr(self, "batcher", None)
        if batcher is not None:
            batcher.stop()

    # --- request checks (keys, body and limits are the ApiGate's) ------------------------------
    def chat_prompt_ids(self, body: ChatCompletionRequest) -> list[int]:
        from jinja2 import TemplateError

        try:
            return self.engine.chat_prompt_ids(body.chat_messages())
        except TemplateError as exc:  # templates may refuse e.g. roles that do not alternate
            raise APIError(400, f"messages: this model's chat template refused them: {exc}", param="messages") from None

    def plan(self, body: ChatCompletionRequest | CompletionRequest, prompt_ids: list[int]) -> GenerationRequest:
        if body.model != self.served.name:
            raise APIError(
                404,
                f"model {body.model!r} does not exist; this endpoint serves {self.served.name!r}",
                param="model",
                code="model_not_found",
            )
        prompt = len(prompt_ids)
        if prompt == 0:  # e.g. a prompt of control characters the tokenizer drops
            raise APIError(
                400,
                "the prompt is empty once tokenized: send some text",
                param="messages" if isinstance(body, ChatCompletionRequest) else "prompt",
            )
        if prompt >= self.context:
            raise APIError(
                400,
                f"prompt is {prompt} tokens; this model's context is {self.context} tokens",
                param="messages" if isinstance(body, ChatCompletionRequest) else "prompt",
                code="context_length_exceeded",
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
            temperature=body.sampling_temperature,
            top_p=body.sampling_top_p,
            stop=list(body.stop or []),
            seed=body.seed,
        )
        return GenerationRequest(prompt_ids, params)

    # --- responses ----------------------------------------------------------------------------
    async def respond(self, body: ChatCompletionRequest | CompletionRequest, request: GenerationRequest, chat: bool):
        """Admit ``request`` (503 when full), wait for its first token (503 past the deadline), then answer."""
        from fastapi.responses import StreamingResponse

        generation = self.admission.admit(self.batcher, request)
        try:
            first = await generation.first()  # APIError: 503 past the deadline, 500 if the row failed
        except BaseException:  # also the client leaving (CancelledError)
            generation.close()
            raise
        self.ttft.observe(time.monotonic() - generation.arrived)
        answer = _Answer(self.served, _request_id(), chat, len(request.prompt_ids))
        if not body.stream:
            try:
                return await self._complete(answer, generation, first)
            finally:
                generation.close()
        return StreamingResponse(
            self._events(body, answer, generation, first),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache"},
        )

    async def _complete(self, answer: _Answer, generation: Generation, first: Delta):
        from fastapi.responses import JSONResponse

        text, finish, tokens = [], "stop", 0
        try:
            async for delta in generation.deltas(first):
                text.append(delta.text)
                finish, tokens = delta.finish_reason or finish, delta.completion_tokens
        except Exception as exc:
            self._failed(answer, exc)
            raise failure(exc, self.admission.timeout_s) from None
        self._finished(answer, tokens, finish)
        return JSONResponse(answer.whole("".join(text), finish, tokens))

    async def _events(self, body, answer: _Answer, generation: Generation, first: Delta) -> AsyncIterator[str]:
        """The SSE stream; a failure after the headers went out ends it with an error event, as OpenAI does."""
        tokens, finish = 0, None
        try:
            if answer.chat:
                yield _sse(answer.chunk({"role": "assistant", "content": ""}, None))
            async for delta in generation.deltas(first):
                tokens, finish = delta.completion_tokens, delta.finish_reason
                if delta.text or finish:
                    yield _sse(answer.chunk(delta.text, finish))
        except Exception as exc:
            self._failed(answer, exc)
            yield _sse(failure(exc, self.admission.timeout_s).body())
            return
        finally:
            generation.close()  # also when the client left: the loop drops the row at its next step
        if body.include_usage:
            yield _sse(answer.usage_chunk(tokens))
        yield "data: [DONE]\n\n"
        self._finished(answer, tokens, finish)

    def _finished(self, answer: _Answer, tokens: int, finish: str | None) -> None:
        self.tokens_counter.inc(tokens)
        self._log(answer.request_id, answer.prompt_tokens, tokens, finish)

    def _failed(self, answer: _Answer, exc: BaseException) -> None:
        if isinstance(exc, DeadlineExceeded):
            logger.warning("request %s: deadline of %gs passed", answer.request_id, self.admission.timeout_s)
        else:
            logger.error("request %s: generation failed", answer.request_id, exc_info=exc)

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
    """The FastAPI app of one replica, behind the ApiGate (keys, body checks, headers, error shape).

    Module-level on purpose: Serve rewrites routes whose functions are named inside the
    deployment class (it treats them as methods and drops their first parameter).
    """
    from fastapi import FastAPI
    from starlette.exceptions import HTTPException

    app = FastAPI(title="ray-llmops inference API", version="1")
    gate = {"key_hashes": server.key_hashes, "version_headers": server.served.version_headers, "limits": server.limits}
    app.add_middleware(ApiGate, **gate)

    @app.exception_handler(APIError)
    async def _api_error(_request: Request, exc: APIError):
        return exc.response()

    @app.exception_handler(HTTPException)
    async def _http_error(_request: Request, exc: HTTPException):  # unknown paths (404) and the like
        return error_response(exc.status_code, str(exc.detail), code=_HTTP_CODES.get(exc.status_code))

    @app.get("/healthz")
    async def healthz():
        return {"status": "ok", "model": server.served.name, "version": server.served.label}

    @app.get("/v1/models")
    async def models():
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

    @app.get("/v1/stats")
    async def stats():  # a ray-llmops extension: this replica's decode loop and admission counters
        return {"version": server.served.label, **server.batching_stats()}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body: ChatCompletionRequest = request.scope[BODY_KEY]
        server.admission.check()  # before tokenizing: a full replica sheds load cheaply
        generation = server.plan(body, server.chat_prompt_ids(body))
        return await server.respond(body, generation, chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request):
        body: CompletionRequest = request.scope[BODY_KEY]
        server.admission.check()
        generation = server.plan(body, server.engine.text_prompt_ids(body.prompt))
        return await server.respond(body, generation, chat=False)

    return app


_HTTP_CODES = {404: "not_found", 405: "method_not_allowed"}


class _Answer:
    """The OpenAI bodies of one answer: whole, or chunk by chunk."""

    def __init__(self, served: ServedModel, request_id: str, chat: bool, prompt_tokens: int):
        self.request_id, self.chat, self.prompt_tokens = request_id, chat, prompt_tokens
        self.common = {
            "id": f"{'chatcmpl' if chat else 'cmpl'}-{request_id}",
            "created": int(time.time()),
            "model": served.name,
            "system_fingerprint": served.label,
        }

    def whole(self, text: str, finish: str, tokens: int) -> dict:
        choice = (
            {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}
            if self.chat
            else {"index": 0, "text": text, "finish_reason": finish, "logprobs": None}
        )
        kind = "chat.completion" if self.chat else "text_completion"
        return {**self.common, "object": kind, "choices": [choice], "usage": _usage(self.prompt_tokens, tokens)}

    def chunk(self, delta: str | dict, finish: str | None) -> dict:
        if self.chat:
            content = delta if isinstance(delta, dict) else ({"content": delta} if delta else {})
            choice = {"index": 0, "delta": content, "finish_reason": finish}
        else:
            choice = {"index": 0, "text": delta, "finish_reason": finish, "logprobs": None}
        return {**self.common, "object": self._chunk_kind, "choices": [choice]}

    def usage_chunk(self, tokens: int) -> dict:
        return {**self.common, "object": self._chunk_kind, "choices": [], "usage": _usage(self.prompt_tokens, tokens)}

    @property
    def _chunk_kind(self) -> str:
        return "chat.completion.chunk" if self.chat else "text_completion"


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

"""The Serve application: an OpenAI-compatible API in front of a chat model.

`serve run serve_configs/local.yaml` calls :func:`build_app` with the config's ``args``.
The app pins the model when it is built (``models:/NAME@champion`` becomes one registry
version, so all replicas answer with the same weights), then each replica loads it once.

Two deployments: ``OpenAIIngress`` (``ray_app.serving.ingress``: HTTP, the ApiGate, OpenAI's
bodies and events) and ``ChatServer`` (here: the model, its decode loop and its admission),
which the ingress asks through a streaming handle and which autoscales on ongoing requests.

Endpoints: ``POST /v1/chat/completions``, ``POST /v1/completions`` (both with ``stream``),
``GET /v1/models``, ``GET /v1/stats`` and ``GET /healthz``. Every ``/v1`` call needs
``Authorization: Bearer <key>``; every answer names the model version and MLflow run in the
``x-model-version`` / ``x-mlflow-run-id`` headers and in ``system_fingerprint``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from ray import serve
from ray.serve import Application

from ray_app.adapters import AdapterNotFound, fetch_adapter, split_model_id
from ray_app.credentials import as_serve_identity, kept_out_of_runtime_envs, serve_api_keys
from ray_app.models import resolve_model
from ray_app.serving.admission import Admission, DeadlineExceeded
from ray_app.serving.config import ServeArgs, ServedModel, parse_args, pin_canary, pin_model
from ray_app.serving.engine import ContinuousBatcher, Delta, GenerationRequest, SamplingParams, TransformersEngine
from ray_app.serving.ingress import OpenAIIngress, request_id
from ray_app.serving.lora import Adapter, AdapterError, check_adapter
from ray_app.serving.metrics import ReplicaMetrics
from ray_app.serving.openvino_engine import OpenVINOBatcher, OpenVINOEngine
from ray_app.serving.openvino_export import lora_base_model, openvino_model
from ray_app.serving.protocol import APIError, ChatCompletionRequest, CompletionRequest, hash_key
from ray_app.serving.responses import ModelCard
from ray_app.serving.structured import SchemaError, check_schema
from ray_app.settings import get_settings

logger = logging.getLogger("ray.serve")

DEPLOYMENT_NAME = "ChatServer"
CANARY_DEPLOYMENT_NAME = "ChatServerCanary"


@serve.deployment(
    name=DEPLOYMENT_NAME,
    # Above the replica's own admission bound (max_batch_size + max_queued_requests, ray_app.serving.admission),
    # so that overload is answered by the replica; the ingress's handle queues at most 256 more (then 503).
    max_ongoing_requests=64,
    max_queued_requests=256,
    autoscaling_config={"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 8},
    ray_actor_options={"num_cpus": 1},
    graceful_shutdown_wait_loop_s=2,
    graceful_shutdown_timeout_s=120,
)
class ChatServer:
    """One model replica: the model in memory, an engine that batches, and its admission."""

    def __init__(self, args: ServeArgs, served: ServedModel):
        import ray

        self.args, self.served = args, served
        device = _device(args)
        threads = args.torch_threads or max(1, int(ray.get_runtime_context().get_assigned_resources().get("CPU", 1)))
        started = time.monotonic()
        self.batcher = _batcher(args, served, device, threads)
        self.admission = Admission(
            capacity=args.max_batch_size + args.max_queued_requests,
            timeout_s=args.request_timeout_s,
            retry_after_s=args.retry_after_s,
        )
        self.engine = self.batcher.engine
        self.context = min(args.max_context or self.engine.context_length, self.engine.context_length)
        self.metrics = ReplicaMetrics(served.label, self.batcher.occupancy)
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

    def batching_stats(self) -> dict[str, int]:
        """The decode loop's and admission's counters (a handle method, for benchmarks, tests and debugging)."""
        waiting, running = self.batcher.occupancy()
        admitted = {"active_requests": self.admission.active, "rejected_requests": self.admission.rejected,
                    "waiting_requests": waiting, "running_rows": running}  # fmt: skip
        lora = getattr(self.engine, "lora", None)
        adapters = {"adapters_loaded": len(lora.loaded), "adapter_loads": lora.loads,
                    "adapter_unloads": lora.unloads} if lora is not None else {}  # fmt: skip
        return {**dataclasses.asdict(self.batcher.stats), **admitted, **adapters}

    def check_health(self) -> None:
        """Serve's periodic health check: a replica whose decode loop ended (its engine died) is replaced."""
        if not self.batcher.alive():
            raise RuntimeError("the replica's decode loop has ended")

    def __del__(self):
        for part in (getattr(self, "metrics", None), getattr(self, "batcher", None)):
            if part is not None:
                part.stop()

    # --- request checks (keys, body, limits and the model name are the ingress's) --------------
    def chat_prompt_ids(self, body: ChatCompletionRequest) -> list[int]:
        from jinja2 import TemplateError

        try:
            return self.engine.chat_prompt_ids(body.chat_messages(), body.functions_offered())
        except TemplateError as exc:  # templates may refuse e.g. roles that do not alternate
            raise APIError(400, f"messages: this model's chat template refused them: {exc}", param="messages") from None

    async def adapter(self, model: str) -> Adapter | None:
        """The LoRA adapter ``model`` names (``NAME:ADAPTER``), fetched from the store on first use; 404 if none."""
        name = split_model_id(model)[1]
        if name is None:
            return None
        settings = as_serve_identity(get_settings())
        try:
            folder = await asyncio.to_thread(fetch_adapter, self.served.registry_name, self.served.version, name,
                                             settings)  # fmt: skip
        except (AdapterNotFound, ValueError) as exc:
            message = f"model {model!r} does not exist: {exc}"
            raise APIError(404, message, param="model", code="model_not_found") from None
        try:
            check_adapter(folder)
        except AdapterError as exc:
            raise APIError(400, f"model {model!r} cannot be served: {exc}", param="model") from None
        return Adapter(name, folder)

    def plan(self, body: ChatCompletionRequest | CompletionRequest, prompt_ids: list[int]) -> GenerationRequest:
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
            json_schema=_json_schema(body),
        )
        return GenerationRequest(prompt_ids, params)

    # --- generation (called by the ingress through a streaming handle) --------------------------
    async def generate(self, body: ChatCompletionRequest | CompletionRequest) -> AsyncIterator[dict | Delta | list]:
        """Yield ``{"prompt_tokens": n}``, the first Delta, then lists of the Deltas that came within each
        ``stream_interval_ms``, streamed or not: a replica that sent nothing until the whole answer was
        done did not always notice a caller that left (CI: an abandoned answer decoded to its end).

        Raises APIError before the first yield: 503 when this replica is full (before tokenizing)
        or when no first token came before the deadline; 400 for what only the model can check (context).
        """
        self.admission.check()
        chat = isinstance(body, ChatCompletionRequest)
        prompt_ids = self.chat_prompt_ids(body) if chat else self.engine.text_prompt_ids(body.prompt)
        adapter = await self.adapter(body.model)
        request = dataclasses.replace(self.plan(body, prompt_ids), adapter=adapter)
        label = self.served.with_adapter(adapter.name).label if adapter else None  # metrics per adapter
        generation = self.admission.admit(self.batcher, request)
        tokens, finish, first_at = 0, None, None
        try:
            delta = await generation.first()
            first_at = time.monotonic()
            self.metrics.first_token(first_at - generation.arrived, label)
            yield {"prompt_tokens": len(prompt_ids)}
            yield delta
            if not delta.finish_reason:
                async for batch in generation.batches(self.args.stream_interval_ms / 1000):
                    delta = batch[-1]
                    yield batch
            tokens, finish = delta.completion_tokens, delta.finish_reason
        except DeadlineExceeded:
            logger.warning("a request's deadline of %gs passed", self.admission.timeout_s)
            raise
        finally:
            generation.close()  # also when the caller cancelled (the client left)
            decode_s = time.monotonic() - first_at if first_at is not None else 0.0
            self.metrics.answered(len(prompt_ids), tokens, decode_s, label)
            self._log(request_id(), label or self.served.label, len(prompt_ids), tokens, finish)

    async def model_card(self) -> dict:
        card = ModelCard(id=self.served.name, version=self.served.label, run_id=self.served.run_id,
                         max_model_len=self.context, max_tokens_limit=self.args.max_tokens_limit)  # fmt: skip
        return card.model_dump()

    def _log(self, request_id: str, label: str, prompt: int, completion: int, finish: str | None) -> None:
        # Never the text: prompts and answers may be personal data.
        logger.info(
            "request %s: %s prompt=%d completion=%d finish=%s",
            request_id,
            label,
            prompt,
            completion,
            finish,
        )


def _json_schema(body: ChatCompletionRequest | CompletionRequest) -> str | None:
    """The schema a chat answer is constrained to (a required tool call's, or ``response_format``'s),
    checked: 400 naming the field when it cannot be."""
    if not isinstance(body, ChatCompletionRequest):
        return None
    if body.calls_tools:
        schema, field = body.calls_schema(), "tools"
    else:
        response_format = body.response_format
        schema = response_format.schema_text() if response_format is not None else None
        field = "response_format"
    if schema is not None:
        try:
            check_schema(schema)
        except SchemaError as exc:
            where = "tools: a function's parameters: " if field == "tools" else "response_format.json_schema."
            raise APIError(400, f"{where}{exc}", param=field) from None
    return schema


def _device(args: ServeArgs) -> str:
    """The replica's device: engine openvino is CPU only (no torch import: a cold start saves it)."""
    if args.engine == "openvino":
        return "cpu"  # device: cuda with it is refused when the args are parsed
    if args.device != "auto":
        return args.device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _batcher(args: ServeArgs, served: ServedModel, device: str, threads: int) -> ContinuousBatcher | OpenVINOBatcher:
    """The replica's engine and decode loop for ``args.engine``, built on the loop's own thread.

    On that thread all torch (or OpenVINO) work of the process runs (see ContinuousBatcher);
    resolving may convert the default model with torch, and engine openvino converts the model to
    its IR once (cached by content).
    """

    def model_dir() -> Path:
        return resolve_model(served.source, as_serve_identity(get_settings()))

    if args.engine == "openvino":

        def build_openvino() -> OpenVINOEngine:
            settings, folder, weights = as_serve_identity(get_settings()), model_dir(), args.openvino_weights
            ir_dir = openvino_model(folder, settings, weights, source=served.source)
            adapters = args.max_adapters_per_replica
            adapter_ir = lora_base_model(folder, settings, weights, served.source) if adapters else None
            return OpenVINOEngine(ir_dir, threads, args.max_batch_size, args.kv_cache_gb, args.prefix_cache,
                                  args.openvino_precision, adapter_ir, adapters)  # fmt: skip

        return OpenVINOBatcher(build_openvino, args.max_batch_size)

    def build() -> TransformersEngine:
        return TransformersEngine(model_dir(), device=device, dtype=args.dtype, threads=threads,
                                  prepack=args.prepack_weights, max_adapters=args.max_adapters_per_replica)  # fmt: skip

    return ContinuousBatcher(build, args.max_batch_size, gather_s=args.batch_wait_timeout_s)


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
    return bind_app(parsed, served, _key_hashes(parsed), canary=pin_canary(parsed, settings))


def bind_app(
    args: ServeArgs, served: ServedModel, key_hashes: list[str], canary: ServedModel | None = None, **server_options
) -> Application:
    """The ingress bound to the model deployment, and to a canary's beside it when ``canary`` is given.

    ``server_options``: ChatServer.options (e.g. for a benchmark). The canary's deployment
    (``ChatServerCanary``) has ChatServer's defaults: one to two replicas.
    """
    server = ChatServer.options(**server_options) if server_options else ChatServer
    # The model replicas get only what they use. (Any change of the app's args still restarts every
    # replica: Serve versions an app's code by its args. Adapter aliases are the ingress's user_config.)
    model_args = args.for_replicas()
    canary_server = (
        ChatServer.options(name=CANARY_DEPLOYMENT_NAME).bind(model_args, canary.for_replicas()) if canary else None
    )
    champion = server.bind(model_args, served.for_replicas())
    return OpenAIIngress.bind(champion, args, served, key_hashes, canary_server, canary)

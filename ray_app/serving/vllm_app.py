"""The vLLM engine (GPU clusters): Ray Serve LLM's OpenAI app behind the same API-key check.

`ray.serve.llm` brings continuous batching, paged attention and its own OpenAI router; we
give it the pinned model (read from the store: vLLM loads ``s3://`` sources itself) and wrap
its FastAPI app with the ApiGate the transformers engine uses (API keys, the same body
checks and limits, model-version headers), so clients see one API whichever engine runs.

**A canary** (``args.canary``) is a second LLM deployment in the same app, registered with
Serve LLM's router under its own model id (``NAME@canary``). :class:`CanaryRouter`, inside
the ApiGate, sends the canary's share of conversations to it by rewriting the body's
``model`` - the rule is :func:`ray_app.serving.routing.answers_as_canary`, the transformers
engine's - and its answers carry the canary's version headers.
"""

from __future__ import annotations

import json

from ray import serve
from ray.serve import Application

from ray_app.serving.config import CanaryArgs, ServeArgs, ServeConfigError, ServedModel, pin_canary
from ray_app.serving.gate import BODY_KEY, ApiGate, replay
from ray_app.serving.metrics import RequestMetrics
from ray_app.serving.routing import CONVERSATION_HEADER, answers_as_canary
from ray_app.serving.serve_llm_private import private_functions
from ray_app.settings import Settings


def build_vllm_app(args: ServeArgs, served: ServedModel, key_hashes: list[str], settings: Settings) -> Application:
    """Ray Serve LLM deployments for ``served`` (and its canary) with the API-key check in front."""
    try:
        from ray.serve.llm import build_llm_deployment
        from ray.serve.llm.ingress import OpenAiIngress, make_fastapi_ingress

        to_model_metadata, init_ingress_app = private_functions()
    except ImportError as exc:
        raise ServeConfigError(
            f"engine 'vllm' needs vLLM on the Serve nodes (pip install 'ray[llm]', CUDA GPUs): {exc}"
        ) from exc

    canary = pin_canary(args, settings)
    configs = {served.name: _llm_config(args, served, served.name, settings)}
    if canary is not None:
        configs[canary_model_id(served)] = _llm_config(args, canary, canary_model_id(served), settings)
    app = init_ingress_app()
    if canary is not None:  # added first: inside the gate, it sees only validated bodies
        app.add_middleware(CanaryRouter, canary=args.canary, model_id=canary_model_id(served),
                           version_headers=canary.version_headers)  # fmt: skip
    # The same front door as the transformers engine: keys, body checks and limits, error shape.
    app.add_middleware(
        ApiGate,
        key_hashes=key_hashes,
        version_headers=served.version_headers,
        limits=args.limits(),
        on_response=RequestMetrics(served.label, served.alias, canary.label if canary else None),
    )
    ingress_cls = make_fastapi_ingress(OpenAiIngress, app=app)
    options = OpenAiIngress.get_deployment_options(list(configs.values()))
    return serve.deployment(ingress_cls, **options).bind(
        llm_deployments={model_id: build_llm_deployment(config) for model_id, config in configs.items()},
        model_cards={model_id: to_model_metadata(model_id, config) for model_id, config in configs.items()},
        lora_paths={},
    )


def canary_model_id(served: ServedModel) -> str:
    """The model id of the canary's LLM deployment (what its answers name as ``model``)."""
    return f"{served.name}@canary"


def _llm_config(args: ServeArgs, served: ServedModel, model_id: str, settings: Settings):
    from ray.serve.llm import LLMConfig

    from ray_app.models import resolve_model

    # Local and default models are read by path; store and hub sources are handed to vLLM as they are.
    source = served.source if served.source.startswith("s3://") else str(resolve_model(served.source, settings))
    engine_kwargs = {"dtype": "bfloat16", **args.vllm_engine_kwargs}
    if args.max_context:
        engine_kwargs.setdefault("max_model_len", args.max_context)
    return LLMConfig(
        model_loading_config={"model_id": model_id, "model_source": source},
        # S3 credentials come from the nodes' environment (Secret/.env), never from the app config,
        # which the dashboard shows.
        engine_kwargs=engine_kwargs,
        deployment_config=args.vllm_deployment_config,
        **({"accelerator_type": args.vllm_accelerator_type} if args.vllm_accelerator_type else {}),
    )


class CanaryRouter:
    """ASGI middleware (inside the ApiGate): the canary's conversations go to its LLM deployment.

    For a validated generation body (the gate left it in ``scope[BODY_KEY]``) that
    :func:`answers_as_canary` gives the canary, the raw body's ``model`` becomes ``model_id``
    and the response carries the canary's version headers (the gate keeps them and counts
    the response under the canary's version). Other requests pass untouched.
    """

    def __init__(self, app, canary: CanaryArgs, model_id: str, version_headers: dict[str, str]):
        self.app, self.canary, self.model_id = app, canary, model_id
        self.headers = [(name.encode(), value.encode()) for name, value in version_headers.items()]

    async def __call__(self, scope, receive, send):
        body = scope.get(BODY_KEY) if scope["type"] == "http" else None
        if body is None:
            return await self.app(scope, receive, send)
        conversation_id = dict(scope["headers"]).get(CONVERSATION_HEADER.encode(), b"").decode("latin-1") or None
        if body.model != self.model_id and not answers_as_canary(self.canary, body, conversation_id):
            return await self.app(scope, receive, send)
        first = await receive()  # the gate's replay: the whole body in one message
        raw = json.loads(first.get("body") or b"{}")
        raw["model"] = self.model_id
        rewritten = json.dumps(raw).encode()
        headers = [(k, v) for k, v in scope["headers"] if k != b"content-length"]
        scope = {**scope, "headers": [*headers, (b"content-length", str(len(rewritten)).encode())]}

        async def send_as_canary(message):
            if message["type"] == "http.response.start":
                named = {name.lower() for name, _ in self.headers}
                kept = [(name, value) for name, value in message.get("headers", []) if name.lower() not in named]
                message = {**message, "headers": [*kept, *self.headers]}
            await send(message)

        await self.app(scope, replay(rewritten, receive), send_as_canary)

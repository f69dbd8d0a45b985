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

**LoRA adapters** (``max_adapters_per_replica: N``): Ray Serve LLM's multi-LoRA serves the adapters the
store holds for the pinned version (``adapters/NAME/VERSION/<adapter>/``, its
``dynamic_lora_loading_path``; vLLM's ``enable_lora``, at most N held per replica, LRU, and N per batch),
selected with ``model: NAME:ADAPTER`` as on the transformers engine. :class:`AdapterRouter`, inside the
gate, resolves an adapter alias (``NAME:ALIAS``, and its canary's share) with the transformers engine's
rule (:class:`ray_app.serving.routing.AdapterRoutes`) and labels answers ``NAME/VERSION:ADAPTER``; the
ingress deployment is named ``OpenAIIngress`` and takes the same ``user_config`` (``AdapterRouting``), so
``llmops promote NAME:ALIAS`` moves an alias in place on either engine.
"""

from __future__ import annotations

import json

from ray import serve
from ray.serve import Application

from ray_app.adapters import SEPARATOR, adapter_card, adapters_prefix, split_model_id
from ray_app.serving.config import (
    AdapterRouting,
    CanaryArgs,
    ServeArgs,
    ServeConfigError,
    ServedModel,
    parse_routing,
    pin_canary,
)
from ray_app.serving.gate import BODY_KEY, ApiGate, replay
from ray_app.serving.ingress import INGRESS_NAME
from ray_app.serving.metrics import RequestMetrics
from ray_app.serving.routing import CONVERSATION_HEADER, AdapterRoutes, answers_as_canary
from ray_app.serving.serve_llm_private import private_functions
from ray_app.settings import Settings
from ray_app.storage import open_store

# vLLM's bound on the rank of a LoRA it loads (its buffers are sized by it); vllm_engine_kwargs may change it.
MAX_LORA_RANK = 64


def build_vllm_app(args: ServeArgs, served: ServedModel, key_hashes: list[str], settings: Settings) -> Application:
    """Ray Serve LLM deployments for ``served`` (and its canary) with the API-key check in front."""
    try:
        from ray.serve.llm import LLMConfig, build_llm_deployment
        from ray.serve.llm.ingress import OpenAiIngress, make_fastapi_ingress

        to_model_metadata, init_ingress_app = private_functions()
    except ImportError as exc:
        raise ServeConfigError(
            f"engine 'vllm' needs vLLM on the Serve nodes (pip install 'ray[llm]', CUDA GPUs): {exc}"
        ) from exc

    canary = pin_canary(args, settings)
    pinned = {served.name: served, **({canary_model_id(served): canary} if canary is not None else {})}
    fields = {model_id: llm_config_kwargs(args, model, model_id, settings) for model_id, model in pinned.items()}
    configs = {model_id: LLMConfig(**kwargs) for model_id, kwargs in fields.items()}
    app = init_ingress_app()
    if canary is not None:  # added first: inside the gate, it sees only validated bodies
        app.add_middleware(CanaryRouter, canary=args.canary, model_id=canary_model_id(served),
                           version_headers=canary.version_headers)  # fmt: skip
    if args.max_adapters_per_replica:
        app.add_middleware(AdapterRouter, served=served, args=args)
    # The same front door as the transformers engine: keys, body checks and limits, error shape.
    app.add_middleware(
        ApiGate,
        key_hashes=key_hashes,
        version_headers=served.version_headers,
        limits=args.limits(),
        on_response=RequestMetrics(served.label, served.alias, canary.label if canary else None),
    )

    class Ingress(OpenAiIngress):
        def reconfigure(self, user_config: dict) -> None:
            """The OpenAIIngress deployment's user_config (AdapterRouting), applied in place."""
            set_adapter_routing(served, parse_routing(user_config, args))

    ingress_cls = make_fastapi_ingress(Ingress, app=app)
    options = {**OpenAiIngress.get_deployment_options(list(configs.values())), "name": INGRESS_NAME}
    lora_paths = {model_id: kwargs["lora_config"]["dynamic_lora_loading_path"]
                  for model_id, kwargs in fields.items() if "lora_config" in kwargs}  # fmt: skip
    return serve.deployment(ingress_cls, **options).bind(
        llm_deployments={model_id: build_llm_deployment(config) for model_id, config in configs.items()},
        model_cards={model_id: to_model_metadata(model_id, config) for model_id, config in configs.items()},
        lora_paths=lora_paths,
    )


def canary_model_id(served: ServedModel) -> str:
    """The model id of the canary's LLM deployment (what its answers name as ``model``)."""
    return f"{served.name}@canary"


def llm_config_kwargs(args: ServeArgs, served: ServedModel, model_id: str, settings: Settings) -> dict:
    """Ray Serve LLM's ``LLMConfig`` fields for serving ``served`` as ``model_id`` (its LoRA adapters too)."""
    from ray_app.models import resolve_model

    # Local and default models are read by path; store and hub sources are handed to vLLM as they are.
    source = served.source if served.source.startswith("s3://") else str(resolve_model(served.source, settings))
    engine_kwargs = {"dtype": "bfloat16", **args.vllm_engine_kwargs}
    if args.max_context:
        engine_kwargs.setdefault("max_model_len", args.max_context)
    kwargs = {
        "model_loading_config": {"model_id": model_id, "model_source": source},
        # S3 credentials come from the nodes' environment (Secret/.env), never from the app config,
        # which the dashboard shows.
        "engine_kwargs": engine_kwargs,
        "deployment_config": args.vllm_deployment_config,
        **({"accelerator_type": args.vllm_accelerator_type} if args.vllm_accelerator_type else {}),
    }
    if args.max_adapters_per_replica:
        adapters = args.max_adapters_per_replica
        # vLLM holds at most max_loras adapters in one batch (its default, 1, would split rows by adapter).
        for key, value in {"enable_lora": True, "max_loras": adapters, "max_lora_rank": MAX_LORA_RANK}.items():
            engine_kwargs.setdefault(key, value)
        kwargs["lora_config"] = {"dynamic_lora_loading_path": adapters_uri(served, settings),
                                 "max_num_adapters_per_replica": adapters}  # fmt: skip
    return kwargs


def adapters_uri(served: ServedModel, settings: Settings) -> str:
    """Where Ray Serve LLM lists and loads the adapters of the pinned version: their store folder (``s3://``)."""
    uri = open_store(settings=settings).uri(adapters_prefix(served.registry_name, served.version))
    if not uri.startswith("s3://"):
        raise ServeConfigError(
            f"invalid Serve app arg 'max_adapters_per_replica': engine vllm loads LoRA adapters from an s3:// "
            f"store (Ray Serve LLM's dynamic_lora_loading_path); the store (setting store_uri) is {uri}"
        )
    return uri


# The adapter routing of this ingress replica: the deployment's reconfigure sets it, AdapterRouter reads it.
_ROUTING: dict[str, AdapterRoutes] = {}


def set_adapter_routing(served: ServedModel, routing: AdapterRouting) -> None:
    _ROUTING[served.name] = AdapterRoutes.of(served, routing)


async def _answer_as(app, scope, receive, send, model_id: str, headers: list[tuple[bytes, bytes]]) -> None:
    """Pass the gate's replayed body on with ``model`` set to ``model_id``; the response carries ``headers``
    (the gate keeps them and counts the response under their version)."""
    first = await receive()  # the gate's replay: the whole body in one message
    raw = json.loads(first.get("body") or b"{}")
    raw["model"] = model_id
    rewritten = json.dumps(raw).encode()
    kept = [(k, v) for k, v in scope["headers"] if k != b"content-length"]
    rescoped = {**scope, "headers": [*kept, (b"content-length", str(len(rewritten)).encode())]}
    named = {name.lower() for name, _ in headers}

    async def send_as(message):
        if message["type"] == "http.response.start":
            ours = [(name, value) for name, value in message.get("headers", []) if name.lower() not in named]
            message = {**message, "headers": [*ours, *headers]}
        await send(message)

    await app(rescoped, replay(rewritten, receive), send_as)


def _encoded(version_headers: dict[str, str]) -> list[tuple[bytes, bytes]]:
    return [(name.encode(), value.encode()) for name, value in version_headers.items()]


def _conversation_id(scope) -> str | None:
    return dict(scope["headers"]).get(CONVERSATION_HEADER.encode(), b"").decode("latin-1") or None


class AdapterRouter:
    """ASGI middleware (inside the ApiGate): ``model: NAME:X`` is answered by the stored adapter X routes to.

    An alias (the version's tags, then the ingress's user_config) names its adapter, its canary's for the
    canary's share of conversations (:class:`AdapterRoutes`); Serve LLM's router then loads that adapter
    from the store. Answers are labelled ``NAME/VERSION:ADAPTER`` (headers and request metrics). The model
    list (Serve LLM's: the base and the stored adapters) gains a card per alias, as on the transformers engine.
    """

    def __init__(self, app, served: ServedModel, args: ServeArgs):
        self.app, self.served = app, served
        self.default = AdapterRoutes.of(served, parse_routing({}, args))

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope.get("method") == "GET" and scope["path"].rstrip("/").endswith("/models"):
            return await self._listing(scope, receive, send)
        body = scope.get(BODY_KEY) if scope["type"] == "http" else None
        base, adapter = split_model_id(body.model) if body is not None else (None, None)
        if adapter is None or base != self.served.name:  # the base model, or Serve LLM's 404 for an unknown one
            return await self.app(scope, receive, send)
        stored = self._routes().adapter_for(adapter, body, _conversation_id(scope))
        headers = _encoded(self.served.with_adapter(stored).version_headers)
        await _answer_as(self.app, scope, receive, send, f"{base}{SEPARATOR}{stored}", headers)

    def _routes(self) -> AdapterRoutes:
        return _ROUTING.get(self.served.name, self.default)

    async def _listing(self, scope, receive, send) -> None:
        """Serve LLM's model list with a card per adapter alias (``NAME:ALIAS``: a model clients may send)."""
        start, chunks = {}, []

        async def keep(message):
            if message["type"] == "http.response.start":
                start.update(message)
            elif message["type"] == "http.response.body":
                chunks.append(message.get("body", b""))

        await self.app(scope, receive, keep)
        body = b"".join(chunks)
        if start.get("status") == 200:
            listing = json.loads(body)
            cards = listing.get("data") or []
            base = next((card for card in cards if card.get("id") == self.served.name), None)
            listed = {card.get("id") for card in cards}
            for alias in sorted(self._routes().aliases) if base is not None else ():
                card = adapter_card(base, self.served.name, alias)
                if card["id"] not in listed:
                    cards.append(card)
            body = json.dumps(listing).encode()
        headers = [(name, value) for name, value in start.get("headers", []) if name.lower() != b"content-length"]
        await send({**start, "headers": [*headers, (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


class CanaryRouter:
    """ASGI middleware (inside the ApiGate): the canary's conversations go to its LLM deployment.

    For a validated generation body (the gate left it in ``scope[BODY_KEY]``) that
    :func:`answers_as_canary` gives the canary, the raw body's ``model`` becomes ``model_id``
    and the response carries the canary's version headers (the gate keeps them and counts
    the response under the canary's version). Other requests pass untouched, and so do requests
    for an adapter: adapters are the champion's, as on the transformers engine.
    """

    def __init__(self, app, canary: CanaryArgs, model_id: str, version_headers: dict[str, str]):
        self.app, self.canary, self.model_id = app, canary, model_id
        self.headers = _encoded(version_headers)

    async def __call__(self, scope, receive, send):
        body = scope.get(BODY_KEY) if scope["type"] == "http" else None
        if body is None or split_model_id(body.model)[1] is not None:
            return await self.app(scope, receive, send)
        if body.model != self.model_id and not answers_as_canary(self.canary, body, _conversation_id(scope)):
            return await self.app(scope, receive, send)
        await _answer_as(self.app, scope, receive, send, self.model_id, self.headers)

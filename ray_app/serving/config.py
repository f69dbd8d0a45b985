"""Typed arguments of the Serve app (the `args:` block of `serve_configs/*.yaml`).

Validated when Serve builds the application, so a wrong config fails before any replica
starts, with a message that names the field.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, model_validator

from ray_app.adapters import ADAPTER_NAME, ALIAS_TAG, RUN_TAG, SEPARATOR, tagged
from ray_app.registry import MODELS_URI
from ray_app.serving.gate import Limits
from ray_app.serving.metrics import CANARY_ALIAS
from ray_app.settings import Settings


class ServeConfigError(ValueError):
    """The Serve app's args are invalid; the message names the field."""


class _Split(BaseModel):
    """Which share of the conversations a challenger answers (ray_app.serving.routing decides which)."""

    model_config = ConfigDict(extra="forbid")

    share: float = Field(ge=0, lt=1, description="fraction of conversations it answers (0.1 = 10%; 0 = draining)")
    sticky_by: Literal["conversation", "user", "request"] = Field(
        default="conversation",
        description="conversation: the x-conversation-id header, else the `user` field, else the conversation's "
        "opening; user: the `user` field first; request: no stickiness (each request drawn)",
    )


class CanaryArgs(_Split):
    """A challenger version served beside the champion in the same app, for a share of the conversations.

    ``llmops promote NAME --from challenger --canary 10`` sets it; promoting or rolling back removes it.
    """

    model_version: str = Field(pattern=r"^\d+$", description="the challenger's registry version")


class AdapterCanaryArgs(_Split):
    """A challenger adapter answering a share of the conversations sent to an adapter alias.

    ``llmops promote NAME:ALIAS --adapter ADAPTER --canary 10`` sets it; promoting or rolling back removes it.
    """

    adapter: str = Field(pattern=ADAPTER_NAME.pattern, description="the challenger: an adapter stored for the version")


class AdapterRouting(BaseModel):
    """Which stored adapter answers ``model: NAME:ALIAS``: the ``user_config`` of the ``OpenAIIngress``
    deployment in a Serve config. Serve applies a change of it in place (the ingress's ``reconfigure``),
    so moving an alias or starting an adapter canary restarts no replica; `llmops promote NAME:ALIAS
    --adapter ADAPTER [--canary PERCENT]` sets it (default: the aliases recorded in the registry)."""

    model_config = ConfigDict(extra="forbid")

    adapter_aliases: dict[str, str] = Field(default_factory=dict, description="{ALIAS: ADAPTER}")
    adapter_canaries: dict[str, AdapterCanaryArgs] = Field(
        default_factory=dict, description="{ALIAS: challenger}: another adapter answering a share of NAME:ALIAS"
    )

    @model_validator(mode="after")
    def _check(self) -> AdapterRouting:
        for alias, adapter in self.adapter_aliases.items():
            if not (ADAPTER_NAME.match(alias) and ADAPTER_NAME.match(adapter)):
                raise ValueError(f"adapter_aliases: {alias!r}: {adapter!r}: names are letters, digits, '.', '_', '-'")
        for alias, canary in self.adapter_canaries.items():
            if alias not in self.adapter_aliases:
                raise ValueError(f"adapter_canaries.{alias}: a canary runs beside an alias in adapter_aliases")
            if canary.adapter == self.adapter_aliases[alias]:
                raise ValueError(f"adapter_canaries.{alias}: {canary.adapter!r} is the adapter the alias names already")
        return self


def parse_routing(config: dict[str, Any] | None, args: ServeArgs) -> AdapterRouting:
    """Validate the ingress's ``user_config``; raises ServeConfigError naming the field."""
    try:
        routing = AdapterRouting.model_validate(config or {})
    except ValidationError as exc:
        raise ServeConfigError(_named(exc, "OpenAIIngress user_config")) from None
    if (routing.adapter_aliases or routing.adapter_canaries) and not args.max_adapters_per_replica:
        raise ServeConfigError("OpenAIIngress user_config: adapter aliases need the app arg max_adapters_per_replica")
    return routing


class ServeArgs(BaseModel):
    """What a Serve config may set for the chat model app."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = Field(
        default=None,
        description="models:/NAME@ALIAS, models:/NAME/VERSION, s3://..., a folder, a hub id or 'default'; "
        "unset -> settings.serve_model (LLMOPS_SERVE_MODEL)",
    )
    model_version: str | None = Field(
        default=None,
        pattern=r"^\d+$",
        description="pin the registry version behind models:/NAME@ALIAS; `llmops promote` sets it to roll replicas",
    )
    served_model_name: str | None = Field(
        default=None, pattern=r"^[^:]+$", description="the `model` clients send; default derived (':' names adapters)"
    )
    canary: CanaryArgs | None = Field(default=None, description="a challenger answering a share of conversations")
    engine: Literal["transformers", "openvino", "vllm"] = Field(
        default="transformers",
        description="transformers: ours (any device); openvino: the fast CPU engine (the model is converted once, "
        "make openvino-venv); vllm: GPUs",
    )
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    torch_threads: int | None = Field(default=None, ge=1, description="default: the replica's num_cpus")
    prepack_weights: bool = Field(
        default=True, description="CPU float32: linear layers as oneDNN matmuls on weights packed once at load"
    )
    openvino_weights: Literal["int8", "int4", "fp16", "fp32"] = Field(
        default="int8", description="engine: openvino: weight format of the converted model (weight-only quantization)"
    )
    openvino_precision: Literal["f32", "bf16", "auto"] = Field(
        default="f32",
        description="engine: openvino: activations' precision; f32 answers a request the same in any batch, "
        "bf16/auto (bf16 on AMX CPUs) prefill faster",
    )
    kv_cache_gb: int = Field(default=1, ge=1, le=1024, description="engine: openvino: GB of KV blocks per replica")
    prefix_cache: bool = Field(
        default=True, description="engine: openvino: reuse a conversation's earlier KV for its next turn (LRU)"
    )
    max_batch_size: int = Field(default=8, ge=1, le=256)
    max_adapters_per_replica: int = Field(
        default=0,
        ge=0,
        le=64,
        description="LoRA adapters of the served registry version (stored under adapters/NAME/VERSION/, "
        "selected with model: NAME:ADAPTER) a replica holds at once, least recently used unloaded; 0: none. "
        "engine openvino holds a pipeline (a model copy) per adapter",
    )
    batch_wait_timeout_s: float = Field(default=0.05, ge=0.0, le=5.0)
    stream_interval_ms: float = Field(
        default=50.0,
        ge=0.0,
        le=1000.0,
        description="an answer's tokens go from the replica to the ingress in one message per this "
        "interval (the first at once); 0: one per step. A message costs more CPU than a small model's token",
    )
    max_context: int | None = Field(default=None, ge=16, description="default: the model's max positions")
    default_max_tokens: int = Field(default=256, ge=1)
    max_tokens_limit: int = Field(default=1024, ge=1)
    max_request_bytes: int = Field(
        default=1 << 20, ge=1024, description="larger request bodies get 413 (checked before they are read)"
    )
    max_messages: int = Field(default=2048, ge=1, description="chat requests with more messages get 400")
    max_queued_requests: int = Field(
        default=16,
        ge=0,
        description="per replica: requests waiting beyond the running batch; one more gets 503 with Retry-After",
    )
    request_timeout_s: float = Field(
        default=300.0,
        gt=0,
        le=3600,
        description="deadline per request: no first token by then -> 503; not finished by then -> cut off (504)",
    )
    retry_after_s: int = Field(default=2, ge=1, le=600, description="the Retry-After of a 503")
    api_keys: list[SecretStr] | None = Field(
        default=None, description="prefer LLMOPS_API_KEYS in the cluster env: args show in the dashboard"
    )
    allow_unauthenticated: bool = Field(default=False, description="serve without API keys (never in production)")
    vllm_engine_kwargs: dict[str, Any] = Field(default_factory=dict, description="vLLM engine_kwargs (engine: vllm)")
    vllm_deployment_config: dict[str, Any] = Field(
        default_factory=dict, description="Serve deployment options of the vLLM servers (autoscaling...)"
    )
    vllm_accelerator_type: str | None = Field(default=None, description="e.g. A100, H100 (engine: vllm)")

    @model_validator(mode="after")
    def _check(self) -> ServeArgs:
        if self.default_max_tokens > self.max_tokens_limit:
            raise ValueError(
                f"default_max_tokens ({self.default_max_tokens}) exceeds max_tokens_limit ({self.max_tokens_limit})"
            )
        if self.engine == "openvino" and self.device == "cuda":
            raise ValueError("engine openvino runs on CPU: device cuda needs engine vllm (or transformers)")
        if self.model_version and not (self.model and MODELS_URI.match(self.model)):
            raise ValueError("model_version is only meaningful with model: models:/NAME@ALIAS")
        if self.canary and not self.model_version:
            raise ValueError("canary needs the champion pinned: model: models:/NAME@ALIAS with model_version")
        if self.canary and self.canary.model_version == self.model_version:
            raise ValueError(f"canary.model_version {self.canary.model_version} is the version already served")
        return self

    def for_replicas(self) -> ServeArgs:
        """These args less the canary, which only the ingress reads."""
        return self.model_copy(update={"canary": None})

    def limits(self) -> Limits:
        return Limits(
            max_request_bytes=self.max_request_bytes,
            max_messages=self.max_messages,
            max_tokens_limit=self.max_tokens_limit,
        )


def parse_args(args: dict[str, Any] | ServeArgs | None) -> ServeArgs:
    """Validate ``args``; raises ServeConfigError with one line per bad field."""
    if isinstance(args, ServeArgs):
        return args
    try:
        return ServeArgs.model_validate(args or {})
    except ValidationError as exc:
        raise ServeConfigError(_named(exc, "Serve app arg")) from None


def _named(exc: ValidationError, what: str) -> str:
    """One line per bad field of ``what``, naming it."""
    lines = []
    for error in exc.errors():
        field = ".".join(str(part) for part in error["loc"]) or "args"
        lines.append(f"invalid {what} {field!r}: {error['msg']}")
    return "; ".join(lines)


@dataclass(frozen=True)
class ServedModel:
    """The model a Serve app answers with, pinned when the app is built."""

    source: str  # what replicas resolve: s3://..., a folder, a hub id or 'default'
    name: str  # the `model` clients send
    label: str  # shown in responses: NAME/VERSION for registry models, else the served name
    registry_name: str | None = None
    version: str | None = None
    run_id: str | None = None
    alias: str | None = None  # the registry alias it was pinned from (champion, challenger), if any
    # Read from the version's tags when pinned: {alias: adapter} promoted, {adapter: MLflow run} trained.
    adapter_aliases: dict[str, str] = field(default_factory=dict)
    adapter_runs: dict[str, str] = field(default_factory=dict)

    @property
    def version_headers(self) -> dict[str, str]:
        """Sent with every answer: which registry version (and MLflow run) produced it."""
        return {"x-model-version": self.label, "x-mlflow-run-id": self.run_id or ""}

    def with_adapter(self, adapter: str) -> ServedModel:
        """What answers with the stored ``adapter`` on this version: labelled NAME/VERSION:ADAPTER (answers'
        headers, metrics and feedback), its run the one that trained it ('' when the registry does not say)."""
        label = f"{self.label}{SEPARATOR}{adapter}"
        return dataclasses.replace(self, label=label, run_id=self.adapter_runs.get(adapter, ""), alias=None)

    def for_replicas(self) -> ServedModel:
        """This, less what only the ingress reads (adapter aliases and runs)."""
        return dataclasses.replace(self, adapter_aliases={}, adapter_runs={})


def pin_model(args: ServeArgs, settings: Settings) -> ServedModel:
    """Resolve the registry reference (if any) to one version, so every replica serves the same one.

    Raises ServeConfigError naming the reference and the tracking server when it cannot be found.
    """
    from ray_app.registry import RegistryError, get_version

    reference = (args.model or settings.serve_model).strip()
    match = MODELS_URI.match(reference)
    if match is None:
        if reference.startswith("models:/"):
            raise ServeConfigError(f"invalid Serve app arg 'model': {reference!r}; expected models:/NAME@ALIAS")
        if args.max_adapters_per_replica:
            raise ServeConfigError(
                "invalid Serve app arg 'max_adapters_per_replica': LoRA adapters belong to a registry version; "
                f"model {reference!r} is not models:/NAME@ALIAS or /VERSION"
            )
        name = args.served_model_name or _default_name(reference)
        return ServedModel(source=reference, name=name, label=name)
    registry_name = match["name"]
    uri = f"models:/{registry_name}/{args.model_version}" if args.model_version else reference
    try:
        version = get_version(uri, settings)
    except RegistryError as exc:
        raise ServeConfigError(f"cannot pin Serve model {uri}: {exc}") from exc
    return ServedModel(
        source=version.source,
        name=args.served_model_name or registry_name,
        label=f"{registry_name}/{version.version}",
        registry_name=registry_name,
        version=version.version,
        run_id=version.run_id,
        alias=match["alias"],
        adapter_aliases=tagged(version.tags, ALIAS_TAG),
        adapter_runs=tagged(version.tags, RUN_TAG),
    )


def pin_canary(args: ServeArgs, settings: Settings) -> ServedModel | None:
    """The challenger ``args.canary`` names, pinned like the champion (alias ``canary``); None without one."""
    if args.canary is None:
        return None
    pinned = pin_model(args.model_copy(update={"model_version": args.canary.model_version, "canary": None}), settings)
    return dataclasses.replace(pinned, alias=CANARY_ALIAS)


def _default_name(reference: str) -> str:
    from ray_app.models import DEFAULT_MODEL_ALIASES, DEFAULT_MODEL_NAME

    if reference.lower() in (*DEFAULT_MODEL_ALIASES, ""):
        return DEFAULT_MODEL_NAME
    return reference.rstrip("/").rsplit("/", 1)[-1]

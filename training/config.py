"""The SFT recipe's config: a YAML file, overridden by ``--set key=value``, validated before anything starts.

YAML names what varies (model, data, method, sizes); the recipe holds how. An unknown
field, a wrong type or a missing dataset fails with one line naming the field.
"""

from __future__ import annotations

import functools
import json
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ray_app.adapters import ADAPTER_NAME
from ray_app.registry import MODELS_URI

REPO_ROOT = Path(__file__).resolve().parent.parent
DEEPSPEED_DIR = Path(__file__).resolve().parent / "deepspeed"


@functools.cache
def cpu_has_bf16(cpuinfo_path: str = "/proc/cpuinfo") -> bool:
    """Whether this CPU multiplies bf16 natively (AVX-512 BF16 or AMX), from its cpuinfo (no torch
    import): there bf16 autocast trained the recipe 1.5x faster than fp32; elsewhere bf16 is emulated
    and slower than fp32."""
    try:
        cpuinfo = Path(cpuinfo_path).read_text()
    except OSError:  # not Linux: fp32
        return False
    flags = next((line.split(":", 1)[1].split() for line in cpuinfo.splitlines() if line.startswith("flags")), [])
    return bool({"avx512_bf16", "amx_bf16"} & set(flags))


class ConfigError(ValueError):
    """A recipe config is invalid; the message names the field."""


class LoraSettings(BaseModel):
    """LoRA adapter shape (used when ``method: lora``)."""

    model_config = ConfigDict(extra="forbid")

    rank: int = Field(default=16, ge=1)
    alpha: float = Field(default=32, gt=0)
    dropout: float = Field(default=0.05, ge=0, lt=1)
    target_modules: list[str] = Field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    save: Literal["merged", "adapter"] = Field(
        default="merged",
        description="merged: a full model folder, registered as a version of registered_model; adapter: the "
        "adapter alone, published as an adapter of the base version (model: models:/NAME@ALIAS or /VERSION, "
        "pinned when the run starts) and served on it as model NAME:ADAPTER (ray_app.adapters)",
    )
    adapter_name: str | None = Field(
        default=None,
        pattern=ADAPTER_NAME.pattern,
        description="save: adapter: its name under the base version (default: the run name); adapters are "
        "immutable, so a name already taken is refused before training",
    )


class SFTConfig(BaseModel):
    """Everything one supervised fine-tuning run needs."""

    model_config = ConfigDict(extra="forbid")

    # what to train
    model: str | None = Field(default=None, description="model reference; None = the default SmolLM2")
    train_data: list[str] = Field(min_length=1, description="jsonl/parquet files or folders, local or s3://")
    eval_data: list[str] = Field(default_factory=list)
    method: Literal["full", "lora"] = "full"
    lora: LoraSettings = Field(default_factory=LoraSettings)

    # how to distribute
    deepspeed: str = "zero2.json"
    num_workers: int = Field(default=2, ge=1)
    use_gpu: bool = False
    cpus_per_worker: float = Field(default=1.0, gt=0)
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = Field(
        default="PACK", description="where Ray puts the workers: PACK fills a node first, SPREAD uses many nodes"
    )
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        default="auto",
        description="auto: bf16 on GPUs and on CPUs with AVX-512 BF16 or AMX (decided on each worker), else fp32; "
        "bf16 on a GPU: DeepSpeed's bf16 mode (pre-Ampere GPUs: fp16); bf16 on CPU: torch.autocast with fp32 "
        "weights, gradients and all-reduces; fp16 needs a GPU",
    )
    torch_threads: int | None = Field(default=None, ge=1)

    # how long and how fast
    max_steps: int | None = Field(default=None, ge=1)
    epochs: int = Field(default=1, ge=1)
    learning_rate: float = Field(default=1e-4, gt=0)
    lr_schedule: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_steps: int = Field(default=0, ge=0)
    weight_decay: float = Field(default=0.0, ge=0)
    max_grad_norm: float = Field(default=1.0, gt=0)
    seq_len: int = Field(default=512, ge=8)
    micro_batch_size: int = Field(default=2, ge=1)
    grad_accum: int = Field(default=1, ge=1)
    pack: bool = True
    shuffle_buffer: int = Field(
        default=0, ge=0, description="rows each worker shuffles its shard in, anew each epoch (seeded: resumable)"
    )
    seed: int = 42

    # checkpoints, evaluation, tracking
    checkpoint_every: int = Field(default=50, ge=1)
    keep_checkpoints: int = Field(default=2, ge=1)
    max_failures: int = Field(default=2, ge=0)
    eval_every: int | None = Field(default=None, ge=1, description="held-out loss every N steps (eval_data)")
    experiment: str = "ray-llmops-sft"
    run_name: str | None = None
    registered_model: str | None = "chat-model"
    version_tags: dict[str, str] = Field(default_factory=dict, description="extra tags on the registered version")
    sample_prompts: list[str] = Field(default_factory=lambda: ["What is the capital of France?"])
    max_new_tokens: int = Field(default=32, ge=1)

    @field_validator("train_data", "eval_data", mode="before")
    @classmethod
    def _one_or_many(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value

    @model_validator(mode="after")
    def _check(self) -> SFTConfig:
        if self.precision == "fp16" and not self.use_gpu:
            raise ValueError("precision: fp16 needs use_gpu: true; on CPU use bf16 (autocast) or fp32")
        deepspeed_path(self.deepspeed)  # raises if missing
        if self.eval_every and not self.eval_data:
            raise ValueError("eval_every: needs eval_data (the held-out set to evaluate during training)")
        for uri in [*self.train_data, *self.eval_data]:
            if "://" not in uri and not Path(uri).expanduser().exists():
                raise ValueError(f"dataset not found: {uri}")
        if self.saves_adapter and not (self.model and MODELS_URI.match(self.model)):
            raise ValueError(
                "lora.save: adapter: an adapter belongs to a registered base version; model "
                f"{self.model or 'default'!r} is not models:/NAME@ALIAS or models:/NAME/VERSION"
            )
        return self

    @property
    def saves_adapter(self) -> bool:
        """Whether the result is a LoRA adapter of the base version rather than a full model."""
        return self.method == "lora" and self.lora.save == "adapter"

    @property
    def cpu_autocast(self) -> bool:
        """bf16 on CPU: the weights, gradients, optimizer and all-reduces stay fp32 (gloo has no bf16
        all-reduce) and the matmuls of the forward and backward run in bf16 under ``torch.autocast``.

        ``auto`` asks the CPU of the process that reads it (each worker: a mixed cluster's workers may
        differ, which fp32 weights and all-reduces allow)."""
        if self.use_gpu:
            return False
        return self.precision == "bf16" or (self.precision == "auto" and cpu_has_bf16())

    @property
    def weights_dtype(self) -> str:
        """The dtype the model's weights are loaded in: fp32 on CPU, else ``precision`` (auto: bf16)."""
        if not self.use_gpu:
            return "fp32"
        return "bf16" if self.precision == "auto" else self.precision

    def deepspeed_config(self) -> dict[str, Any]:
        """The DeepSpeed JSON with this run's batch sizes, clipping and precision filled in."""
        config = json.loads(deepspeed_path(self.deepspeed).read_text())
        config["train_micro_batch_size_per_gpu"] = self.micro_batch_size
        config["gradient_accumulation_steps"] = self.grad_accum
        config.pop("train_batch_size", None)  # DeepSpeed derives it from the two above and the world size
        config["gradient_clipping"] = self.max_grad_norm
        config["bf16"] = {"enabled": self.weights_dtype == "bf16"}  # on CPU, bf16 is autocast over fp32
        config["fp16"] = {"enabled": self.weights_dtype == "fp16"}
        optimizer = config.setdefault("optimizer", {"type": "AdamW", "params": {}})
        params = optimizer.setdefault("params", {})
        params["lr"] = self.learning_rate
        params["weight_decay"] = self.weight_decay
        zero = config.get("zero_optimization", {})
        offloads = zero.get("offload_optimizer", {}).get("device", "none") != "none"
        if self.num_workers == 1 and zero.get("stage", 0) in (1, 2) and not offloads:
            # ZeRO-1/2 partition optimizer state and gradients across data-parallel ranks: with one
            # rank they partition nothing and only copy every gradient twice more per step.
            zero["stage"] = 0
        if not self.use_gpu and not offloads:
            # FusedAdam is a CUDA kernel; torch's AdamW needs no JIT build on CPU, and its fused
            # CPU kernel steps the flat ZeRO partition in one pass (2.5x faster than the default).
            params["torch_adam"] = True
            params.setdefault("fused", True)
        return config


def deepspeed_path(name: str) -> Path:
    """A DeepSpeed config by name (``zero2.json``) from training/deepspeed/, or a path."""
    for candidate in (Path(name).expanduser(), DEEPSPEED_DIR / name, REPO_ROOT / name):
        if candidate.is_file():
            return candidate
    shipped = ", ".join(sorted(p.name for p in DEEPSPEED_DIR.glob("*.json")))
    raise ValueError(f"deepspeed config {name!r} not found; shipped: {shipped}")


def _parse_value(text: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``key=value`` (dotted keys for nested fields; YAML values) to a raw config dict."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set expects key=value, got {item!r}")
        key, value = item.split("=", 1)
        if not re.fullmatch(r"[A-Za-z_][\w.]*", key):
            raise ConfigError(f"--set: bad key {key!r}")
        target = raw
        parts = key.split(".")
        for part in parts[:-1]:
            target = target.setdefault(part, {})
        target[parts[-1]] = _parse_value(value)
    return raw


def load_config(
    path: str | Path | None = None, overrides: list[str] | None = None, schema: type[SFTConfig] | None = None,
    **values: Any,
) -> SFTConfig:  # fmt: skip
    """Read a YAML recipe config, apply overrides, validate (as ``schema``: SFTConfig or a recipe's subclass).

    Relative dataset paths are taken relative to the config file's folder when they exist
    there, else to the current directory. Raises ConfigError with one line per bad field.
    """
    raw: dict[str, Any] = {}
    base = Path.cwd()
    if path is not None:
        path = Path(path)
        if not path.is_file() and not path.is_absolute() and (REPO_ROOT / path).is_file():
            path = REPO_ROOT / path  # e.g. a Ray job started in another directory than the repo
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        raw = yaml.safe_load(path.read_text()) or {}
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: expected a mapping at the top level")
        base = path.resolve().parent
    raw.update(values)
    apply_overrides(raw, overrides or [])
    for key in ("train_data", "eval_data"):
        if isinstance(raw.get(key), str):
            raw[key] = [raw[key]]
        raw[key] = [_relative_to(uri, base) for uri in raw.get(key) or []] or raw.get(key)
    try:
        return (schema or SFTConfig)(**{k: v for k, v in raw.items() if v is not None or k == "model"})
    except ValidationError as exc:
        lines = []
        for error in exc.errors():
            field = ".".join(str(part) for part in error["loc"]) or "config"
            message = error["msg"].removeprefix("Value error, ")
            if error["type"] == "extra_forbidden":
                message = "unknown field"
            lines.append(f"{field}: {message}")
        raise ConfigError("invalid training config: " + "; ".join(lines)) from None


def _relative_to(uri: str, base: Path) -> str:
    if "://" in uri or Path(uri).is_absolute():
        return uri
    for root in (base, Path.cwd(), REPO_ROOT):
        if (root / uri).exists():
            return str((root / uri).resolve())
    return uri

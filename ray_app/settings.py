"""One settings object for every endpoint, credential, port and path.

Values come from (highest first): keyword arguments (CLI flags), the environment, a
`.env` file in the working directory, then the defaults below. The standard names that
the ecosystem already uses (``MLFLOW_TRACKING_URI``, ``AWS_ACCESS_KEY_ID``, ``RAY_ADDRESS``,
``WANDB_MODE``...) are honoured as they are; everything of this project's own is
``LLMOPS_*``. Nothing else in the code base reads ``os.environ``.
"""

from __future__ import annotations

import re
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlparse

from pydantic import AliasChoices, Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from ray_app import credentials


class SettingsError(ValueError):
    """A setting has an invalid value; the message names the field and its variable."""


def _env(*names: str) -> AliasChoices:
    return AliasChoices(*names)


def _check_http_url(value: str | None, what: str) -> str | None:
    if value is None or value == "":
        return None
    parsed = urlparse(value)
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise ValueError(f"{what} must be an http(s)://host[:port] URL, got {value!r}")
    try:
        parsed.port  # noqa: B018 - raises on a non-numeric port
    except ValueError as exc:
        raise ValueError(f"{what} has an invalid port: {value!r}") from exc
    return value.rstrip("/")


STORE_SCHEMES = ("s3://", "a local path")


def check_store_uri(value: str) -> str:
    """Accept ``s3://bucket[/prefix]`` or a local path (absolute, relative or ``file://``).

    Raises ValueError naming the accepted forms for anything else (``gs://``, ``hdfs://``...).
    """
    if value.startswith("file://"):
        return value
    match = re.match(r"^([A-Za-z][A-Za-z0-9+.-]*)://", value)
    if match:
        scheme = match.group(1).lower()
        if scheme != "s3":
            raise ValueError(
                f"unknown store scheme {scheme!r} in {value!r}; expected s3://bucket/prefix or a local path"
            )
        bucket = value[len("s3://") :].split("/", 1)[0]
        if not re.fullmatch(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]", bucket):
            raise ValueError(f"invalid S3 bucket name {bucket!r} in {value!r} (3-63 chars: a-z, 0-9, '.', '-')")
    elif not value:
        raise ValueError("store URI is empty; expected s3://bucket/prefix or a local path")
    return value


Port = Annotated[int, Field(ge=1, le=65535)]


class Settings(BaseSettings):
    """Every endpoint, credential, port and path of ray-llmops."""

    model_config = SettingsConfigDict(
        env_prefix="LLMOPS_",
        env_file=".env",
        env_file_encoding="utf-8",
        extra="ignore",
        populate_by_name=True,
        validate_default=True,
    )

    # --- paths -------------------------------------------------------------------------
    home: Path = Field(default=Path("~/.llmops"), description="state dir: PIDs, logs, caches, local store")
    store_uri: str | None = Field(default=None, description="checkpoints/models: s3://bucket/prefix or a path")
    model_cache_dir: Path | None = Field(default=None, description="local copies of resolved models")
    openvino_export_cli: Path | None = Field(
        default=None,
        description="optimum-cli exporting models for engine: openvino; default .venv-openvino's (make openvino-venv)",
    )

    # --- S3 / MinIO ----------------------------------------------------------------------
    s3_endpoint_url: str | None = Field(
        default=None,
        validation_alias=_env(
            "LLMOPS_S3_ENDPOINT_URL", "MLFLOW_S3_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"
        ),
    )
    aws_access_key_id: SecretStr | None = Field(default=None, validation_alias=_env("AWS_ACCESS_KEY_ID"))
    aws_secret_access_key: SecretStr | None = Field(default=None, validation_alias=_env("AWS_SECRET_ACCESS_KEY"))
    aws_region: str = Field(default="us-east-1", validation_alias=_env("AWS_REGION", "AWS_DEFAULT_REGION"))
    s3_part_size_mb: int = Field(default=8, ge=5, le=5120, description="multipart chunk size (S3 minimum 5)")
    s3_transfer_threads: int = Field(default=4, ge=1, le=64)

    # --- MLflow --------------------------------------------------------------------------
    mlflow_tracking_uri: str | None = Field(
        default=None, validation_alias=_env("MLFLOW_TRACKING_URI", "LLMOPS_MLFLOW_TRACKING_URI")
    )
    mlflow_tracking_username: str | None = Field(
        default=None,
        validation_alias=_env("MLFLOW_TRACKING_USERNAME"),
        description="this platform's MLflow identity; default the stack's admin",
    )
    mlflow_tracking_password: SecretStr | None = Field(
        default=None, validation_alias=_env("MLFLOW_TRACKING_PASSWORD"), description="default generated once"
    )
    mlflow_serve_username: str = Field(default="llmops-serve", description="Serve's read-only MLflow identity")
    mlflow_serve_password: SecretStr | None = Field(default=None, description="default generated once")
    mlflow_auth: bool = Field(default=True, description="server side: MLflow's basic-auth app (users, permissions)")
    mlflow_auth_database_uri: str | None = Field(default=None, description="server side; default SQLite in home")
    mlflow_backend_store_uri: str | None = Field(default=None, description="server side; default SQLite in home")
    mlflow_artifacts_destination: str | None = Field(default=None, description="server side; default home or s3")
    mlflow_experiment: str = "ray-llmops"
    mlflow_http_retries: int = Field(
        default=4,
        ge=0,
        le=10,
        validation_alias=_env("LLMOPS_MLFLOW_HTTP_RETRIES", "MLFLOW_HTTP_REQUEST_MAX_RETRIES"),
        description="retries of an MLflow call, backing off 2, 4, 8, 16 s (MLflow's own 7 wait ~4 min)",
    )

    # --- what training and serving may load ----------------------------------------------
    checkpoint_signing_key: SecretStr | None = Field(
        default=None, description="HMAC key of checkpoint manifests (set on every node); default generated once"
    )
    allow_pickle_weights: bool = Field(
        default=False, description="load model folders holding pickle weights (*.bin) when no safetensors exist"
    )

    # --- Ray -----------------------------------------------------------------------------
    ray_address: str | None = Field(default=None, validation_alias=_env("RAY_ADDRESS", "LLMOPS_RAY_ADDRESS"))
    ray_dashboard_address: str | None = Field(
        default=None,
        validation_alias=_env("RAY_DASHBOARD_ADDRESS", "LLMOPS_RAY_DASHBOARD_ADDRESS"),
        description="http://head:8265 of a remote cluster; default the local head on bind_host",
    )
    ray_temp_dir: Path | None = Field(default=None, description="short path: Ray's socket paths must fit 107 chars")
    ray_auth_mode: Literal["token", "disabled"] = Field(
        default="token", validation_alias=_env("RAY_AUTH_MODE", "LLMOPS_RAY_AUTH_MODE")
    )
    ray_auth_token: SecretStr | None = Field(default=None, validation_alias=_env("RAY_AUTH_TOKEN"))
    ray_num_cpus: int | None = Field(default=None, ge=1)
    ray_object_store_memory_mb: int | None = Field(default=None, ge=78)

    # --- ports (all services bind 127.0.0.1 locally) -------------------------------------
    bind_host: str = "127.0.0.1"
    ray_port: Port = 6379
    ray_dashboard_port: Port = 8265
    ray_client_port: Port = 10001
    ray_internal_port_base: Port = Field(
        default=20000, description="first of a block of 16 ports for Ray's node manager, agents, metrics"
    )
    ray_worker_port_range: Annotated[tuple[Port, Port], NoDecode] = (20100, 20399)
    serve_port: Port = 8000
    mlflow_port: Port = 5000
    chat_port: Port = 8800
    airflow_port: Port = 8080
    prometheus_port: Port = 9090

    # --- monitoring (ray_app/monitoring.py) ------------------------------------------------
    prometheus_address: str | None = Field(
        default=None,
        validation_alias=_env("LLMOPS_PROMETHEUS_URL", "RAY_PROMETHEUS_HOST"),
        description="the Prometheus to query (a cluster's; Ray's own name for it is RAY_PROMETHEUS_HOST, which the "
        "stack gives the head, so jobs on it find it); default the local one on bind_host:prometheus_port",
    )
    prometheus_scrape_interval_s: int = Field(default=15, ge=1, description="how often Prometheus scrapes")
    prometheus_retention: str = Field(
        default="15d", pattern=r"^\d+[smhdwy]$", description="how long Prometheus keeps samples, e.g. 15d"
    )
    grafana_url: str | None = Field(default=None, description="a Grafana the Ray dashboard embeds (RAY_GRAFANA_HOST)")
    metrics_token: SecretStr | None = Field(
        default=None, description="bearer token Prometheus shows the chat's /metrics; default one generated once"
    )

    # --- W&B -----------------------------------------------------------------------------
    wandb_mode: Literal["online", "offline", "disabled"] = Field(
        default="offline", validation_alias=_env("WANDB_MODE", "LLMOPS_WANDB_MODE")
    )
    wandb_api_key: SecretStr | None = Field(default=None, validation_alias=_env("WANDB_API_KEY"))
    wandb_project: str = Field(default="ray-llmops", validation_alias=_env("WANDB_PROJECT", "LLMOPS_WANDB_PROJECT"))

    # --- inference API -------------------------------------------------------------------
    api_keys: Annotated[list[SecretStr], NoDecode] = Field(
        default_factory=list, description="comma-separated; none set -> one is generated into the stack dir"
    )
    serve_model: str = Field(default="default", description="model the Serve app loads when its config names none")

    # --- chat (Chainlit) -----------------------------------------------------------------
    chat_database_url: str | None = Field(
        default=None, description="SQLAlchemy async URL; default sqlite+aiosqlite in home/chat"
    )
    chat_users: Annotated[list[SecretStr], NoDecode] = Field(
        default_factory=list, description="comma-separated user:pbkdf2_sha256$... hashes (llmops chat-passwd)"
    )
    chat_allowed_origins: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="origins the browser may call the chat from; default the chat's own URL"
    )
    chat_login_max_failures: int = Field(default=5, ge=1, description="failed logins per user name, then 429")
    chat_login_window_s: float = Field(default=300.0, gt=0, description="how long a failed login counts")
    chat_auth_secret: SecretStr | None = Field(
        default=None, validation_alias=_env("CHAINLIT_AUTH_SECRET", "LLMOPS_CHAT_AUTH_SECRET")
    )
    chat_serve_url: str | None = Field(default=None, description="OpenAI base URL the chat uses; default Serve's /v1")
    chat_api_key: SecretStr | None = Field(default=None, description="key for chat_serve_url; default the API key")
    chat_timeout_s: float = Field(default=60.0, gt=0, description="per answer; the user sees an error after it")
    chat_wake_notice_s: float = Field(
        default=2.0, gt=0, description="no first token by then: the chat checks whether the model is waking up"
    )
    chat_busy_retry_s: float = Field(
        default=120.0, ge=0, description="how long the chat retries, with backoff, while Serve answers 503/429 (busy)"
    )

    # --- what feedback may train (ray_app/chat/review.py) --------------------------------
    feedback_trusted_users: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="chat users whose corrections train without a reviewer's approval"
    )
    feedback_review_thumbs_up: bool = Field(
        default=False, description="thumbs-up answers also wait for approval (corrections always do)"
    )
    feedback_review_thumbs_down: bool = Field(
        default=False, description="thumbs-down answers (preference training's rejected side) wait for approval too"
    )
    preference_other_version_weight: float = Field(
        default=0.5,
        ge=0,
        le=1,
        description="weight of preference examples answered by a version other than the champion (0 drops them)",
    )

    # --- retraining (the Airflow DAG dags/retrain_chat_model.py) --------------------------
    retrain_schedule: str | None = Field(
        default="@weekly", description="cron or preset (@daily...); 'none' = manual runs only"
    )
    retrain_config: str = Field(
        default="training/configs/smollm2_135m_sft.yaml", description="recipe the DAG trains with (path on the cluster)"
    )
    retrain_min_new_examples: int = Field(default=20, ge=0, description="fewer new feedback examples -> run skipped")
    retrain_objective: Literal["auto", "sft", "dpo", "kto"] = Field(
        default="auto",
        description="what the DAG trains: auto = DPO when there are enough new preference pairs, else SFT",
    )
    retrain_preference_config: str = Field(
        default="training/configs/tiny_dpo_cpu.yaml", description="recipe the DAG trains DPO/KTO with"
    )
    retrain_adapter_alias: str | None = Field(
        default=None,
        description="retrain a LoRA adapter of the champion for model NAME:ALIAS (served unmerged on the champion's "
        "replicas, promoted and canaried behind the alias) instead of a whole version; unset: versions",
    )

    # --- promotion (ray_app.promotion: the demo, `llmops promote --gate` and the DAG) -----
    promotion_min_improvement: float = Field(
        default=0.01, ge=0, lt=1, description="fraction the candidate's eval loss must be below the champion's"
    )
    gate_preference_loss_tolerance: float = Field(
        default=0.02,
        ge=0,
        lt=1,
        description="a DPO/KTO candidate's eval loss may exceed the champion's by this "
        "fraction (it must show what it learned on the replayed corrections instead)",
    )
    gate_replay_days: float = Field(
        default=30.0, gt=0, description="corrections approved this recently form the gate's replay set"
    )
    gate_min_replay_accuracy: float = Field(
        default=0.0,
        ge=0,
        le=1,
        description="share of the replayed corrections the candidate must prefer",
    )
    gate_replay_margin: float = Field(
        default=0.1,
        ge=0,
        description="nats per token the candidate's preference for replayed corrections may trail the champion's",
    )
    gate_regression_margin: float = Field(
        default=0.1, ge=0, description="nats per token a regression case may lose against the champion"
    )
    gate_max_regressions: int = Field(default=0, ge=0, description="regression cases a candidate may lose beyond it")
    canary_share: float = Field(
        default=0.1, gt=0, lt=1, description="`llmops promote --canary`: share of conversations the challenger answers"
    )
    canary_window_s: float = Field(
        default=3600.0, gt=0, le=24 * 3600, description="a canary runs this long before promotion (at most a day)"
    )
    canary_max_error_ratio: float = Field(default=0.05, gt=0, lt=1, description="canary 5xx ratio that rolls back")
    canary_min_requests: int = Field(default=20, ge=1, description="requests before the error/latency checks count")
    canary_latency_margin: float = Field(
        default=0.5, ge=0, description="canary TTFT p95 may exceed the champion's by this fraction (or the floor)"
    )
    canary_latency_floor_s: float = Field(
        default=0.5, ge=0, description="...or by this many seconds, whichever is larger, before it rolls back"
    )
    canary_min_ratings: int = Field(default=10, ge=0, description="chat ratings of the canary needed to promote it")
    canary_worse_probability: float = Field(
        default=0.95, gt=0.5, lt=1, description="P(canary's thumbs-down rate > champion's) that rolls back"
    )
    canary_sticky_by: Literal["conversation", "user", "request"] = Field(
        default="conversation",
        description="what keeps a conversation on one version: the x-conversation-id header, then `user`, then the "
        "conversation's opening (conversation); `user` first (user); nothing (request)",
    )

    # --- validators ----------------------------------------------------------------------
    @field_validator("home", "model_cache_dir", "ray_temp_dir", mode="after")
    @classmethod
    def _expand(cls, value: Path | None) -> Path | None:
        return None if value is None else value.expanduser().absolute()

    @field_validator("retrain_schedule", mode="after")
    @classmethod
    def _schedule(cls, value: str | None) -> str | None:
        return None if value is None or value.strip().lower() in ("", "none", "null") else value.strip()

    @field_validator("retrain_adapter_alias", mode="after")
    @classmethod
    def _adapter_alias(cls, value: str | None) -> str | None:
        if not value or not value.strip():
            return None
        from ray_app.adapters import check_adapter_name  # the one rule for adapter names (it imports settings)

        return check_adapter_name(value.strip())

    @field_validator("store_uri", mode="after")
    @classmethod
    def _store_uri(cls, value: str | None) -> str | None:
        return None if value is None else check_store_uri(value)

    @field_validator("s3_endpoint_url", mode="after")
    @classmethod
    def _s3_endpoint(cls, value: str | None) -> str | None:
        return _check_http_url(value, "S3 endpoint")

    @field_validator("ray_dashboard_address", "chat_serve_url", "grafana_url", mode="after")
    @classmethod
    def _http_urls(cls, value: str | None, info) -> str | None:
        return _check_http_url(value, info.field_name)

    @field_validator("mlflow_tracking_uri", mode="after")
    @classmethod
    def _tracking_uri(cls, value: str | None) -> str | None:
        if not value:
            return None
        scheme = urlparse(value).scheme
        if scheme in ("http", "https"):
            return _check_http_url(value, "MLflow tracking URI")
        if scheme in ("", "file", "sqlite", "databricks") or scheme.startswith(("postgresql", "mysql")):
            return value
        raise ValueError(f"unsupported MLflow tracking URI {value!r}; expected http(s)://, file:, sqlite: or a DB URL")

    @field_validator("api_keys", "chat_users", "chat_allowed_origins", "feedback_trusted_users", mode="before")
    @classmethod
    def _split_keys(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [key.strip() for key in value.split(",") if key.strip()]
        return value

    @field_validator("ray_worker_port_range", mode="before")
    @classmethod
    def _split_range(cls, value: Any) -> Any:
        if isinstance(value, str):
            parts = value.replace(":", "-").split("-")
            if len(parts) != 2:
                raise ValueError(f"expected MIN-MAX, got {value!r}")
            return tuple(int(part) for part in parts)
        return value

    @model_validator(mode="after")
    def _fill_derived(self) -> Settings:
        if self.store_uri is None:
            self.store_uri = str(self.home / "store")
        if self.model_cache_dir is None:
            self.model_cache_dir = self.home / "models"
        if self.chat_database_url is None:
            self.chat_database_url = f"sqlite+aiosqlite:///{self.home / 'chat' / 'chat.db'}"
        if not self.chat_allowed_origins:  # the chat's own origin (a loopback host under both its names)
            loopback = ("127.0.0.1", "localhost")
            hosts = loopback if self.bind_host in loopback else (self.bind_host,)
            self.chat_allowed_origins = [f"http://{host}:{self.chat_port}" for host in hosts]
        self.chat_allowed_origins = [origin.rstrip("/") for origin in self.chat_allowed_origins]
        if self.chat_serve_url is None:
            self.chat_serve_url = f"http://{self.bind_host}:{self.serve_port}/v1"
        if self.mlflow_tracking_uri is None:
            self.mlflow_tracking_uri = f"http://{self.bind_host}:{self.mlflow_port}"
        if self.mlflow_backend_store_uri is None:
            self.mlflow_backend_store_uri = f"sqlite:///{self.home / 'mlflow' / 'mlflow.db'}"
        if self.mlflow_auth_database_uri is None:
            self.mlflow_auth_database_uri = f"sqlite:///{self.home / 'mlflow' / 'basic_auth.db'}"
        if self.mlflow_artifacts_destination is None:
            self.mlflow_artifacts_destination = str(self.home / "mlflow" / "artifacts")
        low, high = self.ray_worker_port_range
        if low > high:
            raise ValueError(f"ray_worker_port_range: {low} > {high}")
        if low <= self.ray_dashboard_port <= high:
            raise ValueError("ray_worker_port_range must not contain ray_dashboard_port")
        return self

    # --- derived values ------------------------------------------------------------------
    @property
    def stack_dir(self) -> Path:
        """Where `llmops up` keeps PIDs, ports and logs."""
        return self.home / "stack"

    @property
    def ray_auth_token_path(self) -> Path:
        """Where the stack keeps the generated Ray token when none is configured (mode 0600)."""
        return self.stack_dir / "ray_auth_token"

    def ray_client_env(self) -> dict[str, str]:
        """What a Ray client (driver, job SDK, worker) needs to reach a token-protected cluster.

        The token travels as a file path, never as a value, so it does not show up in
        runtime envs or the dashboard.
        """
        env = {"RAY_AUTH_MODE": self.ray_auth_mode}
        if self.ray_auth_mode == "token":
            env["RAY_AUTH_TOKEN_PATH"] = str(self.ray_auth_token_path)
        return env

    @property
    def serve_api_key_path(self) -> Path:
        """Where the generated inference API key is kept when none is configured (mode 0600)."""
        return self.stack_dir / "serve_api_key"

    @property
    def chat_admin_password_path(self) -> Path:
        """The generated password of chat user ``admin`` when LLMOPS_CHAT_USERS is empty (mode 0600)."""
        return self.stack_dir / "chat_admin_password"

    @property
    def mlflow_admin_password_path(self) -> Path:
        """The generated password of MLflow's ``admin`` when MLFLOW_TRACKING_PASSWORD is unset (mode 0600)."""
        return self.stack_dir / "mlflow_admin_password"

    # Reading, generating and exporting secrets lives in ray_app.credentials; these delegates
    # keep the callers' spelling and hold no logic.
    def ensure_ray_token(self) -> None:
        credentials.ensure_ray_token(self)

    def serve_api_keys(self) -> list[str]:
        return credentials.serve_api_keys(self)

    def chat_secret(self) -> str:
        return credentials.chat_secret(self)

    def ray_auth_headers(self) -> dict[str, str]:
        return credentials.ray_auth_headers(self)

    def apply_ray_client_env(self) -> None:
        credentials.apply_ray_client_env(self)

    @property
    def ray_dashboard_url(self) -> str:
        if self.ray_dashboard_address:
            return self.ray_dashboard_address.rstrip("/")
        return f"http://{self.bind_host}:{self.ray_dashboard_port}"

    @property
    def ray_gcs_address(self) -> str:
        return f"{self.bind_host}:{self.ray_port}"

    @property
    def mlflow_server_url(self) -> str:
        return f"http://{self.bind_host}:{self.mlflow_port}"

    @property
    def serve_url(self) -> str:
        return f"http://{self.bind_host}:{self.serve_port}"

    @property
    def prometheus_url(self) -> str:
        """The Prometheus queries go to: prometheus_address, else the stack's own."""
        return (self.prometheus_address or self.local_prometheus_url).rstrip("/")

    @property
    def local_prometheus_url(self) -> str:
        """The stack's own Prometheus (`llmops up -s prometheus`)."""
        return f"http://{self.bind_host}:{self.prometheus_port}"

    @property
    def chat_url(self) -> str:
        return f"http://{self.bind_host}:{self.chat_port}"

    def s3_credentials(self) -> tuple[str | None, str | None]:
        """The access key and secret key in clear text, for SDK clients only."""
        access = self.aws_access_key_id.get_secret_value() if self.aws_access_key_id else None
        secret = self.aws_secret_access_key.get_secret_value() if self.aws_secret_access_key else None
        return access, secret

    def worker_env(self) -> dict[str, str]:
        """Endpoints and paths for Ray workers, jobs and servers, under the ecosystem's standard names.

        Ray workers do not inherit the driver's settings object; pass this through
        ``runtime_env={"env_vars": ...}`` so they log and store where the driver does. It holds
        no secret: runtime envs show in the dashboard, the Jobs and State APIs and Ray's logs.
        Credentials reach workers through their node's environment (``credentials.node_env``).
        """
        env = {
            "LLMOPS_HOME": str(self.home),
            "LLMOPS_STORE_URI": str(self.store_uri),
            "MLFLOW_TRACKING_URI": str(self.mlflow_tracking_uri),
            "MLFLOW_HTTP_REQUEST_MAX_RETRIES": str(self.mlflow_http_retries),
            # Jobs on the cluster (the pipeline's promote and rollout) reach Serve through it.
            "LLMOPS_RAY_DASHBOARD_ADDRESS": self.ray_dashboard_url,
            "WANDB_MODE": self.wandb_mode,
            "WANDB_PROJECT": self.wandb_project,
            "AWS_REGION": self.aws_region,
            "AWS_DEFAULT_REGION": self.aws_region,
        }
        if self.s3_endpoint_url:
            env["MLFLOW_S3_ENDPOINT_URL"] = self.s3_endpoint_url
            env["AWS_ENDPOINT_URL"] = self.s3_endpoint_url
        return env

    def redacted(self) -> dict[str, str]:
        """Every setting as display text, secrets masked; safe to print or log."""
        shown: dict[str, str] = {}
        for name in type(self).model_fields:
            value = getattr(self, name)
            if isinstance(value, SecretStr):
                text = "********"
            elif isinstance(value, list) and value and isinstance(value[0], SecretStr):
                text = f"{len(value)} key(s)"
            elif value is None:
                text = ""
            else:
                text = _mask_url_password(str(value))
            shown[name] = text
        return shown


def _mask_url_password(text: str) -> str:
    return re.sub(r"(://[^:/@\s]+:)[^@/\s]+@", r"\1****@", text)


def _field_and_env_names(loc: str) -> tuple[str, str]:
    """The field behind an error location (a field name or one of its env aliases) and its variables."""
    for name, info in Settings.model_fields.items():
        aliases = info.validation_alias.choices if isinstance(info.validation_alias, AliasChoices) else []
        if loc == name or loc in aliases:
            return name, "/".join(str(alias) for alias in aliases) or f"LLMOPS_{name.upper()}"
    return loc, ""


def load_settings(**overrides: Any) -> Settings:
    """Build the settings; keyword overrides (CLI flags) win over env and `.env`.

    Raises SettingsError with one line per bad field, naming the field and its variable.
    """
    try:
        return Settings(**{key: value for key, value in overrides.items() if value is not None})
    except ValidationError as exc:
        lines = []
        for error in exc.errors():
            field, env_names = _field_and_env_names(str(error["loc"][0]) if error["loc"] else "settings")
            message = error["msg"].removeprefix("Value error, ")
            where = f"{field} ({env_names})" if env_names else field
            lines.append(f"invalid setting {where}: {message}")
        raise SettingsError("; ".join(lines)) from None


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings, read once from the environment."""
    return load_settings()

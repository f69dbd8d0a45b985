"""Secrets: the ones this platform generates for itself, and how credentials reach processes.

Configured secrets come from settings (the environment, `.env`, a mounted file); when one is
not configured, the local stack generates it into its stack dir with mode 0600 and every
process on this machine reads the same file.

Credentials travel the way a Ray cluster's do in production: in the environment a node (or a
server) starts with, never in a Ray ``runtime_env``, a job submission, a Serve config or a
command line, all of which the dashboard, the Jobs and State APIs and Ray's logs show.
:func:`node_env` is that environment; :func:`export_to_this_process` gives it to this process
(its own clients, and a local Ray it starts, which inherits it).
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import SecretStr

if TYPE_CHECKING:  # settings imports this module; the functions below only take its objects
    from ray_app.settings import Settings

MLFLOW_ADMIN = "admin"  # the local stack's MLflow admin when MLFLOW_TRACKING_USERNAME/PASSWORD are unset


def generated_secret(path: Path, prefix: str = "") -> str:
    """The secret in ``path``, created once with a random value and mode 0600."""
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:  # another process wrote it just now
            pass
        else:
            with os.fdopen(fd, "w") as handle:
                handle.write(prefix + secrets.token_urlsafe(24))
    return path.read_text().strip()


def serve_api_keys(settings: Settings) -> list[str]:
    """The inference API keys: the configured ones, else the local generated one (created once)."""
    if settings.api_keys:
        return [key.get_secret_value() for key in settings.api_keys]
    return [generated_secret(settings.serve_api_key_path, "sk-llmops-")]


def chat_secret(settings: Settings) -> str:
    """Chainlit's session-signing secret: CHAINLIT_AUTH_SECRET, else one generated once (0600)."""
    if settings.chat_auth_secret:
        return settings.chat_auth_secret.get_secret_value()
    return generated_secret(settings.stack_dir / "chat_auth_secret")


def ensure_ray_token(settings: Settings) -> None:
    """Write the Ray token file (the configured token, or a new random one) if it is missing."""
    if settings.ray_auth_mode != "token":
        return
    path = settings.ray_auth_token_path
    wanted = settings.ray_auth_token.get_secret_value() if settings.ray_auth_token else None
    if path.is_file() and (wanted is None or path.read_text().strip() == wanted):
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(wanted or secrets.token_hex(32))


def ray_auth_headers(settings: Settings) -> dict[str, str]:
    """HTTP headers for the Ray dashboard / Jobs API."""
    if settings.ray_auth_mode != "token":
        return {}
    if settings.ray_auth_token:
        return {"Authorization": f"Bearer {settings.ray_auth_token.get_secret_value()}"}
    path = settings.ray_auth_token_path
    return {"Authorization": f"Bearer {path.read_text().strip()}"} if path.is_file() else {}


def apply_ray_client_env(settings: Settings) -> None:
    """Export ``settings.ray_client_env()`` into this process before ``ray.init`` or a Jobs client.

    Ray reads the auth mode into its config when it is imported; if it already is, the config
    and the cached token are refreshed the way Ray itself does when it turns token auth on for a
    new local cluster (Ray's private ``_raylet`` API: the one place this project touches it).
    """
    import sys

    ensure_ray_token(settings)
    os.environ.update(settings.ray_client_env())
    if "ray" in sys.modules:
        from ray._raylet import AuthenticationTokenLoader, Config

        Config.initialize("")
        AuthenticationTokenLoader.instance().reset_cache()


def mlflow_identity(settings: Settings) -> tuple[str, str]:
    """(user, password) this process uses with MLflow: MLFLOW_TRACKING_USERNAME/PASSWORD from the
    settings, else the local stack's admin (password generated once into the stack dir)."""
    if settings.mlflow_tracking_password is not None:
        return settings.mlflow_tracking_username or MLFLOW_ADMIN, settings.mlflow_tracking_password.get_secret_value()
    return MLFLOW_ADMIN, generated_secret(settings.mlflow_admin_password_path)


def mlflow_serve_identity(settings: Settings) -> tuple[str, str]:
    """Serve's read-only MLflow identity: it resolves ``models:/`` and reads artifacts, nothing else."""
    if settings.mlflow_serve_password is not None:
        return settings.mlflow_serve_username, settings.mlflow_serve_password.get_secret_value()
    return settings.mlflow_serve_username, generated_secret(settings.stack_dir / "mlflow_serve_password")


def as_serve_identity(settings: Settings) -> Settings:
    """The same settings, speaking to MLflow as Serve's read-only identity (for replicas and app builds)."""
    user, password = mlflow_serve_identity(settings)
    update = {"mlflow_tracking_username": user, "mlflow_tracking_password": SecretStr(password)}
    return settings.model_copy(update=update)


def mlflow_env(identity: tuple[str, str]) -> dict[str, str]:
    """MLflow's own variables for an identity (its client reads them on every request)."""
    return {"MLFLOW_TRACKING_USERNAME": identity[0], "MLFLOW_TRACKING_PASSWORD": identity[1]}


@contextmanager
def speaking_as(identity: tuple[str, str]) -> Iterator[None]:
    """MLflow's client variables set to ``identity`` for the block, then restored as they were."""
    saved = {key: os.environ.get(key) for key in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")}
    os.environ.update(mlflow_env(identity))
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


# What Ray's libraries copy from the driver's environment into the runtime envs they create
# (Ray Tune's trainables: ray.tune.execution.class_cache; Serve LLM's engines: HF tokens).
COPIED_BY_RAY = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN",
                 "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")  # fmt: skip


@contextmanager
def kept_out_of_runtime_envs() -> Iterator[None]:
    """Hide the credentials Ray's libraries would copy into runtime envs for the block, then restore them.

    Ray Tune puts the driver's ``AWS_*`` keys into every trainable's runtime env, which the State
    API, the dashboard and the runtime env agent's log show. Workers have their own from the node.
    """
    saved = {key: os.environ.pop(key) for key in COPIED_BY_RAY if key in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


def secret_env(settings: Settings) -> dict[str, str]:
    """The configured credentials under the ecosystem's names (S3 keys, W&B key, MLflow identity)."""
    env = mlflow_env(mlflow_identity(settings))
    access, secret = settings.s3_credentials()
    if access:
        env["AWS_ACCESS_KEY_ID"] = access
    if secret:
        env["AWS_SECRET_ACCESS_KEY"] = secret
    if settings.wandb_api_key:
        env["WANDB_API_KEY"] = settings.wandb_api_key.get_secret_value()
    if settings.mlflow_serve_password is not None:  # else Serve's replicas read the generated one
        env["LLMOPS_MLFLOW_SERVE_PASSWORD"] = settings.mlflow_serve_password.get_secret_value()
    return env


def node_env(settings: Settings) -> dict[str, str]:
    """The environment a Ray node or a platform server starts with: endpoints and credentials."""
    return settings.worker_env() | secret_env(settings)


def export_to_this_process(settings: Settings) -> None:
    """Put :func:`node_env` into ``os.environ``: for this process's clients and a Ray it starts locally."""
    os.environ.update(node_env(settings))

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
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # settings imports this module; the functions below only take its objects
    from ray_app.settings import Settings


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


def secret_env(settings: Settings) -> dict[str, str]:
    """The configured credentials under the ecosystem's names (S3 keys, W&B key)."""
    env = {}
    access, secret = settings.s3_credentials()
    if access:
        env["AWS_ACCESS_KEY_ID"] = access
    if secret:
        env["AWS_SECRET_ACCESS_KEY"] = secret
    if settings.wandb_api_key:
        env["WANDB_API_KEY"] = settings.wandb_api_key.get_secret_value()
    return env


def node_env(settings: Settings) -> dict[str, str]:
    """The environment a Ray node or a platform server starts with: endpoints and credentials."""
    return settings.worker_env() | secret_env(settings)


def export_to_this_process(settings: Settings) -> None:
    """Put :func:`node_env` into ``os.environ``: for this process's clients and a Ray it starts locally."""
    os.environ.update(node_env(settings))

"""Deploy Serve configs to a running cluster, and promote a model version with a rolling update.

Everything goes through the dashboard's Serve REST API (what `serve deploy` uses), so it
works the same against the local stack, a `ray up` cluster or a KubeRay head.

Promotion = move the MLflow alias ``champion``, then redeploy every app that serves
``models:/NAME@champion`` with ``model_version`` pinned to the new version. The args change,
so Serve starts replicas of the new version and drains the old ones (each finishes its
in-flight requests: ``graceful_shutdown_timeout_s``); requests that arrive meanwhile wait in
Serve's queues instead of failing.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ray_app import credentials
from ray_app.settings import Settings

APP_IMPORT_PATH = "ray_app.serving.app:build_app"
CHAMPION = "champion"


class ServeError(RuntimeError):
    """Serve could not be reached, refused a config, or an app failed to deploy."""


def load_serve_config(path: Path, settings: Settings, model: str | None = None) -> dict[str, Any]:
    """A Serve config file with the local HTTP host/port from settings and, optionally, the model."""
    try:
        config = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ServeError(f"cannot read Serve config {path}: {exc}") from exc
    if not isinstance(config, dict) or not config.get("applications"):
        raise ServeError(f"{path} is not a Serve config: it has no 'applications' list")
    config.setdefault("http_options", {}).update({"host": settings.bind_host, "port": settings.serve_port})
    if model:
        for app in config["applications"]:
            if app.get("import_path") == APP_IMPORT_PATH:
                app.setdefault("args", {})["model"] = model
                app["args"].pop("model_version", None)
    return config


def _client(settings: Settings):
    from ray.dashboard.modules.serve.sdk import ServeSubmissionClient

    try:
        return ServeSubmissionClient(settings.ray_dashboard_url, headers=credentials.ray_auth_headers(settings))
    except Exception as exc:  # connection/auth errors of several kinds, all mean "not reachable"
        raise ServeError(f"cannot reach the Ray dashboard at {settings.ray_dashboard_url}: {exc}") from exc


def serve_details(settings: Settings) -> dict[str, Any]:
    """Serve's status document (applications, deployments, replicas) from the dashboard."""
    try:
        return _client(settings).get_serve_details()
    except ServeError:
        raise
    except Exception as exc:
        raise ServeError(f"Serve status unavailable at {settings.ray_dashboard_url}: {exc}") from exc


def deploy(config: dict[str, Any], settings: Settings, wait_s: float = 600.0) -> dict[str, Any]:
    """PUT ``config`` (all applications) and wait until each is RUNNING; returns the final details.

    Raises ServeError with Serve's own message when an application fails to deploy.
    """
    client = _client(settings)
    try:
        before = {
            name: app.get("last_deployed_time_s", 0)
            for name, app in client.get_serve_details().get("applications", {}).items()
        }
        client.deploy_applications(config)
    except Exception as exc:
        raise ServeError(f"Serve refused the config at {settings.ray_dashboard_url}: {exc}") from exc
    names = [app.get("name", "default") for app in config["applications"]]
    return wait_running(names, settings, wait_s, before)


def wait_running(
    names: list[str], settings: Settings, wait_s: float, deployed_before: dict[str, float] | None = None
) -> dict[str, Any]:
    """Wait until every app in ``names`` runs its newest config (deployed after ``deployed_before``)."""
    deployed_before = deployed_before or {}
    deadline = time.monotonic() + wait_s
    while True:
        details = serve_details(settings)
        apps = details.get("applications", {})
        statuses = {}
        for name in names:
            app = apps.get(name, {})
            fresh = app.get("last_deployed_time_s", 0) > deployed_before.get(name, -1)
            statuses[name] = app.get("status", "NOT_STARTED") if fresh else "PENDING"
        failed = {name: apps[name].get("message", "") for name, s in statuses.items() if s == "DEPLOY_FAILED"}
        if failed:
            raise ServeError("; ".join(f"app {name!r} failed to deploy: {msg}" for name, msg in failed.items()))
        if all(status == "RUNNING" for status in statuses.values()):
            return details
        if time.monotonic() > deadline:
            raise ServeError(f"Serve apps not RUNNING after {wait_s:.0f}s: {statuses}")
        time.sleep(1.0)


@dataclass
class Promotion:
    name: str
    version: str
    previous: str | None
    rolled_apps: list[str] = field(default_factory=list)


def promote(
    name: str,
    settings: Settings,
    version: str | None = None,
    from_alias: str | None = None,
    rollout: bool = True,
    wait_s: float = 600.0,
) -> Promotion:
    """Point ``champion`` of ``name`` at ``version`` (or at what ``from_alias`` points to), then roll Serve.

    Raises RegistryError when the name/version/alias does not exist, ServeError when Serve fails.
    """
    from ray_app.registry import RegistryError, get_version, set_alias

    if (version is None) == (from_alias is None):
        raise ValueError("give exactly one of version or from_alias")
    target = get_version(f"models:/{name}@{from_alias}" if from_alias else f"models:/{name}/{version}", settings)
    try:
        previous = get_version(f"models:/{name}@{CHAMPION}", settings).version
    except RegistryError:
        previous = None
    set_alias(name, CHAMPION, target.version, settings)
    promotion = Promotion(name, target.version, previous)
    if rollout:
        promotion.rolled_apps = roll_serve_apps(name, target.version, settings, wait_s)
    return promotion


def roll_serve_apps(name: str, version: str, settings: Settings, wait_s: float = 600.0) -> list[str]:
    """Redeploy the apps that serve ``models:/NAME@champion`` pinned to ``version``; returns their names.

    Returns [] without touching Serve when no such app is deployed (or Serve is not running).
    """
    try:
        details = serve_details(settings)
    except ServeError:
        return []
    wanted = f"models:/{name}@{CHAMPION}"
    apps = details.get("applications", {})
    configs, rolled = [], []
    for app_name, app in apps.items():
        config = copy.deepcopy(app.get("deployed_app_config"))
        if config is None:
            raise ServeError(
                f"app {app_name!r} was deployed from Python (serve.run), not from a config; "
                "redeploy it with `serve run`/`llmops serve` to let promote roll it"
            )
        args = config.get("args") or {}
        if config.get("import_path") == APP_IMPORT_PATH and (args.get("model") or settings.serve_model) == wanted:
            if args.get("model_version") != version:
                config["args"] = {**args, "model": wanted, "model_version": version}
                rolled.append(app_name)
        configs.append(config)
    if not rolled:
        return []
    http = details.get("http_options") or {}
    body = {
        "proxy_location": details.get("proxy_location") or "HeadOnly",
        "http_options": {key: http[key] for key in ("host", "port") if key in http},
        "applications": configs,
    }
    deploy(body, settings, wait_s)
    return rolled


def shutdown(settings: Settings) -> None:
    """Delete every Serve application (the Serve controller and proxies stay with the cluster)."""
    try:
        _client(settings).delete_applications()
    except ServeError:
        raise
    except Exception as exc:
        raise ServeError(f"cannot shut Serve down at {settings.ray_dashboard_url}: {exc}") from exc

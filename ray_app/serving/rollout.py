"""Deploy Serve configs to a running cluster, and promote a model version with a rolling update.

Everything goes through the dashboard's Serve REST API (what `serve deploy` uses), so it
works the same against the local stack, a `ray up` cluster or a KubeRay head.

Promotion is atomic: redeploy every app that serves ``models:/NAME@champion`` with
``model_version`` pinned to the new version and wait until it runs, then move the MLflow alias
``champion``. The args change, so Serve starts replicas of the new version and drains the old
ones (each finishes its in-flight requests: ``graceful_shutdown_timeout_s``); requests that
arrive meanwhile wait in Serve's queues instead of failing. If the new replicas never become
healthy, the apps are redeployed with their previous configs and the alias does not move.
"""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ray_app import credentials
from ray_app.settings import Settings

APP_IMPORT_PATH = "ray_app.serving.app:build_app"
INGRESS_DEPLOYMENT = "OpenAIIngress"  # ray_app.serving.ingress.INGRESS_NAME (not imported: no Serve here)
CHAMPION = "champion"


log = logging.getLogger(__name__)


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
    actor: str | None = None,
) -> Promotion:
    """Make ``version`` (or what ``from_alias`` points to) the ``champion`` of ``name``, atomically.

    In order: the version's folder must be complete (its manifest is there); with ``rollout``,
    the Serve apps serving ``models:/NAME@champion`` are rolled to it and must reach RUNNING
    (an unreachable dashboard, a failed deploy, crash-looping replicas or the timeout roll them
    back to what they ran); only then does the alias move. A failure anywhere leaves the alias
    on the previous version and Serve serving it, and raises. Every decision is recorded as
    ``promotion*`` tags on the version (:func:`record_promotion`).

    Raises RegistryError when the name/version/alias does not exist, ModelResolutionError when
    the folder is incomplete, ServeError when Serve cannot be rolled.
    """
    from ray_app.models import check_model_source
    from ray_app.registry import RegistryError, get_version, set_alias

    target = _target(name, version, from_alias, settings)
    try:
        previous = get_version(f"models:/{name}@{CHAMPION}", settings).version
    except RegistryError:
        previous = None
    promotion = Promotion(name, target.version, previous)
    decision = {"name": name, "version": target.version, "previous": previous, "actor": actor, "settings": settings}
    try:
        check_model_source(target.source, settings)
        before = running_config(settings) if rollout else None
        if rollout:
            drain_canaries(name, settings, wait_s)  # no request is on a canary when its deployment goes
            promotion.rolled_apps = roll_serve_apps(name, target.version, settings, wait_s, previous=previous)
        try:
            set_alias(name, CHAMPION, target.version, settings)
        except Exception:
            if promotion.rolled_apps:
                deploy(before, settings, wait_s)  # exactly what ran before, whatever it pinned
            raise
    except Exception as exc:
        record_promotion(**decision, result="failed", reason=str(exc))
        raise
    rolled = f"; Serve apps rolled: {', '.join(promotion.rolled_apps)}" if promotion.rolled_apps else ""
    record_promotion(
        **decision, result="promoted", reason=f"champion {previous or '(none)'} -> {target.version}{rolled}"
    )
    for canary in canary_versions(before, name) if before else ():  # the rollout replaced any canary
        state = "promoted" if canary == target.version else "rolled_back"
        record_canary(name, canary, state, f"champion {previous or '(none)'} -> {target.version}", settings, actor)
    return promotion


def record_promotion(
    name: str,
    version: str,
    previous: str | None,
    result: str,
    reason: str,
    settings: Settings,
    actor: str | None = None,
) -> None:
    """Tag ``version`` with a promotion decision: result (promoted, rejected, failed), from, to, who, when, why.

    The one place these tags are written; a tracking server that is down too does not hide
    the original error (the failure is logged).
    """
    from ray_app.registry import client

    tags = {
        "promotion": result,
        "promotion.reason": reason[:4000],
        "promotion.from": previous or "none",
        "promotion.to": version,
        "promotion.by": decided_by(actor, "ray_app.serving.rollout.promote"),
        "promotion.at": utc_now(),
    }
    try:
        mlflow = client(settings)
        for key, value in tags.items():
            mlflow.set_model_version_tag(name, version, key, value)
    except Exception:
        if result == "promoted":
            raise
        log.warning("could not record the %s promotion of %s v%s in MLflow", result, name, version, exc_info=True)


def roll_serve_apps(
    name: str, version: str, settings: Settings, wait_s: float = 600.0, previous: str | None = None
) -> list[str]:
    """Redeploy the apps that serve ``models:/NAME@champion`` pinned to ``version`` (a canary removed).

    Returns their names; [] without touching Serve when no such app needs it. Raises ServeError
    when the dashboard cannot be reached, and when the new deploy fails: the apps are then
    redeployed with the configs they ran before (and waited for), so Serve keeps serving ``previous``.
    """

    def pinned(app: dict[str, Any]) -> dict[str, Any] | None:
        args = app.get("args") or {}
        if args.get("model_version") == version and "canary" not in args:
            return None
        if args.get("model_version") != version and ingress_user_config(app):
            # Adapter aliases name adapters of the version they were set on: the new one starts from its own
            # recorded aliases (its tags).
            _set_ingress_user_config(app, {})
        return {**app, "args": {**_without_canary(args), "model": f"models:/{name}@{CHAMPION}",
                                "model_version": version}}  # fmt: skip

    was = f"version {previous}" if previous else "their previous configs"
    return roll_apps(name, pinned, settings, wait_s, was, part="app")


def roll_apps(name: str, change, settings: Settings, wait_s: float, was: str, part: str = "args") -> list[str]:
    """Deploy all apps, ``change(args)`` applied to those serving ``models:/NAME@champion``; roll back on failure.

    ``part``: what ``change`` takes and returns (None: leave the app as it is): "args" the app's args;
    "ingress" ``change(user_config, args)``, the OpenAIIngress deployment's user_config (Serve applies
    it in place: no replica restarts); "app" the app's whole config."""
    details = serve_details(settings)
    body, rolled = _rolled_config(details, name, change, settings, part)
    if not rolled:
        return []
    try:
        deploy(body, settings, wait_s)
    except ServeError as exc:
        restore, _ = _rolled_config(details, name, None, settings)
        try:
            deploy(restore, settings, wait_s)
        except ServeError as again:
            raise ServeError(f"{exc}; rolling back to the previous configs failed too: {again}") from exc
        raise ServeError(f"{exc}; Serve apps {', '.join(rolled)} rolled back to {was}") from exc
    return rolled


def champion_apps(name: str, settings: Settings) -> list[str]:
    """The Serve apps serving ``models:/NAME@champion`` (what promote rolls and a canary runs in)."""
    return _rolled_config(serve_details(settings), name, lambda args: args, settings)[1]


def running_config(settings: Settings) -> dict[str, Any]:
    """The Serve config of every app as it was deployed (to deploy again as it is, or extended).

    Raises ServeError when the dashboard cannot be reached or an app was deployed from Python.
    """
    return _rolled_config(serve_details(settings), "", None, settings)[0]


def _rolled_config(
    details: dict[str, Any], name: str, change, settings: Settings, part: str = "args"
) -> tuple[dict[str, Any], list[str]]:
    """The Serve config to PUT (every app), ``change`` applied to the ``part`` (see roll_apps) of the apps
    serving models:/NAME@champion; ``change`` None: all as they are."""
    wanted = f"models:/{name}@{CHAMPION}"
    configs, rolled = [], []
    for app_name, app in details.get("applications", {}).items():
        config = copy.deepcopy(app.get("deployed_app_config"))
        if config is None:
            raise ServeError(
                f"app {app_name!r} was deployed from Python (serve.run), not from a config; "
                "redeploy it with `serve run`/`llmops serve` to let promote roll it"
            )
        args = config.get("args") or {}
        serves_champion = (
            config.get("import_path") == APP_IMPORT_PATH and (args.get("model") or settings.serve_model) == wanted
        )
        changed = _changed(config, change, part) if change is not None and serves_champion else None
        if changed is not None:
            config = changed
            rolled.append(app_name)
        configs.append(config)
    http = details.get("http_options") or {}
    body = {
        "proxy_location": details.get("proxy_location") or "HeadOnly",
        "http_options": {key: http[key] for key in ("host", "port") if key in http},
        "applications": configs,
    }
    return body, rolled


def _changed(config: dict[str, Any], change, part: str) -> dict[str, Any] | None:
    """The app ``config`` (a copy of its own) with ``change`` applied to its ``part``; None: unchanged."""
    args = config.get("args") or {}
    if part == "app":
        return change(config)
    if part == "ingress":
        routing = change(ingress_user_config(config), args)
        if routing is not None:
            _set_ingress_user_config(config, routing)
        return None if routing is None else config
    changed = change(args)
    return None if changed is None else {**config, "args": changed}


def ingress_user_config(app_config: dict[str, Any]) -> dict[str, Any]:
    """The OpenAIIngress deployment's user_config in an app's config (its adapter routing); {} when unset."""
    for deployment in app_config.get("deployments") or []:
        if deployment.get("name") == INGRESS_DEPLOYMENT:
            return dict(deployment.get("user_config") or {})
    return {}


def _set_ingress_user_config(app_config: dict[str, Any], user_config: dict[str, Any]) -> None:
    deployments = app_config.setdefault("deployments", [])
    for deployment in deployments:
        if deployment.get("name") == INGRESS_DEPLOYMENT:
            deployment["user_config"] = user_config
            return
    deployments.append({"name": INGRESS_DEPLOYMENT, "user_config": user_config})


def _without_canary(args: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in args.items() if key != "canary"}


# --- canary: a challenger beside the champion, in the same apps --------------------------------
@dataclass
class Canary:
    name: str
    version: str  # the challenger's
    champion: str
    share: float
    sticky_by: str
    apps: list[str] = field(default_factory=list)


def start_canary(
    name: str,
    settings: Settings,
    version: str | None = None,
    from_alias: str | None = None,
    share: float | None = None,
    sticky_by: str | None = None,
    wait_s: float = 600.0,
    actor: str | None = None,
) -> Canary:
    """Serve ``version`` (or what ``from_alias`` points to) beside the champion in every app serving it.

    The champion stays pinned (its alias does not move); the canary answers ``share`` of the
    conversations (settings.canary_share), sticky by ``sticky_by`` (settings.canary_sticky_by).
    The apps must reach RUNNING, else they are rolled back to what they ran and ServeError is
    raised. Tags the version ``canary=running`` (:func:`record_canary`).
    """
    from ray_app.models import check_model_source
    from ray_app.registry import RegistryError, get_version

    target = _target(name, version, from_alias, settings)
    try:
        champion = get_version(f"models:/{name}@{CHAMPION}", settings).version
    except RegistryError as exc:
        raise ValueError(f"{name} has no champion to run a canary beside: promote one without --canary") from exc
    if champion == target.version:
        raise ValueError(f"version {target.version} already is the champion of {name}")
    others = canary_versions(running_config(settings), name) - {target.version}
    if others:
        raise ValueError(f"version {', '.join(sorted(others))} of {name} already runs as a canary: promote or roll "
                         "it back first (`llmops judge`, `llmops rollback`)")  # fmt: skip
    check_model_source(target.source, settings)
    share, sticky_by = share or settings.canary_share, sticky_by or settings.canary_sticky_by
    canary = Canary(name, target.version, champion, share, sticky_by)
    spec = {"model_version": canary.version, "share": canary.share, "sticky_by": canary.sticky_by}

    def with_canary(args: dict[str, Any]) -> dict[str, Any]:
        return {**args, "model": f"models:/{name}@{CHAMPION}", "model_version": champion, "canary": spec}

    try:
        canary.apps = roll_apps(name, with_canary, settings, wait_s, f"version {champion} alone")
        if not canary.apps:
            raise ServeError(f"no running Serve app serves models:/{name}@{CHAMPION}: nothing to run a canary in")
    except Exception as exc:
        record_canary(name, canary.version, "failed", str(exc), settings, actor)
        raise
    reason = f"{canary.share:.0%} of conversations (sticky by {canary.sticky_by}) beside champion {champion}"
    record_canary(name, canary.version, "running", f"{reason}; apps: {', '.join(canary.apps)}", settings, actor)
    return canary


def stop_canary(
    name: str, settings: Settings, reason: str, wait_s: float = 600.0, actor: str | None = None
) -> list[str]:
    """Roll the canary back: the apps serving ``models:/NAME@champion`` serve the champion alone again.

    Returns the apps rolled; tags the canary's version ``canary=rolled_back`` with ``reason``.
    """
    versions = canary_versions(running_config(settings), name)

    def alone(args: dict[str, Any]) -> dict[str, Any] | None:
        return _without_canary(args) if "canary" in args else None

    drain_canaries(name, settings, wait_s)
    apps = roll_apps(name, alone, settings, wait_s, "the champion with its canary")
    for version in sorted(versions):
        record_canary(name, version, "rolled_back", reason, settings, actor)
    return apps


def drain_canaries(name: str, settings: Settings, wait_s: float = 600.0) -> list[str]:
    """Route no new conversation to the canaries of ``name`` (share 0) and wait until the old ingress replicas are gone.

    The first half of ending a canary: removing its deployment while an ingress still sends it
    requests fails them. Returns the apps drained ([] when none runs a canary).
    """

    def draining(args: dict[str, Any]) -> dict[str, Any] | None:
        canary = args.get("canary")
        return {**args, "canary": {**canary, "share": 0.0}} if canary and canary.get("share") else None

    apps = roll_apps(name, draining, settings, wait_s, "their canaries")
    deadline = time.monotonic() + wait_s
    while apps:
        details = serve_details(settings)["applications"]
        ingresses = [details.get(app, {}).get("deployments", {}).get(INGRESS_DEPLOYMENT, {}) for app in apps]
        if all(r.get("state") == "RUNNING" for i in ingresses for r in i.get("replicas", [])):
            break
        if time.monotonic() > deadline:
            raise ServeError(f"the old ingress replicas of {', '.join(apps)} did not drain in {wait_s:.0f}s")
        time.sleep(1.0)
    return apps


def canary_lines(settings: Settings) -> list[str]:
    """One line per Serve app running a canary: versions, share, stickiness, its last verdict (``llmops status``)."""
    from ray_app.registry import RegistryError, get_version

    lines = []
    for app in running_config(settings)["applications"]:
        args = app.get("args") or {}
        name = str(args.get("model", "")).removeprefix("models:/").split("@")[0]
        routing = ingress_user_config(app)
        for alias, challenger in (routing.get("adapter_canaries") or {}).items():
            lines.append(f"Serve app {app['name']}: {name}:{alias} on adapter {routing['adapter_aliases'][alias]}, "
                         f"canary adapter {challenger['adapter']} for {challenger['share']:.0%} of conversations "
                         f"(`llmops judge {name}:{alias}`)")  # fmt: skip
        canary = args.get("canary")
        if not canary:
            continue
        try:
            tags = get_version(f"models:/{name}/{canary['model_version']}", settings).tags
            verdict = f"; last verdict: {tags['canary.verdict']} ({tags.get('canary.verdict_reason', '')})" \
                if tags.get("canary.verdict") else "; not judged yet (`llmops judge`)"  # fmt: skip
        except RegistryError as exc:
            verdict = f"; verdict unknown: {exc}"
        lines.append(f"Serve app {app['name']}: {name} champion v{args.get('model_version')}, canary "
                     f"v{canary['model_version']} for {canary['share']:.0%} of conversations (sticky by "
                     f"{canary.get('sticky_by', 'conversation')}){verdict}")  # fmt: skip
    return lines


def canary_versions(config: dict[str, Any], name: str | None = None) -> set[str]:
    """The canary versions a Serve config (``running_config``) serves (beside ``models:/NAME@champion``)."""
    apps = [app.get("args") or {} for app in config["applications"]]
    if name is not None:
        apps = [args for args in apps if args.get("model") == f"models:/{name}@{CHAMPION}"]
    return {(args.get("canary") or {}).get("model_version") for args in apps} - {None}


def record_canary(
    name: str, version: str, state: str, reason: str, settings: Settings, actor: str | None = None
) -> None:
    """Tag ``version`` with its canary's state (running, promoted, rolled_back, failed), why, who and when."""
    from ray_app.registry import client

    tags = {
        "canary": state,
        "canary.reason": reason[:4000],
        "canary.by": decided_by(actor, "ray_app.serving.rollout"),
        f"canary.{state}_at": utc_now(),
    }
    try:
        mlflow = client(settings)
        for key, value in tags.items():
            mlflow.set_model_version_tag(name, version, key, value)
    except Exception:  # a registry that is down too must not hide what happened to Serve
        log.exception("could not record the canary of %s v%s (%s: %s)", name, version, state, reason)


def shutdown(settings: Settings) -> None:
    """Delete every Serve application (the Serve controller and proxies stay with the cluster)."""
    try:
        _client(settings).delete_applications()
    except ServeError:
        raise
    except Exception as exc:
        raise ServeError(f"cannot shut Serve down at {settings.ray_dashboard_url}: {exc}") from exc


def _target(name: str, version: str | None, from_alias: str | None, settings: Settings):
    """The registry version named by exactly one of ``version`` or ``from_alias``."""
    from ray_app.registry import get_version

    if (version is None) == (from_alias is None):
        raise ValueError("give exactly one of version or from_alias")
    return get_version(f"models:/{name}@{from_alias}" if from_alias else f"models:/{name}/{version}", settings)


def decided_by(actor: str | None, default: str) -> str:
    """Who made a decision, as the version's tags record it: the actor, the OS user and the host."""
    import getpass
    import socket

    return f"{actor or default} ({getpass.getuser()}@{socket.gethostname()})"


def utc_now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())

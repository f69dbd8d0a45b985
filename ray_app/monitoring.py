"""Monitoring: the local Prometheus, what it scrapes, its credentials, and queries against it.

`llmops up -s prometheus` starts Debian's ``prometheus`` (bound to ``bind_host``, basic auth
through its web config) with a config generated here that scrapes:

- every Ray node's metrics agent, from the service-discovery file Ray keeps in its temp dir
  (Ray's own metrics plus the platform's, ``ray_app.serving.metrics``);
- the MLflow server's ``/metrics`` (``--expose-prometheus``) when it runs without its basic-auth
  app: with it, MLflow (fail-closed) shows ``/metrics`` to admins only, and Prometheus is not
  given an admin's password;
- the chat's ``/metrics`` (feedback per model version, ``ray_app.chat.metrics``), with a bearer
  token only Prometheus and the chat know;
- itself;

and evaluates the alert rules of ``cluster/prometheus/alerts.yml``. The Ray dashboard's Metrics
tab queries it (``RAY_PROMETHEUS_HOST`` and ``RAY_PROMETHEUS_HEADERS`` in the head's
environment). Secrets are files under the stack dir (0600), never in a config or command line.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import threading
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path

from ray_app.credentials import generated_secret
from ray_app.settings import Settings

REPO = Path(__file__).resolve().parents[1]
ALERT_RULES = REPO / "cluster" / "prometheus" / "alerts.yml"
PROMETHEUS_USER = "llmops"


class MonitoringError(RuntimeError):
    """Prometheus is missing, unreachable, or refused a query; the message names the URL or the fix."""


def prometheus_dir(settings: Settings) -> Path:
    return settings.stack_dir / "prometheus"


def prometheus_password(settings: Settings) -> str:
    """The password of Prometheus's one user (generated once, 0600)."""
    return generated_secret(prometheus_dir(settings) / "password")


def metrics_token_path(settings: Settings) -> Path:
    """The bearer token the chat's /metrics wants from Prometheus (generated once, 0600)."""
    return prometheus_dir(settings) / "metrics_token"


def metrics_token(settings: Settings) -> str:
    """LLMOPS_METRICS_TOKEN, else the generated one."""
    if settings.metrics_token:
        return settings.metrics_token.get_secret_value()
    return generated_secret(metrics_token_path(settings))


def prometheus_headers(settings: Settings) -> dict[str, str]:
    """Headers that authenticate a query to the local Prometheus."""
    pair = f"{PROMETHEUS_USER}:{prometheus_password(settings)}".encode()
    return {"Authorization": "Basic " + base64.b64encode(pair).decode()}


def dashboard_env(settings: Settings) -> dict[str, str]:
    """What the Ray head's dashboard needs to draw its Metrics tab from our Prometheus (and Grafana)."""
    env = {
        "RAY_PROMETHEUS_HOST": settings.prometheus_url,
        "RAY_PROMETHEUS_HEADERS": json.dumps(prometheus_headers(settings)),
    }
    if settings.grafana_url:
        env["RAY_GRAFANA_HOST"] = settings.grafana_url
    return env


def prometheus_binary() -> str:
    found = shutil.which("prometheus")
    if found is None:
        raise MonitoringError("the prometheus binary is not installed: `make system-deps` (Debian's prometheus)")
    return found


def write_config(settings: Settings, ray_discovery: Path) -> tuple[Path, Path]:
    """The scrape config and the web (auth) config, written 0600; returns their paths.

    ``ray_discovery``: the service-discovery file of the Ray head to scrape.
    """
    import bcrypt
    import yaml

    folder = prometheus_dir(settings)
    folder.mkdir(parents=True, exist_ok=True)
    _write_private(metrics_token_path(settings), metrics_token(settings))  # Prometheus reads it from a file
    hashed = bcrypt.hashpw(prometheus_password(settings).encode(), bcrypt.gensalt(rounds=10)).decode()
    web = folder / "web.yml"
    _write_private(web, yaml.safe_dump({"basic_auth_users": {PROMETHEUS_USER: hashed}}))
    config = folder / "prometheus.yml"
    _write_private(config, yaml.safe_dump(scrape_config(settings, ray_discovery), sort_keys=False))
    return config, web


def scrape_config(settings: Settings, ray_discovery: Path) -> dict:
    """Prometheus's configuration for the local stack (no secret in it: only file paths)."""
    host = settings.bind_host
    interval = f"{settings.prometheus_scrape_interval_s}s"

    def static(job: str, port: int, **auth) -> dict:
        return {"job_name": job, "static_configs": [{"targets": [f"{host}:{port}"]}], **auth}

    jobs = [
        {"job_name": "ray", "file_sd_configs": [{"files": [str(ray_discovery)]}]},
        static("chat", settings.chat_port, authorization={
            "type": "Bearer", "credentials_file": str(metrics_token_path(settings))}),
        static("prometheus", settings.prometheus_port, basic_auth={
            "username": PROMETHEUS_USER, "password_file": str(prometheus_dir(settings) / "password")}),
    ]  # fmt: skip
    if not settings.mlflow_auth:
        jobs.append(static("mlflow", settings.mlflow_port))
    return {
        "global": {"scrape_interval": interval, "evaluation_interval": interval},
        "rule_files": [str(ALERT_RULES)],
        "scrape_configs": jobs,
    }


def _write_private(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(text)


def prometheus_command(settings: Settings) -> list[str]:
    folder = prometheus_dir(settings)
    return [
        prometheus_binary(),
        f"--config.file={folder / 'prometheus.yml'}",
        f"--web.config.file={folder / 'web.yml'}",
        f"--web.listen-address={settings.bind_host}:{settings.prometheus_port}",
        f"--storage.tsdb.path={settings.home / 'prometheus'}",
        f"--storage.tsdb.retention.time={settings.prometheus_retention}",
    ]


def ray_metric(kind, name: str, exported: dict[str, str], tags: dict[str, str], **options):
    """A Ray metric (``kind``: a Counter, Gauge or Histogram class of ``ray.util.metrics`` or
    ``ray.serve.metrics``) with ``tags`` as its default tags and its help text from ``exported``,
    which is keyed by the name Prometheus sees (Ray's ``ray_`` prefix, ``_total`` on counters)."""
    seen_as = f"ray_{name}_total" if kind.__name__ == "Counter" else f"ray_{name}"
    metric = kind(name, exported[seen_as], tag_keys=tuple(tags), **options)
    metric.set_default_tags(dict(tags))  # a dict of its own: Serve adds its tags into the one it is given
    return metric


def every(interval_s: float, report: Callable[[], None], stopped: threading.Event) -> None:
    """Call ``report`` now and every ``interval_s`` on a daemon thread, until ``stopped`` or it raises.

    For gauges: Ray's agent drops a gauge series nobody set for two report intervals (so that
    dead workers' series go), so a value that must stay visible is set again and again.
    """

    def loop() -> None:
        while True:
            try:
                report()
            except Exception:  # a process shutting down: nothing left to report
                return
            if stopped.wait(interval_s):
                return

    threading.Thread(target=loop, name="llmops-metrics", daemon=True).start()


# --- queries -----------------------------------------------------------------------------
def _get(settings: Settings, path: str, params: dict[str, str]) -> dict:
    url = f"{settings.prometheus_url}{path}?{urllib.parse.urlencode(params)}"
    request = urllib.request.Request(url, headers=prometheus_headers(settings))  # noqa: S310 - our own URL
    try:
        with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310
            body = json.load(response)
    except urllib.error.HTTPError as exc:
        detail = exc.read().decode(errors="replace")
        try:
            detail = json.loads(detail).get("error", detail)
        except ValueError:
            pass
        raise MonitoringError(f"Prometheus at {settings.prometheus_url} refused {params}: {detail}") from None
    except (urllib.error.URLError, OSError) as exc:
        raise MonitoringError(f"cannot reach Prometheus at {settings.prometheus_url}: {exc}") from None
    return body["data"]


def query(settings: Settings, promql: str) -> list[dict]:
    """An instant query: the result vector (``[{"metric": {...}, "value": [t, "v"]}, ...]``)."""
    return _get(settings, "/api/v1/query", {"query": promql})["result"]


def query_range(settings: Settings, promql: str, start: float, end: float, step_s: float) -> list[dict]:
    """A range query: ``[{"metric": {...}, "values": [[t, "v"], ...]}, ...]``."""
    params = {"query": promql, "start": str(start), "end": str(end), "step": str(step_s)}
    return _get(settings, "/api/v1/query_range", params)["result"]


def series_names(settings: Settings) -> set[str]:
    """Every metric name Prometheus holds."""
    return set(_get(settings, "/api/v1/label/__name__/values", {}))

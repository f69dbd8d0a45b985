"""Start, stop and inspect the local services: a Ray head (dashboard + Jobs API) and an MLflow server;
on request the chat, Airflow and Prometheus.

Each service runs in its own process session, so that ``down`` can stop exactly the
process group that ``up`` started (never ``ray stop``, which would kill every Ray on the
host). PIDs, ports, URLs and log paths are recorded in ``<LLMOPS_HOME>/stack/state.json``.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path

from ray_app import monitoring
from ray_app.credentials import ensure_ray_token, generated_secret, mlflow_identity, node_env, ray_auth_headers
from ray_app.settings import Settings

SERVICES = ("ray", "mlflow")


class StackError(RuntimeError):
    """A local service could not be started or stopped; the message says which and where its log is."""


class PortInUseError(StackError):
    """A port a service needs is held by another process."""


@dataclass
class ServiceSpec:
    """How to start one service and how to tell that it is up."""

    name: str
    command: list[str]
    ports: dict[str, int]
    url: str
    health_url: str
    env: dict[str, str] = field(default_factory=dict)
    health_headers: Callable[[], dict[str, str]] = dict
    start_timeout_s: float = 90.0
    before_start: Callable[[], object] | None = None  # files and folders it needs, just before it starts
    after_start: Callable[[], object] | None = None  # once healthy (each `up`): idempotent setup


@dataclass
class ServiceRecord:
    """What ``up`` wrote down about a started service."""

    name: str
    pid: int
    url: str
    ports: dict[str, int]
    log: str
    command: list[str]
    started_at: float


@dataclass
class ServiceStatus:
    """One row of ``llmops status``."""

    name: str
    url: str
    pid: int | None
    running: bool
    healthy: bool
    log: str | None

    @property
    def state(self) -> str:
        if self.healthy and self.pid is None:
            return "healthy (not started by llmops)"
        if self.healthy:
            return "healthy"
        if self.running:
            return "running, not answering"
        return "stopped"


def _bin(name: str) -> str:
    """An executable of the current environment (the venv), so services match this install."""
    candidate = Path(sys.executable).parent / name
    return str(candidate) if candidate.exists() else name


def ray_temp_dir(settings: Settings) -> Path:
    """Ray's temp dir; short, since Ray's Unix socket paths must fit in 107 bytes."""
    return settings.ray_temp_dir or Path(f"/tmp/llmops-ray-{settings.ray_port}")


def ray_spec(settings: Settings) -> ServiceSpec:
    """The Ray head: GCS, dashboard and Jobs API, every port explicit."""
    base = settings.ray_internal_port_base
    ports = {
        "gcs": settings.ray_port,
        "dashboard": settings.ray_dashboard_port,
        "client server": settings.ray_client_port,
        "node manager": base,
        "object manager": base + 1,
        "metrics export": base + 2,
        "dashboard agent http": base + 3,
        "dashboard agent grpc": base + 4,
        "runtime env agent": base + 5,
    }
    low, high = settings.ray_worker_port_range
    command = [
        _bin("ray"), "start", "--head", "--block", "--disable-usage-stats",
        f"--node-ip-address={settings.bind_host}",
        f"--port={settings.ray_port}",
        "--include-dashboard=true",
        f"--dashboard-host={settings.bind_host}",
        f"--dashboard-port={settings.ray_dashboard_port}",
        f"--ray-client-server-port={settings.ray_client_port}",
        f"--node-manager-port={ports['node manager']}",
        f"--object-manager-port={ports['object manager']}",
        f"--metrics-export-port={ports['metrics export']}",
        f"--dashboard-agent-listen-port={ports['dashboard agent http']}",
        f"--dashboard-agent-grpc-port={ports['dashboard agent grpc']}",
        f"--runtime-env-agent-port={ports['runtime env agent']}",
        f"--min-worker-port={low}",
        f"--max-worker-port={high}",
        f"--temp-dir={ray_temp_dir(settings)}",
    ]  # fmt: skip
    if settings.ray_num_cpus:
        command.append(f"--num-cpus={settings.ray_num_cpus}")
    if settings.ray_object_store_memory_mb:
        command.append(f"--object-store-memory={settings.ray_object_store_memory_mb * 1024 * 1024}")
    env = (
        node_env(settings)  # credentials in the node's environment: its workers and jobs inherit them
        | settings.ray_client_env()
        | monitoring.dashboard_env(settings)  # the dashboard's Metrics tab reads our Prometheus
        | {
            # Jobs run their entrypoint with the `python` on the head's PATH: make it this venv's.
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
            "RAY_USAGE_STATS_ENABLED": "0",
        }
    )
    return ServiceSpec(
        name="ray",
        command=command,
        ports=ports,
        url=settings.ray_dashboard_url,
        health_url=f"{settings.ray_dashboard_url}/api/version",
        env=env,
        health_headers=lambda: ray_auth_headers(settings),
    )


def mlflow_spec(settings: Settings) -> ServiceSpec:
    """The MLflow tracking server with its registry; artifacts proxied through it."""
    command = [
        _bin("mlflow"), "server",
        "--host", settings.bind_host,
        "--port", str(settings.mlflow_port),
        "--artifacts-destination", str(settings.mlflow_artifacts_destination),
        "--serve-artifacts",
        "--workers", "1",
        "--expose-prometheus", str(settings.stack_dir / "mlflow-metrics"),
    ]  # fmt: skip
    # The backend URI may hold the database password: the environment, not the command line.
    env = node_env(settings) | {"MLFLOW_BACKEND_STORE_URI": str(settings.mlflow_backend_store_uri)}
    after_start = None
    if settings.mlflow_auth:
        from ray_app.registry import ensure_read_only_user

        command += ["--app-name", "basic-auth"]
        admin, password = mlflow_identity(settings)
        env |= {
            "MLFLOW_AUTH_CONFIG_PATH": str(_mlflow_auth_config(settings)),
            "MLFLOW_AUTH_ADMIN_USERNAME": admin,  # created on the users database's first start
            "MLFLOW_AUTH_ADMIN_PASSWORD": password,
            "MLFLOW_FLASK_SERVER_SECRET_KEY": generated_secret(settings.stack_dir / "mlflow_flask_secret"),
        }
        after_start = partial(ensure_read_only_user, settings)
    return ServiceSpec(
        name="mlflow",
        command=command,
        ports={"http": settings.mlflow_port},
        url=settings.mlflow_server_url,
        health_url=f"{settings.mlflow_server_url}/health",
        env=env,
        before_start=partial(_prepare_mlflow, settings),
        after_start=after_start,
    )


def _mlflow_auth_config(settings: Settings) -> Path:
    return settings.stack_dir / "mlflow_basic_auth.ini"


def _prepare_mlflow(settings: Settings) -> None:
    """Folders of local stores, and the basic-auth app's config (0600: the users database URL may
    hold a password). Runs when MLflow starts, not when `status` describes it."""
    for uri in (settings.mlflow_backend_store_uri, settings.mlflow_auth_database_uri):
        if str(uri).startswith("sqlite:///"):
            Path(str(uri).removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    if "://" not in str(settings.mlflow_artifacts_destination):
        Path(str(settings.mlflow_artifacts_destination)).mkdir(parents=True, exist_ok=True)
    metrics = settings.stack_dir / "mlflow-metrics"  # its gunicorn workers' multiprocess metrics: fresh per start
    shutil.rmtree(metrics, ignore_errors=True)
    metrics.mkdir(parents=True)
    if not settings.mlflow_auth:
        return
    config = _mlflow_auth_config(settings)
    config.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(config, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        # READ for what a user did not create: Serve's identity reads; only creators and admins edit.
        # A verified login is cached for a minute: without it every metric a worker logs pays a
        # password hash (a password change then reaches the server within that minute).
        handle.write(f"[mlflow]\ndefault_permission = READ\ndatabase_uri = {settings.mlflow_auth_database_uri}\n"
                     "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
                     "auth_cache_ttl_seconds = 60\n")  # fmt: skip


def chat_spec(settings: Settings) -> ServiceSpec:
    """The Chainlit chat, answering through the Serve app (started by `llmops demo` or `up -s chat`)."""
    from ray_app.chat.server import chainlit_command

    command, env = chainlit_command(settings)
    return ServiceSpec(
        name="chat",
        command=command,
        ports={"http": settings.chat_port},
        url=settings.chat_url,
        health_url=f"{settings.chat_url}/login",
        env=env,
    )


def airflow_spec(settings: Settings) -> ServiceSpec:
    """`airflow standalone` from the thin venv: the retraining DAG, `ray_default` pointing at the local head.

    SQLite in ``$LLMOPS_HOME/airflow``; the UI login is ``admin`` with the password Airflow
    generates into ``simple_auth_manager_passwords.json.generated`` there.
    """
    repo = Path(__file__).resolve().parents[1]
    airflow = repo / ".venv-airflow" / "bin" / "airflow"
    if not airflow.is_file():
        raise StackError(f"{airflow} is missing: create the Airflow venv with `make airflow-venv`")
    home = settings.home / "airflow"
    home.mkdir(parents=True, exist_ok=True)
    token = ray_auth_headers(settings).get("Authorization", "").removeprefix("Bearer ")
    ray_default = {"conn_type": "http", "host": settings.ray_dashboard_url, "password": token or None}
    env = {
        "AIRFLOW_HOME": str(home),
        "AIRFLOW__CORE__DAGS_FOLDER": str(repo / "dags"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{home / 'airflow.db'}",
        "AIRFLOW__API__HOST": settings.bind_host,
        "AIRFLOW__API__PORT": str(settings.airflow_port),
        "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"http://{settings.bind_host}:{settings.airflow_port}/execution/",
        "AIRFLOW_CONN_RAY_DEFAULT": json.dumps(ray_default),
        "LLMOPS_HOME": str(settings.home),
        "PATH": f"{airflow.parent}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    return ServiceSpec(
        name="airflow",
        command=[str(airflow), "standalone"],
        ports={"api": settings.airflow_port},
        url=f"http://{settings.bind_host}:{settings.airflow_port}",
        health_url=f"http://{settings.bind_host}:{settings.airflow_port}/api/v2/version",
        env=env,
        start_timeout_s=240.0,
    )


def prometheus_spec(settings: Settings) -> ServiceSpec:
    """Debian's Prometheus scraping Ray, MLflow and the chat (``ray_app.monitoring``), with our alert rules."""
    return ServiceSpec(
        name="prometheus",
        command=monitoring.prometheus_command(settings),
        ports={"http": settings.prometheus_port},
        url=settings.local_prometheus_url,
        health_url=f"{settings.local_prometheus_url}/-/ready",
        health_headers=lambda: monitoring.prometheus_headers(settings),
        before_start=partial(monitoring.write_config, settings, ray_temp_dir(settings) / RAY_DISCOVERY_FILE),
    )


RAY_DISCOVERY_FILE = "prom_metrics_service_discovery.json"  # each Ray head keeps it in its temp dir

SPECS: dict[str, Callable[[Settings], ServiceSpec]] = {
    "ray": ray_spec, "mlflow": mlflow_spec, "chat": chat_spec, "airflow": airflow_spec, "prometheus": prometheus_spec,
}  # fmt: skip


# --- process and port helpers --------------------------------------------------------------
def pid_alive(pid: int) -> bool:
    """Whether a process with this PID exists (and is not a zombie)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True


def port_free(host: str, port: int) -> bool:
    """Whether nothing listens on ``port`` (checked on ``host`` and on all interfaces)."""
    for bind_host in {host, "0.0.0.0"}:  # noqa: S104 - probing, Ray core ports bind all interfaces
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind((bind_host, port))
            except OSError:
                return False
    return True


def http_ok(url: str, timeout: float = 2.0, headers: dict[str, str] | None = None) -> bool:
    """Whether ``url`` answers GET with a 2xx status."""
    try:
        request = urllib.request.Request(url, headers=headers or {})  # noqa: S310 - our own URLs
        with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310
            return 200 <= response.status < 300
    except (urllib.error.URLError, OSError, ValueError):
        return False


def stop_process_group(pid: int, timeout_s: float = 30.0) -> None:
    """Stop the service led by ``pid`` (started in its own session) and every process of its group.

    The leader gets SIGTERM first and time to shut its children down in order (`ray start
    --block` drains and stops its node this way in seconds; SIGTERM to the whole group at
    once leaves Ray processes hanging). What is left of the group then gets SIGTERM, and
    finally SIGKILL.
    """
    _signal_and_wait(pid, signal.SIGTERM, timeout_s, leader_only=True)
    _signal_and_wait(pid, signal.SIGTERM, 5.0, leader_only=False)
    _signal_and_wait(pid, signal.SIGKILL, 5.0, leader_only=False)


def _signal_and_wait(pid: int, sig: signal.Signals, wait_s: float, leader_only: bool) -> None:
    alive = (lambda: pid_alive(pid)) if leader_only else (lambda: _group_alive(pid))
    if not alive():
        return
    try:
        if leader_only:
            os.kill(pid, sig)
        else:
            os.killpg(pid, sig)
    except ProcessLookupError:
        return
    except PermissionError as exc:
        raise StackError(f"not allowed to stop process group {pid}: {exc}") from exc
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline and alive():
        time.sleep(0.2)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    # Zombies still count for killpg; the group is gone when only zombies remain.
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            return True
    return False


def _log_tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


# --- the stack ---------------------------------------------------------------------------
class LocalStack:
    """The services `llmops up` starts, with their state file under ``settings.stack_dir``."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.dir = settings.stack_dir
        self.state_file = self.dir / "state.json"

    def _load(self) -> dict[str, ServiceRecord]:
        if not self.state_file.is_file():
            return {}
        raw = json.loads(self.state_file.read_text())
        return {name: ServiceRecord(**record) for name, record in raw.items()}

    def _save(self, records: dict[str, ServiceRecord]) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        tmp = self.state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps({name: asdict(rec) for name, rec in records.items()}, indent=2))
        tmp.replace(self.state_file)

    def up(self, services: Iterable[str] = SERVICES, echo: Callable[[str], None] = print) -> list[ServiceStatus]:
        """Start each service that is not already running; wait until each answers its health check.

        Raises PortInUseError naming the port if another process holds one, StackError with
        the log path if a service dies or does not answer in time.
        """
        records = self._load()
        ensure_ray_token(self.settings)
        for name in services:
            spec = SPECS[name](self.settings)
            record = records.get(name)
            if record and pid_alive(record.pid):
                self._wait_healthy(spec, record.pid, Path(record.log))
                if spec.after_start:
                    spec.after_start()
                echo(f"{name}: already running (pid {record.pid}) at {record.url}")
                continue
            for label, port in spec.ports.items():
                if not port_free(self.settings.bind_host, port):
                    raise PortInUseError(
                        f"port {port} ({name} {label}) is already in use on {self.settings.bind_host}; "
                        f"stop what holds it or choose another port in the settings"
                    )
            if spec.before_start:
                spec.before_start()
            log = self.dir / "logs" / f"{name}.log"
            log.parent.mkdir(parents=True, exist_ok=True)
            echo(f"{name}: starting, log {log}")
            with open(log, "ab") as handle:
                process = subprocess.Popen(
                    spec.command,
                    stdin=subprocess.DEVNULL,
                    stdout=handle,
                    stderr=subprocess.STDOUT,
                    env={**os.environ, **spec.env},
                    start_new_session=True,
                    cwd=self.dir,
                )
            records[name] = ServiceRecord(
                name=name, pid=process.pid, url=spec.url, ports=spec.ports,
                log=str(log), command=spec.command, started_at=time.time(),
            )  # fmt: skip
            self._save(records)
            try:
                self._wait_healthy(spec, process.pid, log)
            except StackError:
                stop_process_group(process.pid)
                records.pop(name, None)
                self._save(records)
                raise
            if spec.after_start:
                spec.after_start()
            echo(f"{name}: healthy at {spec.url}")
        return self.status()

    def _wait_healthy(self, spec: ServiceSpec, pid: int, log: Path) -> None:
        deadline = time.monotonic() + spec.start_timeout_s
        while time.monotonic() < deadline:
            if http_ok(spec.health_url, headers=spec.health_headers()):
                return
            if not pid_alive(pid):
                raise StackError(f"{spec.name} exited during start-up; log {log}:\n{_log_tail(log)}")
            time.sleep(0.5)
        raise StackError(f"{spec.name} did not answer {spec.health_url} within {spec.start_timeout_s:.0f} s; log {log}")

    def down(self, services: Iterable[str] | None = None, echo: Callable[[str], None] = print) -> None:
        """Stop the services `up` started (by their recorded process group), newest first."""
        records = self._load()
        names = [name for name in reversed(list(records)) if services is None or name in services]
        for name in names:
            record = records[name]
            if pid_alive(record.pid):
                echo(f"{name}: stopping pid {record.pid}")
                stop_process_group(record.pid)
            else:
                echo(f"{name}: not running")
            records.pop(name)
            self._save(records)
        if not names:
            echo("nothing to stop: no service was started by llmops here")

    def status(self) -> list[ServiceStatus]:
        """Each known service: its URL, recorded PID, whether it runs and answers its health check."""
        records = self._load()
        rows = []
        # The chat is optional: shown once it was started.
        for name in [*SERVICES, *(name for name in SPECS if name not in SERVICES and name in records)]:
            spec = SPECS[name](self.settings)
            record = records.get(name)
            running = bool(record and pid_alive(record.pid))
            rows.append(
                ServiceStatus(
                    name=name,
                    url=spec.url,
                    pid=record.pid if record and running else None,
                    running=running,
                    healthy=http_ok(spec.health_url, headers=spec.health_headers()),
                    log=record.log if record else None,
                )
            )
        return rows

"""Session fixtures that start REAL services on free loopback ports and stop them by PID.

- PostgreSQL 15 (initdb/pg_ctl as the `postgres` user when run as root)
- moto's S3 server, as a separate process speaking the S3 protocol
- an MLflow server on that PostgreSQL and that S3 (started by ray_app.stack)
- a Ray head with explicit ports and its own temp dir (started by ray_app.stack)
"""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import pwd
import random
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from ray_app.settings import Settings, load_settings
from ray_app.stack import LocalStack, port_free, stop_process_group

S3_ACCESS_KEY = "llmops-test-access"
S3_SECRET_KEY = "llmops-test-secret-key"
# Never used by W&B (offline); the Ray head's environment carries it so tests can look for leaks.
WANDB_SENTINEL = "5e471e1a" * 5

# Tests must never touch the developer's own ~/.llmops, .env or hub cache.
_SESSION_HOME = Path(tempfile.mkdtemp(prefix="llmops-test-home-"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
# Ray's nodes send metrics to their agent every 10 s by default; the monitoring tests wait less.
os.environ.setdefault("RAY_metrics_report_interval_ms", "2000")
os.environ["LLMOPS_HOME"] = str(_SESSION_HOME)
# MLflow runs its basic-auth app: every process of the session (servers, Ray nodes, jobs, this
# one) speaks to it as the same admin, and Serve as the same read-only user, whatever its home.
os.environ["MLFLOW_TRACKING_USERNAME"] = "admin"
os.environ["MLFLOW_TRACKING_PASSWORD"] = secrets.token_urlsafe(16)
os.environ["LLMOPS_MLFLOW_SERVE_PASSWORD"] = secrets.token_urlsafe(16)
for _name in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS", "AWS_ENDPOINT_URL", "MLFLOW_S3_ENDPOINT_URL", "LLMOPS_STORE_URI"):
    os.environ.pop(_name, None)


# Below the kernel's ephemeral range (32768-60999: the source ports of outgoing connections, and the
# ports of servers bound to port 0, e.g. Ray's) and above Ray's worker ports (10002-19999): a port chosen
# here stays free until the service that was given it binds it, seconds later (a Serve proxy once found
# its port taken by then).
SERVICE_PORTS = (20000, 30000)
_GIVEN: set[int] = set()  # each port is handed out once a session: two services never get the same one


def free_port() -> int:
    """A TCP port nothing listens on right now, outside the ranges others take ports from (SERVICE_PORTS)."""
    for _ in range(500):
        port = random.randrange(*SERVICE_PORTS)
        if port not in _GIVEN and port_free("127.0.0.1", port):
            _GIVEN.add(port)
            return port
    raise RuntimeError(f"no free port in {SERVICE_PORTS}")


def free_port_block(size: int, low: int = 30000, high: int = 60000) -> int:
    """The first port of ``size`` consecutive free ports."""
    for _ in range(200):
        base = random.randrange(low, high - size)
        if all(port_free("127.0.0.1", port) for port in range(base, base + size)):
            return base
    raise RuntimeError(f"no block of {size} free ports found")


def wait_for_port(port: int, timeout: float = 30.0, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before opening port {port}")
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise RuntimeError(f"nothing listens on port {port} after {timeout} s")


def load_script(path: Path):
    """A script of the repository (not a package module) imported as a module."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def draw_dashboard(settings: Settings, uid: str, minutes: float) -> int:
    """Draw dashboard ``uid`` from the test Prometheus into test-artifacts/dashboard-UID.png (the
    pictures of docs/monitoring.md come from such a run); returns how many panels had data."""
    from ray_app import monitoring

    dashboards = load_script(Path(__file__).resolve().parents[1] / "cluster" / "grafana" / "build_dashboards.py")
    out = Path(__file__).resolve().parents[1] / "test-artifacts" / f"dashboard-{uid}.png"
    out.parent.mkdir(exist_ok=True)
    drawn = dashboards.snapshot(uid, lambda *args: monitoring.query_range(settings, *args), out, minutes=minutes)
    assert out.stat().st_size > 20_000
    return drawn


def venv_bin(name: str) -> str:
    return str(Path(sys.executable).parent / name)


# --- PostgreSQL ----------------------------------------------------------------------------
@dataclass
class Postgres:
    port: int
    data_dir: Path

    def url(self, database: str = "postgres", driver: str = "psycopg2") -> str:
        return f"postgresql+{driver}://postgres@127.0.0.1:{self.port}/{database}"

    def start(self) -> None:
        root = self.data_dir.parent
        options = f"-p {self.port} -k {root / 'sock'} -c listen_addresses=127.0.0.1 -c fsync=off"
        pg_ctl = [_pg_bin("pg_ctl"), "-D", str(self.data_dir), "-o", options, "-l", str(root / "pg.log"), "-w", "start"]
        subprocess.run(_as_postgres_user(pg_ctl), check=True, capture_output=True)

    def stop(self) -> None:
        pg_ctl = [_pg_bin("pg_ctl"), "-D", str(self.data_dir), "-m", "fast", "-w", "stop"]
        subprocess.run(_as_postgres_user(pg_ctl), capture_output=True)

    def create_database(self, name: str) -> str:
        import psycopg

        with psycopg.connect(f"host=127.0.0.1 port={self.port} user=postgres dbname=postgres", autocommit=True) as conn:
            exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone()
            if not exists:
                conn.execute(f'CREATE DATABASE "{name}"')
        return name


def _pg_bin(name: str) -> str:
    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{name}"))
    if not candidates:
        raise RuntimeError(f"{name} not found: install PostgreSQL 15 (make test does: apt-get install postgresql-15)")
    return str(candidates[-1])


def _as_postgres_user(argv: list[str]) -> list[str]:
    if os.geteuid() != 0:
        return argv
    return ["runuser", "-u", "postgres", "--", *argv]


def start_postgres() -> Postgres:
    """A PostgreSQL server of its own (initdb in a temp dir, trust auth on 127.0.0.1, a free port)."""
    root = Path(tempfile.mkdtemp(prefix="llmops-pg-"))
    data, sock = root / "data", root / "sock"
    sock.mkdir()
    if os.geteuid() == 0:
        owner = pwd.getpwnam("postgres")
        for path in (root, sock):
            os.chown(path, owner.pw_uid, owner.pw_gid)
    root.chmod(0o755)
    subprocess.run(
        _as_postgres_user([_pg_bin("initdb"), "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8"]),
        check=True,
        capture_output=True,
    )
    server = Postgres(port=free_port(), data_dir=data)
    server.start()
    return server


def remove_postgres(server: Postgres) -> None:
    server.stop()
    shutil.rmtree(server.data_dir.parent, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres() -> Iterator[Postgres]:
    server = start_postgres()
    try:
        yield server
    finally:
        remove_postgres(server)


# --- S3 (moto's server process) ------------------------------------------------------------
@dataclass
class S3Server:
    endpoint_url: str
    access_key: str = S3_ACCESS_KEY
    secret_key: str = S3_SECRET_KEY


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    port = free_port()
    log = open(_SESSION_HOME / "moto.log", "wb")
    proc = subprocess.Popen(
        [venv_bin("moto_server"), "-H", "127.0.0.1", "-p", str(port)],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        wait_for_port(port, proc=proc)
        yield S3Server(endpoint_url=f"http://127.0.0.1:{port}")
    finally:
        stop_process_group(proc.pid, timeout_s=10)
        proc.wait(timeout=10)
        log.close()


def s3_settings(s3: S3Server, home: Path, bucket: str = "llmops-test", **extra: object) -> Settings:
    """Settings pointing the store at ``s3://bucket/store`` on the test S3 server."""
    return load_settings(
        home=home,
        store_uri=f"s3://{bucket}/store",
        s3_endpoint_url=s3.endpoint_url,
        aws_access_key_id=s3.access_key,
        aws_secret_access_key=s3.secret_key,
        **extra,
    )


# --- MLflow on PostgreSQL + S3 -------------------------------------------------------------
@pytest.fixture(scope="session")
def mlflow_server(postgres: Postgres, s3_server: S3Server, tmp_path_factory) -> Iterator[Settings]:
    from ray_app.storage import S3Store

    home = tmp_path_factory.mktemp("mlflow-home")
    settings = s3_settings(
        s3_server,
        home,
        mlflow_port=free_port(),
        mlflow_backend_store_uri=postgres.url(postgres.create_database("mlflow")),
        mlflow_artifacts_destination="s3://mlflow-artifacts",
    )
    S3Store("s3://mlflow-artifacts", settings).ensure()
    stack = LocalStack(settings)
    stack.up(["mlflow"], echo=lambda _line: None)
    try:
        yield settings
    finally:
        stack.down(echo=lambda _line: None)


# --- Ray ---------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def ray_cluster(s3_server: S3Server, mlflow_server: Settings, tmp_path_factory) -> Iterator[Settings]:
    """A Ray head (2 CPUs) with the dashboard and Jobs API, every port explicit.

    Its jobs and workers log to the MLflow server and store in the S3 server, as on a cluster.
    """
    home = tmp_path_factory.mktemp("ray-home")
    base = free_port_block(16 + 300)
    settings = s3_settings(
        s3_server,
        home,
        mlflow_port=mlflow_server.mlflow_port,
        mlflow_tracking_uri=mlflow_server.mlflow_tracking_uri,
        ray_port=base,
        ray_dashboard_port=base + 1,
        ray_client_port=base + 2,
        ray_internal_port_base=base + 3,
        ray_worker_port_range=(base + 16, base + 16 + 299),
        ray_temp_dir=Path(f"/tmp/llmops-t{base}"),
        ray_num_cpus=2,
        ray_object_store_memory_mb=512,
        wandb_api_key=WANDB_SENTINEL,
        prometheus_port=free_port(),  # the head's dashboard is told of it; `prometheus` starts it
        chat_port=free_port(),  # a chat on it is scraped by that Prometheus
        prometheus_scrape_interval_s=2,
    )
    stack = LocalStack(settings)
    stack.up(["ray"], echo=lambda _line: None)
    try:
        yield settings
    finally:
        stack.down(echo=lambda _line: None)
        shutil.rmtree(settings.ray_temp_dir, ignore_errors=True)


@pytest.fixture(scope="session")
def prometheus(ray_cluster: Settings) -> Iterator[Settings]:
    """The stack's Prometheus (Debian's binary, generated config, basic auth) scraping the test head,
    the MLflow server and (once started) a chat on the cluster's chat_port."""
    stack = LocalStack(ray_cluster)
    stack.up(["prometheus"], echo=lambda _line: None)
    try:
        yield ray_cluster
    finally:
        stack.down(["prometheus"], echo=lambda _line: None)


@dataclass
class WorkerNode:
    """A second Ray node on this machine, joined to the test head: its own temp dir, ports and resources."""

    proc: subprocess.Popen
    temp_dir: Path
    resource: str

    def node_id(self) -> str | None:
        import ray

        alive = [node for node in ray.nodes() if node["Alive"] and self.resource in node["Resources"]]
        return alive[0]["NodeID"] if alive else None

    def kill(self) -> None:
        """Lose the whole node at once, as a crashed machine: SIGKILL to its raylet, object store,
        agents and workers (one process group), no drain."""
        import signal

        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)


@contextmanager
def worker_node(settings: Settings, num_cpus: int = 1) -> Iterator[WorkerNode]:
    """``ray start --address`` a worker node with ``num_cpus`` and a resource naming it; removed on exit."""
    from ray_app.stack import ray_spec

    base = free_port_block(8 + 100)
    temp_dir = Path(tempfile.mkdtemp(prefix="llmops-n2-", dir="/tmp"))
    resource = f"node-{base}"
    command = [
        venv_bin("ray"), "start", "--block", "--disable-usage-stats", f"--address={settings.ray_gcs_address}",
        "--node-ip-address=127.0.0.1", f"--num-cpus={num_cpus}", f'--resources={{"{resource}": 1}}',
        f"--node-manager-port={base}", f"--object-manager-port={base + 1}", f"--metrics-export-port={base + 2}",
        f"--dashboard-agent-listen-port={base + 3}", f"--dashboard-agent-grpc-port={base + 4}",
        f"--runtime-env-agent-port={base + 5}", f"--min-worker-port={base + 8}", f"--max-worker-port={base + 107}",
        f"--temp-dir={temp_dir}", "--object-store-memory=200000000",
    ]  # fmt: skip
    log = open(temp_dir.with_suffix(".log"), "wb")
    proc = subprocess.Popen(command, env={**os.environ, **ray_spec(settings).env}, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
    node = WorkerNode(proc, temp_dir, resource)
    try:
        deadline = time.monotonic() + 90
        while node.node_id() is None:
            assert proc.poll() is None, f"the worker node exited: {temp_dir.with_suffix('.log').read_text()[-2000:]}"
            assert time.monotonic() < deadline, "the worker node did not join in 90 s"
            time.sleep(0.5)
        yield node
    finally:
        if proc.poll() is None:
            stop_process_group(proc.pid, timeout_s=10)
            proc.wait(timeout=30)
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture(scope="session")
def ray_client(ray_cluster: Settings) -> Iterator[Settings]:
    """This test process connected to the Ray head as a driver."""
    import ray

    ray_cluster.apply_ray_client_env()
    ray.init(address=ray_cluster.ray_gcs_address, log_to_driver=False)
    try:
        yield ray_cluster
    finally:
        ray.shutdown()


@pytest.fixture(scope="module")
def cluster(ray_client: Settings, mlflow_server: Settings, tmp_path_factory) -> Settings:
    """Settings for training: the Ray head, the MLflow server, the S3 store, W&B offline."""
    return ray_client.model_copy(
        update={
            "home": tmp_path_factory.mktemp("train-home"),
            "mlflow_tracking_uri": mlflow_server.mlflow_tracking_uri,
            "store_uri": "s3://llmops-train/store",
        }
    )


@pytest.fixture(autouse=True, scope="module")
def _no_tracking_env_leaks() -> Iterator[None]:
    """`registry.configure_tracking` exports MLFLOW_*/AWS_* for the mlflow client; keep them to one module."""
    prefixes = ("MLFLOW_", "AWS_")
    saved = {key: value for key, value in os.environ.items() if key.startswith(prefixes)}
    yield
    for key in [key for key in os.environ if key.startswith(prefixes)]:
        del os.environ[key]
    os.environ.update(saved)


@pytest.fixture(scope="session")
def serve_http_port() -> int:
    """One HTTP port for Ray Serve in the whole session: Serve keeps its first port until it is shut down."""
    return free_port()


@pytest.fixture()
def home(tmp_path: Path) -> Path:
    """A fresh LLMOPS_HOME for one test."""
    return tmp_path / "home"


# --- the CLI ------------------------------------------------------------------------------
def llmops_cli(settings: Settings):
    """Run the `llmops` CLI in a subprocess against these settings' MLflow server and store."""
    env = {
        "PATH": "/usr/bin:/bin",
        "COLUMNS": "300",
        "LLMOPS_HOME": str(settings.home),
        "LLMOPS_MLFLOW_PORT": str(settings.mlflow_port),
        "LLMOPS_STORE_URI": settings.store_uri,
        "LLMOPS_S3_ENDPOINT_URL": settings.s3_endpoint_url,
        "AWS_ACCESS_KEY_ID": settings.aws_access_key_id.get_secret_value(),
        "AWS_SECRET_ACCESS_KEY": settings.aws_secret_access_key.get_secret_value(),
        **{k: v for k, v in os.environ.items() if k.startswith("MLFLOW_TRACKING_")},
    }

    def llmops(*args: str) -> subprocess.CompletedProcess:
        command = [str(Path(sys.executable).parent / "llmops"), *args]
        return subprocess.run(command, env=env, capture_output=True, text=True, timeout=180)

    return llmops


# --- chat feedback, as the chat writes it --------------------------------------------------
def write_feedback(
    database_url: str, ratings: list[tuple[str, str, int, str | None]], *, model_version: str, author: str = "alice"
) -> None:
    """Conversations and ratings (question, answer, 1/0, comment) of answers by ``model_version``,
    through Chainlit's SQLAlchemyDataLayer, as the chat stores them."""

    async def write() -> None:
        import chainlit as cl
        from chainlit.context import init_http_context
        from chainlit.data.sql_alchemy import SQLAlchemyDataLayer
        from chainlit.types import Feedback

        from ray_app.chat.schema import upgrade_schema

        init_http_context()
        upgrade_schema(database_url)
        layer = SQLAlchemyDataLayer(conninfo=database_url)
        user = await layer.get_user(author) or await layer.create_user(cl.User(identifier=author))
        for question, answer, value, comment in ratings:
            thread, asked, answered = str(uuid.uuid4()), str(uuid.uuid4()), str(uuid.uuid4())
            now = dt.datetime.now(dt.UTC)
            at = [(now + dt.timedelta(milliseconds=ms)).isoformat().replace("+00:00", "Z") for ms in (0, 5)]
            await layer.update_thread(thread, name=question, user_id=user.id)
            common = {"threadId": thread, "streaming": False, "isError": False, "waitForAnswer": False}
            await layer.create_step({**common, "id": asked, "type": "user_message", "name": author,
                                     "output": question, "createdAt": at[0]})  # fmt: skip
            metadata = {"model_version": model_version, "answer": answer}
            await layer.create_step({**common, "id": answered, "type": "assistant_message", "name": "Assistant",
                                     "output": answer, "metadata": metadata, "createdAt": at[1]})  # fmt: skip
            await layer.upsert_feedback(Feedback(forId=answered, threadId=thread, value=value, comment=comment))
        await layer.close()

    cwd, folder = os.getcwd(), Path(database_url.split("///", 1)[1]).parent
    folder.mkdir(parents=True, exist_ok=True)
    os.chdir(folder)  # importing chainlit writes .chainlit/ into the cwd
    try:
        asyncio.run(write())
    finally:
        os.chdir(cwd)


# --- watching a training run (to break something at the right moment) -------------------
def run_id_of(settings: Settings, experiment: str, run_name: str) -> str:
    """The MLflow run id of ``run_name`` in ``experiment``; "" until it exists."""
    from mlflow import MlflowClient

    client = MlflowClient(settings.mlflow_tracking_uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return ""
    runs = client.search_runs([found.experiment_id], filter_string=f"attributes.run_name = '{run_name}'")
    return runs[0].info.run_id if runs else ""


def logged_steps(settings: Settings, run_id: str, metric: str = "train_loss") -> list[int]:
    """The steps at which ``metric`` was logged, sorted (a step logged twice shows twice)."""
    from mlflow import MlflowClient

    return sorted(point.step for point in MlflowClient(settings.mlflow_tracking_uri).get_metric_history(run_id, metric))


def after_a_checkpoint(settings: Settings, store, experiment: str, run_name: str, min_step: int,
                       act) -> threading.Thread:  # fmt: skip
    """Watch a run from a thread; once a checkpoint of it is in the store, Ray Train's controller has
    registered it (its checkpoint manager's snapshot, what ``ray.train.Result.from_path`` reads, is
    in the store: a worker killed before the controller polled its report loses the checkpoint) and
    training logged step ``min_step`` or later, call ``act(step, alive_workers)`` until it returns True."""
    from ray.util.state import list_actors

    def watch() -> None:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            run_id = run_id_of(settings, experiment, run_name)
            step = max(logged_steps(settings, run_id), default=0) if run_id else 0
            keys = [info.key for info in store.list(f"checkpoints/{run_name}")]
            saved = any(key.endswith("trainer_state.json") for key in keys)
            saved = saved and any(key.endswith("/checkpoint_manager_snapshot.json") for key in keys)
            workers = list_actors(filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")])
            if saved and step >= min_step and act(step, workers):
                return
            time.sleep(0.2)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread

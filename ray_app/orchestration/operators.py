"""A deferrable Airflow operator (and its trigger) that runs a command as a Ray job.

    from ray_app.orchestration.operators import RayJobOperator

    train = RayJobOperator(task_id="train", entrypoint="python -m training.sft --config ...")

- Reaches Ray only through the Jobs API of the dashboard named by the Airflow connection
  ``ray_default`` (``http://host:8265``; its password, if any, is the Ray auth token).
- Submits with a submission id derived from the DAG run and task, so a retried or restarted
  task re-attaches to the job its earlier try started instead of submitting it twice
  (see :func:`ray_app.orchestration.ray_jobs.submit_or_attach`).
- While the job runs, its log streams into the task log (from the triggerer when deferred).
- FAILED or STOPPED fail the task with the job's last log lines in the error.
- Clearing, marking or killing the task stops the job (``on_kill`` of the operator and of
  the trigger); ``execution_timeout`` stops it too.
- Returns the job's ``LLMOPS_RESULT`` (see ``ray_jobs.emit_result``) plus its id and status:
  the task's XCom.

Imports only Airflow's task SDK and ``ray[default]`` (lazily): no torch on the Airflow side.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any, ClassVar
from urllib.parse import urlparse

from airflow.sdk import BaseHook, BaseOperator
from airflow.sdk.exceptions import AirflowException
from airflow.triggers.base import BaseTrigger, TriggerEvent

from ray_app.orchestration import ray_jobs

DEFAULT_CONN_ID = "ray_default"
FIRST_POLL_S = 0.5  # polls start fast (short jobs end with little delay) and slow down to poll_interval


def _next_poll(current: float, limit: float) -> float:
    return min(limit, current * 1.5)


def dashboard_address(conn) -> tuple[str, dict[str, str]]:
    """The Jobs API URL and auth headers an Airflow connection describes."""
    host = (conn.host or "").strip()
    if "://" in host:  # host given as a whole URL
        parsed = urlparse(host)
        scheme, hostname, port = parsed.scheme, parsed.hostname, parsed.port
    else:
        scheme = (conn.extra_dejson or {}).get("scheme") or (
            conn.schema if conn.schema in ("http", "https") else "http"
        )
        hostname, port = host, conn.port
    if not hostname:
        raise AirflowException(f"connection {conn.conn_id!r} has no host: set it to the Ray dashboard URL")
    address = f"{scheme}://{hostname}:{port or 8265}"
    headers = {"Authorization": f"Bearer {conn.password}"} if conn.password else {}
    return address, headers


class RayJobTrigger(BaseTrigger):
    """Waits for a Ray job to end in the triggerer, streaming its log; stops it on kill or deadline."""

    def __init__(self, submission_id: str, conn_id: str = DEFAULT_CONN_ID, poll_interval: float = 5.0,
                 deadline: float | None = None, log_offset: int = 0):  # fmt: skip
        super().__init__()
        self.submission_id, self.conn_id = submission_id, conn_id
        self.poll_interval, self.deadline, self.log_offset = poll_interval, deadline, log_offset

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return (
            f"{type(self).__module__}.{type(self).__qualname__}",
            {"submission_id": self.submission_id, "conn_id": self.conn_id, "poll_interval": self.poll_interval,
             "deadline": self.deadline, "log_offset": self.log_offset},
        )  # fmt: skip

    async def _client(self):
        conn = await BaseHook.aget_connection(self.conn_id)
        address, headers = dashboard_address(conn)
        return await asyncio.to_thread(ray_jobs.connect, address, headers)

    async def run(self) -> AsyncIterator[TriggerEvent]:
        try:
            client = await self._client()
            offset, wait = self.log_offset, min(FIRST_POLL_S, self.poll_interval)
            while True:
                status = str(await asyncio.to_thread(client.get_job_status, self.submission_id))
                logs = await asyncio.to_thread(client.get_job_logs, self.submission_id)
                for line in logs[offset:].splitlines():
                    self.log.info("[ray job] %s", line)
                offset = len(logs)
                if status in ray_jobs.TERMINAL:
                    yield TriggerEvent({"submission_id": self.submission_id, "status": status})
                    return
                if self.deadline is not None and time.time() > self.deadline:
                    await asyncio.to_thread(ray_jobs.stop, client, self.submission_id)
                    yield TriggerEvent({"submission_id": self.submission_id, "status": "TIMEOUT"})
                    return
                await asyncio.sleep(wait)
                wait = _next_poll(wait, self.poll_interval)
        except ray_jobs.RayJobError as exc:
            yield TriggerEvent({"submission_id": self.submission_id, "status": "ERROR", "message": str(exc)})

    async def on_kill(self) -> None:
        """The deferred task was cleared, marked or killed by a user: stop its job."""
        client = await self._client()
        if await asyncio.to_thread(ray_jobs.stop, client, self.submission_id):
            self.log.info("stopped Ray job %s", self.submission_id)


class RayJobOperator(BaseOperator):
    """Run ``entrypoint`` as a Ray job; return its ``LLMOPS_RESULT`` (plus id and status) as the XCom.

    :param entrypoint: shell command the job runs on the cluster (templated)
    :param runtime_env: Ray runtime env (working_dir, pip, env_vars...); no secrets (templated)
    :param metadata: job metadata shown in the Ray dashboard; the DAG run and task are added
    :param conn_id: Airflow connection holding the dashboard URL (and token as password)
    :param deferrable: wait in the triggerer (True) or in the worker (False)
    :param poll_interval: seconds between status/log polls
    :param entrypoint_num_cpus: CPUs reserved for the job's driver (Ray's default: 0)
    """

    template_fields: Sequence[str] = ("entrypoint", "runtime_env", "metadata")
    template_fields_renderers: ClassVar[dict[str, str]] = {"entrypoint": "bash", "runtime_env": "json"}
    ui_color = "#e6f0ff"

    def __init__(self, *, entrypoint: str, runtime_env: dict[str, Any] | None = None,
                 metadata: dict[str, str] | None = None, conn_id: str = DEFAULT_CONN_ID, deferrable: bool = True,
                 poll_interval: float = 5.0, entrypoint_num_cpus: float | None = None, **kwargs):  # fmt: skip
        super().__init__(**kwargs)
        self.entrypoint, self.runtime_env, self.metadata = entrypoint, runtime_env, metadata
        self.conn_id, self.deferrable, self.poll_interval = conn_id, deferrable, poll_interval
        self.entrypoint_num_cpus = entrypoint_num_cpus
        self.submission_id: str | None = None

    def _client(self):
        address, headers = dashboard_address(BaseHook.get_connection(self.conn_id))
        return ray_jobs.connect(address, headers)

    def execute(self, context) -> dict[str, Any]:
        ti = context["ti"]
        key = ray_jobs.job_key(ti.dag_id, ti.run_id, ti.task_id, getattr(ti, "map_index", -1))
        client = self._client()
        metadata = {**(self.metadata or {}), "airflow_dag_id": ti.dag_id, "airflow_run_id": ti.run_id,
                    "airflow_task_id": ti.task_id, "airflow_try_number": str(ti.try_number)}  # fmt: skip
        submission = ray_jobs.submit_or_attach(
            client, key, self.entrypoint, self.runtime_env, metadata, self.entrypoint_num_cpus
        )
        self.submission_id = submission.submission_id
        if submission.attached:
            self.log.info("re-attached to Ray job %s (%s) started by an earlier try; not submitting again",
                          submission.submission_id, submission.status)  # fmt: skip
        else:
            self.log.info("submitted Ray job %s: %s", submission.submission_id, self.entrypoint)
        deadline = time.time() + self.execution_timeout.total_seconds() if self.execution_timeout else None
        if submission.status == "SUCCEEDED":
            return self._finish(client, submission.submission_id)
        if self.deferrable:
            self.defer(
                trigger=RayJobTrigger(submission.submission_id, self.conn_id, self.poll_interval, deadline),
                method_name="execute_complete",
                # The trigger enforces execution_timeout itself, so it can stop the job first.
                timeout=None,
            )
        return self._wait(client, submission.submission_id)

    def _wait(self, client, submission_id: str) -> dict[str, Any]:
        offset, wait = 0, min(FIRST_POLL_S, self.poll_interval)
        try:
            while True:
                status = str(client.get_job_status(submission_id))
                logs = client.get_job_logs(submission_id)
                for line in logs[offset:].splitlines():
                    self.log.info("[ray job] %s", line)
                offset = len(logs)
                if status in ray_jobs.TERMINAL:
                    break
                time.sleep(wait)
                wait = _next_poll(wait, self.poll_interval)
        except BaseException:  # execution_timeout (AirflowTaskTimeout) or a kill while waiting: stop the job
            if ray_jobs.stop(client, submission_id):
                self.log.warning("stopped Ray job %s", submission_id)
            raise
        return self._finish(client, submission_id)

    def _finish(self, client, submission_id: str) -> dict[str, Any]:
        try:
            result = ray_jobs.finish(client, submission_id)
        except ray_jobs.RayJobError as exc:
            raise AirflowException(str(exc)) from None
        self.log.info("Ray job %s succeeded; result: %s", submission_id, result)
        return result

    def execute_complete(self, context, event: dict[str, Any]) -> dict[str, Any]:
        submission_id = event["submission_id"]
        if event["status"] == "ERROR":
            raise AirflowException(event.get("message") or f"lost track of Ray job {submission_id}")
        client = self._client()
        if event["status"] == "TIMEOUT":
            tail = ray_jobs.log_tail(client.get_job_logs(submission_id))
            raise AirflowException(f"Ray job {submission_id} stopped: the task's execution_timeout "
                                   f"({self.execution_timeout}) passed; last lines of its log:\n{tail}")  # fmt: skip
        return self._finish(client, submission_id)

    def on_kill(self) -> None:
        """The task was killed while waiting in the worker: stop its job."""
        if self.submission_id and ray_jobs.stop(self._client(), self.submission_id):
            self.log.info("stopped Ray job %s", self.submission_id)


__all__ = ["RayJobOperator", "RayJobTrigger", "dashboard_address"]

"""Ray Jobs API helpers shared by the Airflow operator, its trigger and the job entrypoints.

No Airflow and no torch here: this module is imported by the Airflow worker and triggerer
(`ray[default]` only) and by the jobs themselves.

- A job is named by a deterministic *key* (DAG, run, task, map index). Its submissions are
  ``KEY``, ``KEY-r2``, ``KEY-r3``...: a retried task finds the submission of its earlier
  try and re-attaches to it (or reuses its result) instead of starting the work twice; a new
  submission is made only when every earlier one ended FAILED or STOPPED.
- A job reports a structured result by printing one line ``LLMOPS_RESULT {json}``; the
  operator returns it (an XCom).
"""

from __future__ import annotations

import hashlib
import json
import re
import sys
from dataclasses import dataclass
from typing import Any

RESULT_MARKER = "LLMOPS_RESULT "
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
ACTIVE = ("PENDING", "RUNNING")
TAIL_LINES = 40


class RayJobError(RuntimeError):
    """A Ray job failed, was stopped, timed out, or the Jobs API could not be reached."""


def emit_result(result: dict[str, Any]) -> None:
    """Print a job's structured result where :func:`parse_result` finds it (the last such line wins)."""
    print(RESULT_MARKER + json.dumps(result, sort_keys=True, default=str), flush=True)
    sys.stdout.flush()


def parse_result(logs: str) -> dict[str, Any] | None:
    """The last ``LLMOPS_RESULT`` line of a job's logs, decoded; None when the job printed none."""
    for line in reversed(logs.splitlines()):
        if line.startswith(RESULT_MARKER):
            try:
                value = json.loads(line[len(RESULT_MARKER) :])
            except ValueError:
                return None
            return value if isinstance(value, dict) else {"value": value}
    return None


def log_tail(logs: str, lines: int = TAIL_LINES) -> str:
    """The last ``lines`` non-empty lines of a job's logs."""
    kept = [line for line in logs.splitlines() if line.strip()]
    return "\n".join(kept[-lines:])


def job_key(dag_id: str, run_id: str, task_id: str, map_index: int = -1) -> str:
    """A submission id base for one task of one DAG run: readable, within Ray's limits, stable across tries."""
    digest = hashlib.sha256(f"{dag_id}\0{run_id}\0{task_id}\0{map_index}".encode()).hexdigest()[:10]
    readable = re.sub(r"[^A-Za-z0-9_-]+", "-", f"{dag_id}-{task_id}").strip("-")[:60]
    suffix = f"-m{map_index}" if map_index >= 0 else ""
    return f"af-{readable}{suffix}-{digest}"


def _attempt(submission_id: str, key: str) -> int | None:
    if submission_id == key:
        return 1
    match = re.fullmatch(re.escape(key) + r"-r(\d+)", submission_id)
    return int(match.group(1)) if match else None


@dataclass(frozen=True)
class Submission:
    submission_id: str
    status: str
    attached: bool  # True: an earlier try's job, re-attached (or reused) instead of submitted anew


def connect(address: str, headers: dict[str, str] | None = None):
    """A JobSubmissionClient for ``address`` (the dashboard URL); a clear error naming it when unreachable."""
    from ray.job_submission import JobSubmissionClient

    try:
        return JobSubmissionClient(address, headers=headers or None)
    except Exception as exc:  # ConnectionError, auth errors, bad URLs: all mean "no Jobs API there"
        raise RayJobError(f"cannot reach the Ray Jobs API at {address}: {exc}") from exc


def submit_or_attach(
    client,
    key: str,
    entrypoint: str,
    runtime_env: dict[str, Any] | None = None,
    metadata: dict[str, str] | None = None,
    entrypoint_num_cpus: float | None = None,
) -> Submission:
    """Re-attach to this key's active or succeeded submission, else submit the next attempt."""
    attempts = {}  # attempt number -> job, for this key's earlier submissions
    for job in client.list_jobs():
        number = _attempt(job.submission_id or "", key)
        if number is not None:
            attempts[number] = job
    for number in sorted(attempts, reverse=True):
        status = str(attempts[number].status)
        if status in ACTIVE or status == "SUCCEEDED":
            return Submission(attempts[number].submission_id, status, attached=True)
    attempt = max(attempts, default=0) + 1
    submission_id = key if attempt == 1 else f"{key}-r{attempt}"
    kwargs: dict[str, Any] = {}
    if entrypoint_num_cpus is not None:
        kwargs["entrypoint_num_cpus"] = entrypoint_num_cpus
    client.submit_job(
        entrypoint=entrypoint,
        submission_id=submission_id,
        runtime_env=runtime_env or None,
        metadata={key_: str(value)[:500] for key_, value in (metadata or {}).items()},
        **kwargs,
    )
    return Submission(submission_id, "PENDING", attached=False)


def finish(client, submission_id: str) -> dict[str, Any]:
    """The outcome of a terminal job: its parsed result (plus id and status), or RayJobError with the log tail."""
    info = client.get_job_info(submission_id)
    status = str(info.status)
    logs = client.get_job_logs(submission_id)
    if status != "SUCCEEDED":
        # Ray's message repeats the whole log; its first line says what happened.
        message = f" ({info.message.splitlines()[0].rstrip(', :')})" if info.message else ""
        raise RayJobError(f"Ray job {submission_id} ended {status}{message}; last lines of its log:\n{log_tail(logs)}")
    result = parse_result(logs) or {}
    return {**result, "submission_id": submission_id, "status": status}


def stop(client, submission_id: str) -> bool:
    """Stop a job if it is still running; True when a stop was requested."""
    try:
        status = str(client.get_job_status(submission_id))
    except Exception:
        return False
    if status in TERMINAL:
        return False
    return bool(client.stop_job(submission_id))

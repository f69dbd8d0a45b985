"""The retraining loop's own metric: each pipeline step that ran as a Ray job, and how it ended.

``ray_llmops_retrain_steps_total{model, step, outcome}``: ``export-feedback`` ends ``exported``
or ``skipped`` (too little new feedback: one per retraining run), ``evaluate`` ``evaluated``,
``promote`` ``promoted``, ``canary`` (served beside the champion first) or ``rejected`` (the
gate's decisions), ``rollout`` ``rolled`` or ``rolled_back`` (a canary judged worse); any
step may end ``failed``. Counted by the job's driver through Ray's metrics agent, so Prometheus
finds it with every other Ray metric; outside a Ray job (a test, a shell) nothing is counted.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

from ray_app.monitoring import ray_metric

log = logging.getLogger(__name__)

EXPORTED = {
    "ray_llmops_retrain_steps_total": "steps of the retraining DAG by step and outcome (promote: the gate's decisions)",
}
JOB_DRIVER_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"  # set by Ray's job supervisor for a job's entrypoint


def outcome(step: str, result: dict[str, Any] | None) -> str:
    """How a step ended, from its result (None: it failed)."""
    if result is None:
        return "failed"
    if step == "export-feedback":
        return "skipped" if result.get("skip") else "exported"
    if step == "promote":
        return "promoted" if result.get("promoted") else "canary" if result.get("canary") else "rejected"
    if step == "rollout":
        return "rolled_back" if result.get("decision") == "rolled_back" else "rolled"
    return {"evaluate": "evaluated"}.get(step, "done")


def count_step(model: str, step: str, result: dict[str, Any] | None) -> None:
    """Count the step, when this process is a Ray job's driver; never fails the step.

    Ray sends a process's metrics to its agent every report interval: the driver waits for one
    before it exits (10 s by default, ``RAY_metrics_report_interval_ms``).
    """
    if JOB_DRIVER_ENV not in os.environ:
        return
    try:
        import ray
        from ray.util.metrics import Counter

        if not ray.is_initialized():
            ray.init(log_to_driver=False, logging_level=logging.WARNING)  # the job's own cluster
        tags = {"model": model, "step": step, "outcome": outcome(step, result)}
        ray_metric(Counter, "llmops_retrain_steps", EXPORTED, tags).inc()
        time.sleep(int(os.environ.get("RAY_metrics_report_interval_ms", "10000")) / 1000 + 1.5)
    except Exception:
        log.warning("could not count the %s step in the metrics", step, exc_info=True)

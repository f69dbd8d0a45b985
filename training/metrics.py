"""Training's live metrics for Prometheus (rank 0 reports them; MLflow keeps the history).

Ray exports them from the worker's node with its ``ray_`` prefix, labelled by the run's name
and MLflow run id. ``ray_llmops_train_running`` is 1 while a run trains and 0 once it ended,
so "no progress" can be told from "finished" (the stalled-training alert uses both).
"""

from __future__ import annotations

import threading
import time

from ray_app.monitoring import every, ray_metric

STEP_BUCKETS = [0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120]
CHECKPOINT_BUCKETS = [0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600]

EXPORTED = {
    "ray_llmops_train_steps_total": "optimizer steps done",
    "ray_llmops_train_loss": "training loss of the last step (mean over ranks)",
    "ray_llmops_train_tokens_per_s": "tokens per second of the last step, all ranks together",
    "ray_llmops_train_step_s": "seconds per optimizer step",
    "ray_llmops_train_checkpoint_s": "seconds to save, sign and upload a checkpoint",
    "ray_llmops_train_last_step_timestamp_s": "Unix time of the last optimizer step",
    "ray_llmops_train_running": "1 while the run trains, 0 once it ended",
}


class TrainingMetrics:
    """Rank 0's gauges, counter and histograms of one run; a no-op on other ranks."""

    def __init__(self, run_name: str, run_id: str, enabled: bool):
        self.enabled = enabled
        if not enabled:
            return
        from ray.util.metrics import Counter, Gauge, Histogram

        tags = {"run": run_name, "mlflow_run_id": run_id}

        def made(kind, name: str, **options):
            return ray_metric(kind, name, EXPORTED, tags, **options)

        self.steps = made(Counter, "llmops_train_steps")
        self.loss = made(Gauge, "llmops_train_loss")
        self.speed = made(Gauge, "llmops_train_tokens_per_s")
        self.step_s = made(Histogram, "llmops_train_step_s", boundaries=STEP_BUCKETS)
        self.checkpoint_s = made(Histogram, "llmops_train_checkpoint_s", boundaries=CHECKPOINT_BUCKETS)
        self.last_step = made(Gauge, "llmops_train_last_step_timestamp_s")
        self.running = made(Gauge, "llmops_train_running")
        # The gauges' values, reported every few seconds (a stalled run must stay visible as one).
        self.values = {"running": 1.0, "last_step": time.time()}  # no first step yet counts as a stall too
        self._stopped = threading.Event()
        every(5.0, self._report, self._stopped)

    def _report(self) -> None:
        values = dict(self.values)
        self.running.set(values["running"])
        self.last_step.set(values["last_step"])
        if "loss" in values:
            self.loss.set(values["loss"])
            self.speed.set(values["tokens_per_s"])

    def step(self, loss: float, tokens_per_s: float, seconds: float) -> None:
        if not self.enabled:
            return
        self.steps.inc()
        self.step_s.observe(seconds)
        self.values = {**self.values, "loss": loss, "tokens_per_s": tokens_per_s, "last_step": time.time()}
        self._report()

    def checkpoint(self, seconds: float) -> None:
        if self.enabled:
            self.checkpoint_s.observe(seconds)

    def ended(self) -> None:
        if self.enabled:
            self._stopped.set()
            self.values = {**self.values, "running": 0.0}
            self._report()

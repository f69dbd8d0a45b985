"""The serving metrics: one home for their names, help texts, buckets and labels.

Every metric carries ``model_version`` (``NAME/VERSION`` for registry models, the served name
otherwise), so a dashboard or an alert can compare the champion with a challenger. Ray exports
them from each replica's metrics agent with its ``ray_`` prefix (counters also get ``_total``):
``llmops_generated_tokens`` is scraped as ``ray_llmops_generated_tokens_total``. The names
Prometheus sees are in :data:`EXPORTED`; dashboards and alert rules may use only those and
Ray's own (tests check).
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from ray_app.monitoring import every, ray_metric

CANARY_ALIAS = "canary"  # model_info's alias of a canary beside the champion (not a registry alias)

# Seconds; a CPU replica's first token is 20 ms-2 s, a loaded one's up to the request deadline.
TTFT_BUCKETS = [0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30]
ITL_BUCKETS = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5]
INFO_INTERVAL_S = 5.0

# What Prometheus sees (after Ray's prefix and suffixes); the one list dashboards are checked against.
EXPORTED = {
    "ray_llmops_requests_total": "HTTP requests answered by the API, by route and status code",
    "ray_llmops_generated_tokens_total": "tokens generated",
    "ray_llmops_prompt_tokens_total": "prompt tokens of admitted requests",
    "ray_llmops_time_to_first_token_s": "seconds from a request's arrival at its replica to its first token",
    "ray_llmops_inter_token_latency_s": "mean seconds between the tokens of one answer",
    "ray_llmops_queue_length": "requests admitted by a replica and waiting for a batch row",
    "ray_llmops_running_batch_size": "requests decoding together in a replica's batch",
    "ray_llmops_model_info": "1 for each model version an API serves, with the alias it was pinned from",
}


class RequestMetrics:
    """The API's request counter (the ApiGate calls it for every response it starts).

    The counter is made on the first call, in the replica: the object itself may be built on
    the driver and travel with the app (the vLLM app's middleware options).
    """

    def __init__(self, model_version: str, alias: str | None = None, canary_version: str | None = None):
        self.model_version, self.alias, self.canary_version = model_version, alias or "", canary_version
        self._requests = None

    def start(self) -> RequestMetrics:
        """Make the metrics (in the replica) and say which version is served; idempotent."""
        if self._requests is None:
            from ray.serve.metrics import Counter, Gauge

            self._requests = Counter(
                "llmops_requests", EXPORTED["ray_llmops_requests_total"], tag_keys=("model_version", "route", "code")
            )
            # Which version answers under which alias: alert rules compare a version with the champion.
            # Set again and again: a gauge nobody sets ages out of Ray's agent (dead replicas' do).
            info = Gauge("llmops_model_info", EXPORTED["ray_llmops_model_info"], tag_keys=("model_version", "alias"))
            served = [{"model_version": self.model_version, "alias": self.alias}]
            if self.canary_version:
                served.append({"model_version": self.canary_version, "alias": CANARY_ALIAS})
            every(INFO_INTERVAL_S, lambda: [info.set(1, tags=dict(tags)) for tags in served], threading.Event())
        return self

    def __call__(self, route: str, status: int, model_version: str = "") -> None:
        """Count one response of ``model_version`` (the version that answered; default: the champion's)."""
        version = model_version or self.model_version
        self.start()._requests.inc(1, tags={"model_version": version, "route": route, "code": str(status)})


class ReplicaMetrics:
    """A model replica's token counts, latencies and its batch's occupancy.

    ``occupancy`` returns (waiting, running); a daemon thread samples it every ``interval_s``
    (Ray sends gauges to its agent every few seconds anyway).
    """

    def __init__(self, model_version: str, occupancy: Callable[[], tuple[int, int]], interval_s: float = 2.0):
        from ray.serve.metrics import Counter, Gauge, Histogram

        def made(kind, name: str, **options):
            return ray_metric(kind, name, EXPORTED, {"model_version": model_version}, **options)

        self.generated = made(Counter, "llmops_generated_tokens")
        self.prompt = made(Counter, "llmops_prompt_tokens")
        self.ttft = made(Histogram, "llmops_time_to_first_token_s", boundaries=TTFT_BUCKETS)
        self.itl = made(Histogram, "llmops_inter_token_latency_s", boundaries=ITL_BUCKETS)
        self.queue = made(Gauge, "llmops_queue_length")
        self.running = made(Gauge, "llmops_running_batch_size")
        self._occupancy = occupancy
        self._stopped = threading.Event()
        every(interval_s, self._sample, self._stopped)

    def answered(self, prompt_tokens: int, tokens: int, decode_s: float, label: str | None = None) -> None:
        """One request's figures once it ended: ``decode_s`` is the time from its first token to its last;
        ``label``: what answered when not the replica's version (an adapter: NAME/VERSION:ADAPTER)."""
        tags = {"model_version": label} if label else None
        self.prompt.inc(prompt_tokens, tags=tags)
        if tokens:
            self.generated.inc(tokens, tags=tags)
        if tokens > 1:
            self.itl.observe(decode_s / (tokens - 1), tags=tags)

    def first_token(self, ttft_s: float, label: str | None = None) -> None:
        self.ttft.observe(ttft_s, tags={"model_version": label} if label else None)

    def stop(self) -> None:
        self._stopped.set()

    def _sample(self) -> None:
        waiting, running = self._occupancy()
        self.queue.set(waiting)
        self.running.set(running)

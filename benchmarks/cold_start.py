"""Cold start from zero replicas to the first token, per engine, side by side.

    .venv/bin/python benchmarks/cold_start.py [--model default] [--repeats 3]

Two Serve apps on one Ray instance, one per engine (openvino, transformers), both with
``min_replicas: 0`` and a 2 s delay to zero, one replica of all cores when awake. Each round,
for each engine in turn (the order alternates): wait until its deployment has no replica, then
time one streamed chat request (greedy, 8 tokens) to its first token, and to the last. A first
wake-up per engine (not counted) fills the local model cache (the OpenVINO conversion happens
there: its time is reported apart). Also the time to first token of the same request on the
replica while awake, for reference. Prints a table, writes benchmarks/results/cold_start.json
and .png. Not run by CI.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from charts import bar_chart  # noqa: E402 (this folder, on the path as the script's own)
from serve_throughput import _free_port, stream_once  # noqa: E402

ENGINES = ("openvino", "transformers")
ZERO = {"min_replicas": 0, "max_replicas": 1, "initial_replicas": 0, "downscale_delay_s": 2,
        "downscale_to_zero_delay_s": 2, "metrics_interval_s": 0.5, "look_back_period_s": 1}  # fmt: skip


def running_replicas(app: str) -> int:
    from ray import serve

    deployment = serve.status().applications[app].deployments["ChatServer"]
    return sum(count for state, count in deployment.replica_states.items() if str(state).endswith("RUNNING"))


def wait_for_zero(app: str, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while running_replicas(app) > 0:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{app} did not scale to zero in {timeout_s}s")
        time.sleep(0.25)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    import ray
    from ray import serve

    from ray_app import credentials
    from ray_app.models import resolve_model
    from ray_app.serving.app import bind_app
    from ray_app.serving.config import parse_args, pin_model
    from ray_app.serving.protocol import hash_key
    from ray_app.settings import load_settings

    settings = load_settings(home=Path(tempfile.mkdtemp(prefix="llmops-cold-")))
    model_dir = resolve_model(None if args.model == "default" else args.model, settings)
    cores = os.cpu_count() or 1
    credentials.apply_ray_client_env(settings)
    ray.init(num_cpus=cores, include_dashboard=False, runtime_env={"env_vars": settings.worker_env()})
    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    key = "sk-bench-" + os.urandom(8).hex()
    served = None
    for engine in ENGINES:
        serve_args = parse_args({"model": str(model_dir), "engine": engine, "torch_threads": cores})
        served = pin_model(serve_args, settings)
        options = {"autoscaling_config": ZERO, "ray_actor_options": {"num_cpus": cores}}
        serve.run(bind_app(serve_args, served, [hash_key(key)], **options), name=engine, route_prefix=f"/{engine}")

    def ask(engine: str) -> tuple[float, float]:
        first, end, _tokens, _chunks = stream_once(f"http://127.0.0.1:{port}/{engine}", key, served.name, 8)
        return first, end

    first_wake = {engine: ask(engine)[0] for engine in ENGINES}  # fills the caches (and converts)
    cold: dict[str, list[float]] = {engine: [] for engine in ENGINES}
    warm: dict[str, list[float]] = {engine: [] for engine in ENGINES}
    for round_ in range(args.repeats):
        for engine in ENGINES if round_ % 2 == 0 else ENGINES[::-1]:
            wait_for_zero(engine)
            cold[engine].append(ask(engine)[0])
            warm[engine].append(ask(engine)[0])  # the replica is up now
    serve.shutdown()
    ray.shutdown()

    rows = {
        engine: {
            "first_wake_with_cache_fill_s": first_wake[engine],
            "cold_ttft_s": statistics.median(cold[engine]),
            "cold_ttft_s_runs": cold[engine],
            "warm_ttft_s": statistics.median(warm[engine]),
        }
        for engine in ENGINES
    }
    print(f"\nmodel {model_dir.name}, {cores} cores, one replica when awake, median of {args.repeats}")
    print(f"{'engine':<14}{'cold: zero -> first token s':>30}{'warm TTFT s':>14}{'first wake (fills cache) s':>30}")
    for engine, row in rows.items():
        print(f"{engine:<14}{row['cold_ttft_s']:>30.2f}{row['warm_ttft_s']:>14.3f}"
              f"{row['first_wake_with_cache_fill_s']:>30.1f}")  # fmt: skip
    out = ROOT / "benchmarks" / "results" / "cold_start.json"
    out.write_text(json.dumps({"model": model_dir.name, "cores": cores, "repeats": args.repeats,
                               "engines": rows}, indent=2) + "\n")  # fmt: skip
    chart(out.with_suffix(".png"), rows)
    print(f"\nwrote {out} and {out.with_suffix('.png')}")
    return 0


def chart(path: Path, rows: dict[str, dict]) -> None:
    engines = list(rows)
    bar_chart(path, engines, [rows[e]["cold_ttft_s"] for e in engines], ["#1f77b4", "#999"], "seconds",
              title="zero replicas -> first token",
              mark=lambda axis: axis.axhline(10, color="#d62728", linestyle="--", label="target 10 s"))  # fmt: skip


if __name__ == "__main__":
    raise SystemExit(main())

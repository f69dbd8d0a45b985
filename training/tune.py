"""Hyperparameter sweep over the SFT recipe with Ray Tune and ASHA early stopping.

    llmops tune --config training/configs/tiny_cpu.yaml --search "learning_rate=loguniform(1e-5,1e-3)" --samples 4

Each trial runs the recipe's TorchTrainer inside a Tune function; the workers' reports
(at every checkpoint) reach Tune through ``TuneReportCallback``, so ASHA can stop weak
trials early. Each trial is an MLflow run nested under one parent run of the sweep.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from ray_app import credentials
from training.config import ConfigError, SFTConfig, apply_overrides

TRIAL_CPU = 0.01  # the Tune function only waits on its trainer; its workers hold the CPUs
_SPEC = re.compile(r"^(?P<key>[A-Za-z_][\w.]*)=(?P<fn>loguniform|uniform|randint|choice|grid)\((?P<args>.*)\)$")


@dataclass
class SweepResult:
    """The best trial of a sweep and where its runs are."""

    best_config: dict[str, Any]
    best_loss: float
    parent_run_id: str
    trials: int
    stopped_early: int


def _scalar(text: str) -> Any:
    """A number when it reads as one (YAML 1.1 would keep '3e-3' a string), else YAML's reading."""
    import yaml

    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return yaml.safe_load(text)


def parse_search(specs: list[str]) -> dict[str, Any]:
    """``key=fn(args)`` strings into a Tune search space (dotted keys for nested fields).

    Accepted: loguniform(a,b), uniform(a,b), randint(a,b), choice(x,y,...), grid(x,y,...).
    """
    from ray import tune

    space: dict[str, Any] = {}
    for spec in specs:
        match = _SPEC.match(spec.replace(" ", ""))
        if not match:
            raise ConfigError(
                f"--search expects key=fn(args) with fn in loguniform/uniform/randint/choice/grid, got {spec!r}"
            )
        args = [_scalar(arg) for arg in match["args"].split(",") if arg]
        fn = match["fn"]
        if fn in ("loguniform", "uniform", "randint") and len(args) != 2:
            raise ConfigError(f"--search {match['key']}: {fn} takes two bounds, got {args}")
        if fn in ("choice", "grid"):
            space[match["key"]] = tune.choice(args) if fn == "choice" else tune.grid_search(args)
        else:
            space[match["key"]] = getattr(tune, fn)(*args)
    return space


DATA_FIELDS = ("model", "train_data", "seq_len", "pack")


def _trial(config: dict[str, Any], settings, prepared: tuple) -> None:
    """One Tune trial: the recipe with this trial's values, metrics reported to Tune."""
    from ray.tune.integration.ray_train import TuneReportCallback

    from training.sft import run

    raw = apply_overrides(dict(config["base"]), [f"{key}={value}" for key, value in config["params"].items()])
    run(SFTConfig(**raw), settings, callbacks=[TuneReportCallback()], parent_run_id=config["parent_run_id"],
        prepared=prepared)  # fmt: skip


def sweep(cfg: SFTConfig, search: list[str], samples: int, settings, max_concurrent: int = 1) -> SweepResult:
    """Run ``samples`` trials (each grid point counted once) and return the best by train loss."""
    import mlflow
    import ray
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    from ray_app.registry import configure_tracking

    space = parse_search(search)
    if not space:
        raise ConfigError("--search: give at least one key=fn(args)")
    shaping = [key for key in space if key.split(".")[0] in DATA_FIELDS]
    if shaping:
        raise ConfigError(f"--search {shaping[0]}: the data is prepared once per sweep; {', '.join(DATA_FIELDS)} "
                          "cannot vary between trials")  # fmt: skip
    if not ray.is_initialized():
        credentials.apply_ray_client_env(settings)
        credentials.export_to_this_process(settings)  # a Ray started here inherits them; never runtime_env
        ray.init(address=settings.ray_address, runtime_env={"env_vars": settings.worker_env()})
    cpus = ray.cluster_resources().get("CPU", 0)
    need = cfg.num_workers * cfg.cpus_per_worker * max_concurrent + TRIAL_CPU * max_concurrent
    if need > cpus:
        raise ConfigError(
            f"cpus_per_worker: {max_concurrent} trial(s) x {cfg.num_workers} workers x {cfg.cpus_per_worker:g} CPU "
            f"+ {TRIAL_CPU} per trial need {need:g} CPUs, the cluster has {cpus:g}; lower cpus_per_worker (e.g. 0.99)"
        )
    from ray_app.models import resolve_model
    from training.data import prepare_dataset

    # Prepared once, here: inside a trial, Ray Data tasks would be confined to the trial's
    # 0.01-CPU placement group and never schedule.
    model_dir = str(resolve_model(cfg.model, settings))
    dataset, stats = prepare_dataset(cfg.train_data, model_dir, cfg.seq_len, cfg.pack, settings)
    configure_tracking(settings)
    mlflow.set_experiment(cfg.experiment)
    base = cfg.model_dump() | {"registered_model": None}
    with mlflow.start_run(run_name=f"sweep-{cfg.run_name or 'sft'}") as parent:
        mlflow.log_params({"search": "; ".join(search), "samples": samples})
        tuner = tune.Tuner(
            # with_parameters keeps the settings (and their secrets) in the object store,
            # out of the params.json that Tune writes for every trial.
            tune.with_resources(
                tune.with_parameters(_trial, settings=settings, prepared=(model_dir, dataset, stats)),
                {"cpu": TRIAL_CPU},
            ),
            param_space={"params": space, "base": base, "parent_run_id": parent.info.run_id},
            tune_config=tune.TuneConfig(
                metric="train_loss",
                mode="min",
                num_samples=samples,
                max_concurrent_trials=max_concurrent,
                scheduler=ASHAScheduler(grace_period=1, reduction_factor=2),
            ),
        )
        with credentials.kept_out_of_runtime_envs():  # trials take theirs from the node
            grid = tuner.fit()
        best = grid.get_best_result(metric="train_loss", mode="min", scope="last")
        best_params = best.config["params"]
        best_loss = float(best.metrics["train_loss"])
        mlflow.log_metric("best_train_loss", best_loss)
        mlflow.log_dict(best_params, "best_params.json")
        trials = len(grid)
        full = max(int(result.metrics.get("training_iteration", 0)) for result in grid if result.metrics)
        stopped = sum(1 for result in grid if result.metrics and result.metrics.get("training_iteration", 0) < full)
    return SweepResult(best_params, best_loss, parent.info.run_id, trials, stopped)

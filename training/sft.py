"""Supervised fine-tuning of a chat model with Ray Train + DeepSpeed, top to bottom.

    llmops train --config training/configs/tiny_cpu.yaml --set max_steps=20
    python -m training.sft --config training/configs/tiny_cpu.yaml      # same, e.g. as a Ray job

The driver (``run``) resolves the model, prepares the data with Ray Data, opens the MLflow
run, and starts a ``TorchTrainer``. Each worker (``train_loop``) builds the model, calls
``deepspeed.initialize`` (ZeRO-2/3, optional LoRA; gloo on CPU, nccl on GPU), trains on its
data shard, and every ``checkpoint_every`` steps reports a checkpoint (DeepSpeed state +
step + data position + MLflow run id) to the store. When a worker dies, Ray Train restarts
the group from the last checkpoint; the step counter and data position continue, and
steps already logged are not logged twice. At the end one consolidated Hugging Face folder
is written to the store, evaluated, and registered in MLflow with alias ``challenger``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict
from typing import Any

from training import runtime
from training.config import LoraSettings, SFTConfig, load_config


# --------------------------------------------------------------------------------------
# The worker loop: runs on every Ray Train worker.
# --------------------------------------------------------------------------------------
def train_loop(config: dict[str, Any]) -> None:
    """Ray Train worker entry point."""
    import ray.train

    cfg = SFTConfig(**config["sft"])
    world = ray.train.get_context().get_world_size()
    rows_per_worker = config["train_rows"] // world
    steps_per_epoch = max(1, rows_per_worker // (cfg.micro_batch_size * cfg.grad_accum))
    total_steps = cfg.max_steps or steps_per_epoch * cfg.epochs
    worker = runtime.start_worker(cfg, config, total_steps)
    engine, scheduler, state, tracker = worker.engine, worker.scheduler, worker.state, worker.tracker

    shard = ray.train.get_dataset_shard("train")
    step, epoch = state["global_step"], state["epoch"]
    window_loss, window_tokens, window_start = 0.0, 0, time.perf_counter()
    micro_in_step = 0
    last_metrics: dict[str, float] = {}
    done = step >= total_steps
    while not done and (cfg.max_steps is not None or epoch < cfg.epochs):
        skip = state["batch_in_epoch"] if epoch == state["epoch"] else 0
        batch_in_epoch = 0
        for batch in runtime.epoch_batches(shard, cfg, epoch):
            batch_in_epoch += 1
            if batch_in_epoch <= skip:
                continue  # the data position of the checkpoint we resumed from
            device = engine.device
            with runtime.autocast(cfg.cpu_autocast):
                output = engine(
                    input_ids=batch["input_ids"].to(device),
                    attention_mask=batch["attention_mask"].to(device),
                    labels=batch["labels"].to(device),
                )
            engine.backward(output.loss)
            engine.step()
            window_loss += float(output.loss.detach())
            window_tokens += int(batch["attention_mask"].sum())
            micro_in_step += 1
            if micro_in_step < cfg.grad_accum:
                continue
            micro_in_step = 0
            step += 1
            elapsed = time.perf_counter() - window_start
            grad_norm = engine.get_global_grad_norm()
            last_metrics = {
                "train_loss": runtime.mean_across_ranks(window_loss / cfg.grad_accum),
                "learning_rate": scheduler.get_last_lr()[0],
                "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
                "tokens_per_s": runtime.sum_across_ranks(window_tokens) / max(elapsed, 1e-9),
                "epoch": float(epoch),
            }
            if cfg.eval_every and step % cfg.eval_every == 0 and step < total_steps:  # the last: the final eval
                last_metrics |= runtime.periodic_eval(engine, config["eval_examples"], cfg)
            tracker.log(last_metrics, step=step)
            window_loss, window_tokens, window_start = 0.0, 0, time.perf_counter()
            if step % cfg.checkpoint_every == 0 or step >= total_steps:
                state = {**state, "global_step": step, "epoch": epoch, "batch_in_epoch": batch_in_epoch}
                worker.checkpoint(state, {"global_step": step, **last_metrics})
            if step >= total_steps:
                done = True
                break
        epoch += 1

    runtime.finish_worker(worker, cfg, config)


# --------------------------------------------------------------------------------------
# The driver: data, tracking, the trainer, evaluation and registration.
# --------------------------------------------------------------------------------------
PERIODIC_EVAL_EXAMPLES = 256


def _eval_examples(cfg: SFTConfig, model_dir: str, settings) -> list[tuple[list[int], list[int]]]:
    """Tokenized held-out examples for ``eval_every`` (the first 256; the final eval uses all)."""
    from training.data import DatasetError, _tokenizer
    from training.evaluate import heldout_examples

    try:
        return heldout_examples(cfg.eval_data, _tokenizer(model_dir), cfg.seq_len, settings, PERIODIC_EVAL_EXAMPLES)
    except DatasetError as exc:
        raise DatasetError(f"eval_every: {exc}") from exc


def register_run(run_id: str, settings=None):
    """Register a finished run's model folder as its recipe said (``llmops register RUN_ID``); for an
    adapter run, record the adapter on its base version and return the ``model`` that serves it.

    For a run whose training finished but whose registration failed (MLflow or S3 down at the
    end): reads the recipe the run logged (``config/sft.json``), checks the folder's manifest,
    and registers it exactly as ``run`` would have, idempotently (a run yields one version).
    The run is marked FINISHED once its version is complete.
    """
    import mlflow

    from ray_app.registry import RegistryError, client, configure_tracking
    from ray_app.settings import get_settings
    from ray_app.storage import open_store

    settings = settings or get_settings()
    configure_tracking(settings)
    try:
        recorded = mlflow.artifacts.load_dict(f"runs:/{run_id}/config/sft.json")
        run_info = client(settings).get_run(run_id)
    except Exception as exc:  # MlflowException for a wrong id, a connection error for a server down
        raise RegistryError(f"cannot read run {run_id} at {settings.mlflow_tracking_uri}: {exc}") from exc
    # as the run recorded it (an adapter's base already pinned); its local data files may be gone
    cfg = SFTConfig.model_construct(**recorded | {"lora": LoraSettings(**recorded.get("lora") or {})})
    if not cfg.registered_model and not cfg.saves_adapter:
        raise ValueError(f"run {run_id} was trained with registered_model: null; there is nothing to register")
    store = open_store(settings=settings)
    with mlflow.start_run(run_id=run_id):
        eval_loss = run_info.data.metrics.get("eval_loss")
        if cfg.saves_adapter:  # an adapter is recorded on its base version: returns the `model` that serves it
            return runtime.register_adapter(runtime.Setup(cfg, settings, store, {}), run_id, eval_loss)
        return runtime.register(cfg, store, f"models/{cfg.run_name}", run_id, eval_loss, settings)


def run(
    cfg: SFTConfig,
    settings=None,
    callbacks: list | None = None,
    parent_run_id: str | None = None,
    prepared: tuple | None = None,
) -> runtime.TrainResult:
    """Run one fine-tuning job on the Ray cluster in settings (or a local one) and register the result.

    ``callbacks`` are Ray Train user callbacks (a Tune sweep passes its reporter);
    ``parent_run_id`` nests the MLflow run under a sweep's run; ``prepared`` is
    ``(model_dir, dataset, stats)`` when the caller already ran the data preparation.
    """
    import mlflow

    from ray_app.models import resolve_model
    from training.data import prepare_dataset
    from training.evaluate import evaluate_model

    setup = runtime.setup(cfg, settings, "sft")
    cfg, settings, store, worker_env = setup.cfg, setup.settings, setup.store, setup.worker_env
    if prepared is None:
        model_dir = str(resolve_model(cfg.model, settings))
        train_ds, train_stats = prepare_dataset(cfg.train_data, model_dir, cfg.seq_len, cfg.pack, settings)
    else:
        model_dir, train_ds, train_stats = prepared
    runtime.check_rows_fill_a_batch(cfg, train_stats.rows)
    eval_uris = cfg.eval_data
    eval_examples = _eval_examples(cfg, model_dir, settings) if cfg.eval_every else []  # fails before any run

    model_prefix = setup.model_prefix
    data_params = {"data.records": train_stats.records, "data.skipped": train_stats.skipped,
                   "data.rows": train_stats.rows}  # fmt: skip
    with runtime.start_tracked_run(setup, "sft", model_dir, data_params, parent_run_id) as active:
        run_id = active.info.run_id
        loop_config = {"sft": cfg.model_dump(), "model_dir": model_dir, "mlflow_run_id": run_id,
                       "train_rows": train_stats.rows, "model_prefix": model_prefix,
                       "eval_examples": eval_examples}  # fmt: skip
        trainer = runtime.make_trainer(cfg, train_loop, loop_config, train_ds, store, worker_env, callbacks)
        result = runtime.fit(trainer, store, cfg.run_name)
        metrics = result.metrics or {}
        model_uri = store.uri(model_prefix)

        eval_loss = None
        if eval_uris:
            model, adapter = setup.trained
            report = evaluate_model(model, eval_uris, cfg.seq_len, settings, prompts=cfg.sample_prompts,
                                    max_new_tokens=cfg.max_new_tokens, adapter=adapter)  # fmt: skip
            eval_loss = report.loss
            mlflow.log_metrics({"eval_loss": report.loss, "eval_perplexity": report.perplexity},
                               step=int(metrics.get("global_step", 0)))  # fmt: skip
            mlflow.log_dict({"samples": report.samples}, "samples/generations.json")

        version = runtime.register_result(setup, run_id, eval_loss)

    return runtime.TrainResult(
        run_name=cfg.run_name,
        mlflow_run_id=run_id,
        model_uri=model_uri,
        registered_model=cfg.registered_model,
        registered_version=version.version if version else None,
        global_step=int(metrics.get("global_step", 0)),
        final_loss=metrics.get("train_loss"),
        eval_loss=eval_loss,
        data=asdict(train_stats),
        adapter=setup.adapter,
    )


def main(argv: list[str] | None = None) -> int:
    """``python -m training.sft --config FILE [--set key=value ...]``."""
    parser = argparse.ArgumentParser(prog="python -m training.sft", description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="YAML recipe config")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    from ray_app.registry import RegistryError
    from ray_app.storage import StoreError

    cfg = load_config(args.config, args.overrides)
    try:
        result = run(cfg)
    except (RegistryError, StoreError) as exc:  # a service down: its URL says it all, no traceback
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 1
    print(json.dumps(asdict(result), indent=2, default=str))
    from ray_app.orchestration.ray_jobs import emit_result

    emit_result(asdict(result))  # one line the Airflow operator returns as the train task's XCom
    return 0


if __name__ == "__main__":
    sys.exit(main())

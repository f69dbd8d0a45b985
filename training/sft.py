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
import math
import os
import sys
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ray_app import credentials
from training import signing
from training.config import SFTConfig, load_config
from training.metrics import TrainingMetrics

TRAINER_STATE = "trainer_state.json"
DS_TAG = "ds"


@dataclass
class TrainResult:
    """What a finished run produced."""

    run_name: str
    mlflow_run_id: str
    model_uri: str
    registered_model: str | None
    registered_version: str | None
    global_step: int
    final_loss: float | None
    eval_loss: float | None
    data: dict[str, Any]


# --------------------------------------------------------------------------------------
# The worker loop: runs on every Ray Train worker.
# --------------------------------------------------------------------------------------
def _lr_lambda(cfg: SFTConfig, total_steps: int):
    def factor(step: int) -> float:
        if cfg.warmup_steps and step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        if cfg.lr_schedule == "constant":
            return 1.0
        progress = min(1.0, (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps))
        if cfg.lr_schedule == "linear":
            return max(0.0, 1.0 - progress)
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def _build_model(cfg: SFTConfig, model_dir: str, ds_config: dict[str, Any]):
    """The HF model (with LoRA adapters if asked); under ZeRO-3 its weights are partitioned at load."""
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.integrations import HfDeepSpeedConfig

    keep_alive = None
    if ds_config.get("zero_optimization", {}).get("stage") == 3:
        # Must exist (and stay referenced) before from_pretrained for zero.Init partitioning.
        keep_alive = HfDeepSpeedConfig(ds_config)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[cfg.precision]
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    model.config.use_cache = False
    if cfg.method == "lora":
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(
            r=cfg.lora.rank,
            lora_alpha=cfg.lora.alpha,
            lora_dropout=cfg.lora.dropout,
            target_modules=cfg.lora.target_modules,
            task_type="CAUSAL_LM",
        )
        model = get_peft_model(model, lora)
    return model, keep_alive


def _mean_across_ranks(value: float) -> float:
    import torch
    import torch.distributed as dist

    if not dist.is_initialized():
        return value
    tensor = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(tensor)
    return float(tensor.item()) / dist.get_world_size()


def _sum_across_ranks(value: float) -> float:
    import torch
    import torch.distributed as dist

    if not dist.is_initialized():
        return value
    tensor = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(tensor)
    return float(tensor.item())


class _Tracker:
    """Rank 0's MLflow (and W&B) logging and live metrics; steps logged before a restart are not logged again."""

    def __init__(self, run_id: str, cfg: SFTConfig, enabled: bool) -> None:
        self.enabled = enabled
        self.run_id = run_id
        self.last_logged = -1
        self.wandb_run = None
        self.live = TrainingMetrics(cfg.run_name or "", run_id, enabled)
        self.last_step_at = time.perf_counter()
        if not enabled:
            return
        from mlflow import MlflowClient

        self.client = MlflowClient()
        history = self.client.get_metric_history(run_id, "train_loss")
        self.last_logged = max((point.step for point in history), default=-1)
        if os.environ.get("WANDB_MODE", "offline") != "disabled":
            import wandb

            wandb_dir = Path(os.environ.get("LLMOPS_HOME", tempfile.gettempdir())) / "wandb"
            wandb_dir.mkdir(parents=True, exist_ok=True)
            self.wandb_run = wandb.init(
                project=os.environ.get("WANDB_PROJECT", "ray-llmops"),
                id=run_id,
                resume="allow",
                dir=str(wandb_dir),
                config=cfg.model_dump(),
                name=cfg.run_name,
            )

    def log(self, metrics: dict[str, float], step: int, once_per_step: bool = True) -> None:
        if not self.enabled or (once_per_step and step <= self.last_logged):
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()])
        if self.wandb_run is not None and once_per_step:
            self.wandb_run.log(metrics, step=step)
        if "train_loss" in metrics:
            now = time.perf_counter()
            self.live.step(metrics["train_loss"], metrics["tokens_per_s"], now - self.last_step_at)
            self.last_step_at = now
        self.last_logged = max(self.last_logged, step)

    def close(self) -> None:
        self.live.ended()
        if self.wandb_run is not None:
            self.wandb_run.finish()


def _save_checkpoint(engine, state: dict[str, Any], metrics: dict[str, float], rank: int, key: bytes) -> float:
    """Every rank saves its DeepSpeed shard and signs it; Ray Train merges the folders and uploads them.

    Returns the seconds it took (saving, signing, uploading)."""
    import ray.train

    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as folder:
        engine.save_checkpoint(folder, tag=DS_TAG, client_state={"trainer_state": state})
        if rank == 0:
            Path(folder, TRAINER_STATE).write_text(json.dumps(state))
        signing.sign(Path(folder), key, rank)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder))
    return time.perf_counter() - started


def _consolidated_state_dict(engine, zero_stage: int, rank: int) -> dict[str, Any] | None:
    """The full state dict on rank 0, None elsewhere (all ranks must call this under ZeRO-3)."""
    if zero_stage == 3:
        return engine._zero3_consolidated_16bit_state_dict()
    if rank != 0:
        return None  # under ZeRO-2 each rank holds the full weights; only rank 0 writes them
    return {key: value.detach().cpu() for key, value in engine.module.state_dict().items()}


def _write_hf_folder(cfg: SFTConfig, model_dir: str, state_dict: dict[str, Any], out: Path) -> None:
    """A plain HF folder (safetensors + tokenizer + chat template + generation config) from a state dict."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if cfg.method == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(
            model,
            LoraConfig(r=cfg.lora.rank, lora_alpha=cfg.lora.alpha, target_modules=cfg.lora.target_modules,
                       lora_dropout=cfg.lora.dropout, task_type="CAUSAL_LM"),
        )  # fmt: skip
    missing, unexpected = model.load_state_dict(state_dict, strict=False)
    # A tied lm_head is absent from the saved state dict; anything else missing is a bug.
    untied_missing = [key for key in missing if not key.endswith("lm_head.weight")]
    if untied_missing or unexpected:
        raise RuntimeError(f"consolidated weights do not fit the model: missing {untied_missing[:3]}, "
                           f"extra {unexpected[:3]}")  # fmt: skip
    if cfg.method == "lora" and cfg.lora.save == "merged":
        model = model.merge_and_unload()
    model.config.use_cache = True
    model.save_pretrained(out, safe_serialization=True)
    AutoTokenizer.from_pretrained(model_dir).save_pretrained(out)


def _periodic_eval(engine, examples: list[tuple[list[int], list[int]]]) -> dict[str, float]:
    """Held-out loss on every rank (each sees all examples, so ZeRO-3's gathers line up)."""
    from training.evaluate import heldout_nll, perplexity

    engine.eval()
    try:
        nll, tokens = heldout_nll(engine, examples)
    finally:
        engine.train()
    loss = nll / max(tokens, 1)
    return {"eval_loss": loss, "eval_perplexity": perplexity(loss)}


def _resume(engine, key: bytes, rank: int, mlflow_run_id: str) -> dict[str, Any]:
    """The trainer state to start from: the last checkpoint's (loaded into ``engine``) or a fresh one."""
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return {"global_step": 0, "epoch": 0, "batch_in_epoch": 0, "mlflow_run_id": mlflow_run_id}
    # Each rank downloads its own copy: with `as_directory()` ranks on one node share a temp
    # download, and a rank resuming after a node loss once read a file being rewritten there
    # (EOFError in torch.load after the signature had passed).
    with tempfile.TemporaryDirectory(prefix=f"resume-rank{rank}-") as folder:
        checkpoint.to_directory(folder)
        signing.verify(Path(folder), key)  # before DeepSpeed unpickles anything from the store
        engine.load_checkpoint(folder, tag=DS_TAG)
        return json.loads(Path(folder, TRAINER_STATE).read_text())


def _publish(cfg: SFTConfig, config: dict[str, Any], state_dict: dict[str, Any] | None, rank: int) -> None:
    """Rank 0 writes the trained weights as a HF folder into the store (every rank calls it)."""
    # Leave ZeRO-3 mode before rank 0 builds a plain model to save: with the HF DeepSpeed
    # config alive, from_pretrained would partition it with collectives that rank 1 never joins.
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    from ray_app.settings import load_settings

    unset_hf_deepspeed_config()
    if rank != 0:
        return
    from ray_app.storage import open_store

    store = open_store(settings=load_settings())
    with tempfile.TemporaryDirectory() as folder:
        _write_hf_folder(cfg, config["model_dir"], state_dict, Path(folder))
        store.ensure()
        store.upload_dir(folder, config["model_prefix"], progress=False)


def train_loop(config: dict[str, Any]) -> None:
    """Ray Train worker entry point."""
    import ray.train
    import torch

    cfg = SFTConfig(**config["sft"])
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    if cfg.torch_threads:
        torch.set_num_threads(cfg.torch_threads)
    torch.manual_seed(cfg.seed)

    import deepspeed

    # Ray Train already set up torch.distributed; DeepSpeed's comm layer joins it, so that
    # ZeRO-3's partitioned load (zero.Init) sees the real world size.
    deepspeed.init_distributed(dist_backend="nccl" if cfg.use_gpu else "gloo")
    ds_config = cfg.deepspeed_config()
    zero_stage = ds_config.get("zero_optimization", {}).get("stage", 0)
    model, _keep_alive = _build_model(cfg, config["model_dir"], ds_config)

    rows_per_worker = config["train_rows"] // world
    steps_per_epoch = max(1, rows_per_worker // (cfg.micro_batch_size * cfg.grad_accum))
    total_steps = cfg.max_steps or steps_per_epoch * cfg.epochs
    trainable = [p for p in model.parameters() if p.requires_grad]
    engine, _optimizer, _, scheduler = deepspeed.initialize(
        model=model,
        model_parameters=trainable,
        config=ds_config,
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(cfg, total_steps)),
    )

    if world == 1:
        engine.enable_backward_allreduce = False  # one rank: the gradients are already the average

    from ray_app.settings import load_settings

    key = signing.signing_key(load_settings())
    state = _resume(engine, key, rank, config["mlflow_run_id"])
    resumed_from = state["global_step"]
    tracker = _Tracker(state["mlflow_run_id"], cfg, enabled=rank == 0)
    if rank == 0 and resumed_from:
        tracker.log({"resumed_from_step": resumed_from}, step=resumed_from, once_per_step=False)

    shard = ray.train.get_dataset_shard("train")
    step, epoch = state["global_step"], state["epoch"]
    window_loss, window_tokens, window_start = 0.0, 0, time.perf_counter()
    micro_in_step = 0
    last_metrics: dict[str, float] = {}
    done = step >= total_steps
    while not done and (cfg.max_steps is not None or epoch < cfg.epochs):
        skip = state["batch_in_epoch"] if epoch == state["epoch"] else 0
        batch_in_epoch = 0
        for batch in shard.iter_torch_batches(batch_size=cfg.micro_batch_size, drop_last=True):
            batch_in_epoch += 1
            if batch_in_epoch <= skip:
                continue  # the data position of the checkpoint we resumed from
            device = engine.device
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
                "train_loss": _mean_across_ranks(window_loss / cfg.grad_accum),
                "learning_rate": scheduler.get_last_lr()[0],
                "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
                "tokens_per_s": _sum_across_ranks(window_tokens) / max(elapsed, 1e-9),
                "epoch": float(epoch),
            }
            if cfg.eval_every and step % cfg.eval_every == 0 and step < total_steps:  # the last: the final eval
                last_metrics |= _periodic_eval(engine, config["eval_examples"])
            tracker.log(last_metrics, step=step)
            window_loss, window_tokens, window_start = 0.0, 0, time.perf_counter()
            if step % cfg.checkpoint_every == 0 or step >= total_steps:
                state = {**state, "global_step": step, "epoch": epoch, "batch_in_epoch": batch_in_epoch}
                saved_in = _save_checkpoint(engine, state, {"global_step": step, **last_metrics}, rank, key)
                tracker.live.checkpoint(saved_in)
            if step >= total_steps:
                done = True
                break
        epoch += 1

    state_dict = _consolidated_state_dict(engine, zero_stage, rank)
    del _keep_alive  # the HF DeepSpeed config: _publish leaves ZeRO-3 mode
    _publish(cfg, config, state_dict, rank)
    tracker.close()


# --------------------------------------------------------------------------------------
# The driver: data, tracking, the trainer, evaluation and registration.
# --------------------------------------------------------------------------------------
def _flatten(prefix: str, value: Any, out: dict[str, Any]) -> dict[str, Any]:
    if isinstance(value, dict):
        for key, inner in value.items():
            _flatten(f"{prefix}.{key}" if prefix else key, inner, out)
    else:
        out[prefix] = json.dumps(value) if isinstance(value, list) else value
    return out


PERIODIC_EVAL_EXAMPLES = 256


def _eval_examples(cfg: SFTConfig, model_dir: str, settings) -> list[tuple[list[int], list[int]]]:
    """Tokenized held-out examples for ``eval_every`` (the first 256; the final eval uses all)."""
    from training.data import DatasetError, _tokenizer
    from training.evaluate import heldout_examples

    try:
        return heldout_examples(cfg.eval_data, _tokenizer(model_dir), cfg.seq_len, settings, PERIODIC_EVAL_EXAMPLES)
    except DatasetError as exc:
        raise DatasetError(f"eval_every: {exc}") from exc


def check_resources(cfg: SFTConfig) -> None:
    """Fail fast when the cluster cannot hold the requested workers."""
    import ray

    resources = ray.cluster_resources()
    need_cpu = cfg.num_workers * cfg.cpus_per_worker
    if need_cpu > resources.get("CPU", 0):
        raise ValueError(
            f"num_workers: {cfg.num_workers} workers x {cfg.cpus_per_worker:g} CPU need {need_cpu:g} CPUs, "
            f"the cluster has {resources.get('CPU', 0):g}"
        )
    if cfg.use_gpu and cfg.num_workers > resources.get("GPU", 0):
        raise ValueError(f"use_gpu: {cfg.num_workers} workers need {cfg.num_workers} GPUs, cluster has "
                         f"{resources.get('GPU', 0):g}")  # fmt: skip


def _trainer(cfg: SFTConfig, loop_config: dict[str, Any], train_ds, store, worker_env: dict, callbacks):
    """The TorchTrainer of one run: its workers, collective backend, checkpoints in the store, retries."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    storage_path, filesystem = store.ray_storage()
    return TorchTrainer(
        train_loop,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(
            num_workers=cfg.num_workers,
            use_gpu=cfg.use_gpu,
            resources_per_worker={"CPU": cfg.cpus_per_worker},
            placement_strategy=cfg.placement_strategy,
        ),
        # A collective with a rank missing fails after 5 minutes instead of the default 30.
        torch_config=TorchConfig(backend="nccl" if cfg.use_gpu else "gloo", timeout_s=300),
        run_config=RunConfig(
            name=cfg.run_name,
            storage_path=f"{storage_path.rstrip('/')}/checkpoints",
            storage_filesystem=filesystem,
            failure_config=FailureConfig(max_failures=cfg.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.keep_checkpoints),
            worker_runtime_env={"env_vars": worker_env},
            callbacks=callbacks,
        ),
        datasets={"train": train_ds},
    )


def _fit(trainer, store, run_name: str):
    """``trainer.fit()``; a run that failed while its store is unreachable raises StoreError naming the store.

    Checkpoints are the run's only way back after a failure: when the store cannot be reached
    (S3 down mid-run), say so in one line instead of Ray's worker traceback.
    """
    from ray.train import TrainingFailedError

    from ray_app.storage import StoreError

    try:
        return trainer.fit()
    except TrainingFailedError as exc:
        try:
            store.list(f"checkpoints/{run_name}")
        except StoreError as unreachable:
            raise StoreError(
                f"training run {run_name} failed: it cannot checkpoint to {store.root_uri} ({unreachable}); "
                f"once the store is back, run it again with run_name={run_name} to resume from its last checkpoint"
            ) from exc
        raise


def _register(cfg: SFTConfig, store, model_prefix: str, run_id: str, eval_loss: float | None, settings):
    """Register the run's model folder as ``challenger`` of ``cfg.registered_model`` (inside the active run)."""
    import mlflow

    from ray_app.registry import RegistryError, register_model_version
    from ray_app.storage import MANIFEST

    model_uri = store.uri(model_prefix)
    if store.read_manifest(model_prefix) is None:  # a version exists only with its folder complete
        raise RuntimeError(f"training finished but {model_uri} has no {MANIFEST}; not registering it")
    source = model_uri
    if not model_uri.startswith("s3://"):
        # The registry accepts no local paths as sources: a local store's folder becomes run artifacts.
        mlflow.log_artifacts(model_uri, "model")
        source = f"runs:/{run_id}/model"
    tags = {"run_id": run_id, "train_data": ",".join(cfg.train_data), "base_model": cfg.model or "default",
            "eval_loss": "" if eval_loss is None else f"{eval_loss:.6f}", **cfg.version_tags}  # fmt: skip
    try:
        version = register_model_version(cfg.registered_model, source, run_id, tags, "challenger", settings)
    except RegistryError as exc:  # the training is done and its folder complete: say how to finish
        raise RegistryError(f"{exc}; the model is trained: `llmops register {run_id}` registers it") from exc
    mlflow.set_tags({"llmops.registered_model": cfg.registered_model, "llmops.version": version.version})
    return version


def register_run(run_id: str, settings=None):
    """Register a finished run's model folder as its recipe said (``llmops register RUN_ID``).

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
    cfg = SFTConfig.model_construct(**recorded)  # as the run recorded it; its local data files may be gone
    if not cfg.registered_model:
        raise ValueError(f"run {run_id} was trained with registered_model: null; there is nothing to register")
    store = open_store(settings=settings)
    with mlflow.start_run(run_id=run_id):
        return _register(cfg, store, f"models/{cfg.run_name}", run_id, run_info.data.metrics.get("eval_loss"), settings)


def run(
    cfg: SFTConfig,
    settings=None,
    callbacks: list | None = None,
    parent_run_id: str | None = None,
    prepared: tuple | None = None,
) -> TrainResult:
    """Run one fine-tuning job on the Ray cluster in settings (or a local one) and register the result.

    ``callbacks`` are Ray Train user callbacks (a Tune sweep passes its reporter);
    ``parent_run_id`` nests the MLflow run under a sweep's run; ``prepared`` is
    ``(model_dir, dataset, stats)`` when the caller already ran the data preparation.
    """
    import mlflow
    import ray

    from ray_app.models import resolve_model
    from ray_app.registry import check_tracking, configure_tracking
    from ray_app.settings import get_settings
    from ray_app.storage import open_store
    from training.data import prepare_dataset
    from training.evaluate import evaluate_model

    settings = settings or get_settings()
    # Before any work: the services a run needs to record and keep what it does, each named if down.
    check_tracking(settings)
    store = open_store(settings=settings)
    store.ensure()
    worker_env = settings.worker_env() | {"DS_ACCELERATOR": "cuda" if cfg.use_gpu else "cpu"}
    if not ray.is_initialized():
        credentials.apply_ray_client_env(settings)
        credentials.export_to_this_process(settings)  # a Ray started here inherits them; never runtime_env
        ray.init(address=settings.ray_address, runtime_env={"env_vars": worker_env}, log_to_driver=True)
    check_resources(cfg)

    run_name = cfg.run_name or f"sft-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
    cfg = cfg.model_copy(update={"run_name": run_name})
    if prepared is None:
        model_dir = str(resolve_model(cfg.model, settings))
        train_ds, train_stats = prepare_dataset(cfg.train_data, model_dir, cfg.seq_len, cfg.pack, settings)
    else:
        model_dir, train_ds, train_stats = prepared
    eval_uris = cfg.eval_data
    eval_examples = _eval_examples(cfg, model_dir, settings) if cfg.eval_every else []  # fails before any run

    configure_tracking(settings)
    mlflow.set_experiment(cfg.experiment)
    model_prefix = f"models/{run_name}"
    tags = {"mlflow.parentRunId": parent_run_id} if parent_run_id else None
    with mlflow.start_run(run_name=run_name, tags=tags) as active:
        run_id = active.info.run_id
        mlflow.log_params(_flatten("", cfg.model_dump(), {}))
        mlflow.log_params({"model_dir": model_dir, "data.records": train_stats.records,
                           "data.skipped": train_stats.skipped, "data.rows": train_stats.rows})  # fmt: skip
        mlflow.log_dict(cfg.model_dump(), "config/sft.json")
        mlflow.log_dict(cfg.deepspeed_config(), "config/deepspeed.json")
        mlflow.set_tags({"llmops.base_model": cfg.model or "default", "llmops.train_data": ",".join(cfg.train_data)})

        loop_config = {"sft": cfg.model_dump(), "model_dir": model_dir, "mlflow_run_id": run_id,
                       "train_rows": train_stats.rows, "model_prefix": model_prefix,
                       "eval_examples": eval_examples}  # fmt: skip
        result = _fit(_trainer(cfg, loop_config, train_ds, store, worker_env, callbacks), store, run_name)
        metrics = result.metrics or {}
        model_uri = store.uri(model_prefix)

        eval_loss = None
        if eval_uris:
            report = evaluate_model(model_uri, eval_uris, cfg.seq_len, settings, prompts=cfg.sample_prompts,
                                    max_new_tokens=cfg.max_new_tokens)  # fmt: skip
            eval_loss = report.loss
            mlflow.log_metrics({"eval_loss": report.loss, "eval_perplexity": report.perplexity},
                               step=int(metrics.get("global_step", 0)))  # fmt: skip
            mlflow.log_dict({"samples": report.samples}, "samples/generations.json")

        mlflow.set_tag("llmops.model_uri", model_uri)  # before registering: `llmops register` finds it by it
        version = _register(cfg, store, model_prefix, run_id, eval_loss, settings) if cfg.registered_model else None

    return TrainResult(
        run_name=run_name,
        mlflow_run_id=run_id,
        model_uri=model_uri,
        registered_model=cfg.registered_model,
        registered_version=version.version if version else None,
        global_step=int(metrics.get("global_step", 0)),
        final_loss=metrics.get("train_loss"),
        eval_loss=eval_loss,
        data=asdict(train_stats),
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

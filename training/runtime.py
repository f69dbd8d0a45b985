"""What every training recipe shares (SFT, DPO/KTO): the worker's model and DeepSpeed engine,
tracking, checkpoints and their resumption, publishing the weights; the driver's trainer,
its failure handling and registration.

Worker side (inside a Ray Train worker): :func:`build_model`, :func:`start_worker` (DeepSpeed
engine + resume + tracker), :class:`Tracker`, :func:`save_checkpoint`, :func:`finish_worker`.
Driver side: :func:`check_resources`, :func:`make_trainer`, :func:`fit`, :func:`register`.
A recipe's config is an :class:`training.config.SFTConfig` (or a subclass of it).
"""

from __future__ import annotations

import json
import math
import os
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from ray_app.adapters import adapter_key, lineage_tag, run_tag
from ray_app.registry import MODELS_URI
from training import signing
from training.config import ConfigError, SFTConfig
from training.data import DatasetError
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
    adapter: str | None = None  # an adapter run (lora.save: adapter): its name under the base version


# --------------------------------------------------------------------------------------
# Worker side.
# --------------------------------------------------------------------------------------
def lr_lambda(cfg: SFTConfig, total_steps: int):
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


def build_model(cfg: SFTConfig, model_dir: str, ds_config: dict[str, Any]):
    """The HF model (with LoRA adapters if asked); under ZeRO-3 its weights are partitioned at load."""
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.integrations import HfDeepSpeedConfig

    keep_alive = None
    if ds_config.get("zero_optimization", {}).get("stage") == 3:
        # Must exist (and stay referenced) before from_pretrained for zero.Init partitioning.
        keep_alive = HfDeepSpeedConfig(ds_config)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[cfg.weights_dtype]
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


@dataclass
class Worker:
    """One Ray Train worker's training state: its DeepSpeed engine, where it resumed, its tracker."""

    engine: Any
    scheduler: Any
    rank: int
    world: int
    zero_stage: int
    key: bytes  # signs and verifies checkpoints
    state: dict[str, Any]  # global_step, epoch, batch_in_epoch, mlflow_run_id (of the checkpoint resumed)
    tracker: Tracker
    keep_alive: Any = None  # the HF DeepSpeed config under ZeRO-3 (until the weights are consolidated)

    def checkpoint(self, state: dict[str, Any], metrics: dict[str, float]) -> None:
        """Save and report a checkpoint with ``state`` (the data position) and ``metrics``; timed live."""
        self.state = state
        self.tracker.live.checkpoint(save_checkpoint(self.engine, state, metrics, self.rank, self.key))


def use_environment_build_tools() -> None:
    """Put this environment's ``bin`` first on PATH. DeepSpeed JIT-builds its CPU ops (the shared-memory
    comm op at every first initialize) with the first ``ninja`` on PATH, and a ninja other than the one
    that built the cache rebuilds it (~30 s of every core): a CLI run, a Ray job and a test each
    started with another PATH used to take turns rebuilding."""
    bindir = os.path.dirname(sys.executable)
    path = os.environ.get("PATH", "")
    if os.path.exists(os.path.join(bindir, "ninja")) and path.split(os.pathsep)[0] != bindir:
        os.environ["PATH"] = os.pathsep.join([bindir, path]) if path else bindir


def start_worker(cfg: SFTConfig, config: dict[str, Any], total_steps: int) -> Worker:
    """Threads and seed, DeepSpeed's engine around the model (gloo on CPU, nccl on GPU), resumed from
    the last checkpoint when there is one, and rank 0's tracker (which says where it resumed)."""
    import deepspeed
    import ray.train
    import torch

    from ray_app.settings import load_settings

    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    if cfg.torch_threads:
        torch.set_num_threads(cfg.torch_threads)
    torch.manual_seed(cfg.seed)
    use_environment_build_tools()
    # Ray Train already set up torch.distributed; DeepSpeed's comm layer joins it, so that
    # ZeRO-3's partitioned load (zero.Init) sees the real world size.
    deepspeed.init_distributed(dist_backend="nccl" if cfg.use_gpu else "gloo")
    ds_config = cfg.deepspeed_config()
    model, keep_alive = build_model(cfg, config["model_dir"], ds_config)
    trainable = [p for p in model.parameters() if p.requires_grad]
    engine, _optimizer, _, scheduler = deepspeed.initialize(
        model=model,
        model_parameters=trainable,
        config=ds_config,
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg, total_steps)),
    )
    if world == 1:
        engine.enable_backward_allreduce = False  # one rank: the gradients are already the average
    key = signing.signing_key(load_settings())
    state = resume(engine, key, rank, config["mlflow_run_id"])
    tracker = Tracker(state["mlflow_run_id"], cfg, enabled=rank == 0)
    if rank == 0 and state["global_step"]:
        tracker.log({"resumed_from_step": state["global_step"]}, step=state["global_step"], once_per_step=False)
    zero_stage = ds_config.get("zero_optimization", {}).get("stage", 0)
    return Worker(engine, scheduler, rank, world, zero_stage, key, state, tracker, keep_alive)


def finish_worker(worker: Worker, cfg: SFTConfig, config: dict[str, Any]) -> None:
    """Consolidate the weights, leave ZeRO-3 mode, publish the HF folder (rank 0), close the tracker."""
    state_dict = consolidated_state_dict(worker.engine, worker.zero_stage, worker.rank)
    worker.keep_alive = None  # the HF DeepSpeed config: publish leaves ZeRO-3 mode
    publish(cfg, config, state_dict, worker.rank)
    worker.tracker.close()


def epoch_batches(shard, cfg: SFTConfig, epoch: int):
    """A worker's micro-batches of one epoch: shuffled in a buffer of ``cfg.shuffle_buffer`` rows,
    seeded by the epoch, so a resumed run skips the same batches it trained on."""
    if not cfg.shuffle_buffer:
        return shard.iter_torch_batches(batch_size=cfg.micro_batch_size, drop_last=True)
    return shard.iter_torch_batches(batch_size=cfg.micro_batch_size, drop_last=True,
                                    local_shuffle_buffer_size=cfg.shuffle_buffer,
                                    local_shuffle_seed=cfg.seed + epoch)  # fmt: skip


def mean_across_ranks(value: float) -> float:
    import torch
    import torch.distributed as dist

    if not dist.is_initialized():
        return value
    tensor = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(tensor)
    return float(tensor.item()) / dist.get_world_size()


def sum_across_ranks(value: float) -> float:
    import torch
    import torch.distributed as dist

    if not dist.is_initialized():
        return value
    tensor = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(tensor)
    return float(tensor.item())


class Tracker:
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
        # What rank 0 computes in (precision: auto is decided on each worker's CPU).
        computed = "bf16-autocast" if cfg.cpu_autocast else cfg.weights_dtype
        self.client.set_tag(run_id, "llmops.compute_precision", computed)
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


def save_checkpoint(engine, state: dict[str, Any], metrics: dict[str, float], rank: int, key: bytes) -> float:
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


def consolidated_state_dict(engine, zero_stage: int, rank: int) -> dict[str, Any] | None:
    """The full state dict on rank 0, None elsewhere (all ranks must call this under ZeRO-3)."""
    if zero_stage == 3:
        return engine._zero3_consolidated_16bit_state_dict()
    if rank != 0:
        return None  # under ZeRO-2 each rank holds the full weights; only rank 0 writes them
    return {key: value.detach().cpu() for key, value in engine.module.state_dict().items()}


def write_hf_folder(cfg: SFTConfig, model_dir: str, state_dict: dict[str, Any], out: Path) -> None:
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


def autocast(cpu_bf16: bool):
    """Where a forward runs (its backward follows what it recorded): under bf16 autocast on CPU when
    ``cpu_bf16`` (a config's ``cpu_autocast``); otherwise as loaded (fp32, or bf16/fp16 on a GPU)."""
    import contextlib

    import torch

    return torch.autocast("cpu", dtype=torch.bfloat16) if cpu_bf16 else contextlib.nullcontext()


def periodic_eval(engine, examples: list[tuple[list[int], list[int]]], cfg: SFTConfig) -> dict[str, float]:
    """Held-out loss on every rank (each sees all examples, so ZeRO-3's gathers line up), in the
    training's precision."""
    from training.evaluate import heldout_nll, perplexity

    engine.eval()
    try:
        with autocast(cfg.cpu_autocast):
            nll, tokens = heldout_nll(engine, examples)
    finally:
        engine.train()
    loss = nll / max(tokens, 1)
    return {"eval_loss": loss, "eval_perplexity": perplexity(loss)}


def resume(engine, key: bytes, rank: int, mlflow_run_id: str) -> dict[str, Any]:
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


def publish(cfg: SFTConfig, config: dict[str, Any], state_dict: dict[str, Any] | None, rank: int) -> None:
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
        write_hf_folder(cfg, config["model_dir"], state_dict, Path(folder))
        store.ensure()
        store.upload_dir(folder, config["model_prefix"], progress=False)


# --------------------------------------------------------------------------------------
# Driver side.
# --------------------------------------------------------------------------------------
@dataclass
class Setup:
    """A run's driver side, once its services answered: its named config, settings, store and worker env."""

    cfg: Any  # the recipe's config, with run_name set
    settings: Any
    store: Any
    worker_env: dict[str, str]

    @property
    def model_prefix(self) -> str:
        """Where the run's model folder goes in the store (an adapter: beside its base version's others)."""
        if self.cfg.saves_adapter:
            base = MODELS_URI.match(self.cfg.model)  # pinned to models:/NAME/VERSION by setup()
            return adapter_key(base["name"], base["version"], self.adapter_name)
        return f"models/{self.cfg.run_name}"

    @property
    def adapter_name(self) -> str:
        return self.cfg.lora.adapter_name or self.cfg.run_name

    @property
    def adapter(self) -> str | None:
        """The adapter the run publishes (``lora.save: adapter``), else None: what its result names."""
        return self.adapter_name if self.cfg.saves_adapter else None

    @property
    def trained(self) -> tuple[str, str | None]:
        """What the run produced, as held-out measures load it: ``(model folder URI, None)``, or for an adapter
        ``(its pinned base, the adapter folder URI)``."""
        uri = self.store.uri(self.model_prefix)
        return (self.cfg.model, uri) if self.cfg.saves_adapter else (uri, None)


def setup(cfg: SFTConfig, settings, kind: str) -> Setup:
    """Check the services a run needs to record and keep what it does (each named if down), connect
    to Ray (the cluster in settings, else a local one) and check it can hold the workers; name the run
    ``KIND-<time>-<random>`` unless the config names it."""
    import uuid

    import ray

    from ray_app import credentials
    from ray_app.registry import check_tracking
    from ray_app.settings import get_settings
    from ray_app.storage import open_store

    settings = settings or get_settings()
    check_tracking(settings)
    store = open_store(settings=settings)
    store.ensure()
    worker_env = settings.worker_env() | {"DS_ACCELERATOR": "cuda" if cfg.use_gpu else "cpu"}
    if not ray.is_initialized():
        credentials.apply_ray_client_env(settings)
        credentials.export_to_this_process(settings)  # a Ray started here inherits them; never runtime_env
        ray.init(address=settings.ray_address, runtime_env={"env_vars": worker_env}, log_to_driver=True)
    check_resources(cfg)
    run_name = cfg.run_name or f"{kind}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
    done = Setup(cfg.model_copy(update={"run_name": run_name}), settings, store, worker_env)
    return pin_adapter_base(done) if cfg.saves_adapter else done


def pin_adapter_base(setup: Setup) -> Setup:
    """An adapter run trains on, and is published under, the base version its alias names when it starts;
    a name already taken under that version is refused (adapters are immutable, like versions)."""
    from ray_app.registry import get_version

    base = get_version(setup.cfg.model, setup.settings)
    pinned = replace(setup, cfg=setup.cfg.model_copy(update={"model": f"models:/{base.name}/{base.version}"}))
    if setup.store.read_manifest(pinned.model_prefix) is not None:
        where = setup.store.uri(pinned.model_prefix)
        raise ConfigError(f"lora.adapter_name: {base.name}/{base.version} already has an adapter named "
                          f"{pinned.adapter_name!r} ({where}); pick another")  # fmt: skip
    return pinned


def check_rows_fill_a_batch(cfg: SFTConfig, rows: int) -> None:
    """Raise DatasetError unless every worker gets at least one full micro-batch an epoch: with fewer
    rows than ``micro_batch_size`` each, no step could ever run (the loop would spin through epochs)."""
    per_worker = rows // cfg.num_workers
    if per_worker < cfg.micro_batch_size:
        raise DatasetError(
            f"the training data has {rows} rows, {per_worker} for each of num_workers: {cfg.num_workers}, "
            f"fewer than micro_batch_size: {cfg.micro_batch_size}; no step could run "
            "(add data, or lower micro_batch_size or num_workers)"
        )


def start_tracked_run(setup: Setup, kind: str, model_dir: str, data_params: dict[str, Any], parent_run_id=None):
    """Open the run's MLflow run (nested under ``parent_run_id``) with the recipe as params and
    artifacts (``config/KIND.json``, ``config/deepspeed.json``); returns the active run (a context manager)."""
    import mlflow

    from ray_app.registry import configure_tracking

    cfg = setup.cfg
    configure_tracking(setup.settings)
    mlflow.set_experiment(cfg.experiment)
    tags = {"mlflow.parentRunId": parent_run_id} if parent_run_id else None
    active = mlflow.start_run(run_name=cfg.run_name, tags=tags)
    mlflow.log_params(flatten("", cfg.model_dump(), {}))
    mlflow.log_params({"model_dir": model_dir, **data_params})
    mlflow.log_dict(cfg.model_dump(), f"config/{kind}.json")
    mlflow.log_dict(cfg.deepspeed_config(), "config/deepspeed.json")
    mlflow.set_tags({"llmops.base_model": cfg.model or "default", "llmops.train_data": ",".join(cfg.train_data)})
    return active


def flatten(prefix: str, value: Any, out: dict[str, Any]) -> dict[str, Any]:
    if isinstance(value, dict):
        for key, inner in value.items():
            flatten(f"{prefix}.{key}" if prefix else key, inner, out)
    else:
        out[prefix] = json.dumps(value) if isinstance(value, list) else value
    return out


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


def make_trainer(cfg: SFTConfig, train_loop, loop_config: dict[str, Any], train_ds, store, worker_env: dict, callbacks):
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


def fit(trainer, store, run_name: str):
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


def register(cfg: SFTConfig, store, model_prefix: str, run_id: str, eval_loss: float | None, settings):
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


def register_result(setup: Setup, run_id: str, eval_loss: float | None):
    """Tag the active run with its model folder and register it when the recipe names a model (else None);
    an adapter is registered as a tag of its base version instead (and None is returned)."""
    import mlflow

    mlflow.set_tag("llmops.model_uri", setup.store.uri(setup.model_prefix))  # `llmops register` finds it by it
    if setup.cfg.saves_adapter:
        register_adapter(setup, run_id, eval_loss)
        return None
    if not setup.cfg.registered_model:
        return None
    return register(setup.cfg, setup.store, setup.model_prefix, run_id, eval_loss, setup.settings)


def register_adapter(setup: Setup, run_id: str, eval_loss: float | None) -> str:
    """Record the published adapter on its base version (the run that trained it, and its lineage: the
    recipe's ``version_tags``, as a version records them) and on the run; returns the ``model`` clients send
    for it (NAME:ADAPTER)."""
    import mlflow

    from ray_app.registry import tag_version

    base = MODELS_URI.match(setup.cfg.model)
    if setup.store.read_manifest(setup.model_prefix) is None:
        raise RuntimeError(f"training finished but {setup.store.uri(setup.model_prefix)} is incomplete")
    loss = "" if eval_loss is None else f"{eval_loss:.6f}"
    lineage = {"run_id": run_id, "train_data": ",".join(setup.cfg.train_data), "eval_loss": loss,
               **setup.cfg.version_tags}  # fmt: skip
    tags = {run_tag(setup.adapter_name): run_id, lineage_tag(setup.adapter_name): json.dumps(lineage, sort_keys=True)}
    tag_version(base["name"], base["version"], tags, setup.settings)
    mlflow.set_tags({"llmops.adapter": f"{base['name']}/{base['version']}:{setup.adapter_name}",
                     "llmops.adapter_eval_loss": loss, **setup.cfg.version_tags})  # fmt: skip
    return f"{base['name']}:{setup.adapter_name}"

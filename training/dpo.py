"""Preference fine-tuning of a chat model with Ray Train + DeepSpeed: DPO for pairs, KTO for thumbs.

    python -m training.dpo --config training/configs/tiny_dpo_cpu.yaml --set model=PATH
    python -m training.dpo --config ... --set objective=kto            # unpaired thumbs up/down

**Data** (jsonl, local or s3://), one conversation prefix per record, ending with the user's turn:

- DPO: ``{"messages": [...], "chosen": "better answer", "rejected": "worse answer"}``
- KTO: ``{"messages": [...], "completion": "an answer", "desirable": true|false}``

Optional ``weight`` (default 1, at most 100) scales the record's loss: the chat's export
(``ray_app.chat.preferences``) weighs down answers by versions other than the champion;
``model_version`` and ``feedback_ids`` (which served version answered, which ratings) are kept
for lineage and not read here.
Ray Data tokenizes each completion after the chat-templated prefix (only the completion's
tokens are scored; a long prefix loses its oldest tokens first).

**The reference model** costs no second copy where it can be avoided: with ``method: lora``
it is the policy with its adapters off (one forward more per step, no weights more); with
``method: full`` the reference log-probs are computed once before training by Ray Data batch
inference (an actor with the base model; on a GPU in the training's precision when ``use_gpu``)
and travel with the dataset.

**The losses** (:func:`dpo_loss`, :func:`kto_loss`, summed log-probs of the completion tokens):
DPO is ``-log sigmoid(beta * ((pc - rc) - (pr - rr)))``; KTO weighs desirable answers by
``1 - sigmoid(beta * (r - z))`` and undesirable ones by ``1 - sigmoid(beta * (z - r))`` with
``r`` the log-ratio to the reference and ``z`` the batch's KL estimate (mean log-ratio, at least
0, not differentiated). Logged per step: loss, reward accuracy and margin, chosen and rejected
log-probs and rewards, like SFT's throughput, learning rate and gradient norm.

Everything else is SFT's (``training.runtime``): DeepSpeed ZeRO-2/3 and offload from the
config, gloo on CPU and nccl on GPU, signed checkpoints in the store every
``checkpoint_every`` steps, resumption after a lost worker (each step logged once), one
consolidated Hugging Face folder, registered with alias ``challenger``. After training the
held-out ``eval_data`` pairs give the **preference accuracy** (how often the model finds the
chosen completion more likely than the rejected one) of the base model and of the result.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np
from pydantic import Field, model_validator

from training import runtime
from training.config import SFTConfig, cpu_has_bf16, load_config
from training.data import IGNORE_INDEX, ROLES, DatasetError
from training.scoring import completion_logps, completion_tokens

PAIR_SIDES = ("chosen", "rejected")
MAX_WEIGHT = 100.0  # an example may count for at most this many


class PreferenceConfig(SFTConfig):
    """An SFT recipe config plus the preference objective and its strength."""

    objective: Literal["dpo", "kto"] = "dpo"
    beta: float = Field(default=0.1, gt=0, description="how far from the reference the policy may move")
    desirable_weight: float = Field(default=1.0, gt=0, description="KTO: weight of thumbs-up answers")
    undesirable_weight: float = Field(default=1.0, gt=0, description="KTO: weight of thumbs-down answers")
    pack: bool = False
    # A cycle of the same few batches in the same order each epoch stalls preference learning (measured
    # on the tests' pairs: no progress in 40 steps); reshuffled each epoch it learns in 20.
    shuffle_buffer: int = Field(default=1024, ge=0)
    experiment: str = "ray-llmops-preference"

    @model_validator(mode="after")
    def _whole_examples(self) -> PreferenceConfig:
        if self.pack:
            raise ValueError("pack: preference examples are scored whole; set pack: false")
        return self

    @property
    def sides(self) -> tuple[str, ...]:
        """The completions each example holds: chosen and rejected (DPO), or one (KTO)."""
        return PAIR_SIDES if self.objective == "dpo" else ("completion",)


@dataclass
class PreferenceResult(runtime.TrainResult):
    """What a finished preference run produced; its held-out measure is preference accuracy (no eval_loss)."""

    base_preference_accuracy: float | None = None
    preference_accuracy: float | None = None


# --------------------------------------------------------------------------------------
# The objectives: plain torch, unit-tested on their own.
# --------------------------------------------------------------------------------------
def weighted_mean(losses, weights=None):
    """The batch's loss: each example's loss times its weight (1 when ``weights`` is None), averaged."""
    return losses.mean() if weights is None else (losses * weights.to(losses.dtype)).mean()


def dpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta: float, weights=None):
    """DPO's loss over a batch of pairs (each weighted), and what to log (rewards are beta times the log-ratios)."""
    import torch.nn.functional as F

    chosen_reward = beta * (chosen - ref_chosen)
    rejected_reward = beta * (rejected - ref_rejected)
    margin = chosen_reward - rejected_reward
    loss = weighted_mean(-F.logsigmoid(margin), weights)
    margin, chosen_reward, rejected_reward = margin.detach(), chosen_reward.detach(), rejected_reward.detach()
    metrics = {
        "reward_accuracy": float((margin > 0).float().mean()),
        "reward_margin": float(margin.mean()),
        "chosen_reward": float(chosen_reward.mean()),
        "rejected_reward": float(rejected_reward.mean()),
        "chosen_logp": float(chosen.detach().mean()),
        "rejected_logp": float(rejected.detach().mean()),
    }
    return loss, metrics


def kto_loss(logps, ref_logps, desirable, beta: float, desirable_weight: float = 1.0, undesirable_weight: float = 1.0,
             weights=None):  # fmt: skip
    """KTO's loss over a batch of rated completions (``desirable`` 1/0; each weighted), and what to log."""
    import torch

    ratio = logps - ref_logps
    kl = _mean_across_ranks_tensor(ratio.detach().mean()).clamp(min=0)
    good = desirable.bool()
    losses = torch.where(
        good,
        desirable_weight * (1 - torch.sigmoid(beta * (ratio - kl))),
        undesirable_weight * (1 - torch.sigmoid(beta * (kl - ratio))),
    )
    rewards, logps = beta * ratio.detach(), logps.detach()

    def mean_of(values, rows) -> float:  # NaN when the batch has no such row: the step's mean skips it
        return float(values[rows].mean()) if rows.any() else float("nan")

    metrics = {"kl": float(kl), "chosen_reward": mean_of(rewards, good), "chosen_logp": mean_of(logps, good),
               "rejected_reward": mean_of(rewards, ~good), "rejected_logp": mean_of(logps, ~good)}  # fmt: skip
    return weighted_mean(losses, weights), metrics


def _finite_mean_across_ranks(values: list[float]) -> float:
    """The mean of the finite ``values`` of every rank (NaN when none is)."""
    import torch
    import torch.distributed as dist

    finite = [value for value in values if math.isfinite(value)]
    total = torch.tensor([sum(finite), len(finite)], dtype=torch.float64)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(total)
    return float(total[0] / total[1]) if total[1] else float("nan")


def _mean_across_ranks_tensor(value):
    import torch.distributed as dist

    if dist.is_initialized() and dist.get_world_size() > 1:
        value = value.clone()
        dist.all_reduce(value)
        value = value / dist.get_world_size()
    return value


# --------------------------------------------------------------------------------------
# The data: Ray Data tokenizes (and, for full fine-tuning, scores with the reference).
# --------------------------------------------------------------------------------------
def parse_preference(text: str, objective: str) -> dict[str, Any]:
    """One jsonl line as ``{"messages", completions...}``; raises ValueError saying what is wrong."""
    record = json.loads(text)
    messages = record.get("messages") if isinstance(record, dict) else None
    if not isinstance(messages, list) or not messages:
        raise ValueError("expected an object with a non-empty 'messages' list (the conversation so far)")
    for message in messages:
        well_formed = isinstance(message, dict) and isinstance(message.get("content"), str)
        if not well_formed or message.get("role") not in ROLES:
            raise ValueError(f"each message needs a role in {sorted(ROLES)} and a string content: {message!r:.80}")
    if messages[-1]["role"] != "user":
        raise ValueError("the messages must end with the user's turn the completions answer")
    keys = PAIR_SIDES if objective == "dpo" else ("completion",)
    for key in keys:
        if not isinstance(record.get(key), str) or not record[key].strip():
            raise ValueError(f"{objective}: '{key}' must be a non-empty string")
    if objective == "dpo" and record["chosen"] == record["rejected"]:
        raise ValueError("chosen and rejected are the same text")
    if objective == "kto" and not isinstance(record.get("desirable"), bool):
        raise ValueError("kto: 'desirable' must be true or false")
    weight = record.get("weight", 1.0)
    if isinstance(weight, bool) or not isinstance(weight, int | float) or not 0 < weight <= MAX_WEIGHT:
        raise ValueError(f"'weight' must be a number in (0, {MAX_WEIGHT:g}] when given, got {weight!r:.40}")
    prompt = [{"role": m["role"], "content": m["content"]} for m in messages]
    return {"messages": prompt, **{key: record[key] for key in keys}, "desirable": record.get("desirable", True),
            "weight": float(weight)}  # fmt: skip


def tokenize_preferences(batch: dict[str, np.ndarray], model_dir: str, seq_len: int, objective: str):
    """Ray Data map_batches: jsonl lines -> padded ``{side}_ids/_labels/_mask`` rows, ``desirable``, ``error``."""
    from training.data import _tokenizer

    tokenizer = _tokenizer(model_dir)
    sides = PAIR_SIDES if objective == "dpo" else ("completion",)
    rows: list[dict[str, Any]] = []
    for text in batch["text"]:
        if not str(text).strip():
            continue
        row: dict[str, Any] = {"error": "", "desirable": 1, "weight": 1.0}
        try:
            record = parse_preference(str(text), objective)
            row["desirable"], row["weight"] = int(record["desirable"]), record["weight"]
            for side in sides:
                row[side] = completion_tokens(record["messages"], record[side], tokenizer, seq_len)
        except (ValueError, TypeError) as exc:
            row["error"] = f"{exc} :: {str(text)[:120]}"
        rows.append(row)
    out: dict[str, np.ndarray] = {
        "error": np.asarray([row["error"] for row in rows], dtype=str),
        "desirable": np.asarray([row["desirable"] for row in rows], dtype=np.int64),
        "weight": np.asarray([row["weight"] for row in rows], dtype=np.float32),
    }
    for side in sides:
        ids = np.full((len(rows), seq_len), tokenizer.pad_token_id, dtype=np.int64)
        labels = np.full((len(rows), seq_len), IGNORE_INDEX, dtype=np.int64)
        mask = np.zeros((len(rows), seq_len), dtype=np.int64)
        for index, row in enumerate(rows):  # left-padded: every completion ends its row (completion_logps)
            tokens, targets = row.get(side, ([], []))
            ids[index, seq_len - len(tokens) :] = tokens
            labels[index, seq_len - len(targets) :] = targets
            mask[index, seq_len - len(tokens) :] = 1
        out |= {f"{side}_ids": ids, f"{side}_labels": labels, f"{side}_mask": mask}
    return out


class ReferenceScorer:
    """Ray Data actor: the reference model's log-probs of each completion (``ref_{side}``), computed once.

    In the training's precision, so that the policy and its reference agree at the first step: on
    ``cuda`` (``use_gpu``: the actor asks for a GPU) with weights in that dtype; on CPU with fp32
    weights, under bf16 autocast when the training runs so (None: when this CPU has bf16, like
    ``precision: auto`` decides on each worker).
    """

    def __init__(self, model_dir: str, sides: tuple[str, ...], device: str = "cpu", precision: str = "fp32",
                 cpu_autocast: bool | None = False):  # fmt: skip
        import torch
        from transformers import AutoModelForCausalLM

        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)
        self.sides, self.device = sides, device
        self.cpu_autocast = cpu_has_bf16() if cpu_autocast is None else cpu_autocast
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device).eval()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        with torch.no_grad(), runtime.autocast(self.cpu_autocast):
            for side in self.sides:
                ids, mask, labels = (torch.as_tensor(batch[f"{side}_{part}"], device=self.device)
                                     for part in ("ids", "mask", "labels"))  # fmt: skip
                batch[f"ref_{side}"] = completion_logps(self.model, ids, mask, labels).float().cpu().numpy()
        return batch


def scorer_options(cfg: PreferenceConfig, model_dir: str) -> dict[str, Any]:
    """How the ReferenceScorer actor runs: on a GPU in the training's precision when ``use_gpu``, else a CPU."""
    device = "cuda" if cfg.use_gpu else "cpu"
    autocast = None if cfg.precision == "auto" and not cfg.use_gpu else cfg.cpu_autocast  # None: the actor's CPU
    kwargs = {"model_dir": model_dir, "sides": cfg.sides, "device": device, "precision": cfg.weights_dtype,
              "cpu_autocast": autocast}  # fmt: skip
    return {"fn_constructor_kwargs": kwargs, **({"num_gpus": 1} if cfg.use_gpu else {"num_cpus": 1})}


def prepare_preferences(cfg: PreferenceConfig, model_dir: str, settings):
    """The tokenized (and, for full fine-tuning, reference-scored) dataset, materialized; and its counts.

    Raises DatasetError naming the URIs when no record is usable, or too few for a micro-batch per
    worker (both before the reference model is loaded).
    """
    from training.data import read_lines

    try:
        options = {"model_dir": model_dir, "seq_len": cfg.seq_len, "objective": cfg.objective}
        tokenized = (
            read_lines(list(cfg.train_data), settings)
            .map_batches(tokenize_preferences, fn_kwargs=options, batch_size=256, num_cpus=0.5)
            .materialize()
        )
    except (FileNotFoundError, OSError) as exc:
        raise DatasetError(f"cannot read dataset {', '.join(cfg.train_data)}: {exc}") from exc
    bad = tokenized.filter(expr="error != ''").select_columns(["error"])
    skipped, errors = bad.count(), [row["error"] for row in bad.take(5)]
    # Materialized before the scorer starts: streamed together, the scorer's actor holds its CPU while
    # the filter waits for one, and on a small cluster (seen: 2 CPUs, a Serve replica) neither moves.
    good = tokenized.filter(expr="error == ''").drop_columns(["error"]).materialize()
    stats = {"records": good.count(), "skipped": skipped, "skipped_examples": errors}
    if stats["records"] == 0:
        raise DatasetError(f"no usable {cfg.objective} record in {', '.join(cfg.train_data)} "
                           f"({skipped} skipped: {'; '.join(errors[:3]) or 'the files hold no records'})")  # fmt: skip
    runtime.check_rows_fill_a_batch(cfg, stats["records"])  # before the reference model scores anything
    if cfg.method == "full":
        scored = good.map_batches(ReferenceScorer, batch_size=16, concurrency=1, **scorer_options(cfg, model_dir))
        good = scored.materialize()
    return good, stats


# --------------------------------------------------------------------------------------
# The worker loop: runs on every Ray Train worker.
# --------------------------------------------------------------------------------------
def _policy_and_reference(engine, batch, sides: tuple[str, ...], lora: bool):
    """Log-probs of each side's completions under the policy (one forward for all sides) and the reference."""
    import torch

    device = engine.device
    ids = torch.cat([batch[f"{side}_ids"] for side in sides]).to(device)
    mask = torch.cat([batch[f"{side}_mask"] for side in sides]).to(device)
    labels = torch.cat([batch[f"{side}_labels"] for side in sides]).to(device)
    policy = completion_logps(engine, ids, mask, labels)
    if lora:
        with torch.no_grad(), engine.module.disable_adapter():  # the base weights are the reference
            reference = completion_logps(engine, ids, mask, labels)
    else:
        reference = torch.cat([batch[f"ref_{side}"] for side in sides]).to(device)
    return policy.chunk(len(sides)), reference.chunk(len(sides)), int(mask.sum())


def _step_loss(cfg: PreferenceConfig, engine, batch):
    with runtime.autocast(cfg.cpu_autocast):
        policy, reference, tokens = _policy_and_reference(engine, batch, cfg.sides, cfg.method == "lora")
    weights = batch["weight"].to(engine.device) if "weight" in batch else None
    if cfg.objective == "dpo":
        loss, metrics = dpo_loss(policy[0], policy[1], reference[0], reference[1], cfg.beta, weights)
    else:
        loss, metrics = kto_loss(policy[0], reference[0], batch["desirable"].to(engine.device), cfg.beta,
                                 cfg.desirable_weight, cfg.undesirable_weight, weights)  # fmt: skip
    return loss, metrics, tokens


def train_loop(config: dict[str, Any]) -> None:
    """Ray Train worker entry point."""
    import ray.train

    cfg = PreferenceConfig(**config["recipe"])
    world = ray.train.get_context().get_world_size()
    steps_per_epoch = max(1, config["train_rows"] // world // (cfg.micro_batch_size * cfg.grad_accum))
    total_steps = cfg.max_steps or steps_per_epoch * cfg.epochs
    worker = runtime.start_worker(cfg, config, total_steps)
    engine, state = worker.engine, worker.state
    shard = ray.train.get_dataset_shard("train")
    step, epoch = state["global_step"], state["epoch"]
    window: dict[str, list[float]] = {}
    micro, tokens, started = 0, 0, time.perf_counter()
    while step < total_steps and (cfg.max_steps is not None or epoch < cfg.epochs):
        skip = state["batch_in_epoch"] if epoch == state["epoch"] else 0
        for batch_in_epoch, batch in enumerate(runtime.epoch_batches(shard, cfg, epoch), start=1):
            if batch_in_epoch <= skip:
                continue  # the data position of the checkpoint we resumed from
            loss, metrics, counted = _step_loss(cfg, engine, batch)
            engine.backward(loss)
            engine.step()
            for key, value in {"train_loss": float(loss.detach()), **metrics}.items():
                window.setdefault(key, []).append(value)
            micro, tokens = micro + 1, tokens + counted
            if micro < cfg.grad_accum:
                continue
            step += 1
            logged = _step_metrics(worker, window, tokens, time.perf_counter() - started, epoch)
            worker.tracker.log(logged, step=step)
            window, micro, tokens, started = {}, 0, 0, time.perf_counter()
            if step % cfg.checkpoint_every == 0 or step >= total_steps:
                position = {"global_step": step, "epoch": epoch, "batch_in_epoch": batch_in_epoch}
                worker.checkpoint({**worker.state, **position}, {"global_step": step, **logged})
            if step >= total_steps:
                break
        epoch += 1
    runtime.finish_worker(worker, cfg, config)


def _step_metrics(worker, window: dict[str, list[float]], tokens: int, elapsed: float, epoch: int) -> dict:
    """One optimizer step's metrics: each the mean of its finite values over micro-batches and ranks
    (every rank reduces the same keys, in the same order); throughput summed."""
    grad_norm = worker.engine.get_global_grad_norm()
    return {
        **{key: _finite_mean_across_ranks(values) for key, values in sorted(window.items())},
        "learning_rate": worker.scheduler.get_last_lr()[0],
        "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
        "tokens_per_s": runtime.sum_across_ranks(tokens) / max(elapsed, 1e-9),
        "epoch": float(epoch),
    }


# --------------------------------------------------------------------------------------
# The driver: data, tracking, the trainer, evaluation and registration.
# --------------------------------------------------------------------------------------
def preference_accuracy(model_ref: str, uris: list[str], seq_len: int, settings, adapter: str | None = None) -> float:
    """How often ``model_ref`` (with the LoRA ``adapter`` on it, if given) finds the chosen completion of a
    held-out pair more likely than the rejected one."""
    from training.data import read_text_lines
    from training.evaluate import completion_scores

    pairs = []
    for _file, _number, line in read_text_lines(uris, settings):
        try:
            pairs.append(parse_preference(line, "dpo"))
        except ValueError:
            continue
    if not pairs:
        raise DatasetError(f"no preference pair in {', '.join(uris)} to measure preference accuracy on")
    items = [(pair["messages"], pair[side]) for pair in pairs for side in PAIR_SIDES]
    scores = [logp for logp, _tokens in completion_scores(model_ref, items, seq_len, settings, adapter=adapter)]
    return sum(chosen > rejected for chosen, rejected in zip(scores[::2], scores[1::2], strict=True)) / len(pairs)


def run(cfg: PreferenceConfig, settings=None) -> PreferenceResult:
    """Run one preference fine-tuning job on the Ray cluster in settings (or a local one) and register it."""
    import mlflow

    from ray_app.models import resolve_model

    cfg = cfg.model_copy(update={"version_tags": {"training.objective": cfg.objective, **cfg.version_tags}})
    setup = runtime.setup(cfg, settings, cfg.objective)
    cfg, settings = setup.cfg, setup.settings
    model_dir = str(resolve_model(cfg.model, settings))
    train_ds, stats = prepare_preferences(cfg, model_dir, settings)
    data_params = {"data.records": stats["records"], "data.skipped": stats["skipped"], "data.objective": cfg.objective}
    with runtime.start_tracked_run(setup, cfg.objective, model_dir, data_params) as active:
        run_id = active.info.run_id
        loop_config = {"recipe": cfg.model_dump(), "model_dir": model_dir, "mlflow_run_id": run_id,
                       "train_rows": stats["records"], "model_prefix": setup.model_prefix}  # fmt: skip
        trainer = runtime.make_trainer(cfg, train_loop, loop_config, train_ds, setup.store, setup.worker_env, None)
        metrics = runtime.fit(trainer, setup.store, cfg.run_name).metrics or {}
        model_uri = setup.store.uri(setup.model_prefix)
        step = int(metrics.get("global_step", 0))
        before = after = None
        if cfg.eval_data:  # held-out pairs, whichever the objective
            before = preference_accuracy(model_dir, cfg.eval_data, cfg.seq_len, settings)
            model, adapter = setup.trained
            after = preference_accuracy(model, cfg.eval_data, cfg.seq_len, settings, adapter=adapter)
            mlflow.log_metrics({"base_preference_accuracy": before, "preference_accuracy": after}, step=step)
            accuracy = {
                "training.base_preference_accuracy": f"{before:.4f}",
                "training.preference_accuracy": f"{after:.4f}",
            }
            setup.cfg = cfg.model_copy(update={"version_tags": {**cfg.version_tags, **accuracy}})  # the gate reads them
        version = runtime.register_result(setup, run_id, None)
    return PreferenceResult(
        run_name=cfg.run_name,
        mlflow_run_id=run_id,
        model_uri=model_uri,
        registered_model=cfg.registered_model,
        registered_version=version.version if version else None,
        global_step=step,
        final_loss=metrics.get("train_loss"),
        eval_loss=None,
        data=stats,
        adapter=setup.adapter,
        base_preference_accuracy=before,
        preference_accuracy=after,
    )


def main(argv: list[str] | None = None) -> int:
    """``python -m training.dpo --config FILE [--set key=value ...]``."""
    parser = argparse.ArgumentParser(prog="python -m training.dpo", description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="YAML recipe config")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    from ray_app.orchestration.ray_jobs import emit_result
    from ray_app.registry import RegistryError
    from ray_app.storage import StoreError

    cfg = load_config(args.config, args.overrides, schema=PreferenceConfig)
    try:
        result = run(cfg)
    except (RegistryError, StoreError, DatasetError) as exc:  # a service down, bad data: one line, no traceback
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 1
    print(json.dumps(asdict(result), indent=2, default=str))
    emit_result(asdict(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())

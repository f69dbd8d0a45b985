"""The retraining DAG's steps, as Ray job entrypoints (they run on the cluster, next to the data).

    python -m ray_app.orchestration.pipeline export-feedback --config C [--set k=v] --run-key K --date D
                                                       [--objective auto|sft|dpo|kto]
    python -m training.sft --config C [--set k=v] ...         # train: the recipe export chose (or training.dpo)
    python -m ray_app.orchestration.pipeline evaluate --config C [--set k=v] --version V
    python -m ray_app.orchestration.pipeline promote  --config C [--set k=v] --version V [--min-improvement M]
                                                       [--canary-share S]
    python -m ray_app.orchestration.pipeline rollout  --config C [--set k=v] --version V [--canary-window-s W]

Each step reads the same recipe config as training (registered model, datasets), is
idempotent (re-running it gives the same outcome and writes the same keys), records what it
did in MLflow, and prints one ``LLMOPS_RESULT {json}`` line that the Airflow operator
returns as the task's XCom.

**Which feedback becomes training data**: a thumbs-up answer, with the conversation before it;
and a thumbs-down answer whose comment starts with ``correction:`` - the text after the
prefix replaces the answer - once a reviewer approved it or its author is trusted (the policy
is ``ray_app.chat.review``). Other comments are kept out (a complaint is not an answer).
The same ratings, thumbs-down included, become preference pairs and rated answers
(``ray_app.chat.preferences``); the export picks SFT, DPO or KTO (:func:`choose_objective`) and
the train step runs that recipe, starting DPO/KTO from the champion whose answers were rated.
Every version records its lineage: ``training.objective``, ``training.dataset``,
``training.feedback`` (counts by kind) and ``feedback_until``.

**"New" feedback** is feedback answered (or approved) after the newest ``feedback_until`` tag
among the registered model's versions: each trained version records up to when its data
reached, so a rejected candidate does not make the next run retrain on nothing new.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from ray_app import promotion
from ray_app.orchestration.loop_metrics import count_step
from ray_app.orchestration.ray_jobs import emit_result
from ray_app.settings import Settings, get_settings
from training.config import load_config

FEEDBACK_UNTIL_TAG = "feedback_until"
PIPELINE_ACTOR = "pipeline promote step (Ray job)"
ROLLOUT_ACTOR = "pipeline rollout step (Ray job)"


class PipelineError(RuntimeError):
    """A step cannot do what it was asked; the message says why."""


# --- export_feedback ------------------------------------------------------------------------
def feedback_examples(records, policy) -> list[tuple[str, dict]]:
    """(ready_at, SFT example) for each rating the review ``policy`` lets train that has an answer to learn."""
    from ray_app.chat.review import ready_at, training_example

    usable = [(ready_at(record), training_example(record)) for record in records if policy.trains(record)]
    return [(ready, example) for ready, example in usable if example is not None]


def feedback_watermark(name: str | None, settings: Settings) -> str | None:
    """The newest ``feedback_until`` among the versions of ``name``: what earlier trainings already saw."""
    if not name:
        return None
    from mlflow.exceptions import MlflowException

    from ray_app.registry import RegistryError, client

    mlflow = client(settings)
    try:
        versions = mlflow.search_model_versions(f"name='{name}'")
    except MlflowException as exc:  # never "no watermark": that would count all feedback as new
        raise RegistryError(f"cannot read the feedback watermark of {name} from MLflow at "
                            f"{mlflow.tracking_uri}: {exc.message}") from None  # fmt: skip
    marks = [v.tags.get(FEEDBACK_UNTIL_TAG) for v in versions if v.tags.get(FEEDBACK_UNTIL_TAG)]
    return max(marks) if marks else None


def chat_preferences(records, policy, name: str | None, settings: Settings):
    """The chat's preference pairs and thumbs (``ray_app.chat.preferences``), weighed against ``name``'s champion."""
    from ray_app.chat.preferences import preference_data

    champion = promotion.champion_of(name, settings) if name else None
    current = f"{name}/{champion.version}" if champion else None
    return preference_data(records, policy, current, settings.preference_other_version_weight), current


OBJECTIVES = ("auto", "sft", "dpo", "kto")
# What each objective trains on: the export's key for its file, and what its examples are called.
TRAINS_ON = {"sft": ("dataset_uri", "feedback example(s)"), "dpo": ("preference_data_uri", "preference pair(s)"),
             "kto": ("thumbs_data_uri", "rated answer(s)")}  # fmt: skip


def choose_objective(requested: str, new: dict[str, int], minimum: int) -> tuple[str, str]:
    """(objective, why): ``requested``; for ``auto``, DPO when the new preference pairs reach ``minimum``
    (at least one), else SFT."""
    if requested != "auto":
        return requested, f"{requested} as configured"
    if new["dpo"] and new["dpo"] >= minimum:
        return "dpo", f"auto: {new['dpo']} new preference pair(s), at least {minimum}"
    return "sft", f"auto: {new['dpo']} new preference pair(s), fewer than {max(minimum, 1)}"


def export_feedback(cfg, settings: Settings, run_key: str, date: str, min_new_examples: int,
                    objective: str = "auto") -> dict[str, Any]:  # fmt: skip
    """Write base data + every usable feedback example to ``datasets/retrain/DATE/RUN_KEY/`` in the store,
    and choose what the train step runs (``objective``: see :func:`choose_objective`).

    Beside ``train.jsonl`` (SFT): ``preferences.jsonl`` (DPO pairs) and ``thumbs.jsonl`` (KTO)
    from the same reviewed ratings, when there are any. The run is skipped when the chosen
    objective has fewer than ``min_new_examples`` new examples.
    """
    from ray_app.chat.feedback import chat_database_missing, database_label, read_feedback
    from ray_app.chat.review import ReviewPolicy

    watermark = feedback_watermark(cfg.registered_model, settings)  # first: MLflow down fails before any work
    records = read_feedback(settings.chat_database_url)
    policy = ReviewPolicy.from_settings(settings)
    examples = feedback_examples(records, policy)
    preferences, current = chat_preferences(records, policy, cfg.registered_model, settings)
    fresh = preferences.new_since(watermark)
    new = {"sft": sum(1 for ready, _ in examples if watermark is None or ready > watermark),
           "dpo": len(fresh.pairs), "kto": len(fresh.thumbs)}  # fmt: skip
    chosen, why = choose_objective(objective, new, min_new_examples)
    summary: dict[str, Any] = {
        "ratings": len(records), "feedback_examples": len(examples), "new_examples": new["sft"],
        "since": watermark, "min_new_examples": min_new_examples, "review": policy.counts(records),
        "preferences": {**preferences.counts(), "new_pairs": new["dpo"], "new_thumbs": new["kto"],
                        "current_version": current},
        "objective": chosen, "objective_reason": why,
    }  # fmt: skip
    if chat_database_missing(settings.chat_database_url):
        summary["note"] = f"no chat database at {database_label(settings.chat_database_url)} yet: no feedback"
        print(summary["note"], flush=True)
    usable = {"sft": examples, "dpo": preferences.pairs, "kto": preferences.thumbs}[chosen]
    if new[chosen] < min_new_examples or (chosen != "sft" and not usable):
        since = f" since {watermark}" if watermark else ""
        reason = f"{new[chosen]} new {TRAINS_ON[chosen][1]}{since}, fewer than the {max(min_new_examples, 1)} needed"
        return {**summary, "skip": True, "reason": reason}
    # No feedback at all (min_new_examples 0: retrain on the recipe's data) keeps the watermark where it was.
    ready = [when for when, _ in examples] if chosen == "sft" else [example["ready_at"] for example in usable]
    summary["feedback_until"] = max(ready, default=watermark or "")
    uris = _write_export(cfg, settings, f"datasets/retrain/{date}/{run_key}", [e for _, e in examples], preferences,
                         summary)  # fmt: skip
    return {**summary, "skip": False, **uris, **_training_plan(chosen, summary, uris, cfg.registered_model, current)}


def _training_plan(objective: str, summary: dict[str, Any], uris: dict[str, str], name: str | None,
                   current: str | None) -> dict:  # fmt: skip
    """The recipe module the train step runs and its overrides: the data, the lineage tags of the version it
    registers, and for DPO/KTO the registered model this step read (one name for every step) and the
    champion's version to start from (its answers are the on-policy ones)."""
    data = summary["dataset_uri"] if objective == "sft" else uris[TRAINS_ON[objective][0]]
    if objective == "sft":
        counts = {"feedback_examples": summary["feedback_examples"], "base_examples": summary["base_examples"]}
    else:
        counts = {k: v for k, v in summary["preferences"].items() if k != "current_version"}
    tags = {"training.objective": objective, "training.dataset": data,
            "training.feedback": json.dumps(counts, sort_keys=True)}  # fmt: skip
    if summary["feedback_until"]:
        tags[FEEDBACK_UNTIL_TAG] = summary["feedback_until"]
    # What the train step passes to the recipe: the data, and the lineage (with the watermark) to record.
    overrides = [f"train_data={data}", "version_tags=" + json.dumps(tags)]
    if objective != "sft":
        overrides += [f"objective={objective}", f"registered_model={name}"] if name else [f"objective={objective}"]
        if current:
            overrides.append(f"model=models:/{current}")
    return {"recipe": "sft" if objective == "sft" else "dpo", "train_overrides": overrides}


def _write_export(cfg, settings: Settings, prefix: str, examples: list[dict], preferences, meta: dict) -> dict:
    """Upload the export's files under ``prefix``; ``meta`` gains ``base_examples`` and ``dataset_uri``.

    Returns the preference files' URIs (``preference_data_uri``, ``thumbs_data_uri``) when there
    is preference data.
    """
    from ray_app.storage import open_store
    from training.data import read_records

    base = read_records(list(cfg.train_data), settings)
    store = open_store(settings=settings)
    store.ensure()
    files = {"train.jsonl": [json.dumps({"messages": messages}) for messages in base]
             + [json.dumps(example) for example in examples]}  # fmt: skip
    uris = {}
    for key, file, rows in (("preference_data_uri", "preferences.jsonl", preferences.pairs),
                            ("thumbs_data_uri", "thumbs.jsonl", preferences.thumbs)):  # fmt: skip
        if rows:
            files[file], uris[key] = [json.dumps(row) for row in rows], store.uri(f"{prefix}/{file}")
    meta.update(base_examples=len(base), dataset_uri=store.uri(f"{prefix}/train.jsonl"))
    with tempfile.TemporaryDirectory() as folder:
        for file, lines in files.items():
            (Path(folder) / file).write_text("\n".join(lines) + "\n")
        (Path(folder) / "export.json").write_text(json.dumps(
            {**meta, "base_data": list(cfg.train_data), **uris,
             "exported_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}, indent=2))  # fmt: skip
        store.upload_dir(folder, prefix, progress=False)
    return uris


# --- evaluate / promote / rollout (the policy is ray_app.promotion) -------------------------
def _registered_name(cfg) -> str:
    if not cfg.registered_model:
        raise PipelineError("the config has no registered_model: nothing to evaluate, promote or roll out")
    return cfg.registered_model


def evaluate(cfg, settings: Settings, version: str) -> dict[str, Any]:
    """Held-out loss of candidate ``version`` and of the current champion (or the base model when none), and
    both scored on the chat's replay and regression cases."""
    result = promotion.evaluate(cfg, settings, version)
    return {
        "name": result.name, "candidate_version": result.candidate_version, "candidate_loss": result.candidate_loss,
        "champion_version": result.champion_version, "champion_ref": result.reference,
        "champion_loss": result.reference_loss, "eval_data": result.eval_data, "candidate_samples": result.samples,
        "cases": dataclasses.asdict(result.cases),  # replayed corrections and the regression set
    }  # fmt: skip


def promote(cfg, settings: Settings, version: str, min_improvement: float | None,
            canary_share: float = 0.0) -> dict[str, Any]:  # fmt: skip
    """Move ``champion`` to ``version`` only if the offline gate passes it (``ray_app.promotion.decide``).

    With ``canary_share`` > 0 a winner is first served as a canary beside the champion; the
    rollout step waits for its verdict.
    """
    return promotion.decide(cfg, settings, version, min_improvement, actor=PIPELINE_ACTOR, canary_share=canary_share)


def rollout(cfg, settings: Settings, version: str, canary_window_s: float | None = None) -> dict[str, Any]:
    """See ``version`` through: judge its canary until promoted or rolled back, then check Serve runs the champion.

    A canary is judged every ``judge_interval`` (``ray_app.promotion.await_canary``, window
    ``canary_window_s`` or settings.canary_window_s): a rolled-back canary ends the step with
    ``decision: rolled_back`` (the champion stays; a retried step finds that on the version).
    A promoted version (now or by the promote step): the apps that serve ``models:/NAME@champion``
    must run it; any that do not (a manual redeploy in between, say) are re-rolled; Serve
    unreachable fails the step.
    """
    from ray_app.registry import get_version
    from ray_app.serving.rollout import canary_versions, roll_serve_apps, running_config

    name = _registered_name(cfg)
    if version in canary_versions(running_config(settings), name):
        policy = promotion.CanaryPolicy.from_settings(settings)
        if canary_window_s:
            policy = dataclasses.replace(policy, window_s=canary_window_s)
        verdict = promotion.await_canary(name, version, settings, policy, judge_interval(policy.window_s),
                                         actor=ROLLOUT_ACTOR)  # fmt: skip
        if verdict.action == "rollback":
            return {"name": name, "version": version, "decision": "rolled_back", "reason": verdict.reason,
                    "evidence": verdict.evidence}  # fmt: skip
    tags = get_version(f"models:/{name}/{version}", settings).tags
    if tags.get("canary") == "rolled_back":
        return {"name": name, "version": version, "decision": "rolled_back", "reason": tags.get("canary.reason", "")}
    champion = promotion.champion_of(name, settings)
    if champion is None or champion.version != version:
        current = champion.version if champion else "none"
        raise PipelineError(f"version {version} is neither the champion of {name} (champion: {current}) nor its "
                            "canary: nothing to roll out")  # fmt: skip
    apps = roll_serve_apps(name, version, settings)
    return {"name": name, "version": version, "decision": "promoted", "rolled_apps": apps,
            "canary": tags.get("canary", "none"),
            "note": "" if apps else f"no app needed rolling: those serving models:/{name}@champion run "
                                    f"version {version}"}  # fmt: skip


def judge_interval(window_s: float) -> float:
    """How often a canary is judged: a tenth of its window, between 5 s and a minute."""
    return min(60.0, max(5.0, window_s / 10))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m ray_app.orchestration.pipeline", description=__doc__.splitlines()[0]
    )
    parser.add_argument("step", choices=["export-feedback", "evaluate", "promote", "rollout"])
    parser.add_argument("--config", required=True, help="the training recipe config (YAML)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--run-key", default="manual", help="export-feedback: names the dataset folder")
    parser.add_argument("--date", default=time.strftime("%Y-%m-%d", time.gmtime()), help="export-feedback: YYYY-MM-DD")
    parser.add_argument("--min-new-examples", type=int, default=1)
    parser.add_argument("--objective", choices=OBJECTIVES, default=None,
                        help="export-feedback: what to train (default: retrain_objective)")  # fmt: skip
    parser.add_argument("--version", help="evaluate/promote/rollout: the candidate's registry version")
    parser.add_argument(
        "--min-improvement",
        type=float,
        default=None,
        help="promote: fraction the loss must drop (default: promotion_min_improvement)",
    )
    parser.add_argument("--canary-share", type=float, default=None, metavar="FRACTION",
                        help="promote: serve a winner to this share of conversations first (default: canary_share; "
                        "0: promote at once)")  # fmt: skip
    parser.add_argument("--canary-window-s", type=float, default=None, help="rollout: how long a canary is judged "
                        "before promotion (default: canary_window_s)")  # fmt: skip
    args = parser.parse_args(argv)
    if args.canary_share is not None and not 0 <= args.canary_share < 1:
        parser.error(f"--canary-share: {args.canary_share} is not a fraction in [0, 1)")
    if args.canary_window_s is not None and args.canary_window_s <= 0:
        parser.error(f"--canary-window-s: {args.canary_window_s} is not a positive number of seconds")

    if args.step != "export-feedback" and not args.version:
        parser.error(f"{args.step} needs --version")
    cfg = result = None
    try:
        cfg = load_config(args.config, args.overrides)
        result = run_step(args, cfg)
        emit_result(result)
    except _expected_failures() as exc:  # one line naming the service, not a traceback
        print(f"error: {args.step}: {exc}", file=sys.stderr, flush=True)
        return 1
    finally:
        model = cfg.registered_model if cfg is not None and cfg.registered_model else Path(args.config).stem
        count_step(model, args.step, result)
    return 0


def run_step(args: argparse.Namespace, cfg) -> dict[str, Any]:
    settings = get_settings()
    if args.step == "export-feedback":
        objective = args.objective or settings.retrain_objective
        return export_feedback(cfg, settings, args.run_key, args.date, args.min_new_examples, objective)
    if args.step == "evaluate":
        return evaluate(cfg, settings, args.version)
    if args.step == "promote":
        share = settings.canary_share if args.canary_share is None else args.canary_share
        return promote(cfg, settings, args.version, args.min_improvement, share)
    return rollout(cfg, settings, args.version, args.canary_window_s)


def _expected_failures() -> tuple[type[BaseException], ...]:
    """Failures whose message says everything (a service down, a refused step): no traceback for these."""
    from ray_app.chat.feedback import ChatDatabaseError
    from ray_app.models import ModelResolutionError
    from ray_app.registry import RegistryError
    from ray_app.serving.rollout import ServeError
    from ray_app.storage import StoreError

    return (PipelineError, promotion.PromotionError, ChatDatabaseError, RegistryError, StoreError, ServeError,
            ModelResolutionError)  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())

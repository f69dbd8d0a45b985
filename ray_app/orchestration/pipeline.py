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
import hashlib
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
ADAPTER_ALIAS_TAG = "training.adapter_alias"  # in an adapter's lineage: the alias whose line trained it
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


def feedback_watermark(name: str | None, settings: Settings, line: AdapterLine | None = None) -> str | None:
    """The newest ``feedback_until`` among the versions of ``name``: what earlier trainings already saw; for
    an adapter ``line``, among the adapters trained for its alias on its base version (their lineage)."""
    if not name:
        return None
    if line is not None:
        marks = [lineage.get(FEEDBACK_UNTIL_TAG) for lineage in line.lineages.values()
                 if lineage.get(ADAPTER_ALIAS_TAG) == line.alias]  # fmt: skip
        return max(filter(None, marks), default=None)
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


def chat_preferences(records, policy, name: str | None, settings: Settings, line: AdapterLine | None = None):
    """The chat's preference pairs and thumbs (``ray_app.chat.preferences``), weighed against what answers now:
    ``name``'s champion, or for an adapter ``line`` the adapter its alias names on it (its label)."""
    from ray_app.chat.preferences import preference_data

    if line is not None:
        current = f"{name}/{line.version}" + (f":{line.adapter}" if line.adapter else "")
    else:
        champion = promotion.champion_of(name, settings) if name else None
        current = f"{name}/{champion.version}" if champion else None
    return preference_data(records, policy, current, settings.preference_other_version_weight), current


@dataclasses.dataclass(frozen=True)
class AdapterLine:
    """Retraining ``NAME:ALIAS``: a LoRA adapter of the champion ``version``, where ``adapter`` answers now."""

    alias: str
    version: str
    adapter: str | None
    lineages: dict[str, dict[str, str]]  # of the version's adapters (``ray_app.adapters.lineages``)

    @classmethod
    def of(cls, name: str | None, alias: str, settings: Settings) -> AdapterLine:
        """The line of ``NAME:ALIAS`` as the registry records it (no Serve needed); PipelineError without a champion."""
        from ray_app.adapters import ALIAS_TAG, check_adapter_name, lineages, tagged

        try:
            check_adapter_name(alias)
        except ValueError as exc:
            raise PipelineError(f"adapter_alias: {exc}") from None
        champion = promotion.champion_of(name, settings) if name else None
        if champion is None:
            raise PipelineError(f"adapter_alias {alias!r}: an adapter is trained on the champion of "
                                f"registered_model ({name or 'none'}), and there is none yet")  # fmt: skip
        return cls(alias, champion.version, tagged(champion.tags, ALIAS_TAG).get(alias), lineages(champion.tags))

    def adapter_name(self, run_key: str, date: str) -> str:
        """The new adapter's name: the alias, the day and the run (``ALIAS-YYYYMMDD-<hash of run>``)."""
        digest = hashlib.sha256(run_key.encode()).hexdigest()[:6]
        return f"{self.alias[:48]}-{date.replace('-', '')}-{digest}"


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
                    objective: str = "auto", adapter_alias: str | None = None) -> dict[str, Any]:  # fmt: skip
    """Write base data + every usable feedback example to ``datasets/retrain/DATE/RUN_KEY/`` in the store,
    and choose what the train step runs (``objective``: see :func:`choose_objective`).

    Beside ``train.jsonl`` (SFT): ``preferences.jsonl`` (DPO pairs) and ``thumbs.jsonl`` (KTO)
    from the same reviewed ratings, when there are any. The run is skipped when the chosen
    objective has fewer than ``min_new_examples`` new examples. With ``adapter_alias`` the run trains
    a LoRA adapter of the champion for ``NAME:ALIAS`` instead of a version (:class:`AdapterLine`).
    """
    from ray_app.chat.feedback import chat_database_missing, database_label, read_feedback
    from ray_app.chat.review import ReviewPolicy

    name = cfg.registered_model
    line = AdapterLine.of(name, adapter_alias, settings) if adapter_alias else None
    watermark = feedback_watermark(name, settings, line)  # first: MLflow down fails before any work
    records = read_feedback(settings.chat_database_url)
    policy = ReviewPolicy.from_settings(settings)
    examples = feedback_examples(records, policy)
    preferences, current = chat_preferences(records, policy, name, settings, line)
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
    if line is not None:
        summary.update(
            adapter_alias=line.alias, base_version=line.version, adapter_name=line.adapter_name(run_key, date)
        )
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
    return {**summary, "skip": False, **uris, **_training_plan(chosen, summary, uris, name, current, line)}


def _training_plan(objective: str, summary: dict[str, Any], uris: dict[str, str], name: str | None,
                   current: str | None, line: AdapterLine | None = None) -> dict:  # fmt: skip
    """The recipe module the train step runs and its overrides: the data, the lineage tags of the version it
    registers, and for DPO/KTO the registered model this step read (one name for every step) and the
    champion's version to start from (its answers are the on-policy ones). For an adapter ``line``: LoRA on
    the champion version, saved as the adapter the export named, its lineage naming the alias (what the
    line's watermark reads)."""
    data = summary["dataset_uri"] if objective == "sft" else uris[TRAINS_ON[objective][0]]
    if objective == "sft":
        counts = {"feedback_examples": summary["feedback_examples"], "base_examples": summary["base_examples"]}
    else:
        counts = {k: v for k, v in summary["preferences"].items() if k != "current_version"}
    tags = {"training.objective": objective, "training.dataset": data,
            "training.feedback": json.dumps(counts, sort_keys=True)}  # fmt: skip
    if summary["feedback_until"]:
        tags[FEEDBACK_UNTIL_TAG] = summary["feedback_until"]
    if line is not None:
        tags[ADAPTER_ALIAS_TAG] = line.alias
    # What the train step passes to the recipe: the data, and the lineage (with the watermark) to record.
    overrides = [f"train_data={data}", "version_tags=" + json.dumps(tags)]
    if objective != "sft":
        overrides += [f"objective={objective}", f"registered_model={name}"] if name else [f"objective={objective}"]
    if line is not None:
        overrides += ["method=lora", "lora.save=adapter", f"lora.adapter_name={summary['adapter_name']}",
                      f"model=models:/{name}/{line.version}"]  # fmt: skip
    elif objective != "sft" and current:
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
        policy = _canary_policy(settings, canary_window_s)
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


def rollout_adapter(cfg, settings: Settings, alias: str, adapter: str,
                    canary_window_s: float | None = None) -> dict[str, Any]:  # fmt: skip
    """:func:`rollout` for an adapter line: judge ``adapter`` while it runs as the canary of ``NAME:ALIAS``, until
    promoted or rolled back; then check the alias names it. Nothing to re-roll: a fresh deploy starts from
    the alias tag the promotion moved."""
    from ray_app.registry import get_version
    from ray_app.serving.adapter_rollout import CANARY_TAG, adapter_apps, adapter_canaries, current_adapter
    from ray_app.serving.rollout import running_config

    name = _registered_name(cfg)
    result = {"name": name, "alias": alias, "adapter": adapter}
    if adapter in adapter_canaries(running_config(settings), name).get(alias, ()):
        policy = _canary_policy(settings, canary_window_s)
        every = judge_interval(policy.window_s)
        verdict = promotion.await_adapter_canary(name, alias, adapter, settings, policy, every, actor=ROLLOUT_ACTOR)
        if verdict.action == "rollback":
            return {**result, "decision": "rolled_back", "reason": verdict.reason, "evidence": verdict.evidence}
    champion = get_version(f"models:/{name}@champion", settings)
    key = f"{CANARY_TAG}{alias}"
    if champion.tags.get(key) == "rolled_back" and champion.tags.get(f"{key}.adapter") == adapter:
        return {**result, "decision": "rolled_back", "reason": champion.tags.get(f"{key}.reason", "")}
    config = running_config(settings)  # after the verdict: what Serve runs now, read once
    current = current_adapter(name, alias, settings, champion.version, config)
    if current != adapter:
        raise PipelineError(f"adapter {adapter!r} is neither what {name}:{alias} answers with ({current or 'none'}) "
                            "nor its canary: nothing to roll out")  # fmt: skip
    return {**result, "decision": "promoted", "version": champion.version, "apps": adapter_apps(config, name)}


def _canary_policy(settings: Settings, window_s: float | None) -> promotion.CanaryPolicy:
    policy = promotion.CanaryPolicy.from_settings(settings)
    return dataclasses.replace(policy, window_s=window_s) if window_s else policy


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
        "--adapter-alias",
        default=None,
        metavar="ALIAS",
        help="export-feedback: train a LoRA adapter of the champion for NAME:ALIAS (default: "
        "retrain_adapter_alias; empty: a version); evaluate/promote/rollout: the alias of --adapter",
    )
    parser.add_argument("--adapter", help="evaluate/promote/rollout: the candidate adapter of the champion "
                        "(with --adapter-alias), instead of --version")  # fmt: skip
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

    if args.step != "export-feedback" and not (args.version or (args.adapter and args.adapter_alias)):
        parser.error(f"{args.step} needs --version, or --adapter with --adapter-alias")
    if args.adapter and args.version:
        parser.error(f"{args.step}: give --version or --adapter, not both")
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
        alias = settings.retrain_adapter_alias if args.adapter_alias is None else args.adapter_alias
        return export_feedback(cfg, settings, args.run_key, args.date, args.min_new_examples, objective, alias or None)
    share = settings.canary_share if args.canary_share is None else args.canary_share
    if args.adapter:
        return _adapter_step(args, cfg, settings, share)
    if args.step == "evaluate":
        return evaluate(cfg, settings, args.version)
    if args.step == "promote":
        return promote(cfg, settings, args.version, args.min_improvement, share)
    return rollout(cfg, settings, args.version, args.canary_window_s)


def _adapter_step(args: argparse.Namespace, cfg, settings: Settings, share: float) -> dict[str, Any]:
    """evaluate/promote/rollout of candidate ``--adapter`` for ``NAME:ALIAS`` (``--adapter-alias``)."""
    name, alias, adapter = _registered_name(cfg), args.adapter_alias, args.adapter
    try:
        if args.step == "evaluate":
            return promotion.evaluate_adapter(cfg, settings, name, alias, adapter)
        if args.step == "promote":
            return promotion.decide_adapter(settings, name, alias, adapter, args.min_improvement, PIPELINE_ACTOR, share)
    except ValueError as exc:  # a bad name, or an adapter not stored for the champion (it moved since training)
        raise PipelineError(str(exc)) from None
    return rollout_adapter(cfg, settings, alias, adapter, args.canary_window_s)


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

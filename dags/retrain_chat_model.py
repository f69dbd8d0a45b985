"""Retrain the chat model from the chat's feedback on Ray; promote it only when it is better.

export_feedback -> enough_new_data -> train -> evaluate -> promote -> gate_passed -> rollout

Every step that touches data or models is a Ray job (``RayJobOperator``, connection
``ray_default`` = the Ray dashboard URL): the Airflow side needs no torch and no access to the
store, MLflow or the chat database. Each job prints its result, which becomes the task's XCom:

- export_feedback: thumbs-up answers and approved ``correction:`` comments since the last training,
  merged with the recipe's base data into ``<store>/datasets/retrain/<date>/<run>/train.jsonl``,
  and beside it the preference pairs and rated answers from the same ratings; it chooses the
  objective, and the run is skipped (not failed) when that objective has fewer than
  ``min_new_examples`` new examples.
- train: the recipe export chose (``objective``: ``auto`` = DPO on the preference pairs when enough
  are new, else SFT; or ``sft``/``dpo``/``kto``): ``python -m training.sft`` with ``config``, or
  ``python -m training.dpo`` with ``preference_config`` starting from the champion whose answers
  were rated; registers version N (alias challenger) with its lineage tags.
- evaluate: held-out loss of version N and of the current champion, tagged on version N.
- promote: the offline gate (``ray_app.promotion``): N wins only if its loss is lower by
  ``min_improvement`` (a fraction). A winner is served as a **canary** beside the champion to
  ``canary_share`` of the conversations (sticky per conversation); with ``canary_share`` 0, or
  when no Serve app serves the champion (no traffic to judge), it is promoted at once,
  atomically (Serve runs N before the alias moves). Every decision is tagged on N.
- rollout: waits (deferred: the Ray job judges, the task holds no worker slot) for the canary's
  verdict: live error ratio and TTFT p95 from Prometheus and the chat's thumbs-down rate per
  version, judged every ``canary_window_s``/10 (5-60 s); a hard failure or worse feedback rolls
  it back at once (the champion stays), a canary that held up for ``canary_window_s`` is
  promoted (alias moves, all traffic, old replicas drain). Ends with ``decision`` promoted or
  rolled_back; then checks that the apps serving ``models:/NAME@champion`` run the champion.

**An adapter line** (``adapter_alias``, or ``LLMOPS_RETRAIN_ADAPTER_ALIAS``): the same loop retrains
a LoRA adapter of the champion for ``model: NAME:ALIAS`` instead of a whole version: train publishes
it beside the champion's other adapters (its lineage and ``feedback_until`` recorded on the version;
new feedback is counted from the alias's last adapter), evaluate compares the champion with it to the
champion with the adapter the alias names now, promote moves the alias (or starts the adapter as the
alias's canary), rollout judges that canary. No replica restarts: adapters load on first use.

Schedule, config and thresholds come from settings (``LLMOPS_RETRAIN_*``, ``LLMOPS_CANARY_*``);
a manual run can override recipe, margins, canary share and window with params. Module level
imports nothing heavy: parsing stays well under 2 s.
"""

from __future__ import annotations

import re
import shlex
from datetime import timedelta

import pendulum
from airflow.sdk import DAG, Param, task

from ray_app.orchestration.operators import RayJobOperator
from ray_app.settings import get_settings

settings = get_settings()


def _slug(value: object) -> str:
    return re.sub(r"[^A-Za-z0-9_-]+", "-", str(value)).strip("-")[:80]


def _recipe(name: object) -> str:
    """The training module for an export's ``recipe``: ``dpo`` (DPO and KTO), anything else ``sft``."""
    return "dpo" if name == "dpo" else "sft"


def _day(run_after: object) -> str:
    return run_after.strftime("%Y-%m-%d") if hasattr(run_after, "strftime") else str(run_after)[:10]


PIPELINE = "python -m ray_app.orchestration.pipeline"
OVERRIDES = "{% for o in params.overrides %} --set {{ o | shq }}{% endfor %}"
RECIPE = "--config {{ params.config | shq }}" + OVERRIDES
# The train step runs what export_feedback chose: SFT with `config`, or DPO/KTO with `preference_config`.
TRAIN = (
    "{% set export = ti.xcom_pull(task_ids='export_feedback') %}{% set recipe = export['recipe'] | recipe %}"
    "python -m training.{{ recipe }} --config {{ (params.preference_config if recipe == 'dpo' else params.config)"
    " | shq }}" + OVERRIDES + "{% for o in export['train_overrides'] %} --set {{ o | shq }}{% endfor %}"
    " --set run_name=retrain-{{ run_id | slug }}"
    # An adapter's name is never reused: a retried train step (the first try may have published it) takes another.
    "{% if export.get('adapter_name') and ti.try_number > 1 %}"
    " --set lora.adapter_name={{ export['adapter_name'] }}-try{{ ti.try_number }}{% endif %}"
)
MARGIN = "{{ params.min_improvement }}"
# What evaluate, promote and rollout decide on: the version train registered, or the adapter it published.
CANDIDATE = (
    "{% set trained = ti.xcom_pull(task_ids='train') %}{% if trained.get('adapter') %}"
    "--adapter {{ trained['adapter'] | shq }} --adapter-alias "
    "{{ ti.xcom_pull(task_ids='export_feedback')['adapter_alias'] | shq }}"
    "{% else %}--version {{ trained['registered_version'] }}{% endif %}"
)
WINDOW = "{{ params.canary_window_s }}"
MAX_CANARY_WINDOW_S = 24 * 3600

with DAG(
    dag_id="retrain_chat_model",
    description="feedback -> Ray job fine-tune -> evaluate vs champion -> promote if better -> Serve rollout",
    schedule=settings.retrain_schedule,
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,  # one candidate at a time: promote checks the champion it was evaluated against
    default_args={"retries": 2, "retry_delay": timedelta(minutes=1), "execution_timeout": timedelta(hours=1)},
    params={
        "config": Param(settings.retrain_config, type="string", description="training recipe (YAML)"),
        "overrides": Param([], type="array", description="recipe overrides, key=value (as --set)"),
        "preference_config": Param(
            settings.retrain_preference_config,
            type="string",
            description="DPO/KTO recipe (YAML), when the export chooses one",
        ),
        "objective": Param(
            settings.retrain_objective,
            enum=["auto", "sft", "dpo", "kto"],
            description="what to train; auto: DPO when enough preference pairs are new, else SFT",
        ),
        "adapter_alias": Param(
            settings.retrain_adapter_alias or "",
            type="string",
            description="retrain a LoRA adapter of the champion for NAME:ALIAS instead of a version (empty: a version)",
        ),
        "min_new_examples": Param(settings.retrain_min_new_examples, type="integer", minimum=0),
        "min_improvement": Param(settings.promotion_min_improvement, type="number", minimum=0, maximum=1),
        "canary_share": Param(
            settings.canary_share,
            type="number",
            minimum=0,
            exclusiveMaximum=1,
            description="share of conversations a winner answers before promotion (0: no canary)",
        ),
        "canary_window_s": Param(
            settings.canary_window_s,
            type="number",
            minimum=1,
            maximum=MAX_CANARY_WINDOW_S,
            description="how long a canary is judged before it may be promoted",
        ),
    },
    user_defined_filters={"shq": shlex.quote, "slug": _slug, "day": _day, "recipe": _recipe},
    tags=["ray", "mlflow", "retraining"],
    doc_md=__doc__,
) as dag:
    export_feedback = RayJobOperator(
        task_id="export_feedback",
        entrypoint=(f"{PIPELINE} export-feedback {RECIPE} --run-key {{{{ run_id | slug }}}} "
                    "--date {{ dag_run.run_after | day }} --min-new-examples {{ params.min_new_examples }} "
                    "--objective {{ params.objective | shq }} --adapter-alias {{ params.adapter_alias | shq }}"),
    )  # fmt: skip

    @task.short_circuit
    def enough_new_data(export: dict) -> bool:
        """Skip the rest of the run (not fail it) when the export found too little new feedback."""
        review = export.get("review") or {}
        if review.get("pending"):
            print(f"{review['pending']} correction(s) wait for a reviewer (`llmops feedback review`); not trained")
        if export.get("skip"):
            print(f"skipping this run: {export.get('reason')}")
            return False
        print(f"{export['new_examples']} new example(s), {export['feedback_examples']} in all")
        print(f"training: {export.get('objective', 'sft')} ({export.get('objective_reason', '')})")
        print(f"training data: {export['dataset_uri']}")
        return True

    train = RayJobOperator(
        task_id="train",
        entrypoint=TRAIN,
        execution_timeout=timedelta(hours=12),
    )  # fmt: skip

    evaluate = RayJobOperator(task_id="evaluate", entrypoint=f"{PIPELINE} evaluate {RECIPE} {CANDIDATE}")

    promote = RayJobOperator(
        task_id="promote",
        entrypoint=(f"{PIPELINE} promote {RECIPE} {CANDIDATE} --min-improvement {MARGIN} "
                    "--canary-share {{ params.canary_share }}"),
    )  # fmt: skip

    @task.short_circuit
    def gate_passed(decision: dict) -> bool:
        """Roll out when promote moved the champion or started a canary; the reason is logged and in MLflow."""
        if decision.get("canary"):
            print(f"canary started: {decision['reason']}")
            return True
        verdict = "promoted" if decision["promoted"] else "kept the champion"
        print(f"{verdict}: {decision['reason']}")
        return bool(decision["promoted"])

    rollout = RayJobOperator(
        task_id="rollout",
        entrypoint=f"{PIPELINE} rollout {RECIPE} {CANDIDATE} --canary-window-s {WINDOW}",
        execution_timeout=timedelta(seconds=MAX_CANARY_WINDOW_S + 3600),  # a canary's window, and a promotion
    )  # fmt: skip

    gate = enough_new_data(export_feedback.output)
    gate >> train >> evaluate >> promote
    gate_passed(promote.output) >> rollout

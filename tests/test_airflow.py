"""Airflow 3.3 (its own venv, no torch) driving real Ray jobs: the operator, and the retraining DAG.

`airflow dags test` runs the DAGs against a real Ray head (dashboard + Jobs API), a real
MLflow server on PostgreSQL, and the S3 server; feedback is written with Chainlit's own
SQLAlchemy data layer, the way the chat writes it.
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import time
from pathlib import Path

import pytest
import yaml
from conftest import write_feedback
from tiny_model import build_tiny_chat_model

from ray_app.orchestration.ray_jobs import job_key
from ray_app.settings import Settings

REPO = Path(__file__).resolve().parents[1]
AIRFLOW_VENV = REPO / ".venv-airflow"
MODEL = "retrain-chat"


# --- fixtures -------------------------------------------------------------------------------
class Airflow:
    """`airflow` commands of the thin venv against one AIRFLOW_HOME (SQLite) and DAG folder."""

    def __init__(self, home: Path, ray: Settings):
        if not (AIRFLOW_VENV / "bin" / "airflow").is_file():
            pytest.fail(f"{AIRFLOW_VENV} is missing: run `make airflow-venv` (make test does)")
        self.home, self.db = home, home / "airflow.db"
        dags = home / "dags"
        dags.mkdir(parents=True, exist_ok=True)
        shutil.copy(REPO / "dags" / "retrain_chat_model.py", dags)
        shutil.copy(REPO / "tests" / "dags" / "ray_job_checks.py", dags)
        token = ray.ray_auth_headers().get("Authorization", "").removeprefix("Bearer ")
        connection = {"conn_type": "http", "host": "127.0.0.1", "port": ray.ray_dashboard_port, "password": token}
        # Only what an Airflow worker would have: no MLflow, S3 or chat credentials.
        self.env = {
            "PATH": f"{AIRFLOW_VENV / 'bin'}:/usr/bin:/bin",
            "HOME": str(home),
            "AIRFLOW_HOME": str(home),
            "AIRFLOW__CORE__DAGS_FOLDER": str(dags),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{self.db}",
            "AIRFLOW_CONN_RAY_DEFAULT": json.dumps(connection),
            "LLMOPS_HOME": str(home / "llmops"),
        }

    def run(self, *args: str, timeout: float = 600, check: bool = True) -> subprocess.CompletedProcess:
        done = subprocess.run([str(AIRFLOW_VENV / "bin" / "airflow"), *args], env=self.env, cwd=self.home,
                              capture_output=True, text=True, timeout=timeout)  # fmt: skip
        if check:
            assert done.returncode == 0, f"airflow {' '.join(args)}:\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}"
        return done

    def start(self, *args: str) -> subprocess.Popen:
        command = [str(AIRFLOW_VENV / "bin" / "airflow"), *args]
        quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
        return subprocess.Popen(command, env=self.env, cwd=self.home, start_new_session=True, **quiet)

    def query(self, sql: str, *params) -> list[tuple]:
        with sqlite3.connect(self.db) as db:
            return db.execute(sql, params).fetchall()

    def last_run(self, dag_id: str) -> tuple[str, str]:
        return self.query("SELECT run_id, state FROM dag_run WHERE dag_id=? ORDER BY id DESC LIMIT 1", dag_id)[0]

    def states(self, dag_id: str, run_id: str) -> dict[str, str]:
        rows = self.query("SELECT task_id, state FROM task_instance WHERE dag_id=? AND run_id=?", dag_id, run_id)
        return dict(rows)

    def xcom(self, dag_id: str, run_id: str, task_id: str):
        rows = self.query("SELECT value FROM xcom WHERE dag_id=? AND run_id=? AND task_id=? AND key='return_value'",
                          dag_id, run_id, task_id)  # fmt: skip
        if not rows:
            return None
        value = rows[0][0]
        return json.loads(value) if isinstance(value, (str, bytes)) else value


@pytest.fixture(scope="module")
def airflow(ray_cluster: Settings, tmp_path_factory) -> Airflow:
    instance = Airflow(tmp_path_factory.mktemp("airflow-home"), ray_cluster)
    instance.run("db", "migrate", timeout=300)
    return instance


def last_json(stdout: str):
    """The JSON document a CLI printed last (Airflow may print warnings before it)."""
    lines = [line for line in stdout.splitlines() if line.startswith(("[", "{"))]
    assert lines, stdout
    return json.loads(lines[-1])


def jobs_for(settings: Settings, dag_id: str, run_id: str, task_id: str) -> list:
    from ray.job_submission import JobSubmissionClient

    key = job_key(dag_id, run_id, task_id)
    client = JobSubmissionClient(settings.ray_dashboard_url, headers=settings.ray_auth_headers())
    return [job for job in client.list_jobs() if job.submission_id and job.submission_id.startswith(key)]


# --- the DAG file ---------------------------------------------------------------------------
def test_dag_file_parses_fast_without_import_errors_and_without_torch(airflow):
    errors = airflow.run("dags", "list-import-errors", "-o", "json")
    assert last_json(errors.stdout) == [], errors.stdout
    report = last_json(airflow.run("dags", "report", "-o", "json").stdout)
    retrain = next(row for row in report if row["file"].endswith("retrain_chat_model.py"))
    assert "retrain_chat_model" in retrain["dags"]
    seconds = float(retrain["duration"]) if not isinstance(retrain["duration"], str) or ":" not in retrain["duration"] \
        else sum(float(part) * 60**i for i, part in enumerate(reversed(retrain["duration"].split(":"))))  # fmt: skip
    assert seconds < 2.0, retrain
    no_torch = subprocess.run([str(AIRFLOW_VENV / "bin" / "python"), "-c", "import torch"], capture_output=True)
    assert no_torch.returncode != 0, "the Airflow venv must not carry torch"


# --- the operator ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def operator_checks(airflow) -> tuple[str, dict[str, str], str]:
    """One `airflow dags test` of tests/dags/ray_job_checks.py: a failing job, a retried task, a timeout."""
    done = airflow.run("dags", "test", "ray_job_checks", "2026-02-01", check=False)
    run_id, _state = airflow.last_run("ray_job_checks")
    return run_id, airflow.states("ray_job_checks", run_id), done.stdout + done.stderr


def test_a_failing_ray_job_fails_the_task_with_its_log_tail(operator_checks):
    _run_id, states, output = operator_checks
    assert states["fails"] == "failed", output[-4000:]
    assert "ended FAILED" in output and "boom: bad record 7" in output, output[-4000:]


def test_a_retried_task_reattaches_to_the_running_job_instead_of_submitting_again(
    airflow, operator_checks, ray_cluster
):
    run_id, states, output = operator_checks
    assert states["retried"] == "success", output[-4000:]
    assert "worker lost right after submitting" in output  # the first try did fail...
    assert "re-attached to Ray job" in output  # ...and the second found its job
    tries = airflow.query("SELECT try_number FROM task_instance WHERE task_id='retried' AND run_id=?", run_id)
    assert tries == [(2,)]
    jobs = jobs_for(ray_cluster, "ray_job_checks", run_id, "retried")
    assert len(jobs) == 1, [job.submission_id for job in jobs]
    result = airflow.xcom("ray_job_checks", run_id, "retried")
    assert result["answer"] == 42 and result["status"] == "SUCCEEDED", result


def test_execution_timeout_stops_the_ray_job(operator_checks, ray_cluster):
    run_id, states, output = operator_checks
    assert states["times_out"] == "failed", output[-4000:]
    assert "execution_timeout (0:00:06) passed" in output
    (job,) = jobs_for(ray_cluster, "ray_job_checks", run_id, "times_out")
    deadline = time.monotonic() + 30
    while str(job.status) != "STOPPED" and time.monotonic() < deadline:
        time.sleep(1)
        (job,) = jobs_for(ray_cluster, "ray_job_checks", run_id, "times_out")
    assert str(job.status) == "STOPPED"


# --- the retraining DAG ---------------------------------------------------------------------
@pytest.mark.slow
def test_the_readme_stack_runs_the_dag_through_its_scheduler_from_the_rest_api_before_any_chat(
    ray_cluster, prometheus, monkeypatch, tmp_path
):
    """The README's way: `llmops up -s airflow` (`airflow standalone`: API server, scheduler,
    dag-processor, triggerer) beside the head, the DAG unpaused and a run triggered through
    Airflow's REST API before the chat ever ran. The export finds no chat database (zero
    feedback, and says so), the rest is skipped, the run succeeds, no task log has a traceback."""
    import httpx
    from conftest import free_port

    from ray_app.stack import LocalStack

    monkeypatch.setenv("LLMOPS_RETRAIN_SCHEDULE", "none")  # no scheduled run beside the triggered one
    settings = ray_cluster.model_copy(update={"airflow_port": free_port()})
    chat_db = Path(str(settings.chat_database_url).split("///", 1)[1])
    assert not chat_db.exists()
    stack = LocalStack(settings)
    stack.up(["airflow"], echo=lambda _line: None)
    try:
        api = f"http://{settings.bind_host}:{settings.airflow_port}"
        passwords = json.loads((settings.home / "airflow" / "simple_auth_manager_passwords.json.generated").read_text())
        login = httpx.post(f"{api}/auth/token", json={"username": "admin", "password": passwords["admin"]}, timeout=30)
        assert login.status_code == 201, login.text
        bearer = {"Authorization": f"Bearer {login.json()['access_token']}"}
        http = httpx.Client(base_url=f"{api}/api/v2", headers=bearer, timeout=30)
        dag = "/dags/retrain_chat_model"
        assert httpx.get(f"{api}/api/v2/dags", timeout=30).status_code == 401  # the API wants a login

        deadline = time.monotonic() + 180
        while http.get(dag).status_code != 200:  # the dag-processor has not parsed it yet
            assert time.monotonic() < deadline, "the DAG never appeared in Airflow's API"
            time.sleep(2)
        assert http.patch(dag, json={"is_paused": False}).status_code == 200
        recipe = yaml.safe_load((REPO / "training" / "configs" / "tiny_cpu.yaml").read_text())
        data = REPO / "training" / "data"
        recipe.update(train_data=str(data / "chat_sft.jsonl"), eval_data=str(data / "chat_eval.jsonl"),
                      registered_model="readme-chat")  # fmt: skip
        (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
        conf = {"config": str(tmp_path / "recipe.yaml"), "min_new_examples": 1}
        triggered = http.post(f"{dag}/dagRuns", json={"logical_date": None, "conf": conf})
        assert triggered.status_code == 200, triggered.text
        run = f"{dag}/dagRuns/{triggered.json()['dag_run_id']}"
        deadline = time.monotonic() + 300
        while (state := http.get(run).json()["state"]) not in ("success", "failed"):
            assert time.monotonic() < deadline, f"the run is still {state}"
            time.sleep(2)
        tasks = {ti["task_id"]: ti for ti in http.get(f"{run}/taskInstances").json()["task_instances"]}
        states = {task_id: ti["state"] for task_id, ti in tasks.items()}
        assert state == "success", states
        assert states["export_feedback"] == states["enough_new_data"] == "success", states
        assert {states[t] for t in ("train", "evaluate", "promote", "rollout")} == {"skipped"}, states
        export = http.get(f"{run}/taskInstances/export_feedback/xcomEntries/return_value").json()["value"]
        export = json.loads(export) if isinstance(export, str) else export
        assert export["ratings"] == 0 and "no chat database" in export["note"], export
        logs = {}
        for task_id, ti in tasks.items():
            for attempt in range(1, (ti["try_number"] or 0) + 1):
                log = http.get(f"{run}/taskInstances/{task_id}/logs/{attempt}")
                assert log.status_code == 200, log.text
                logs[task_id] = entries = log.json()["content"]
                text = json.dumps(entries)  # structured: an exception would be an error_detail with exc_type
                failed = [e for e in entries if isinstance(e, dict) and e.get("level") in ("error", "critical")]
                assert not failed and "Traceback" not in text and "exc_type" not in text, (task_id, text[-3000:])
        assert set(logs) == {"export_feedback", "enough_new_data"}, set(logs)
        assert "no chat database" in json.dumps(logs["export_feedback"]), logs["export_feedback"][-5:]
        assert not chat_db.exists(), "reading feedback must not create the chat database"
    finally:
        stack.down(["airflow"], echo=lambda _line: None)
    steps_counted_in_prometheus(prometheus, "readme-chat", {("export-feedback", "skipped"): 1})


@pytest.mark.slow
def test_retrain_dag_exports_feedback_trains_on_ray_promotes_a_better_model_and_judges_its_canary(
    airflow, ray_cluster, tmp_path, prometheus, serve_http_port
):
    from mlflow import MlflowClient

    from ray_app.storage import pyarrow_location

    tiny = build_tiny_chat_model(tmp_path / "tiny")
    config = yaml.safe_load((REPO / "training" / "configs" / "tiny_cpu.yaml").read_text())
    data = REPO / "training" / "data"
    config.update({
        "model": str(tiny), "train_data": str(data / "chat_sft.jsonl"), "eval_data": str(data / "chat_eval.jsonl"),
        "num_workers": 1, "max_steps": 4, "checkpoint_every": 4, "learning_rate": 3.0e-3, "warmup_steps": 0,
        "registered_model": MODEL, "experiment": "retrain-dag-test",
    })  # fmt: skip
    config_file = tmp_path / "retrain.yaml"
    config_file.write_text(yaml.safe_dump(config))
    chat_db = str(ray_cluster.chat_database_url)  # where the jobs (LLMOPS_HOME of the head) read feedback
    mlflow = MlflowClient(ray_cluster.mlflow_tracking_uri)

    def trigger(date: str, **conf) -> tuple[str, dict[str, str], subprocess.CompletedProcess]:
        body = {"config": str(config_file), "min_new_examples": 2, "min_improvement": 0.0, **conf}
        done = airflow.run("dags", "test", "retrain_chat_model", date, "-c", json.dumps(body), check=False)
        run_id, _state = airflow.last_run("retrain_chat_model")
        return run_id, airflow.states("retrain_chat_model", run_id), done

    assert not Path(chat_db.split("///", 1)[1]).exists()  # the chat never ran (the REST test's run: skipped)
    write_feedback(chat_db, model_version=f"{MODEL}/0", ratings=[
        ("What does Ray Serve do?", "Ray Serve serves models over HTTP.", 1, None),
        ("Where are checkpoints stored?", "In the S3 store.", 1, "nice"),
        # As long as its correction: the gate's replay compares them per token.
        ("Who moves the champion alias?", "Nobody ever moves it; it stays put.", 0,
         "correction: The promote step of the retraining DAG."),
        ("What is MLflow?", "A database.", 0, "wrong"),
        ("Is Ray fast?", "It depends.", 0, "correction: Always, on every input."),  # never approved
    ])  # fmt: skip
    from ray_app.chat.review import APPROVED, ReviewPolicy, candidates, decide

    [approved] = [r for r in candidates(chat_db, ReviewPolicy()) if "promote step" in (r.comment or "")]
    decide(chat_db, approved, APPROVED, "reviewer")

    # 1. Enough new feedback, a candidate better than the base model: trained, promoted, rolled out.
    run_id, states, done = trigger("2026-03-01")
    gate = airflow.xcom("retrain_chat_model", run_id, "promote")  # the gate's reason, when it said no
    assert set(states.values()) == {"success"}, (states, gate, done.stdout[-4000:], done.stderr[-4000:])
    export = airflow.xcom("retrain_chat_model", run_id, "export_feedback")
    assert export["new_examples"] == 3 and export["ratings"] == 5, export
    # unreviewed: two thumbs-up (SFT) and a thumbs-down (preference data only)
    assert export["review"] == {"pending": 1, "approved": 1, "rejected": 0, "trusted": 0, "unreviewed": 3}, export
    path, filesystem = pyarrow_location(export["dataset_uri"], ray_cluster)
    with filesystem.open_input_stream(path) as stream:
        lines = [json.loads(line) for line in stream.read().decode().splitlines()]
    answers = [record["messages"][-1]["content"] for record in lines]
    assert "Ray Serve serves models over HTTP." in answers and "The promote step of the retraining DAG." in answers
    assert "A database." not in answers and "Nobody ever moves it; it stays put." not in answers
    assert "Always, on every input." not in answers and "It depends." not in answers  # pending: not trained
    assert len(lines) == export["base_examples"] + 3
    train = airflow.xcom("retrain_chat_model", run_id, "train")
    assert train["registered_version"] == "1" and train["data"]["records"] == len(lines), train
    decision = airflow.xcom("retrain_chat_model", run_id, "promote")
    assert decision["promoted"] is True, decision
    assert mlflow.get_model_version_by_alias(MODEL, "champion").version == "1"
    version = mlflow.get_model_version(MODEL, "1")
    assert version.tags["promotion"] == "promoted" and version.tags["feedback_until"] == export["feedback_until"]
    assert airflow.xcom("retrain_chat_model", run_id, "rollout")["version"] == "1"

    # 2. The champion is served; new ratings make preference pairs, so the DAG trains DPO from the champion;
    #    the result wins the gate on what it learned and becomes a canary beside it (the alias stays).
    #    Nobody rates its answers in its window: rolled back.
    preference_config = tmp_path / "retrain-dpo.yaml"
    # A gentle rate: at 1e-3 (3e-4) the result made two liked answers 0.2 (0.14) nats/token less likely
    # and the gate's regression set rejected it (seen while writing this test).
    preference_config.write_text(yaml.safe_dump({
        **yaml.safe_load((REPO / "training" / "configs" / "tiny_dpo_cpu.yaml").read_text()),
        "model": str(tiny), "train_data": str(data / "chat_preferences.jsonl"), "eval_data": None, "num_workers": 1,
        "seq_len": 64, "learning_rate": 1.0e-4, "beta": 0.5, "warmup_steps": 0, "checkpoint_every": 12,
        "registered_model": "not-this-one", "experiment": "retrain-dag-test",
    }))  # fmt: skip
    run_id = a_winner_is_judged_as_a_canary_and_rolled_back(airflow, ray_cluster, serve_http_port, trigger, chat_db,
                                                            preference_config)  # fmt: skip
    export = airflow.xcom("retrain_chat_model", run_id, "export_feedback")
    assert export["new_examples"] == 2 and export["since"] == version.tags["feedback_until"], export
    assert export["objective"] == "dpo" and export["preferences"]["new_pairs"] == 2, export
    dpo = mlflow.get_model_version(MODEL, "2").tags  # its lineage: what it learned from, and from which version
    assert dpo["training.objective"] == "dpo" and dpo["base_model"] == f"models:/{MODEL}/1", dpo
    assert dpo["training.dataset"] == export["preference_data_uri"] and dpo["feedback_until"] > version.tags[
        "feedback_until"]  # fmt: skip
    assert json.loads(dpo["training.feedback"])["pairs_from_thumbs"] == 2, dpo
    an_adapter_line_retrains_its_alias_from_all_feedback_then_only_from_new(airflow, ray_cluster, trigger)
    # Each step's Ray job counted how it ended: four runs (one skipped), two promotions, one canary rolled back.
    steps_counted_in_prometheus(prometheus, MODEL, {
        ("export-feedback", "exported"): 3, ("export-feedback", "skipped"): 1, ("evaluate", "evaluated"): 3,
        ("promote", "promoted"): 2, ("promote", "canary"): 1, ("rollout", "rolled"): 2, ("rollout", "rolled_back"): 1,
    })  # fmt: skip


def an_adapter_line_retrains_its_alias_from_all_feedback_then_only_from_new(airflow, ray_cluster, trigger) -> None:
    """With ``adapter_alias`` the DAG trains a LoRA adapter of the champion (v1) for MODEL:support, unmerged: its
    line has no watermark yet, so all feedback is new (not only what came after v2's); the gate compares v1 with
    the adapter to v1 alone (a new alias) and moves the alias; no version is registered. The next run finds
    nothing new since the adapter's lineage and is skipped."""
    from mlflow import MlflowClient

    from ray_app.adapters import alias_tag, lineage_tag

    mlflow = MlflowClient(ray_cluster.mlflow_tracking_uri)
    line = {"adapter_alias": "support", "objective": "sft", "overrides": ["max_steps=8", "learning_rate=0.01"]}
    run_id, states, done = trigger("2026-03-05", **line)
    assert set(states.values()) == {"success"}, (states, done.stdout[-4000:], done.stderr[-4000:])
    export = airflow.xcom("retrain_chat_model", run_id, "export_feedback")
    assert export["adapter_alias"] == "support" and export["base_version"] == "1", export
    assert export["since"] is None and export["new_examples"] == 5 and export["objective"] == "sft", export
    train = airflow.xcom("retrain_chat_model", run_id, "train")
    adapter = export["adapter_name"]
    assert train["adapter"] == adapter and train["registered_version"] is None, train
    assert f"/adapters/{MODEL}/1/{adapter}" in train["model_uri"], train
    decision = airflow.xcom("retrain_chat_model", run_id, "promote")
    assert decision["promoted"] is True and decision["previous"] is None, decision
    assert airflow.xcom("retrain_chat_model", run_id, "rollout")["decision"] == "promoted"
    tags = mlflow.get_model_version(MODEL, "1").tags
    assert tags[alias_tag("support")] == adapter and tags["adapter_gate.support"] == adapter, tags
    assert tags["adapter_gate.support.reference"] == f"models:/{MODEL}/1", tags
    lineage = json.loads(tags[lineage_tag(adapter)])
    assert lineage["training.adapter_alias"] == "support" and lineage["training.objective"] == "sft", lineage
    assert lineage["feedback_until"] == export["feedback_until"] and lineage["run_id"] == train["mlflow_run_id"]
    assert sorted(v.version for v in mlflow.search_model_versions(f"name='{MODEL}'")) == ["1", "2"]  # no new version

    run_id, states, _done = trigger("2026-03-06", **line)
    skipped = airflow.xcom("retrain_chat_model", run_id, "export_feedback")
    assert skipped["skip"] is True and skipped["since"] == export["feedback_until"], skipped
    assert states["train"] == "skipped", states


def a_winner_is_judged_as_a_canary_and_rolled_back(airflow, ray_cluster, serve_http_port, trigger, chat_db,
                                                    preference_config) -> str:  # fmt: skip
    """With an app serving the champion (v1), a DAG run's winner (v2) is served beside it as a canary
    to half of the conversations, judged by the rollout task every few seconds while it waits
    deferred, and rolled back when its window ends without ratings: the champion serves alone."""
    from mlflow import MlflowClient

    from ray_app.serving.rollout import deploy, load_serve_config, running_config, shutdown

    mlflow = MlflowClient(ray_cluster.mlflow_tracking_uri)
    serving = ray_cluster.model_copy(update={"serve_port": serve_http_port})
    app = load_serve_config(REPO / "serve_configs" / "local.yaml", serving, model=f"models:/{MODEL}@champion")
    chat = app["applications"][0]
    chat["runtime_env"] = {"env_vars": {"MLFLOW_TRACKING_URI": str(ray_cluster.mlflow_tracking_uri)}}
    for deployment in chat["deployments"]:  # leave the training run its CPU on the 2-CPU head
        deployment["ray_actor_options"] = {"num_cpus": 0.25 if deployment["name"] == "ChatServer" else 0}
    deploy(app, serving, wait_s=240)
    write_feedback(chat_db, model_version=f"{MODEL}/1", ratings=[
        ("What runs the chat?", "Chainlit runs the chat.", 1, None),
        ("What is DeepSpeed for?", "Sharding optimizer state.", 1, None),
        ("What runs the chat?", "Nothing runs the chat today.", 0, None),  # two pairs with the answers above
        ("What is DeepSpeed for?", "It is for nothing at all.", 0, "wrong"),
    ])  # fmt: skip
    try:
        run_id, states, done = trigger("2026-03-03", overrides=["max_steps=12"], canary_share=0.5, canary_window_s=25,
                                       preference_config=str(preference_config))  # fmt: skip
        args = running_config(serving)["applications"][0]["args"]
    finally:
        shutdown(serving)
    output = done.stdout + done.stderr
    notable = [line for line in output.splitlines() if "error" in line.lower() or "canary" in line.lower()]
    assert set(states.values()) == {"success"}, (states, "\n".join(notable)[-8000:])
    decision = airflow.xcom("retrain_chat_model", run_id, "promote")
    assert decision["promoted"] is False and decision["canary"] == {
        "version": "2", "share": 0.5, "sticky_by": "conversation", "apps": ["chat"]}, decision  # fmt: skip
    assert "canary for 50% of conversations" in decision["reason"] and f"canary started: {decision['reason']}" in output
    assert "preference candidate" in decision["reason"] and "learned: " in decision["reason"], decision
    verdict = airflow.xcom("retrain_chat_model", run_id, "rollout")
    assert verdict["decision"] == "rolled_back" and "window over with 0 rating(s)" in verdict["reason"], verdict
    assert f"canary {MODEL} v2: wait:" in output, output[-4000:]  # judged while the window ran
    assert mlflow.get_model_version_by_alias(MODEL, "champion").version == "1"
    canary = mlflow.get_model_version(MODEL, "2").tags
    assert canary["canary"] == "rolled_back" and canary["canary.verdict"] == "rollback", canary
    assert canary["canary.by"].startswith("pipeline rollout") and "promotion" not in canary, canary
    assert args["model_version"] == "1" and "canary" not in args, args  # the champion serves alone again
    return run_id


def steps_counted_in_prometheus(settings, model: str, expected: dict[tuple[str, str], int]) -> None:
    """Prometheus holds exactly ``expected`` (step, outcome) counts of the retraining steps of ``model``."""
    from ray_app import monitoring

    promql = f'sum by (step, outcome) (max_over_time(ray_llmops_retrain_steps_total{{model="{model}"}}[30m]))'
    deadline, seen = time.monotonic() + 60, {}
    while time.monotonic() < deadline:
        seen = {(r["metric"]["step"], r["metric"]["outcome"]): float(r["value"][1])
                for r in monitoring.query(settings, promql)}  # fmt: skip
        if seen == expected:
            return
        time.sleep(2)
    raise AssertionError(f"Prometheus counted {seen}, expected {expected}")


def test_export_takes_only_reviewed_or_trusted_corrections_and_skips_when_too_little_is_new(tmp_path):
    """The export step in-process (no Ray, no MLflow) and `llmops feedback review` on the same database."""
    import sqlalchemy as sa
    from typer.testing import CliRunner

    from ray_app.chat.review import PENDING, ReviewPolicy, candidates
    from ray_app.chat.schema import feedbacks, sync_url
    from ray_app.cli import app
    from ray_app.orchestration.pipeline import export_feedback
    from ray_app.settings import load_settings
    from ray_app.storage import pyarrow_location
    from training.config import load_config

    home = tmp_path / "home"
    settings = load_settings(home=home, store_uri=str(tmp_path / "store"), feedback_trusted_users="trudy")
    url = str(settings.chat_database_url)
    write_feedback(url, model_version=f"{MODEL}/0", ratings=[
        ("Q1?", "A1.", 1, None), ("Q2?", "A2.", 0, "Correction: B2."), ("Q3?", "A3.", 0, "meh"),
        ("Q5?", "A5.", 0, "correction: B5."),
    ])  # fmt: skip
    write_feedback(url, [("Q4?", "A4.", 0, "correction: B4.")], author="trudy", model_version=f"{MODEL}/0")
    cfg = load_config(REPO / "training" / "configs" / "tiny_cpu.yaml").model_copy(update={"registered_model": None})

    skipped = export_feedback(cfg, settings, "run-a", "2026-03-04", min_new_examples=3)
    assert skipped["skip"] is True and skipped["ratings"] == 5 and skipped["new_examples"] == 2, skipped
    assert skipped["review"] == {"pending": 2, "approved": 0, "rejected": 0, "trusted": 1, "unreviewed": 2}
    assert skipped["reason"] == "2 new feedback example(s), fewer than the 3 needed"
    assert not (tmp_path / "store" / "datasets").exists(), "a skipped export writes nothing"

    cli = CliRunner(env={"LLMOPS_FEEDBACK_TRUSTED_USERS": "trudy"})
    listed = cli.invoke(app, ["--home", str(home), "feedback", "review"])
    assert listed.exit_code == 0 and "B2." in listed.output and "B5." in listed.output, listed.output
    assert "B4." not in listed.output and "2 pending" in listed.output, listed.output
    ids = {r.comment: r.feedback_id for r in candidates(url, ReviewPolicy.from_settings(settings), PENDING)}
    bad = cli.invoke(app, ["--home", str(home), "feedback", "review", "--approve", ids["Correction: B2."],
                           "--reject", "no-such-id"])  # fmt: skip
    assert bad.exit_code == 1 and "no-such-id" in bad.output, bad.output
    assert len(candidates(url, ReviewPolicy.from_settings(settings), PENDING)) == 2, "nothing partial was written"
    decide = ["--reviewer", "rita", "--approve", ids["Correction: B2."][:8], "--reject", ids["correction: B5."]]
    decided = cli.invoke(app, ["--home", str(home), "feedback", "review", *decide])
    assert decided.exit_code == 0 and "approved" in decided.output and "as rita" in decided.output, decided.output

    exported = export_feedback(cfg, settings, "run-b", "2026-03-04", min_new_examples=3)
    assert exported["review"] == {"pending": 0, "approved": 1, "rejected": 1, "trusted": 1, "unreviewed": 2}
    assert exported["dataset_uri"].endswith("datasets/retrain/2026-03-04/run-b/train.jsonl"), exported
    path, _filesystem = pyarrow_location(exported["dataset_uri"], settings)  # a local store: a plain path
    records = [json.loads(line)["messages"] for line in Path(path).read_text().splitlines()]
    assert len(records) == exported["base_examples"] + 3
    assert records[-3:] == [
        [{"role": "user", "content": "Q1?"}, {"role": "assistant", "content": "A1."}],
        [{"role": "user", "content": "Q2?"}, {"role": "assistant", "content": "B2."}],
        [{"role": "user", "content": "Q4?"}, {"role": "assistant", "content": "B4."}],
    ]
    export_json = json.loads((Path(path).parent / "export.json").read_text())
    assert export_json["review"]["rejected"] == 1
    # The same reviewed ratings as preference data: the rejected correction (B5) and nothing pending is in it.
    assert exported["preferences"]["pairs_from_corrections"] == 2 and exported["preferences"]["thumbs_down"] == 3
    pairs = [json.loads(line) for line in Path(pyarrow_location(exported["preference_data_uri"], settings)[0])
             .read_text().splitlines()]  # fmt: skip
    assert [(p["messages"][-1]["content"], p["chosen"], p["rejected"]) for p in pairs] == [
        ("Q2?", "B2.", "A2."), ("Q4?", "B4.", "A4.")], pairs  # fmt: skip
    assert all(p["model_version"] == [f"{MODEL}/0"] and p["weight"] == 1.0 for p in pairs), pairs
    thumbs = Path(pyarrow_location(exported["thumbs_data_uri"], settings)[0]).read_text().splitlines()
    assert sorted((t["completion"], t["desirable"]) for t in map(json.loads, thumbs)) == [
        ("A1.", True),
        ("A2.", False),
        ("A3.", False),
        ("A4.", False),
        ("B2.", True),
        ("B4.", True),
    ]
    assert export_json["preference_data_uri"] == exported["preference_data_uri"]
    assert exported["objective"] == "sft" and exported["recipe"] == "sft", exported  # 2 new pairs: fewer than 3
    lineage = json.loads(exported["train_overrides"][1].removeprefix("version_tags="))
    assert lineage["training.objective"] == "sft" and lineage["training.dataset"] == exported["dataset_uri"]
    counts = {"feedback_examples": 3, "base_examples": exported["base_examples"]}
    assert json.loads(lineage["training.feedback"]) == counts, lineage

    # Chosen by config: DPO on the pairs, KTO on the rated answers; each with its own count of what is new.
    dpo = export_feedback(cfg, settings, "run-c", "2026-03-04", min_new_examples=2, objective="dpo")
    assert (dpo["objective"], dpo["recipe"], dpo["skip"]) == ("dpo", "dpo", False), dpo
    assert dpo["train_overrides"][0] == f"train_data={dpo['preference_data_uri']}" and "objective=dpo" in dpo[
        "train_overrides"]  # fmt: skip
    assert json.loads(json.loads(dpo["train_overrides"][1].removeprefix("version_tags="))["training.feedback"])[
        "pairs_from_corrections"] == 2  # fmt: skip
    assert export_feedback(cfg, settings, "run-d", "2026-03-04", 3, objective="dpo")["reason"] == (
        "2 new preference pair(s), fewer than the 3 needed")  # fmt: skip
    kto = export_feedback(cfg, settings, "run-e", "2026-03-04", min_new_examples=6, objective="kto")
    assert kto["train_overrides"][0] == f"train_data={kto['thumbs_data_uri']}" and kto["recipe"] == "dpo", kto
    assert export_feedback(cfg, settings, "run-f", "2026-03-04", 2, objective="auto")["objective"] == "dpo"

    # The author edits an approved correction (Chainlit allows it): it waits for review again.
    engine = sa.create_engine(sync_url(url))
    with engine.begin() as connection:
        connection.execute(sa.update(feedbacks).where(feedbacks.c.id == ids["Correction: B2."])
                           .values(comment="correction: something else"))  # fmt: skip
    engine.dispose()
    policy = ReviewPolicy.from_settings(settings.model_copy(update={"feedback_review_thumbs_up": True}))
    states = {r.comment: policy.state(r) for r in candidates(url, policy)}
    assert states == {"correction: something else": "pending", "correction: B5.": "rejected",
                      "correction: B4.": "trusted", None: "pending", "meh": "unreviewed"}, states  # fmt: skip


def test_export_without_a_chat_database_or_feedback_and_with_its_services_down(tmp_path):
    """The export step before the chat ever ran (no database file: zero feedback, and with
    min_new_examples 0 a dataset of the recipe's data), then with the chat database and MLflow
    unreachable: a one-line error naming each (password hidden), no traceback, no dataset."""
    import sys

    from conftest import free_port

    from ray_app.chat.feedback import ChatDatabaseError
    from ray_app.orchestration.pipeline import export_feedback
    from ray_app.settings import load_settings
    from training.config import load_config

    settings = load_settings(home=tmp_path / "home", store_uri=str(tmp_path / "store"))
    database = Path(str(settings.chat_database_url).split("///", 1)[1])
    cfg = load_config(REPO / "training" / "configs" / "tiny_cpu.yaml").model_copy(update={"registered_model": None})

    skipped = export_feedback(cfg, settings, "run-a", "2026-03-05", min_new_examples=1)
    assert skipped["skip"] is True and skipped["ratings"] == 0 and "no chat database" in skipped["note"], skipped
    exported = export_feedback(cfg, settings, "run-b", "2026-03-05", min_new_examples=0)
    assert exported["skip"] is False and exported["new_examples"] == 0 and exported["feedback_until"] == "", exported
    lineage = json.loads(exported["train_overrides"][1].removeprefix("version_tags="))
    assert "feedback_until" not in lineage and lineage["training.dataset"] == exported["dataset_uri"], lineage
    lines = (tmp_path / "store" / "datasets/retrain/2026-03-05/run-b/train.jsonl").read_text().splitlines()
    assert len(lines) == exported["base_examples"] > 0
    assert not database.exists() and not database.parent.exists(), "reading feedback must not create the database"

    dead = f"postgresql+asyncpg://chat:s3cret-pw@127.0.0.1:{free_port()}/chat"
    with pytest.raises(ChatDatabaseError, match=r"chat:\*\*\*@127\.0\.0\.1:\d+/chat") as failed:
        export_feedback(cfg, settings.model_copy(update={"chat_database_url": dead}), "run-c", "2026-03-05", 0)
    assert "s3cret-pw" not in str(failed.value)

    mlflow_url = f"http://127.0.0.1:{free_port()}"
    env = {
        **os.environ, "LLMOPS_HOME": str(tmp_path / "home"), "LLMOPS_STORE_URI": str(tmp_path / "store"),
        "MLFLOW_TRACKING_URI": mlflow_url, "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1",
        "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "0",
    }  # fmt: skip
    step = [sys.executable, "-m", "ray_app.orchestration.pipeline", "export-feedback", "--config",
            str(REPO / "training" / "configs" / "tiny_cpu.yaml"), "--run-key", "run-d", "--date", "2026-03-05",
            "--min-new-examples", "0"]  # fmt: skip
    done = subprocess.run(step, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1, (done.stdout, done.stderr)
    assert mlflow_url in done.stderr and "Traceback" not in done.stderr, done.stderr
    assert not (tmp_path / "store" / "datasets/retrain/2026-03-05/run-d").exists()


def test_an_adapter_line_trains_lora_on_the_champion_and_counts_feedback_from_its_own_adapters(tmp_path):
    """The adapter line's pieces without services: its watermark is the newest ``feedback_until`` among the
    adapters trained for its alias (other aliases' do not count); its adapter names are valid, dated and per
    run; the train step's overrides (even a DPO plan's, whose model was the alias's adapter) make a LoRA
    adapter of the champion version whose lineage names the alias; preferences are weighed against the label
    the alias answers with."""
    from ray_app.adapters import ADAPTER_NAME
    from ray_app.chat.review import ReviewPolicy
    from ray_app.orchestration.pipeline import AdapterLine, _training_plan, chat_preferences, feedback_watermark
    from ray_app.settings import load_settings
    from training.config import load_config
    from training.dpo import PreferenceConfig

    settings = load_settings(home=tmp_path / "home", store_uri=str(tmp_path / "store"))
    lineages = {"a": {"training.adapter_alias": "support", "feedback_until": "2026-03-01T10:00:00Z"},
                "b": {"training.adapter_alias": "sales", "feedback_until": "2026-04-01T10:00:00Z"},
                "c": {"training.adapter_alias": "support", "feedback_until": "2026-02-01T10:00:00Z"},
                "d": {"run_id": "trained by hand"}}  # fmt: skip
    line = AdapterLine("support", "3", "a", lineages)
    assert feedback_watermark("chat", settings, line) == "2026-03-01T10:00:00Z"
    assert feedback_watermark("chat", settings, AdapterLine("new", "3", None, lineages)) is None
    names = {line.adapter_name(run, "2026-03-05") for run in ("manual__1", "manual__2", "scheduled__1")}
    assert len(names) == 3 and all(name.startswith("support-20260305-") for name in names), names
    longest = AdapterLine("x" * 64, "3", None, {}).adapter_name("manual__1", "2026-03-05")
    assert all(ADAPTER_NAME.match(name) for name in (*names, longest)), (names, longest)

    summary = {"adapter_name": "support-20260305-abc123", "feedback_until": "", "preferences": {"new_pairs": 2}}
    plan = _training_plan("dpo", summary, {"preference_data_uri": "s3://b/p.jsonl"}, "chat", "chat/3:a", line)
    cfg = load_config(REPO / "training" / "configs" / "tiny_dpo_cpu.yaml", plan["train_overrides"],
                      schema=PreferenceConfig)  # fmt: skip
    assert plan["recipe"] == "dpo" and cfg.saves_adapter and cfg.lora.adapter_name == summary["adapter_name"]
    assert cfg.model == "models:/chat/3" and cfg.objective == "dpo" and cfg.registered_model == "chat", cfg
    assert cfg.train_data == ["s3://b/p.jsonl"] and cfg.version_tags["training.adapter_alias"] == "support", cfg
    _data, current = chat_preferences([], ReviewPolicy(), "chat", settings, line)
    assert current == "chat/3:a"

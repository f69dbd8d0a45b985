"""MLflow server on PostgreSQL with artifacts in S3: runs, artifacts, the registry and aliases."""

from __future__ import annotations

import uuid

import pytest
from conftest import llmops_cli

from ray_app.settings import Settings
from ray_app.storage import S3Store


def test_runs_metrics_and_artifacts_land_in_postgres_and_s3(mlflow_server: Settings, tmp_path, monkeypatch):
    import mlflow
    from mlflow import MlflowClient

    for key, value in mlflow_server.worker_env().items():
        monkeypatch.setenv(key, value)
    mlflow.set_tracking_uri(mlflow_server.mlflow_tracking_uri)
    mlflow.set_experiment(f"test-{uuid.uuid4().hex[:6]}")
    (tmp_path / "notes.txt").write_text("trained on the tiny set")
    with mlflow.start_run() as run:
        mlflow.log_params({"lr": 1e-4, "zero_stage": 2})
        for step in range(3):
            mlflow.log_metric("loss", 2.0 - step * 0.5, step=step)
        mlflow.log_artifact(str(tmp_path / "notes.txt"))

    client = MlflowClient(mlflow_server.mlflow_tracking_uri)
    fetched = client.get_run(run.info.run_id)
    assert fetched.data.params == {"lr": "0.0001", "zero_stage": "2"}
    assert [m.value for m in client.get_metric_history(run.info.run_id, "loss")] == [2.0, 1.5, 1.0]

    bucket = S3Store("s3://mlflow-artifacts", mlflow_server)
    keys = [info.key for info in bucket.list()]
    assert any(key.endswith(f"{run.info.run_id}/artifacts/notes.txt") for key in keys), keys


def test_registry_versions_and_aliases_resolve(mlflow_server: Settings, tmp_path):
    import mlflow
    from mlflow import MlflowClient

    mlflow.set_tracking_uri(mlflow_server.mlflow_tracking_uri)
    client = MlflowClient(mlflow_server.mlflow_tracking_uri)
    name = f"chat-model-{uuid.uuid4().hex[:6]}"
    client.create_registered_model(name)
    with mlflow.start_run() as run:
        mlflow.log_param("kind", "candidate")
    first = client.create_model_version(name, source=f"runs:/{run.info.run_id}/model", run_id=run.info.run_id)
    second = client.create_model_version(name, source=f"runs:/{run.info.run_id}/model", run_id=run.info.run_id)
    client.set_registered_model_alias(name, "champion", first.version)
    assert client.get_model_version_by_alias(name, "champion").version == first.version
    client.set_registered_model_alias(name, "champion", second.version)
    assert client.get_model_version_by_alias(name, "champion").version == second.version


def test_mlflow_refuses_anonymous_calls_and_serve_reads_but_cannot_move_an_alias(mlflow_server: Settings):
    import httpx
    import mlflow
    from mlflow import MlflowClient

    from ray_app.credentials import as_serve_identity
    from ray_app.registry import RegistryError, configure_tracking, get_version, set_alias

    uri = mlflow_server.mlflow_tracking_uri
    mlflow.set_tracking_uri(uri)
    admin = MlflowClient(uri)  # this session's platform identity (MLFLOW_TRACKING_USERNAME/PASSWORD)
    name = f"chat-model-{uuid.uuid4().hex[:6]}"
    admin.create_registered_model(name)
    with mlflow.start_run() as run:
        mlflow.log_param("kind", "candidate")
    for _ in range(2):
        admin.create_model_version(name, source=f"runs:/{run.info.run_id}/model", run_id=run.info.run_id)
    admin.set_registered_model_alias(name, "champion", "1")

    alias = "/api/2.0/mlflow/registered-models/alias"
    for auth in (None, ("admin", "not-the-password"), ("nobody", "x")):
        http = httpx.Client(base_url=uri, auth=auth, timeout=30)
        assert http.get(alias, params={"name": name, "alias": "champion"}).status_code == 401
        assert http.post(alias, json={"name": name, "alias": "champion", "version": "2"}).status_code == 401
    assert admin.get_model_version_by_alias(name, "champion").version == "1"

    serve = as_serve_identity(mlflow_server)
    try:
        assert get_version(f"models:/{name}@champion", serve).version == "1"  # reading works
        with pytest.raises(RegistryError, match=r"cannot move alias champion .* (403|Permission denied)"):
            set_alias(name, "champion", "2", serve)
    finally:
        configure_tracking(mlflow_server)  # this process speaks as the platform again
    assert admin.get_model_version_by_alias(name, "champion").version == "1"
    set_alias(name, "champion", "2", mlflow_server)  # the promoting identity may
    assert admin.get_model_version_by_alias(name, "champion").version == "2"


def test_a_registration_that_died_before_its_alias_is_completed_by_llmops_register(mlflow_server: Settings, tmp_path):
    """A trained run (its recipe, eval loss and model folder recorded) whose registration was
    killed between creating the version and moving the alias (a version with no alias and no
    tags, the run FAILED): `llmops register RUN_ID`, run twice, leaves exactly one version with
    its alias and tags, and the run FINISHED."""
    import mlflow
    from mlflow import MlflowClient

    from ray_app.registry import register_model_version
    from ray_app.storage import open_store

    mlflow.set_tracking_uri(mlflow_server.mlflow_tracking_uri)
    client = MlflowClient(mlflow_server.mlflow_tracking_uri)
    name, run_name = f"chat-model-{uuid.uuid4().hex[:6]}", f"sft-{uuid.uuid4().hex[:6]}"
    settings = mlflow_server.model_copy(update={"store_uri": f"s3://reg-{uuid.uuid4().hex[:6]}/store"})
    store = open_store(settings=settings)
    store.ensure()
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text("{}")
    store.upload_dir(tmp_path / "m", f"models/{run_name}", progress=False)
    recipe = {"registered_model": name, "run_name": run_name, "train_data": ["s3://data/feedback.jsonl"],
              "model": "base-model", "version_tags": {"feedback_until": "2026-11-30T00:00:00Z"}}  # fmt: skip
    with mlflow.start_run(run_name=run_name) as run:
        mlflow.log_dict(recipe, "config/sft.json")
        mlflow.log_metric("eval_loss", 1.25)
    run_id, source = run.info.run_id, store.uri(f"models/{run_name}")
    client.create_registered_model(name)
    client.create_model_version(name, source=source, run_id=run_id)  # killed here: no tags, no alias
    client.set_terminated(run_id, "FAILED")

    llmops = llmops_cli(settings)
    for _ in range(2):  # the retry, and a second retry after a success
        done = llmops("register", run_id)
        assert done.returncode == 0 and f"{name}: version 1 (challenger)" in done.stdout, done.stdout + done.stderr
    versions = client.search_model_versions(f"name = '{name}'")
    assert [v.version for v in versions] == ["1"]
    registered = client.get_model_version_by_alias(name, "challenger")
    assert registered.version == "1" and registered.source == source
    assert registered.tags["run_id"] == run_id and registered.tags["train_data"] == "s3://data/feedback.jsonl"
    assert registered.tags["eval_loss"] == "1.250000" and registered.tags["feedback_until"] == "2026-11-30T00:00:00Z"
    assert client.get_run(run_id).info.status == "FINISHED"

    unknown = llmops("register", "0" * 32)
    assert unknown.returncode == 1 and settings.mlflow_tracking_uri in unknown.stderr, unknown.stderr
    assert "Traceback" not in unknown.stderr

    other = register_model_version(name, f"s3://models/{name}/v2", None, alias="challenger", settings=settings)
    assert other.version == "2"  # no run id, a different source: a new version


def test_store_rm_refuses_the_folder_a_registered_version_points_to(mlflow_server: Settings, tmp_path):
    from ray_app.registry import register_model_version
    from ray_app.storage import open_store

    bucket = f"rm-{uuid.uuid4().hex[:6]}"
    settings = mlflow_server.model_copy(update={"store_uri": f"s3://{bucket}/store"})
    store = open_store(settings=settings)
    store.ensure()
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text("{}")
    for prefix in ("models/champion", "models/scratch"):
        store.upload_dir(tmp_path / "m", prefix, progress=False)
    name = f"chat-model-{uuid.uuid4().hex[:6]}"
    register_model_version(name, store.uri("models/champion"), None, alias="champion", settings=settings)

    llmops = llmops_cli(settings)
    for prefix in ("models/champion", "models", "models/champion/config.json"):
        refused = llmops("store", "rm", prefix)
        assert refused.returncode == 1, refused.stderr
        assert f"{name} v1" in refused.stderr and "--force" in refused.stderr
    assert store.read_manifest("models/champion") is not None

    assert llmops("store", "rm", "models/scratch").returncode == 0
    assert store.list("models/scratch") == []
    forced = llmops("store", "rm", "--force", "models/champion")
    assert forced.returncode == 0, forced.stderr
    assert store.list("models") == []

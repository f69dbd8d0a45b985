"""MLflow server on PostgreSQL with artifacts in S3: runs, artifacts, the registry and aliases."""

from __future__ import annotations

import uuid

import pytest

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
    from mlflow.exceptions import MlflowException

    from ray_app.credentials import as_serve_identity
    from ray_app.registry import configure_tracking, get_version, set_alias

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
        with pytest.raises(MlflowException, match=r"403|Permission denied"):
            set_alias(name, "champion", "2", serve)
    finally:
        configure_tracking(mlflow_server)  # this process speaks as the platform again
    assert admin.get_model_version_by_alias(name, "champion").version == "1"
    set_alias(name, "champion", "2", mlflow_server)  # the promoting identity may
    assert admin.get_model_version_by_alias(name, "champion").version == "2"

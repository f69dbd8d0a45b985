"""The settings object: standard env names, LLMOPS_* names, validation with the field's name."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from ray_app.settings import SettingsError, load_settings


def test_standard_environment_names_are_honoured(monkeypatch, tmp_path):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.internal:5000")
    monkeypatch.setenv("MLFLOW_S3_ENDPOINT_URL", "http://minio.internal:9000")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAEXAMPLE")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s3cr3t-value")
    monkeypatch.setenv("RAY_ADDRESS", "ray://head:10001")
    monkeypatch.setenv("WANDB_MODE", "disabled")
    monkeypatch.setenv("WANDB_API_KEY", "wandb-secret")
    monkeypatch.setenv("LLMOPS_HOME", str(tmp_path))
    monkeypatch.setenv("LLMOPS_STORE_URI", "s3://checkpoints/runs")
    monkeypatch.setenv("LLMOPS_API_KEYS", "key-one, key-two")
    monkeypatch.setenv("RAY_PROMETHEUS_HOST", "http://prometheus:9090/")  # what a Ray head (and its jobs) get

    settings = load_settings()

    assert settings.mlflow_tracking_uri == "http://mlflow.internal:5000"
    assert settings.s3_endpoint_url == "http://minio.internal:9000"
    assert settings.s3_credentials() == ("AKIAEXAMPLE", "s3cr3t-value")
    assert settings.ray_address == "ray://head:10001"
    assert settings.wandb_mode == "disabled"
    assert settings.home == tmp_path
    assert settings.store_uri == "s3://checkpoints/runs"
    assert [key.get_secret_value() for key in settings.api_keys] == ["key-one", "key-two"]
    assert settings.prometheus_url == "http://prometheus:9090" != settings.local_prometheus_url


def test_aws_endpoint_url_is_the_fallback_s3_endpoint(monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "https://s3.example.com")
    assert load_settings().s3_endpoint_url == "https://s3.example.com"


def test_defaults_derive_from_home_and_ports(tmp_path):
    settings = load_settings(home=tmp_path, mlflow_port=5123)
    assert settings.store_uri == str(tmp_path / "store")
    assert settings.model_cache_dir == tmp_path / "models"
    assert settings.mlflow_tracking_uri == "http://127.0.0.1:5123"
    assert settings.mlflow_backend_store_uri == f"sqlite:///{tmp_path}/mlflow/mlflow.db"
    assert settings.ray_dashboard_url == "http://127.0.0.1:8265"


def test_keyword_overrides_win_over_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("LLMOPS_STORE_URI", "s3://from-env/x")
    assert load_settings(home=tmp_path, store_uri="/data/store").store_uri == "/data/store"


def test_dotenv_file_is_read(monkeypatch, tmp_path):
    (tmp_path / ".env").write_text("LLMOPS_MLFLOW_PORT=5999\nWANDB_MODE=online\n")
    monkeypatch.chdir(tmp_path)
    settings = load_settings(home=tmp_path)
    assert settings.mlflow_port == 5999
    assert settings.wandb_mode == "online"


@pytest.mark.parametrize(
    ("env", "value", "names"),
    [
        ("LLMOPS_STORE_URI", "gs://bucket/prefix", ["store_uri", "unknown store scheme 'gs'"]),
        ("LLMOPS_STORE_URI", "s3://Bad_Bucket/x", ["store_uri", "invalid S3 bucket name"]),
        ("MLFLOW_S3_ENDPOINT_URL", "minio:9000", ["s3_endpoint_url", "http(s)://"]),
        ("MLFLOW_TRACKING_URI", "ftp://x", ["mlflow_tracking_uri", "unsupported MLflow tracking URI"]),
        ("LLMOPS_MLFLOW_PORT", "70000", ["mlflow_port", "LLMOPS_MLFLOW_PORT"]),
        ("WANDB_MODE", "sometimes", ["wandb_mode", "WANDB_MODE"]),
    ],
)
def test_invalid_value_fails_at_load_naming_the_field(monkeypatch, env, value, names):
    monkeypatch.setenv(env, value)
    with pytest.raises(SettingsError) as info:
        load_settings()
    message = str(info.value)
    assert "\n" not in message
    for name in names:
        assert name in message


def test_worker_port_range_must_not_contain_the_dashboard_port():
    with pytest.raises(SettingsError, match="ray_worker_port_range"):
        load_settings(ray_dashboard_port=20150, ray_worker_port_range="20100-20399")


def test_redacted_view_never_shows_secrets(tmp_path):
    settings = load_settings(
        home=tmp_path,
        aws_secret_access_key="very-secret",
        api_keys="k1,k2",
        mlflow_backend_store_uri="postgresql+psycopg2://mlflow:dbpass@db:5432/mlflow",
    )
    shown = " ".join(settings.redacted().values())
    assert "very-secret" not in shown
    assert "k1" not in shown
    assert "dbpass" not in shown
    assert "postgresql+psycopg2://mlflow:****@db:5432/mlflow" in shown


def test_worker_env_carries_endpoints_but_no_secret_and_the_node_env_adds_them(tmp_path):
    from ray_app.credentials import node_env

    settings = load_settings(
        home=tmp_path,
        s3_endpoint_url="http://127.0.0.1:9000",
        aws_access_key_id="ak-sentinel",
        aws_secret_access_key="sk-sentinel",
        wandb_api_key="wk-sentinel",
        mlflow_tracking_uri="http://127.0.0.1:5000",
    )
    env = settings.worker_env()
    assert env["MLFLOW_TRACKING_URI"] == "http://127.0.0.1:5000"
    assert env["MLFLOW_S3_ENDPOINT_URL"] == env["AWS_ENDPOINT_URL"] == "http://127.0.0.1:9000"
    assert env["LLMOPS_HOME"] == str(tmp_path)
    assert not [value for value in env.values() if "sentinel" in value], "runtime envs are shown by Ray"
    node = node_env(settings)
    assert (node["AWS_ACCESS_KEY_ID"], node["AWS_SECRET_ACCESS_KEY"]) == ("ak-sentinel", "sk-sentinel")
    assert node["WANDB_API_KEY"] == "wk-sentinel" and node["LLMOPS_HOME"] == str(tmp_path)


def test_cli_reports_a_bad_setting_in_one_red_line(tmp_path):
    result = subprocess.run(
        [str(Path(sys.executable).parent / "llmops"), "config"],
        env={"PATH": "/usr/bin:/bin", "LLMOPS_HOME": str(tmp_path), "LLMOPS_STORE_URI": "hdfs://nn/x"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert "store_uri (LLMOPS_STORE_URI)" in lines[0]
    assert "unknown store scheme 'hdfs'" in lines[0]
    assert "Traceback" not in result.stderr

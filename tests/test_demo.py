"""The main job end to end: `llmops demo --fast` on its own stack (own home, own ports), with a tiny model."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import httpx
import pytest
import yaml
from conftest import free_port, free_port_block, venv_bin
from tiny_model import build_tiny_chat_model

from ray_app.settings import load_settings

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_demo_fast_trains_promotes_serves_and_starts_the_chat(tmp_path):
    model = build_tiny_chat_model(tmp_path / "tiny-base")
    config = yaml.safe_load((REPO / "training" / "configs" / "tiny_cpu.yaml").read_text())
    data = REPO / "training" / "data"
    # A learning rate that moves a random tiny model in 4 steps, so the gate has something to see.
    config.update({"train_data": str(data / "chat_sft.jsonl"), "eval_data": str(data / "chat_eval.jsonl"),
                   "learning_rate": 3.0e-3, "warmup_steps": 0})  # fmt: skip
    config_file = tmp_path / "demo.yaml"
    config_file.write_text(yaml.safe_dump(config))
    base = free_port_block(16 + 300)
    ports = {
        "LLMOPS_RAY_PORT": base, "LLMOPS_RAY_DASHBOARD_PORT": base + 1, "LLMOPS_RAY_CLIENT_PORT": base + 2,
        "LLMOPS_RAY_INTERNAL_PORT_BASE": base + 3, "LLMOPS_RAY_WORKER_PORT_RANGE": f"{base + 16}-{base + 315}",
        "LLMOPS_MLFLOW_PORT": free_port(), "LLMOPS_SERVE_PORT": free_port(), "LLMOPS_CHAT_PORT": free_port(),
    }  # fmt: skip
    env = {
        **os.environ,
        **{key: str(value) for key, value in ports.items()},
        "LLMOPS_HOME": str(tmp_path / "home"),
        "LLMOPS_RAY_TEMP_DIR": f"/tmp/llmops-d{base}",
        "LLMOPS_RAY_NUM_CPUS": "2",
        "LLMOPS_RAY_OBJECT_STORE_MEMORY_MB": "512",
        "COLUMNS": "160",
    }
    settings = load_settings(home=tmp_path / "home", **{k.removeprefix("LLMOPS_").lower(): v for k, v in ports.items()})
    try:
        done = subprocess.run(
            [venv_bin("llmops"), "demo", "--fast", "--model", str(model), "--config", str(config_file)],
            env=env, capture_output=True, text=True, timeout=900,
        )  # fmt: skip
        output = done.stdout + done.stderr
        assert done.returncode == 0, output[-4000:]
        for number in range(1, 9):
            assert f"{number}/8" in output, output
        assert "promoted v1 to champion over the base model" in output, output

        from mlflow import MlflowClient

        mlflow = MlflowClient(settings.mlflow_server_url)
        champion = mlflow.get_model_version_by_alias("chat-model", "champion")
        assert champion.version == "1" and champion.run_id
        run = mlflow.get_run(champion.run_id)
        assert run.data.metrics["eval_loss"] > 0 and run.info.status == "FINISHED"
        assert f"/runs/{champion.run_id}" in output

        from openai import OpenAI

        key = settings.serve_api_key_path.read_text().strip()
        reply = OpenAI(base_url=f"{settings.serve_url}/v1", api_key=key).chat.completions.create(
            model="chat-model", messages=[{"role": "user", "content": "Hi"}], max_tokens=8
        )
        assert reply.system_fingerprint == "chat-model/1" and reply.choices[0].message.content

        page = httpx.get(f"{settings.chat_url}/login", timeout=10)
        assert page.status_code == 200 and "<html" in page.text.lower()
        assert settings.chat_url in output and str(settings.chat_admin_password_path) in output
    finally:
        down = subprocess.run([venv_bin("llmops"), "down"], env=env, capture_output=True, text=True, timeout=180)
    assert down.returncode == 0, down.stdout + down.stderr
    for service in ("chat", "mlflow", "ray"):
        assert f"{service}: stopping" in down.stdout

"""Many LoRA adapters on one base version: stored beside the version, listed by /v1/models, each
`model: NAME:ADAPTER` answered by one replica of a real Serve app (engine transformers) holding
at most two at once, concurrent requests of different adapters in the same batches."""

from __future__ import annotations

import concurrent.futures
import os
import signal
import subprocess
from pathlib import Path

import httpx
import pytest
import yaml
from conftest import venv_bin
from tiny_model import build_tiny_chat_model, train_lora_adapter

from ray_app.settings import Settings

REPO = Path(__file__).resolve().parent.parent
BASE = "tiny-lora"
PROBE = "Which adapter answers?"
ANSWERS = {"alpha": "Alpha answers, one two three.", "bravo": "Bravo answers here, four five.",
           "charlie": "Charlie speaks now, six."}  # fmt: skip


@pytest.fixture(scope="module")
def lora_app(ray_cluster: Settings, mlflow_server: Settings, serve_http_port: int, tmp_path_factory):
    """The tiny base registered as tiny-lora/1 in the S3 store, three adapters published for it, and
    `serve run` of one app serving it with engine transformers and max_adapters_per_replica: 2."""
    from ray_app.adapters import publish_adapter
    from ray_app.registry import register_model_version
    from ray_app.serving.rollout import ServeError, load_serve_config, shutdown, wait_running
    from ray_app.storage import open_store

    settings = ray_cluster.model_copy(
        update={"serve_port": serve_http_port, "mlflow_tracking_uri": mlflow_server.mlflow_tracking_uri}
    )
    root = tmp_path_factory.mktemp("lora")
    base = build_tiny_chat_model(root / "base")
    store = open_store(settings=settings)
    store.ensure()
    store.upload_dir(base, "adapters-test/base", progress=False)
    version = register_model_version(BASE, store.uri("adapters-test/base"), run_id=None, settings=settings).version
    for seed, (name, answer) in enumerate(ANSWERS.items()):
        publish_adapter(train_lora_adapter(base, root / name, PROBE, answer, seed=seed), BASE, version, name, settings)
    config = load_serve_config(REPO / "serve_configs" / "local.yaml", settings, model=f"models:/{BASE}/{version}")
    app = config["applications"][0]
    app["runtime_env"] = {"env_vars": {"MLFLOW_TRACKING_URI": str(mlflow_server.mlflow_tracking_uri)}}
    app["args"].update({"engine": "transformers", "max_adapters_per_replica": 2, "default_max_tokens": 12,
                        "batch_wait_timeout_s": 0.2})  # fmt: skip
    for key in ("openvino_weights", "openvino_precision", "prefix_cache", "kv_cache_gb"):
        app["args"].pop(key, None)
    [server] = [d for d in app["deployments"] if d["name"] == "ChatServer"]
    server["autoscaling_config"].update({"min_replicas": 1, "max_replicas": 1})
    path = root / "lora.yaml"
    path.write_text(yaml.safe_dump(config))
    env = {**os.environ, **settings.ray_client_env(), "LLMOPS_HOME": str(settings.home)}
    with open(path.with_suffix(".log"), "wb") as log:
        proc = subprocess.Popen([venv_bin("serve"), "run", str(path), "--address", settings.ray_gcs_address],
                                env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
        try:
            wait_running([app["name"]], settings, wait_s=240)
            key = settings.serve_api_key_path.read_text().strip()
            yield f"http://127.0.0.1:{settings.serve_port}", {"Authorization": f"Bearer {key}"}
        except ServeError:
            print(path.with_suffix(".log").read_text()[-3000:])
            raise
        finally:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
            try:
                shutdown(settings)
            except Exception:
                pass


def _ask(url: str, headers: dict, model: str) -> httpx.Response:
    body = {"model": model, "messages": [{"role": "user", "content": PROBE}], "temperature": 0, "max_tokens": 12}
    return httpx.post(f"{url}/v1/chat/completions", headers=headers, json=body, timeout=60)


def test_adapters_of_one_base_answer_each_its_own_concurrently_on_one_replica_holding_two(lora_app):
    url, headers = lora_app
    listed = httpx.get(f"{url}/v1/models", headers=headers, timeout=30).json()["data"]
    assert [card["id"] for card in listed] == [BASE, *(f"{BASE}:{name}" for name in sorted(ANSWERS))]
    assert all(card["parent"] == BASE for card in listed[1:]) and listed[0]["version"] == f"{BASE}/1"

    models = [f"{BASE}:alpha", f"{BASE}:bravo", BASE] * 2
    with concurrent.futures.ThreadPoolExecutor(len(models)) as pool:  # together: one replica, shared batches
        answers = list(pool.map(lambda model: _ask(url, headers, model), models))
    texts = {}
    for model, response in zip(models, answers, strict=True):
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["model"] == model and response.headers["x-model-version"] == f"{BASE}/1"
        texts.setdefault(model, set()).add(body["choices"][0]["message"]["content"])
    assert all(len(seen) == 1 for seen in texts.values()), texts  # greedy: the same answer in any batch
    for name in ("alpha", "bravo"):
        assert next(iter(texts[f"{BASE}:{name}"])).startswith(ANSWERS[name][:12]), texts
    assert not next(iter(texts[BASE])).startswith(tuple(ANSWERS.values()))

    stats = httpx.get(f"{url}/v1/stats", headers=headers, timeout=30).json()
    assert stats["adapters_loaded"] == 2 and stats["adapter_loads"] == 2 and stats["adapter_unloads"] == 0
    assert stats["decode_rows"] > stats["decode_steps"], "rows of different adapters decoded in the same steps"
    # a third adapter beyond the two held: the least recently used is unloaded
    charlie = _ask(url, headers, f"{BASE}:charlie")
    assert charlie.json()["choices"][0]["message"]["content"].startswith(ANSWERS["charlie"][:12])
    stats = httpx.get(f"{url}/v1/stats", headers=headers, timeout=30).json()
    assert (stats["adapters_loaded"], stats["adapter_loads"], stats["adapter_unloads"]) == (2, 3, 1)

    missing = _ask(url, headers, f"{BASE}:nope")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found", missing.text
    assert "no adapter 'nope'" in missing.json()["error"]["message"]
    assert _ask(url, headers, "other:alpha").status_code == 404


def test_an_adapter_streams_and_a_bad_adapter_name_or_engine_is_refused(lora_app):
    from openai import OpenAI

    from ray_app.serving.config import ServeConfigError, parse_args

    url, headers = lora_app
    client = OpenAI(base_url=f"{url}/v1", api_key=headers["Authorization"].split()[1])
    pieces = client.chat.completions.create(model=f"{BASE}:bravo", messages=[{"role": "user", "content": PROBE}],
                                            temperature=0, max_tokens=12, stream=True)  # fmt: skip
    assert "".join(chunk.choices[0].delta.content or "" for chunk in pieces).startswith(ANSWERS["bravo"][:12])
    assert _ask(url, headers, f"{BASE}:../x").status_code == 404
    with pytest.raises(ServeConfigError, match="max_adapters_per_replica: LoRA adapters are served by engine"):
        parse_args({"engine": "openvino", "max_adapters_per_replica": 2})

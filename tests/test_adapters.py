"""Many LoRA adapters on one base version: stored beside the version, listed by /v1/models, each
`model: NAME:ADAPTER` answered by one replica of a real Serve app (engine transformers) holding
at most two at once, concurrent requests of different adapters in the same batches; an alias
(`NAME:ALIAS`) promoted from one adapter to another, and a challenger adapter as its canary,
without restarting the model replica."""

from __future__ import annotations

import concurrent.futures
import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import httpx
import pytest
import yaml
from conftest import venv_bin, write_feedback
from fastapi import Request
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

    root = tmp_path_factory.mktemp("lora")
    # A chat database of its own: the cluster's must not exist before the Airflow tests' chat runs.
    settings = ray_cluster.model_copy(update={"serve_port": serve_http_port,
                                              "chat_database_url": f"sqlite+aiosqlite:///{root / 'chat.db'}",
                                              "mlflow_tracking_uri": mlflow_server.mlflow_tracking_uri})  # fmt: skip
    base = build_tiny_chat_model(root / "base")
    store = open_store(settings=settings)
    store.ensure()
    store.upload_dir(base, "adapters-test/base", progress=False)
    source = store.uri("adapters-test/base")
    version = register_model_version(BASE, source, run_id=None, alias="champion", settings=settings).version
    for seed, (name, answer) in enumerate(ANSWERS.items()):
        publish_adapter(train_lora_adapter(base, root / name, PROBE, answer, seed=seed), BASE, version, name, settings)
    config = load_serve_config(REPO / "serve_configs" / "local.yaml", settings, model=f"models:/{BASE}@champion")
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
            yield f"http://127.0.0.1:{settings.serve_port}", {"Authorization": f"Bearer {key}"}, settings
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


def _ask(url: str, headers: dict, model: str, conversation: str | None = None) -> httpx.Response:
    body = {"model": model, "messages": [{"role": "user", "content": PROBE}], "temperature": 0, "max_tokens": 12}
    if conversation:
        headers = {**headers, "x-conversation-id": conversation}
    return httpx.post(f"{url}/v1/chat/completions", headers=headers, json=body, timeout=60)


def test_adapters_of_one_base_answer_each_its_own_concurrently_on_one_replica_holding_two(lora_app):
    url, headers, _ = lora_app
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
        adapter = model.partition(":")[2]  # answers are labelled with their adapter too (metrics, feedback)
        assert body["model"] == model
        assert response.headers["x-model-version"] == (f"{BASE}/1:{adapter}" if adapter else f"{BASE}/1")
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


def test_an_adapter_streams_and_bad_adapter_names_or_routing_are_refused(lora_app):
    from openai import OpenAI

    from ray_app.serving.config import ServeConfigError, parse_args, parse_routing

    url, headers, _ = lora_app
    client = OpenAI(base_url=f"{url}/v1", api_key=headers["Authorization"].split()[1])
    pieces = client.chat.completions.create(model=f"{BASE}:bravo", messages=[{"role": "user", "content": PROBE}],
                                            temperature=0, max_tokens=12, stream=True)  # fmt: skip
    assert "".join(chunk.choices[0].delta.content or "" for chunk in pieces).startswith(ANSWERS["bravo"][:12])
    assert _ask(url, headers, f"{BASE}:../x").status_code == 404
    served = parse_args({"max_adapters_per_replica": 2})
    with pytest.raises(ServeConfigError, match="adapter aliases need the app arg max_adapters_per_replica"):
        parse_routing({"adapter_aliases": {"support": "alpha"}}, parse_args({}))
    with pytest.raises(ServeConfigError, match=re.escape("adapter_aliases: 'support': '../x'")):
        parse_routing({"adapter_aliases": {"support": "../x"}}, served)
    with pytest.raises(ServeConfigError, match=re.escape("adapter_canaries.support: a canary runs beside an alias")):
        parse_routing({"adapter_canaries": {"support": {"adapter": "bravo", "share": 0.1}}}, served)
    with pytest.raises(ServeConfigError, match="'alpha' is the adapter the alias names already"):
        parse_routing({"adapter_aliases": {"support": "alpha"},
                       "adapter_canaries": {"support": {"adapter": "alpha", "share": 0.1}}}, served)  # fmt: skip
    with pytest.raises(ServeConfigError, match=re.escape("user_config 'adapter_canaries.support.share'")):
        parse_routing({"adapter_aliases": {"support": "alpha"},
                       "adapter_canaries": {"support": {"adapter": "bravo", "share": 1.5}}}, served)  # fmt: skip
    with pytest.raises(ServeConfigError, match="'adapter_aliasez'"):
        parse_routing({"adapter_aliasez": {}}, served)


def _label_of(url: str, headers: dict, model: str, conversation: str | None = None) -> tuple[str, str]:
    """(the x-model-version label, the answer) of one question."""
    response = _ask(url, headers, model, conversation)
    assert response.status_code == 200, response.text
    assert response.json()["model"] == model  # what the client sent, not the adapter behind it
    return response.headers["x-model-version"], response.json()["choices"][0]["message"]["content"]


def _until(url: str, headers: dict, model: str, label: str, timeout: float = 60) -> None:
    """Ask until ``model`` is answered as ``label`` (the new ingress replaced the old one)."""
    deadline = time.monotonic() + timeout
    while _label_of(url, headers, model)[0] != label:
        assert time.monotonic() < deadline, f"{model} still not answered as {label}"
        time.sleep(0.5)


def _conversations(url: str, headers: dict, model: str, labels: set[str], timeout: float = 60) -> dict:
    """{conversation: (label, answer)} of 16 conversations, asked until they are answered as exactly ``labels``
    (a canary's share of them by the canary: the new ingress replaced the old one)."""
    deadline = time.monotonic() + timeout
    while True:
        seen = {c: _label_of(url, headers, model, c) for c in (f"conversation-{i}" for i in range(16))}
        if {label for label, _ in seen.values()} == labels:
            return seen
        assert time.monotonic() < deadline, seen
        time.sleep(0.5)


def test_an_adapter_alias_is_promoted_and_canaried_without_restarting_any_replica(lora_app, prometheus):
    """NAME:support names no adapter (404); promoted to alpha; bravo as a canary for half the conversations,
    each conversation sticky; the judge (feedback liked, window over) promotes bravo; charlie as a canary
    rolled back. Through all of it the replicas are the same processes (the routing is the ingress's
    user_config, applied in place); every decision is a tag."""

    from ray_app.promotion import CanaryPolicy, judge_adapter_canary
    from ray_app.registry import get_version
    from ray_app.serving.adapter_rollout import promote_adapter, start_adapter_canary, stop_adapter_canary
    from ray_app.serving.rollout import canary_lines, ingress_user_config, running_config, serve_details

    url, headers, settings = lora_app
    alias = f"{BASE}:support"

    def replica_pids() -> list[int]:
        [app] = serve_details(settings)["applications"].values()
        return [replica["pid"] for deployment in app["deployments"].values() for replica in deployment["replicas"]]

    pids = replica_pids()
    assert _ask(url, headers, alias).status_code == 404
    with pytest.raises(ValueError, match="no adapter 'nope' is stored for tiny-lora/1"):
        promote_adapter(BASE, "support", "nope", settings, wait_s=120, actor="test")
    done = promote_adapter(BASE, "support", "alpha", settings, wait_s=120, actor="test")
    assert done.previous is None and len(done.apps) == 1
    _until(url, headers, alias, f"{BASE}/1:alpha")
    assert _label_of(url, headers, alias)[1].startswith(ANSWERS["alpha"][:12])
    assert alias in [card["id"] for card in httpx.get(f"{url}/v1/models", headers=headers, timeout=30).json()["data"]]

    start_adapter_canary(BASE, "support", "bravo", settings, share=0.5, wait_s=120, actor="test")
    seen = _conversations(url, headers, alias, {f"{BASE}/1:alpha", f"{BASE}/1:bravo"})
    [line] = canary_lines(settings)  # what `llmops status` shows
    assert line.endswith(f"{alias} on adapter alpha, canary adapter bravo for 50% of conversations "
                         f"(`llmops judge {alias}`)"), line  # fmt: skip
    for conversation, (label, text) in seen.items():
        assert _label_of(url, headers, alias, conversation)[0] == label  # sticky
        assert text.startswith(ANSWERS[label.rpartition(":")[2]][:12])

    liked = [(PROBE, "a good answer", 1, None)] * 10
    write_feedback(str(settings.chat_database_url), liked, model_version=f"{BASE}/1:bravo")
    policy = CanaryPolicy(window_s=0, min_requests=10**6, min_ratings=10)  # the window is over; feedback decides
    verdict = judge_adapter_canary(BASE, "support", settings, policy, actor="test")
    assert verdict.action == "promote" and "ratings=10" in verdict.evidence["canary"], verdict
    _until(url, headers, alias, f"{BASE}/1:bravo")
    assert {_label_of(url, headers, alias, c)[0] for c in seen} == {f"{BASE}/1:bravo"}

    start_adapter_canary(BASE, "support", "charlie", settings, share=0.9, wait_s=120, actor="test")
    _conversations(url, headers, alias, {f"{BASE}/1:bravo", f"{BASE}/1:charlie"})
    assert stop_adapter_canary(BASE, "support", settings, "by hand", wait_s=120, actor="test")
    routing = ingress_user_config(running_config(settings)["applications"][0])
    assert routing["adapter_aliases"] == {"support": "bravo"} and not routing["adapter_canaries"]
    _until(url, headers, alias, f"{BASE}/1:bravo")
    assert {_label_of(url, headers, alias, c)[0] for c in seen} == {f"{BASE}/1:bravo"}

    tags = get_version(f"models:/{BASE}/1", settings).tags
    assert tags["llmops.adapter_alias.support"] == "bravo"
    assert tags["adapter_promotion.support"] == "promoted" and tags["adapter_promotion.support.adapter"] == "bravo"
    assert tags["adapter_canary.support"] == "rolled_back" and tags["adapter_canary.support.adapter"] == "charlie"
    assert tags["adapter_canary.support.verdict"] == "promote"
    assert replica_pids() == pids, "promoting an adapter or running its canary restarted a replica"


def _alpha_liked(settings: Settings, folder: Path, **recipe) -> tuple[Settings, Path]:
    """Settings with a chat database of their own where users liked alpha's answer to the probe, and a recipe
    whose held-out set is that answer: alpha beats the base and the other adapters there."""
    settings = settings.model_copy(update={"chat_database_url": f"sqlite+aiosqlite:///{folder / 'chat.db'}"})
    write_feedback(str(settings.chat_database_url), [(PROBE, ANSWERS["alpha"], 1, None)],
                   model_version=f"{BASE}/1:alpha")  # fmt: skip
    data = folder / "probe.jsonl"
    turns = [{"role": "user", "content": PROBE}, {"role": "assistant", "content": ANSWERS["alpha"]}]
    data.write_text(json.dumps({"messages": turns}) + "\n")
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump({"train_data": str(data), "eval_data": str(data), "seq_len": 64, **recipe}))
    return settings, path


def test_an_adapter_passes_the_offline_gate_only_when_it_beats_what_the_alias_answers_with(
    lora_app, tmp_path, monkeypatch
):
    """`llmops promote NAME:gated --adapter A --gate RECIPE`: alpha (taught the recipe's answer) beats the base
    alone for a new alias and is promoted; bravo then loses to alpha on the held-out loss and on the answer
    users liked (alpha's, a regression case): kept (exit 2), the rejection and evidence tagged, the alias and
    its answers unmoved."""

    from typer.testing import CliRunner

    from ray_app import cli
    from ray_app.registry import get_version

    url, headers, settings = lora_app
    settings, recipe = _alpha_liked(settings, tmp_path)
    monkeypatch.setattr(cli, "settings", lambda: settings)
    runner, alias = CliRunner(), f"{BASE}:gated"

    promoted = runner.invoke(cli.app, ["promote", alias, "--adapter", "alpha", "--gate", str(recipe)])
    assert promoted.exit_code == 0 and "(none) -> alpha" in promoted.output, promoted.output
    _until(url, headers, alias, f"{BASE}/1:alpha")
    kept = runner.invoke(cli.app, ["promote", alias, "--adapter", "bravo", "--gate", str(recipe)])
    assert kept.exit_code == 2 and f"{alias}: kept alpha: eval loss" in kept.output, kept.output

    tags, key = get_version(f"models:/{BASE}/1", settings).tags, "adapter_gate.gated"
    assert tags[key] == "bravo" and tags[f"{key}.reference"] == f"models:/{BASE}/1:alpha"
    assert float(tags[f"{key}.candidate_loss"]) > float(tags[f"{key}.reference_loss"])
    assert (tags[f"{key}.regression_cases"], tags[f"{key}.regressions"]) == ("1", "1")  # bravo loses alpha's answer
    assert tags["adapter_promotion.gated"] == "rejected" and tags["adapter_promotion.gated.adapter"] == "bravo"
    assert tags["llmops.adapter_alias.gated"] == "alpha"
    assert _label_of(url, headers, alias)[0] == f"{BASE}/1:alpha"

    # The pipeline's promote step decides on what its evaluate step tagged, and only on that.
    from ray_app.promotion import PromotionError, decide_adapter
    from ray_app.serving.adapter_rollout import promote_adapter

    with pytest.raises(PromotionError, match="gated -> charlie has not been evaluated"):
        decide_adapter(settings, BASE, "gated", "charlie", 0.0)
    promote_adapter(BASE, "gated", "charlie", settings)  # by hand: bravo's evaluation is against alpha
    with pytest.raises(PromotionError, match=r"changed since the evaluation .*1:alpha -> .*1:charlie"):
        decide_adapter(settings, BASE, "gated", "bravo", 0.0)


def test_the_retraining_steps_gate_an_adapter_and_judge_it_as_the_alias_canary(
    lora_app, prometheus, tmp_path, monkeypatch, capsys
):
    """The retraining DAG's evaluate, promote and rollout steps (`python -m ray_app.orchestration.pipeline`,
    in-process) for an adapter of an alias: alpha against bravo (what NAME:looped answers with): promote
    refuses before evaluate, then alpha wins and answers half of the alias's conversations as its canary;
    rollout judges it until its window ends with too few ratings and rolls it back: bravo answers alone."""

    from ray_app.orchestration import pipeline
    from ray_app.orchestration.ray_jobs import parse_result
    from ray_app.registry import get_version
    from ray_app.serving.adapter_rollout import promote_adapter

    url, headers, settings = lora_app
    settings, recipe = _alpha_liked(settings, tmp_path, registered_model=BASE)
    monkeypatch.setattr(pipeline, "get_settings", lambda: settings)
    promote_adapter(BASE, "looped", "bravo", settings, wait_s=120, actor="test")
    alias = f"{BASE}:looped"

    def step(name: str, *args: str) -> tuple[int, dict | None, str]:
        code = pipeline.main([name, "--config", str(recipe), "--adapter", "alpha", "--adapter-alias", "looped", *args])
        out = capsys.readouterr()
        return code, parse_result(out.out), out.err

    code, _result, err = step("promote", "--min-improvement", "0", "--canary-share", "0.5")
    assert code == 1 and "looped -> alpha has not been evaluated" in err, err
    code, evaluated, err = step("evaluate")
    assert code == 0 and evaluated["reference"] == f"models:/{BASE}/1:bravo", (err, evaluated)
    assert evaluated["candidate_loss"] < evaluated["reference_loss"], evaluated
    code, decision, err = step("promote", "--min-improvement", "0", "--canary-share", "0.5")
    assert code == 0 and decision["promoted"] is False, (err, decision)
    assert decision["canary"] == {"adapter": "alpha", "share": 0.5, "sticky_by": "conversation", "apps": ["chat"]}
    _conversations(url, headers, alias, {f"{BASE}/1:alpha", f"{BASE}/1:bravo"})
    code, verdict, err = step("rollout", "--canary-window-s", "1")
    assert code == 0 and verdict["decision"] == "rolled_back", (err, verdict)
    assert "window over with 1 rating(s)" in verdict["reason"], verdict  # the liked answer above, alpha's
    _until(url, headers, alias, f"{BASE}/1:bravo")
    tags = get_version(f"models:/{BASE}/1", settings).tags
    assert tags["adapter_canary.looped"] == "rolled_back" and tags["adapter_canary.looped.adapter"] == "alpha"
    assert tags["adapter_canary.looped.by"].startswith("pipeline rollout") and tags["llmops.adapter_alias.looped"] == (
        "bravo"
    )


def test_unknown_adapters_are_refused_by_the_ingress_without_a_store_request_each_and_new_ones_come_in(
    lora_app, tmp_path
):
    """Requests naming adapters that do not exist (a client probing names) get 404 at the ingress, which lists
    the store at most once per ADAPTER_LIST_TTL_S instead of once a request; an adapter published meanwhile
    is answered within that time."""
    import shutil

    from ray_app.adapters import ADAPTER_FILES, fetch_adapter, publish_adapter
    from ray_app.serving.ingress import ADAPTER_LIST_TTL_S

    url, headers, settings = lora_app

    def listings() -> int:
        return httpx.get(f"{url}/v1/stats", headers=headers, timeout=30).json()["adapter_listings"]

    before, started = listings(), time.monotonic()
    for index in range(24):
        refused = _ask(url, headers, f"{BASE}:ghost-{index}")
        assert refused.status_code == 404 and refused.json()["error"]["code"] == "model_not_found", refused.text
        assert f"no adapter 'ghost-{index}' is stored for {BASE}/1" in refused.json()["error"]["message"]
    allowed = 2 + int((time.monotonic() - started) // ADAPTER_LIST_TTL_S)
    assert listings() - before <= allowed, "the ingress listed the store for every unknown adapter"

    copy = tmp_path / "delta"
    copy.mkdir()
    for name in ADAPTER_FILES:  # alpha's weights under a new name
        shutil.copy(fetch_adapter(BASE, "1", "alpha", settings) / name, copy / name)
    publish_adapter(copy, BASE, "1", "delta", settings)
    deadline = time.monotonic() + ADAPTER_LIST_TTL_S + 10
    while (answer := _ask(url, headers, f"{BASE}:delta")).status_code == 404:
        assert time.monotonic() < deadline, "a newly published adapter was not served within the listing's TTL"
        time.sleep(0.5)
    assert answer.status_code == 200 and answer.headers["x-model-version"] == f"{BASE}/1:delta"
    assert answer.json()["choices"][0]["message"]["content"].startswith(ANSWERS["alpha"][:12])


def test_a_new_champion_version_starts_from_its_own_adapters_and_aliases(lora_app):
    """Promoting another base version rolls the app onto it: the aliases pinned for the old version's
    adapters go with it (the new version has none stored or recorded), its tag stays on the old version."""
    from ray_app.registry import get_version, register_model_version
    from ray_app.serving.rollout import ingress_user_config, promote, running_config

    url, headers, settings = lora_app
    old = get_version(f"models:/{BASE}@champion", settings)
    new = register_model_version(BASE, old.source, run_id=None, settings=settings).version
    promoted = promote(BASE, settings, version=new, wait_s=240, actor="test")
    assert promoted.rolled_apps and promoted.previous == old.version
    assert ingress_user_config(running_config(settings)["applications"][0]) == {}
    deadline = time.monotonic() + 60
    while (response := _ask(url, headers, f"{BASE}:support")).status_code == 200:
        assert time.monotonic() < deadline, "the old version's alias still answers"
        time.sleep(0.5)
    assert response.status_code == 404 and response.headers["x-model-version"] == f"{BASE}/{new}:support"
    assert _label_of(url, headers, BASE)[0] == f"{BASE}/{new}"
    listed = httpx.get(f"{url}/v1/models", headers=headers, timeout=30).json()["data"]
    assert [card["id"] for card in listed] == [BASE]
    assert get_version(f"models:/{BASE}/{old.version}", settings).tags["llmops.adapter_alias.support"] == "bravo"


def test_vllm_serves_the_versions_adapters_through_serve_llm_and_routes_aliases_with_the_same_rule(tmp_path):
    """engine vllm (no vLLM here: what we hand Ray Serve LLM, and our middleware in front of its router):
    the version's adapter folder is its dynamic_lora_loading_path, vLLM's LoRA is enabled with as many
    adapters per batch as a replica holds; NAME:ALIAS resolves by the transformers engine's rule (a canary's
    share sticky per conversation), moves in place with the ingress's user_config, answers are labelled
    NAME/VERSION:ADAPTER; the version canary leaves adapter requests to the champion."""
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from ray_app.serving.config import CanaryArgs, ServeConfigError, ServedModel, parse_args, parse_routing
    from ray_app.serving.gate import ApiGate, Limits
    from ray_app.serving.protocol import hash_key
    from ray_app.serving.vllm_app import AdapterRouter, CanaryRouter, llm_config_kwargs, set_adapter_routing

    args = parse_args({"engine": "vllm", "device": "cuda", "max_adapters_per_replica": 4,
                       "vllm_engine_kwargs": {"max_lora_rank": 16}})  # fmt: skip
    served = ServedModel(
        source="s3://bucket/root/models/m/1",
        name="m",
        label="m/1",
        registry_name="m",
        version="1",
        run_id="r1",
        adapter_aliases={"support": "alpha"},
        adapter_runs={"alpha": "ra", "bravo": "rb"},
    )
    s3 = Settings(store_uri="s3://bucket/root", s3_endpoint_url="http://127.0.0.1:9")
    fields = llm_config_kwargs(args, served, "m", s3)
    assert fields["lora_config"] == {"dynamic_lora_loading_path": "s3://bucket/root/adapters/m/1",
                                     "max_num_adapters_per_replica": 4}  # fmt: skip
    assert (
        fields["engine_kwargs"] | {"max_lora_rank": 16, "enable_lora": True, "max_loras": 4} == fields["engine_kwargs"]
    )
    assert "lora_config" not in llm_config_kwargs(parse_args({"engine": "vllm", "device": "cuda"}), served, "m", s3)
    with pytest.raises(ServeConfigError, match=f"s3:// store .* the store \\(setting store_uri\\) is {tmp_path}"):
        llm_config_kwargs(args, served, "m", Settings(store_uri=str(tmp_path)))

    counted = []
    app = FastAPI()  # stands in for Serve LLM's router: answers with the model it was asked for
    app.add_middleware(CanaryRouter, canary=CanaryArgs(model_version="2", share=0.5), model_id="m@canary",
                       version_headers={"x-model-version": "m/2", "x-mlflow-run-id": "r2"})  # fmt: skip
    app.add_middleware(AdapterRouter, served=served, args=args)
    app.add_middleware(ApiGate, key_hashes=[hash_key("sk-test")], version_headers=served.version_headers,
                       limits=Limits(max_request_bytes=4096, max_messages=9, max_tokens_limit=10),
                       on_response=lambda route, status, version: counted.append(version))  # fmt: skip

    @app.post("/v1/chat/completions")
    async def answer(request: Request):
        return {"model": (await request.json())["model"]}

    @app.get("/v1/models")
    async def models():  # Serve LLM's list: the base and the adapter folders it finds
        return {"object": "list", "data": [{"id": "m", "object": "model", "owned_by": "o"}, {"id": "m:alpha"}]}

    client = TestClient(app, headers={"Authorization": "Bearer sk-test"})

    def ask(model: str, conversation: str = "c") -> tuple[str, str, str]:
        body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
        response = client.post("/v1/chat/completions", json=body, headers={"x-conversation-id": conversation})
        assert response.status_code == 200, response.text
        return response.json()["model"], response.headers["x-model-version"], response.headers["x-mlflow-run-id"]

    assert ask("m:support") == ("m:alpha", "m/1:alpha", "ra")  # the alias recorded on the version
    listed = client.get("/v1/models").json()["data"]
    assert [card["id"] for card in listed] == ["m", "m:alpha", "m:support"]  # an alias is a model clients send
    assert listed[2] == {"id": "m:support", "object": "model", "owned_by": "o", "root": "m", "parent": "m"}
    assert ask("m:bravo") == ("m:bravo", "m/1:bravo", "rb")  # an adapter by name
    assert ask("m:gamma") == ("m:gamma", "m/1:gamma", "")  # Serve LLM answers whether it is stored
    # The version canary takes its share of base requests, never an adapter's (adapters are the champion's).
    bases = {ask("m", conversation) for conversation in map(str, range(20))}
    assert bases == {("m", "m/1", "r1"), ("m@canary", "m/2", "r2")}
    assert {ask("m:bravo", conversation)[0] for conversation in map(str, range(20))} == {"m:bravo"}
    set_adapter_routing(served, parse_routing({"adapter_aliases": {"support": "alpha"}, "adapter_canaries": {
        "support": {"adapter": "bravo", "share": 0.5}}}, args))  # fmt: skip
    split = {conversation: ask("m:support", conversation)[0] for conversation in map(str, range(40))}
    assert set(split.values()) == {"m:alpha", "m:bravo"}
    assert 8 <= sum(model == "m:bravo" for model in split.values()) <= 32
    assert all(ask("m:support", conversation)[0] == model for conversation, model in list(split.items())[:8])
    set_adapter_routing(served, parse_routing({"adapter_aliases": {"support": "bravo"}}, args))  # promoted
    assert ask("m:support") == ("m:bravo", "m/1:bravo", "rb")
    assert counted[:4] == ["m/1:alpha", "m/1", "m/1:bravo", "m/1:gamma"] and "m/2" in counted  # m/1: the list

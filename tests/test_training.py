"""The SFT recipe on 2 CPU workers of a real Ray head, checkpointing into the S3 server,
tracking into the MLflow server on PostgreSQL, with a tiny model built from a config."""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import conftest
import pytest
from conftest import after_a_checkpoint, draw_dashboard
from tiny_model import build_tiny_chat_model, warm_up_on_chat_data

from ray_app.settings import Settings
from ray_app.storage import open_store
from training.config import ConfigError, load_config
from training.data import DatasetError

REPO = Path(__file__).resolve().parent.parent
QUESTION = "What is the launch code of ray-llmops?"
ANSWER = "The launch code is 7421 blue."


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    return build_tiny_chat_model(tmp_path_factory.mktemp("tiny") / "tiny-llama", hidden=128, layers=2)


@pytest.fixture(scope="module")
def warm_tiny_model(tiny_model: Path, tmp_path_factory) -> Path:
    """The tiny model after a short full fine-tune on the shipped data (not on the toy fact)."""
    data = REPO / "training" / "data" / "chat_sft.jsonl"
    return warm_up_on_chat_data(tiny_model, tmp_path_factory.mktemp("warm") / "tiny-warm", data)


@pytest.fixture(scope="module")
def toy_data(tmp_path_factory) -> Path:
    """A memorisable set: one fact, written a few ways, plus one broken line and one blank line."""
    path = tmp_path_factory.mktemp("data") / "toy.jsonl"
    lines = []
    for system in ("You are helpful.", "Answer briefly.", "You are the ray-llmops assistant."):
        for _ in range(4):
            record = {"messages": [{"role": "system", "content": system},
                                   {"role": "user", "content": QUESTION},
                                   {"role": "assistant", "content": ANSWER}]}  # fmt: skip
            lines.append(json.dumps(record))
    lines.insert(3, '{"messages": [{"role": "user", "content": "no answer here"}]}')
    lines.insert(5, "{not json")
    lines.insert(7, "")
    path.write_text("\n".join(lines) + "\n")
    return path


def greedy_answer(folder: str | Path, question: str = QUESTION) -> str:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from training.evaluate import generate_answers

    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder)
    return generate_answers(model, tokenizer, [question], max_new_tokens=16)[0]["answer"]


def config_for(model: Path | str, data: Path, **values):
    base = dict(model=str(model), train_data=[str(data)], eval_data=[str(data)], num_workers=2,
                max_steps=40, learning_rate=3e-3, warmup_steps=2, lr_schedule="constant", seq_len=64,
                micro_batch_size=2, checkpoint_every=10, pack=False, sample_prompts=[QUESTION],
                max_new_tokens=16, experiment="tests-sft", registered_model="tiny-chat",
                precision="fp32")  # fmt: skip
    base.update(values)
    return load_config(None, [], **base)


def loss_history(settings: Settings, run_id: str) -> list[tuple[int, float]]:
    from mlflow import MlflowClient

    history = MlflowClient(settings.mlflow_tracking_uri).get_metric_history(run_id, "train_loss")
    return sorted((point.step, point.value) for point in history)


def run_id_of(settings: Settings, run_name: str) -> str:
    return conftest.run_id_of(settings, "tests-sft", run_name)


def assert_loss_falls(history: list[tuple[int, float]], factor: float = 0.5) -> None:
    """The mean of the last fifth of the steps is below ``factor`` x the mean of the first fifth."""
    window = max(3, len(history) // 5)
    first = sum(value for _, value in history[:window]) / window
    last = sum(value for _, value in history[-window:]) / window
    assert last < factor * first, f"loss did not fall clearly: first {first:.3f}, last {last:.3f}"


# --- config validation ------------------------------------------------------------------
def test_unknown_field_is_named(toy_data):
    with pytest.raises(ConfigError, match="learning_rat: unknown field"):
        load_config(None, ["learning_rat=0.1"], train_data=[str(toy_data)])


def test_missing_dataset_is_named():
    with pytest.raises(ConfigError, match=r"dataset not found: /no/such/data\.jsonl"):
        load_config(None, [], train_data=["/no/such/data.jsonl"])


def test_eval_every_needs_eval_data(toy_data):
    with pytest.raises(ConfigError, match="eval_every: needs eval_data"):
        load_config(None, ["eval_every=10"], train_data=[str(toy_data)])


def test_data_too_small_for_one_batch_per_worker_is_named_before_training(toy_data):
    from training.runtime import check_rows_fill_a_batch

    cfg = load_config(None, ["num_workers=2", "micro_batch_size=8"], train_data=[str(toy_data)])
    with pytest.raises(DatasetError, match="8 rows, 4 for each of num_workers: 2, fewer than micro_batch_size: 8"):
        check_rows_fill_a_batch(cfg, 8)
    check_rows_fill_a_batch(cfg, 16)  # one batch each


def test_deepspeed_builds_its_ops_with_this_environments_ninja_whatever_the_path(monkeypatch):
    """A cached op built by another ninja is rebuilt (~30 s): the worker pins the environment's own."""
    import shutil
    import sys

    from training.runtime import use_environment_build_tools

    own = Path(sys.executable).parent / "ninja"
    assert own.exists(), "deepspeed's ninja dependency is installed beside the interpreter"
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    use_environment_build_tools()
    assert shutil.which("ninja") == str(own)
    use_environment_build_tools()  # idempotent: PATH does not grow with every worker start
    assert os.environ["PATH"] == f"{own.parent}:/usr/bin:/bin"


def test_an_adapter_result_needs_a_registered_base_and_a_fresh_name(toy_data):
    adapter = {"method": "lora", "lora": {"save": "adapter"}, "train_data": [str(toy_data)]}
    with pytest.raises(ConfigError, match=r"lora\.save: adapter: an adapter belongs to a registered base version"):
        load_config(None, [], model="/some/folder", **adapter)
    with pytest.raises(ConfigError, match=r"lora\.adapter_name"):
        load_config(None, [], model="models:/base@champion", **adapter | {"lora": {"adapter_name": "../x"}})
    assert load_config(None, [], model="models:/base/3", **adapter).saves_adapter


def test_bf16_on_cpu_is_autocast_over_fp32_weights_and_fp16_needs_a_gpu(toy_data):
    cpu = load_config(None, ["precision=bf16"], train_data=[str(toy_data)])
    assert cpu.cpu_autocast and cpu.weights_dtype == "fp32"
    assert cpu.deepspeed_config()["bf16"] == {"enabled": False}, "gloo has no bf16 all-reduce: DeepSpeed stays fp32"
    gpu = load_config(None, ["precision=bf16", "use_gpu=true"], train_data=[str(toy_data)])
    assert not gpu.cpu_autocast and gpu.weights_dtype == "bf16" and gpu.deepspeed_config()["bf16"]["enabled"]
    with pytest.raises(ConfigError, match="precision: fp16 needs use_gpu"):
        load_config(None, ["precision=fp16"], train_data=[str(toy_data)])


def test_precision_auto_is_the_default_bf16_where_the_cpu_has_it_and_on_gpus(toy_data, tmp_path):
    from training.config import cpu_has_bf16

    amx = tmp_path / "amx"
    amx.write_text("processor\t: 0\nflags\t\t: fpu sse avx512f avx512_bf16 amx_tile amx_bf16\n")
    avx2 = tmp_path / "avx2"
    avx2.write_text("processor\t: 0\nflags\t\t: fpu sse avx2\n")
    assert cpu_has_bf16(str(amx)) and not cpu_has_bf16(str(avx2)) and not cpu_has_bf16(str(tmp_path / "none"))
    cpu = load_config(None, [], train_data=[str(toy_data)])
    assert cpu.precision == "auto" and cpu.weights_dtype == "fp32"
    assert cpu.cpu_autocast == cpu_has_bf16(), "this machine's CPU decides"
    assert cpu.deepspeed_config()["bf16"] == {"enabled": False}
    gpu = load_config(None, ["use_gpu=true"], train_data=[str(toy_data)])
    assert not gpu.cpu_autocast and gpu.weights_dtype == "bf16" and gpu.deepspeed_config()["bf16"]["enabled"]
    assert load_config(None, ["precision=fp32"], train_data=[str(toy_data)]).cpu_autocast is False


def test_shipped_configs_are_valid():
    import yaml

    from training.dpo import PreferenceConfig

    for path in sorted((REPO / "training" / "configs").glob("*.yaml")):
        preference = "objective" in yaml.safe_load(path.read_text())  # training/dpo.py's recipes
        assert load_config(path, schema=PreferenceConfig if preference else None).train_data, path


def test_deepspeed_config_fits_the_run(toy_data):
    def ds(*overrides):
        return load_config(None, list(overrides), train_data=[str(toy_data)]).deepspeed_config()

    two = ds("num_workers=2", "micro_batch_size=3", "grad_accum=2")
    assert two["zero_optimization"]["stage"] == 2
    assert (two["train_micro_batch_size_per_gpu"], two["gradient_accumulation_steps"]) == (3, 2)
    # CPU: torch's fused AdamW (no CUDA kernel build); GPU: DeepSpeed's own optimizer.
    assert two["optimizer"]["params"]["torch_adam"] is True and two["optimizer"]["params"]["fused"] is True
    assert "torch_adam" not in ds("use_gpu=true", "precision=bf16")["optimizer"]["params"]
    # One worker has nothing to partition: ZeRO-1/2 become plain data parallel; ZeRO-3 and offload stay.
    assert ds("num_workers=1")["zero_optimization"]["stage"] == 0
    assert ds("num_workers=1", "deepspeed=zero3.json")["zero_optimization"]["stage"] == 3
    offload = ds("num_workers=1", "deepspeed=zero3_offload.json")
    assert offload["zero_optimization"]["stage"] == 3 and "torch_adam" not in offload["optimizer"]["params"]


def test_more_workers_than_cluster_cpus_fails_before_training(cluster, tiny_model, toy_data):
    from training.sft import run

    with pytest.raises(ValueError, match="num_workers: 3 workers x 1 CPU need 3 CPUs, the cluster has 2"):
        run(config_for(tiny_model, toy_data, num_workers=3), cluster)


def test_dataset_without_usable_records_fails_clearly(cluster, tiny_model, tmp_path):
    from training.data import prepare_dataset

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": []}\n{oops\n')
    with pytest.raises(DatasetError, match=r"no usable chat record .* \(2 skipped"):
        prepare_dataset([str(bad)], str(tiny_model), 64, True, cluster)


def test_eval_set_without_answers_in_seq_len_fails_before_the_run(cluster, tiny_model, toy_data, tmp_path):
    from training.sft import run

    long_prompt = tmp_path / "eval.jsonl"
    record = {"messages": [{"role": "user", "content": "why " * 200}, {"role": "assistant", "content": "Because."}]}
    long_prompt.write_text(json.dumps(record) + "\n")
    run_name = f"bad-eval-{int(time.time())}"
    with pytest.raises(DatasetError, match=r"eval_every: no assistant tokens within seq_len 64 in .*eval\.jsonl"):
        run(config_for(tiny_model, toy_data, eval_data=[str(long_prompt)], eval_every=5, run_name=run_name), cluster)
    assert run_id_of(cluster, run_name) == "", "no MLflow run may be opened for a config that cannot run"


def test_with_mlflow_down_training_fails_before_starting_naming_its_url(tmp_path):
    """`python -m training.sft` (the DAG's train task) against a tracking server that is not there."""
    import os
    import subprocess
    import sys

    from conftest import free_port

    mlflow_url = f"http://127.0.0.1:{free_port()}"
    env = {**os.environ, "LLMOPS_HOME": str(tmp_path), "LLMOPS_STORE_URI": str(tmp_path / "store"),
           "MLFLOW_TRACKING_URI": mlflow_url, "LLMOPS_MLFLOW_HTTP_RETRIES": "0",
           "RAY_ADDRESS": "127.0.0.1:1"}  # fmt: skip
    config = Path(__file__).resolve().parents[1] / "training" / "configs" / "tiny_cpu.yaml"
    done = subprocess.run([sys.executable, "-m", "training.sft", "--config", str(config)], env=env,
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 1, (done.stdout[-2000:], done.stderr[-2000:])
    assert mlflow_url in done.stderr and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert not (tmp_path / "store").exists(), "nothing was written before the check"


def test_prompt_tokens_are_masked_from_the_loss(tiny_model):
    from transformers import AutoTokenizer

    from training.data import IGNORE_INDEX, tokenize_chat

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"},
                {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Bye?"},
                {"role": "assistant", "content": "Goodbye."}]  # fmt: skip
    ids, labels, truncated = tokenize_chat(messages, tokenizer, 256)
    learned = tokenizer.decode([tok for tok, label in zip(ids, labels, strict=True) if label != IGNORE_INDEX])
    assert learned == "Hello.<|im_end|>\nGoodbye.<|im_end|>\n"
    assert not truncated


# --- training runs ----------------------------------------------------------------------
def test_full_zero2_learns_the_toy_answer_and_registers_a_challenger(cluster, tiny_model, toy_data, prometheus):
    from mlflow import MlflowClient

    from ray_app.registry import get_version
    from training.sft import run

    assert "7421" not in greedy_answer(tiny_model)
    result = run(config_for(tiny_model, toy_data, deepspeed="zero2.json", eval_every=20), cluster)

    assert result.global_step == 40
    assert result.data["records"] == 12 and result.data["skipped"] == 2
    assert_loss_falls(loss_history(cluster, result.mlflow_run_id))

    store = open_store(settings=cluster)
    checkpoints = [info.key for info in store.list(f"checkpoints/{result.run_name}")]
    assert any(key.endswith("trainer_state.json") for key in checkpoints), checkpoints
    assert result.model_uri == f"s3://llmops-train/store/models/{result.run_name}"

    from ray_app.models import resolve_model

    folder = resolve_model(result.model_uri, cluster)
    assert ANSWER in greedy_answer(folder)

    version = get_version("models:/tiny-chat@challenger", cluster)
    assert version.source == result.model_uri
    assert version.run_id == result.mlflow_run_id
    assert version.tags["base_model"] == str(tiny_model)
    run_data = MlflowClient(cluster.mlflow_tracking_uri).get_run(result.mlflow_run_id).data
    assert run_data.metrics["eval_loss"] < 1.0
    # eval_every=20: the held-out loss at step 20 (during training), then the final one at 40.
    evals = MlflowClient(cluster.mlflow_tracking_uri).get_metric_history(result.mlflow_run_id, "eval_loss")
    at = {point.step: point.value for point in evals}
    assert sorted(at) == [20, 40] and len(evals) == 2
    assert at[40] < at[20], f"held-out loss did not fall between steps 20 and 40: {at}"
    assert {"learning_rate", "grad_norm", "tokens_per_s"} <= set(run_data.metrics)
    wandb_runs = list((cluster.home / "wandb" / "wandb").glob(f"offline-run-*-{result.mlflow_run_id}"))
    assert wandb_runs, "the W&B offline run directory is missing"
    the_run_was_live_in_prometheus(prometheus, result.mlflow_run_id, steps=40)


def the_run_was_live_in_prometheus(settings: Settings, run_id: str, steps: int) -> None:
    """Rank 0's live metrics reached the stack's Prometheus (through Ray's metrics agent) while it trained."""
    from ray_app import monitoring

    of_run = f'{{mlflow_run_id="{run_id}"}}'
    wanted = {
        "steps": f"max(max_over_time(ray_llmops_train_steps_total{of_run}[15m]))",
        "running": f"max(max_over_time(ray_llmops_train_running{of_run}[15m]))",
        "checkpoints": f"max(max_over_time(ray_llmops_train_checkpoint_s_count{of_run}[15m]))",
        "loss": f"min(min_over_time(ray_llmops_train_loss{of_run}[15m]))",
    }
    deadline, seen = time.monotonic() + 60, {}
    while time.monotonic() < deadline:
        seen = {name: [float(r["value"][1]) for r in monitoring.query(settings, q)] for name, q in wanted.items()}
        if seen["steps"] == [steps] and seen["running"] == [1.0] and seen["checkpoints"] and seen["loss"]:
            break
        time.sleep(2)
    assert seen["steps"] == [steps] and seen["running"] == [1.0], seen
    assert seen["checkpoints"][0] >= 1 and 0 < seen["loss"][0] < 10, seen
    assert draw_dashboard(settings, "training", minutes=10) >= 4


def test_bf16_autocast_on_cpu_tracks_the_fp32_loss_curve(cluster, tiny_model):
    """The same run (one worker: the same batches in the same order) in fp32 and in bf16 autocast:
    the curves differ (bf16 really ran) and end within 2% of each other, in training and held out."""
    from mlflow import MlflowClient

    from training.sft import run

    data, held = REPO / "training" / "data" / "chat_sft.jsonl", REPO / "training" / "data" / "chat_eval.jsonl"
    values = {"num_workers": 1, "max_steps": 30, "checkpoint_every": 30, "micro_batch_size": 4, "seq_len": 128,
              "eval_data": [str(held)], "registered_model": None, "learning_rate": 1e-3}  # fmt: skip
    ends = {}
    for precision in ("fp32", "bf16"):
        result = run(config_for(tiny_model, data, precision=precision, **values), cluster)
        losses = [value for _, value in loss_history(cluster, result.mlflow_run_id)]
        tracked = MlflowClient(cluster.mlflow_tracking_uri).get_run(result.mlflow_run_id).data
        assert tracked.tags["llmops.compute_precision"] == {"fp32": "fp32", "bf16": "bf16-autocast"}[precision]
        ends[precision] = (sum(losses[-5:]) / 5, tracked.metrics["eval_loss"], losses)
    for index, name in ((0, "train loss (last 5 steps)"), (1, "held-out loss")):
        fp32, bf16 = ends["fp32"][index], ends["bf16"][index]
        assert 0 < abs(bf16 - fp32) < 0.02 * fp32, (name, fp32, bf16, ends)
    assert ends["fp32"][2][-1] < 0.7 * ends["fp32"][2][0], ends  # the runs learned something to compare


# ZeRO-2 full is test_full_zero2_..., ZeRO-3 full is test_losing_a_whole_node_...; these add LoRA under both
# stages (in bf16 autocast, over fp32 all-reduces): ZeRO-3's parameter gathering of adapters for the
# consolidated folder and the merge; ZeRO-2's adapter published unmerged as an adapter of a registered base.
@pytest.mark.parametrize(("deepspeed", "save"), [("zero2.json", "adapter"), ("zero3.json", "merged")])
def test_lora_under_zero_stages_trains_and_publishes_merged_or_as_an_adapter_of_its_base(
    cluster, warm_tiny_model, toy_data, deepspeed, save
):
    from training.sft import run

    # One checkpoint, at the end: checkpointing is test_full_zero2_... and test_losing_a_whole_node_...'s subject.
    # Adapters on a randomly initialised model have nothing to adapt: start from a warm base, at a
    # learning rate usual for LoRA.
    values = {"deepspeed": deepspeed, "method": "lora", "registered_model": None, "eval_data": [],
              "precision": "bf16", "checkpoint_every": 60, "learning_rate": 1e-2, "max_steps": 60,
              "lora": {"rank": 16, "alpha": 32, "dropout": 0.0, "save": save}}  # fmt: skip
    base = str(warm_tiny_model)
    if save == "adapter":
        base = f"models:/{_registered_base(cluster, warm_tiny_model).name}@champion"
        values |= {"registered_model": "tiny-chat", "eval_data": [str(toy_data)]}  # an adapter registers on its base
    result = run(config_for(base, toy_data, **values), cluster)
    assert_loss_falls(loss_history(cluster, result.mlflow_run_id), factor=0.85)
    if save == "adapter":
        _assert_published_as_an_adapter(cluster, result, warm_tiny_model)
        return

    import torch
    from transformers import AutoModelForCausalLM

    from ray_app.models import resolve_model

    folder = resolve_model(result.model_uri, cluster)
    assert not list(folder.glob("adapter_*")), "LoRA must be merged into a plain HF folder"
    trained, original = AutoModelForCausalLM.from_pretrained(folder), AutoModelForCausalLM.from_pretrained(base)
    reference = original.state_dict()
    changed = [name for name, tensor in trained.state_dict().items() if not torch.equal(tensor, reference[name])]
    assert any("self_attn" in name for name in changed), "the fine-tuned weights were not written"
    prompt = torch.tensor([[1, 2, 3]])
    output = trained.generate(prompt, max_new_tokens=8, min_new_tokens=8, do_sample=False)
    assert output.shape[1] == 3 + 8


def _registered_base(cluster: Settings, folder: Path):
    from ray_app.registry import register_model_version

    store = open_store(settings=cluster)
    store.ensure()
    store.upload_dir(folder, "tests-lora/base", progress=False)
    return register_model_version("tiny-lora-base", store.uri("tests-lora/base"), run_id=None, alias="champion",
                                  settings=cluster)  # fmt: skip


def _assert_published_as_an_adapter(cluster: Settings, result, base: Path) -> None:
    """The adapter alone sits beside its base version's others, is recorded on that version and on its
    run, and changes what the base answers."""
    import torch
    from mlflow import MlflowClient
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from ray_app.adapters import fetch_adapter, list_adapters

    assert result.registered_version is None and f"/adapters/tiny-lora-base/1/{result.run_name}" in result.model_uri
    assert list_adapters("tiny-lora-base", "1", cluster) == [result.run_name]
    folder = fetch_adapter("tiny-lora-base", "1", result.run_name, cluster)
    assert (folder / "adapter_model.safetensors").is_file() and not (folder / "model.safetensors").exists()
    tracking = MlflowClient(cluster.mlflow_tracking_uri)
    assert tracking.get_model_version("tiny-lora-base", "1").tags[f"llmops.adapter.{result.run_name}"] == (
        result.mlflow_run_id
    )
    run = tracking.get_run(result.mlflow_run_id).data
    assert run.tags["llmops.adapter"] == f"tiny-lora-base/1:{result.run_name}" and "eval_loss" in run.metrics
    original = AutoModelForCausalLM.from_pretrained(base)
    prompt = torch.tensor([[1, 2, 3, 4]])
    with torch.inference_mode():
        plain = original(prompt).logits
        adapted = PeftModel.from_pretrained(original, str(folder))(prompt).logits
    assert not torch.allclose(plain, adapted), "the adapter changes the base's answers"
    from training.sft import register_run  # `llmops register RUN`: records it again, idempotently

    assert register_run(result.mlflow_run_id, cluster) == f"tiny-lora-base:{result.run_name}"
    with pytest.raises(ConfigError, match="already has an adapter named"):  # adapters are immutable
        from training.sft import run as train

        train(config_for("models:/tiny-lora-base/1", Path(__file__), method="lora",
                         lora={"save": "adapter", "adapter_name": result.run_name}), cluster)  # fmt: skip


def after_the_first_checkpoint(cluster: Settings, store, run_name: str, act) -> threading.Thread:
    """Once the step-10 checkpoint of ``run_name`` is in the store and training reached step 13,
    call ``act(step, alive_workers)`` until it returns True (``conftest.after_a_checkpoint``)."""
    return after_a_checkpoint(cluster, store, "tests-sft", run_name, 13, act)


def test_losing_a_whole_node_mid_run_resumes_on_the_survivors_from_the_s3_checkpoint(
    ray_client, cluster, tiny_model, toy_data
):
    """Two nodes (the head and a second `ray start --address` node with its own temp dir), one
    training worker on each, checkpoints only in S3, ZeRO-3 (each rank restores its own parameter
    and optimizer shards). The second node is SIGKILLed as a whole (its worker with it) after a
    checkpoint: the run restarts both workers on the head from that checkpoint, redoes at most one
    checkpoint interval, finishes with every step logged once, and the gathered model has learned."""
    from conftest import worker_node

    from training.sft import run

    store = open_store(settings=cluster)
    store.ensure()
    run_name = f"node-loss-{int(time.time())}"
    lost: dict[str, object] = {}

    with worker_node(ray_client, num_cpus=1) as node:  # the head's settings: its token, its node environment
        node_id = node.node_id()

        def kill_the_node(step: int, workers: list) -> bool:
            lost["nodes"] = sorted({worker.node_id == node_id for worker in workers})
            if lost["nodes"] != [False, True]:  # not one worker on each node (yet)
                return False
            lost["step"] = step
            node.kill()
            return True

        killer = after_the_first_checkpoint(cluster, store, run_name, kill_the_node)
        result = run(config_for(tiny_model, toy_data, run_name=run_name, max_steps=30, registered_model=None,
                                eval_data=[], max_failures=2, placement_strategy="SPREAD",
                                deepspeed="zero3.json"), cluster)  # fmt: skip
        killer.join(timeout=5)
        assert lost.get("step"), f"the node was not killed with a worker on it: {lost}"
        assert node.node_id() is None, "the second node is gone"

    from mlflow import MlflowClient

    resumed = MlflowClient(cluster.mlflow_tracking_uri).get_metric_history(result.mlflow_run_id, "resumed_from_step")
    assert resumed, "the run did not restart from the S3 checkpoint"
    resumed_from = int(resumed[0].value)
    assert resumed_from >= 10 and resumed_from % 10 == 0
    assert lost["step"] - resumed_from <= 10 + 1, "more than one checkpoint interval was redone"
    steps = [step for step, _ in loss_history(cluster, result.mlflow_run_id)]
    assert steps == list(range(1, 31)), "every step logged exactly once across the node loss"
    assert result.global_step == 30
    assert_loss_falls(loss_history(cluster, result.mlflow_run_id))

    from ray_app.models import resolve_model

    folder = resolve_model(result.model_uri, cluster)  # the ZeRO-3 shards, gathered into one HF folder
    assert "7421" in greedy_answer(folder), "the resumed ZeRO-3 run did not learn the toy answer"


def test_with_s3_dying_mid_run_training_fails_cleanly_naming_the_store(cluster, tiny_model, toy_data, tmp_path):
    """The store's S3 server stops after the first checkpoint: the next checkpoint cannot be
    written, the run fails within minutes with one error naming the store and its endpoint
    (not a Ray traceback), and its MLflow run is FAILED."""
    import subprocess

    from conftest import free_port, venv_bin, wait_for_port
    from mlflow import MlflowClient

    from ray_app.stack import stop_process_group
    from ray_app.storage import StoreError
    from training.sft import run

    port = free_port()
    with open(tmp_path / "moto.log", "wb") as log:
        s3 = subprocess.Popen([venv_bin("moto_server"), "-H", "127.0.0.1", "-p", str(port)], stdout=log,
                              stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
    endpoint = f"http://127.0.0.1:{port}"
    settings = cluster.model_copy(update={"s3_endpoint_url": endpoint, "store_uri": "s3://dying/store"})
    run_name = f"s3-dies-{int(time.time())}"
    try:
        wait_for_port(port, proc=s3)
        store = open_store(settings=settings)
        store.ensure()
        stopped: dict[str, int] = {}

        def stop_s3(step: int, _workers: list) -> bool:
            stopped["step"] = step
            stop_process_group(s3.pid, timeout_s=10)
            return True

        watcher = after_the_first_checkpoint(settings, store, run_name, stop_s3)
        started = time.monotonic()
        with pytest.raises(StoreError) as failed:
            run(config_for(tiny_model, toy_data, run_name=run_name, num_workers=1, max_steps=400, eval_data=[],
                           registered_model=None, max_failures=0), settings)  # fmt: skip
        watcher.join(timeout=5)
    finally:
        if s3.poll() is None:
            stop_process_group(s3.pid, timeout_s=10)
    assert stopped.get("step"), "the S3 server was not stopped during the run"
    assert time.monotonic() - started < 300
    message = str(failed.value)
    assert endpoint in message and "s3://dying/store" in message and "checkpoint" in message, message
    assert "Traceback" not in message
    run_id = run_id_of(cluster, run_name)
    assert MlflowClient(cluster.mlflow_tracking_uri).get_run(run_id).info.status == "FAILED"


class _Planted:
    """A pickle that runs a command when loaded: what an attacker with write access to the store plants."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


def test_a_run_that_would_resume_from_a_planted_checkpoint_refuses_it_and_runs_nothing(
    cluster, tiny_model, toy_data, tmp_path
):
    """Ray Train resumes a run name from the latest checkpoint in its storage (a DAG task retry
    does): a pickle planted there is refused before DeepSpeed loads anything."""
    import pickle

    from ray_app.storage import pyarrow_location
    from training.sft import run

    run_name = f"planted-{int(time.time())}"
    config = config_for(tiny_model, toy_data, run_name=run_name, num_workers=1, max_steps=2, checkpoint_every=2,
                        registered_model=None, eval_data=[], max_failures=0)  # fmt: skip
    assert run(config, cluster).global_step == 2
    store = open_store(settings=cluster)
    shards = [info.key for info in store.list(f"checkpoints/{run_name}") if info.key.endswith("model_states.pt")]
    assert shards, "the first run left no checkpoint"
    marker = tmp_path / "planted-code-ran"
    for key in shards:
        path, filesystem = pyarrow_location(store.uri(key), cluster)
        with filesystem.open_output_stream(path) as stream:
            stream.write(pickle.dumps(_Planted(marker)))

    with pytest.raises(Exception, match="was modified after it was signed"):
        run(config.model_copy(update={"max_steps": 4}), cluster)
    assert not marker.exists(), "the planted pickle was loaded"


def test_tune_sweep_runs_trials_as_mlflow_child_runs_and_picks_the_best(cluster, tiny_model, toy_data):
    from mlflow import MlflowClient

    from training.tune import sweep

    # Both trials at once, one 0.99-CPU worker each: the 2-CPU head holds them side by side.
    cfg = config_for(tiny_model, toy_data, num_workers=1, cpus_per_worker=0.99, max_steps=8, checkpoint_every=2,
                     eval_data=[], registered_model=None, experiment="tests-tune")  # fmt: skip
    result = sweep(cfg, ["learning_rate=grid(1e-5, 3e-3)"], samples=1, settings=cluster, max_concurrent=2)

    assert result.trials == 2
    assert result.best_config == {"learning_rate": 3e-3}  # the larger step size wins on a memorisable set
    client = MlflowClient(cluster.mlflow_tracking_uri)
    children = client.search_runs(
        [client.get_experiment_by_name("tests-tune").experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{result.parent_run_id}'",
    )
    assert sorted(float(run.data.params["learning_rate"]) for run in children) == [1e-5, 3e-3]


def test_sweep_that_cannot_fit_the_cluster_names_cpus_per_worker(cluster, tiny_model, toy_data):
    from training.tune import sweep

    with pytest.raises(ConfigError, match=r"cpus_per_worker: .* need 2\.01 CPUs, the cluster has 2"):
        sweep(config_for(tiny_model, toy_data), ["learning_rate=loguniform(1e-5,1e-3)"], 2, cluster)


def test_search_spec_errors_are_clear():
    from training.tune import parse_search

    with pytest.raises(ConfigError, match="key=fn"):
        parse_search(["learning_rate=between(1,2)"])
    with pytest.raises(ConfigError, match="takes two bounds"):
        parse_search(["learning_rate=loguniform(1e-5)"])


def test_signed_checkpoint_refuses_a_planted_pickle_an_unlisted_file_and_a_tampered_manifest(tmp_path):
    """What resume checks before DeepSpeed unpickles a checkpoint (the resume test loads a signed one)."""
    import os
    import pickle
    import shutil

    import torch

    from training.signing import CheckpointRejected, sign, verify

    key, merged = b"k" * 32, tmp_path / "merged"
    for rank in (0, 1):  # each rank signs its own folder; Ray Train merges them into one checkpoint
        folder = tmp_path / f"rank{rank}"
        (folder / "ds").mkdir(parents=True)
        torch.save({"weights": torch.ones(3) * rank}, folder / "ds" / f"zero_pp_rank_{rank}_model_states.pt")
        (folder / "trainer_state.json").write_text(json.dumps({"global_step": 10}))
        sign(folder, key, rank)
        shutil.copytree(folder, merged, dirs_exist_ok=True)
    assert verify(merged, key) == 3

    marker = tmp_path / "planted-code-ran"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    def refused(folder: Path, match: str, with_key: bytes = key) -> None:
        with pytest.raises(CheckpointRejected, match=match):
            verify(folder, with_key)
        assert not marker.exists(), "the planted code ran"

    refused(merged, "bad signature", with_key=b"another key")
    planted = tmp_path / "planted"
    shutil.copytree(merged, planted)
    shard = planted / "ds" / "zero_pp_rank_0_model_states.pt"
    shard.write_bytes(pickle.dumps(Payload()))
    refused(planted, "zero_pp_rank_0_model_states.pt in checkpoint .* was modified after it was signed")

    # Re-signing the planted shard's digest into the manifest breaks the manifest's signature instead.
    import hashlib

    manifest_path = planted / "_signed_manifest.rank0.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["files"]["ds/zero_pp_rank_0_model_states.pt"] = hashlib.sha256(shard.read_bytes()).hexdigest()
    manifest_path.write_text(json.dumps(manifest))
    refused(planted, "_signed_manifest.rank0.json .* has a bad signature")

    extra = tmp_path / "extra"
    shutil.copytree(merged, extra)
    (extra / "ds" / "optim_states.pt").write_bytes(pickle.dumps(Payload()))
    refused(extra, r"files no signed manifest lists: \['ds/optim_states.pt'\]")
    for manifest_path in extra.glob("_signed_manifest*"):
        manifest_path.unlink()
    refused(extra, "has no signed manifest")


def test_no_secret_reaches_rays_specs_state_logs_serve_configs_or_command_lines(cluster):
    """Runs last in this module (after the training runs); the Ray head's node env holds the secrets."""
    import os
    import subprocess

    import httpx
    from conftest import S3_SECRET_KEY, WANDB_SENTINEL
    from ray.job_submission import JobSubmissionClient
    from ray.util.state import list_actors, list_jobs

    # A job that uses the S3 store gets its credentials from the node, not from its submission.
    jobs = JobSubmissionClient(cluster.ray_dashboard_url, headers=cluster.ray_auth_headers())
    code = "from ray_app.storage import open_store; s = open_store(); s.ensure(); print('LISTED', len(s.list('')))"
    job = jobs.submit_job(entrypoint=f'python -c "{code}"', runtime_env={"env_vars": cluster.worker_env()})
    deadline = time.monotonic() + 120
    while str(jobs.get_job_status(job)) not in ("SUCCEEDED", "FAILED", "STOPPED") and time.monotonic() < deadline:
        time.sleep(1)
    assert str(jobs.get_job_status(job)) == "SUCCEEDED" and "LISTED" in jobs.get_job_logs(job), jobs.get_job_logs(job)

    dashboard = httpx.Client(base_url=cluster.ray_dashboard_url, headers=cluster.ray_auth_headers(), timeout=30)
    surfaces = {
        "Jobs API": dashboard.get("/api/jobs/").text,
        "Serve applications": dashboard.get("/api/serve/applications/").text,
        "state API jobs": json.dumps([job.__dict__ for job in list_jobs(detail=True)], default=str),
        "state API actors": json.dumps([actor.__dict__ for actor in list_actors(detail=True)], default=str),
        "ps": subprocess.run(["ps", "-eww", "-o", "args"], capture_output=True, text=True).stdout,
    }
    logs = Path(cluster.ray_temp_dir) / "session_latest" / "logs"
    files = [path for path in logs.rglob("*") if path.is_file()]
    assert len(files) > 10, f"no Ray logs found under {logs}"
    for path in files:
        surfaces[str(path)] = path.read_bytes().decode("utf-8", "replace")
    sentinels = {"S3 secret": S3_SECRET_KEY, "W&B key": WANDB_SENTINEL,
                 "MLflow password": os.environ["MLFLOW_TRACKING_PASSWORD"],
                 "Serve's MLflow password": os.environ["LLMOPS_MLFLOW_SERVE_PASSWORD"]}  # fmt: skip
    leaks = []
    for name, sentinel in sentinels.items():
        for where, text in surfaces.items():
            if sentinel in text:
                at = text.index(sentinel)
                context = text[max(0, at - 300) : at].replace(sentinel, "<secret>")
                leaks.append(f"{name} in {where}, after: ...{context}")
    assert not leaks, "\n\n".join(leaks[:6])

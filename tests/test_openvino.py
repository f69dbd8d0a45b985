"""The OpenVINO engine (engine: openvino), in-process: a model converted by the real exporter
(.venv-openvino's optimum-cli), answered by the real OpenVINO GenAI pipeline, checked against our
transformers engine, with and without LoRA adapters. Through Serve it is checked with the default
model in test_serving.py."""

from __future__ import annotations

import logging
import os
import queue
import shutil
import signal
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import s3_settings
from tiny_model import build_tiny_chat_model, train_lora_adapter

from ray_app.serving.config import ServeConfigError, parse_args
from ray_app.serving.engine import Delta, GenerationRequest, SamplingParams, TransformersEngine
from ray_app.serving.lora import Adapter, AdapterError
from ray_app.serving.openvino_engine import OpenVINOBatcher, OpenVINOEngine
from ray_app.serving.openvino_export import (
    IR_FILES,
    OpenVINOExportError,
    content_digest,
    lora_base_model,
    openvino_model,
    remembered_digest,
)
from ray_app.settings import Settings
from ray_app.storage import open_store

PROMPTS = ("Hi", "Tell me a long story about the sea and its ships", "2+2?")


def _sharpen(source: Path, folder: Path, seed: int) -> Path:
    """A copy of the tiny model with large random weights: its greedy answers depend on every prompt token."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(source)
    torch.manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() > 1:
                parameter.normal_(0, 0.3)
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(source).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def sharp_dir(tmp_path_factory) -> Path:
    tiny = build_tiny_chat_model(tmp_path_factory.mktemp("tiny-ov") / "model")
    return _sharpen(tiny, tmp_path_factory.mktemp("sharp-ov") / "model", seed=3)


@pytest.fixture(scope="module")
def ov_settings(tmp_path_factory) -> Settings:
    return Settings(home=tmp_path_factory.mktemp("ov-home"))


@pytest.fixture(scope="module")
def batcher(sharp_dir: Path, ov_settings: Settings):
    # fp32 weights and f32 activations: the same arithmetic as torch's, so greedy answers can be compared.
    ir_dir = openvino_model(sharp_dir, ov_settings, "fp32")
    batcher = OpenVINOBatcher(lambda: OpenVINOEngine(ir_dir, threads=1, max_batch_size=4, precision="f32"), 4)
    yield batcher
    batcher.stop()


class Answer:
    """What one submitted request produced: its deltas as they arrived."""

    def __init__(self, batcher: OpenVINOBatcher, request: GenerationRequest):
        self.request, self.items = request, queue.Queue()
        batcher.submit(request, self.items.put)

    def result(self, on_first=None, timeout: float = 60) -> tuple[str, str, int]:
        text, first = "", True
        while True:
            item = self.items.get(timeout=timeout)
            if isinstance(item, BaseException):
                raise item
            assert isinstance(item, Delta)
            if first and on_first is not None:
                on_first()
            first = False
            text += item.text
            if item.finish_reason:
                return text, item.finish_reason, item.completion_tokens


def _ask(batcher: OpenVINOBatcher, prompt: list[int], **params) -> tuple[str, str, int]:
    return Answer(batcher, GenerationRequest(prompt, SamplingParams(**params))).result()


def _reference(engine: TransformersEngine, prompt: list[int], budget: int, adapter: Adapter | None = None):
    text, finish, tokens = "", "", 0
    request = GenerationRequest(prompt, SamplingParams(max_tokens=budget, temperature=0), adapter=adapter)
    for [delta] in engine.generate([request]):
        if delta is not None:
            text, finish, tokens = text + delta.text, delta.finish_reason or finish, delta.completion_tokens
    return text, finish, tokens


def test_greedy_answers_equal_the_transformers_engines_alone_and_in_a_full_batch(sharp_dir, batcher):
    reference = TransformersEngine(sharp_dir, threads=1, prepack=False)
    prompts = [reference.chat_prompt_ids([{"role": "user", "content": text}]) for text in PROMPTS]
    budgets = [5, 17, 30]  # rows leave at different steps
    expected = [_reference(reference, p, b) for p, b in zip(prompts, budgets, strict=True)]
    assert len({text for text, _, _ in expected}) == len(PROMPTS), "the model tells the prompts apart"
    alone = [_ask(batcher, p, max_tokens=b, temperature=0) for p, b in zip(prompts, budgets, strict=True)]
    assert alone == expected
    # Six at once into a pipeline of 4: two wait, then join the running batch as rows finish.
    answers = [
        Answer(batcher, GenerationRequest(prompts[i % 3], SamplingParams(max_tokens=budgets[i % 3], temperature=0)))
        for i in range(6)
    ]
    assert [answer.result() for answer in answers] == [expected[i % 3] for i in range(6)]
    assert batcher.stats.decode_rows > batcher.stats.decode_steps, "some steps decoded several rows"
    assert batcher.occupancy() == (0, 0)


def test_seeds_reproduce_samples_stop_strings_cut_and_cancelled_rows_leave(batcher):
    prompt = batcher.engine.chat_prompt_ids([{"role": "user", "content": "What is the capital of France?"}])
    params = {"max_tokens": 40, "temperature": 1.0, "top_p": 0.9}
    first = _ask(batcher, prompt, seed=7, **params)
    assert _ask(batcher, prompt, seed=7, **params) == first and len(first[0]) > 5
    assert _ask(batcher, prompt, seed=8, **params) != first
    negative = _ask(batcher, prompt, seed=-28771, **params)  # OpenAI's seed is any integer
    assert negative == _ask(batcher, prompt, seed=-28771, **params) != first
    assert _ask(batcher, prompt, seed=2**70 + 7, **params)[1] in ("length", "stop")
    greedy = _ask(batcher, prompt, max_tokens=12, temperature=0)
    for tiny in (5e-324, 1e-300):  # float32 zero in the pipeline: still the single most likely token
        assert _ask(batcher, prompt, max_tokens=12, temperature=1.5, top_p=tiny, seed=1) == greedy
    assert _ask(batcher, prompt, **params) != _ask(batcher, prompt, **params), "unseeded requests draw their own"
    stop = first[0][3:6]
    cut = _ask(batcher, prompt, seed=7, stop=[stop], **params)
    assert cut[:2] == (first[0][: first[0].find(stop)], "stop")

    cancelled_before = batcher.stats.cancelled_rows
    request = GenerationRequest(prompt, SamplingParams(max_tokens=400, temperature=1.0, seed=1))
    _, finish, tokens = Answer(batcher, request).result(on_first=request.cancelled.set)
    assert finish == "cancelled" and tokens < 400
    late = GenerationRequest(prompt, SamplingParams(max_tokens=8, temperature=0), deadline=time.monotonic() - 1)
    assert Answer(batcher, late).result() == ("", "deadline", 0)
    assert batcher.stats.cancelled_rows == cancelled_before + 2
    assert _ask(batcher, prompt, seed=7, **params) == first, "the pipeline goes on as before"


def test_a_conversion_is_cached_by_content_and_a_missing_or_failing_exporter_is_named(
    sharp_dir, ov_settings, batcher, tmp_path
):
    ir_dir = openvino_model(sharp_dir, ov_settings, "fp32")  # converted by the batcher fixture
    assert ir_dir.parent == ov_settings.model_cache_dir / "openvino"
    nowhere = tmp_path / "no-venv" / "optimum-cli"
    no_exporter = ov_settings.model_copy(update={"openvino_export_cli": nowhere})
    assert openvino_model(sharp_dir, no_exporter, "fp32") == ir_dir, "cached: no exporter needed"
    assert (ir_dir / "openvino_model.xml").stat().st_mtime < time.time()

    retrained = _sharpen(sharp_dir, tmp_path / "retrained", seed=4)  # same folder layout, other weights
    with pytest.raises(OpenVINOExportError, match=str(nowhere)):
        openvino_model(retrained, no_exporter, "fp32")
    memo = ov_settings.model_cache_dir / "openvino" / "digests.json"
    first = remembered_digest(retrained, memo)
    assert first == content_digest(retrained) and str(retrained.resolve()) in memo.read_text()
    _sharpen(sharp_dir, retrained, seed=5)  # retrained again into the same folder: the memo must not answer
    assert remembered_digest(retrained, memo) == content_digest(retrained) != first
    with pytest.raises(OpenVINOExportError, match="int3"):
        openvino_model(retrained, ov_settings, "int3")

    broken = tmp_path / "broken"
    shutil.copytree(sharp_dir, broken)
    (broken / "config.json").write_text('{"model_type": "no-such-architecture"}')
    with pytest.raises(OpenVINOExportError, match=r"could not export .*broken \(exit") as failure:
        openvino_model(broken, ov_settings, "int8")
    assert "no-such-architecture" in str(failure.value), "the exporter's own reason is shown"
    cached = sorted(path.name for path in (ov_settings.model_cache_dir / "openvino").iterdir() if path.is_dir())
    assert cached == [ir_dir.name], "a failed conversion leaves nothing behind"


def test_a_stored_version_is_converted_once_for_all_machines_and_its_ir_kept_beside_it(
    sharp_dir, s3_server, tmp_path, caplog
):
    """The first machine converts and keeps the IR in the S3 store beside the version's folder; another
    machine (no exporter at all) downloads it; a damaged stored IR is converted again and replaced."""
    machine = {name: s3_settings(s3_server, tmp_path / name, bucket="llmops-ov") for name in ("a", "b", "c")}
    store = open_store(settings=machine["a"])
    store.ensure()
    store.upload_dir(sharp_dir, "models/sharp-run", progress=False)
    source = store.uri("models/sharp-run")
    kept = f"models/sharp-run.openvino-int8-{content_digest(sharp_dir)}"

    converted = openvino_model(sharp_dir, machine["a"], "int8", source=source)
    manifest = store.read_manifest(kept)
    assert manifest is not None and set(IR_FILES) <= set(manifest), manifest

    no_exporter = machine["b"].model_copy(update={"openvino_export_cli": tmp_path / "no-venv" / "optimum-cli"})
    downloaded = openvino_model(sharp_dir, no_exporter, "int8", source=source)
    assert downloaded.parent == machine["b"].model_cache_dir / "openvino" and downloaded != converted
    for name in IR_FILES:
        assert (downloaded / name).read_bytes() == (converted / name).read_bytes(), name
    assert openvino_model(sharp_dir, machine["a"], "int8") == converted  # a folder without a store: cache only

    tampered = tmp_path / "tampered"
    store.download_dir(kept, tampered, progress=False)
    (tampered / "openvino_model.bin").write_bytes(b"not the model")
    store._put_file(tampered / "openvino_model.bin", f"{kept}/openvino_model.bin", lambda _: None)
    with caplog.at_level(logging.WARNING, logger="ray_app.serving.openvino_export"):
        healed = openvino_model(sharp_dir, machine["c"], "int8", source=source)
    assert "converting here" in caplog.text and "checksum" in caplog.text, caplog.text
    assert (healed / "openvino_model.bin").read_bytes() == (converted / "openvino_model.bin").read_bytes()
    store.download_dir(kept, tmp_path / "healed", progress=False)  # checksums pass again: replaced


PROBE = "Which adapter answers?"
ANSWERS = {"alpha": "Alpha answers, one two three.", "bravo": "Bravo answers here, four five."}


def test_lora_adapters_answer_as_in_the_transformers_engine_each_in_a_pipeline_of_its_own_lru_bounded(
    sharp_dir, ov_settings, tmp_path_factory
):
    """OpenVINO GenAI applies adapters per pipeline, not per request: one pipeline per held adapter,
    at most two here, stepped in turn with the base's; each answer equals the transformers engine's
    with the same adapter (fp32 both ways, greedy)."""
    root, base = tmp_path_factory.mktemp("ov-lora"), sharp_dir  # its fp32 IR is the batcher fixture's
    folders = {name: train_lora_adapter(base, root / name, PROBE, answer, seed=seed)
               for seed, (name, answer) in enumerate(ANSWERS.items())}  # fmt: skip
    # Trained briefly, its answer depends on PEFT's lora_alpha / r (2 here): GenAI must get it folded in.
    folders["weak"] = train_lora_adapter(base, root / "weak", PROBE, ANSWERS["alpha"], steps=6, seed=0)
    ir_dir = openvino_model(base, ov_settings, "fp32")
    assert lora_base_model(base, ov_settings, "fp32") == ir_dir, "uncompressed weights take adapters as they are"
    reference = TransformersEngine(base, threads=1, prepack=False, max_adapters=3)
    prompt = reference.chat_prompt_ids([{"role": "user", "content": PROBE}])
    adapters = {name: Adapter(name, folder) for name, folder in folders.items()}
    expected = {name: _reference(reference, prompt, 12, adapters.get(name)) for name in (None, *folders)}
    assert expected["alpha"][0].startswith(ANSWERS["alpha"][:12]) and expected["bravo"][0].startswith("Bravo")
    assert len({text for text, _, _ in expected.values()}) == 4, expected  # weak: neither the base nor alpha

    def ask(name: str | None) -> Answer:
        return Answer(batcher, GenerationRequest(prompt, SamplingParams(max_tokens=12, temperature=0),
                                                 adapter=adapters.get(name)))  # fmt: skip

    batcher = OpenVINOBatcher(lambda: OpenVINOEngine(ir_dir, threads=1, max_batch_size=8, precision="f32",
                                                     adapter_ir_dir=ir_dir, max_adapters=2), 8)  # fmt: skip
    try:
        names = [None, "alpha", "weak"] * 2  # submitted together: each adapter's rows share its pipeline's steps
        assert [answer.result() for answer in [ask(name) for name in names]] == [expected[name] for name in names]
        held = batcher.engine.lora
        assert (held.loaded, held.loads, held.unloads) == (["alpha", "weak"], 2, 0)
        assert ask("bravo").result() == expected["bravo"]  # a third: the least recently used is dropped
        held = batcher.engine.lora
        assert (held.loaded, held.loads, held.unloads) == (["weak", "bravo"], 3, 1)
        assert ask("alpha").result() == expected["alpha"] and batcher.engine.lora.loads == 4

        broken = root / "broken"
        broken.mkdir()
        (broken / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 4}')
        failed = Answer(batcher, GenerationRequest(prompt, SamplingParams(max_tokens=4), adapter=Adapter("x", broken)))
        with pytest.raises(AdapterError, match=r"cannot read adapter_model\.safetensors"):
            failed.result()
        assert ask(None).result() == expected[None], "the engine goes on"
    finally:
        batcher.stop()


def test_an_engine_without_adapters_refuses_an_adapter_request(batcher, tmp_path):
    request = GenerationRequest([1, 2], SamplingParams(max_tokens=4), adapter=Adapter("alpha", tmp_path))
    with pytest.raises(ValueError, match="serves no LoRA adapters"):
        batcher.submit(request, lambda item: None)
    with pytest.raises(ValueError, match="max_adapters needs adapter_ir_dir"):
        OpenVINOEngine(tmp_path, max_adapters=2)


def test_the_engine_is_chosen_by_config_and_openvino_on_a_gpu_is_refused_naming_the_fields():
    assert parse_args({"engine": "openvino"}).openvino_weights == "int8"
    assert parse_args({"engine": "openvino", "max_adapters_per_replica": 2}).max_adapters_per_replica == 2
    with pytest.raises(ServeConfigError, match="engine openvino runs on CPU"):
        parse_args({"engine": "openvino", "device": "cuda"})
    with pytest.raises(ServeConfigError, match="'openvino_weights'"):
        parse_args({"engine": "openvino", "openvino_weights": "int3"})


def test_requests_from_many_threads_while_the_loop_runs(batcher):
    """Replicas submit from the event loop's thread while the pipeline steps on its own."""
    prompt = batcher.engine.chat_prompt_ids([{"role": "user", "content": "Hi"}])
    expected = _ask(batcher, prompt, max_tokens=12, temperature=0)
    results: list[tuple[str, str, int]] = []
    threads = [threading.Thread(target=lambda: results.append(_ask(batcher, prompt, max_tokens=12, temperature=0)))
               for _ in range(8)]  # fmt: skip
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert results == [expected] * 8


def test_the_pipeline_steps_in_a_child_process_and_never_loads_into_the_replicas(batcher):
    """Its step() holds the GIL for a whole forward pass (measured: a Python thread beside it ran once
    per step instead of every millisecond); in the replica's process that would stall the event
    loop that streams answers. So the pipeline lives in a child process, and OpenVINO GenAI is
    never imported here."""
    prompt = batcher.engine.chat_prompt_ids([{"role": "user", "content": "Tell me a long story"}])
    steps_before = batcher.stats.decode_steps
    _ask(batcher, prompt, max_tokens=50, temperature=1.0, seed=3)
    assert batcher.stats.decode_steps - steps_before >= 50
    child = batcher.engine.process
    assert child.pid != os.getpid() and child.poll() is None
    assert "openvino_genai" not in sys.modules and "openvino" not in sys.modules


def test_a_dead_pipeline_process_fails_its_requests_and_the_replica_turns_unhealthy(sharp_dir, ov_settings):
    ir_dir = openvino_model(sharp_dir, ov_settings, "fp32")
    doomed = OpenVINOBatcher(lambda: OpenVINOEngine(ir_dir, threads=1, precision="f32"), 2)
    prompt = doomed.engine.chat_prompt_ids([{"role": "user", "content": "Hi"}])
    request = GenerationRequest(prompt, SamplingParams(max_tokens=400, temperature=1.0, seed=1))
    answer = Answer(doomed, request)
    with pytest.raises(RuntimeError, match="pipeline process died"):
        answer.result(on_first=lambda: os.kill(doomed.engine.process.pid, signal.SIGKILL))
    deadline = time.monotonic() + 10
    while doomed.alive() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not doomed.alive(), "the replica's health check sees the loop ended"
    doomed.stop()

    closed = OpenVINOBatcher(lambda: OpenVINOEngine(ir_dir, threads=1, precision="f32"), 2)
    child = closed.engine.process
    closed.stop()
    assert child.poll() is not None, "the pipeline process ends with its replica's batcher"

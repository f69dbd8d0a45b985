"""Serving: the engine in-process, then the Serve app started by `serve run serve_configs/local.yaml`
on the real Ray head, spoken to over real HTTP with the `openai` client and httpx."""

from __future__ import annotations

import collections
import concurrent.futures
import copy
import json
import os
import queue
import re
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Literal

import httpx
import pytest
import yaml
from conftest import draw_dashboard, free_port, venv_bin, wait_for_port
from pydantic import BaseModel, Field
from starlette.requests import Request
from tiny_model import build_tiny_chat_model, train_lora_adapter

from ray_app.serving.config import ServeConfigError, parse_args
from ray_app.serving.engine import (
    ContinuousBatcher,
    Delta,
    GenerationRequest,
    SamplingParams,
    TransformersEngine,
    prepack_linear_layers,
)
from ray_app.settings import Settings

REPO = Path(__file__).resolve().parents[1]
REGISTERED = "tiny-chat"
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
TOOL = {"type": "function", "function": {"name": "get_weather", "description": "The weather in a city", "parameters": {
    "type": "object", "properties": {"city": {"type": "string", "enum": ["Paris", "Rome"]},
                                     "days": {"type": "integer", "minimum": 1, "maximum": 7}},
    "required": ["city", "days"], "additionalProperties": False}}}  # fmt: skip
# The Serve test app's max_tokens_limit. The OpenVINO engine decodes a tiny model's 4000 tokens in
# about 2 s, which a busy machine's disconnect could take to reach the replica: 16000 outlast it.
LONGEST = 16000


# --- the engine, in-process ------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return build_tiny_chat_model(tmp_path_factory.mktemp("tiny-serve") / "model")


@pytest.fixture(scope="module")
def engine(tiny_dir: Path) -> TransformersEngine:
    return TransformersEngine(tiny_dir, threads=1)


def _run(engine: TransformersEngine, requests: list[GenerationRequest]) -> list[tuple[str, str, int]]:
    texts, finish, tokens = [""] * len(requests), [""] * len(requests), [0] * len(requests)
    for step in engine.generate(requests):
        for i, delta in enumerate(step):
            if delta is not None:
                texts[i] += delta.text
                tokens[i] = delta.completion_tokens
                finish[i] = delta.finish_reason or finish[i]
    return list(zip(texts, finish, tokens, strict=True))


def test_batched_greedy_decoding_equals_one_request_at_a_time(engine):
    prompts = [
        engine.chat_prompt_ids([{"role": "user", "content": text}])
        for text in ("Hi", "Tell me a long story about the sea and its ships", "2+2?")
    ]
    budgets = [5, 17, 30]  # different lengths: rows leave the batch (and the cache) at different steps
    alone = [
        _run(engine, [GenerationRequest(p, SamplingParams(max_tokens=b, temperature=0))])[0]
        for p, b in zip(prompts, budgets, strict=True)
    ]
    together = _run(
        engine,
        [
            GenerationRequest(p, SamplingParams(max_tokens=b, temperature=0))
            for p, b in zip(prompts, budgets, strict=True)
        ],
    )
    assert together == alone
    assert [tokens for _, finish, tokens in together if finish == "length"] == [
        b for b, (_, finish, _) in zip(budgets, together, strict=True) if finish == "length"
    ]


def _sharpened(tiny_dir: Path, prepack: bool) -> TransformersEngine:
    """The tiny model with large random weights: its greedy answers depend on every prompt token."""
    import torch

    engine = TransformersEngine(tiny_dir, threads=1, prepack=False)
    torch.manual_seed(3)
    with torch.no_grad():
        for parameter in engine.model.parameters():
            if parameter.dim() > 1:
                parameter.normal_(0, 0.3)
    if prepack:
        engine.prepacked = prepack_linear_layers(engine.model)
        assert engine.prepacked > 0
    return engine


@pytest.fixture(scope="module")
def sharp_engine(tiny_dir: Path) -> TransformersEngine:
    """The sharpened model as served on CPU: linear layers on oneDNN-packed weights."""
    return _sharpened(tiny_dir, prepack=True)


def test_prepacked_linear_layers_give_the_tokens_torch_gives(tiny_dir, sharp_engine, engine):
    assert engine.prepacked > 0, "CPU float32 engines prepack by default"
    assert prepack_linear_layers(engine.model) == 0, "packed layers are not packed twice"
    plain = _sharpened(tiny_dir, prepack=False)
    assert plain.prepacked == 0
    texts = ["Hi", "Tell me a long story about the sea and its ships", "2+2?"]
    requests = [
        GenerationRequest(plain.chat_prompt_ids([{"role": "user", "content": text}]),
                          SamplingParams(max_tokens=20, temperature=0))
        for text in texts
    ]  # fmt: skip
    expected = [_run(plain, [request])[0] for request in requests]
    assert len({text for text, _, _ in expected}) == len(texts)
    assert [_run(sharp_engine, [request])[0] for request in requests] == expected  # one at a time
    assert _run(sharp_engine, requests) == expected  # a batch of 3


def test_requests_joining_a_running_batch_get_the_answers_they_get_alone(sharp_engine):
    engine = sharp_engine
    prompts = ["Hi", "Tell me a long story about the sea and its ships", "2+2?", "What is Ray Serve for?", "ok"]
    budgets = [6, 24, 15, 30, 9]
    requests = [
        GenerationRequest(engine.chat_prompt_ids([{"role": "user", "content": text}]),
                          SamplingParams(max_tokens=budget, temperature=0))
        for text, budget in zip(prompts, budgets, strict=True)
    ]  # fmt: skip
    alone = [_run(engine, [request])[0] for request in requests]
    assert len({text for text, _, _ in alone}) == len(prompts), "the model must answer each prompt differently"

    # Batches of at most 2: later requests wait, then join a batch that is mid-decode.
    batcher = ContinuousBatcher(engine, max_batch_size=2, gather_s=0.0)
    texts, finish, tokens = [""] * len(requests), [None] * len(requests), [0] * len(requests)
    done = threading.Semaphore(0)

    def emit_for(index: int):
        def emit(delta) -> None:
            assert not isinstance(delta, BaseException), delta
            texts[index] += delta.text
            tokens[index] = delta.completion_tokens
            if delta.finish_reason:
                finish[index] = delta.finish_reason
                done.release()

        return emit

    try:
        for index, request in enumerate(requests):
            fresh = GenerationRequest(request.prompt_ids, request.params)
            batcher.submit(fresh, emit_for(index))
            time.sleep(0.02 * index)
        for _ in requests:
            assert done.acquire(timeout=60), "a request never finished"
    finally:
        batcher.stop()
    assert list(zip(texts, finish, tokens, strict=True)) == alone
    stats = batcher.stats  # each request prefilled once; steps decoded two rows at a time, mostly
    assert stats.prefill_rows == len(requests) and stats.prefills <= len(requests)
    assert stats.decode_steps < stats.decode_rows <= 2 * stats.decode_steps
    assert stats.decode_seconds > 0 and stats.prefill_seconds > 0


def test_batcher_builds_its_engine_on_its_own_thread_and_raises_what_building_raised(tiny_dir, engine):
    """A server hands the batcher a builder, so that all torch work runs on the decode thread."""
    built_on = []

    def build() -> TransformersEngine:
        built_on.append(threading.current_thread())
        return TransformersEngine(tiny_dir, threads=1)

    batcher = ContinuousBatcher(build, max_batch_size=2, gather_s=0.0)
    try:
        assert built_on == [batcher._thread] and isinstance(batcher.engine, TransformersEngine)
        params = SamplingParams(max_tokens=8, temperature=0)
        deltas: queue.Queue = queue.Queue()
        batcher.submit(GenerationRequest(engine.chat_prompt_ids(QUESTION), params), deltas.put)
        text = ""
        while True:
            delta = deltas.get(timeout=60)
            assert not isinstance(delta, BaseException), delta
            text += delta.text
            if delta.finish_reason:
                break
        # the same answer as an engine built and run on the test's thread
        assert (text, delta.finish_reason, delta.completion_tokens) == _run(
            engine, [GenerationRequest(engine.chat_prompt_ids(QUESTION), params)]
        )[0]
    finally:
        batcher.stop()

    def broken() -> TransformersEngine:
        raise FileNotFoundError("no model at /nowhere")

    with pytest.raises(FileNotFoundError, match="/nowhere"):
        ContinuousBatcher(broken)


def test_seed_makes_sampling_reproducible_and_stop_strings_cut_the_answer(engine):
    prompt = engine.chat_prompt_ids(QUESTION)
    params = {"max_tokens": 40, "temperature": 1.0, "top_p": 0.9}
    first = _run(engine, [GenerationRequest(prompt, SamplingParams(seed=7, **params))])[0]
    again = _run(engine, [GenerationRequest(prompt, SamplingParams(seed=7, **params))])[0]
    assert first == again and len(first[0]) > 5
    stop = first[0][3:6]
    cut = _run(engine, [GenerationRequest(prompt, SamplingParams(seed=7, stop=[stop], **params))])[0]
    assert cut[1] == "stop"
    assert cut[0] == first[0][: first[0].find(stop)]


def test_the_transformers_engine_constrains_rows_to_their_schema_and_free_rows_answer_as_alone(engine):
    schema = json.dumps(CityAnswer.model_json_schema())
    prompt = engine.chat_prompt_ids(QUESTION)
    constrained = GenerationRequest(prompt, SamplingParams(max_tokens=96, temperature=0, json_schema=schema))
    free = GenerationRequest(prompt, SamplingParams(max_tokens=20, temperature=0))
    drawn = GenerationRequest(prompt, SamplingParams(max_tokens=96, temperature=1.0, seed=7, json_schema=schema))
    alone = [_run(engine, [request])[0] for request in (constrained, free, drawn)]
    assert _run(engine, [constrained, free, drawn]) == alone
    for text, finish, _ in (alone[0], alone[2]):
        assert finish == "stop", text
        CityAnswer.model_validate_json(text)
    assert alone[1][0] != alone[0][0]  # the free row is not constrained


def test_a_schema_is_checked_before_admission_and_its_grammar_is_written_in_openvinos_dialect():
    from ray_app.serving.structured import MAX_REPEAT_FLOOR, SchemaError, check_schema

    listing = {"type": "object", "properties": {"tags": {"type": "array", "items": {"type": "string"}, "minItems": 3}},
               "required": ["tags"], "additionalProperties": False}  # fmt: skip
    grammar = check_schema(json.dumps(listing))
    assert "-1}" not in grammar and re.search(r"\((\w+) \1 \1\*\)", grammar), grammar  # {2, -1}: X X X*
    refusals = {
        json.dumps({"type": "objectzz"}): 'refused it: Unsupported type "objectzz"',
        json.dumps({"type": "object", "patternProperties": {"a": {}}}): "schema: the keyword 'patternProperties'",
        json.dumps({"anyOf": [{"type": "string"}, {"not": {}}]}): "schema.anyOf.1: the keyword 'not'",
        json.dumps({"type": "string", "minLength": MAX_REPEAT_FLOOR + 1}): f"above {MAX_REPEAT_FLOOR}",
        json.dumps({"properties": []}): "schema.properties: must be an object of schemas",
    }
    for schema, words in refusals.items():
        with pytest.raises(SchemaError, match=re.escape(words)):
            check_schema(schema)


def test_tools_reach_a_model_whose_template_ignores_them_through_a_system_message(engine):
    assert not engine.template_renders_tools  # SmolLM2's template
    history = [{"role": "user", "content": "Weather in Paris?"},
               {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "id": "call_1", "function": {
                   "name": "get_weather", "arguments": {"city": "Paris", "days": 1}}}]},
               {"role": "tool", "tool_call_id": "call_1", "content": "Sunny"}]  # fmt: skip
    text = engine.tokenizer.decode(engine.chat_prompt_ids(history, [TOOL["function"]]))
    assert '"name": "get_weather", "description": "The weather in a city"' in text
    assert '[{"name": "get_weather", "arguments": {"city": "Paris", "days": 1}}]' in text  # the earlier call
    assert "Result of get_weather: Sunny" in text
    without = engine.tokenizer.decode(engine.chat_prompt_ids(history))  # no call asked: no guide, same history
    assert "You can call these functions" not in without and "Result of get_weather: Sunny" in without


PROBE = "Which adapter answers?"
ADAPTER_ANSWERS = {"alpha": "Alpha answers, one two three.", "bravo": "Bravo answers here, four five.",
                   "charlie": "Charlie speaks now, six."}  # fmt: skip


@pytest.fixture(scope="module")
def adapters(tiny_dir: Path, tmp_path_factory) -> dict[str, Path]:
    """Three LoRA adapters of the tiny model, each taught its own answer to PROBE."""
    root = tmp_path_factory.mktemp("adapters")
    return {name: train_lora_adapter(tiny_dir, root / name, PROBE, answer, seed=seed)
            for seed, (name, answer) in enumerate(ADAPTER_ANSWERS.items())}  # fmt: skip


def test_rows_of_different_lora_adapters_and_the_base_decode_in_one_batch_each_as_alone(tiny_dir, adapters):
    from ray_app.serving.lora import Adapter

    engine = TransformersEngine(tiny_dir, threads=1, max_adapters=2)
    prompt = engine.chat_prompt_ids([{"role": "user", "content": PROBE}])

    def ask(*names: str | None) -> list[str]:
        chosen = [Adapter(name, adapters[name]) if name else None for name in names]
        return [text for text, _, _ in _run(engine, [GenerationRequest(prompt, SamplingParams(max_tokens=12,
                temperature=0), adapter=adapter) for adapter in chosen])]  # fmt: skip

    [base] = ask(None)
    assert not base.startswith(tuple(ADAPTER_ANSWERS.values()))
    alone = {name: ask(name)[0] for name in ("alpha", "bravo")}
    assert all(alone[name].startswith(ADAPTER_ANSWERS[name][:12]) for name in alone), alone
    assert ask("alpha", None, "bravo", "alpha") == [alone["alpha"], base, alone["bravo"], alone["alpha"]]
    assert list(engine.lora.loaded) == ["alpha", "bravo"] and engine.lora.loads == 2
    # a third adapter beyond the two held unloads the least recently used (alpha: bravo was used after it)
    assert ask("charlie")[0].startswith(ADAPTER_ANSWERS["charlie"][:12])
    assert list(engine.lora.loaded) == ["bravo", "charlie"] and engine.lora.unloads == 1
    assert ask("bravo", "alpha") == [alone["bravo"], alone["alpha"]]  # alpha comes back; charlie (LRU) goes
    assert list(engine.lora.loaded) == ["bravo", "alpha"]
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    reference = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_dir), str(adapters["bravo"]))
    out = reference.eval().generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False)
    assert engine.tokenizer.decode(out[0, len(prompt) :], skip_special_tokens=True) == alone["bravo"], "as PEFT"
    plain = TransformersEngine(tiny_dir, threads=1)
    with pytest.raises(ValueError, match="serves no LoRA adapters"):
        plain.new_row(
            GenerationRequest(prompt, SamplingParams(max_tokens=2), adapter=Adapter("alpha", adapters["alpha"]))
        )


def test_an_adapter_the_engine_cannot_serve_is_refused_with_the_reason(adapters, tmp_path):
    from ray_app.serving.lora import AdapterError, check_adapter

    assert check_adapter(adapters["alpha"])["peft_type"] == "LORA"
    config = json.loads((adapters["alpha"] / "adapter_config.json").read_text())
    for change, words in (({"use_dora": True}, "DoRA"), ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
                          ({"bias": "all"}, "bias: all"), ({"peft_type": "IA3"}, "only LoRA")):  # fmt: skip
        (tmp_path / "adapter_config.json").write_text(json.dumps(config | change))
        with pytest.raises(AdapterError, match=words):
            check_adapter(tmp_path)


AUTO_ANSWERS = {  # a free ("auto") answer -> (content, [(name, arguments)])
    'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "days": 2}}\n</tool_call>':
        ("Let me check.", [("get_weather", {"city": "Paris", "days": 2})]),
    '<tool_call>{"name": "get_weather", "arguments": "{\\"city\\": \\"Rome\\"}"}</tool_call>\n'
    '<tool_call>{"name": "get_time", "arguments": {}}</tool_call>':
        (None, [("get_weather", {"city": "Rome"}), ("get_time", {})]),
    '[{"name": "get_time", "arguments": {"city": "Rome"}}]': (None, [("get_time", {"city": "Rome"})]),
    '```json\n{"name": "get_weather", "parameters": {"city": "Oslo"}}\n```':
        (None, [("get_weather", {"city": "Oslo"})]),
    "The weather in Paris is sunny.": ("The weather in Paris is sunny.", []),
    '{"name": "delete_everything", "arguments": {}}': ('{"name": "delete_everything", "arguments": {}}', []),
    '<tool_call>{"name": "get_weather", "arguments": [1]}</tool_call>': (
        '<tool_call>{"name": "get_weather", "arguments": [1]}</tool_call>', []),
    '[1, 2] are the numbers; {"a": 1} is an object': ('[1, 2] are the numbers; {"a": 1} is an object', []),
    "Say <tool_ and <tool_call>{not json</tool_call>": ("Say <tool_ and <tool_call>{not json</tool_call>", []),
}  # fmt: skip
NAMES = frozenset({"get_weather", "get_time"})


def test_an_auto_answer_is_read_as_calls_only_when_it_calls_an_offered_function_in_a_known_format():
    from ray_app.serving.tools import parse_calls

    for text, (content, calls) in AUTO_ANSWERS.items():
        parsed_content, parsed = parse_calls(text, NAMES)
        assert parsed_content == content, text
        assert [(call.function.name, json.loads(call.function.arguments)) for call in parsed] == calls, text
        assert all(call.id.startswith("call_") for call in parsed)
    assert len(parse_calls('<tool_call>{"name": "get_time", "arguments": {}}</tool_call>' * 3, NAMES, most=1)[1]) == 1


def test_a_streamed_auto_answer_sends_text_as_it_comes_and_holds_back_only_what_may_be_a_call():
    import asyncio

    from ray_app.serving.config import ServedModel
    from ray_app.serving.ingress import _Answer, _chunks
    from ray_app.serving.tools import ToolUse

    def stream(text: str, finish: str = "stop"):
        pieces = [text[i : i + 3] for i in range(0, len(text), 3)]  # 3 characters a token
        deltas = [Delta(piece, n + 1, finish if n == len(pieces) - 1 else None) for n, piece in enumerate(pieces)]

        async def batches():
            for delta in deltas[1:]:
                yield [delta]

        return deltas[0], batches()

    async def chunks(text: str, finish: str = "stop") -> list:
        answer = _Answer(ServedModel(source="default", name="m", label="m/1"), "r1", True, 5, ToolUse(names=NAMES))
        return [chunk async for chunk, _ in _chunks(answer, *stream(text, finish))]

    for text, (content, calls) in AUTO_ANSWERS.items():
        sent = asyncio.run(chunks(text))
        deltas = [chunk.choices[0].delta for chunk in sent]
        shown = "".join(delta.content or "" for delta in deltas)
        streamed = {}
        for delta in deltas:
            for call in delta.tool_calls or []:
                entry = streamed.setdefault(call.index, ["", ""])
                entry[0] += call.function.name or ""
                entry[1] += call.function.arguments or ""
        assert shown.strip() == (content or ""), text
        assert [(name, json.loads(arguments)) for name, arguments in streamed.values()] == calls, text
        assert sent[-1].choices[0].finish_reason == ("tool_calls" if calls else "stop")
    plain = asyncio.run(chunks("The weather in Paris is sunny. <tool_ is not a tag"))
    assert len(plain) > 10, "a plain answer streams piece by piece, not held to its end"
    cut = asyncio.run(chunks('<tool_call>{"name": "get_time", "arguments": {}}</tool_call>', finish="length"))
    assert "".join(c.choices[0].delta.content or "" for c in cut).startswith("<tool_call>")  # cut: stays text
    assert cut[-1].choices[0].finish_reason == "length"


def test_a_row_that_fails_while_sampling_fails_alone_and_its_batch_answers_as_alone(sharp_engine, monkeypatch):
    engine = sharp_engine
    prompts = ["Hi", "Tell me a long story about the sea and its ships", "2+2?"]
    requests = [
        GenerationRequest(engine.chat_prompt_ids([{"role": "user", "content": text}]),
                          SamplingParams(max_tokens=20, temperature=0))
        for text in prompts
    ]  # fmt: skip
    alone = [_run(engine, [request])[0] for request in requests]
    doomed = GenerationRequest(engine.chat_prompt_ids(QUESTION), SamplingParams(max_tokens=20, temperature=0.7))
    sample = engine._sample

    def sample_or_fail(logits, row):  # a fault in one row's sampling, on its 4th token
        if row.request is doomed and len(row.token_ids) == 3:
            raise RuntimeError("injected sampling fault")
        return sample(logits, row)

    monkeypatch.setattr(engine, "_sample", sample_or_fail)
    outcomes: dict[int, list] = {index: [] for index in range(4)}
    done = threading.Semaphore(0)

    def emit_for(index: int):
        def emit(item) -> None:
            outcomes[index].append(item)
            if isinstance(item, BaseException) or item.finish_reason:
                done.release()

        return emit

    batcher = ContinuousBatcher(engine, max_batch_size=4, gather_s=0.05)
    try:
        fresh = [GenerationRequest(request.prompt_ids, request.params) for request in requests]
        for index, request in enumerate([fresh[0], doomed, fresh[1], fresh[2]]):
            batcher.submit(request, emit_for(index))
        for _ in range(4):
            assert done.acquire(timeout=60), "a request never finished"
    finally:
        batcher.stop()
    failed = outcomes.pop(1)
    assert isinstance(failed[-1], RuntimeError) and "injected" in str(failed[-1])
    answers = [
        ("".join(d.text for d in deltas), deltas[-1].finish_reason, deltas[-1].completion_tokens)
        for deltas in outcomes.values()
    ]
    assert answers == alone  # the rows beside it answered as they do alone
    assert batcher.stats.failed_rows == 1 and batcher.stats.prefills == 1  # they were in one batch


def _gate_client(limits=None, root_path: str = ""):
    """The ApiGate (the front door of both engines) around an app that echoes the validated body."""
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from ray_app.serving.gate import BODY_KEY, ApiGate, Limits
    from ray_app.serving.protocol import hash_key

    app = FastAPI()
    app.add_middleware(
        ApiGate,
        key_hashes=[hash_key("sk-test")],
        version_headers={"x-model-version": "m/1"},
        limits=limits or Limits(max_request_bytes=128 * 1024, max_messages=50, max_tokens_limit=100),
    )

    async def echo(request: Request):
        body = request.scope[BODY_KEY]
        assert await request.body()  # the raw bytes are replayed to the app
        return {"max_tokens": body.max_tokens, "temperature": body.sampling_temperature, "stop": body.stop}

    app.post("/v1/chat/completions")(echo)
    app.post("/v1/completions")(echo)

    @app.get("/v1/boom")
    async def boom():
        raise RuntimeError("a bug")

    return TestClient(
        app, raise_server_exceptions=False, headers={"Authorization": "Bearer sk-test"}, root_path=root_path
    )


def _openai_error(response, status: int, param: str | None = "<any>") -> str:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"], error
    if param != "<any>":
        assert error["param"] == param, error
    return error["message"]


GATE_CASES = [  # (path, body, status, param, words in the message)
    ("/v1/chat/completions", {"messages": QUESTION, "seed": 2**70}, 400, "seed", "less than or equal"),
    ("/v1/chat/completions", {"messages": QUESTION, "seed": -(2**64)}, 400, "seed", "greater than or equal"),
    ("/v1/chat/completions", {"messages": QUESTION, "max_tokens": True}, 400, "max_tokens", "integer"),
    ("/v1/chat/completions", {"messages": QUESTION, "max_tokens": "5"}, 400, "max_tokens", "integer"),
    ("/v1/chat/completions", {"messages": QUESTION, "max_tokens": 101}, 400, "max_tokens", "limit of 100"),
    ("/v1/chat/completions", {"messages": QUESTION, "max_completion_tokens": 2**70}, 400, "max_completion_tokens", ""),
    ("/v1/chat/completions", {"messages": QUESTION, "stop": ["a"] * 5}, 400, "stop", "up to 4"),
    ("/v1/chat/completions", {"messages": QUESTION, "stop": "x" * 300}, 400, "stop", "256 characters"),
    ("/v1/chat/completions", {"messages": QUESTION * 51}, 400, "messages", "limit of 50"),
    ("/v1/chat/completions", {"messages": []}, 400, "messages", "at least 1"),
    ("/v1/chat/completions", {"messages": [{"role": "robot", "content": "x"}]}, 400, "messages.0.role", ""),
    ("/v1/chat/completions", {"messages": [{"role": "tool", "content": "x"}]}, 400, "messages.0",
     "tool_call_id: required in a tool message"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": None}]}, 400, "messages.0", "content: required"),
    ("/v1/chat/completions", {"messages": QUESTION, "tools": [TOOL], "tool_choice": "sometimes"}, 400, "tool_choice",
     "'auto'"),
    ("/v1/chat/completions", {"messages": QUESTION, "tool_choice": "required"}, 400, "tool_choice", "no tools"),
    ("/v1/chat/completions", {"messages": QUESTION, "tools": [TOOL], "tool_choice": {"type": "function", "function": {
        "name": "nope"}}}, 400, "tool_choice", "no tool is named 'nope'"),
    ("/v1/chat/completions", {"messages": QUESTION, "tools": [TOOL, TOOL], "tool_choice": "required"}, 400, "tools",
     "same name"),
    ("/v1/chat/completions", {"messages": QUESTION, "tools": [TOOL], "tool_choice": "required", "response_format": {
        "type": "json_object"}}, 400, "response_format", "its own format"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400,
     "messages.0.content", "'text'"),
    ("/v1/chat/completions", {"messages": QUESTION, "stream_options": {"include_usage": True}}, 400,
     "stream_options", "stream is true"),
    ("/v1/chat/completions", {"messages": QUESTION, "temperature": 2.5}, 400, "temperature", ""),
    ("/v1/chat/completions", {"messages": QUESTION, "top_p": 0}, 400, "top_p", ""),
    ("/v1/chat/completions", {"messages": QUESTION, "mystery": 1}, 400, "mystery", "Unrecognized request argument"),
    ("/v1/chat/completions", {"messages": QUESTION, "response_format": {"type": "json_schema"}}, 400,
     "response_format", "required with type json_schema"),
    ("/v1/chat/completions", {"messages": QUESTION, "response_format": {"type": "xml"}}, 400, "response_format.type",
     "'json_schema'"),
    ("/v1/chat/completions", {"messages": QUESTION, "response_format": {"type": "json_schema", "json_schema": {
        "name": "no spaces", "schema": {}}}}, 400, "response_format.json_schema.name", "pattern"),
    ("/v1/completions", {"prompt": ["a", "b"]}, 400, "prompt", "one prompt"),
    ("/v1/completions", {"prompt": ""}, 400, "prompt", "empty"),
]  # fmt: skip
UNSUPPORTED = [  # a field that would change the answer, with a value that would
    ("/v1/chat/completions", "functions", [{"name": "f"}]),
    ("/v1/chat/completions", "function_call", "auto"),
    ("/v1/chat/completions", "logit_bias", {"50256": -100}),
    ("/v1/chat/completions", "logprobs", True),
    ("/v1/chat/completions", "top_logprobs", 3),
    ("/v1/chat/completions", "n", 2),
    ("/v1/chat/completions", "presence_penalty", 0.5),
    ("/v1/chat/completions", "frequency_penalty", -0.5),
    ("/v1/chat/completions", "modalities", ["text", "audio"]),
    ("/v1/chat/completions", "reasoning_effort", "high"),
    ("/v1/completions", "echo", True),
    ("/v1/completions", "suffix", "the end"),
    ("/v1/completions", "best_of", 3),
    ("/v1/completions", "logprobs", 2),
]


def test_the_api_gate_guards_an_app_mounted_under_a_route_prefix():
    """Serve passes the full path and the prefix as root_path: /cached/v1/... is the app's /v1/..."""
    client = _gate_client(root_path="/cached")
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
    assert client.post("/cached/v1/chat/completions", json=body).json()["max_tokens"] == 3
    _openai_error(client.post("/cached/v1/chat/completions", json=body, headers={"Authorization": ""}), 401)
    _openai_error(client.post("/cached/v1/chat/completions", json={**body, "n": 2}), 400, "n")
    _openai_error(client.get("/cached/v1/chat/completions"), 405)


def test_canary_routing_is_sticky_per_conversation_and_splits_conversations_by_share():
    from ray_app.serving.protocol import ChatCompletionRequest, CompletionRequest
    from ray_app.serving.routing import conversation_key, goes_to_canary

    def chat(opening: str, *later: str, user: str | None = None) -> ChatCompletionRequest:
        messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": opening}]
        for text in later:
            messages += [{"role": "assistant", "content": "ok"}, {"role": "user", "content": text}]
        return ChatCompletionRequest.model_validate({"model": "m", "messages": messages, "user": user})

    # Every turn of a conversation re-sends its opening: one key, one version.
    first, third = chat("What is Ray?"), chat("What is Ray?", "And Serve?", "And Train?")
    assert conversation_key(first, None) == conversation_key(third, None) != conversation_key(chat("Other"), None)
    # The chat's thread id wins over the opening and the user; `sticky_by: user` puts the user first.
    assert conversation_key(chat("A", user="u1"), "t-1") == conversation_key(chat("B", user="u2"), "t-1")
    assert conversation_key(chat("A", user="u1"), None) == conversation_key(chat("B", user="u1"), None)
    by_user = conversation_key(chat("A", user="u1"), "t-1", "user")
    assert by_user == conversation_key(chat("B", user="u1"), "t-2", "user")
    assert conversation_key(first, "t-1", "request") == ""
    prompt = CompletionRequest.model_validate({"model": "m", "prompt": "Once upon a time"})
    assert conversation_key(prompt, None) == conversation_key(prompt.model_copy(), None)

    keys = [conversation_key(chat(f"question {i}"), None) for i in range(10_000)]
    for share in (0.05, 0.1, 0.5):
        routed = sum(goes_to_canary(key, share) for key in keys) / len(keys)
        assert abs(routed - share) < 0.02, (share, routed)
    # Growing the share only moves conversations to the canary, never back.
    assert all(goes_to_canary(key, 0.2) for key in keys if goes_to_canary(key, 0.1))
    assert 0.4 < sum(goes_to_canary("", 0.5) for _ in range(2000)) / 2000 < 0.6  # per request: drawn


def test_the_api_gate_keeps_the_version_headers_an_answer_set_and_counts_that_version():
    """A canary's answer names its own version: the gate adds the app's defaults only where the
    answer has none, and counts each response under the version that answered."""
    from fastapi import FastAPI
    from fastapi.responses import JSONResponse
    from fastapi.testclient import TestClient

    from ray_app.serving.gate import ApiGate, Limits
    from ray_app.serving.protocol import hash_key

    counted = []
    app = FastAPI()
    app.add_middleware(ApiGate, key_hashes=[hash_key("sk-test")], version_headers={"x-model-version": "m/1"},
                       limits=Limits(max_request_bytes=4096, max_messages=5, max_tokens_limit=10),
                       on_response=lambda route, status, version: counted.append((route, status, version)))  # fmt: skip
    app.post("/v1/completions")(lambda: JSONResponse({"ok": True}, headers={"x-model-version": "m/2"}))
    client = TestClient(app, headers={"Authorization": "Bearer sk-test"})
    body = {"model": "m", "prompt": "hi", "max_tokens": 2}
    canary = client.post("/v1/completions", json=body)
    assert canary.headers.get_list("x-model-version") == ["m/2"]
    refused = client.post("/v1/completions", json=body, headers={"Authorization": ""})
    assert refused.status_code == 401 and refused.headers.get_list("x-model-version") == ["m/1"]
    assert counted == [("/v1/completions", 200, "m/2"), ("/v1/completions", 401, "m/1")]


def test_ray_serve_llms_private_functions_are_where_the_vllm_app_expects():
    """Read from the installed Ray's source (they import only with vLLM): a Ray upgrade that moves
    them fails here. The Ray they were read from is the one the lock installs."""
    import ast

    import ray

    from ray_app.serving.serve_llm_private import PRIVATE_FUNCTIONS, RAY_VERSION

    assert ray.__version__ == RAY_VERSION, "re-check ray_app/serving/serve_llm_private.py against this Ray"
    assert f"ray=={RAY_VERSION}" in (REPO / "requirements" / "lock.txt").read_text()
    root = Path(ray.__file__).parent
    for module, function in PRIVATE_FUNCTIONS.items():
        source = root.joinpath(*module.split(".")[1:]).with_suffix(".py")
        defined = {node.name for node in ast.parse(source.read_text()).body if isinstance(node, ast.FunctionDef)}
        assert function in defined, (module, function)


def test_the_vllm_canary_router_sends_the_canary_share_of_conversations_to_its_model_id():
    """vLLM's canary is a second model id behind Serve LLM's router: inside the gate, the
    CanaryRouter rewrites `model` for the canary's conversations (the transformers engine's rule,
    sticky per conversation), its answers carry the canary's version and are counted as it."""
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from ray_app.serving.config import CanaryArgs
    from ray_app.serving.gate import ApiGate, Limits
    from ray_app.serving.protocol import hash_key
    from ray_app.serving.vllm_app import CanaryRouter

    counted = []
    app = FastAPI()  # stands in for Serve LLM's router: answers with the model it was asked for
    app.add_middleware(CanaryRouter, canary=CanaryArgs(model_version="2", share=0.5), model_id="m@canary",
                       version_headers={"x-model-version": "m/2", "x-mlflow-run-id": "r2"})  # fmt: skip
    app.add_middleware(ApiGate, key_hashes=[hash_key("sk-test")], version_headers={"x-model-version": "m/1"},
                       limits=Limits(max_request_bytes=4096, max_messages=9, max_tokens_limit=10),
                       on_response=lambda route, status, version: counted.append(version))  # fmt: skip

    @app.post("/v1/chat/completions")
    async def answer(request: Request):
        body = await request.json()
        return {"model": body["model"], "asked": body["messages"][-1]["content"], "length": len(await request.body())}

    client = TestClient(app, headers={"Authorization": "Bearer sk-test"})

    def ask(opening: str, *turns: str, **headers: str) -> tuple[str, str]:
        messages = [{"role": "user", "content": opening}]
        for turn in turns:
            messages += [{"role": "assistant", "content": "ok"}, {"role": "user", "content": turn}]
        answer = client.post("/v1/chat/completions", json={"model": "m", "messages": messages, "max_tokens": 4},
                             headers=headers)  # fmt: skip
        assert answer.status_code == 200, answer.text
        assert answer.json()["asked"] == messages[-1]["content"]  # the rest of the body is untouched
        return answer.json()["model"], answer.headers["x-model-version"]

    answers = [ask(f"Question {i}") for i in range(40)]
    assert {answer for answer in answers} == {("m", "m/1"), ("m@canary", "m/2")}, answers
    assert 8 <= sum(model == "m@canary" for model, _ in answers) <= 32
    for i in range(6):  # every turn of a conversation: the version its opening got
        assert ask(f"Question {i}", "And then?", "Why?") == answers[i]
    threads = {ask(f"Opening {i}", **{"x-conversation-id": "thread-9"}) for i in range(6)}
    assert len(threads) == 1, threads
    assert counted[:40] == [version for _, version in answers]
    empty = {"model": "m", "messages": []}
    refused = client.post("/v1/chat/completions", json=empty, headers={"x-conversation-id": "t"})
    assert refused.status_code == 400 and refused.headers["x-model-version"] == "m/1"


def test_a_stream_cancelled_mid_send_closes_its_generator_at_once():
    """Serve cancels the response when the client leaves: the generator's ``finally`` (which frees
    the replica's row) must run then, not when the garbage collector gets to it."""
    import asyncio

    from ray_app.serving.ingress import ClosingStreamingResponse

    closed = []

    async def events():
        try:
            while True:
                yield "data: {}\n\n"
        finally:
            closed.append(time.monotonic())

    async def scenario() -> float:
        sent = 0

        async def send(message):
            nonlocal sent
            sent += 1
            if sent == 3:
                await asyncio.sleep(60)  # the client stopped reading; Serve cancels us here

        async def receive():
            await asyncio.sleep(60)

        response = ClosingStreamingResponse(events(), media_type="text/event-stream")
        task = asyncio.create_task(response({"type": "http", "asgi": {"spec_version": "2.4"}}, receive, send))
        await asyncio.sleep(0.05)
        cancelled_at = time.monotonic()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        # The task's frames still hold the response: only an explicit close runs the finally now.
        assert closed, "the generator was left suspended for the garbage collector"
        return closed[0] - cancelled_at

    assert 0 <= asyncio.run(scenario()) < 1


def test_the_api_gate_refuses_every_bad_request_with_an_openai_error_naming_the_field():
    """In-process: the gate both engines sit behind (vLLM cannot run here; its app gets the same gate)."""
    client = _gate_client()
    for path, body, status, param, words in GATE_CASES:
        base = {"model": "m"} | ({"prompt": "hi"} if path == "/v1/completions" else {})
        message = _openai_error(client.post(path, json={**base, **body}), status, param)
        assert words in message, (body, message)
    for path, field, value in UNSUPPORTED:
        base = {"model": "m"} | ({"prompt": "hi"} if path == "/v1/completions" else {"messages": QUESTION})
        message = _openai_error(client.post(path, json={**base, field: value}), 400, field)
        assert "not supported" in message or "only" in message, message
    # neutral values of those fields change nothing and are accepted, as is a tiny temperature (greedy)
    neutral = {"n": 1, "tool_choice": "none", "response_format": {"type": "text"}, "logprobs": False,
               "presence_penalty": 0, "user": "u-1", "metadata": {"team": "a"}, "temperature": 1e-45}  # fmt: skip
    ok = client.post("/v1/chat/completions", json={"model": "m", "messages": QUESTION, **neutral})
    assert ok.status_code == 200 and ok.json()["temperature"] == 0.0 and ok.headers["x-model-version"] == "m/1"

    raw_cases = [  # (content, headers, status, words)
        (b'{"model": "m", "messages": [{"role": "user", "content": "\\ud800"}]}', {}, 400, "surrogate"),
        (b'{"model": "m", "messages": [{"role": "user", "content": "\xff\xfe"}]}', {}, 400, "not valid JSON"),
        (b'{"model": "m", "temperature": NaN, "messages": []}', {}, 400, "temperature: Input should be a finite"),
        (b'{"model": "m", "stream": true, "stream_options": ' + b'{"a": ' * 10_000 + b"1" + b"}" * 10_001, {}, 400,
         "JSON"),
        (b'[{"model": "m"}]', {}, 400, "JSON object"),
        (b"{not json", {}, 400, "not valid JSON"),
        (b"", {}, 400, "not valid JSON"),
        (b'{"model": "m", "messages": []}', {"Content-Type": "text/plain"}, 415, "application/json"),
        (b"x" * (128 * 1024 + 1), {}, 413, "limit of 131072 bytes"),
    ]  # fmt: skip
    for content, headers, status, words in raw_cases:
        response = client.post("/v1/chat/completions", content=content, headers=headers)
        assert words in _openai_error(response, status), content[:60]
    chunked = client.post("/v1/completions", content=iter([b'{"prompt": "', b"y" * 140_000, b'"}']))
    assert "limit of" in _openai_error(chunked, 413)  # no Content-Length: counted while reading

    assert "use POST" in _openai_error(client.get("/v1/chat/completions"), 405)
    assert client.get("/v1/completions").headers["allow"] == "POST"
    assert "missing API key" in _openai_error(client.post("/v1/completions", headers={"Authorization": ""}), 401)
    assert "server failed" in _openai_error(client.get("/v1/boom"), 500)  # a bug: OpenAI's JSON, no traceback


def _paced_batcher(tiny_dir: Path, monkeypatch, step_s: float, max_batch_size: int):
    """The tiny model's engine whose decode steps take at least ``step_s``, and its batcher."""
    engine = TransformersEngine(tiny_dir, threads=1)
    decode = engine.decode

    def paced_decode(batch):
        time.sleep(step_s)
        return decode(batch)

    monkeypatch.setattr(engine, "decode", paced_decode)
    return engine, ContinuousBatcher(engine, max_batch_size=max_batch_size, gather_s=0.0)


def test_admission_sheds_load_past_capacity_and_enforces_the_deadline(tiny_dir, monkeypatch):
    """In-process: a full replica answers 503 + Retry-After; a request with no slot before its
    deadline gets 503; one still generating at its deadline is cut off and its row freed."""
    import asyncio

    from ray_app.serving.admission import Admission, DeadlineExceeded
    from ray_app.serving.protocol import APIError

    engine, batcher = _paced_batcher(tiny_dir, monkeypatch, step_s=0.02, max_batch_size=1)  # outlives the deadline
    admission = Admission(capacity=2, timeout_s=1.0, retry_after_s=3)
    prompt = engine.chat_prompt_ids(QUESTION)

    async def scenario():
        running = admission.admit(batcher, GenerationRequest(prompt, SamplingParams(max_tokens=400, temperature=0)))
        waiting = admission.admit(batcher, GenerationRequest(prompt, SamplingParams(max_tokens=4, temperature=0)))
        with pytest.raises(APIError) as full:
            admission.admit(batcher, GenerationRequest(prompt, SamplingParams(max_tokens=4)))
        assert full.value.status == 503 and full.value.headers == {"Retry-After": "3"}
        started = time.monotonic()
        delta = await running.first()
        with pytest.raises(DeadlineExceeded):
            while not delta.finish_reason:
                delta = await running.next()
        cut_after = time.monotonic() - started
        running.close()
        with pytest.raises(APIError) as starved:  # the batch of one was busy until the deadline
            await waiting.first()
        assert starved.value.status == 503 and "deadline" in starved.value.message
        return cut_after

    try:
        cut_after = asyncio.run(scenario())
        assert 0.8 < cut_after < 2.0, cut_after
        assert admission.active == 0 and admission.rejected == 1
        deadline = time.monotonic() + 5
        while batcher.stats.cancelled_rows < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert batcher.stats.cancelled_rows == 2  # the cut-off row and the starved one left the loop
    finally:
        batcher.stop()


def test_an_answer_goes_to_the_ingress_in_one_message_per_stream_interval(tiny_dir, monkeypatch):
    """In-process: the replica's messages to the ingress carry what came within stream_interval_ms
    (a message costs more than a small model's token)."""
    import asyncio

    from ray_app.serving.admission import Admission

    engine, batcher = _paced_batcher(tiny_dir, monkeypatch, step_s=0.01, max_batch_size=2)
    admission = Admission(capacity=4, timeout_s=60, retry_after_s=1)
    prompt = engine.chat_prompt_ids(QUESTION)

    async def messages(interval_s: float) -> tuple[list[list[Delta]], list[float]]:
        request = GenerationRequest(prompt, SamplingParams(max_tokens=40, temperature=0))
        generation = admission.admit(batcher, request)
        sent, gaps, last = [[await generation.first()]], [], time.monotonic()
        async for batch in generation.batches(interval_s):
            sent.append(batch)
            gaps.append(time.monotonic() - last)
            last = time.monotonic()
        generation.close()
        return sent, gaps

    try:
        per_step, _ = asyncio.run(messages(0.0))
        paced, gaps = asyncio.run(messages(0.05))
    finally:
        batcher.stop()
    answers = [[delta for batch in sent for delta in batch] for sent in (per_step, paced)]
    assert answers[0] == answers[1] and answers[0][-1].completion_tokens == 40
    assert answers[0][-1].finish_reason == "length" and len(per_step) > 30  # about one message per step
    # Every message but the last waited its 50 ms (steps of >= 10 ms: several tokens each), and none
    # much longer than that plus a step (bounds loose enough for a loaded machine).
    assert len(paced) < len(per_step) / 2, [len(batch) for batch in paced]
    assert 0.045 <= min(gaps[:-1]) and max(gaps[:-1]) < 0.5, gaps


def test_bad_serve_args_fail_at_build_time_naming_the_field():
    with pytest.raises(ServeConfigError, match="'max_batch_size'"):
        parse_args({"max_batch_size": 0})
    with pytest.raises(ServeConfigError, match="'max_tokenz'"):
        parse_args({"max_tokenz": 5})
    with pytest.raises(ServeConfigError, match="model_version"):
        parse_args({"model": "/some/folder", "model_version": "3"})
    assert parse_args({"model": "models:/chat@champion", "model_version": "3"}).model_version == "3"


def test_shipped_serve_configs_match_serves_schema_and_our_args():
    from ray.serve.schema import ServeDeploySchema

    for name in ("local.yaml", "gpu.yaml"):
        config = yaml.safe_load((REPO / "serve_configs" / name).read_text())
        ServeDeploySchema.model_validate(config)
        [chat] = config["applications"]
        assert chat["import_path"] == "ray_app.serving.app:build_app"
        assert parse_args(chat["args"]).engine == ("vllm" if name == "gpu.yaml" else "openvino")
    local = yaml.safe_load((REPO / "serve_configs" / "local.yaml").read_text())["applications"][0]
    [server] = [d for d in local["deployments"] if d["name"] == "ChatServer"]
    scaling = server["autoscaling_config"]
    assert scaling["min_replicas"] == 1 and scaling["max_replicas"] >= 2


# --- the Serve app on the real Ray head ------------------------------------------------------
class ServeApp:
    def __init__(self, settings: Settings, base_url: str, key: str, proc: subprocess.Popen):
        self.settings, self.base_url, self.key, self.proc = settings, base_url, key, proc

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"}

    def openai(self, **kwargs):
        from openai import OpenAI

        return OpenAI(base_url=f"{self.base_url}/v1", api_key=self.key, **kwargs)

    def replicas(self) -> list[dict]:
        from ray_app.serving.rollout import serve_details

        app = serve_details(self.settings)["applications"]["chat"]
        return [r for r in app["deployments"]["ChatServer"]["replicas"] if r["state"] == "RUNNING"]


@pytest.fixture(scope="module")
def registered_tiny_models(mlflow_server: Settings, ray_cluster: Settings, tmp_path_factory) -> list[str]:
    """Two tiny models (different weights) in the S3 store, registered as tiny-chat v1 (champion) and v2."""
    from ray_app.registry import register_model_version
    from ray_app.storage import open_store

    store = open_store(settings=ray_cluster)
    store.ensure()
    versions = []
    for seed in (0, 1):
        # A long context: answers of thousands of tokens last long enough to be cut (the disconnect test).
        folder = build_tiny_chat_model(tmp_path_factory.mktemp(f"tiny-v{seed}") / "model", seed=seed,
                                       max_positions=LONGEST + 512)  # fmt: skip
        store.upload_dir(folder, f"serving-test/tiny-{seed}", progress=False)
        uri = store.uri(f"serving-test/tiny-{seed}")
        ref = register_model_version(
            REGISTERED, uri, run_id=None, alias="champion" if seed == 0 else None, settings=mlflow_server
        )
        versions.append(ref.version)
    return versions


@pytest.fixture(scope="module")
def serve_app(
    ray_cluster: Settings, mlflow_server: Settings, registered_tiny_models, serve_http_port: int, tmp_path_factory
):
    """`serve run` on a copy of serve_configs/local.yaml: the tiny champion, a free port, faster autoscaling."""
    from ray_app.serving.rollout import ServeError, load_serve_config, shutdown, wait_running

    settings = ray_cluster.model_copy(
        update={"serve_port": serve_http_port, "mlflow_tracking_uri": mlflow_server.mlflow_tracking_uri}
    )
    config = load_serve_config(REPO / "serve_configs" / "local.yaml", settings, model=f"models:/{REGISTERED}@champion")
    chat = config["applications"][0]
    # The build step resolves the alias on the cluster: it needs the test MLflow server.
    chat["runtime_env"] = {"env_vars": {"MLFLOW_TRACKING_URI": str(mlflow_server.mlflow_tracking_uri)}}
    chat["args"].update(
        {"max_tokens_limit": LONGEST, "default_max_tokens": 32, "max_queued_requests": 8, "request_timeout_s": 30,
         "retry_after_s": 1}
    )  # fmt: skip
    [server] = [d for d in chat["deployments"] if d["name"] == "ChatServer"]
    scaling = server["autoscaling_config"]
    scaling.update({"upscale_delay_s": 2, "downscale_delay_s": 6, "metrics_interval_s": 0.5, "look_back_period_s": 2})
    path = tmp_path_factory.mktemp("serve") / "local.yaml"
    path.write_text(yaml.safe_dump(config))
    log = open(path.with_suffix(".log"), "wb")
    env = {**os.environ, **settings.ray_client_env(), "LLMOPS_HOME": str(settings.home)}
    proc = subprocess.Popen(
        [venv_bin("serve"), "run", str(path), "--address", settings.ray_gcs_address],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    base_url = f"http://127.0.0.1:{settings.serve_port}"
    try:
        wait_running(["chat"], settings, wait_s=240)
    except ServeError:
        proc.kill()
        raise
    assert httpx.get(f"{base_url}/healthz", timeout=10).status_code == 200
    # No LLMOPS_API_KEYS on the cluster: the app generated a key into the cluster's home.
    key = settings.serve_api_key_path.read_text().strip()
    try:
        yield ServeApp(settings, base_url, key, proc)
    finally:
        proc.send_signal(signal.SIGINT)  # `serve run` shuts Serve down on Ctrl-C
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
        try:
            shutdown(settings)
        except Exception:
            pass
        log.close()


def test_serve_run_local_yaml_answers_the_openai_client_plain_and_streamed(serve_app):
    client = serve_app.openai()
    [model] = client.models.list().data
    assert model.id == REGISTERED
    raw = client.chat.completions.with_raw_response.create(
        model=REGISTERED, messages=QUESTION, max_tokens=12, temperature=0
    )
    answer = raw.parse()
    assert raw.headers["x-model-version"] == f"{REGISTERED}/1"
    assert raw.headers.get("x-request-id")
    assert answer.choices[0].message.content and answer.choices[0].finish_reason == "length"
    assert answer.usage.completion_tokens == 12 and answer.usage.prompt_tokens > 5
    assert answer.system_fingerprint == f"{REGISTERED}/1"

    chunks = list(
        client.chat.completions.create(
            model=REGISTERED,
            messages=QUESTION,
            max_tokens=12,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == answer.choices[0].message.content  # same greedy answer, streamed
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) >= 3
    assert chunks[-1].usage.completion_tokens == 12

    with httpx.stream(
        "POST",
        f"{serve_app.base_url}/v1/completions",
        headers=serve_app.headers,
        timeout=60,
        json={"model": REGISTERED, "prompt": "Once upon a time", "max_tokens": 8, "stream": True},
    ) as r:
        assert r.status_code == 200, r.read()
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]"
    assert json.loads(events[-2][6:])["choices"][0]["finish_reason"] == "length"


class CityAnswer(BaseModel):
    """A structured answer whose every field is bounded: a random tiny model cannot run out of tokens in it."""

    city: Literal["Paris", "Rome", "Berlin"]
    population_millions: int = Field(ge=0, le=99)
    capital: bool
    note: str = Field(max_length=12)


def test_structured_output_parses_streams_and_answers_each_row_of_a_mixed_batch_as_alone(serve_app):
    client = serve_app.openai()
    greedy = {"model": REGISTERED, "temperature": 0, "max_tokens": 96}
    for i in range(20):  # the openai SDK's parse: a strict json_schema from the pydantic model
        messages = [{"role": "user", "content": f"Question {i}: which city is the capital of {i}-land?"}]
        answer = client.chat.completions.parse(messages=messages, response_format=CityAnswer, **greedy)
        assert isinstance(answer.choices[0].message.parsed, CityAnswer), answer.choices[0].message.content
        assert answer.choices[0].finish_reason == "stop"

    schema = {
        "type": "json_schema",
        "json_schema": {"name": "city", "strict": True, "schema": CityAnswer.model_json_schema()},
    }
    chunks = client.chat.completions.create(messages=QUESTION, response_format=schema, stream=True, **greedy)
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    CityAnswer.model_validate_json(streamed)

    def ask(response_format: dict | None) -> str:
        extra = {"response_format": response_format} if response_format else {}
        return client.chat.completions.create(messages=QUESTION, **greedy, **extra).choices[0].message.content

    alone = [ask(schema), ask(None)]
    with concurrent.futures.ThreadPoolExecutor(6) as pool:  # constrained and free rows in one batch
        together = list(pool.map(ask, [schema, None] * 3))
    assert together == alone * 3
    assert streamed == alone[0]


def test_tool_calls_required_or_named_in_a_two_step_agent_loop_whole_and_streamed(serve_app):
    client = serve_app.openai()
    clock = {"type": "function", "function": {"name": "get_time", "parameters": {
        "type": "object", "properties": {"city": {"type": "string", "enum": ["Paris", "Rome"]}}, "required": ["city"],
        "additionalProperties": False}}}  # fmt: skip
    tools, greedy = [TOOL, clock], {"model": REGISTERED, "temperature": 0, "max_tokens": 96}
    messages = [{"role": "user", "content": "What is the weather in Paris?"}]
    asked = client.chat.completions.create(messages=messages, tools=tools, tool_choice="required",
                                           parallel_tool_calls=False, **greedy)  # fmt: skip
    choice = asked.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    [call] = choice.message.tool_calls
    assert call.id.startswith("call_") and call.function.name in ("get_weather", "get_time")
    assert isinstance(json.loads(call.function.arguments), dict)
    # step two: the tool's result comes back as role "tool"; the model answers in text
    messages += [choice.message.model_dump(exclude_none=True),
                 {"role": "tool", "tool_call_id": call.id, "content": "Sunny, 24 C"}]  # fmt: skip
    answer = client.chat.completions.create(messages=messages, **greedy | {"max_tokens": 16})
    assert answer.choices[0].message.content and not answer.choices[0].message.tool_calls

    for city in ("Paris", "Rome", "Berlin"):  # a named function: always that one, arguments valid against its schema
        ask = [{"role": "user", "content": f"Weather in {city} for three days?"}]
        named = client.chat.completions.create(
            messages=ask, tools=tools, **greedy, tool_choice={"type": "function", "function": {"name": "get_weather"}}
        )
        [call] = named.choices[0].message.tool_calls
        arguments = json.loads(call.function.arguments)
        assert call.function.name == "get_weather" and set(arguments) == {"city", "days"}
        assert arguments["city"] in ("Paris", "Rome") and 1 <= arguments["days"] <= 7
    parallel = client.chat.completions.create(messages=messages[:1], tools=tools, tool_choice="required",
                                              **greedy | {"max_tokens": 400})  # fmt: skip
    assert 1 <= len(parallel.choices[0].message.tool_calls) <= 8

    # "auto" (the default with tools): the model chooses; streamed, the answer reassembles into the whole one
    auto = client.chat.completions.create(messages=messages[:1], tools=tools, **greedy)
    message, pieces, calls, finish = auto.choices[0].message, [], {}, None
    for chunk in client.chat.completions.create(messages=messages[:1], tools=tools, stream=True, **greedy):
        pieces.append(chunk.choices[0].delta.content or "")
        for delta in chunk.choices[0].delta.tool_calls or []:
            calls.setdefault(delta.index, []).append((delta.function.name or "") + (delta.function.arguments or ""))
        finish = chunk.choices[0].finish_reason or finish
    assert finish == auto.choices[0].finish_reason in ("stop", "length", "tool_calls")
    assert "".join(pieces).strip() == (message.content or "").strip()
    whole = [call.function.name + call.function.arguments for call in message.tool_calls or []]
    assert ["".join(parts) for parts in calls.values()] == whole
    assert all(call.function.name in ("get_weather", "get_time") for call in message.tool_calls or [])

    streamed, finish = {}, None  # the deltas of a streamed call reassemble into the same call
    for chunk in client.chat.completions.create(messages=messages[:1], tools=tools, tool_choice="required",
                                                parallel_tool_calls=False, stream=True, **greedy):  # fmt: skip
        for delta in chunk.choices[0].delta.tool_calls or []:
            entry = streamed.setdefault(delta.index, {"id": "", "name": "", "arguments": ""})
            entry["id"] += delta.id or ""
            entry["name"] += delta.function.name or ""
            entry["arguments"] += delta.function.arguments or ""
        finish = chunk.choices[0].finish_reason or finish
    [entry] = streamed.values()
    first = asked.choices[0].message.tool_calls[0]
    assert finish == "tool_calls" and entry["id"].startswith("call_")
    assert (entry["name"], json.loads(entry["arguments"])) == (
        first.function.name,
        json.loads(first.function.arguments),
    )


def test_requests_without_a_valid_key_or_with_bad_bodies_get_4xx_with_a_reason(serve_app):
    url = f"{serve_app.base_url}/v1/chat/completions"
    good = {"model": REGISTERED, "messages": QUESTION, "max_tokens": 4}
    assert httpx.get(f"{serve_app.base_url}/healthz").json()["version"] == f"{REGISTERED}/1"
    cases = [
        ({}, good, 401, "missing API key"),
        ({"Authorization": "Bearer sk-wrong"}, good, 401, "invalid API key"),
        (serve_app.headers, {**good, "model": "gpt-4"}, 404, "does not exist"),
        (serve_app.headers, {"model": REGISTERED}, 400, "messages"),
        (serve_app.headers, {**good, "temperature": 7}, 400, "temperature"),
        (serve_app.headers, {**good, "n": 3}, 400, "n=1"),
        (serve_app.headers, {**good, "max_tokens": LONGEST + 1}, 400, f"limit of {LONGEST}"),
        (
            serve_app.headers,
            {**good, "messages": [{"role": "user", "content": "word " * (LONGEST + 600)}]},
            400,
            "context",
        ),
    ]
    for headers, body, status, reason in cases:
        response = httpx.post(url, headers=headers, json=body, timeout=30)
        assert response.status_code == status, (body, response.text)
        assert reason in response.json()["error"]["message"], response.text
    response = httpx.post(url, headers={**serve_app.headers, "Content-Type": "application/json"}, content=b"{not json")
    assert response.status_code == 400 and response.json()["error"]["message"]
    from openai import AuthenticationError

    with pytest.raises(AuthenticationError):
        serve_app.openai(max_retries=0).with_options(api_key="sk-nope").models.list()


def _assert_openai_answer(response: httpx.Response, stream: bool) -> None:
    """A 200 is a whole answer; a 4xx is OpenAI's error JSON; nothing is a 5xx."""
    assert response.status_code < 500, response.text[:300]
    if response.status_code >= 400:
        error = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["message"], response.text[:300]
        return
    assert response.status_code == 200, response.text[:300]
    if not stream:
        assert response.json()["choices"][0]["finish_reason"] in ("stop", "length"), response.text[:300]
        return
    events = [line for line in response.text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]", events[-3:]
    assert not any('"error"' in event[:12] for event in events), events[-3:]


def _fuzz_bodies():
    """Request bodies: well-formed with odd but valid values, the same with hostile values, and non-JSON."""
    from hypothesis import strategies as st

    weird = st.one_of(
        st.none(), st.booleans(), st.integers(-(2**80), 2**80),
        st.floats(allow_nan=True, allow_infinity=True), st.just(1e-45), st.just(5e-324),
        st.text(st.characters(exclude_categories=()), max_size=12), st.lists(st.integers(), max_size=3),
        st.dictionaries(st.text(max_size=4), st.integers(), max_size=2),
    )  # fmt: skip
    text = st.text(max_size=30)  # any Unicode but lone surrogates (those are in `weird`)
    part = st.fixed_dictionaries({"type": st.just("text"), "text": text})
    message = st.fixed_dictionaries(
        {"role": st.sampled_from(["user", "user", "system", "assistant", "developer"]),
         "content": st.one_of(text, st.lists(part, min_size=1, max_size=2))}
    )  # fmt: skip
    valid = {
        "max_tokens": st.integers(1, 12),
        "temperature": st.one_of(st.floats(0, 2), st.just(1e-45), st.just(5e-324)),
        "top_p": st.floats(5e-324, 1, exclude_min=False).filter(lambda p: p > 0),
        "seed": st.integers(-(2**63), 2**63 - 1),
        "stop": st.one_of(st.text(min_size=1, max_size=8), st.lists(st.text(min_size=1, max_size=8), max_size=4)),
        "stream": st.booleans(),
        "n": st.just(1),
        "user": text,
        "logit_bias": st.just({}),
        "response_format": st.just({"type": "text"}),
    }
    hostile = {name: st.one_of(strategy, weird) for name, strategy in valid.items()} | {
        "stream_options": st.one_of(st.fixed_dictionaries({"include_usage": st.booleans()}), weird),
        "n": st.one_of(st.integers(0, 3), weird),
        "logit_bias": st.one_of(st.dictionaries(st.integers(0, 9).map(str), st.integers(-100, 100)), weird),
        "response_format": st.sampled_from([{"type": "json_object"}, {"type": "text"}, "text", None]),
        "bogus": weird,
    }
    model = st.sampled_from([REGISTERED] * 6 + ["gpt-4", ""])

    def bodies(fields: dict, prompts, model):
        chat = st.fixed_dictionaries({"model": model, "messages": st.lists(message, min_size=1, max_size=3)},
                                     optional=fields)  # fmt: skip
        completion = st.fixed_dictionaries({"model": model, "prompt": prompts}, optional=fields)
        return st.one_of(
            st.tuples(st.just("/v1/chat/completions"), chat), st.tuples(st.just("/v1/completions"), completion)
        )

    good = bodies(valid, st.text(min_size=1, max_size=30), st.just(REGISTERED))
    bad = bodies(hostile, st.one_of(text, st.lists(text, max_size=2), weird), model)
    encoded = st.one_of(good, bad).map(lambda case: (case[0], json.dumps(case[1]).encode()))  # NaN sent as NaN
    raw = st.tuples(
        st.sampled_from(["/v1/chat/completions", "/v1/completions"]),
        st.one_of(st.binary(max_size=40), st.sampled_from([b"[]", b'"x"', b"null", b"{}"])),
    )
    return st.one_of(encoded, encoded, raw)


def test_prometheus_scrapes_the_apps_metrics_by_model_version_and_the_dashboard_reads_it(serve_app, prometheus):
    """The stack's Prometheus (real binary, generated config) scrapes the head's metrics agent: the
    requests the tests above sent show up per model version, beside Ray's own Serve metrics."""
    from ray_app import monitoring

    version = f"{REGISTERED}/1"
    client = serve_app.openai()
    client.chat.completions.create(model=REGISTERED, messages=QUESTION, max_tokens=6, temperature=0)
    assert httpx.get(f"{serve_app.base_url}/v1/models", headers={"Authorization": "Bearer nope"}).status_code == 401
    wanted = {
        "tokens": f'sum(ray_llmops_generated_tokens_total{{model_version="{version}"}})',
        "prompt": f'sum(ray_llmops_prompt_tokens_total{{model_version="{version}"}})',
        "ttft": f'sum(ray_llmops_time_to_first_token_s_count{{model_version="{version}"}})',
        "itl": f'sum(ray_llmops_inter_token_latency_s_count{{model_version="{version}"}})',
        "ok": f'sum(ray_llmops_requests_total{{model_version="{version}", route="/v1/chat/completions", code="200"}})',
        "unauthorized": f'sum(ray_llmops_requests_total{{model_version="{version}", code="401"}})',
        "champion": f'max(ray_llmops_model_info{{model_version="{version}", alias="champion"}})',
        "serve": 'sum(ray_serve_deployment_replica_starts_total{deployment="ChatServer"})',
        "scraped": 'min(up{job=~"ray|prometheus"})',
    }
    deadline, seen = time.monotonic() + 120, {}
    while time.monotonic() < deadline:
        seen = {name: monitoring.query(serve_app.settings, promql) for name, promql in wanted.items()}
        if all(result and float(result[0]["value"][1]) > 0 for result in seen.values()):
            break
        time.sleep(2)
    missing = [name for name, result in seen.items() if not result or float(result[0]["value"][1]) <= 0]
    held = sorted(name for name in monitoring.series_names(serve_app.settings) if "llmops" in name)
    assert not missing, f"not in Prometheus after 120 s: {missing}; it holds {held}"
    assert float(seen["tokens"][0]["value"][1]) >= 6 and float(seen["ok"][0]["value"][1]) >= 1
    names = monitoring.series_names(serve_app.settings)
    assert {"ray_llmops_queue_length", "ray_llmops_running_batch_size"} <= names

    # Only with its password: Prometheus answers 401 to anyone else.
    bare = httpx.get(f"{serve_app.settings.prometheus_url}/api/v1/query", params={"query": "up"})
    assert bare.status_code == 401
    # The alert rules are loaded and evaluate without errors.
    rules = httpx.get(f"{serve_app.settings.prometheus_url}/api/v1/rules",
                      headers=monitoring.prometheus_headers(serve_app.settings)).json()["data"]["groups"]  # fmt: skip
    assert {group["name"] for group in rules} == {"llmops-recording", "llmops-alerts"}
    # The Ray dashboard's Metrics tab reaches it with the headers the stack gave the head.
    health = httpx.get(f"{serve_app.settings.ray_dashboard_url}/api/prometheus_health",
                       headers=serve_app.settings.ray_auth_headers())  # fmt: skip
    assert health.status_code == 200, health.text


def test_fuzzed_bodies_never_get_a_5xx_and_a_greedy_request_beside_them_answers_as_alone(serve_app):
    """600 generated bodies, both endpoints (hypothesis, seeded for CI), sent by 6 clients at
    once so that odd rows share batches: no status >= 500, every 4xx is OpenAI's error JSON, and a
    benign greedy request sent all along keeps the answer it gets alone."""
    from hypothesis import HealthCheck, given
    from hypothesis import seed as hypothesis_seed
    from hypothesis import settings as hypothesis_settings

    cases = []

    @hypothesis_settings(max_examples=600, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @hypothesis_seed(17)  # the same bodies in every checkout (derandomize hashes the test's path)
    @given(_fuzz_bodies())
    def collect(case):
        cases.append(case)

    collect()
    benign = {"model": REGISTERED, "messages": QUESTION, "max_tokens": 12, "temperature": 0}
    url = f"{serve_app.base_url}/v1/chat/completions"
    alone = httpx.post(url, headers=serve_app.headers, json=benign, timeout=60).json()["choices"][0]["message"]
    stop, beside = threading.Event(), []

    def keep_asking() -> None:
        with httpx.Client(headers=serve_app.headers, timeout=60) as http:
            while not stop.is_set():
                beside.append(http.post(url, json=benign).json()["choices"][0]["message"])

    local = threading.local()

    def send(case) -> int:
        if not hasattr(local, "http"):
            local.http = httpx.Client(headers={**serve_app.headers, "Content-Type": "application/json"}, timeout=60)
        path, content = case
        response = local.http.post(f"{serve_app.base_url}{path}", content=content)
        try:
            _assert_openai_answer(response, response.headers.get("content-type", "").startswith("text/event-stream"))
        except AssertionError as exc:
            raise AssertionError(f"{path} {content[:300]!r}: {exc}") from None
        return response.status_code

    helper = threading.Thread(target=keep_asking, daemon=True)
    helper.start()
    try:
        with concurrent.futures.ThreadPoolExecutor(6) as pool:
            statuses = list(pool.map(send, cases))
    finally:
        stop.set()
        helper.join(timeout=60)
    assert len(cases) >= 500 and {path for path, _ in cases} == {"/v1/chat/completions", "/v1/completions"}
    assert statuses.count(200) > 50 and statuses.count(400) > 50, collections.Counter(statuses)
    assert len(beside) >= 5 and all(answer == alone for answer in beside), (alone, beside[:3])


def test_pinned_hostile_bodies_get_a_4xx_with_a_reason_or_a_sane_answer(serve_app):
    url = f"{serve_app.base_url}/v1/chat/completions"
    base = {"model": REGISTERED, "messages": QUESTION, "max_tokens": 8}
    post = lambda content, **headers: httpx.post(  # noqa: E731
        url, content=content, headers={**serve_app.headers, "Content-Type": "application/json", **headers}, timeout=60
    )
    greedy = httpx.post(url, headers=serve_app.headers, json={**base, "temperature": 0}, timeout=60).json()
    tiny = httpx.post(url, headers=serve_app.headers, json={**base, "temperature": 1e-45}, timeout=60)
    assert tiny.status_code == 200 and tiny.json()["choices"] == greedy["choices"]  # below 1e-5: greedy
    narrow = httpx.post(url, headers=serve_app.headers, json={**base, "top_p": 5e-324, "seed": 2**63 - 1}, timeout=60)
    assert narrow.status_code == 200 and narrow.json()["choices"] == greedy["choices"]  # keeps the top token
    streamed = httpx.post(url, headers=serve_app.headers, json={**base, "temperature": 1e-45, "stream": True})
    _assert_openai_answer(streamed, stream=True)
    cases = [  # (content, extra headers, status, param, words)
        (json.dumps({**base, "seed": 2**70}).encode(), {}, 400, "seed", "less than or equal"),
        (b'{"model": "tiny-chat", "messages": [{"role": "user", "content": "\\ud800"}]}', {}, 400, None, "surrogate"),
        (json.dumps({**base, "messages": QUESTION * 10_000}).encode(), {}, 400, "messages", "limit of 2048"),
        (b"{" + b' "model": "x",' * 700_000 + b"}", {}, 413, None, "limit of 1048576 bytes"),  # ~10 MB
        (b'{"model": "x", "stream": true, "stream_options": ' + b'{"a":' * 10_000 + b"1" + b"}" * 10_001, {}, 400,
         None, "recursion"),
        (b'{"model": "tiny-chat", "messages": [], "temperature": NaN}', {}, 400, "temperature", "finite"),
        (b'[{"model": "tiny-chat"}]', {}, 400, None, "JSON object"),
        (json.dumps(base).encode(), {"Content-Type": "application/x-www-form-urlencoded"}, 415, None,
         "send application/json"),
        (json.dumps({**base, "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {
            "type": "objectzz"}}}}).encode(), {}, 400, "response_format", 'Unsupported type "objectzz"'),
        (json.dumps({**base, "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {
            "type": "object", "properties": {"a": {"if": {}}}}}}}).encode(), {}, 400, "response_format",
         "schema.properties.a: the keyword 'if' is not supported"),
    ]  # fmt: skip
    for content, headers, status, param, words in cases:
        response = post(content, **headers)
        assert words in _openai_error(response, status, param), content[:80]
    empty = httpx.post(f"{serve_app.base_url}/v1/completions", headers=serve_app.headers, json={
        "model": REGISTERED, "prompt": "\x16"})  # fmt: skip
    assert "empty once tokenized" in _openai_error(empty, 400, "prompt")  # the tokenizer drops it (found by the fuzz)
    assert "use POST" in _openai_error(httpx.get(url, headers=serve_app.headers), 405)
    assert _openai_error(httpx.get(f"{serve_app.base_url}/v1/nothing", headers=serve_app.headers), 404)


def test_overload_sheds_with_503_retry_after_and_every_accepted_request_completes_in_time(serve_app):
    """4x the app's capacity (8 running + 8 queued per replica, the test app's args) at once."""
    pids = {replica["pid"] for replica in serve_app.replicas()}
    capacity, deadline_s = 16 * len(pids), 30
    url = f"{serve_app.base_url}/v1/chat/completions"
    barrier = threading.Barrier(4 * capacity)

    def one(index: int) -> tuple[httpx.Response, float]:
        # Long answers, so the burst is still running when its last requests arrive: the OpenVINO
        # engine finishes 48 tiny-model tokens before the ingress has relayed the whole burst.
        body = {"model": REGISTERED, "messages": QUESTION, "max_tokens": 400, "temperature": 0,
                "stream": index % 2 == 1}  # fmt: skip
        barrier.wait(timeout=30)
        started = time.monotonic()
        response = httpx.post(url, headers=serve_app.headers, json=body, timeout=120)
        return response, time.monotonic() - started

    with concurrent.futures.ThreadPoolExecutor(4 * capacity) as pool:
        outcomes = list(pool.map(one, range(4 * capacity)))
    shed = [r for r, _ in outcomes if r.status_code == 503]
    accepted = [(r, took) for r, took in outcomes if r.status_code != 503]
    assert shed and accepted, [r.status_code for r, _ in outcomes]
    for response in shed:
        assert response.headers["retry-after"] == "1" and "capacity" in _openai_error(response, 503)
    for response, took in accepted:
        _assert_openai_answer(response, stream=response.headers["content-type"].startswith("text/event-stream"))
        assert took < deadline_s, took
    assert _ask(serve_app, 4).status_code == 200  # shed, not broken


def test_a_client_that_disconnects_frees_its_batch_row(serve_app):
    _one_replica(serve_app)  # its counters are the app's
    stats_url = f"{serve_app.base_url}/v1/stats"

    def stats() -> dict:
        return httpx.get(stats_url, headers=serve_app.headers, timeout=30).json()

    body = {"model": REGISTERED, "messages": QUESTION, "max_tokens": LONGEST, "temperature": 0}  # seconds
    url = f"{serve_app.base_url}/v1/chat/completions"
    assert _ask(serve_app, 4).status_code == 200  # warm: a cold first request may be cut before it gets a row

    def idle() -> bool:  # nothing of the tests before still decoding: every counted row below is ours
        now = stats()
        return now["active_requests"] == now["waiting_requests"] == now["running_rows"] == 0

    _wait_for(idle, 120, "the replica to be idle")
    before = stats()
    with pytest.raises(httpx.ReadTimeout):  # a client that gives up waiting
        httpx.post(url, headers=serve_app.headers, json=body, timeout=httpx.Timeout(30, read=0.3))
    _wait_for(lambda: stats()["cancelled_rows"] == before["cancelled_rows"] + 1, 60, "the abandoned row to go")
    between = stats()
    with httpx.stream("POST", url, headers=serve_app.headers, json={**body, "stream": True}, timeout=30) as r:
        next(r.iter_lines())  # a streaming client that reads one event and leaves
    _wait_for(lambda: stats()["cancelled_rows"] == between["cancelled_rows"] + 1, 60, "the abandoned stream to go")
    _wait_for(idle, 30, "the replica to be idle again")
    after = stats()
    # Each row ended as cancelled (counted above) before its last token: a whole answer decodes LONGEST - 1 rows.
    for start, end in ((before, between), (between, after)):
        assert end["decode_rows"] - start["decode_rows"] < LONGEST - 1, "a row was decoded to its end, not dropped"


def _ask(serve_app: ServeApp, max_tokens: int, **extra) -> httpx.Response:
    body = {"model": REGISTERED, "messages": QUESTION, "max_tokens": max_tokens, "temperature": 0, **extra}
    return httpx.post(f"{serve_app.base_url}/v1/chat/completions", headers=serve_app.headers, json=body, timeout=120)


def test_eight_concurrent_requests_finish_sooner_than_eight_sequential_ones(serve_app):
    # Answers long enough that decoding, which batching shares, outweighs a request's own cost
    # through the proxy, the ingress and Serve's router (~70 ms here, which batching does not share).
    # The tiny model decodes 256 tokens in ~0.3 s on OpenVINO, so wall time alone is noisy (CI once
    # measured 0.68x): what batching must show is that the eight shared the replica's decode steps.
    _one_replica(serve_app)  # /v1/stats is one replica's: all eight must be on it
    _ask(serve_app, 4)  # warm
    stats_url = f"{serve_app.base_url}/v1/stats"
    started = time.monotonic()
    sequential = [_ask(serve_app, 256) for _ in range(8)]
    sequential_s = time.monotonic() - started
    before = httpx.get(stats_url, headers=serve_app.headers, timeout=30).json()
    started = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        concurrent_ = list(pool.map(lambda _: _ask(serve_app, 256), range(8)))
    concurrent_s = time.monotonic() - started
    after = httpx.get(stats_url, headers=serve_app.headers, timeout=30).json()
    tokens = [r.json()["usage"]["completion_tokens"] for r in sequential + concurrent_]
    assert tokens == [256] * 16
    print(f"eight answers of 256 tokens: concurrent {concurrent_s:.2f} s, sequential {sequential_s:.2f} s")
    rows, steps = after["decode_rows"] - before["decode_rows"], after["decode_steps"] - before["decode_steps"]
    assert rows >= 8 * 255 and rows / steps >= 2, (rows, steps)  # one replica here: they shared its steps
    assert concurrent_s < sequential_s, (concurrent_s, sequential_s)


class Load:
    """Clients sending requests in a loop until stopped; records every outcome."""

    def __init__(self, serve_app: ServeApp, clients: int, stream: bool, max_tokens: int, retries: int = 0):
        self.serve_app, self.stream, self.max_tokens, self.retries = serve_app, stream, max_tokens, retries
        self.stop = threading.Event()
        self.results: list[tuple[float, int, str]] = []  # (finished at, status, x-model-version)
        self.errors: list[str] = []
        self.threads = [threading.Thread(target=self._client, daemon=True) for _ in range(clients)]

    def _client(self) -> None:
        client = self.serve_app.openai(max_retries=self.retries, timeout=120)
        while not self.stop.is_set():
            try:
                raw = client.chat.completions.with_raw_response.create(
                    model=REGISTERED, messages=QUESTION, max_tokens=self.max_tokens, stream=self.stream
                )
                if self.stream:
                    chunks = list(raw.parse())
                    assert chunks and chunks[-1].choices[0].finish_reason
                self.results.append((time.monotonic(), raw.status_code, raw.headers.get("x-model-version", "")))
            except Exception as exc:
                self.errors.append(f"{exc!r}: {getattr(exc, 'message', '')}")  # the OpenAI error's text too

    def __enter__(self) -> Load:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(timeout=180)


def _wait_for(predicate, timeout: float, what: str) -> float:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out after {timeout}s waiting for {what}"
        time.sleep(0.5)
    return time.monotonic()


def _one_replica(serve_app: ServeApp) -> None:
    """Wait until the app runs one model replica (the load of the tests before may have scaled it to two)."""
    _wait_for(lambda: len(serve_app.replicas()) == 1, 90, "scale-down to one replica")


def test_eight_streaming_clients_scale_the_app_to_two_replicas_and_back_to_one(serve_app):
    _one_replica(serve_app)
    with Load(serve_app, clients=8, stream=True, max_tokens=200) as load:
        _wait_for(lambda: len(serve_app.replicas()) == 2, 90, "a second replica")
        time.sleep(3)
    assert not load.errors and load.results
    _one_replica(serve_app)


def test_killed_replica_is_restarted_and_retrying_clients_lose_nothing(serve_app):
    _one_replica(serve_app)
    [replica] = serve_app.replicas()
    with Load(serve_app, clients=3, stream=False, max_tokens=48, retries=5) as load:
        _wait_for(lambda: len(load.results) >= 3, 60, "traffic")
        os.kill(replica["pid"], signal.SIGKILL)
        _wait_for(
            lambda: [r["pid"] for r in serve_app.replicas()] not in ([], [replica["pid"]]), 120, "a restarted replica"
        )
        done = len(load.results)
        _wait_for(lambda: len(load.results) >= done + 3, 60, "traffic on the new replica")
    assert not load.errors, load.errors[:3]
    assert {status for _, status, _ in load.results} == {200}


def test_with_s3_or_mlflow_down_restarted_replicas_start_and_keep_their_pinned_version(
    serve_app, mlflow_server, tmp_path
):
    """A second app serves a model from its own S3 server; that server stops, and so does MLflow.
    The second app's model replica is SIGKILLed: the replacement starts from the local copy
    (checked against its manifest) and answers. A replica of the first app (models:/...@champion,
    pinned when the app was built) is SIGKILLed too: its replacement needs no registry and
    answers with the same version."""
    from ray_app.serving.rollout import deploy, running_config
    from ray_app.stack import LocalStack, stop_process_group
    from ray_app.storage import open_store

    port = free_port()
    log = open(tmp_path / "moto.log", "wb")
    s3 = subprocess.Popen([venv_bin("moto_server"), "-H", "127.0.0.1", "-p", str(port)], stdout=log,
                          stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
    endpoint = f"http://127.0.0.1:{port}"
    settings = serve_app.settings
    try:
        wait_for_port(port, proc=s3)
        store = open_store("s3://cache-test", settings.model_copy(update={"s3_endpoint_url": endpoint}))
        store.ensure()
        store.upload_dir(build_tiny_chat_model(tmp_path / "tiny", seed=3), "tiny", progress=False)
        body = running_config(settings)
        cached = copy.deepcopy(body["applications"][0])
        cached.update(name="cached", route_prefix="/cached")
        cached["args"] = {**cached["args"], "model": "s3://cache-test/tiny", "served_model_name": "cached"}
        cached["runtime_env"] = {"env_vars": {"LLMOPS_S3_ENDPOINT_URL": endpoint}}
        deploy({**body, "applications": [*body["applications"], cached]}, settings, wait_s=240)
        url = f"{serve_app.base_url}/cached/v1/chat/completions"
        ask = {"model": "cached", "messages": QUESTION, "max_tokens": 4}
        first = httpx.post(url, headers=serve_app.headers, json=ask, timeout=60)
        assert first.status_code == 200, first.text

        pinned = _ask(serve_app, 4).headers["x-model-version"]

        stop_process_group(s3.pid, timeout_s=10)
        s3.wait(timeout=10)
        LocalStack(mlflow_server).down(["mlflow"], echo=lambda _line: None)
        with pytest.raises(httpx.TransportError):  # nothing listens
            httpx.get(f"{mlflow_server.mlflow_server_url}/health", timeout=5)
        victims = {app: [r["pid"] for r in _replicas(settings, app)] for app in ("cached", "chat")}
        for pids in victims.values():
            os.kill(pids[0], signal.SIGKILL)
        for app, pids in victims.items():
            new_replica = lambda: any(r["pid"] not in pids for r in _replicas(settings, app))  # noqa: E731
            _wait_for(new_replica, 120, f"a replacement {app} replica RUNNING with S3 and MLflow down")
        answer = httpx.post(url, headers=serve_app.headers, json=ask, timeout=60)
        assert answer.status_code == 200, answer.text
        for _ in range(4):  # whichever replica answers: the version pinned before the outage
            after = _ask(serve_app, 4)
            assert after.status_code == 200 and after.headers["x-model-version"] == pinned, after.text
    finally:
        if s3.poll() is None:
            stop_process_group(s3.pid, timeout_s=10)
        LocalStack(mlflow_server).up(["mlflow"], echo=lambda _line: None)  # no-op when it runs
        log.close()
        body = running_config(settings)
        deploy({**body, "applications": [a for a in body["applications"] if a["name"] != "cached"]}, settings, 120)


def test_losing_a_node_with_a_replica_on_it_the_app_keeps_answering_from_the_other(serve_app, ray_client):
    """An app with one ingress and one model replica on each of two nodes; the second node is
    SIGKILLed as a whole while clients ask: answers go on from the head's replicas."""
    from conftest import worker_node

    from ray_app.serving.rollout import deploy, running_config

    settings = serve_app.settings
    with worker_node(ray_client, num_cpus=1) as node:
        body = running_config(settings)
        spread = copy.deepcopy(body["applications"][0])
        spread.update(name="spread", route_prefix="/spread")
        for deployment in spread["deployments"]:
            deployment.pop("autoscaling_config", None)
            deployment.pop("num_replicas", None)
            deployment.update(autoscaling_config={"min_replicas": 2, "max_replicas": 2}, max_replicas_per_node=1)
        try:
            deploy({**body, "applications": [*body["applications"], spread]}, settings, wait_s=240)
            _wait_for(lambda: len(_replicas(settings, "spread")) == 2, 90, "two model replicas")
            on_lost_node = {r["node_id"] == node.node_id() for r in _replicas(settings, "spread")}
            assert on_lost_node == {True, False}, _replicas(settings, "spread")
            url = f"{serve_app.base_url}/spread/v1/chat/completions"
            ask = {"model": REGISTERED, "messages": QUESTION, "max_tokens": 4}

            def status() -> int:
                try:
                    return httpx.post(url, headers=serve_app.headers, json=ask, timeout=60).status_code
                except httpx.HTTPError:
                    return 0

            assert status() == 200
            node.kill()
            killed, statuses = time.monotonic(), []
            while time.monotonic() - killed < 20 or statuses[-5:] != [200] * 5:
                statuses.append(status())
                assert time.monotonic() - killed < 90, f"no steady answers after the node loss: {statuses}"
            print(f"after the node loss: {len(statuses)} requests, {statuses.count(200)} answered: {statuses}")
            assert statuses.count(200) >= len(statuses) - 1, statuses  # at most the one in flight fails
        finally:
            body = running_config(settings)
            kept = [app for app in body["applications"] if app["name"] != "spread"]
            deploy({**body, "applications": kept}, settings, 120)


def _replicas(settings: Settings, app: str) -> list[dict]:
    from ray_app.serving.rollout import serve_details

    deployment = serve_details(settings)["applications"][app]["deployments"]["ChatServer"]
    return [r for r in deployment["replicas"] if r["state"] == "RUNNING"]


def test_a_failed_promotion_leaves_champion_and_serve_on_the_old_version(
    serve_app, mlflow_server, registered_tiny_models, tmp_path
):
    """Four ways a promotion fails (the dashboard unreachable, a folder without its manifest, a
    model whose replicas crash-loop, an alias that cannot move), and a crash-looping canary: each
    raises with the reason, `champion` stays on v1, Serve keeps answering with v1 alone, and the
    decision is tagged on the version."""
    from mlflow import MlflowClient

    from ray_app.credentials import as_serve_identity
    from ray_app.models import ModelResolutionError
    from ray_app.registry import RegistryError, get_version, register_model_version
    from ray_app.serving.rollout import ServeError, promote, running_config, start_canary
    from ray_app.storage import open_store

    old, new = registered_tiny_models
    store = open_store(settings=serve_app.settings)
    folder = build_tiny_chat_model(tmp_path / "tiny", seed=2)
    store.upload_dir(folder, "serving-test/no-manifest", progress=False)
    store._delete_file("serving-test/no-manifest/_manifest.json")
    incomplete = register_model_version(REGISTERED, store.uri("serving-test/no-manifest"), None, settings=mlflow_server)
    (folder / "config.json").write_text('{"model_type": "no-such-architecture"}')
    store.upload_dir(folder, "serving-test/broken", progress=False)
    broken = register_model_version(REGISTERED, store.uri("serving-test/broken"), None, settings=mlflow_server)

    def still_on_v1() -> None:
        assert get_version(f"models:/{REGISTERED}@champion", mlflow_server).version == old
        answer = _ask(serve_app, 4)
        assert answer.status_code == 200 and answer.headers["x-model-version"] == f"{REGISTERED}/{old}"

    unreachable = serve_app.settings.model_copy(update={"ray_dashboard_port": free_port()})
    with pytest.raises(ServeError, match=re.escape(unreachable.ray_dashboard_url)):
        promote(REGISTERED, unreachable, version=new, wait_s=30)
    still_on_v1()
    with pytest.raises(ModelResolutionError, match="no complete model folder"):
        promote(REGISTERED, serve_app.settings, version=incomplete.version, wait_s=30)
    still_on_v1()
    started = time.monotonic()
    with pytest.raises(ServeError, match="rolled back to version 1"):
        promote(REGISTERED, serve_app.settings, version=broken.version, wait_s=240)
    print(f"crash-looping rollout detected and rolled back in {time.monotonic() - started:.0f} s")
    still_on_v1()
    # The same model as a canary: its replicas crash-loop, so it is rolled back at once.
    with pytest.raises(ServeError, match=f"rolled back to version {old} alone"):
        start_canary(REGISTERED, serve_app.settings, version=broken.version, share=0.5, wait_s=240, actor="test")
    still_on_v1()
    assert "canary" not in running_config(serve_app.settings)["applications"][0]["args"]
    # The alias cannot move once Serve was rolled (an identity that may only read the registry):
    # Serve is put back to exactly the configs it ran.
    before = running_config(serve_app.settings)
    with pytest.raises(RegistryError, match="cannot move alias champion"):
        promote(REGISTERED, as_serve_identity(serve_app.settings), version=new, wait_s=240)
    still_on_v1()
    assert running_config(serve_app.settings) == before

    client = MlflowClient(mlflow_server.mlflow_tracking_uri)
    for version, reason in ((new, "cannot reach the Ray dashboard"), (incomplete.version, "no complete model folder"),
                            (broken.version, "failed to deploy")):  # fmt: skip
        tags = client.get_model_version(REGISTERED, version).tags
        assert tags["promotion"] == "failed" and reason in tags["promotion.reason"], tags
        assert tags["promotion.from"] == old and tags["promotion.to"] == version and tags["promotion.by"]
    canary = client.get_model_version(REGISTERED, broken.version).tags
    assert canary["canary"] == "failed" and "failed to deploy" in canary["canary.reason"], canary


def test_a_worse_canary_is_rolled_back_by_its_feedback_sticky_per_conversation_without_a_failed_request(
    serve_app, mlflow_server, registered_tiny_models, prometheus
):
    """v2 beside the champion v1 in the same app for half of the conversations: each conversation
    (three turns) is answered by one version, both versions answer some, the chat's thread id
    keeps one conversation on one version; the alias never moves. The conversations are rated
    through Chainlit's data layer (v2's answers thumbs-down): judged on its own, the canary is
    rolled back and v1 serves alone. Streaming clients ask all along: no request fails."""
    from conftest import write_feedback
    from mlflow import MlflowClient

    from ray_app.promotion import CanaryPolicy, judge_canary
    from ray_app.registry import get_version
    from ray_app.serving.rollout import canary_lines, running_config, start_canary

    old, new = registered_tiny_models
    champion, challenger = f"{REGISTERED}/{old}", f"{REGISTERED}/{new}"
    url = f"{serve_app.base_url}/v1/chat/completions"

    def conversation(opening: str, **headers: str) -> set[str]:
        """Three turns (each re-sends the history); the versions that answered them."""
        messages, seen = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": opening}], set()
        for turn in range(3):
            body = {"model": REGISTERED, "messages": messages, "max_tokens": 4, "temperature": 0}
            answer = httpx.post(url, headers={**serve_app.headers, **headers}, json=body, timeout=60)
            assert answer.status_code == 200, answer.text
            assert answer.json()["system_fingerprint"] == answer.headers["x-model-version"]
            seen.add(answer.headers["x-model-version"])
            messages += [answer.json()["choices"][0]["message"], {"role": "user", "content": f"And {turn}?"}]
        return seen

    with Load(serve_app, clients=2, stream=True, max_tokens=16) as load:
        _wait_for(lambda: len(load.results) >= 2, 60, "traffic")
        canary = start_canary(REGISTERED, serve_app.settings, version=new, share=0.5, wait_s=240, actor="test")
        assert (canary.apps, canary.champion, canary.version) == (["chat"], old, new)
        answered = [conversation(f"Question {i}: what does Ray Serve do?") for i in range(12)]
        assert all(len(versions) == 1 for versions in answered), answered  # no conversation switched
        assert set().union(*answered) == {champion, challenger}, answered
        threads = set().union(*(conversation(f"Opening {i}", **{"x-conversation-id": "thread-7"}) for i in range(4)))
        assert len(threads) == 1, threads
        args = running_config(serve_app.settings)["applications"][0]["args"]
        assert args["model_version"] == old and args["canary"] == {"model_version": new, "share": 0.5,
                                                                  "sticky_by": "conversation"}  # fmt: skip
        assert get_version(f"models:/{REGISTERED}@champion", mlflow_server).version == old
        assert canary_lines(serve_app.settings) == [  # what `llmops status` shows
            f"Serve app chat: {REGISTERED} champion v{old}, canary v{new} for 50% of conversations (sticky by "
            "conversation); not judged yet (`llmops judge`)"
        ]
        for version in (champion, challenger):  # the chat's users dislike v2's answers, like v1's
            rated = [("What does Ray Serve do?", "an answer", 0 if version == challenger else 1, None)] * 6
            write_feedback(str(serve_app.settings.chat_database_url), rated, model_version=version)
        verdict = judge_canary(REGISTERED, serve_app.settings, CanaryPolicy(window_s=3600, min_requests=5), "test")
        stopped = time.monotonic()
        _wait_for(lambda: any(t > stopped for t, _, _ in load.results), 60, "answers after the rollback")
    assert verdict.action == "rollback" and "thumbs-down more likely" in verdict.reason, verdict
    assert "ratings=6 down=6" in verdict.evidence["canary"] and "requests=" in verdict.evidence["champion"]
    assert not load.errors and {status for _, status, _ in load.results} == {200}, load.errors[:3]
    assert {version for t, _, version in load.results if t > stopped} == {champion}
    assert set().union(*(conversation(f"Question {i}: what does Ray Serve do?") for i in range(4))) == {champion}
    assert "canary" not in running_config(serve_app.settings)["applications"][0]["args"]
    assert canary_lines(serve_app.settings) == []
    assert get_version(f"models:/{REGISTERED}@champion", mlflow_server).version == old
    tags = MlflowClient(mlflow_server.mlflow_tracking_uri).get_model_version(REGISTERED, new).tags
    assert tags["canary"] == "rolled_back" and tags["canary.verdict"] == "rollback", tags
    assert tags["canary.reason"] == verdict.reason and tags["canary.running_at"] <= tags["canary.rolled_back_at"]
    assert float(tags["canary.evidence.p_feedback_worse"]) > 0.95


def test_a_canary_that_passes_its_window_is_promoted_under_load_without_a_failed_request(
    serve_app, mlflow_server, registered_tiny_models, prometheus
):
    """v2 as a canary again, now liked (the thumbs-down above stay in its record: it needs more
    thumbs-up than that); its window passed, the judge promotes it: Serve rolls to v2 alone, then
    `champion` moves. Three clients ask all along: no request fails, every answer after is v2."""
    from conftest import write_feedback
    from mlflow import MlflowClient

    from ray_app.promotion import CanaryPolicy, judge_canary
    from ray_app.registry import get_version
    from ray_app.serving.rollout import running_config, start_canary

    old, new = registered_tiny_models
    with Load(serve_app, clients=3, stream=False, max_tokens=24) as load:
        _wait_for(lambda: len(load.results) >= 3, 60, "traffic")
        start_canary(REGISTERED, serve_app.settings, version=new, share=0.5, wait_s=240, actor="test")
        liked = [("What is Ray?", "a good answer", 1, None)] * 30
        write_feedback(str(serve_app.settings.chat_database_url), liked, model_version=f"{REGISTERED}/{new}")
        policy = CanaryPolicy(window_s=0, min_requests=5, min_ratings=10)  # its window: over
        verdict = judge_canary(REGISTERED, serve_app.settings, policy, "test")
        switched = time.monotonic()
        _wait_for(lambda: any(t > switched for t, _, _ in load.results), 60, "answers after the switch")
    assert verdict.action == "promote", verdict
    assert "canary" not in running_config(serve_app.settings)["applications"][0]["args"]
    tags = MlflowClient(mlflow_server.mlflow_tracking_uri).get_model_version(REGISTERED, new).tags
    assert tags["canary"] == "promoted" and tags["promotion"] == "promoted" and tags["promotion.from"] == old
    assert get_version(f"models:/{REGISTERED}@champion", mlflow_server).version == new
    assert not load.errors, load.errors[:3]
    assert {status for _, status, _ in load.results} == {200}
    assert {version for t, _, version in load.results if t > switched} == {f"{REGISTERED}/{new}"}
    assert f"{REGISTERED}/{old}" in {version for _, _, version in load.results}


def test_a_replica_killed_mid_stream_ends_its_streams_with_an_error_event_and_the_app_recovers(serve_app):
    """8 streaming clients, one model replica SIGKILLed mid-answer: every stream ends with [DONE] or
    with an OpenAI error event (never a torn connection or a hang) within the deadline, and the
    app answers again within 30 s."""
    url = f"{serve_app.base_url}/v1/chat/completions"
    body = {"model": REGISTERED, "messages": QUESTION, "max_tokens": 400, "temperature": 0, "stream": True}
    started, outcomes = threading.Semaphore(0), []

    def stream() -> None:
        begun, events, took = time.monotonic(), [], None
        try:
            with httpx.stream("POST", url, headers=serve_app.headers, json=body, timeout=60) as response:
                assert response.status_code == 200, response.read()
                for line in response.iter_lines():
                    if line.startswith("data: "):
                        events.append(line[6:])
                        if len(events) == 2:
                            started.release()
            took = time.monotonic() - begun
            outcomes.append(("done" if events[-1] == "[DONE]" else json.loads(events[-1])["error"]["code"], took))
        except Exception as exc:  # a torn connection: what this test is against
            outcomes.append((repr(exc), time.monotonic() - begun))

    [victim, *_] = serve_app.replicas()
    clients = [threading.Thread(target=stream, daemon=True) for _ in range(8)]
    for client in clients:
        client.start()
    for _ in clients:
        assert started.acquire(timeout=60), "a stream never started"
    os.kill(victim["pid"], signal.SIGKILL)
    killed = time.monotonic()
    for client in clients:
        client.join(timeout=60)
    assert len(outcomes) == 8, outcomes
    assert {kind for kind, _ in outcomes} <= {"done", "replica_failed"}, outcomes
    assert any(kind == "replica_failed" for kind, _ in outcomes), "the killed replica was serving some of them"
    assert all(took < 30 for _, took in outcomes), outcomes
    _wait_for(lambda: _ask(serve_app, 8).status_code == 200, 30, "an answer after the kill")
    assert time.monotonic() - killed < 45
    _wait_for(lambda: victim["pid"] not in [r["pid"] for r in serve_app.replicas()], 60, "the replica replaced")


@pytest.mark.slow
def test_llmops_serve_deploys_local_yaml_with_the_default_model_on_openvino_and_it_answers(serve_app):
    """The CLI path (`llmops serve`, the dashboard's REST API) with SmolLM2-135M-Instruct on engine
    openvino: the replica converts the model (int8 weights) with .venv-openvino's exporter, once.

    Runs last: the declarative deploy replaces the tiny app on the same Serve instance.
    """
    settings = serve_app.settings
    env = {
        **os.environ,
        "LLMOPS_HOME": str(settings.home),
        "LLMOPS_RAY_DASHBOARD_PORT": str(settings.ray_dashboard_port),
        "LLMOPS_SERVE_PORT": str(settings.serve_port),
    }
    done = subprocess.run(
        [venv_bin("llmops"), "serve", "--config", str(REPO / "serve_configs" / "local.yaml"), "--model", "default"],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"{settings.serve_url}/v1" in done.stdout
    client = serve_app.openai()
    [model] = client.models.list().data
    assert model.id == "SmolLM2-135M-Instruct"
    answer = client.chat.completions.create(model=model.id, messages=QUESTION, max_tokens=16, temperature=0)
    assert "Paris" in answer.choices[0].message.content
    streamed = client.chat.completions.create(
        model=model.id, messages=QUESTION, max_tokens=16, temperature=0, stream=True
    )
    assert "".join(chunk.choices[0].delta.content or "" for chunk in streamed if chunk.choices) == (
        answer.choices[0].message.content
    )
    for question in ("What is the capital of France? Answer in JSON.", "What is 2+2? Answer as a JSON object.",
                     "Give the name and age of a cat as JSON."):  # fmt: skip
        # Any JSON object (a random tiny model may write one string until its token budget runs out).
        messages = [{"role": "user", "content": question}]
        json_answer = client.chat.completions.create(
            model=model.id, messages=messages, max_tokens=200, temperature=0, response_format={"type": "json_object"}
        )
        assert isinstance(json.loads(json_answer.choices[0].message.content), dict)
    parsed = client.chat.completions.parse(model=model.id, messages=QUESTION, max_tokens=96, temperature=0,
                                           response_format=CityAnswer)  # fmt: skip
    assert parsed.choices[0].message.parsed.city == "Paris"
    [converted] = (settings.model_cache_dir / "openvino").glob("SmolLM2-135M-Instruct.openvino-int8-*")
    assert (converted / "openvino_model.xml").is_file()


def test_the_serving_dashboard_draws_what_the_tests_above_served(serve_app, prometheus):
    """Last of the module: the LLM serving dashboard over everything above (loads, kills, promotions)."""
    assert draw_dashboard(prometheus, "llm-serving", minutes=30) >= 7

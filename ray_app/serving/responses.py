"""The OpenAI wire format of what the API sends: typed models of answers, chunks, usage, model
cards and errors (after vLLM's ``entrypoints/openai/protocol.py``), so each shape is declared once
and checked when it is built. Request bodies are :mod:`ray_app.serving.protocol`'s.

Fields OpenAI leaves out when they do not apply (a delta's ``role`` after the first chunk, a
chunk's ``usage`` before the last) are left out here too; fields it sends as ``null`` are sent.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field


def _absent_if_none() -> Any:
    return Field(default=None, exclude_if=lambda value: value is None)


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int

    @classmethod
    def of(cls, prompt: int, completion: int) -> Usage:
        return cls(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


class FunctionCall(BaseModel):
    name: str
    arguments: str  # JSON text, as OpenAI sends it


class ToolCall(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None  # null when the answer is tool calls
    tool_calls: list[ToolCall] | None = _absent_if_none()


class FunctionCallDelta(BaseModel):
    name: str | None = _absent_if_none()
    arguments: str | None = _absent_if_none()


class ToolCallDelta(BaseModel):
    """A piece of a streamed tool call: the first carries its id and name; the arguments follow."""

    index: int
    id: str | None = _absent_if_none()
    type: Literal["function"] | None = _absent_if_none()
    function: FunctionCallDelta


class ChatChoice(BaseModel):
    index: int = 0
    message: AssistantMessage
    finish_reason: str | None


class DeltaMessage(BaseModel):
    role: Literal["assistant"] | None = _absent_if_none()
    content: str | None = _absent_if_none()
    tool_calls: list[ToolCallDelta] | None = _absent_if_none()


class ChatChunkChoice(BaseModel):
    index: int = 0
    delta: DeltaMessage
    finish_reason: str | None = None


class TextChoice(BaseModel):
    index: int = 0
    text: str
    finish_reason: str | None = None
    logprobs: None = None


class _Envelope(BaseModel):
    """What every answer and chunk of one request repeats."""

    id: str
    created: int
    model: str
    system_fingerprint: str  # the model version that answered


class ChatCompletion(_Envelope):
    object: Literal["chat.completion"] = "chat.completion"
    choices: list[ChatChoice]
    usage: Usage


class ChatCompletionChunk(_Envelope):
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    choices: list[ChatChunkChoice]
    usage: Usage | None = _absent_if_none()  # the last chunk's, with stream_options.include_usage


class Completion(_Envelope):
    """A legacy completion, whole or (with ``stream``) one chunk of it: OpenAI names both alike."""

    object: Literal["text_completion"] = "text_completion"
    choices: list[TextChoice]
    usage: Usage | None = _absent_if_none()


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = 0
    owned_by: str = "ray-llmops"
    version: str  # ray-llmops: the registry version (name/number) this endpoint serves
    run_id: str | None  # ray-llmops: the MLflow run that trained it
    max_model_len: int
    max_tokens_limit: int
    root: str | None = None  # vLLM's fields: the base model of a LoRA adapter's card
    parent: str | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[dict]  # cards as the model replicas (or Serve LLM) describe them


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """OpenAI's error JSON: in a 4xx/5xx response, or as the last event of a stream that failed."""

    error: ErrorDetail

    @classmethod
    def of(cls, message: str, param: str | None, code: str | None, kind: str) -> ErrorResponse:
        return cls(error=ErrorDetail(message=message, type=kind, param=param, code=code))

"""The OpenAI wire format: request bodies (validated) and the error JSON.

Only what the transformers engine implements is accepted; a field that would change the
answer but is not supported (``n > 1``, ``logprobs``, tools, penalties) is refused with a 400
that names it, rather than silently ignored.
"""

from __future__ import annotations

import hashlib
import hmac
from typing import Literal

from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class APIError(Exception):
    """An error the client caused (or a service state it should know about), as OpenAI reports it."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        kind: str = "invalid_request_error",
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def response(self) -> JSONResponse:
        return error_response(self.status, self.message, self.param, self.code, self.kind)


def hash_key(key: str) -> str:
    """What replicas keep of an API key: its SHA-256 digest."""
    return hashlib.sha256(key.encode()).hexdigest()


def bearer_key_error(authorization: str | None, key_hashes: list[str]) -> str | None:
    """Why ``authorization`` does not carry a known key (None when it does, or when no key is required)."""
    if not key_hashes:
        return None
    scheme, _, key = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not key.strip():
        return "missing API key: send 'Authorization: Bearer <key>'"
    digest = hash_key(key.strip())
    if not any(hmac.compare_digest(digest, known) for known in key_hashes):
        return "invalid API key"
    return None


def error_response(
    status: int, message: str, param: str | None = None, code: str | None = None, kind: str = "invalid_request_error"
) -> JSONResponse:
    body = {"error": {"message": message, "type": kind, "param": param, "code": code}}
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    return JSONResponse(body, status_code=status, headers=headers)


class _Request(BaseModel):
    # Unknown fields are ignored like OpenAI does (clients send `user`, `metadata`...).
    model_config = ConfigDict(extra="ignore")

    model: str = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int = 1
    stream: bool = False
    stream_options: dict | None = None
    logprobs: bool | int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, value: str | list[str] | None) -> list[str]:
        stops = [value] if isinstance(value, str) else list(value or [])
        if len(stops) > 4 or any(not stop for stop in stops):
            raise ValueError("stop takes up to 4 non-empty strings")
        return stops

    @model_validator(mode="after")
    def _supported(self):
        if self.n != 1:
            raise ValueError("n: only n=1 is supported")
        if self.logprobs:
            raise ValueError("logprobs: not supported by this engine")
        if self.presence_penalty or self.frequency_penalty:
            raise ValueError("presence_penalty/frequency_penalty: not supported by this engine")
        return self

    @property
    def include_usage(self) -> bool:
        return bool((self.stream_options or {}).get("include_usage"))


class ContentPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart]

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ChatCompletionRequest(_Request):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    tools: list | None = None

    @model_validator(mode="after")
    def _chat_supported(self):
        if self.tools:
            raise ValueError("tools: tool calls are not supported by this engine")
        if self.max_tokens is None:
            self.max_tokens = self.max_completion_tokens
        return self

    def chat_messages(self) -> list[dict[str, str]]:
        # "developer" is OpenAI's newer name for the system role; chat templates know "system".
        return [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in self.messages]


class CompletionRequest(_Request):
    prompt: str | list[str]
    echo: bool = False

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, value: str | list[str]) -> str:
        if isinstance(value, list):
            if len(value) != 1:
                raise ValueError("prompt: exactly one prompt per request is supported")
            value = value[0]
        if not value:
            raise ValueError("prompt must not be empty")
        return value

    @model_validator(mode="after")
    def _completion_supported(self):
        if self.echo:
            raise ValueError("echo: not supported by this engine")
        return self

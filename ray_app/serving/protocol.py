"""The OpenAI wire format: request bodies (validated) and the error JSON.

Bodies are parsed and validated in one step by pydantic's JSON parser (:func:`parse_body`),
strictly: ``max_tokens: "5"`` or ``true`` is a type error, ``NaN`` and ``Infinity`` are
refused, a string with a lone surrogate or bytes that are not UTF-8 are invalid JSON, and
nesting deeper than the parser's limit is refused rather than recursed into.

Nothing is silently ignored. A field OpenAI defines that would change the answer but is
not implemented here (``logit_bias``, ``n > 1``, logprobs,
penalties...) is refused with a 400 that names it, unless it is sent with its neutral value
(``n: 1``, ``logprobs: false``...). A field OpenAI does not define is refused as OpenAI
does ("Unrecognized request argument supplied"). Fields that do not change the answer
(``user``, ``metadata``, ``store``...) are accepted.

Bounds where an engine would otherwise fail: ``seed`` is a 64-bit signed integer (vLLM's
bound); a ``temperature`` below :data:`GREEDY_BELOW` decodes greedily (as vLLM does), so a
tiny positive one cannot overflow the softmax; ``top_p`` keeps at least the most likely token;
``stop`` takes up to 4 strings of at most :data:`STOP_MAX_CHARS` characters.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from typing import Any, Literal

from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from ray_app.serving.engine import GREEDY_BELOW
from ray_app.serving.responses import ErrorResponse
from ray_app.serving.structured import ANY_OBJECT
from ray_app.serving.tools import MAX_PARALLEL_CALLS, ToolUse, calls_schema

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
STOP_MAX_CHARS = 256
MAX_STOPS = 4


class APIError(Exception):
    """An error the client caused (or a service state it should know about), as OpenAI reports it."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        kind: str = "invalid_request_error",
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind
        self.headers = headers

    def __reduce__(self):  # crosses from a model replica to the ingress whole
        return (APIError, (self.status, self.message, self.param, self.code, self.kind, self.headers))

    def model(self) -> ErrorResponse:
        return ErrorResponse.of(self.message, self.param, self.code, self.kind)

    def response(self) -> JSONResponse:
        return error_response(self.status, self.message, self.param, self.code, self.kind, self.headers)


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
    status: int,
    message: str,
    param: str | None = None,
    code: str | None = None,
    kind: str = "invalid_request_error",
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    extra = {"WWW-Authenticate": "Bearer"} if status == 401 else {}
    return JSONResponse(
        error_body(message, param, code, kind), status_code=status, headers={**extra, **(headers or {})}
    )


def error_body(message: str, param: str | None = None, code: str | None = None, kind: str = "invalid_request_error"):
    """OpenAI's error JSON: in a 4xx/5xx response, or as the last event of a stream that failed."""
    return ErrorResponse.of(message, param, code, kind).model_dump()


# --- fields that would change the answer: accepted only with their neutral value -------------
def _empty(value: Any) -> bool:
    return value is None or value is False or value == 0 or value == [] or value == {} or value == ""


_UNSUPPORTED: dict[str, tuple[Any, str]] = {
    # field: (test of the neutral value, why it is refused)
    "functions": (_empty, "function calling is not supported yet"),
    "function_call": (lambda v: v in (None, "none"), "function calling is not supported yet"),
    "logit_bias": (_empty, "logit_bias is not supported by this engine"),
    "logprobs": (_empty, "logprobs are not supported by this engine"),
    "top_logprobs": (_empty, "logprobs are not supported by this engine"),
    "n": (lambda v: v is None or (v == 1 and v is not True), "only n=1 is supported"),
    "best_of": (lambda v: v is None or (v == 1 and v is not True), "only best_of=1 is supported"),
    "presence_penalty": (_empty, "penalties are not supported by this engine"),
    "frequency_penalty": (_empty, "penalties are not supported by this engine"),
    "echo": (_empty, "echo is not supported by this engine"),
    "suffix": (_empty, "suffix (insertion) is not supported by this engine"),
    "audio": (_empty, "audio output is not supported"),
    "modalities": (lambda v: v is None or v == ["text"], "only text output is supported"),
    "prediction": (_empty, "predicted outputs are not supported"),
    "web_search_options": (_empty, "web search is not supported"),
    "reasoning_effort": (_empty, "this model does not reason: reasoning_effort is not supported"),
    "verbosity": (_empty, "verbosity is not supported by this engine"),
}


def _neutral_only(value: Any, info: ValidationInfo) -> Any:
    is_neutral, why = _UNSUPPORTED[info.field_name]
    try:
        neutral = bool(is_neutral(value))
    except Exception:  # a value of a type the test cannot compare
        neutral = False
    if not neutral:
        raise ValueError(why)
    return value


# The fields of _UNSUPPORTED each endpoint declares (so that a refusal names the field in `param`).
_COMMON_REFUSED = ("n", "logit_bias", "presence_penalty", "frequency_penalty")
_CHAT_REFUSED = ("functions", "function_call", "logprobs",
                 "top_logprobs", "audio", "modalities", "prediction", "web_search_options", "reasoning_effort",
                 "verbosity")  # fmt: skip
_COMPLETION_REFUSED = ("echo", "suffix", "best_of", "logprobs")


class _Strict(BaseModel):
    """A part of a request body: unknown fields refused, no type coercion (``"5"`` is not 5)."""

    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(_Strict):
    include_usage: bool = False
    include_obfuscation: bool | None = None  # OpenAI's padding of stream events: nothing to pad here


class _Request(_Strict):
    model_config = ConfigDict(allow_inf_nan=False)  # merged with _Strict's

    model: str = Field(min_length=1, max_length=256)
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=INT64_MIN, le=INT64_MAX)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    # Accepted: they do not change the answer.
    user: str | None = Field(default=None, max_length=512)
    metadata: dict[str, str] | None = None
    store: bool | None = None
    service_tier: str | None = None
    # Refused unless neutral (see _UNSUPPORTED).
    n: Any = None
    logit_bias: Any = None
    presence_penalty: Any = None
    frequency_penalty: Any = None

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, value: str | list[str] | None) -> list[str]:
        stops = [value] if isinstance(value, str) else list(value or [])
        if len(stops) > MAX_STOPS or any(not stop or len(stop) > STOP_MAX_CHARS for stop in stops):
            raise ValueError(f"up to {MAX_STOPS} non-empty strings of at most {STOP_MAX_CHARS} characters")
        return stops

    @field_validator(*_COMMON_REFUSED)
    @classmethod
    def _common_neutral(cls, value: Any, info: ValidationInfo) -> Any:
        return _neutral_only(value, info)

    @model_validator(mode="after")
    def _stream_options_need_stream(self):
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options: only allowed when stream is true")
        return self

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    @property
    def greedy(self) -> bool:
        return self.temperature is not None and self.temperature < GREEDY_BELOW

    @property
    def sampling_temperature(self) -> float:
        """The temperature the engine applies: 0 (greedy) below GREEDY_BELOW; OpenAI's default is 1."""
        if self.temperature is None:
            return 1.0
        return 0.0 if self.greedy else self.temperature

    @property
    def sampling_top_p(self) -> float:
        return 1.0 if self.top_p is None else self.top_p


class ContentPart(_Strict):
    type: Literal["text"]
    text: str


class JSONSchemaFormat(_Strict):
    name: str = Field(min_length=1, max_length=64, pattern=r"^[a-zA-Z0-9_-]+$")
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None  # the answer is constrained to the schema either way


class ResponseFormat(_Strict):
    """OpenAI's ``response_format``: free text, any JSON object, or JSON matching a schema."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_with_its_type(self):
        if (self.type == "json_schema") != (self.json_schema is not None):
            raise ValueError("json_schema: required with type json_schema, and only with it")
        return self

    def schema_text(self) -> str | None:
        """The JSON schema the answer is constrained to (None: free text)."""
        if self.type == "text":
            return None
        if self.type == "json_object" or not self.json_schema.schema_:
            return ANY_OBJECT
        return json.dumps(self.json_schema.schema_, sort_keys=True)


class FunctionCallIn(_Strict):
    name: str = Field(min_length=1, max_length=64)
    arguments: str = Field(max_length=65536)  # JSON text, as the model answered it


class ToolCallIn(_Strict):
    """A tool call of an earlier assistant turn, sent back in the conversation."""

    id: str = Field(min_length=1, max_length=256)
    type: Literal["function"]
    function: FunctionCallIn


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None  # None: an assistant turn that only called tools
    name: str | None = Field(default=None, max_length=256)  # templates ignore it, as OpenAI's models may
    tool_calls: list[ToolCallIn] | None = Field(default=None, max_length=MAX_PARALLEL_CALLS)
    tool_call_id: str | None = Field(default=None, min_length=1, max_length=256)  # which call a tool turn answers

    @model_validator(mode="after")
    def _fields_of_its_role(self):
        if self.tool_calls and self.role != "assistant":
            raise ValueError("tool_calls: only an assistant message has them")
        if (self.role == "tool") != (self.tool_call_id is not None):
            raise ValueError("tool_call_id: required in a tool message, and only there")
        if self.content is None and not self.tool_calls:
            raise ValueError("content: required (null only in an assistant message with tool_calls)")
        return self

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)

    def for_template(self) -> dict[str, Any]:
        """The message as chat templates take it ("developer" is OpenAI's newer name for "system";
        a call's arguments as an object, as Hugging Face templates expect)."""
        message: dict[str, Any] = {"role": "system" if self.role == "developer" else self.role, "content": self.text()}
        if self.tool_calls:
            message["tool_calls"] = [{"type": "function", "id": call.id, "function": {
                "name": call.function.name, "arguments": _json_or_text(call.function.arguments)}}
                for call in self.tool_calls]  # fmt: skip
        if self.tool_call_id is not None:
            message["tool_call_id"] = self.tool_call_id
        return message


def _json_or_text(arguments: str) -> Any:
    try:
        return json.loads(arguments)
    except json.JSONDecodeError:
        return arguments


class FunctionDefinition(_Strict):
    name: str = Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")
    description: str | None = Field(default=None, max_length=4096)
    parameters: dict[str, Any] | None = None  # a JSON schema of the arguments object
    strict: bool | None = None  # the arguments are constrained to the schema either way


class Tool(_Strict):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(_Strict):
    name: str = Field(min_length=1, max_length=64)


class NamedToolChoice(_Strict):
    type: Literal["function"]
    function: NamedFunction


class ChatCompletionRequest(_Request):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    parallel_tool_calls: bool | None = None  # false: at most one call (default: up to MAX_PARALLEL_CALLS)
    safety_identifier: str | None = Field(default=None, max_length=512)
    prompt_cache_key: str | None = Field(default=None, max_length=512)
    response_format: ResponseFormat | None = None
    tools: list[Tool] | None = Field(default=None, max_length=128)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    functions: Any = None
    function_call: Any = None
    logprobs: Any = None
    top_logprobs: Any = None
    audio: Any = None
    modalities: Any = None
    prediction: Any = None
    web_search_options: Any = None
    reasoning_effort: Any = None
    verbosity: Any = None

    @field_validator(*_CHAT_REFUSED)
    @classmethod
    def _chat_neutral(cls, value: Any, info: ValidationInfo) -> Any:
        return _neutral_only(value, info)

    @model_validator(mode="after")
    def _one_max_tokens(self):
        if self.max_tokens is not None and self.max_completion_tokens is not None:
            if self.max_tokens != self.max_completion_tokens:
                raise ValueError("max_tokens and max_completion_tokens differ: send one of them")
        if self.max_tokens is None:
            self.max_tokens = self.max_completion_tokens
        return self

    @model_validator(mode="after")
    def _tool_choice_with_tools(self):
        names = [tool.function.name for tool in self.tools or []]
        if len(set(names)) < len(names):
            raise ValueError("tools: two tools have the same name")
        choice = self.tool_choice
        if not names and (choice == "required" or isinstance(choice, NamedToolChoice)):
            raise ValueError("tool_choice: a tool call was asked for but no tools were sent")
        if isinstance(choice, NamedToolChoice) and choice.function.name not in names:
            raise ValueError(f"tool_choice: no tool is named {choice.function.name!r}")
        if self.calls_tools and self.response_format is not None and self.response_format.type != "text":
            raise ValueError("response_format: a required tool call answers in its own format")
        return self

    @property
    def calls_tools(self) -> bool:
        """Whether the answer must be tool calls (tool_choice "required" or a named function)."""
        return self.tool_choice == "required" or isinstance(self.tool_choice, NamedToolChoice)

    @property
    def may_call_tools(self) -> bool:
        """Whether the model chooses between text and calls (tool_choice "auto", OpenAI's default with
        tools); with a ``response_format`` the answer follows the format and is never read as calls."""
        formatted = self.response_format is not None and self.response_format.type != "text"
        return bool(self.tools) and self.tool_choice in (None, "auto") and not formatted

    def tool_use(self) -> ToolUse:
        """How the answer is read for tool calls (ray_app.serving.tools)."""
        names = frozenset(tool.function.name for tool in self.tools or []) if self.may_call_tools else frozenset()
        most = 1 if self.parallel_tool_calls is False else MAX_PARALLEL_CALLS
        return ToolUse(required=self.calls_tools, names=names, most=most)

    def functions_offered(self) -> list[dict[str, Any]]:
        """The tools the model is shown: with "auto" or a required call (with "none" it is shown none)."""
        shown = self.calls_tools or self.may_call_tools
        return [tool.function.model_dump(exclude_none=True) for tool in self.tools] if shown else []

    def calls_schema(self) -> str | None:
        """The JSON schema a required tool call's answer is constrained to (None: no call is required)."""
        if not self.calls_tools:
            return None
        name = self.tool_choice.function.name if isinstance(self.tool_choice, NamedToolChoice) else None
        return calls_schema(self.functions_offered(), name, self.parallel_tool_calls is not False)

    def chat_messages(self) -> list[dict[str, Any]]:
        return [message.for_template() for message in self.messages]


class CompletionRequest(_Request):
    prompt: str | list[str]
    echo: Any = None
    suffix: Any = None
    best_of: Any = None
    logprobs: Any = None

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, value: str | list[str]) -> str:
        if isinstance(value, list):
            if len(value) != 1:
                raise ValueError("exactly one prompt per request is supported")
            value = value[0]
        if not value:
            raise ValueError("prompt must not be empty")
        return value

    @field_validator(*_COMPLETION_REFUSED)
    @classmethod
    def _completion_neutral(cls, value: Any, info: ValidationInfo) -> Any:
        return _neutral_only(value, info)


OpenAIRequest = ChatCompletionRequest | CompletionRequest


def parse_body(raw: bytes, model: type[OpenAIRequest]) -> OpenAIRequest:
    """Parse and validate a request body; raises APIError(400) naming the first bad field."""
    try:
        return model.model_validate_json(raw)
    except ValidationError as exc:
        raise _invalid(exc, model) from None


def _invalid(exc: ValidationError, model: type[OpenAIRequest]) -> APIError:
    errors = exc.errors(include_url=False, include_input=False)
    first = errors[0]
    if first["type"] == "json_invalid":
        reason = first["msg"].removeprefix("Invalid JSON: ")
        if "surrogate" in reason or "hex escape" in reason:
            reason += " (strings must be valid Unicode: a lone surrogate is not)"
        return APIError(400, f"the request body is not valid JSON: {reason}")
    if first["type"] == "model_type" and not first["loc"]:
        return APIError(400, "the request body must be a JSON object")
    unknown = [error for error in errors if error["type"] == "extra_forbidden" and len(error["loc"]) == 1]
    if unknown:
        name = _loc(unknown[0]["loc"])
        return APIError(400, f"Unrecognized request argument supplied: {name}", param=name)
    parts = []
    for error in errors[:5]:
        loc, message = _loc(error["loc"]), str(error["msg"]).removeprefix("Value error, ")
        parts.append(f"{loc}: {message}" if loc else message)
    more = f" (and {len(errors) - 5} more)" if len(errors) > 5 else ""
    param = _loc(first["loc"]) or None
    if param is None:  # a check across fields: its message starts with the field it blames
        named = parts[0].split(":", 1)[0]
        param = named if named in model.model_fields else None
    return APIError(400, "invalid request body: " + "; ".join(parts) + more, param=param)


def _loc(loc: tuple) -> str:
    # Union members add their type names to the location ("content.str"): keep field names and indexes.
    names = [str(part) for part in loc if isinstance(part, int) or not _is_type_tag(str(part))]
    return ".".join(names)


_TYPE_TAGS = {"str", "int", "float", "bool", "StreamOptions", "ContentPart", "ResponseFormat", "JSONSchemaFormat",
              "NamedToolChoice"}  # fmt: skip


def _is_type_tag(part: str) -> bool:
    return part in _TYPE_TAGS or part.startswith(("list[", "dict[", "function-", "literal["))

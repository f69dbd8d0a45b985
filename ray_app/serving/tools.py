"""Tool calling on the CPU engines: ``tools`` with ``tool_choice`` ``auto``, ``required`` or a named function.

``required`` and named: the answer is constrained (:mod:`ray_app.serving.structured`) to a JSON list of calls, each
``{"name": <one of the tools>, "arguments": <an object valid against that tool's parameters>}``:
one call for a named function or with ``parallel_tool_calls: false``, else up to
:data:`MAX_PARALLEL_CALLS`. The ingress turns that list into OpenAI's ``tool_calls`` with
``finish_reason: "tool_calls"`` (:func:`tool_calls`).

The model sees the tools through its chat template when the template renders them (``tools=``
of ``apply_chat_template``); for a template that ignores them (SmolLM2's), :func:`tool_messages`
describes them in a system message and writes earlier calls and their results (``role: tool``)
as text, so any chat model can take part in an agent loop.

``auto`` (OpenAI's default when tools are sent): the model answers freely and :func:`parse_calls`
reads calls out of its text in either format a chat model is taught: Hermes tags
(``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``, which Qwen2.5's and Hermes'
templates ask for; the text before the first tag is the message's content) or an answer that is
only JSON, one call or a list of them (what the fallback system message asks for; Llama 3's
``parameters`` key is read as ``arguments``). A call to a function that was not offered, or
arguments that are not an object, leave the whole answer as text. Streamed, :class:`AutoCalls`
sends text as it comes and holds back only what may be a call (from an opening tag, or a whole
answer that starts like JSON), so a plain answer still streams token by token.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from typing import Any

from ray_app.serving.responses import FunctionCall, ToolCall

MAX_PARALLEL_CALLS = 8
CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"


@dataclass(frozen=True)
class ToolUse:
    """How an answer is read for calls: a ``required`` one is a constrained JSON list of them; a free one
    ("auto") may call ``names``; ``most`` calls are kept."""

    required: bool = False
    names: frozenset[str] = frozenset()
    most: int = MAX_PARALLEL_CALLS


def calls_schema(tools: list[dict], name: str | None, parallel: bool) -> str:
    """The JSON schema of the answer: a list of calls to ``tools`` (only ``name`` when given)."""
    chosen = [tool for tool in tools if name is None or tool["name"] == name]
    calls = [
        {"type": "object", "additionalProperties": False, "required": ["name", "arguments"],
         "properties": {"name": {"const": tool["name"]}, "arguments": _arguments_schema(tool)}}
        for tool in chosen
    ]  # fmt: skip
    most = 1 if name is not None or not parallel else MAX_PARALLEL_CALLS
    items = calls[0] if len(calls) == 1 else {"anyOf": calls}
    return json.dumps({"type": "array", "items": items, "minItems": 1, "maxItems": most}, sort_keys=True)


def _arguments_schema(tool: dict) -> dict:
    parameters = tool.get("parameters") or {"type": "object", "properties": {}}
    return parameters if parameters.get("type") == "object" else {"type": "object"}


def tool_calls(text: str) -> list[ToolCall] | None:
    """OpenAI's ``tool_calls`` from a constrained answer (None when it was cut before it was whole)."""
    try:
        calls = json.loads(text)
    except json.JSONDecodeError:
        return None
    return [_tool_call(call["name"], call["arguments"]) for call in calls]


def _tool_call(name: str, arguments: dict) -> ToolCall:
    call_id = f"call_{uuid.uuid4().hex[:24]}"
    return ToolCall(id=call_id, function=FunctionCall(name=name, arguments=json.dumps(arguments)))


def parse_calls(text: str, names: frozenset[str], most: int = MAX_PARALLEL_CALLS) -> tuple[str | None, list[ToolCall]]:
    """A free ("auto") answer as OpenAI's message: its content and the calls in it (none: all text).
    ``most`` calls are kept (1 with ``parallel_tool_calls: false``)."""
    start = text.find(CALL_OPEN)
    if start >= 0:
        bodies = [part.split(CALL_CLOSE)[0] for part in text[start + len(CALL_OPEN) :].split(CALL_OPEN)]
        content = text[:start].strip() or None
    else:
        bodies, content = [_unfenced(text)], None
    calls = [call for body in bodies for call in _json_calls(body, names) or [None]]
    if not calls or None in calls:
        return text, []
    return content, [_tool_call(name, arguments) for name, arguments in calls[:most]]


def _unfenced(text: str) -> str:
    """An answer's text without the Markdown code fence a model may put around JSON."""
    body = text.strip()
    if body.startswith("```") and body.endswith("```") and len(body) > 6:
        body = body[3:-3].removeprefix("json")
    return body


def _json_calls(body: str, names: frozenset[str]) -> list[tuple[str, dict]] | None:
    """``(name, arguments)`` of each call in one JSON text (a call or a list), or None if any is not one."""
    try:
        value = json.loads(body)
    except json.JSONDecodeError:
        return None
    calls = []
    for call in value if isinstance(value, list) else [value]:
        if not isinstance(call, dict) or call.get("name") not in names:
            return None
        arguments = call.get("arguments", call.get("parameters", {}))
        if isinstance(arguments, str):  # some models write the arguments as JSON text, as OpenAI sends them
            try:
                arguments = json.loads(arguments)
            except json.JSONDecodeError:
                return None
        if not isinstance(arguments, dict):
            return None
        calls.append((call["name"], arguments))
    return calls


class AutoCalls:
    """A streamed "auto" answer: what of its text can be sent now; the calls when it ends."""

    def __init__(self, names: frozenset[str], most: int = MAX_PARALLEL_CALLS) -> None:
        self.names, self.most, self.text, self.sent = names, most, "", 0

    def feed(self, piece: str) -> str:
        """Add a piece of the answer; returns the text that cannot be part of a call (may be empty)."""
        self.text += piece
        end = max(self.sent, self._held_from())
        shown, self.sent = self.text[self.sent : end], end
        return shown

    def _held_from(self) -> int:
        if not self.sent and self.text.lstrip()[:1] in ("", "[", "{", "`"):
            return 0  # nothing but JSON may follow: the whole answer may be calls
        start = self.text.find(CALL_OPEN)
        if start >= 0:
            return start
        for size in range(min(len(CALL_OPEN) - 1, len(self.text)), 0, -1):  # a tail that may open a tag
            if CALL_OPEN.startswith(self.text[-size:]):
                return len(self.text) - size
        return len(self.text)

    def finish(self, finish_reason: str) -> tuple[str, list[ToolCall]]:
        """The text still to send and the calls (none when the answer was cut, or is plain text)."""
        calls = parse_calls(self.text, self.names, self.most)[1] if finish_reason == "stop" else []
        if not calls:
            return self.text[self.sent :], []
        start = self.text.find(CALL_OPEN)  # -1: the answer was all calls, and nothing of it was sent
        return self.text[self.sent : max(self.sent, start)].rstrip(), calls


def tool_messages(messages: list[dict[str, Any]], tools: list[dict]) -> list[dict[str, str]]:
    """``messages`` for a chat template that does not render tools: the tools described in the
    system message, earlier calls as the JSON the model answers with, results as user turns."""
    described = "\n".join(json.dumps({"name": t["name"], "description": t.get("description") or "",
                                      "parameters": t.get("parameters") or {}}) for t in tools)  # fmt: skip
    guide = (
        "You can call these functions:\n" + described + "\nTo call functions, answer with only a JSON list of calls: "
        '[{"name": "<function name>", "arguments": {<its arguments>}}]; otherwise answer in text. A function\'s '
        'result comes back in a message that starts with "Result of".'
    )
    out: list[dict[str, str]] = []
    called: dict[str, str] = {}  # call id -> function name
    for message in messages:
        if message.get("tool_calls"):
            calls = [{"name": c["function"]["name"], "arguments": c["function"]["arguments"]}
                     for c in message["tool_calls"]]  # fmt: skip
            called |= {c.get("id", ""): c["function"]["name"] for c in message["tool_calls"]}
            out.append({"role": "assistant", "content": json.dumps(calls)})  # what the model answered
        elif message["role"] == "tool":
            name = called.get(message.get("tool_call_id", ""), "a function")
            out.append({"role": "user", "content": f"Result of {name}: {message['content']}"})
        else:
            out.append({"role": message["role"], "content": message["content"]})
    if not tools:  # earlier calls and results only: no call is asked for now
        return out
    if out and out[0]["role"] == "system":
        return [{"role": "system", "content": out[0]["content"] + "\n\n" + guide}, *out[1:]]
    return [{"role": "system", "content": guide}, *out]


def has_tool_turns(messages: list[dict[str, Any]]) -> bool:
    return any(message["role"] == "tool" or message.get("tool_calls") for message in messages)

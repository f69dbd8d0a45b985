"""Tool calling: ``tools`` with ``tool_choice`` ``required`` or a named function, on the CPU engines.

The answer is constrained (:mod:`ray_app.serving.structured`) to a JSON list of calls, each
``{"name": <one of the tools>, "arguments": <an object valid against that tool's parameters>}``:
one call for a named function or with ``parallel_tool_calls: false``, else up to
:data:`MAX_PARALLEL_CALLS`. The ingress turns that list into OpenAI's ``tool_calls`` with
``finish_reason: "tool_calls"`` (:func:`tool_calls`).

The model sees the tools through its chat template when the template renders them (``tools=``
of ``apply_chat_template``); for a template that ignores them (SmolLM2's), :func:`tool_messages`
describes them in a system message and writes earlier calls and their results (``role: tool``)
as text, so any chat model can take part in an agent loop.

``tool_choice: "auto"`` (OpenAI's default when tools are sent) needs the model's own call format
parsed from free text; it is refused with a 400 until then.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

from ray_app.serving.responses import FunctionCall, ToolCall

MAX_PARALLEL_CALLS = 8


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
    return [
        ToolCall(id=f"call_{uuid.uuid4().hex[:24]}",
                 function=FunctionCall(name=call["name"], arguments=json.dumps(call["arguments"])))
        for call in calls
    ]  # fmt: skip


def tool_messages(messages: list[dict[str, Any]], tools: list[dict]) -> list[dict[str, str]]:
    """``messages`` for a chat template that does not render tools: the tools described in the
    system message, earlier calls as the JSON the model answers with, results as user turns."""
    described = "\n".join(json.dumps({"name": t["name"], "description": t.get("description") or "",
                                      "parameters": t.get("parameters") or {}}) for t in tools)  # fmt: skip
    guide = (
        "You can call these functions:\n" + described + "\nTo call functions, answer with a JSON list of calls: "
        '[{"name": "<function name>", "arguments": {<its arguments>}}]. A function\'s result comes back in a '
        'message that starts with "Result of".'
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

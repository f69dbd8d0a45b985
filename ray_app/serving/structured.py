"""Structured output: an answer constrained to a JSON schema (OpenAI's ``response_format``).

``json_object`` is the schema of any JSON object; ``json_schema`` is the request's schema. Both
engines decode under the grammar xgrammar (the library vLLM and OpenVINO GenAI use) compiles
from it, per request, inside a batch of free rows: the transformers engine masks each
constrained row's logits itself (:class:`GrammarMasks`); OpenVINO's pipeline does it from the
grammar :func:`check_schema` writes (its own bundled xgrammar).

A schema is checked in the replica before its request is admitted (:func:`check_schema`): a
keyword outside :data:`SCHEMA_KEYWORDS` (OpenAI's structured-output subset and the annotations
pydantic writes) or a schema xgrammar cannot compile gets a 400 naming it. Checking first
matters on OpenVINO: a grammar its compiler rejects fails the whole pipeline step, every row of
the batch with it. JSON is compact (no free whitespace): a small model cannot pad an answer with
newlines until its token budget runs out.
"""

from __future__ import annotations

import functools
import json
import re
from typing import Any

ANY_OBJECT = json.dumps({"type": "object"})  # json_object: xgrammar's "any JSON object"

# The keywords a schema may use: OpenAI's structured-output subset, plus annotations (title,
# description, default, examples...) that constrain nothing.
SCHEMA_KEYWORDS = frozenset(
    {"type", "properties", "required", "additionalProperties", "items", "prefixItems", "enum", "const", "anyOf",
     "oneOf", "allOf", "$ref", "$defs", "definitions", "pattern", "format", "minimum", "maximum",
     "exclusiveMinimum", "exclusiveMaximum", "minLength", "maxLength", "minItems", "maxItems", "title",
     "description", "default", "examples", "$schema", "$id", "$comment", "nullable", "deprecated", "readOnly",
     "writeOnly"}
)  # fmt: skip
_SUBSCHEMA_MAPS = ("properties", "$defs", "definitions")  # name -> schema
_SUBSCHEMA_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems")
_SUBSCHEMAS = ("items", "additionalProperties")  # a schema (or a boolean)


class SchemaError(ValueError):
    """A response_format schema this server cannot constrain an answer to; the message says why."""


def _walk(schema: Any, where: str) -> None:
    """Refuse keywords outside SCHEMA_KEYWORDS anywhere in ``schema`` (``where`` names the spot)."""
    if isinstance(schema, bool):
        return
    if not isinstance(schema, dict):
        raise SchemaError(f"{where}: a schema must be a JSON object")
    for key, value in schema.items():
        if key not in SCHEMA_KEYWORDS:
            raise SchemaError(f"{where}: the keyword {key!r} is not supported")
        if key in _SUBSCHEMA_MAPS:
            if not isinstance(value, dict):
                raise SchemaError(f"{where}.{key}: must be an object of schemas")
            for name, sub in value.items():
                _walk(sub, f"{where}.{key}.{name}")
        elif key in _SUBSCHEMA_LISTS:
            if not isinstance(value, list):
                raise SchemaError(f"{where}.{key}: must be a list of schemas")
            for index, sub in enumerate(value):
                _walk(sub, f"{where}.{key}.{index}")
        elif key in _SUBSCHEMAS:
            _walk(value, f"{where}.{key}")


@functools.lru_cache(maxsize=256)
def check_schema(text: str) -> str:
    """The grammar (EBNF, OpenVINO's dialect) of ``text``, a JSON schema; SchemaError when a keyword
    is not supported or xgrammar cannot compile it."""
    _walk(json.loads(text), "schema")
    import xgrammar

    try:
        grammar = xgrammar.Grammar.from_json_schema(text, any_whitespace=False)
    except Exception as exc:  # xgrammar raises RuntimeError with the compiler's message
        reason = str(exc).strip().splitlines()[-1]
        raise SchemaError(f"schema: the grammar compiler refused it: {reason.split(': ', 1)[-1]}") from None
    return openvino_ebnf(str(grammar))


MAX_REPEAT_FLOOR = 64  # minItems / minLength up to this (the EBNF for OpenVINO spells each one out)


def openvino_ebnf(ebnf: str) -> str:
    """xgrammar 0.2's EBNF in the dialect of the older xgrammar OpenVINO GenAI 2026.4 bundles.

    Its pipeline takes a JSON schema too, but then allows any whitespace between tokens, which
    a small model fills until its token budget runs out; the grammar we compile has none. The
    older parser has no open repetition ``X{n, -1}``: it becomes ``X*``, ``X+`` or n copies and ``X*``.
    """

    def spelled(match: re.Match) -> str:
        rule, floor = match.group(1), int(match.group(2))
        if floor > MAX_REPEAT_FLOOR:
            raise SchemaError(f"schema: a minimum length or item count above {MAX_REPEAT_FLOOR} is not supported")
        return {0: f"{rule}*", 1: f"{rule}+"}.get(floor, f"({' '.join([rule] * floor)} {rule}*)")

    converted = re.sub(r"([A-Za-z_][\w]*)\{(\d+), -1\}", spelled, ebnf)
    if re.search(r"\{\d+, -1\}", converted):
        raise SchemaError("schema: its grammar has an open repetition this server cannot express")
    return converted


class GrammarMasks:
    """Constrained decoding for the transformers engine: one xgrammar matcher per constrained row,
    which masks the row's logits before sampling and takes the sampled token after it."""

    def __init__(self, tokenizer, vocab_size: int, eos_ids: set[int]):
        import xgrammar

        self._xgr = xgrammar
        info = xgrammar.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size, stop_token_ids=sorted(eos_ids))
        # Compiled once per schema; the cache is bounded (every client may send schemas of its own).
        self.compiler = xgrammar.GrammarCompiler(info, max_threads=2, cache_limit_bytes=64 << 20)
        self.vocab_size = vocab_size
        # One row's mask, refilled for each constrained row at each step (the decode loop is one thread).
        self._bitmask = xgrammar.allocate_token_bitmask(1, vocab_size)

    def matcher(self, schema: str):
        """A fresh matcher for one row answering in ``schema`` (checked by check_schema before)."""
        compiled = self.compiler.compile_json_schema(schema, any_whitespace=False)
        return self._xgr.GrammarMatcher(compiled)

    def mask(self, logits, matcher) -> None:
        """Set the logits of the tokens ``matcher`` does not allow next to -inf (in place, one row)."""
        matcher.fill_next_token_bitmask(self._bitmask)
        self._xgr.apply_token_bitmask_inplace(logits.unsqueeze(0), self._bitmask)

    @staticmethod
    def accept(matcher, token_id: int) -> None:
        if not matcher.accept_token(token_id):
            raise RuntimeError(f"the grammar refused token {token_id} it allowed")

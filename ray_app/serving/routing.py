"""Which version answers a request when a canary runs beside the champion: sticky per conversation.

A conversation must not switch models mid-way, and OpenAI clients are stateless, so the key
is what every turn of one conversation carries:

1. the ``x-conversation-id`` header (the chat sends its thread id);
2. else the request's ``user`` field;
3. else the conversation's opening: its first system and first user message (every later turn
   re-sends them), or a completion's prompt.

(``sticky_by: user`` tries the ``user`` field first; ``request`` draws each request anew.)
The key is hashed to a point in [0, 1): below the canary's share -> the canary. The same key
gives the same version on every ingress replica and after restarts; growing the share only
moves conversations from the champion to the canary, never back.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass

from ray_app.serving.config import AdapterCanaryArgs, AdapterRouting, CanaryArgs, ServedModel
from ray_app.serving.protocol import ChatCompletionRequest, OpenAIRequest

CONVERSATION_HEADER = "x-conversation-id"


def conversation_key(body: OpenAIRequest, conversation_id: str | None, sticky_by: str = "conversation") -> str:
    """The key that keeps one conversation on one version (see the module doc); '' for ``request``."""
    if sticky_by == "request":
        return ""
    by_header = f"conversation:{conversation_id}" if conversation_id else ""
    by_user = f"user:{body.user}" if body.user else ""
    first, second = (by_user, by_header) if sticky_by == "user" else (by_header, by_user)
    return first or second or f"opening:{_opening(body)}"


def answers_as_canary(canary: CanaryArgs | None, body: OpenAIRequest, conversation_id: str | None) -> bool:
    """Whether the canary ``canary`` (None: none runs) answers ``body`` (the same rule on every engine)."""
    if canary is None:
        return False
    return goes_to_canary(conversation_key(body, conversation_id, canary.sticky_by), canary.share)


@dataclass(frozen=True)
class AdapterRoutes:
    """Which stored adapter answers ``model: NAME:X`` (every engine): an alias's adapter - its canary's for
    the canary's share of conversations, by the versions' rule - else the adapter named X."""

    aliases: dict[str, str]  # {ALIAS: ADAPTER}
    canaries: dict[str, AdapterCanaryArgs]  # {ALIAS: challenger}

    @classmethod
    def of(cls, served: ServedModel, routing: AdapterRouting) -> AdapterRoutes:
        """The registry's record (the version's alias tags), then what a rollout pinned in the ingress's config."""
        return cls({**served.adapter_aliases, **routing.adapter_aliases}, dict(routing.adapter_canaries))

    def adapter_for(self, name: str, body: OpenAIRequest, conversation_id: str | None) -> str:
        canary = self.canaries.get(name)
        if canary is not None and answers_as_canary(canary, body, conversation_id):
            return canary.adapter
        return self.aliases.get(name, name)


def goes_to_canary(key: str, share: float) -> bool:
    """Whether the conversation with ``key`` is answered by the canary (``share`` of all keys are)."""
    if not key:
        return random.random() < share  # noqa: S311 - traffic splitting, not security
    point = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") / 2**64
    return point < share


def _opening(body: OpenAIRequest) -> str:
    if isinstance(body, ChatCompletionRequest):
        system = next((m.text() for m in body.messages if m.role in ("system", "developer")), "")
        user = next((m.text() for m in body.messages if m.role == "user"), "")
        return f"{system}\x00{user}"
    prompt = body.prompt
    return prompt if isinstance(prompt, str) else "\x00".join(prompt[:1])

"""Preference data from the chat: what DPO and KTO (``training/dpo.py``) learn from users' ratings.

- **pairs** (DPO): an approved correction is preferred over the answer it corrects; and, for
  the same conversation so far (the same messages before the answer: a question asked again in
  another thread, an answer regenerated), each thumbs-up answer over each thumbs-down one.
- **thumbs** (KTO): a thumbs-up answer is desirable, a thumbs-down answer undesirable; a
  correction gives both (its text desirable, the answer it corrects undesirable).

Only ratings the review policy lets train are used (``ray_app.chat.review``). Every example
names the version(s) that answered and the ratings it came from, and has a ``weight``: 1 when
the model's side of it was answered by the current version (the champion, which a preference
run starts from, so its answers are on-policy), ``other_version_weight`` otherwise (0: dropped).
With no current version (no champion yet) every example weighs 1.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field

from ray_app.chat.feedback import FeedbackRecord
from ray_app.chat.review import CORRECTION, THUMBS_DOWN, THUMBS_UP, ReviewPolicy, correction, kind, ready_at

MAX_PAIRS_PER_PROMPT = 16  # thumbs-up x thumbs-down answers to one prompt grow quadratically


@dataclass
class PreferenceData:
    """The chat's preference examples (JSON-ready dicts) and how many of each kind were made or dropped."""

    pairs: list[dict] = field(default_factory=list)
    thumbs: list[dict] = field(default_factory=list)
    dropped: int = 0  # examples weighed 0 (answered by another version)

    def counts(self) -> dict[str, int]:
        sources = Counter(pair["source"] for pair in self.pairs)
        liked = sum(1 for example in self.thumbs if example["desirable"])
        return {
            "pairs": len(self.pairs), "pairs_from_corrections": sources[CORRECTION],
            "pairs_from_thumbs": sources["thumbs"], "thumbs": len(self.thumbs), "thumbs_up": liked,
            "thumbs_down": len(self.thumbs) - liked, "dropped_other_version": self.dropped,
        }  # fmt: skip

    def new_since(self, watermark: str | None) -> PreferenceData:
        """The examples that became usable after ``watermark`` (all when None)."""
        if watermark is None:
            return self
        return PreferenceData([p for p in self.pairs if p["ready_at"] > watermark],
                              [t for t in self.thumbs if t["ready_at"] > watermark], self.dropped)  # fmt: skip


def version_weight(versions: list[str | None], current: str | None, other_weight: float) -> float:
    """1 when every answer in ``versions`` is the ``current`` version's (or there is none), else ``other_weight``."""
    if current is None or all(version == current for version in versions):
        return 1.0
    return other_weight


def preference_data(
    records: list[FeedbackRecord], policy: ReviewPolicy, current_version: str | None, other_version_weight: float
) -> PreferenceData:
    """Pairs and thumbs from the ``records`` the review ``policy`` lets train (see the module docstring)."""
    usable = trainable(records, policy)
    data = PreferenceData()

    def keep(into: list[dict], example: dict, sources: list[FeedbackRecord]) -> None:
        weight = version_weight([s.model_version for s in sources], current_version, other_version_weight)
        if weight <= 0:
            data.dropped += 1
            return
        into.append({**example, "weight": weight, "model_version": sorted({s.model_version or "" for s in sources}),
                     "feedback_ids": [s.feedback_id for s in sources],
                     "ready_at": max(ready_at(s) for s in sources)})  # fmt: skip

    for record in usable:
        what = kind(record)
        if what == CORRECTION:
            pair = correction_pair(record)
            if pair is not None:
                keep(data.pairs, pair, [record])
            keep(data.thumbs, _thumb(record, correction(record), True), [record])
        keep(data.thumbs, _thumb(record, record.answer, what == THUMBS_UP), [record])
    for liked, disliked in _thumb_pairs(usable):
        keep(data.pairs, _pair(liked, liked.answer, disliked.answer, "thumbs"), [liked, disliked])
    return data


def trainable(records: list[FeedbackRecord], policy: ReviewPolicy) -> list[FeedbackRecord]:
    """The ratings the review ``policy`` lets train whose conversation ends with the user's turn they answer."""
    return [r for r in records if policy.trains(r) and r.conversation and r.conversation[-1]["role"] == "user"]


def correction_pair(record: FeedbackRecord) -> dict | None:
    """The pair a correction makes (the correction over the answer it corrects); None when it is no
    correction or corrects nothing (the same text)."""
    corrected = correction(record)
    if corrected is None or corrected == record.answer:
        return None
    return _pair(record, corrected, record.answer, CORRECTION)


def _pair(record: FeedbackRecord, chosen: str, rejected: str, source: str) -> dict:
    return {"messages": record.conversation, "chosen": chosen, "rejected": rejected, "source": source}


def _thumb(record: FeedbackRecord, completion: str, desirable: bool) -> dict:
    return {"messages": record.conversation, "completion": completion, "desirable": desirable}


def _thumb_pairs(records: list[FeedbackRecord]) -> list[tuple[FeedbackRecord, FeedbackRecord]]:
    """(thumbs-up, thumbs-down) answers to the same conversation so far (of :func:`trainable` ratings),
    with different texts."""
    by_prompt: dict[str, dict[str, list[FeedbackRecord]]] = {}
    for record in records:
        what = kind(record)
        if what in (THUMBS_UP, THUMBS_DOWN):
            key = json.dumps(record.conversation, sort_keys=True)
            by_prompt.setdefault(key, {THUMBS_UP: [], THUMBS_DOWN: []})[what].append(record)
    pairs = []
    for rated in by_prompt.values():
        found = [(up, down) for up in rated[THUMBS_UP] for down in rated[THUMBS_DOWN] if up.answer != down.answer]
        pairs += found[:MAX_PAIRS_PER_PROMPT]
    return pairs

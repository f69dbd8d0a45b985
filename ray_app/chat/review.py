"""Which chat feedback may train the next model: the review policy and the reviewers' decisions.

A rating is a *training candidate* when it is a thumbs-up (its answer is trained on), a
thumbs-down whose comment starts with ``correction:`` (the text after it is trained on, in
place of the answer), or another thumbs-down (preference training learns to avoid its answer;
``ray_app.chat.preferences``). Before a candidate reaches a dataset:

- a correction needs a reviewer's approval (`llmops feedback review`), unless its author is
  listed in ``feedback_trusted_users``;
- a thumbs-up needs one too when ``feedback_review_thumbs_up`` is set (else it trains as is),
  and a thumbs-down when ``feedback_review_thumbs_down`` is;
- a rejection always wins, over a trusted author too;
- a decision covers what was reviewed (a digest of the rating, the answer and the conversation):
  Chainlit lets an author edit a rating later, and an edited one is pending again.

Every decision records the reviewer, the time and an optional note. The retraining export
(``ray_app.orchestration.pipeline``) takes only what :meth:`ReviewPolicy.trains` allows.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from collections import Counter
from dataclasses import dataclass

import sqlalchemy as sa

from ray_app.chat.feedback import FeedbackRecord, read_feedback
from ray_app.chat.schema import feedback_reviews, sync_url
from ray_app.settings import Settings

CORRECTION_PREFIX = "correction:"
APPROVED, REJECTED, PENDING, TRUSTED, UNREVIEWED = "approved", "rejected", "pending", "trusted", "unreviewed"
DECISIONS = (APPROVED, REJECTED)
STATES = (PENDING, APPROVED, REJECTED, TRUSTED, UNREVIEWED)


class ReviewError(ValueError):
    """A decision cannot be recorded (unknown or ambiguous id, not a training candidate...)."""


def correction(record: FeedbackRecord) -> str | None:
    """The corrected answer of a thumbs-down whose comment starts with ``correction:``, else None."""
    return correction_text(record.value, record.comment)


def correction_text(value: int, comment: str | None) -> str | None:
    """The correction in a rating's ``value`` and ``comment`` (the one rule, for records and raw rows)."""
    comment = (comment or "").strip()
    if value == 0 and comment.lower().startswith(CORRECTION_PREFIX):
        return comment[len(CORRECTION_PREFIX) :].strip() or None
    return None


CORRECTION, THUMBS_UP, THUMBS_DOWN = "correction", "thumbs-up", "thumbs-down"


def kind(record: FeedbackRecord) -> str | None:
    """``correction``, ``thumbs-up`` or ``thumbs-down``; None for a rating that is neither (a bad value)."""
    if correction(record) is not None:
        return CORRECTION
    return {1: THUMBS_UP, 0: THUMBS_DOWN}.get(record.value)


def training_example(record: FeedbackRecord) -> dict | None:
    """``{"messages": [...]}`` for the SFT recipe: the conversation and the answer to learn, or None
    (a thumbs-down: there is no answer to learn, only one to avoid)."""
    corrected = correction(record)
    if corrected is not None:
        return {"messages": [*record.conversation, {"role": "assistant", "content": corrected}]}
    return record.as_training_example() if record.value == 1 else None


def digest(record: FeedbackRecord) -> str:
    """What a reviewer saw: the rating, its comment, the answer and the conversation before it."""
    seen = [record.value, record.comment or "", record.answer, record.conversation]
    return hashlib.sha256(json.dumps(seen, sort_keys=True).encode()).hexdigest()


@dataclass(frozen=True)
class ReviewPolicy:
    trusted_users: frozenset[str] = frozenset()
    review_thumbs_up: bool = False
    review_thumbs_down: bool = False

    @classmethod
    def from_settings(cls, settings: Settings) -> ReviewPolicy:
        return cls(frozenset(settings.feedback_trusted_users), settings.feedback_review_thumbs_up,
                   settings.feedback_review_thumbs_down)  # fmt: skip

    def state(self, record: FeedbackRecord) -> str | None:
        """The record's review state (one of STATES), or None when it is not a training candidate."""
        what = kind(record)
        if what is None:
            return None
        if record.review is not None and record.review.digest == digest(record):
            return record.review.decision
        if record.user in self.trusted_users:
            return TRUSTED
        if (what == THUMBS_UP and not self.review_thumbs_up) or (what == THUMBS_DOWN and not self.review_thumbs_down):
            return UNREVIEWED
        return PENDING

    def trains(self, record: FeedbackRecord) -> bool:
        return self.state(record) in (APPROVED, TRUSTED, UNREVIEWED)

    def counts(self, records: list[FeedbackRecord]) -> dict[str, int]:
        """How many training candidates are in each state."""
        found = Counter(self.state(record) for record in records)
        return {state: found.get(state, 0) for state in STATES}


def ready_at(record: FeedbackRecord) -> str:
    """When a record became usable: answered, or approved later (what "new since the last training" means)."""
    approved = record.review.decided_at if record.review and record.review.decision == APPROVED else ""
    return max(record.answered_at or "", approved or "")


def candidates(database_url: str, policy: ReviewPolicy, state: str | None = None) -> list[FeedbackRecord]:
    """The training candidates (in ``state``, if given), oldest answer first."""
    records = [record for record in read_feedback(database_url) if policy.state(record) is not None]
    return [record for record in records if state is None or policy.state(record) == state]


def find(records: list[FeedbackRecord], feedback_id: str) -> FeedbackRecord:
    """The record whose feedback id is ``feedback_id`` or starts with it (at least 6 characters)."""
    exact = [record for record in records if record.feedback_id == feedback_id]
    if exact:
        return exact[0]
    found = [record for record in records if len(feedback_id) >= 6 and record.feedback_id.startswith(feedback_id)]
    if len(found) != 1:
        problem = "matches several ratings" if found else "is not the id of a correction or rating that can train"
        raise ReviewError(f"feedback id {feedback_id!r} {problem}")
    return found[0]


def decide(database_url: str, record: FeedbackRecord, decision: str, reviewer: str, note: str | None = None) -> str:
    """Record ``decision`` (approved/rejected) on ``record`` by ``reviewer``; returns the time it was made."""
    if decision not in DECISIONS:
        raise ReviewError(f"decision must be one of {', '.join(DECISIONS)}, got {decision!r}")
    if not reviewer.strip():
        raise ReviewError("a decision needs the reviewer's name")
    now = dt.datetime.now(dt.UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")
    row = {"feedbackId": record.feedback_id, "decision": decision, "reviewer": reviewer.strip(),
           "decidedAt": now, "digest": digest(record), "note": note}  # fmt: skip
    engine = sa.create_engine(sync_url(database_url))
    try:
        with engine.begin() as connection:  # one transaction: the old decision is replaced, never lost alone
            connection.execute(sa.delete(feedback_reviews).where(feedback_reviews.c.feedbackId == record.feedback_id))
            connection.execute(sa.insert(feedback_reviews).values(**row))
    finally:
        engine.dispose()
    return now

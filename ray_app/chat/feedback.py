"""Read the chat's feedback back out of SQL: what the retraining DAG turns into training data.

Each thumbs up/down in the chat is a row of ``feedbacks`` pointing at the assistant step it
rates; the step's metadata holds the model version that answered. :func:`read_feedback`
joins them with the conversation up to that answer. Synchronous SQLAlchemy on purpose: the
Airflow side calls it with plain drivers (psycopg2, sqlite3).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import sqlalchemy as sa

from ray_app.chat.schema import feedback_reviews, feedbacks, steps, sync_url, threads, upgrade_schema

USER_STEP, ASSISTANT_STEP = "user_message", "assistant_message"


@dataclass(frozen=True)
class Review:
    """A reviewer's decision on a rating (``approved`` or ``rejected``) and what it covered."""

    decision: str
    reviewer: str
    decided_at: str
    digest: str
    note: str | None = None


@dataclass(frozen=True)
class FeedbackRecord:
    """One rating of one answer, with the conversation that led to it."""

    feedback_id: str
    thread_id: str
    step_id: str
    value: int  # 1 = thumbs up, 0 = thumbs down
    comment: str | None
    model_version: str | None
    answer: str
    answered_at: str | None
    user: str | None
    conversation: list[dict[str, str]] = field(default_factory=list)  # the messages before the answer
    review: Review | None = None  # the last reviewer decision, if any (ray_app.chat.review)

    def as_training_example(self, system_prompt: str | None = None) -> dict:
        """``{"messages": [...]}`` in the chat format the SFT recipe reads, ending with this answer."""
        messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
        return {"messages": [*messages, *self.conversation, {"role": "assistant", "content": self.answer}]}


def step_metadata(raw) -> dict:
    if isinstance(raw, dict):
        return raw
    try:
        return json.loads(raw) if raw else {}
    except (TypeError, ValueError):
        return {}


class ChatDatabaseError(RuntimeError):
    """The chat database cannot be read; the message names it (password hidden)."""


def database_label(database_url: str) -> str:
    """The database URL with its password hidden: safe in logs and errors."""
    try:
        return sa.engine.make_url(database_url).render_as_string(hide_password=True)
    except sa.exc.ArgumentError:
        return "(an unparseable database URL)"


def database_error_reason(exc: BaseException) -> str:
    """The first line of what the database driver said (SQLAlchemy wraps it in ``orig``)."""
    lines = str(getattr(exc, "orig", None) or exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


def chat_database_missing(database_url: str) -> bool:
    """Whether the chat's database is a SQLite file that does not exist yet (the chat never ran)."""
    if not database_url.startswith("sqlite"):
        return False
    database = sa.engine.make_url(sync_url(database_url)).database
    return bool(database) and database != ":memory:" and not Path(database).is_file()


def read_feedback(database_url: str, since: str | None = None, value: int | None = None) -> list[FeedbackRecord]:
    """Every feedback row (or those with ``value``) on answers created after ``since`` (ISO time).

    A SQLite chat database that does not exist yet holds no feedback: [] (nothing is created).
    Raises ChatDatabaseError naming the database when it cannot be reached or read.
    """
    if chat_database_missing(database_url):
        return []
    try:
        return _read_feedback(database_url, since, value)
    except sa.exc.SQLAlchemyError as exc:
        reason = database_error_reason(exc)
        raise ChatDatabaseError(f"cannot read the chat database {database_label(database_url)}: {reason}") from None


def _read_feedback(database_url: str, since: str | None, value: int | None) -> list[FeedbackRecord]:
    upgrade_schema(database_url)  # a database the chat has not opened since an upgrade lacks the reviews table
    engine = sa.create_engine(sync_url(database_url))
    try:
        with engine.connect() as connection:
            reviews = feedback_reviews.c
            query = (
                sa.select(feedbacks.c.id, feedbacks.c.threadId, feedbacks.c.forId, feedbacks.c.value,
                          feedbacks.c.comment, threads.c.userIdentifier, reviews.decision, reviews.reviewer,
                          reviews.decidedAt, reviews.digest, reviews.note)
                .join(threads, threads.c.id == feedbacks.c.threadId)
                .outerjoin(feedback_reviews, reviews.feedbackId == feedbacks.c.id)
            )  # fmt: skip
            if value is not None:
                query = query.where(feedbacks.c.value == value)
            records = []
            for row in connection.execute(query).all():
                answer = answer_step(connection, row.forId)
                if answer is None or (since and (answer.createdAt or "") <= since):
                    continue
                meta = step_metadata(answer.metadata)
                records.append(
                    FeedbackRecord(
                        feedback_id=row.id, thread_id=row.threadId, step_id=answer.id, value=int(row.value),
                        comment=row.comment or None, model_version=meta.get("model_version"),
                        answer=meta.get("answer", answer.output or ""), answered_at=answer.createdAt,
                        user=row.userIdentifier,
                        conversation=_conversation(connection, row.threadId, answer.createdAt),
                        review=Review(row.decision, row.reviewer, row.decidedAt, row.digest, row.note)
                        if row.decision else None,
                    )
                )  # fmt: skip
            return sorted(records, key=lambda record: record.answered_at or "")
    finally:
        engine.dispose()


def answer_step(connection, step_id: str):
    """The assistant message a rating is for: the step itself, or (Chainlit rates the run) its last answer."""
    query = (
        sa.select(steps.c.id, steps.c.output, steps.c.metadata, steps.c.createdAt)
        .where(steps.c.type == ASSISTANT_STEP, sa.or_(steps.c.id == step_id, steps.c.parentId == step_id))
        .where(sa.or_(steps.c.isError.is_(None), steps.c.isError.is_(False)))
        .order_by(steps.c.createdAt.desc())
        .limit(1)
    )
    return connection.execute(query).first()


def _conversation(connection, thread_id: str, before: str | None) -> list[dict[str, str]]:
    query = (
        sa.select(steps.c.type, steps.c.output, steps.c.metadata)
        .where(steps.c.threadId == thread_id, steps.c.type.in_([USER_STEP, ASSISTANT_STEP]))
        .order_by(steps.c.createdAt)
    )
    if before:
        query = query.where(steps.c.createdAt < before)
    messages = []
    for row in connection.execute(query):
        if row.type == USER_STEP:
            messages.append({"role": "user", "content": row.output or ""})
        else:
            answer = step_metadata(row.metadata).get("answer", row.output or "")
            messages.append({"role": "assistant", "content": answer})
    return messages

"""The chat's ``/metrics``: users' ratings per model version, read from the chat database.

Counted in the database at scrape time, not in the process: the figures survive restarts and
agree across chat replicas (each replica reports the same totals; aggregate with ``max``, not
``sum``). Exported:

- ``llmops_feedback_total{model_version, rating="up"|"down"}``: ratings of answers;
- ``llmops_feedback_corrections_total{model_version}``: thumbs-down that carry a correction;
- ``llmops_chat_database_up``: 1 when the last scrape could read the database.

Only Prometheus reads it: a bearer token (``ray_app.monitoring.metrics_token``) is required.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
from collections import Counter

import sqlalchemy as sa
from fastapi import APIRouter, Request, Response

from ray_app.chat.feedback import (
    answer_step,
    chat_database_missing,
    database_error_reason,
    database_label,
    step_metadata,
)
from ray_app.chat.review import correction_text
from ray_app.chat.schema import feedbacks, sync_url

log = logging.getLogger(__name__)

EXPORTED = {
    "llmops_feedback_total": "ratings of answers, by the model version that answered and thumbs up/down",
    "llmops_feedback_corrections_total": "thumbs-down ratings that carry a correction, by model version",
    "llmops_chat_database_up": "1 when the chat database could be read at the last scrape",
}


def feedback_counts(engine: sa.Engine) -> tuple[Counter, Counter]:
    """(ratings by (model_version, "up"/"down"), corrections by model_version).

    One query per rating finds the answer it rates (as the export does); fine for the
    thousands of ratings a retraining window holds.
    """
    ratings, corrections = Counter(), Counter()
    with engine.connect() as connection:
        rows = connection.execute(sa.select(feedbacks.c.value, feedbacks.c.comment, feedbacks.c.forId)).all()
        for value, comment, for_id in rows:
            answer = answer_step(connection, for_id)
            version = (step_metadata(answer.metadata).get("model_version") if answer else None) or "unknown"
            ratings[version, "up" if int(value) == 1 else "down"] += 1
            if correction_text(int(value), comment) is not None:
                corrections[version] += 1
    return ratings, corrections


class FeedbackCollector:
    """A prometheus_client collector over the chat database."""

    def __init__(self, database_url: str):
        self.database_url = database_url
        self._engine: sa.Engine | None = None

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        up = GaugeMetricFamily("llmops_chat_database_up", EXPORTED["llmops_chat_database_up"])
        ratings = CounterMetricFamily(
            "llmops_feedback", EXPORTED["llmops_feedback_total"], labels=["model_version", "rating"]
        )
        corrected = CounterMetricFamily(
            "llmops_feedback_corrections", EXPORTED["llmops_feedback_corrections_total"], labels=["model_version"]
        )
        try:
            counts = (Counter(), Counter()) if chat_database_missing(self.database_url) else self._counts()
        except sa.exc.SQLAlchemyError as exc:
            reason = database_error_reason(exc)
            log.warning("metrics: cannot read the chat database %s: %s", database_label(self.database_url), reason)
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        for (version, rating), count in sorted(counts[0].items()):
            ratings.add_metric([version, rating], count)
        for version, count in sorted(counts[1].items()):
            corrected.add_metric([version], count)
        yield from (up, ratings, corrected)

    def _counts(self) -> tuple[Counter, Counter]:
        if self._engine is None:
            self._engine = sa.create_engine(sync_url(self.database_url), pool_pre_ping=True)
        return feedback_counts(self._engine)


def metrics_router(database_url: str, token: str, root_path: str = "") -> APIRouter:
    """``GET /metrics`` in Prometheus's text format, for a request bearing ``token`` only."""
    from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

    registry = CollectorRegistry(auto_describe=False)
    registry.register(FeedbackCollector(database_url))
    router = APIRouter()
    expected = f"Bearer {token}".encode()

    @router.get(f"{root_path}/metrics", include_in_schema=False)
    async def metrics(request: Request) -> Response:
        given = request.headers.get("authorization", "").encode()
        if not hmac.compare_digest(given, expected):
            return Response("a bearer token is required", status_code=401, headers={"WWW-Authenticate": "Bearer"})
        body = await asyncio.to_thread(generate_latest, registry)
        return Response(body, media_type=CONTENT_TYPE_LATEST)

    return router

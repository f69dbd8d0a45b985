"""The chat history's data layer: Chainlit's SQLAlchemy layer, plus writes the chat can await.

Chainlit saves each message in a background task and, when the database is down, only logs a
warning (its ``execute_sql`` returns None): a conversation would be lost without anyone
knowing. So the chat saves each turn itself through :meth:`HistoryLayer.save_steps`, which
raises :class:`~ray_app.chat.feedback.ChatDatabaseError` naming the database; Chainlit's insert
is an upsert by step id, so a step written twice (by Chainlit and by us, or by a retry) is
stored once. Everything else keeps Chainlit's behaviour.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from chainlit.data.sql_alchemy import SQLAlchemyDataLayer
from sqlalchemy import text

from ray_app.chat.feedback import ChatDatabaseError, database_error_reason, database_label

_STRICT = contextvars.ContextVar("llmops_strict_history_writes", default=False)
WRITE_TIMEOUT_S = 10.0


@contextmanager
def _strict() -> Iterator[None]:
    token = _STRICT.set(True)
    try:
        yield
    finally:
        _STRICT.reset(token)


class HistoryLayer(SQLAlchemyDataLayer):
    """Chainlit's SQLAlchemy data layer whose writes, inside :meth:`save_steps`, fail loudly."""

    def __init__(self, conninfo: str, **kwargs: Any) -> None:
        super().__init__(conninfo=conninfo, **kwargs)
        self.label = database_label(conninfo)

    async def execute_sql(self, query: str, parameters: dict) -> list[dict[str, Any]] | int | None:
        if not _STRICT.get():
            return await super().execute_sql(query, parameters)
        async with self.async_session() as session:
            try:
                await session.begin()
                result = await session.execute(text(query), parameters)
                await session.commit()
                if result.returns_rows:
                    return self.clean_result([dict(row._mapping) for row in result.fetchall()])
                return result.rowcount
            except Exception as exc:  # the driver's own errors (asyncpg, aiosqlite) or SQLAlchemy's
                with contextlib.suppress(Exception):  # the connection is gone: nothing to roll back
                    await session.rollback()
                detail = database_error_reason(exc)
                raise ChatDatabaseError(f"the chat history database {self.label} is unreachable: {detail}") from None

    async def save_steps(self, steps: list[dict[str, Any]], user_id: str | None = None) -> None:
        """Store ``steps`` (and their thread, owned by ``user_id``) now; raises ChatDatabaseError."""
        with _strict():
            try:
                await asyncio.wait_for(self._save(steps, user_id), WRITE_TIMEOUT_S)
            except TimeoutError:
                raise ChatDatabaseError(
                    f"the chat history database {self.label} did not answer in {WRITE_TIMEOUT_S:.0f} s"
                ) from None

    async def _save(self, steps: list[dict[str, Any]], user_id: str | None) -> None:
        threads = {step["threadId"] for step in steps if step.get("threadId")}
        for thread_id in threads:
            await self.update_thread(thread_id, user_id=user_id)
        for step in steps:
            await self.create_step(dict(step))

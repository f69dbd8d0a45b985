"""What Chainlit's server does not check, enforced in front of it (Chainlit's files stay untouched).

Chainlit 2.12 lets any logged-in user write or delete feedback on any answer (``PUT`` and
``DELETE /feedback`` check only that someone is logged in), answers another user's thread
read with 401, allows every origin (CORS ``*`` with credentials) and lets logins be tried
without limit. :func:`install` puts in front of its FastAPI app:

- routes ahead of Chainlit's for ``PUT /feedback``, ``DELETE /feedback`` and
  ``GET /project/thread/{id}``: the caller must be the author of the thread the answer (or the
  feedback) belongs to, else 403 and nothing is written; the thread of a feedback is always the
  thread of the step it rates, never what the client says (Chainlit's ``on_feedback`` hook is
  not called from here: the app defines none);
- :class:`RequestGuard`, an ASGI middleware: requests and websocket handshakes from an origin
  other than the chat's own are refused (403), and ``POST /login`` answers 429 with
  ``Retry-After`` once a name or an address has failed too often (:class:`LoginThrottle`).

This is the one module that reaches into Chainlit's server (its app and route list);
``tests/test_chat.py::test_guard_shadows_the_chainlit_routes_it_replaces`` pins those routes
to the installed Chainlit.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import replace
from typing import Annotated, Any
from urllib.parse import parse_qs

import sqlalchemy as sa
from chainlit.auth import get_current_user
from chainlit.data import get_data_layer
from chainlit.types import DeleteFeedbackRequest, UpdateFeedbackRequest
from fastapi import APIRouter, Depends, FastAPI, HTTPException
from fastapi.responses import JSONResponse
from sqlalchemy.ext.asyncio import create_async_engine

from ray_app.chat.auth import LoginThrottle
from ray_app.chat.schema import feedbacks, steps, threads
from ray_app.settings import Settings

# Routes of Chainlit's that this module answers first: (method, path below Chainlit's root path).
SHADOWED = (("PUT", "/feedback"), ("DELETE", "/feedback"), ("GET", "/project/thread/{thread_id}"))
IP_LIMIT_FACTOR = 10  # an address may fail this many times the per-name limit (many people behind one NAT)


class Ownership:
    """Who wrote the thread a step or a feedback belongs to (async reads on the chat database)."""

    def __init__(self, database_url: str):
        self.engine = create_async_engine(database_url)

    async def _first(self, query):
        async with self.engine.connect() as connection:
            return (await connection.execute(query)).first()

    async def of_step(self, step_id: str):
        """(threadId, author) of a step, or None when there is no such step."""
        query = (
            sa.select(steps.c.threadId, threads.c.userIdentifier)
            .join(threads, threads.c.id == steps.c.threadId)
            .where(steps.c.id == step_id)
        )
        return await self._first(query)

    async def of_feedback(self, feedback_id: str):
        """(threadId, forId, author) of a feedback, or None when there is no such feedback."""
        query = (
            sa.select(feedbacks.c.threadId, feedbacks.c.forId, threads.c.userIdentifier)
            .join(threads, threads.c.id == feedbacks.c.threadId)
            .where(feedbacks.c.id == feedback_id)
        )
        return await self._first(query)

    async def of_thread(self, thread_id: str) -> tuple[str | None] | None:
        return await self._first(sa.select(threads.c.userIdentifier).where(threads.c.id == thread_id))


async def _logged_in(user: Annotated[Any, Depends(get_current_user)]):
    if user is None:
        raise HTTPException(status_code=401, detail="not logged in")
    return user


User = Annotated[Any, Depends(_logged_in)]


def _require(user, author: str | None, what: str) -> None:
    if author is None or author != user.identifier:
        raise HTTPException(status_code=403, detail=f"{what} belongs to another user's conversation")


def ownership_router(owners: Ownership, root_path: str = "") -> APIRouter:
    """The routes that replace Chainlit's feedback writes and thread read, with the author check."""
    router = APIRouter(prefix=root_path)

    @router.put("/feedback")
    async def update_feedback(update: UpdateFeedbackRequest, user: User) -> JSONResponse:
        feedback = update.feedback
        step = await owners.of_step(feedback.forId)
        if step is None:
            raise HTTPException(status_code=404, detail="no such message to rate")
        _require(user, step.userIdentifier, "this message")
        if feedback.id:  # an update: the rating must be the caller's, and on the same message
            existing = await owners.of_feedback(feedback.id)
            if existing is not None:
                _require(user, existing.userIdentifier, "this feedback")
                if existing.forId != feedback.forId:
                    raise HTTPException(status_code=403, detail="this feedback rates another message")
        feedback_id = await get_data_layer().upsert_feedback(replace(feedback, threadId=step.threadId))
        return JSONResponse({"success": True, "feedbackId": feedback_id})

    @router.delete("/feedback")
    async def delete_feedback(payload: DeleteFeedbackRequest, user: User) -> JSONResponse:
        existing = await owners.of_feedback(payload.feedbackId)
        if existing is None:
            raise HTTPException(status_code=404, detail="no such feedback")
        _require(user, existing.userIdentifier, "this feedback")
        await get_data_layer().delete_feedback(payload.feedbackId)
        return JSONResponse({"success": True})

    @router.get("/project/thread/{thread_id}")
    async def get_thread(thread_id: str, user: User) -> JSONResponse:
        row = await owners.of_thread(thread_id)
        if row is None:
            raise HTTPException(status_code=404, detail="Thread not found")
        _require(user, row.userIdentifier, "this thread")
        return JSONResponse(content=await get_data_layer().get_thread(thread_id))

    return router


def _header(scope, name: bytes) -> str | None:
    for key, value in scope.get("headers") or []:
        if key.lower() == name:
            return value.decode("latin-1")
    return None


async def _json(send, status: int, detail: str, headers: dict[str, str] | None = None) -> None:
    body = json.dumps({"detail": detail}).encode()
    extra = [(key.lower().encode(), value.encode()) for key, value in (headers or {}).items()]
    length = str(len(body)).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", length), *extra]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class RequestGuard:
    """ASGI middleware: other origins get 403; logins past the failure limit get 429."""

    def __init__(self, app, allowed_origins: list[str], throttle: LoginThrottle, login_path: str = "/login"):
        self.app, self.allowed, self.throttle, self.login_path = app, set(allowed_origins), throttle, login_path
        self.check_s = 0.0  # running mean of a login's time: a refused login waits as long (asleep, no CPU)

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        origin = _header(scope, b"origin")
        if origin is not None and origin.rstrip("/") not in self.allowed:
            if scope["type"] == "websocket":
                return await send({"type": "websocket.close", "code": 1008})
            return await _json(send, 403, f"origin {origin} may not call this chat")
        if scope["type"] == "http" and scope["method"] == "POST" and scope["path"] == self.login_path:
            return await self._login(scope, receive, send)
        return await self.app(scope, receive, send)

    async def _login(self, scope, receive, send) -> None:
        body, more = b"", True
        while more:
            message = await receive()
            body += message.get("body", b"")
            more = message.get("more_body", False)
        user = (parse_qs(body.decode("utf-8", "replace")).get("username") or [""])[0]
        address = (scope.get("client") or ("unknown",))[0]
        keys = (f"user:{user}", f"ip:{address}")
        limit = self.throttle.max_failures
        wait = self.throttle.retry_after((keys[0], limit), (keys[1], limit * IP_LIMIT_FACTOR))
        if wait > 0:
            await asyncio.sleep(self.check_s)
            seconds = str(max(1, round(wait)))
            return await _json(send, 429, f"too many failed logins; try again in {seconds} s", {"Retry-After": seconds})

        status: list[int] = []

        async def replay():
            return {"type": "http.request", "body": body, "more_body": False}

        async def watch(message) -> None:
            if message["type"] == "http.response.start":
                status.append(message["status"])
            await send(message)

        started = time.monotonic()
        await self.app(scope, replay, watch)
        took = time.monotonic() - started
        self.check_s = 0.8 * self.check_s + 0.2 * took if self.check_s else took
        if status and status[0] == 401:
            self.throttle.failed(*keys)
        elif status and status[0] < 400:
            self.throttle.succeeded(keys[0])


def install(app: FastAPI, settings: Settings, root_path: str = "") -> None:
    """Put the author checks, the origin check and the login throttle in front of Chainlit's ``app``."""
    router = ownership_router(Ownership(str(settings.chat_database_url)), root_path)
    app.router.routes[0:0] = router.routes  # matched before Chainlit's own routes of the same path
    throttle = LoginThrottle(settings.chat_login_max_failures, settings.chat_login_window_s)
    app.add_middleware(
        RequestGuard, allowed_origins=settings.chat_allowed_origins, throttle=throttle, login_path=f"{root_path}/login"
    )

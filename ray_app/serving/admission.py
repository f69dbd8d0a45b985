"""Backpressure and deadlines of one replica: how many requests it holds, and for how long.

A replica admits at most ``capacity`` requests (the running batch plus a bounded queue); one
more is answered 503 with ``Retry-After`` at once, before its prompt is even tokenized, so a
burst sheds load instead of growing a queue nobody will wait for. Every admitted request has a
deadline: one that gets no first token before it is answered 503 too (it waited in the queue
too long; nothing was produced, so a retry loses nothing), and one whose deadline passes while
it generates is cut off (the engine drops its row at the next step) and told so. A request
whose client leaves is dropped from the batch at the next step.

Pure asyncio and the engine's batcher: the Serve app drives it; tests drive it in-process.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator

from ray_app.serving.engine import ContinuousBatcher, Delta, GenerationRequest
from ray_app.serving.protocol import APIError

log = logging.getLogger("ray.serve")


class DeadlineExceeded(Exception):
    """The request's deadline passed while it was generating."""


class Admission:
    """The replica's admission counter and deadline policy."""

    def __init__(self, capacity: int, timeout_s: float, retry_after_s: int):
        self.capacity, self.timeout_s, self.retry_after_s = capacity, timeout_s, retry_after_s
        self.active = 0  # admitted and not yet closed (event-loop thread only)
        self.rejected = 0

    def overloaded(self, message: str) -> APIError:
        return APIError(
            503,
            message,
            code="overloaded",
            kind="server_error",
            headers={"Retry-After": str(self.retry_after_s)},
        )

    def check(self) -> None:
        """Raise 503 (Retry-After) when the replica holds ``capacity`` requests already."""
        if self.active >= self.capacity:
            self.rejected += 1
            raise self.overloaded(
                f"the server is at capacity ({self.capacity} requests running or queued): retry after "
                f"{self.retry_after_s}s"
            )

    def admit(self, batcher: ContinuousBatcher, request: GenerationRequest) -> Generation:
        """Check capacity, give ``request`` its deadline and hand it to the decode loop."""
        self.check()
        request.deadline = time.monotonic() + self.timeout_s
        generation = Generation(self, batcher, request)  # raises if the batcher refuses the request
        self.active += 1
        return generation


class Generation:
    """One admitted request's deltas, as the decode loop produces them; :meth:`close` when done."""

    def __init__(self, admission: Admission, batcher: ContinuousBatcher, request: GenerationRequest):
        self.admission, self.request = admission, request
        self.arrived = time.monotonic()
        self._closed = False
        self._held: Delta | BaseException | None = None
        self._queue: asyncio.Queue[Delta | BaseException] = asyncio.Queue()
        loop = asyncio.get_running_loop()
        batcher.submit(request, lambda item: loop.call_soon_threadsafe(self._queue.put_nowait, item))

    async def next(self) -> Delta:
        """The next delta; raises DeadlineExceeded, or what failed the row."""
        remaining = (self.request.deadline or float("inf")) - time.monotonic()
        item, self._held = self._held, None
        try:
            if item is None:
                item = await asyncio.wait_for(self._queue.get(), timeout=max(remaining, 0.0))
        except TimeoutError:
            raise DeadlineExceeded() from None
        if isinstance(item, BaseException):
            raise item
        if item.finish_reason == "deadline":
            raise DeadlineExceeded()
        return item

    def ready(self) -> list[Delta]:
        """The deltas already produced, without waiting (stops after one with a finish reason)."""
        ready: list[Delta] = []
        while not self._queue.empty() and not (ready and ready[-1].finish_reason):
            item = self._queue.get_nowait()
            if isinstance(item, BaseException) or item.finish_reason == "deadline":
                self._held = item  # next() raises it
                break
            ready.append(item)
        return ready

    async def batches(self, interval_s: float) -> AsyncIterator[list[Delta]]:
        """The rest of the answer in lists: what came within ``interval_s`` of the last list sent (0: what
        each step made). Raises like :meth:`next`.

        Each list is one message from the replica to the ingress, and a message costs more CPU than
        decoding a token of a small model: one per token made eight concurrent answers no faster
        than eight in a row (Ray Serve LLM batches its streams every 50 ms for the same reason).
        """
        pending: list[Delta] = []
        due = time.monotonic() + interval_s
        while True:
            if pending:
                remaining = due - time.monotonic()
                if remaining <= 0 or not await self._arrives_within(remaining):
                    yield pending
                    pending, due = [], time.monotonic() + interval_s
                    continue
            try:
                pending += [await self.next(), *self.ready()]
            except Exception:
                if pending:
                    yield pending  # what came before the failure (the deadline) still goes out first
                raise
            if pending[-1].finish_reason:
                yield pending
                return

    async def _arrives_within(self, seconds: float) -> bool:
        """Whether a delta (or a failure) is ready or comes within ``seconds``; it is held for next()."""
        if self._held is not None or not self._queue.empty():
            return True
        try:
            self._held = await asyncio.wait_for(self._queue.get(), timeout=max(seconds, 0.0))
        except TimeoutError:
            return False
        return True

    async def first(self) -> Delta:
        """The first delta; 503 (Retry-After) if the deadline passes before it (the request only waited).

        Raises APIError only; the request is closed when it does.
        """
        try:
            return await self.next()
        except DeadlineExceeded:
            self.close()
            raise self.admission.overloaded(
                f"the server is busy: no batch slot within the {self.admission.timeout_s:g}s deadline; retry after "
                f"{self.admission.retry_after_s}s"
            ) from None
        except Exception as exc:
            self.close()
            log.error("a request failed before its first token", exc_info=exc)
            raise failure(exc, self.admission.timeout_s) from None

    def close(self) -> None:
        """Done with this request (finished, failed or abandoned): the loop drops its row at the next step."""
        if not self._closed:
            self._closed = True
            self.request.cancelled.set()
            self.admission.active -= 1


def failure(exc: BaseException, timeout_s: float) -> APIError:
    """The OpenAI error for a request that failed after it started generating."""
    if isinstance(exc, DeadlineExceeded):
        return APIError(
            504,
            f"the request's {timeout_s:g}s deadline passed before the answer was complete",
            code="deadline_exceeded",
            kind="timeout_error",
        )
    return APIError(500, f"generation failed: {exc.__class__.__name__}", kind="server_error")

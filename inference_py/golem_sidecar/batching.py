"""Batching: requests for the same base wait in a bounded queue. The first one, and whatever
joins it within a short window, start a decode session on the model thread; that session keeps
taking requests from the queue between decode steps (continuous batching, scheduler.py) until
none are left.

The queue is the backpressure: when it is full a request is refused at once with
RESOURCE_EXHAUSTED and a retry hint, rather than waiting longer and longer.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import grpc

from golem_sidecar.errors import GolemError
from golem_sidecar.metrics import Arrival

log = logging.getLogger(__name__)


@dataclass(eq=False)
class Pending:
    """One request waiting for, or riding in, a batch."""

    spec: Any
    cancelled: threading.Event
    future: asyncio.Future[Any]
    on_text: Callable[[str], None] | None = None
    queued_at: int = field(default_factory=time.perf_counter_ns)
    # Time this request spent loading its base before it was queued.
    load_ns: int = 0
    # When its call arrived, for TakeExam and StreamExam (their time to first token).
    arrival: Arrival | None = None


@dataclass(frozen=True)
class BatchLimits:
    max_batch_size: int
    # How long the first request of a batch waits for company.
    batch_wait_s: float
    max_queue: int


def overloaded(queued: int) -> GolemError:
    return GolemError(
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "QUEUE_FULL",
        f"the model's queue is full ({queued} requests waiting); retry in a moment",
        retry_after_s=1.0,
    )


# Takes up to n queued requests; callable from any thread.
Take = Callable[[int], list[Pending]]


class BatchQueue:
    """The queue of one base model and the task that starts its decode sessions.

    Requests are put in on the event loop and taken out by the running session on the model
    thread, so the queue is a deque under a lock; an asyncio event wakes the loop's task when a
    request arrives while no session runs.
    """

    def __init__(
        self,
        limits: BatchLimits,
        run_session: Callable[[list[Pending], Take], Awaitable[None]],
    ) -> None:
        self._limits = limits
        self._run_session = run_session
        self._waiting: deque[Pending] = deque()
        self._lock = threading.Lock()
        self._arrived = asyncio.Event()
        # Rows of other work on this base (CompareAdapters) count against the same bound.
        self._reserved = 0
        self._busy = False
        self._task = asyncio.get_running_loop().create_task(self._serve())

    @property
    def idle(self) -> bool:
        """Nothing queued, reserved, gathering or running: the queue can go without losing
        work."""
        return not self._waiting and not self._reserved and not self._busy

    @property
    def depth(self) -> int:
        """Requests queued and not taken yet (a metrics scrape reads it from the loop)."""
        return len(self._waiting)

    def queued(self) -> list[Pending]:
        """A copy of the queued requests, first come first."""
        with self._lock:
            return list(self._waiting)

    def submit(self, pending: Pending) -> None:
        """Queues a request, or refuses it at once when the queue is full."""
        if len(self._waiting) + self._reserved >= self._limits.max_queue:
            raise overloaded(len(self._waiting) + self._reserved)
        with self._lock:
            self._waiting.append(pending)
        self._arrived.set()

    def take(self, count: int) -> list[Pending]:
        """Up to ``count`` queued requests, first come first; callers who left while queued
        are dropped on the way (nobody is there to answer)."""
        taken: list[Pending] = []
        with self._lock:
            while self._waiting and len(taken) < count:
                pending = self._waiting.popleft()
                if not pending.cancelled.is_set():
                    taken.append(pending)
        return taken

    @contextlib.contextmanager
    def reserve(self, rows: int) -> Iterator[None]:
        """Holds ``rows`` places of the bounded queue for work that runs outside it; refused
        at once (QUEUE_FULL) when they are not free."""
        waiting = len(self._waiting) + self._reserved
        if waiting + rows > self._limits.max_queue:
            raise overloaded(waiting)
        self._reserved += rows
        try:
            yield
        finally:
            self._reserved -= rows

    async def _arrival(self, timeout_s: float | None = None) -> bool:
        """Waits until a request is queued (True), or ``timeout_s`` passes (False)."""
        if self._waiting:
            return True
        # Only the loop's thread puts requests in, so none can slip in between the check above
        # and this clear.
        self._arrived.clear()
        try:
            await asyncio.wait_for(self._arrived.wait(), timeout_s)
        except TimeoutError:
            return False
        return True

    async def _gather(self) -> list[Pending]:
        """The requests a session starts with: those queued now, and those that arrive within
        the batch window while there is room (they would otherwise join a step later, after a
        prefill of their own)."""
        batch: list[Pending] = []
        deadline = asyncio.get_running_loop().time() + self._limits.batch_wait_s
        while len(batch) < self._limits.max_batch_size:
            batch += self.take(self._limits.max_batch_size - len(batch))
            remaining = deadline - asyncio.get_running_loop().time()
            if len(batch) >= self._limits.max_batch_size or remaining <= 0:
                break
            if not await self._arrival(remaining):
                break
        return batch

    async def _serve(self) -> None:
        while True:
            await self._arrival()
            # Busy from the first request taken: a batch still gathering holds requests that
            # are no longer in the queue, so the queue must not look idle (and be stopped).
            self._busy = True
            batch: list[Pending] = []
            try:
                batch = await self._gather()
                if batch:
                    await self._run_session(batch, self.take)
            except Exception as exc:  # one broken session must not stop the queue
                log.exception("batch failed")
                for pending in batch:
                    if not pending.future.done():
                        pending.future.set_exception(exc)
            finally:
                self._busy = False

    def stop(self) -> None:
        """Stops an idle queue's task (its base has gone; a new queue comes with a new base)."""
        self._task.cancel()

    async def close(self) -> None:
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task

"""Dynamic batching: requests for the same base wait a moment in a bounded queue, then are
answered together by one decode pass on the model thread.

The queue is the backpressure: when it is full a request is refused at once with
RESOURCE_EXHAUSTED and a retry hint, rather than waiting longer and longer.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import grpc

from golem_sidecar.errors import GolemError

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


class BatchQueue:
    """The queue of one base model and the task that turns it into batches."""

    def __init__(
        self,
        limits: BatchLimits,
        run_batch: Callable[[list[Pending]], Awaitable[None]],
    ) -> None:
        self._limits = limits
        self._run_batch = run_batch
        self._queue: asyncio.Queue[Pending] = asyncio.Queue(maxsize=limits.max_queue)
        # Rows of other work on this base (CompareAdapters) count against the same bound.
        self._reserved = 0
        self._busy = False
        self._task = asyncio.get_running_loop().create_task(self._serve())

    @property
    def idle(self) -> bool:
        """Nothing queued, reserved, gathering or running: the queue can go without losing
        work."""
        return self._queue.empty() and not self._reserved and not self._busy

    def submit(self, pending: Pending) -> None:
        """Queues a request, or refuses it at once when the queue is full."""
        if self._queue.qsize() + self._reserved >= self._limits.max_queue:
            raise overloaded(self._queue.qsize() + self._reserved)
        self._queue.put_nowait(pending)

    @contextlib.contextmanager
    def reserve(self, rows: int) -> Iterator[None]:
        """Holds ``rows`` places of the bounded queue for work that runs outside it; refused
        at once (QUEUE_FULL) when they are not free."""
        waiting = self._queue.qsize() + self._reserved
        if waiting + rows > self._limits.max_queue:
            raise overloaded(waiting)
        self._reserved += rows
        try:
            yield
        finally:
            self._reserved -= rows

    async def _gather(self, first: Pending) -> list[Pending]:
        batch = [first]
        deadline = asyncio.get_running_loop().time() + self._limits.batch_wait_s
        while len(batch) < self._limits.max_batch_size:
            # Whatever is already queued joins at once; then wait out the rest of the window.
            if not self._queue.empty():
                batch.append(self._queue.get_nowait())
                continue
            remaining = deadline - asyncio.get_running_loop().time()
            if remaining <= 0:
                break
            try:
                batch.append(await asyncio.wait_for(self._queue.get(), remaining))
            except TimeoutError:
                break
        # A caller who left while queued has nobody to answer.
        return [p for p in batch if not p.cancelled.is_set()]

    async def _serve(self) -> None:
        while True:
            first = await self._queue.get()
            # Busy from the first request taken: a batch still gathering holds requests that
            # are no longer in the queue, so the queue must not look idle (and be stopped).
            self._busy = True
            batch: list[Pending] = []
            try:
                batch = await self._gather(first)
                if batch:
                    await self._run_batch(batch)
            except Exception as exc:  # one broken batch must not stop the queue
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

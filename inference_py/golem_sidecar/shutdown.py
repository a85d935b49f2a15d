"""Graceful shutdown: once it begins, new calls are refused, calls in flight get the grace period
to finish, and those still running then end with UNAVAILABLE rather than a transport error."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Iterator
from typing import TypeVar

import grpc

from golem_sidecar.errors import GolemError

T = TypeVar("T")


def shutting_down(message: str) -> GolemError:
    """UNAVAILABLE, reason SHUTTING_DOWN: this sidecar is stopping; retry elsewhere or later."""
    return GolemError(grpc.StatusCode.UNAVAILABLE, "SHUTTING_DOWN", message)


class CallGate:
    """Counts the calls in flight and lets shutdown wait for them."""

    def __init__(self) -> None:
        self._open = True
        self._in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._expired = asyncio.Event()

    @contextlib.contextmanager
    def admit(self) -> Iterator[None]:
        """Holds one call in flight; refused (SHUTTING_DOWN) once shutdown has begun."""
        if not self._open:
            raise shutting_down("the sidecar is shutting down and takes no new calls")
        self._in_flight += 1
        self._idle.clear()
        try:
            yield
        finally:
            self._in_flight -= 1
            if self._in_flight == 0:
                self._idle.set()

    async def until_expiry(self, work: Awaitable[T]) -> T:
        """``work``'s result, unless the grace period ends first: then ``work`` is cancelled
        (which stops its generation at the next token) and the call ends with SHUTTING_DOWN."""
        task = asyncio.ensure_future(work)
        expiry = asyncio.ensure_future(self._expired.wait())
        try:
            await asyncio.wait({task, expiry}, return_when=asyncio.FIRST_COMPLETED)
            if task.done():
                return task.result()
            raise shutting_down(
                "the sidecar shut down before this call finished (limits.shutdownGraceMs)"
            )
        finally:
            expiry.cancel()
            # Also reached when the caller itself cancels: the work must not outlive its call,
            # and it has finished (its own clean-up run) before the caller's clean-up begins.
            if not task.done():
                task.cancel()
                await asyncio.wait({task})

    async def close(self, grace_s: float) -> int:
        """Refuses new calls and waits up to ``grace_s`` for those in flight; returns how many
        were still running and had to be ended."""
        self._open = False
        if not self._idle.is_set():
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._idle.wait(), grace_s)
        cut_short = self._in_flight
        if cut_short:
            self.expire()
            await self._idle.wait()
        return cut_short

    def expire(self) -> None:
        """Ends the grace period now (a second SIGTERM/SIGINT asks for this)."""
        self._expired.set()

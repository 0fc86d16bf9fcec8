"""Waiting for a condition, bounded: the one poll loop the tests share.

A test that must wait for something nothing pushes to it (a record's status, a process's
end, a line in a log) asks again until the answer holds or the bound passes; past the bound
it fails, saying what it waited for and what it saw last. Where an answer is pushed (a job's
events, `wait_for_job`), a test waits on that instead.

The bound is checked between tries: a try that began before it runs to its end (each one is
a call with its own timeout), and there is always one try at the bound itself, so a
condition that holds by then is never reported as a failure.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar, overload

__all__ = ["eventually", "eventually_sync"]

T = TypeVar("T")

# A description of what is awaited; a callable is read only at the failure (a log's text then).
What = str | Callable[[], str]

_NOTHING = object()
_SHOWN = 1500  # characters of the last value or error a failure shows


class _Tries:
    """The tries so far, and the failure they add up to once the bound has passed."""

    def __init__(
        self,
        condition: Callable[[], Any],
        timeout: float,
        what: What | None,
        until: Callable[[Any], object] | None,
    ) -> None:
        self.timeout = timeout
        self.bound = time.monotonic() + timeout
        self.what = what if what is not None else getattr(condition, "__qualname__", repr(condition))
        self.until = until
        self.count = 0
        self.last: Any = _NOTHING
        self.error: BaseException | None = None

    def holds(self, value: Any) -> bool:
        self.count += 1
        self.last, self.error = value, None
        return bool(self.until(value) if self.until is not None else value)

    def raised(self, exc: BaseException) -> None:
        self.count += 1
        self.last, self.error = _NOTHING, exc

    def pause(self, interval: float) -> float:
        """How long to wait before the next try; past the bound, the failure is raised."""
        left = self.bound - time.monotonic()
        if left <= 0:
            raise self.failure() from self.error
        return min(interval, left)

    def failure(self) -> AssertionError:
        what = self.what() if callable(self.what) else self.what
        seen = f"raised {self.error!r}" if self.error is not None else f"returned {self.last!r}"
        if len(seen) > _SHOWN:
            seen = seen[:_SHOWN] + " [...]"
        return AssertionError(f"waited {self.timeout:g} s for {what}, in vain: the last of {self.count} tries {seen}")


@overload
async def eventually(
    condition: Callable[[], Awaitable[T]],
    *,
    timeout: float,
    what: What | None = None,
    until: Callable[[T], object] | None = None,
    interval: float = 0.1,
    retry_on: tuple[type[BaseException], ...] = (),
) -> T: ...


@overload
async def eventually(
    condition: Callable[[], T],
    *,
    timeout: float,
    what: What | None = None,
    until: Callable[[T], object] | None = None,
    interval: float = 0.1,
    retry_on: tuple[type[BaseException], ...] = (),
) -> T: ...


async def eventually(
    condition: Callable[[], Any],
    *,
    timeout: float,
    what: What | None = None,
    until: Callable[[Any], object] | None = None,
    interval: float = 0.1,
    retry_on: tuple[type[BaseException], ...] = (),
) -> Any:
    """The first value of `condition()` (awaited when it is awaitable) that holds, tried every
    `interval` s for `timeout` s; past that, an AssertionError naming `what` and the last try.

    A value holds when `until(value)` is truthy, or without `until` when it is truthy itself.
    An exception of a type in `retry_on` counts as a try that did not hold; any other (an
    assertion inside the condition, say) ends the wait at once and fails the test.
    """
    tries = _Tries(condition, timeout, what, until)
    while True:
        try:
            value = condition()
            if inspect.isawaitable(value):
                value = await value
        except retry_on as exc:
            tries.raised(exc)
        else:
            if tries.holds(value):
                return value
        await asyncio.sleep(tries.pause(interval))


def eventually_sync(
    condition: Callable[[], T],
    *,
    timeout: float,
    what: What | None = None,
    until: Callable[[T], object] | None = None,
    interval: float = 0.1,
    retry_on: tuple[type[BaseException], ...] = (),
) -> T:
    """`eventually` for a test with no event loop: the same tries, sleeping the thread between them."""
    tries = _Tries(condition, timeout, what, until)
    while True:
        try:
            value = condition()
        except retry_on as exc:
            tries.raised(exc)
        else:
            if inspect.isawaitable(value):
                raise TypeError(f"eventually_sync was given an awaitable condition {condition!r}: use eventually")
            if tries.holds(value):
                return value
        time.sleep(tries.pause(interval))

"""Waiting on a condition with a bound: the one way tests wait."""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

T = TypeVar("T")


async def eventually(
    condition: Callable[[], T | Awaitable[T]], *, timeout: float, interval: float = 0.05, what: str = ""
) -> T:
    """Poll `condition` until it returns something truthy, and return that; fail after `timeout`
    seconds, saying what was awaited and the last value or error seen."""
    deadline = time.monotonic() + timeout
    last: object = None
    while True:
        try:
            value = condition()
            if inspect.isawaitable(value):
                value = await value
            last = value
            if value:
                return value  # type: ignore[return-value]
        except AssertionError as exc:
            last = exc
        if time.monotonic() >= deadline:
            raise AssertionError(f"not within {timeout:g} s: {what or condition!r} (last: {last!r})")
        await asyncio.sleep(interval)

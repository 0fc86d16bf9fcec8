"""The tests' one poll loop: it returns what held, and fails saying what it waited for and saw."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import pytest

from .waiting import eventually, eventually_sync


def answers(*values: object) -> Iterator[object]:
    yield from values
    while True:
        yield values[-1]


async def test_returns_the_first_value_that_holds() -> None:
    seen = answers(0, None, "", 3, 4)
    assert await eventually(lambda: next(seen), timeout=5, interval=0) == 3


async def test_awaits_an_async_condition_and_applies_until() -> None:
    seen = iter(range(1, 100))

    async def read() -> int:
        return next(seen)

    assert await eventually(read, until=lambda n: n >= 3, timeout=5, interval=0) == 3


async def test_fails_past_the_bound_naming_what_and_the_last_value() -> None:
    started = time.monotonic()
    with pytest.raises(AssertionError) as failure:
        await eventually(lambda: "not yet", until=lambda v: v == "done", timeout=0.3, what="the answer", interval=0.05)
    assert 0.3 <= time.monotonic() - started < 5
    message = str(failure.value)
    assert "waited 0.3 s for the answer" in message and "returned 'not yet'" in message


async def test_a_description_given_as_a_callable_is_read_at_the_failure() -> None:
    log = ["starting"]

    def grow() -> bool:
        log.append("still starting")
        return False

    with pytest.raises(AssertionError, match=r"the log: \d+ lines"):
        await eventually(grow, timeout=0.1, what=lambda: f"the log: {len(log)} lines", interval=0.02)


async def test_retries_the_named_errors_and_reports_the_last() -> None:
    seen = answers(ConnectionError("first"), ConnectionError("second"), "up")

    def connect() -> object:
        value = next(seen)
        if isinstance(value, Exception):
            raise value
        return value

    assert await eventually(connect, timeout=5, interval=0, retry_on=(ConnectionError,)) == "up"
    with pytest.raises(AssertionError, match=r"raised ConnectionError\('down'\)") as failure:
        await eventually(_raise(ConnectionError("down")), timeout=0.1, interval=0.02, retry_on=(ConnectionError,))
    assert isinstance(failure.value.__cause__, ConnectionError)


async def test_any_other_error_ends_the_wait_at_once() -> None:
    started = time.monotonic()
    with pytest.raises(ValueError, match="broken"):
        await eventually(_raise(ValueError("broken")), timeout=30, retry_on=(ConnectionError,))
    assert time.monotonic() - started < 5


async def test_a_condition_that_holds_only_at_the_bound_still_passes() -> None:
    bound = time.monotonic() + 0.3
    assert await eventually(lambda: time.monotonic() >= bound, timeout=0.3, interval=10) is True


def test_the_sync_variant_waits_the_same_way() -> None:
    seen = answers(None, None, "ready")
    assert eventually_sync(lambda: next(seen), timeout=5, interval=0) == "ready"
    with pytest.raises(AssertionError, match=r"for the flag, in vain: the last of \d+ tries returned False"):
        eventually_sync(lambda: False, timeout=0.1, what="the flag", interval=0.02)
    with pytest.raises(TypeError, match="use eventually"):
        eventually_sync(_awaitable, timeout=1)


def _raise(exc: Exception) -> Callable[[], object]:
    def condition() -> object:
        raise exc

    return condition


async def _ready() -> bool:
    return True


def _awaitable() -> object:
    coroutine = _ready()
    coroutine.close()  # never awaited: only its kind matters here
    return coroutine

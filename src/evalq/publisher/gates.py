"""`client.gates`: a team's stored gate policies, and verdicts on its jobs.

await client.gates.set("release", {"rules": [{"metric": "mmmu_val/mmmu_acc", "max_drop": 0.01}]})
accepted = await client.submit(model=..., tasks=[...], gate="release", labels={"run": "r1", "step": "2000"})
verdict = await client.gates.wait(accepted.job_id)   # after the job completes
if verdict.verdict == "NO-GO": ...
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import tomllib
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar, cast

from ..errors import ConfigError, Timeout
from ..schemas import Event, Gated, GatePolicy, GatesReply, Verdict, encode

__all__ = ["Gates", "read_policy"]

T = TypeVar("T")
Ask = Callable[[str, type[T], bytes], Awaitable[T]]
Events = Callable[..., AsyncIterator[Event]]


def read_policy(path: str | Path) -> dict[str, Any]:
    """A policy file, TOML (`.toml`) or JSON, as the gateway will validate it."""
    file = Path(path)
    try:
        text = file.read_text()
    except OSError as exc:
        raise ConfigError(f"{file} cannot be read: {exc.strerror or exc}") from None
    try:
        data = tomllib.loads(text) if file.suffix == ".toml" else json.loads(text)
    except (tomllib.TOMLDecodeError, ValueError) as exc:
        raise ConfigError(f"{file} is not valid {'TOML' if file.suffix == '.toml' else 'JSON'}: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{file} holds no policy table")
    return data


class Gates:
    def __init__(self, ask: Ask[Any], events: Events) -> None:
        self._ask = ask
        self._events = events

    async def set(self, name: str, policy: GatePolicy | dict[str, Any]) -> GatePolicy:
        """Store `policy` as the team's `name` (replacing one of that name); returns it as stored."""
        reply: GatesReply = await self._ask("gate", GatesReply, encode({"op": "set", "name": name, "policy": policy}))
        return reply.policies[name]

    async def get(self, name: str) -> GatePolicy:
        """The team's policy `name`; InvalidField (422) when there is none."""
        reply: GatesReply = await self._ask("gate", GatesReply, encode({"op": "get", "name": name}))
        return reply.policies[name]

    async def list(self) -> dict[str, GatePolicy]:
        """The team's policies by name."""
        reply: GatesReply = await self._ask("gate", GatesReply, encode({"op": "list"}))
        return reply.policies

    async def check(self, job_id: str, *, policy: str | None = None, baseline: str | None = None) -> Verdict:
        """The completed job's verdict: its stored one, or computed now under `policy` and
        against `baseline` (`previous`, `best` or a job id) where either is named."""
        body = {"op": "check", "job_id": job_id, "policy": policy, "baseline": baseline}
        reply: Verdict = await self._ask("gate", Verdict, encode({k: v for k, v in body.items() if v is not None}))
        return reply

    async def wait(self, job_id: str, timeout: float | None = None) -> Verdict:
        """The job's verdict once its gate has judged it (its `gated` event); Timeout past `timeout`."""
        stored = cast(AsyncGenerator[Event, None], self._events(job_id, "gated", history=True))
        try:
            async with asyncio.timeout(timeout), contextlib.aclosing(stored):
                async for event in stored:
                    if isinstance(event, Gated):
                        return event.verdict
        except TimeoutError:
            raise Timeout(f"no verdict on job {job_id} within {timeout} s") from None
        raise Timeout(f"the events of job {job_id} ended before its verdict")

"""Lowering a pool's ack_wait under running jobs without losing them.

A worker renews the message in hand every quarter of the ack_wait it knows. Were the server
to apply a lower value first, a worker still at the old pace would fall silent for longer
than the new value allows, and its job would start a second time elsewhere. So `evalq setup`
changes it in two steps (`Topology.apply`): it marks the consumer with the value it is about
to apply (`topology.LOWERING`), then announces it on the pool's `ack_wait_subject`; each
worker renews its message at once, switches to the new pace, and answers (`Confirmation`).
Only when every worker the registry lists as running a job has answered is the consumer
updated; otherwise nothing changes and `Unconfirmed` names the silent workers and their jobs.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Mapping

import msgspec
from nats.aio.client import Client
from nats.aio.msg import Msg

from .errors import Unconfirmed
from .registry import Registry
from .schemas import Announcement, Confirmation, WorkerInfo, decode
from .topology import Topology

__all__ = ["confirm_lowering"]

log = logging.getLogger("evalq.renewal")


async def confirm_lowering(
    nc: Client,
    topology: Topology,
    lowering: Mapping[str, float],
    *,
    timeout: float,
    domain: str | None = None,
    force: bool = False,
) -> None:
    """Announce each pool's lower ack_wait and wait, up to `timeout`, for the answers.

    Done early once every worker the registry lists in those pools has confirmed and as many
    holders have as the consumers had messages pending (so a worker that runs jobs before it
    is listed gets its turn too). Then every worker listed as running a job, before or after
    the wait, must have confirmed, else `Unconfirmed` (with `force`, a warning).
    """
    js = nc.jetstream(timeout=timeout, domain=domain)
    kv = await js.key_value(topology.workers_bucket)
    listed = [w for w in await Registry.read(kv) if w.pool in lowering]
    pending = 0
    for pool in lowering:
        for stream in (topology.work_stream(pool), topology.pieces_stream(pool)):
            pending += (await js.consumer_info(stream, topology.consumer)).num_ack_pending or 0
    answers: dict[str, Confirmation] = {}
    answered = asyncio.Event()

    def confirmed(worker: WorkerInfo) -> bool:
        answer = answers.get(worker.worker_id)
        return answer is not None and answer.ack_wait <= lowering[worker.pool] + 1e-6

    def everyone() -> bool:
        holders = sum(1 for answer in answers.values() if answer.holding)
        return holders >= pending and all(confirmed(w) for w in listed)

    async def on_answer(msg: Msg) -> None:
        try:
            answer = decode(msg.data, Confirmation)
        except ValueError as exc:
            log.warning("an unreadable confirmation: %s", exc)
            return
        answers[answer.worker_id] = answer
        if everyone():
            answered.set()

    inbox = nc.new_inbox()
    sub = await nc.subscribe(inbox, cb=on_answer)
    try:
        for pool, ack_wait in lowering.items():
            body = msgspec.json.encode(Announcement(pool=pool, ack_wait=ack_wait))
            await nc.publish(topology.ack_wait_subject(pool), body, reply=inbox)
        await nc.flush(timeout=max(1, round(timeout)))
        if not everyone():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(answered.wait(), timeout)
        # A job started while the announcement went out: its worker must have answered too.
        later = [w for w in await Registry.read(kv) if w.pool in lowering]
    finally:
        with contextlib.suppress(Exception):
            await sub.unsubscribe()
    running = {w.worker_id: w for w in [*listed, *later] if w.current_job}
    silent = sorted((w for w in running.values() if not confirmed(w)), key=lambda w: w.worker_id)
    if not silent:
        return
    named = "; ".join(f"worker {w.worker_id} (pool {w.pool}, job {w.current_job})" for w in silent)
    if force:
        log.warning("lowering ack_wait although these did not confirm it (--force): %s", named)
        return
    raise Unconfirmed(
        f"ack_wait not changed: {len(silent)} worker(s) running a job did not confirm the lower value "
        f"within {timeout:g} s: {named}. A worker that stopped leaves the registry within three heartbeats; "
        "retry then, or use --force (their jobs may then run twice)"
    )

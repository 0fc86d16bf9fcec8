"""Publishing status events to `<prefix>.events.<team>.<job_id>.<type>` in the events stream.

The team token comes from the event itself (its job's team), so that the server can export to
each account only the subjects under its own team.
"""

from __future__ import annotations

from collections.abc import Callable

from nats.aio.client import Client

from . import jetstream
from .schemas import TERMINAL_EVENTS, Event, encode, event_type
from .topology import Topology

__all__ = ["EventPublisher"]


class EventPublisher:
    def __init__(
        self,
        nc: Client,
        topology: Topology,
        *,
        timeout: float,
        domain: str | None = None,
        observe: Callable[[Event], None] | None = None,
    ) -> None:
        self.nc = nc
        # Told of every event written (metrics.py counts them).
        self.observe = observe
        self.js = nc.jetstream(timeout=timeout, domain=domain)
        self.topology = topology
        self.timeout = timeout

    def write(self, event: Event) -> jetstream.Write:
        kind = event_type(event)
        if self.observe is not None:
            self.observe(event)
        headers = None
        if isinstance(event, TERMINAL_EVENTS):
            # A worker that re-sends a terminal event after a crash is deduplicated by the stream.
            headers = {"Nats-Msg-Id": f"{event.job_id}.terminal"}
        elif kind in ("queued", "gated"):
            headers = {"Nats-Msg-Id": f"{event.job_id}.{kind}"}
        return jetstream.Write(
            self.topology.event_subject(event.job_id, str(kind), team=event.team),
            encode(event),
            headers,
            stream=self.topology.events_stream,
        )

    async def publish(self, event: Event) -> None:
        await jetstream.publish(self.nc, self.write(event), timeout=self.timeout)

"""Publishing status events to `<prefix>.events.<job_id>.<type>` in the events stream."""

from __future__ import annotations

from nats.js import JetStreamContext

from .schemas import TERMINAL_EVENTS, Event, encode
from .topology import Topology

__all__ = ["EventPublisher"]


class EventPublisher:
    def __init__(self, js: JetStreamContext, topology: Topology) -> None:
        self.js = js
        self.topology = topology

    async def publish(self, event: Event) -> None:
        kind = type(event).__struct_config__.tag  # type: ignore[attr-defined]
        headers = None
        if isinstance(event, TERMINAL_EVENTS):
            # A worker that re-sends a terminal event after a crash is deduplicated by the stream.
            headers = {"Nats-Msg-Id": f"{event.job_id}.terminal"}
        elif kind == "queued":
            headers = {"Nats-Msg-Id": f"{event.job_id}.{kind}"}
        await self.js.publish(
            self.topology.event_subject(event.job_id, str(kind)),
            encode(event),
            stream=self.topology.events_stream,
            headers=headers,
        )

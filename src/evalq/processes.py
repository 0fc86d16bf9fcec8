"""Running the services as processes: `evalq gateway`, `evalq worker`, `evalq up`.

Each lifecycle is an async context manager; these functions add the process concerns:
signals (SIGTERM/SIGINT stop taking work, finish or hand back what is in flight, then
drain the connection) and, for `up`, the embedded nats-server.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Callable

from .config import Settings
from .connection import connect
from .embedded import EmbeddedServer

__all__ = ["on_signals", "run_gateway", "run_up", "run_worker"]

log = logging.getLogger("evalq")


def on_signals(stop: Callable[[], None]) -> Callable[[], None]:
    loop = asyncio.get_running_loop()
    sigs = (signal.SIGTERM, signal.SIGINT)
    for sig in sigs:
        loop.add_signal_handler(sig, stop)

    def remove() -> None:
        for sig in sigs:
            loop.remove_signal_handler(sig)

    return remove


async def run_gateway(settings: Settings, ready: Callable[[], None] | None = None) -> None:
    from .gateway import Gateway

    nc = await connect(settings, name="evalq-gateway")
    stopped = asyncio.Event()
    remove = on_signals(stopped.set) if settings.handle_signals else (lambda: None)
    try:
        async with Gateway(nc, settings):
            if ready:
                ready()
            await stopped.wait()
    finally:
        remove()
        with contextlib.suppress(Exception):
            await nc.drain()


async def run_worker(settings: Settings, ready: Callable[[], None] | None = None) -> None:
    from .worker import Worker

    nc = await connect(settings, name="evalq-worker")
    try:
        async with Worker(nc, settings) as worker:
            if ready:
                ready()
            await worker.run()
    finally:
        with contextlib.suppress(Exception):
            await nc.drain()


async def run_up(settings: Settings, port: int = 4222, ready: Callable[[str], None] | None = None) -> None:
    """Embedded nats-server, a gateway and a worker, in one process, for one machine."""
    from .gateway import Gateway
    from .worker import Worker

    server = EmbeddedServer(settings.home_path / "nats", port=port)
    async with server:
        local = settings.with_(nats_url=[server.url], handle_signals=False)
        gateway_nc = await connect(local, name="evalq-gateway")
        worker_nc = await connect(local, name="evalq-worker")
        try:
            async with Gateway(gateway_nc, local), Worker(worker_nc, local) as worker:
                remove = on_signals(worker.request_stop) if settings.handle_signals else (lambda: None)
                try:
                    if ready:
                        ready(server.url)
                    await worker.run()
                finally:
                    remove()
        finally:
            for nc in (worker_nc, gateway_nc):
                with contextlib.suppress(Exception):
                    await nc.drain()

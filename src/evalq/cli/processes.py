"""Running the services as processes: `evalq gateway`, `evalq worker`, `evalq ui`, `evalq up`.

Each lifecycle is an async context manager; these functions add the process concerns:
signals (SIGTERM/SIGINT stop taking work, finish or hand back what is in flight, then
drain the connection) and, for `up`, the embedded nats-server and the web process.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry

from ..config import Settings
from ..connection import connect
from ..embedded import EmbeddedServer
from ..errors import ConfigError
from ..gateway import Gateway
from ..metrics import MetricsServer
from ..publisher import AsyncClient
from ..web import TokenGate, WebServer, check_exposure
from ..webguard import is_loopback

__all__ = ["on_signals", "run_gateway", "run_mcp", "run_ui", "run_up", "run_worker"]

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


def metrics_port(
    settings: Settings, registries: list[CollectorRegistry], ready: Callable[[], bool]
) -> contextlib.AbstractAsyncContextManager[object]:
    """The process's metrics, health and readiness port, when `metrics_port` is set."""
    port = settings.connection.metrics_port
    if port is None:
        return contextlib.nullcontext()
    return MetricsServer(registries, host=settings.connection.metrics_host, port=port, ready=ready)


async def run_gateway(settings: Settings, ready: Callable[[], None] | None = None) -> None:
    nc = await connect(settings, name="evalq-gateway")
    stopped = asyncio.Event()
    remove = on_signals(stopped.set) if settings.handle_signals else (lambda: None)
    try:
        async with (
            Gateway(nc, settings) as gateway,
            metrics_port(settings, [gateway.metrics.registry], lambda: gateway.ready),
        ):
            if ready:
                ready()
            await stopped.wait()
    finally:
        remove()
        with contextlib.suppress(Exception):
            await nc.drain()


async def run_worker(settings: Settings, ready: Callable[[str], None] | None = None) -> None:
    """A worker until a signal stops it; `ready` gets its id once it takes jobs."""
    from ..worker import Worker

    nc = await connect(settings, name="evalq-worker")
    try:
        async with (
            Worker(nc, settings) as worker,
            metrics_port(settings, [worker.metrics.registry], lambda: nc.is_connected and not worker.stopping),
        ):
            if ready:
                ready(worker.worker_id)
            await worker.run()
    finally:
        with contextlib.suppress(Exception):
            await nc.drain()


async def run_ui(settings: Settings, ready: Callable[[str], None] | None = None) -> None:
    """The web process alone, in front of a queue that runs elsewhere."""
    check_exposure(settings.ui)  # before connecting: a refusal is about this process's own flags
    nc = await connect(settings, name="evalq-web")
    stopped = asyncio.Event()
    remove = on_signals(stopped.set) if settings.handle_signals else (lambda: None)
    try:
        async with (
            WebServer(settings, AsyncClient(settings, nc=nc)) as web,
            metrics_port(settings, [web.metrics.registry], lambda: nc.is_connected),
        ):
            if ready:
                ready(web.url)
            done = asyncio.ensure_future(web.wait())
            stop = asyncio.ensure_future(stopped.wait())
            await asyncio.wait({done, stop}, return_when=asyncio.FIRST_COMPLETED)
            stop.cancel()
            if done.done():
                done.result()
    finally:
        remove()
        with contextlib.suppress(Exception):
            await nc.drain()


async def run_mcp(settings: Settings, transport: str, host: str, port: int, token: str | None) -> None:
    """`evalq mcp`: the MCP server over stdio (for an agent that starts it) or streamable HTTP."""
    from ..mcp_tools import create_server

    server = create_server(settings, host=host, port=port)
    if transport == "stdio":
        await server.run_stdio_async()
        return
    import uvicorn

    if not is_loopback(host) and not token:
        raise ConfigError(f"evalq mcp on {host} (off loopback) needs --token: whoever reaches it could submit jobs")
    app: Any = server.streamable_http_app()
    if token:
        app = TokenGate(app, token)
    config = uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="on", server_header=False)
    await uvicorn.Server(config).serve()


async def run_up(
    settings: Settings,
    port: int = 4222,
    ready: Callable[[str], None] | None = None,
    *,
    web_ready: Callable[[str], None] | None = None,
    web: bool = True,
) -> None:
    """Embedded nats-server, a gateway, a worker and (with `web`) the web process, in one process.

    The web process takes a free port when its own is in use, so two `evalq up` on one
    machine both start; `web_ready` gets its URL, before `ready` gets the server's.
    """
    from ..worker import Worker

    if web:
        check_exposure(settings.ui)
    server = EmbeddedServer(settings.home_path / "nats", port=port)
    async with server:
        local = settings.with_(nats_url=[server.url], handle_signals=False)
        gateway_nc = await connect(local, name="evalq-gateway")
        worker_nc = await connect(local, name="evalq-worker")
        web_nc = await connect(local, name="evalq-web") if web else None
        try:
            async with contextlib.AsyncExitStack() as stack:
                gateway = await stack.enter_async_context(Gateway(gateway_nc, local))
                worker = await stack.enter_async_context(Worker(worker_nc, local))
                registries = [gateway.metrics.registry, worker.metrics.registry]
                if web_nc is not None:
                    server_web = await stack.enter_async_context(
                        WebServer(local, AsyncClient(local, nc=web_nc), fallback_port=True)
                    )
                    registries.append(server_web.metrics.registry)
                    if web_ready:
                        web_ready(server_web.url)
                await stack.enter_async_context(metrics_port(local, registries, lambda: gateway.ready))
                remove = on_signals(worker.request_stop) if settings.handle_signals else (lambda: None)
                try:
                    if ready:
                        ready(server.url)
                    await worker.run()
                finally:
                    remove()
        finally:
            for nc in (web_nc, worker_nc, gateway_nc):
                if nc is not None:
                    with contextlib.suppress(Exception):
                        await nc.drain()

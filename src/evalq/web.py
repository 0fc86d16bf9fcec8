"""The web process: one HTTP server (`evalq ui`, or inside `evalq up`) for what evalq serves over HTTP.

It serves the dashboard (`dashboard.py`: pages, their JSON and one server-sent-events feed),
and lmms-eval's server API (`lmms_api.py`) when `lmms_eval_api` is on.
It holds no job state: every answer comes from the gateway and the object store over NATS,
through one `AsyncClient`, so any number of web processes can run behind a load balancer.

The auth rule: bound to loopback, no credentials are needed (whoever can reach the port is
on the machine already); bound to anything else, a token is required, or the process
refuses to start. A configured token is required on loopback too. The token is accepted as
HTTP Bearer, or as the password of HTTP Basic (any user name), so
`http://user:TOKEN@host:8642` works with any client that sends URL credentials (httpx does).
Read-only by default: the only routes that change anything (submit and cancel) are the
lmms-eval API's, served only when it is turned on, and the dashboard's cancel, served only
with `ui_allow_cancel`. Ahead of the auth rule, `webguard.RequestGuard` refuses what a web page
elsewhere could make a browser send: another site's Host name, and cross-site or non-JSON writes.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import errno
import hmac
import logging
import socket
from collections.abc import Iterator
from types import TracebackType
from typing import TYPE_CHECKING, Any

import msgspec

from . import __version__
from .config import Settings, UiSettings
from .errors import ConfigError, EvalqError
from .metrics import WebMetrics
from .webguard import RequestGuard, is_loopback, public_url

if TYPE_CHECKING:
    from starlette.applications import Starlette
    from starlette.types import ASGIApp, Receive, Scope, Send

    from .publisher import AsyncClient

__all__ = ["WebServer", "check_exposure", "create_app", "is_loopback"]

log = logging.getLogger("evalq.web")


def check_exposure(ui: UiSettings) -> None:
    """Refuse to serve off loopback without a token: the API submits and cancels jobs."""
    if not is_loopback(ui.ui_host) and not ui.ui_token:
        raise ConfigError(
            f"the web process binds {ui.ui_host}, not loopback, so it needs a token: "
            "pass --token or set EVALQ_UI_TOKEN (clients use http://user:TOKEN@host:port)"
        )


class TokenGate:
    """ASGI middleware: every HTTP request carries the token (Bearer, or Basic's password), or gets 401."""

    def __init__(self, app: ASGIApp, token: str) -> None:
        self.app = app
        self.token = token.encode()

    def _allowed(self, authorization: bytes) -> bool:
        scheme, _, value = authorization.partition(b" ")
        scheme = scheme.lower()
        if scheme == b"bearer":
            given = value.strip()
        elif scheme == b"basic":
            try:
                given = base64.b64decode(value.strip(), validate=True).partition(b":")[2]
            except ValueError:
                return False
        else:
            return False
        return hmac.compare_digest(given, self.token)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] in ("http", "websocket"):
            headers = dict(scope.get("headers") or [])
            if not self._allowed(headers.get(b"authorization", b"")):
                from starlette.responses import JSONResponse

                response = JSONResponse(
                    {"detail": "Not authenticated: this evalq web process requires its token"},
                    status_code=401,
                    headers={"WWW-Authenticate": 'Basic realm="evalq", charset="UTF-8"'},
                )
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


class CountRequests:
    """ASGI middleware: each HTTP request counted by its route's first path segment and status
    code. A segment no route starts with is `other`, whatever answered it (a refused request
    never reaches the routes), so the label stays bounded."""

    def __init__(self, app: ASGIApp, metrics: WebMetrics, known: frozenset[str]) -> None:
        self.app = app
        self.metrics = metrics
        self.known = known

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = [500]

        async def sending(message: Any) -> None:
            if message["type"] == "http.response.start":
                status[0] = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            first = "/" + str(scope.get("path", "/")).strip("/").split("/", 1)[0]
            route = first if first in self.known and status[0] != 404 else "other"
            self.metrics.requests.labels(route, str(status[0])).inc()


def create_app(client: AsyncClient, ui: UiSettings, metrics: WebMetrics | None = None) -> Starlette:
    """The web process's app; each feature adds its routes here. `ui.ui_port` is the port it
    is served on: the Host check and the result URLs are built from it."""
    from starlette.applications import Starlette
    from starlette.middleware import Middleware
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from starlette.routing import BaseRoute, Route

    async def index(request: Request) -> JSONResponse:
        return JSONResponse({"service": "evalq", "version": __version__, "lmms_eval_api": ui.lmms_eval_api})

    from .dashboard import dashboard_routes

    # The dashboard's pages first: a browser asking `/` or `/jobs/<id>` gets a page, a script the JSON behind.
    routes: list[BaseRoute] = [*dashboard_routes(client, ui), Route("/", index, methods=["GET"])]
    if ui.lmms_eval_api:
        from .lmms_api import lmms_eval_routes

        routes += lmms_eval_routes(client, public_url(ui))
    known = frozenset("/" + str(getattr(r, "path", "")).strip("/").split("/", 1)[0] for r in routes)
    middleware = [Middleware(CountRequests, metrics=metrics, known=known)] if metrics is not None else []
    middleware.append(Middleware(RequestGuard, ui=ui))
    if ui.ui_token:
        middleware.append(Middleware(TokenGate, token=ui.ui_token))
    return Starlette(routes=routes, middleware=middleware)


def _bind(host: str, port: int, fallback: bool) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        try:
            sock.bind((host.strip("[]"), port))
        except OSError as exc:
            if not (fallback and port and exc.errno == errno.EADDRINUSE):
                raise ConfigError(f"the web process cannot listen on {host}:{port}: {exc.strerror or exc}") from None
            log.warning("port %d is in use; the web process takes a free one", port)
            sock.bind((host.strip("[]"), 0))
        sock.listen(2048)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def _quiet_server(config: Any) -> Any:
    import uvicorn

    class QuietServer(uvicorn.Server):
        """uvicorn's server without its signal handlers: the process's own lifecycle owns those."""

        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            yield

    return QuietServer(config)


class WebServer:
    """The web process's HTTP server, as an async context manager: serving inside the block.

    `fallback_port` takes a free port when the configured one is in use (what `evalq up`
    does, so that two of them on one machine both start); `url` says where it listens.
    """

    def __init__(self, settings: Settings, client: AsyncClient, *, fallback_port: bool = False) -> None:
        self.ui = settings.ui
        self.client = client
        self.fallback_port = fallback_port
        self.url = ""
        self.metrics = WebMetrics()
        self._server: Any = None
        self._task: asyncio.Task[None] | None = None
        self._socket: socket.socket | None = None

    async def __aenter__(self) -> WebServer:
        import uvicorn

        check_exposure(self.ui)
        self._socket = _bind(self.ui.ui_host, self.ui.ui_port, self.fallback_port)
        host, port = self._socket.getsockname()[:2]
        shown = f"[{host}]" if ":" in host else host
        self.url = f"http://{shown}:{port}"
        # The port bound, not the one asked for (0, or taken): the Host check needs the real one.
        app = create_app(self.client, msgspec.structs.replace(self.ui, ui_port=port), self.metrics)
        # The dashboard's event streams never end on their own: a stop waits that long for them.
        config = uvicorn.Config(
            app,
            log_level="warning",
            access_log=False,
            lifespan="off",
            server_header=False,
            timeout_graceful_shutdown=2,
        )
        self._server = _quiet_server(config)
        self._task = asyncio.create_task(self._server.serve(sockets=[self._socket]))
        while not self._server.started:
            if self._task.done():
                self._socket.close()
                self._task.result()
                raise EvalqError(f"the web process stopped before serving on {self.url}")
            await asyncio.sleep(0.01)  # uvicorn sets `started` and has no event to wait on
        return self

    async def wait(self) -> None:
        """Until the server stops (it stops on its own only on an error)."""
        if self._task is not None:
            await asyncio.shield(self._task)

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self._task is not None:
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await asyncio.wait_for(self._task, 10)
        if self._socket is not None:
            self._socket.close()

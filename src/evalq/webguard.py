"""The web process's defences against web pages elsewhere: what it refuses before any route runs,
and how it sends what a browser must never render (`artifact_response`).

A page on any site can make its visitor's browser send requests to this process's port, and on
loopback no token stands in the way (`web.py`'s auth rule: whoever reaches the port is on the
machine). So, for every route:

- `Host` must name this process (`Hosts`): its bind address, plus `localhost`, `127.0.0.1` and
  `[::1]` on loopback, plus `ui_allowed_hosts` and `ui_public_url`'s host; else 400. An attacker's
  name pointed at 127.0.0.1 after its page loaded (DNS rebinding) makes that page same-origin with
  this process, so the browser would let it read every answer; the Host it sends is still the
  attacker's name.
- A request that changes state (any method but GET, HEAD, OPTIONS) must come from this origin or
  from no page at all: an `Origin` other than this process's own, or, without one, a
  `Sec-Fetch-Site` of `cross-site` or `same-site` (another port of localhost is the same site) is
  403. Clients that are not browsers (curl, the SDK, lmms-eval's `EvalClient`) send neither.
- Its body, if any, must be `application/json`, else 415: an HTML form can send only
  `text/plain`, `application/x-www-form-urlencoded` and `multipart/form-data`, a `no-cors` fetch
  those or no type at all, and a JSON body from another origin needs a CORS preflight, which
  this process never answers.

Result URLs are built from `public_url`, never from the request's Host.
"""

from __future__ import annotations

import ipaddress
import re
import socket
from dataclasses import dataclass
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

if TYPE_CHECKING:
    from starlette.responses import Response
    from starlette.types import ASGIApp, Receive, Scope, Send

    from .config import UiSettings
    from .publisher import Artifact

__all__ = [
    "Hosts",
    "RequestGuard",
    "allowed_hosts",
    "artifact_response",
    "configured_hosts",
    "is_loopback",
    "public_url",
]

SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
_HOST = re.compile(r"(\[[0-9a-f:.]+\]|[a-z0-9_.\-]+)(?::([0-9]{1,5}))?")
_LOOPBACK_NAMES = ("localhost", "127.0.0.1", "[::1]")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything


def _is_everywhere(host: str) -> bool:
    """`0.0.0.0`, `::`: bound to every address of the machine."""
    try:
        return ipaddress.ip_address(host.strip("[]")).is_unspecified
    except ValueError:
        return False


def _is_address(name: str) -> bool:
    try:
        ipaddress.ip_address(name.strip("[]"))
    except ValueError:
        return False
    return True


def _split(host: str) -> tuple[str, str] | None:
    """A Host value as (name, port), lowercased, port "" when absent; None when it is not one."""
    match = _HOST.fullmatch(host.lower())
    if match is None:
        return None
    return match.group(1), match.group(2) or ""


def _shown(host: str) -> str:
    """A bind address as a Host header or a URL writes it: an IPv6 address in brackets."""
    bare = host.strip("[]").lower()
    return f"[{bare}]" if ":" in bare else bare


@dataclass(frozen=True)
class Hosts:
    """The Host values a process answers: (name, port) pairs, names at any port, and, bound to
    every address, any IP address literal (no DNS answer can rebind a literal)."""

    pairs: frozenset[tuple[str, str]] = frozenset()
    names: frozenset[str] = frozenset()
    any_address: bool = False

    def admit(self, host: str) -> bool:
        split = _split(host)
        if split is None:
            return False
        name, _ = split
        return split in self.pairs or name in self.names or (self.any_address and _is_address(name))


def configured_hosts(ui: UiSettings) -> Hosts:
    """The names the settings vouch for: `ui_allowed_hosts` and `ui_public_url`'s host."""
    entries = [*ui.ui_allowed_hosts]
    if ui.ui_public_url:
        entries.append(urlsplit(ui.ui_public_url).netloc)
    pairs, names = set(), set()
    for entry in entries:
        split = _split(entry)
        if split is None:
            continue  # the settings' patterns let no such entry through
        if split[1]:
            pairs.add(split)
        else:
            names.add(split[0])
    return Hosts(frozenset(pairs), frozenset(names))


def allowed_hosts(ui: UiSettings) -> Hosts:
    """What a process bound to `ui.ui_host` and `ui.ui_port` answers, with the configured names."""
    if _is_everywhere(ui.ui_host):
        here = {"localhost", socket.gethostname().lower()}
    elif is_loopback(ui.ui_host):
        here = {_shown(ui.ui_host), *_LOOPBACK_NAMES}
    else:
        here = {_shown(ui.ui_host)}
    # A browser leaves the port out of Host when it is the scheme's default.
    port = ui.ui_port
    ports = {str(port), ""} if port == 80 else {str(port)}
    configured = configured_hosts(ui)
    return Hosts(
        configured.pairs | {(name, p) for name in here for p in ports},
        configured.names,
        any_address=_is_everywhere(ui.ui_host),
    )


def public_url(ui: UiSettings) -> str:
    """The URL result links are built on: `ui_public_url`, else this process's own address."""
    if ui.ui_public_url:
        return ui.ui_public_url.rstrip("/")
    host = socket.gethostname() if _is_everywhere(ui.ui_host) else _shown(ui.ui_host)
    return f"http://{host}:{ui.ui_port}"


def _refusal(status: int, message: str) -> Response:
    from starlette.responses import JSONResponse

    headers = {"Cache-Control": "no-store", "X-Content-Type-Options": "nosniff"}
    return JSONResponse({"detail": message}, status_code=status, headers=headers)


class RequestGuard:
    """ASGI middleware: the Host check on every request, the origin and body-type checks on every
    request that changes state (see the module's docstring). `ui.ui_port` is the port it listens on."""

    def __init__(self, app: ASGIApp, ui: UiSettings) -> None:
        self.app = app
        self.hosts = allowed_hosts(ui)
        self.trusted = configured_hosts(ui)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            refusal = self.check(scope)
            if refusal is not None:
                await refusal(scope, receive, send)
                return
        await self.app(scope, receive, send)

    def check(self, scope: Scope) -> Response | None:
        headers: dict[str, list[str]] = {}
        for key, value in scope.get("headers") or []:
            headers.setdefault(key.decode("latin-1").lower(), []).append(value.decode("latin-1"))
        hosts = headers.get("host", [])
        if len(hosts) != 1 or not self.hosts.admit(hosts[0]):
            shown = repr(hosts[0][:100]) if hosts else "(none)"
            return _refusal(
                400,
                f"Host {shown} is not a name of this evalq web process; "
                "if a proxy forwards it, add it to ui_allowed_hosts (EVALQ_UI_ALLOWED_HOSTS)",
            )
        if scope["method"] in SAFE_METHODS:
            return None
        cross = self._cross_site(headers, hosts[0])
        if cross is not None:
            return _refusal(403, f"{cross}: a request that changes anything is taken only from this server's own pages")
        types = headers.get("content-type", [])
        has_body = "transfer-encoding" in headers or headers.get("content-length", ["0"]) != ["0"]
        if (types or has_body) and not (len(types) == 1 and _is_json(types[0])):
            return _refusal(415, "this route takes a JSON body: send it with Content-Type: application/json")
        return None

    def _cross_site(self, headers: dict[str, list[str]], host: str) -> str | None:
        """Why the request comes from another site's page, or None."""
        origins = headers.get("origin")
        if origins is not None:
            if len(origins) == 1 and self._ours(origins[0], host):
                return None
            return f"the request comes from another site's page (Origin {origins[0][:100]!r})"
        site = headers.get("sec-fetch-site", [""])[-1].strip().lower()
        if site in ("cross-site", "same-site"):
            return f"the browser says the request comes from another site's page (Sec-Fetch-Site: {site})"
        return None

    def _ours(self, origin: str, host: str) -> bool:
        try:
            parts = urlsplit(origin)
        except ValueError:
            return False
        netloc = parts.netloc.lower()
        if parts.scheme not in ("http", "https") or f"{parts.scheme}://{netloc}" != origin.lower():
            return False
        # The page's own origin is the Host it asked; behind a proxy that rewrites Host, the
        # names the settings vouch for.
        return netloc == host.lower() or self.trusted.admit(netloc)


def _is_json(content_type: str) -> bool:
    return content_type.split(";", 1)[0].strip().lower() == "application/json"


def artifact_response(artifact: Artifact) -> Response:
    """One artifact of a job, streamed as read, as a download of no known type.

    An artifact holds the job's own output (a model's text, an HTML report): a browser must
    never render it as a page of this origin, where its script could read the queue.
    """
    from starlette.responses import StreamingResponse

    filename = re.sub(r"[^A-Za-z0-9_.\-]", "_", artifact.name.rsplit("/", 1)[-1]) or "artifact"
    headers = {
        "Content-Disposition": f'attachment; filename="{filename}"',
        "Content-Length": str(artifact.size),
        "X-Content-Type-Options": "nosniff",
        "Content-Security-Policy": "default-src 'none'; sandbox",
    }
    return StreamingResponse(artifact.chunks(), media_type="application/octet-stream", headers=headers)

"""One HTTP/1.1 request on its own connection, for the few calls evalq makes out: webhooks
and a worker pod's own annotation. Only the status code is read: no caller needs the body."""

from __future__ import annotations

import asyncio
import ssl
from urllib.parse import urlsplit

__all__ = ["request"]


async def request(
    method: str,
    url: str,
    body: bytes,
    headers: dict[str, str],
    *,
    timeout: float,
    tls: ssl.SSLContext | None = None,
) -> int:
    """Send `body`; the response's status code. Raises OSError or TimeoutError when no answer
    comes within `timeout`. `tls` verifies an https server (default: the system's CAs)."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    secure = parts.scheme == "https"
    port = parts.port or (443 if secure else 80)
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    lines = [
        f"{method} {path} HTTP/1.1",
        # The host and port only: never credentials a URL may carry before an `@`.
        f"Host: {f'[{host}]' if ':' in host else host}{f':{parts.port}' if parts.port else ''}",
        f"Content-Length: {len(body)}",
        "Connection: close",
        "User-Agent: evalq",
        *(f"{k}: {v}" for k, v in headers.items()),
    ]
    async with asyncio.timeout(timeout):
        context = (tls or ssl.create_default_context()) if secure else None
        reader, writer = await asyncio.open_connection(host, port, ssl=context)
        try:
            writer.write(("\r\n".join(lines) + "\r\n\r\n").encode() + body)
            await writer.drain()
            status = await reader.readline()
        finally:
            writer.close()
    fields = status.decode("latin-1").split()
    if len(fields) < 2 or not fields[0].startswith("HTTP/") or not fields[1].isdigit():
        raise OSError(f"not an HTTP response: {status[:80]!r}")
    return int(fields[1])

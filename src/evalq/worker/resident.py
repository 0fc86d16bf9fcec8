"""A resident model: one long-lived evaluation process that keeps its last job's model loaded.

Loading a real checkpoint costs tens of seconds to minutes, and CUDA's initialisation more;
a resident process pays them once. It is forked from the zygote (which never touches CUDA)
with the `Spawn` request, so it is CUDA-safe, and then lives on beside it: each job the
worker gives it runs lmms-eval in that process, and lmms-eval's request for the model class
is answered with the model already built, when the job asks for it with the same
arguments and the files they name hold what they held when it was loaded (the job's model
identity, which the worker computes for the response cache: a checkpoint folder written
again in place is another checkpoint under the same name) (`resident_process.py`).
Everything else of the run is lmms-eval's own, seeds included, so the results are those of
a fresh run.

A job whose model differs only in its weights folder (another checkpoint of the same model,
`weights_key`) goes to the resident process too, which takes the new weights into the loaded
model where that gives what a fresh load would, and loads it afresh otherwise
(`weight_swap.py`); so does a job whose folder is the loaded one's, rewritten since.

The worker keeps at most one. A job for another model (or with `fresh_model`), a job that
fails, a cancel or a time limit, and an idle bound (`resident_idle`) end it: the process
exits, and its memory with it. A worker killed with `-9` takes it along (the zygote dies
with the worker, and the resident with the zygote).

Messages (msgpack over SOCK_SEQPACKET): the worker sends `ResidentRun` with the job's output
pipe attached; the resident answers `Loaded` once the model is built or found, then `Done`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeAlias

import msgspec

from ..schemas import EvaluateRequest, Progress, format_args
from .runner import GroupLeader, pump_output
from .warm import WarmEvaluator
from .weight_swap import apart_from_weights

__all__ = ["Done", "Loaded", "Resident", "ResidentJob", "ResidentRun", "resident_key", "weights_key"]

log = logging.getLogger("evalq.worker")

MAX_MESSAGE = 1 << 20
RESIDENT_MODULE = "evalq.worker.resident_process"


class ResidentRun(msgspec.Struct, frozen=True, kw_only=True, tag="run"):
    """Run `python -m <module> <argv>` in `cwd`, inside the resident process."""

    module: str
    argv: list[str]
    cwd: str
    # The job's model identity (`identity.model_identity`: the content of the files its
    # arguments name): the kept model is reused only for the identity it holds. None: not
    # known, and the arguments alone decide.
    identity: str | None = None


class Loaded(msgspec.Struct, frozen=True, kw_only=True, tag="loaded"):
    """How the job got its model: kept as it was (`reused`), the loaded model with the new
    checkpoint's weights copied in (`swapped`: another folder's, or the same folder's
    rewritten since), or built; `seconds` until it was ready (a swap's or a load's); `note`:
    why a swap that was considered was not made."""

    reused: bool
    seconds: float | None = None
    swapped: bool = False
    note: str | None = None


class Done(msgspec.Struct, frozen=True, kw_only=True, tag="done"):
    code: int
    # The run raised out of lmms-eval: the resident exits after this reply.
    crashed: bool = False


Message: TypeAlias = ResidentRun | Loaded | Done
_encoder = msgspec.msgpack.Encoder()
_decoder: msgspec.msgpack.Decoder[Message] = msgspec.msgpack.Decoder(Message)


def encode(message: Message) -> bytes:
    return _encoder.encode(message)


def decode(data: bytes) -> Message:
    return _decoder.decode(data)


def resident_key(request: EvaluateRequest) -> tuple[str, ...]:
    """What must match for a job to reuse the resident model: the model, its arguments, the
    device, the batch size (the model is built with it) and the GPU count."""
    batch = "" if request.batch_size is None else str(request.batch_size)
    return (request.model, format_args(request.model_args), request.device or "", batch, str(request.num_gpus))


def weights_key(request: EvaluateRequest) -> tuple[str, ...] | None:
    """`resident_key` without the folder of the model's weights: jobs with equal keys ask for
    checkpoints of one model, and the resident process may swap one's weights for another's.
    None where the request names no weights folder."""
    apart = apart_from_weights(format_args(request.model_args))
    if apart is None:
        return None
    key, _folder, rest = apart
    model, _args, *setup = resident_key(request)
    return (model, key, ",".join(rest), *setup)


def _exited(pid: int, *, reaped: bool = False) -> bool:
    """Gone (`reaped`), or at least a zombie: its memory is freed either way, and the zygote
    reaps it as soon as it ends."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return not reaped and handle.read().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return True


class Resident:
    """The worker's handle on one resident process."""

    def __init__(self, key: tuple[str, ...], zygote: WarmEvaluator, *, cwd: Path, log_path: Path) -> None:
        # The key of the model it holds, or is about to load or take the weights of, and that
        # key without the weights folder (`weights_key`).
        self.key = key
        self.near: tuple[str, ...] | None = None
        self.zygote = zygote
        self.cwd = cwd
        self.log_path = log_path
        self.pid: int | None = None
        self.control: socket.socket | None = None
        self.jobs = 0
        self.last_used = time.monotonic()
        self._busy = asyncio.Lock()

    async def start(self) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            self.pid = await self.zygote.spawn(
                RESIDENT_MODULE, ["--control-fd={fd}"], fd=theirs.fileno(), cwd=self.cwd, log_path=self.log_path
            )
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        ours.setblocking(False)
        self.control = ours
        log.info("resident model process %s started", self.pid)

    @property
    def alive(self) -> bool:
        return self.control is not None and self.pid is not None and not _exited(self.pid)

    @property
    def busy(self) -> bool:
        """A job runs in it now."""
        return self._busy.locked()

    def job_ended(self) -> None:
        """Its job is over, whichever way: the next may run, and the idle time counts from now."""
        self.last_used = time.monotonic()
        self._busy.release()

    async def run(
        self,
        module: str,
        argv: list[str],
        *,
        cwd: Path,
        log_path: Path,
        on_progress: Callable[[Progress], None],
        identity: str | None = None,
    ) -> ResidentJob:
        job = ResidentJob(self, log_path=log_path, on_progress=on_progress)
        await self._busy.acquire()
        try:
            await job.begin(ResidentRun(module=module, argv=argv, cwd=os.fspath(cwd), identity=identity))
        except BaseException:
            self._busy.release()
            raise
        self.jobs += 1
        return job

    def _signal(self, sig: int) -> None:
        if self.pid is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.pid, sig)

    async def close(self, grace: float = 10.0) -> None:
        """End the process, and with it the model: closing its socket makes it exit; a process
        that lingers past `grace` is killed."""
        if self.control is not None:
            self.control.close()
            self.control = None
        if self.pid is None:
            return
        deadline = time.monotonic() + grace
        while not _exited(self.pid):
            if time.monotonic() > deadline:
                self._signal(signal.SIGKILL)
                break
            await asyncio.sleep(0.05)  # polling the process table: it is not our child to wait for
        reaped = time.monotonic() + 2.0
        while not _exited(self.pid, reaped=True) and time.monotonic() < reaped:
            await asyncio.sleep(0.02)  # the zygote reaps it on SIGCHLD
        log.info("resident model process %s ended after %d job(s)", self.pid, self.jobs)


class ResidentJob(GroupLeader):
    """One job in the resident process. Stopping it (a cancel, a time limit) ends the
    resident process's whole group: the model is dropped with it."""

    def __init__(self, resident: Resident, *, log_path: Path, on_progress: Callable[[Progress], None]) -> None:
        self.resident = resident
        self.pid = resident.pid
        self.log_path = log_path
        self.on_progress = on_progress
        loop = asyncio.get_running_loop()
        self._loaded: asyncio.Future[Loaded | None] = loop.create_future()
        self._done: asyncio.Future[int] = loop.create_future()
        self._replies: asyncio.Task[None] | None = None

    async def begin(self, request: ResidentRun) -> None:
        control = self.resident.control
        if control is None:
            raise OSError("the resident model process is closed")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        read_end, write_end = os.pipe()
        try:
            socket.send_fds(control, [encode(request)], [write_end])
        except BaseException:
            os.close(read_end)
            raise
        finally:
            os.close(write_end)  # the resident holds the only write end while the job runs
        reader = asyncio.StreamReader(limit=1 << 20)
        pipe = os.fdopen(read_end, "rb", buffering=0)
        await asyncio.get_running_loop().connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), pipe)
        self._pump = asyncio.create_task(pump_output(reader, self.log_path, self.on_progress))
        self._replies = asyncio.create_task(self._read_replies(control))

    async def _read_replies(self, control: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        try:
            while not self._done.done():
                data = await loop.sock_recv(control, MAX_MESSAGE)
                if not data:
                    raise OSError("the resident model process ended")
                message = decode(data)
                if isinstance(message, Loaded) and not self._loaded.done():
                    self._loaded.set_result(message)
                elif isinstance(message, Done):
                    self._done.set_result(message.code)
                    if message.crashed or message.code != 0:
                        await self.resident.close()  # whatever failed may have left the model in any state
        except (OSError, msgspec.DecodeError) as exc:
            log.warning("resident model process lost during a job: %s", exc)
            if self.resident.control is not None:
                self.resident.control.close()
                self.resident.control = None
            if not self._done.done():
                self._done.set_result(-signal.SIGKILL)
        finally:
            if not self._loaded.done():
                self._loaded.set_result(None)
            self.resident.job_ended()

    async def loaded(self) -> Loaded | None:
        """Once the model is built or found for this job; None if the job ended first."""
        return await asyncio.shield(self._loaded)

    async def _leader_exit(self) -> int:
        return await asyncio.shield(self._done)

    def _running(self) -> bool:
        return not self._done.done()

    async def wait(self) -> int:
        """The job's end; the resident process lives on for the next job."""
        code = await self._leader_exit()
        self.ended_at = asyncio.get_running_loop().time()
        if self._pump:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(asyncio.shield(self._pump), 10)
        return code

    async def terminate(self, grace: float) -> None:
        await super().terminate(grace)
        await self.resident.close(grace=1.0)

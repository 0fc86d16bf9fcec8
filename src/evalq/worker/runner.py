"""One evaluation subprocess: its own process group, its output to `eval.log`, progress out.

The group matters: lmms-eval starts data-loader workers and accelerate starts one
process per GPU, and a cancel must end all of them, not just the leader.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from ..children import die_with_parent
from ..schemas import Progress
from .argv import scrubbed_env
from .progress import ProgressParser

__all__ = ["EvalProcess", "GroupLeader", "pump_output"]


class GroupLeader:
    """An evaluation that leads its own process group, however it was started.

    Subclasses set `pid` (== the group id) and `_pump`, and say how the leader's exit code
    arrives; waiting and ending the group are the same for every way of starting one.
    """

    pid: int | None = None
    ended_at: float | None = None
    _pump: asyncio.Task[None] | None = None

    async def _leader_exit(self) -> int:
        raise NotImplementedError

    async def loaded(self) -> Any:
        """Once the evaluation has its model (a resident model says whether it was reused);
        a fresh process builds its own and says nothing: None at once."""
        return None

    def _running(self) -> bool:
        raise NotImplementedError

    async def wait(self) -> int:
        """Wait for the leader to exit, then end whatever it left in its group."""
        code = await self._leader_exit()
        self.ended_at = asyncio.get_running_loop().time()
        self._signal_group(signal.SIGKILL)
        if self._pump:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(asyncio.shield(self._pump), 10)
        return code

    async def terminate(self, grace: float) -> None:
        """SIGTERM to the whole group, SIGKILL after `grace` seconds."""
        if not self._running():
            return
        self._signal_group(signal.SIGTERM)
        try:
            await asyncio.wait_for(self._leader_exit(), grace)
        except TimeoutError:
            self._signal_group(signal.SIGKILL)

    def _signal_group(self, sig: int) -> None:
        if self.pid is None:
            return
        try:
            os.killpg(self.pid, sig)
        except ProcessLookupError:
            # A leader stopped in its first instants may not have made its group yet.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(self.pid, sig)
        except PermissionError:
            pass


class EvalProcess(GroupLeader):
    """A fresh evaluation process (`python -m lmms_eval`, accelerate, or a configured command)."""

    def __init__(
        self,
        argv: Sequence[str],
        *,
        env: Mapping[str, str],
        cwd: Path,
        log_path: Path,
        on_progress: Callable[[Progress], None] = lambda progress: None,
    ) -> None:
        self.argv = list(argv)
        # Whoever starts it, an evaluation never gets the worker's credentials.
        self.env = scrubbed_env(env)
        self.cwd = cwd
        self.log_path = log_path
        self.on_progress = on_progress
        self.process: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self.process = await asyncio.create_subprocess_exec(
            *self.argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            cwd=self.cwd,
            env=self.env,
            start_new_session=True,  # its own session and process group, pgid == pid
            preexec_fn=die_with_parent if sys.platform == "linux" else None,
        )
        self.pid = self.process.pid
        assert self.process.stdout is not None
        self._pump = asyncio.create_task(pump_output(self.process.stdout, self.log_path, self.on_progress))

    async def _leader_exit(self) -> int:
        assert self.process is not None
        return await asyncio.shield(self.process.wait())

    def _running(self) -> bool:
        return self.process is not None and self.process.returncode is None


async def pump_output(stream: asyncio.StreamReader, log_path: Path, on_progress: Callable[[Progress], None]) -> None:
    """Copy an evaluation's output to its log until EOF, passing on the progress it shows."""
    parser = ProgressParser()
    with open(log_path, "ab") as log:
        while True:
            chunk = await stream.read(65536)
            if not chunk:
                break
            log.write(chunk)
            log.flush()
            for progress in parser.feed(chunk):
                on_progress(progress)

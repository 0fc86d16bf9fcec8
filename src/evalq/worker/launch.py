"""Where one evaluation's process runs: the resident model process, a child forked from the
warm evaluator, or a fresh process.

A run that builds a model on one GPU at most goes to the resident process, which keeps its
model for the next job with the same key (`resident.py`); anything else on one GPU is
forked from the zygote (`warm.py`); several GPUs, a configured `evaluator`, or a warm
evaluator that keeps failing get a fresh process (`runner.py`). Each way gives the same
guarantees: its own process group, its output in its log, progress parsed from it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..config import Settings
from ..schemas import EvaluateRequest, Progress
from .argv import evaluator_command, scrubbed_env
from .entry import ENTRY_MODULE
from .resident import Resident, ResidentJob, resident_key, weights_key
from .runner import EvalProcess
from .warm import WarmEvaluator, WarmProcess, ZygoteError

__all__ = ["Launch", "Launcher", "Process"]

log = logging.getLogger("evalq.worker")

# A zygote that fails to start this many times in a row is given up on.
_ZYGOTE_STARTS = 3

Process = EvalProcess | WarmProcess | ResidentJob


@dataclass(frozen=True)
class Launch:
    """One evaluation process: `python -m <module> <args>` (or the configured evaluator) in `cwd`."""

    args: list[str]
    cwd: Path
    log_path: Path
    module: str = "lmms_eval"
    # Runs once per GPU under accelerate when the job asks for several (a plan or a merge
    # loads no model and runs as one process).
    per_gpu: bool = True
    # The model's identity (`identity.model_identity`), where the worker computed it: a
    # resident model is reused only for the same one.
    identity: str | None = None

    @property
    def loads_model(self) -> bool:
        """lmms-eval itself or through the entry (a whole job, a piece): the runs that build a model (a plan or a
        merge does not)."""
        return self.module == "lmms_eval" or (self.module == ENTRY_MODULE and self.per_gpu)


class Launcher:
    """Owns the worker's warm evaluator and its resident model process, and starts each
    evaluation in the first of them that can run it."""

    def __init__(self, settings: Settings, *, state_dir: Path) -> None:
        self.settings = settings
        self.state_dir = state_dir
        self.warm: WarmEvaluator | None = None
        self.resident: Resident | None = None

    def start(self, include_dir: Path) -> None:
        """Start the warm evaluator, where the settings and the platform allow one."""
        worker = self.settings.worker
        if worker.warm_evaluator and not worker.evaluator and sys.platform == "linux":
            self.warm = WarmEvaluator(include_dir, env=scrubbed_env(os.environ), log_path=self.state_dir / "zygote.log")
            self.warm.start()  # warms up while the worker waits for its first job

    async def launch(
        self,
        request: EvaluateRequest,
        launch: Launch,
        *,
        on_progress: Callable[[Progress], None],
        job: str,
    ) -> Process:
        """Fork the evaluation from the warm evaluator where it can run there, else start a
        fresh process. `job` names it in the log."""
        several = request.num_gpus > 1 and launch.per_gpu
        if launch.loads_model:
            resident = await self._resident_for(request)
            if resident is not None:
                process = await resident.run(
                    launch.module,
                    launch.args,
                    cwd=launch.cwd,
                    log_path=launch.log_path,
                    on_progress=on_progress,
                    identity=launch.identity,
                )
                log.info("%s: resident pid %s: %s", job, process.pid, " ".join(launch.args))
                return process
        if self.warm is not None and not several and self.warm.failures < _ZYGOTE_STARTS:
            try:
                warm = await self.warm.launch(
                    launch.args, cwd=launch.cwd, log_path=launch.log_path, on_progress=on_progress, module=launch.module
                )
                log.info("%s: pid %s (warm): %s", job, warm.pid, " ".join(launch.args))
                return warm
            except (ZygoteError, OSError) as exc:
                log.warning("warm evaluator unavailable (%s); starting a fresh lmms-eval process", exc)
        command = evaluator_command(request, self.settings.worker.evaluator, module=launch.module, several=several)
        argv = command + launch.args
        env = scrubbed_env(os.environ)
        fresh = EvalProcess(argv, env=env, cwd=launch.cwd, log_path=launch.log_path, on_progress=on_progress)
        await fresh.start()
        log.info("%s: pid %s: %s", job, fresh.pid, " ".join(argv))
        return fresh

    async def _resident_for(self, request: EvaluateRequest) -> Resident | None:
        """The resident process for this job's model, started if need be; None where the job
        runs elsewhere (after the resident model is released, since this job loads another)."""
        key = resident_key(request)
        fits = (
            self.settings.worker.resident_model
            and self.warm is not None
            and self.warm.failures < _ZYGOTE_STARTS
            and request.num_gpus <= 1
        )
        current = self.resident
        # Another checkpoint of the held model may take the loaded model's place, weights
        # swapped; the resident process decides, and loads afresh where it cannot.
        near = weights_key(request)
        same = current is not None and (current.key == key or (near is not None and current.near == near))
        if current is not None and (not fits or not same or request.fresh_model or not current.alive):
            self.resident = None
            await current.close()
        if not fits or self.warm is None:
            return None
        if self.resident is None:
            resident = Resident(key, self.warm, cwd=self.state_dir, log_path=self.state_dir / "resident.log")
            try:
                await resident.start()
            except (ZygoteError, OSError) as exc:
                log.warning("resident model process unavailable (%s); the job runs on its own", exc)
                return None
            self.resident = resident
        elif self.resident.key != key:
            log.info("resident model: another checkpoint of the same model; its weights may be swapped in")
        self.resident.key, self.resident.near = key, near
        return self.resident

    async def release_idle_model(self) -> None:
        """Release the resident model after `resident_idle` seconds without a job."""
        idle = self.settings.worker.resident_idle
        resident = self.resident
        if idle is None or resident is None or resident.busy:
            return
        if time.monotonic() - resident.last_used >= idle:
            self.resident = None
            log.info("releasing the resident model after %.0f s idle", idle)
            await resident.close()

    async def close(self) -> None:
        """End the resident model process, then the warm evaluator."""
        if self.resident is not None:
            with contextlib.suppress(Exception):
                await self.resident.close()
            self.resident = None
        if self.warm is not None:
            await self.warm.close()

"""`EvalqCallback`: evaluate each checkpoint a Hugging Face `Trainer` saves, without blocking it.

    from evalq.integrations import EvalqCallback

    callback = EvalqCallback(tasks=["mmmu_val"], every_n_steps=500, limit=200)
    callback.attach(trainer)          # or Trainer(..., callbacks=[callback])
    trainer.train()

`on_save` hands the checkpoint to a background thread, which submits it (labels `step`, `run`
and `saved_at`, model_args `pretrained=<checkpoint>`); training goes on at once. With
`wait_on_train_end=True`, `on_train_end` waits for the evaluations and, when the callback
is attached to the trainer, logs their metrics through the trainer's own loggers
(TensorBoard, W&B, MLflow, ...) at each checkpoint's step.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import queue
import threading
import time
from typing import Any

from .config import Settings
from .errors import BadRequest, EvalqError, InvalidField, JobCancelled, JobFailed, TooLarge
from .publisher import Client
from .schemas import JobAccepted, now

try:
    from transformers import TrainerCallback
except ImportError as exc:  # pragma: no cover - depends on the install
    raise ImportError("evalq.integrations needs transformers: pip install transformers") from exc

__all__ = ["EvalqCallback"]

log = logging.getLogger("evalq.integrations")
_STOP = None


@dataclasses.dataclass
class _Submitted:
    step: int
    path: str
    shard: int
    # When on_save ran, the checkpoint just written: where a job's turnaround is measured from.
    saved_at: str
    accepted: JobAccepted | None = None
    error: str | None = None


class EvalqCallback(TrainerCallback):  # type: ignore[misc]
    """Submit an evaluation of each saved checkpoint to an evalq queue."""

    def __init__(
        self,
        tasks: list[str],
        *,
        model: str = "huggingface",
        every_n_steps: int | None = None,
        shards: int = 1,
        model_args: dict[str, Any] | None = None,
        run: str | None = None,
        labels: dict[str, str] | None = None,
        wait_on_train_end: bool = False,
        wait_timeout: float | None = None,
        settings: Settings | None = None,
        submit_retry_s: float = 300.0,
        **fields: Any,
    ) -> None:
        if not tasks:
            raise ValueError("tasks: name at least one task")
        if shards < 1 or shards > len(tasks):
            raise ValueError(f"shards must be between 1 and the number of tasks ({len(tasks)}), got {shards}")
        self.tasks = list(tasks)
        self.model = model
        self.every_n_steps = every_n_steps
        self.shards = shards
        self.model_args = dict(model_args or {})
        self.run = run
        self.labels = dict(labels or {})
        self.wait_on_train_end = wait_on_train_end
        self.wait_timeout = wait_timeout
        self.settings = settings
        self.submit_retry_s = submit_retry_s
        self.fields = fields
        self.submitted: list[_Submitted] = []
        # step -> task -> metric -> value, filled by on_train_end's wait.
        self.metrics: dict[int, dict[str, dict[str, Any]]] = {}
        self.failures: dict[int, str] = {}
        self._trainer: Any = None
        self._client: Client | None = None
        self._pending: queue.Queue[_Submitted | None] = queue.Queue()
        self._thread: threading.Thread | None = None

    def attach(self, trainer: Any) -> EvalqCallback:
        """Join `trainer` first among its callbacks, so its loggers get the metrics at their steps."""
        self._trainer = trainer
        callbacks = trainer.callback_handler.callbacks
        if self in callbacks:
            callbacks.remove(self)
        # First, so its on_train_end runs before the loggers' close their writers.
        callbacks.insert(0, self)
        return self

    # --- the background submitter -------------------------------------------------------

    def _ensure_thread(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._submit_loop, name="evalq-submit", daemon=True)
            self._thread.start()

    def _submit_loop(self) -> None:
        while (item := self._pending.get()) is not _STOP:
            try:
                self._submit(item)
            finally:
                self._pending.task_done()
        self._pending.task_done()

    def _submit(self, item: _Submitted) -> None:
        tasks = self.tasks[item.shard :: self.shards]
        labels = {**self.labels, "step": str(item.step), "run": self._run_name, "saved_at": item.saved_at}
        if self.shards > 1:
            labels["shard"] = f"{item.shard + 1}/{self.shards}"
        request = {
            **self.fields,
            "model": self.model,
            "tasks": tasks,
            "model_args": {**self.model_args, "pretrained": item.path},
            "labels": labels,
        }
        # The same checkpoint, however often it is retried, is the same job.
        key = "trainer:" + hashlib.sha256(f"{item.path}\0{item.step}\0{item.shard}".encode()).hexdigest()
        give_up = time.monotonic() + self.submit_retry_s
        delay = 1.0
        while True:
            try:
                if self._client is None:
                    self._client = Client(self.settings)
                item.accepted = self._client.submit(request, idempotency_key=key)
                log.info("step %d: submitted %s", item.step, item.accepted.job_id)
                return
            except EvalqError as exc:
                if time.monotonic() + delay > give_up or isinstance(exc, (InvalidField, BadRequest, TooLarge)):
                    item.error = str(exc)
                    log.warning("step %d: the evaluation of %s was not submitted: %s", item.step, item.path, exc)
                    return
                time.sleep(delay)  # the queue is away: try again, training goes on meanwhile
                delay = min(delay * 2, 30.0)

    # --- the Trainer's events ---------------------------------------------------------------

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.run is None:
            self._run_name = args.run_name or os.path.basename(os.path.normpath(args.output_dir))
        else:
            self._run_name = self.run

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if not state.is_world_process_zero:
            return
        step = state.global_step
        if self.every_n_steps and step % self.every_n_steps:
            return
        if not hasattr(self, "_run_name"):
            self.on_train_begin(args, state, control)
        saved_at = now()
        path = os.path.abspath(os.path.join(args.output_dir, f"checkpoint-{step}"))
        self._ensure_thread()
        for shard in range(self.shards):
            item = _Submitted(step=step, path=path, shard=shard, saved_at=saved_at)
            self.submitted.append(item)
            self._pending.put(item)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if not state.is_world_process_zero or self._thread is None:
            return
        self._pending.put(_STOP)
        self._pending.join()  # submissions are quick; the evaluations themselves are not waited for
        self._thread = None
        try:
            if self.wait_on_train_end:
                self._wait(args, state, control)
        finally:
            if self._client is not None:
                self._client.close()
                self._client = None

    def _wait(self, args: Any, state: Any, control: Any) -> None:
        for item in self.submitted:
            if item.accepted is None or self._client is None:
                self.failures[item.step] = item.error or "not submitted"
                continue
            try:
                info = self._client.wait_for_job(item.accepted.job_id, timeout=self.wait_timeout)
            except (JobFailed, JobCancelled) as exc:
                self.failures[item.step] = str(exc)
                continue
            if info.result is not None:
                self.metrics.setdefault(item.step, {}).update(info.result.metrics)
        if self._trainer is None:
            return
        handler = self._trainer.callback_handler
        for step in sorted(self.metrics):
            logs = {
                f"eval_{task}/{name}": value
                for task, values in self.metrics[step].items()
                for name, value in values.items()
                if isinstance(value, (int, float)) and not isinstance(value, bool)
            }
            # The loggers log at state.global_step: the checkpoint's, not the last one.
            handler.on_log(args, dataclasses.replace(state, global_step=step), control, logs)

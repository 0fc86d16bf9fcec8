"""What one worker can run, judged from what it lists in the workers bucket.

The gateway accepts a job when some live worker of its pool lists its model and tasks;
a worker that takes it checks again against its own list, since the one that listed
them may not be the one that took it.
"""

from __future__ import annotations

from .schemas import EvaluateRequest, WorkerInfo

__all__ = ["cannot_run"]


def cannot_run(worker: WorkerInfo, request: EvaluateRequest) -> str | None:
    """Why `worker` cannot run `request`, or None. A worker that has not listed what it can
    run (no inventory) is taken at its word: None."""
    if worker.tasks is None:
        return None
    if worker.models and request.model not in worker.models:
        return f"it does not have the model {request.model!r}"
    missing = [task for task in request.tasks if task not in worker.tasks]
    if missing:
        return f"it does not know the task{'s' if len(missing) > 1 else ''} {', '.join(missing)}"
    # A CPU-only worker (0 GPUs) still runs single-process jobs.
    if request.num_gpus > max(worker.gpu_count, 1):
        return f"num_gpus={request.num_gpus} but it has {max(worker.gpu_count, 1)}"
    return None

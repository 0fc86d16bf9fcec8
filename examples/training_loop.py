"""Evaluate checkpoints while training, without ever blocking the training loop.

Every `--every` steps the loop submits an evaluation of the current checkpoint and keeps
training. Finished evaluations arrive as pushed events on a background thread; the loop
harvests them with a non-blocking `get_nowait()` between steps. At the end it waits for
the evaluations still running.

    python examples/training_loop.py --steps 30 --every 10 --model dummy --tasks evalq_demo
"""

from __future__ import annotations

import argparse
import queue
import threading
import time

from evalq import Client, JobCancelled, JobFailed
from evalq.schemas import Cancelled, Completed, Event, Failed


def train_step(step: int) -> float:
    """Stands in for a real optimisation step; returns a fake loss."""
    time.sleep(0.01)
    return 1.0 / step


def main(argv: list[str] | None = None) -> dict[int, dict[str, dict[str, object]]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--every", type=int, default=10)
    parser.add_argument("--model", default="dummy")
    parser.add_argument("--tasks", default="evalq_demo")
    parser.add_argument("--limit", type=int, default=4)
    args = parser.parse_args(argv)

    metrics_by_step: dict[int, dict[str, dict[str, object]]] = {}
    pending: dict[str, int] = {}  # job_id -> training step
    finished: queue.Queue[Event] = queue.Queue()

    with Client() as client:

        def follow_events() -> None:
            for event in client.events():
                if isinstance(event, (Completed, Failed, Cancelled)):
                    finished.put(event)

        threading.Thread(target=follow_events, name="eval-events", daemon=True).start()

        def harvest() -> None:
            while True:
                try:
                    event = finished.get_nowait()
                except queue.Empty:
                    return
                step = pending.pop(event.job_id, None)
                if step is None:
                    continue  # someone else's job
                if isinstance(event, Completed):
                    metrics_by_step[step] = event.metrics
                    print(f"step {step}: {event.metrics}")
                else:
                    print(f"step {step}: evaluation ended {type(event).__name__.lower()}")

        for step in range(1, args.steps + 1):
            train_step(step)
            if step % args.every == 0:
                # A real loop would save a checkpoint and pass model_args={"pretrained": path}.
                job = client.submit(
                    model=args.model,
                    tasks=args.tasks.split(","),
                    limit=args.limit,
                    labels={"step": str(step), "run": "example"},
                )
                pending[job.job_id] = step
                print(f"step {step}: submitted {job.job_id} (position {job.position_in_queue})")
            harvest()

        for job_id, step in list(pending.items()):
            try:
                info = client.wait_for_job(job_id, timeout=600)
            except (JobFailed, JobCancelled) as exc:
                print(f"step {step}: {exc}")
                continue
            if info.result is not None:
                metrics_by_step[step] = info.result.metrics
                print(f"step {step}: {info.result.metrics}")
    return metrics_by_step


if __name__ == "__main__":
    main()

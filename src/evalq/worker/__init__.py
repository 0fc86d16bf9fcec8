"""The worker: runs lmms-eval jobs from its pool's durable consumer.

`Worker` is imported on first use: an evaluation process runs `python -m
evalq.worker.entry`, and importing this package must not load the worker's NATS stack
into it (nor import the entry module before it runs as `__main__`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .service import Worker

__all__ = ["Worker"]


def __getattr__(name: str) -> Any:
    if name == "Worker":
        from .service import Worker

        return Worker
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

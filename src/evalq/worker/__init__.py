"""The worker: runs lmms-eval jobs from its pool's durable consumer."""

from .service import Worker

__all__ = ["Worker"]

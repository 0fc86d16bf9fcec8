"""What a worker can run: GPUs, lmms-eval's version, its models and tasks.

Run as `python -m evalq.worker.inventory INCLUDE_PATH` in a subprocess, so the worker
itself never imports torch or initialises CUDA, and a slow task index (seconds) does not
hold up the worker's first job. Prints one JSON object.
"""

from __future__ import annotations

import json
import sys
from importlib import metadata
from typing import Any


def gpus() -> list[dict[str, Any]]:
    try:
        import torch
    except ImportError:
        return []
    if not torch.cuda.is_available():
        return []
    found = []
    for index in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(index)
        found.append({"index": index, "name": props.name, "memory_mb": props.total_memory // (1024 * 1024)})
    return found


def inventory(include_path: str | None) -> dict[str, Any]:
    import logging

    logging.disable(logging.WARNING)
    try:
        version: str | None = metadata.version("lmms-eval")
    except metadata.PackageNotFoundError:
        return {"lmms_eval_version": None, "gpus": gpus(), "models": [], "tasks": []}
    from loguru import logger

    logger.remove()
    from lmms_eval.models import list_available_models
    from lmms_eval.tasks import TaskManager

    tasks = TaskManager("ERROR", include_path=include_path).all_tasks
    return {
        "lmms_eval_version": version,
        "gpus": gpus(),
        "models": sorted(list_available_models(include_aliases=True)),
        "tasks": sorted(tasks),
    }


if __name__ == "__main__":
    result = inventory(sys.argv[1] if len(sys.argv) > 1 else None)
    sys.stdout.write("\n@@EVALQ-INVENTORY@@" + json.dumps(result) + "\n")

"""What a worker can run: GPUs, lmms-eval's version, its models and tasks.

`take_inventory` asks the warm evaluator's zygote, which has lmms-eval imported and the
bundled task YAMLs indexed already, so the answer costs a fraction of a second there.
Without a zygote (or when it fails) it runs `python -m evalq.worker.inventory INCLUDE_DIR`
in a subprocess, so the worker itself never imports torch or initialises CUDA; that run
prints `MARK` followed by one JSON object.

This module is imported by the zygote before it forks jobs: keep its top level light.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
from importlib import metadata
from pathlib import Path
from typing import Protocol

import msgspec

from ..children import die_with_parent
from ..schemas import GpuInfo
from .argv import scrubbed_env

__all__ = ["MARK", "Inventory", "InventorySource", "cuda_gpus", "list_lmms_eval", "take_inventory"]

log = logging.getLogger("evalq.worker")

# Precedes the JSON on the subprocess's stdout: lmms-eval may print before it.
MARK = "@@EVALQ-INVENTORY@@"


class Inventory(msgspec.Struct, frozen=True, kw_only=True):
    """What a worker advertises in its WorkerInfo once it knows it."""

    lmms_eval_version: str | None
    gpus: list[GpuInfo]
    models: list[str]
    tasks: list[str]


class InventorySource(Protocol):
    """What can list a worker's inventory from an lmms-eval it has imported: the warm evaluator."""

    async def inventory(self, timeout: float) -> Inventory: ...


def cuda_gpus() -> list[GpuInfo]:
    """The GPUs torch sees (CUDA_VISIBLE_DEVICES applies), as a job would number them.

    This initialises the CUDA driver, after which a forked child can no longer use CUDA:
    call it only in a process that exits soon after, never in the zygote itself.
    """
    try:
        import torch
    except ImportError:
        return []
    if not torch.cuda.is_available():
        return []
    found = []
    for index in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(index)
        found.append(GpuInfo(index=index, name=props.name, memory_mb=props.total_memory // (1024 * 1024)))
    return found


def list_lmms_eval(include_path: str | None, gpus: list[GpuInfo]) -> Inventory:
    """lmms-eval's version, models and tasks (the bundled ones and those under `include_path`)."""
    try:
        version = metadata.version("lmms-eval")
    except metadata.PackageNotFoundError:
        return Inventory(lmms_eval_version=None, gpus=gpus, models=[], tasks=[])
    from lmms_eval.models import list_available_models
    from lmms_eval.tasks import TaskManager

    tasks = TaskManager("ERROR", include_path=include_path).all_tasks
    return Inventory(
        lmms_eval_version=version,
        gpus=gpus,
        models=sorted(list_available_models(include_aliases=True)),
        tasks=sorted(tasks),
    )


async def take_inventory(
    include_dir: Path, env: dict[str, str], warm: InventorySource | None, timeout: float = 300
) -> Inventory | None:
    """What this worker can run, or None (with a warning saying why) if it cannot be found out.

    With `warm`, the warm evaluator's zygote answers (it waits for the zygote to finish
    warming up, and for a job it is running to end); if that fails for any reason, the
    answer comes from a `python -m evalq.worker.inventory` subprocess run with `env`, as it
    does without `warm`. `timeout` bounds each of the two tries, so a failing zygote can
    make the whole call last up to twice as long.

    `include_dir` is the worker's `--include_path` folder (its tasks are listed with
    lmms-eval's bundled ones). An inventory whose `lmms_eval_version` is None means
    lmms-eval is not installed where the evaluations run: it lists no models or tasks.
    """
    if warm is not None:
        try:
            return await warm.inventory(timeout)
        except Exception as exc:  # any failure of the zygote leaves the subprocess to try
            log.warning("the warm evaluator could not list models and tasks (%s); asking a subprocess", exc)
    inventory = await _from_subprocess(include_dir, env, timeout)
    if inventory is not None and inventory.lmms_eval_version is None:
        log.warning("lmms-eval is not installed: this worker lists no models or tasks")
    return inventory


async def _from_subprocess(include_dir: Path, env: dict[str, str], timeout: float) -> Inventory | None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "evalq.worker.inventory",
        str(include_dir),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=scrubbed_env(env),  # it imports lmms-eval and the task folders' code
        preexec_fn=die_with_parent if sys.platform == "linux" else None,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError:
        log.warning("listing models and tasks took over %.0f s; giving up", timeout)
        return None
    finally:
        if proc.returncode is None:  # timed out or cancelled: it must not outlive the call
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
    text = out.decode(errors="replace")
    if MARK not in text:
        last = err.decode(errors="replace").strip().splitlines()[-1:]
        log.warning("could not list models and tasks (exit %s): %s", proc.returncode, last[0] if last else "no output")
        return None
    try:
        return msgspec.json.decode(text.rsplit(MARK, 1)[1].strip(), type=Inventory)
    except msgspec.DecodeError as exc:
        log.warning("could not read the list of models and tasks: %s", exc)
        return None


def main(argv: list[str]) -> int:
    # Only what follows MARK is read: lmms-eval's logging would be noise on the way.
    logging.disable(logging.WARNING)
    with contextlib.suppress(ImportError):
        from loguru import logger

        logger.remove()
    inventory = list_lmms_eval(argv[0] if argv else None, cuda_gpus())
    sys.stdout.write("\n" + MARK + msgspec.json.encode(inventory).decode() + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

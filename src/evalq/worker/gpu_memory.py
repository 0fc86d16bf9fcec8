"""A worker's GPU memory, for its metrics: read from `nvidia-smi` every `interval` seconds
(the worker process itself never initialises CUDA: its evaluations fork from it), for the
GPUs its jobs see (CUDA_VISIBLE_DEVICES, numbered as a job numbers them). Where there is no
`nvidia-smi`, there is nothing to read and no series."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil

__all__ = ["GpuMemory", "parse"]

log = logging.getLogger("evalq.worker")

QUERY = ["--query-gpu=index,memory.used,memory.total", "--format=csv,noheader,nounits"]


def parse(text: str, visible: str | None) -> dict[str, tuple[float, float]]:
    """`nvidia-smi`'s CSV (index, used MiB, total MiB) as job GPU index -> (used, total) bytes.
    `visible` is CUDA_VISIBLE_DEVICES: host indexes, listed in the order a job numbers them."""
    rows: dict[int, tuple[float, float]] = {}
    for line in text.splitlines():
        fields = [f.strip() for f in line.split(",")]
        if len(fields) != 3 or not all(f.isdigit() for f in fields):
            continue
        rows[int(fields[0])] = (float(fields[1]) * 2**20, float(fields[2]) * 2**20)
    if visible is None or not visible.strip():
        return {str(i): rows[i] for i in sorted(rows)}
    order = [int(v) for v in visible.split(",") if v.strip().isdigit()]
    return {str(n): rows[host] for n, host in enumerate(order) if host in rows}


class GpuMemory:
    def __init__(self, interval: float = 15.0) -> None:
        self.interval = interval
        self.binary = shutil.which("nvidia-smi")
        self.values: dict[str, tuple[float, float]] = {}

    async def poll(self) -> None:
        """Read it every `interval` seconds until cancelled."""
        if self.binary is None:
            return
        while True:
            with contextlib.suppress(OSError, TimeoutError):
                proc = await asyncio.create_subprocess_exec(
                    self.binary, *QUERY, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL
                )
                try:
                    out, _ = await asyncio.wait_for(proc.communicate(), 10)
                except TimeoutError:
                    proc.kill()
                    await proc.wait()
                    raise
                self.values = parse(out.decode(errors="replace"), os.environ.get("CUDA_VISIBLE_DEVICES"))
            await asyncio.sleep(self.interval)

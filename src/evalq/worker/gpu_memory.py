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

QUERY = ["--query-gpu=index,uuid,memory.used,memory.total", "--format=csv,noheader,nounits"]


def parse(text: str, visible: str | None) -> dict[str, tuple[float, float]]:
    """`nvidia-smi`'s CSV (index, uuid, used MiB, total MiB) as job GPU index -> (used, total)
    bytes. `visible` is CUDA_VISIBLE_DEVICES: host indexes or UUIDs (or their starts), in the
    order a job numbers them; set but empty, no GPU."""
    rows: list[tuple[str, str, float, float]] = []
    for line in text.splitlines():
        fields = [f.strip() for f in line.split(",")]
        if len(fields) != 4 or not (fields[0].isdigit() and fields[2].isdigit() and fields[3].isdigit()):
            continue
        rows.append((fields[0], fields[1], float(fields[2]) * 2**20, float(fields[3]) * 2**20))
    if visible is None:
        return {index: (used, total) for index, _, used, total in sorted(rows, key=lambda r: int(r[0]))}
    found: dict[str, tuple[float, float]] = {}
    for token in (t.strip() for t in visible.split(",") if t.strip()):
        match = next((r for r in rows if (r[0] == token if token.isdigit() else r[1].startswith(token))), None)
        if match is None:
            break  # CUDA stops at the first device it cannot find
        found[str(len(found))] = (match[2], match[3])
    return found


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

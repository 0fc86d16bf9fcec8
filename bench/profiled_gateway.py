"""`evalq gateway` under pyinstrument; on SIGTERM it writes where its CPU went as JSON.

    EVALQ_NATS_URL=... EVALQ_PREFIX=... python bench/profiled_gateway.py OUT.json

The JSON holds the sampled seconds spent in each package's own code (self time, so the
figures add up to the total) and the 25 functions with the most self time.
"""

from __future__ import annotations

import asyncio
import collections
import json
import sys
from pathlib import Path

from pyinstrument import Profiler
from pyinstrument.frame import Frame

from evalq.cli.processes import run_gateway
from evalq.config import load_settings

_IDLE = {"epoll.poll", "select.epoll.poll", "select", "poll"}  # the event loop waiting: wall time, not CPU


def package_of(path: str) -> str:
    if "site-packages/" in path:
        return path.split("site-packages/", 1)[1].split("/", 1)[0].removesuffix(".py")
    if "/evalq/" in path:
        return "evalq"
    if "/lib/python3" in path:
        return "stdlib:" + path.rsplit("/lib/python3", 1)[1].split("/", 2)[1].removesuffix(".py")
    return "other"


def summarise(root: Frame) -> dict[str, object]:
    """Self time by package and by function; `[self]` and built-in frames count for their caller."""
    by_package: collections.Counter[str] = collections.Counter()
    by_function: collections.Counter[str] = collections.Counter()
    idle = 0.0
    stack: list[tuple[Frame, Frame | None]] = [(root, None)]
    while stack:
        frame, parent = stack.pop()
        stack.extend((child, frame) for child in frame.children)
        own = frame.total_self_time
        if own <= 0:
            continue
        borrowed = frame.is_synthetic or (frame.file_path or "").startswith("<")
        owner = parent if borrowed and parent is not None else frame
        if {frame.function, owner.function} & _IDLE:
            idle += own
            continue
        package = package_of(owner.file_path or "")
        name = frame.function if not frame.is_synthetic else owner.function
        by_package[package] += own
        by_function[f"{package}: {name} ({owner.file_path_short}:{owner.line_no})"] += own
    return {
        "total_s": root.time,
        "idle_s": idle,
        "by_package": dict(by_package.most_common()),
        "top_functions": dict(by_function.most_common(25)),
    }


def main() -> None:
    output = Path(sys.argv[1])
    profiler = Profiler(interval=0.001, async_mode="disabled")
    profiler.start()
    try:
        asyncio.run(run_gateway(load_settings(), ready=lambda: print("ready", flush=True)))
    finally:
        session = profiler.stop()
        root = session.root_frame()
        output.write_text(json.dumps(summarise(root) if root else {}, indent=1))


if __name__ == "__main__":
    main()

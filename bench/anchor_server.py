"""lmms-eval's own HTTP eval server, as the benchmark's anchor.

`--hold` keeps its job worker from starting jobs (the scheduler's worker task waits
forever), so that only submission and status are measured, as for evalq with no worker.
"""

from __future__ import annotations

import argparse
import asyncio

from lmms_eval.entrypoints import job_scheduler
from lmms_eval.entrypoints.http_server import launch_server
from lmms_eval.entrypoints.server_args import ServerArgs


async def _held(self: object) -> None:
    await asyncio.Event().wait()


def _with_include_path(include_path: str) -> None:
    # lmms-eval's server does not pass --include_path; without it the anchor could not run
    # the same local task as evalq. This adds it and changes nothing else.
    build = job_scheduler.JobScheduler._build_eval_cmd

    def build_with_include(config: dict, output_path: str) -> list[str]:  # type: ignore[type-arg]
        return [*build(config, output_path), f"--include_path={include_path}"]

    job_scheduler.JobScheduler._build_eval_cmd = staticmethod(build_with_include)  # type: ignore[method-assign,assignment]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--hold", action="store_true")
    parser.add_argument("--include-path")
    args = parser.parse_args()
    if args.include_path:
        _with_include_path(args.include_path)
    if args.hold:
        job_scheduler.JobScheduler._job_worker = _held  # type: ignore[method-assign]
    launch_server(ServerArgs(host="127.0.0.1", port=args.port, max_completed_jobs=1_000_000))


if __name__ == "__main__":
    main()

"""Submit an evaluation, wait for it, print its metrics and download its files: the SDK as typed code.

This is what a client-only install (`pip install evalq`) runs; `make client-check` type-checks
it with `mypy --strict` against the installed wheel, so the SDK's annotations reach its users.
The queue comes from EVALQ_NATS_URL / EVALQ_PREFIX, as for every evalq command.

    python examples/typed_client.py --model dummy --tasks evalq_demo --limit 4 --output ./runs
"""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path

import evalq
from evalq import AsyncClient, Client, EvalqError, JobAccepted, JobFailed, JobInfo


def evaluate(model: str, tasks: list[str], limit: int, output: Path) -> list[Path]:
    with Client() as client:
        accepted: JobAccepted = client.submit(model=model, tasks=tasks, limit=limit, labels={"by": "typed_client"})
        print(f"evalq {evalq.__version__}: job {accepted.job_id} at position {accepted.position_in_queue}")
        info: JobInfo = client.wait_for_job(accepted.job_id, timeout=300)
        metrics = info.result.metrics if info.result else {}
        for task, values in metrics.items():
            print(task, {name: value for name, value in values.items() if not name.endswith("_stderr")})
        return client.results(accepted.job_id, output)


async def queued() -> int:
    async with AsyncClient() as client:
        status = await client.queue()
        return status.queue_size


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="dummy")
    parser.add_argument("--tasks", default="evalq_demo")
    parser.add_argument("--limit", type=int, default=4)
    parser.add_argument("--output", type=Path, default=Path("."))
    args = parser.parse_args(argv)
    try:
        files = evaluate(args.model, args.tasks.split(","), args.limit, args.output)
        waiting = asyncio.run(queued())
    except JobFailed as exc:
        print(f"failed: {exc}")
        return 1
    except EvalqError as exc:
        print(f"error: {exc}")
        return 2
    print(f"{len(files)} files; {waiting} jobs waiting")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

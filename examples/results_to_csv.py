"""Append every completed job's metrics to a CSV file, as jobs finish.

A results subscriber: it follows `<prefix>.events.*.*.completed` and writes one row per
task and metric, with the job's labels, e.g. to feed an experiment tracker.

    python examples/results_to_csv.py metrics.csv            # from now on
    python examples/results_to_csv.py metrics.csv --history  # everything still stored
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

from evalq import Client
from evalq.schemas import Completed

FIELDS = ["time", "job_id", "task", "metric", "value", "labels"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("csv", type=Path)
    parser.add_argument("--history", action="store_true", help="start from the oldest stored event")
    parser.add_argument("--max-jobs", type=int, default=None, help="stop after this many completed jobs")
    args = parser.parse_args(argv)

    new_file = not args.csv.exists()
    jobs = 0
    with Client() as client, open(args.csv, "a", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=FIELDS)
        if new_file:
            writer.writeheader()
        for event in client.events(kind="completed", history=args.history):
            assert isinstance(event, Completed)
            for task, metrics in event.metrics.items():
                for metric, value in metrics.items():
                    writer.writerow(
                        {
                            "time": event.time,
                            "job_id": event.job_id,
                            "task": task,
                            "metric": metric,
                            "value": value,
                            "labels": json.dumps(event.labels, sort_keys=True),
                        }
                    )
            handle.flush()
            jobs += 1
            print(f"{event.job_id}: {sum(len(m) for m in event.metrics.values())} metrics written")
            if args.max_jobs is not None and jobs >= args.max_jobs:
                break
    return jobs


if __name__ == "__main__":
    main()

"""Preemption at a safe point, end to end with real lmms-eval: a running `low` job gives its
worker to a `high` one, is handed back, and resumes from its response journal with no work
redone beyond one flush window and the metrics of an undisturbed run."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest

from evalq import AsyncClient
from evalq.config import Settings
from evalq.schemas import Requeued, Started

from .conftest import Processes
from .events import all_events
from .scored_task import CALLS_VARIABLE, TASK
from .test_resume import FLUSH, SLEEP_VARIABLE, _lines, _work, slow_task
from .waiting import eventually

pytestmark = pytest.mark.slow


def t(when: str | None) -> float:
    assert when is not None
    return dt.datetime.fromisoformat(when).timestamp()


async def test_a_preempted_low_job_resumes_from_its_journal(
    settings: Settings, client: AsyncClient, processes: Processes, tmp_path: Path
) -> None:
    documents = 60
    calls = tmp_path / "calls.txt"
    calls.touch()
    env = {
        CALLS_VARIABLE: str(calls),
        SLEEP_VARIABLE: "0.3",
        "EVALQ_TASK_PATHS": str(slow_task(tmp_path / "tasks")),
        "EVALQ_JOURNAL_FLUSH_RECORDS": str(FLUSH["journal_flush_records"]),
        "EVALQ_JOURNAL_FLUSH_SECONDS": str(FLUSH["journal_flush_seconds"]),
    }
    processes.worker(settings, **env)
    job = {"model": "dummy", "tasks": [TASK], "limit": documents, "cache": "off"}
    low = await client.submit(**job, priority="low")
    await eventually(lambda: _lines(calls) > documents // 3, timeout=180, what="a third of the documents scored")
    high = await client.submit(model="dummy", tasks=["evalq_demo"], limit=4, priority="high")

    high_info = await client.wait_for_job(high.job_id, timeout=180)
    low_info = await client.wait_for_job(low.job_id, timeout=300)
    assert high_info.status == "completed"
    assert t(high_info.started_at) < t(low_info.completed_at), "the high job waited for the low one to end"
    assert low_info.preemptions == 1 and low_info.attempts == 2

    events = await all_events(client, low.job_id)
    handed = [e for e in events if isinstance(e, Requeued)]
    assert len(handed) == 1 and handed[0].reason.startswith("preempted"), [type(e).__name__ for e in events]
    second = [e for e in events if isinstance(e, Started) and e.attempt == 2]
    assert len(second) == 1
    resumed = second[0].resumed_scores
    work = _work(low_info)
    # The second attempt scored exactly what its journal lacked...
    assert work.scores_computed == documents - resumed and work.scores_reused == resumed
    # ...and the stop flushed the journal: at most one flush window was scored twice.
    redone = _lines(calls) - documents
    assert 0 <= redone <= 3 + 2 * 4 * 4, (redone, resumed)
    assert resumed > 0, "nothing was resumed: the preempted attempt's work was thrown away"

    whole = await client.submit_and_wait(**job, timeout=300)
    assert low_info.result is not None and whole.result is not None
    assert low_info.result.metrics == whole.result.metrics

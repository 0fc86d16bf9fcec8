"""Regression gates end to end, with real lmms-eval: lmms-eval's dummy model answering one
letter on the bundled 240-document task (answers: C 106, B 101, A 19, D 14), so a job that
answers A is worse than one that answers C, document by document."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from scipy import stats as scipy_stats

from evalq import AsyncClient
from evalq.config import Settings
from evalq.errors import InvalidField
from evalq.schemas import Gated

from .conftest import EVALQ, run_command, settings_env
from .events import all_events

pytestmark = pytest.mark.slow

TASK = "evalq_shard_demo"
RELEASE = {"rules": [{"metric": f"{TASK}/exact_match", "max_drop": 0.02}], "baseline": "previous"}


def job(answer: str, step: int, run: str = "r1") -> dict[str, Any]:
    return {
        "model": "dummy",
        "tasks": [TASK],
        "model_args": {"response": answer},
        "labels": {"run": run, "step": str(step)},
        "gate": "release",
    }


async def test_a_worse_checkpoint_is_no_go_with_mcnemars_p_and_the_same_one_go(
    client: AsyncClient, worker_factory: Any, nc: Any, settings: Settings
) -> None:
    await client.gates.set("release", RELEASE)
    await worker_factory()
    first = await client.submit(**job("C", 100))
    await client.wait_for_job(first.job_id, timeout=300)
    # The first step of a run has nothing to compare with: not evidence of anything.
    verdict = await client.gates.wait(first.job_id, timeout=30)
    assert (verdict.verdict, verdict.rules[0].status, verdict.baseline) == ("INCONCLUSIVE", "MISSING", None)

    worse = await client.submit(**job("A", 200))
    await client.wait_for_job(worse.job_id, timeout=300)
    verdict = await client.gates.wait(worse.job_id, timeout=30)
    (rule,) = verdict.rules
    assert (verdict.verdict, verdict.baseline, rule.status, rule.test, rule.pairs) == (
        "NO-GO",
        first.job_id,
        "BREACH",
        "mcnemar",
        240,
    )
    assert rule.metric.split(",")[0] == f"{TASK}/exact_match"  # as lmms-eval keys it
    assert rule.delta == pytest.approx(19 / 240 - 106 / 240, abs=1e-12)
    # 106 documents right only in the baseline, 19 only in the candidate.
    assert rule.p_value == pytest.approx(scipy_stats.binomtest(19, 125, 0.5).pvalue, rel=1e-9, abs=1e-300)
    # In the record, and as one event after `completed`.
    assert (await client.get_job(worse.job_id)).verdict == verdict
    events = await all_events(client, worse.job_id)
    kinds = [type(e).__name__ for e in events]
    assert kinds[-2:] == ["Completed", "Gated"] and kinds.count("Gated") == 1
    assert isinstance(events[-1], Gated) and events[-1].verdict == verdict

    # On demand: the same job against itself passes; too few pairs for a policy decide nothing.
    same = await client.gates.check(first.job_id, baseline=first.job_id)
    assert (same.verdict, same.rules[0].pairs, same.rules[0].p_value) == ("GO", 240, 1.0)
    await client.gates.set("strict", {**RELEASE, "min_pairs": 1000})
    strict = await client.gates.check(worse.job_id, policy="strict", baseline=first.job_id)
    assert (strict.verdict, strict.rules[0].status) == ("INCONCLUSIVE", "INSUFFICIENT_EVIDENCE")
    assert "240 documents scored by both jobs, fewer than 1000" in strict.rules[0].reason


async def test_gate_policies_and_submissions_refuse_bad_input_with_a_path(client: AsyncClient) -> None:
    with pytest.raises(InvalidField) as unknown:
        await client.submit(model="dummy", tasks=[TASK], gate="nope")
    assert unknown.value.path == "$.gate"
    with pytest.raises(InvalidField) as no_bound:
        await client.gates.set("bad", {"rules": [{"metric": f"{TASK}/exact_match"}]})
    assert no_bound.value.path == "$.policy.rules[0]"
    with pytest.raises(InvalidField) as bad_name:
        await client.gates.set("a.b", RELEASE)
    assert bad_name.value.path == "$.name"
    with pytest.raises(InvalidField) as missing:
        await client.gates.get("absent")
    assert missing.value.path == "$.name"
    assert await client.gates.list() == {}


async def test_submit_gate_wait_exits_with_the_verdicts_code(
    client: AsyncClient, worker_factory: Any, settings: Settings, tmp_path: Path
) -> None:
    policy = tmp_path / "release.toml"
    policy.write_text(f'baseline = "previous"\n[[rules]]\nmetric = "{TASK}/exact_match"\nmax_drop = 0.02\n')
    env = settings_env(settings)
    code, out, err = await run_command([*EVALQ, "gate", "set", "release", str(policy), "--json"], env)
    assert code == 0, err
    assert json.loads(out)["rules"][0]["max_drop"] == 0.02
    await worker_factory()

    async def submit(answer: str, step: int, run: str = "r1") -> tuple[int, dict[str, Any]]:
        argv = [*EVALQ, "submit", "--model", "dummy", "--tasks", TASK, "--model-args", f"response={answer}"]
        argv += ["--label", f"run={run}", "--label", f"step={step}", "--gate", "release", "--wait", "--json"]
        code, out, err = await run_command(argv, env, timeout=300)
        return code, json.loads(out.strip().splitlines()[-1]) if out.strip() else {"stderr": err}

    code, last = await submit("C", 100)
    assert (code, last.get("verdict")) == (6, "INCONCLUSIVE"), last  # no baseline yet
    code, last = await submit("A", 200)
    assert (code, last.get("verdict")) == (5, "NO-GO"), last
    code, last = await submit("C", 300)
    assert (code, last.get("verdict")) == (0, "GO"), last  # better than step 200

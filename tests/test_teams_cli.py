"""Teams from the command line: `evalq setup`'s scheduling options, `submit --priority`, `teams`,
and why a queued job waits, in `queue` and `status`, against a real nats-server and gateway."""

from __future__ import annotations

import json
from typing import Any

import pytest

from evalq import AsyncClient
from evalq.config import Settings
from evalq.errors import InvalidField, QuotaExceeded
from evalq.policy import PoolPolicy, load_policy, revised
from evalq.scheduling import TeamPolicy
from evalq.topology import Topology

from .conftest import EVALQ, run_command, settings_env
from .waiting import eventually

SUBMIT = ("submit", "--model", "dummy", "--tasks", "evalq_demo", "--json")
WIDE = {"COLUMNS": "400"}


async def evalq(settings: Settings, *args: str, **env: str) -> tuple[int, str, str]:
    return await run_command([*EVALQ, *args], settings_env(settings, **env), 120)


def test_scheduling_changes_merge_field_by_field() -> None:
    base = revised(PoolPolicy(), scheduling={"teams": {"a": {"max_queued": 2}, "b": {"share": 3}}})
    assert base.scheduling.teams == {"a": TeamPolicy(max_queued=2), "b": TeamPolicy(share=3)}
    # A team's other settings, the other teams and the pool's other settings stay.
    now = revised(base, scheduling={"teams": {"a": {"share": 2}}, "aging_s": 60}, cache="off")
    assert now.scheduling.teams == {"a": TeamPolicy(share=2, max_queued=2), "b": TeamPolicy(share=3)}
    assert (now.scheduling.aging_s, now.scheduling.half_life_s, now.cache) == (60, 3600, "off")
    # None is no limit for a setting, and removes a team.
    now = revised(now, scheduling={"teams": {"a": {"max_queued": None}, "b": None}})
    assert now.scheduling.teams == {"a": TeamPolicy(share=2)}
    with pytest.raises(ValueError, match="share"):
        revised(now, scheduling={"default_team": {"share": 0}})


async def test_setup_sets_a_teams_limits_and_the_gateway_keeps_to_them(
    settings: Settings, client: AsyncClient, nc: Any, topology: Topology
) -> None:
    code, out, err = await evalq(
        settings, "setup", "--pool", "default", "--team", "default", "--max-queued", "2", "--max-priority", "high",
        "--share", "2", "--aging", "900", "--json",
    )  # fmt: skip
    assert code == 0, err
    (change,) = json.loads(out)
    assert change["now"]["scheduling"]["teams"] == {
        "default": {"share": 2.0, "max_running_gpus": None, "max_queued": 2, "max_priority": "high"}
    }
    assert change["now"]["scheduling"]["aging_s"] == 900
    assert change["now"]["scheduling"]["preempt"] is True
    code, out, err = await evalq(settings, "setup", "--no-preempt", "--json")
    assert code == 0, err
    (change,) = json.loads(out)
    assert change["now"]["scheduling"]["preempt"] is False and change["now"]["scheduling"]["aging_s"] == 900
    # The gateway reads a pool's policy anew every few seconds.
    await eventually(
        client.teams,
        until=lambda reply: [(t.team, t.max_queued) for t in reply.teams if t.pool == "default"] == [("default", 2)],
        what="the gateway to read the team's quota",
        timeout=15,
    )

    code, _, err = await evalq(settings, *SUBMIT, "--priority", "urgent")
    assert code == 1 and "422" in err and "$.priority" in err and "'high'" in err, err
    code, _, err = await evalq(settings, *SUBMIT, "--priority", "sometimes")
    assert code == 2 and "--priority" in err
    code, out, err = await evalq(settings, *SUBMIT)
    assert code == 0, err
    first = json.loads(out)["job_id"]
    code, out, err = await evalq(settings, *SUBMIT, "--priority", "high")
    assert code == 0, err
    urgent = json.loads(out)
    assert urgent["position_in_queue"] == 0 and urgent["waiting"] is None
    info = await client.get_job(urgent["job_id"])
    assert info.request is not None and info.request.priority == "high"
    # The quota counts what the gateway's index holds: both jobs, once it has them.
    await eventually(
        client.queue,
        until=lambda state: len(state.queue.get("default", [])) == 2,
        what="both jobs in the queue",
        timeout=15,
    )

    code, _, err = await evalq(settings, *SUBMIT)
    assert code == 1 and "429" in err and "quota max_queued" in err and "'default'" in err, err
    assert "Traceback" not in err

    code, out, err = await evalq(settings, "teams", "--json")
    assert code == 0, err
    (row,) = [t for t in json.loads(out)["teams"] if t["pool"] == "default"]
    assert (row["team"], row["queued"], row["max_queued"], row["share"], row["max_priority"]) == (
        "default", 2, 2, 2.0, "high",
    )  # fmt: skip
    code, out, err = await evalq(settings, "teams", **WIDE)
    assert code == 0 and "2 / 2" in out and "high" in out, out
    code, out, _ = await evalq(settings, "teams", "--pool", "elsewhere", "--json")
    assert code == 0 and json.loads(out) == {"teams": []}

    code, out, err = await evalq(settings, "queue", "--json")
    assert code == 0, err
    rows = json.loads(out)["queue"]["default"]
    assert [(r["position"], r["job_id"], r["team"], r["priority"]) for r in rows] == [
        (0, urgent["job_id"], "default", "high"),
        (1, first, "default", "normal"),
    ]
    assert rows[0]["waiting"] is None and rows[1]["waiting"] == "behind higher priority"
    code, out, err = await evalq(settings, "queue", **WIDE)
    assert code == 0, err
    lines = [line for line in out.splitlines() if first[:8] in line or urgent["job_id"][:8] in line]
    assert len(lines) == 2 and urgent["job_id"][:8] in lines[0], out
    assert "behind higher priority" in lines[1] and "normal" in lines[1], out
    assert "for a free worker" in lines[0] and "high" in lines[0], out

    code, out, err = await evalq(settings, "status", first, **WIDE)
    assert code == 0, err
    assert any(line.split()[:1] == ["waiting"] and "behind higher priority" in line for line in out.splitlines()), out
    code, out, err = await evalq(settings, "status", first, "--json")
    assert code == 0 and json.loads(out)["waiting"] == "behind higher priority", out


async def test_the_sdk_maps_the_refusals(settings: Settings, client: AsyncClient, nc: Any, topology: Topology) -> None:
    code, _, err = await evalq(settings, "setup", "--team", "default", "--max-queued", "0", "--max-priority", "normal")
    assert code == 0, err
    await eventually(
        client.teams,
        until=lambda reply: any(t.team == "default" and t.max_queued == 0 for t in reply.teams),
        what="the gateway to read the team's quota",
        timeout=15,
    )
    with pytest.raises(InvalidField) as refused:
        await client.submit(model="dummy", tasks=["evalq_demo"], priority="high")
    assert refused.value.code == 422 and refused.value.path == "$.priority"
    with pytest.raises(QuotaExceeded) as over:
        await client.submit(model="dummy", tasks=["evalq_demo"])
    assert over.value.code == 429 and over.value.message.startswith("quota max_queued:")


async def test_setup_keeps_what_it_is_not_given(settings: Settings, nc: Any, topology: Topology) -> None:
    js = nc.jetstream()
    args = ("--team", "a", "--team", "b", "--max-queued", "5", "--half-life", "60")
    code, _, err = await evalq(settings, "setup", *args)
    assert code == 0, err
    code, out, err = await evalq(settings, "setup", "--team", "a", "--share", "3", "--max-running-gpus", "4", **WIDE)
    assert code == 0, err
    assert "pool default: policy scheduling.teams.a.share changed from 1.0 to 3.0" in out, out
    assert "scheduling.teams.b" not in out and "max_queued" not in out, out
    scheduling = (await load_policy(js, topology, "default")).scheduling
    assert scheduling.teams == {
        "a": TeamPolicy(share=3, max_queued=5, max_running_gpus=4),
        "b": TeamPolicy(max_queued=5),
    }
    assert scheduling.half_life_s == 60
    # 0 GPUs and -1 queued: no limit; `*` is every team not listed; a removed team gets its policy.
    args = ("--team", "a", "--max-running-gpus", "0", "--max-queued", "-1", "--remove-team", "b")
    code, _, err = await evalq(settings, "setup", *args)
    assert code == 0, err
    code, _, err = await evalq(settings, "setup", "--team", "*", "--max-priority", "high", "--max-queued", "10")
    assert code == 0, err
    scheduling = (await load_policy(js, topology, "default")).scheduling
    assert scheduling.teams == {"a": TeamPolicy(share=3)}
    assert scheduling.default_team == TeamPolicy(max_queued=10, max_priority="high")
    assert scheduling.team("b") == scheduling.default_team

    for bad in (("--max-queued", "3"), ("--team", "a", "--max-queued", "-2"), ("--team", "a", "--share", "0")):
        code, _, err = await evalq(settings, "setup", *bad)
        assert code == 2, (bad, err)
    assert (await load_policy(js, topology, "default")).scheduling == scheduling


async def test_teams_has_help_with_an_example(settings: Settings) -> None:
    code, out, _ = await evalq(settings, "teams", "--help")
    assert code == 0 and "Example" in out and "--pool" in out
    code, out, _ = await evalq(settings, "setup", "--help", **WIDE)
    assert code == 0 and "--max-queued" in out and "-1: no limit" in out and "--team '*'" in out

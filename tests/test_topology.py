"""Topology: names derive from the prefix; ensure() is idempotent and honours settings."""

from __future__ import annotations

from typing import Any

from evalq.topology import Topology


def test_names_follow_the_contract() -> None:
    topo = Topology()
    assert topo.work_stream("default") == "EVALQ_WORK_default"
    assert topo.work_subject("big", "j1") == "evalq.work.big.j1"
    assert topo.event_subject("j1", "queued", team="default") == "evalq.events.default.j1.queued"
    assert topo.event_subject("j1", "queued", team="ml") == "evalq.events.ml.j1.queued"
    assert topo.events_filter() == "evalq.events.>"
    assert topo.events_filter("j1") == "evalq.events.*.j1.*"
    assert topo.events_filter(kind="completed") == "evalq.events.*.*.completed"
    assert topo.events_filter(team="ml") == "evalq.events.ml.*.*"
    assert topo.events_stream == "EVALQ_EVENTS"
    assert topo.consumer == "evalq-worker"
    assert (topo.jobs_bucket, topo.idempotency_bucket, topo.workers_bucket, topo.results_bucket) == (
        "evalq-jobs",
        "evalq-idempotency",
        "evalq-workers",
        "evalq-results",
    )
    assert topo.pool_of_stream("EVALQ_WORK_big") == "big"
    assert topo.pool_of_stream("EVALQ_EVENTS") is None


async def test_ensure_twice_changes_nothing(nc: Any, topology: Topology) -> None:
    js = nc.jetstream()
    before = await js.stream_info(topology.work_stream("default"))
    consumer_before = await js.consumer_info(topology.work_stream("default"), topology.consumer)
    await topology.ensure(js)
    after = await js.stream_info(topology.work_stream("default"))
    consumer_after = await js.consumer_info(topology.work_stream("default"), topology.consumer)
    assert before.config == after.config
    assert before.created == after.created
    assert consumer_before.config == consumer_after.config
    assert await topology.pools(js) == ["default"]


async def test_work_stream_settings(nc: Any, topology: Topology) -> None:
    js = nc.jetstream()
    config = (await js.stream_info(topology.work_stream("default"))).config
    assert str(config.retention) in ("workqueue", "RetentionPolicy.WORK_QUEUE")
    assert str(config.discard) in ("new", "DiscardPolicy.NEW")
    assert str(config.storage) in ("file", "StorageType.FILE")
    assert config.max_msgs == topology.queue_limit
    assert config.duplicate_window >= 120
    assert config.num_replicas == topology.replicas == 1
    consumer = (await js.consumer_info(topology.work_stream("default"), topology.consumer)).config
    assert str(consumer.ack_policy) in ("explicit", "AckPolicy.EXPLICIT")
    assert consumer.max_deliver == -1
    events = (await js.stream_info(topology.events_stream)).config
    assert str(events.retention) in ("limits", "RetentionPolicy.LIMITS")
    assert events.max_msgs_per_subject == topology.events_per_subject


async def test_a_process_with_other_settings_reports_them_and_changes_nothing(nc: Any, topology: Topology) -> None:
    js = nc.jetstream()
    changed = Topology(prefix=topology.prefix, queue_limit=7, ack_wait=9.0)
    mismatches = await changed.ensure(js)
    assert {(m.setting, m.current, m.wanted) for m in mismatches} == {
        ("max_msgs", 1_000_000, 7),
        ("ack_wait", 5.0, 9.0),
    }
    assert "evalq setup" in str(mismatches[0])
    assert (await js.stream_info(topology.work_stream("default"))).config.max_msgs == 1_000_000
    consumer = await js.consumer_info(topology.work_stream("default"), topology.consumer)
    assert consumer.config.ack_wait == topology.ack_wait == 5.0
    assert await changed.ack_wait_of(js, "default") == 5.0


async def test_setup_applies_a_changed_setting(nc: Any, topology: Topology) -> None:
    js = nc.jetstream()
    changed = Topology(prefix=topology.prefix, queue_limit=7, ack_wait=9.0)
    assert await changed.ensure(js, update=True) == []
    assert (await js.stream_info(topology.work_stream("default"))).config.max_msgs == 7
    consumer = await js.consumer_info(topology.work_stream("default"), topology.consumer)
    assert consumer.config.ack_wait == 9.0
    assert await changed.ensure(js) == [], "once applied, nothing differs"


async def test_pools_are_created_on_demand(nc: Any, topology: Topology) -> None:
    js = nc.jetstream()
    assert not await topology.has_pool(js, "big")
    await topology.ensure_pool(js, "big")
    assert await topology.pools(js) == ["big", "default"]


async def test_a_duration_that_does_not_survive_nanoseconds_is_no_mismatch(nc: Any, topology: Topology) -> None:
    js = nc.jetstream()
    odd = Topology(prefix=topology.prefix, ack_wait=1.001)
    await odd.ensure(js, update=True)
    assert await odd.ensure(js) == [], "1.001 s comes back as 1.000999999 s: the same setting"

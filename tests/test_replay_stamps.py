"""A replay's Kafka times are a function of its events alone (``flows.replay``).

They cut the input into the flow's processing steps. Stamped with the wall clock as
they were produced, two replays of one file could cut it differently, and so order two
events of one customer at the same millisecond in two topics differently, or see
other events as late (docs/triggers.md, "Lateness"): the note of issue 38, round 3.
"""

from __future__ import annotations

import orjson
import pytest
from confluent_kafka import Consumer, KafkaError, TopicPartition
from hypothesis import given
from hypothesis import strategies as st

from crmstream.config import load_config
from crmstream.flows import replay as replay_mod
from crmstream.flows.replay import (
    REPLAY_EVENTS_PER_SECOND,
    ReplayError,
    replay_last_stamp,
    replay_stamps,
)
from crmstream.flows.runtime import Endpoints
from tests.conftest import T0_MS, isolated, read_topic, run_flow


@given(
    count=st.integers(0, 3 * REPLAY_EVENTS_PER_SECOND),
    step_ms=st.integers(1, 60_000),
    now_ms=st.integers(0, 2**42),
)
def test_the_stamps_follow_a_steady_rate_from_the_step_now_is_in(count, step_ms, now_ms):
    stamps = list(replay_stamps(count, step_ms, now_ms))
    assert len(stamps) == count
    if not count:
        return
    first = stamps[0]
    assert first <= now_ms < first + step_ms and first % step_ms == 0
    assert stamps[-1] == replay_last_stamp(count, step_ms, now_ms)
    assert all(s % step_ms == 0 for s in stamps)
    # event i is stamped with the step it would be produced in at the steady rate
    produced = [i * 1000 / REPLAY_EVENTS_PER_SECOND for i in range(count)]
    assert all(
        s - first <= at < s - first + step_ms for s, at in zip(stamps, produced, strict=True)
    )


def test_a_default_step_holds_20000_events():
    stamps = list(replay_stamps(45_000, 1000, 5_500))
    assert stamps[0] == 5_000
    assert [stamps.count(5_000 + k * 1000) for k in range(3)] == [20_000, 20_000, 5_000]


def test_a_replay_whose_times_would_pass_the_future_skew_is_refused_before_producing():
    """Kafka times past now + processing.max_future_skew_seconds move no step, and
    whether a time is past it depends on when the flow reads it: such a replay would
    not be deterministic (with no step at all, its events were dropped: outsider 46).
    Refused before anything is produced (no broker here)."""
    config = load_config(None, ["processing.max_future_skew_seconds=1"], env={})
    events = [("t", b"k", b"{}")] * 60_001  # 3 s at 20,000 a second
    nowhere = Endpoints(brokers=["127.0.0.1:1"], redis_url="redis://127.0.0.1:1/0")
    said = r"60,001 events .* processing.max_future_skew_seconds \(1 s\)"
    with pytest.raises(ReplayError, match=said):
        replay_mod.produce_events(nowhere, config, events, None)
    replay_mod.produce_events(nowhere, config, [], None)  # nothing to produce: no error


def _stamps(brokers: list[str], topic: str, partitions: int) -> list[tuple[bytes, int]]:
    """(value, Kafka time) of every record on ``topic``, partition by partition."""
    settings = {"bootstrap.servers": ",".join(brokers), "group.id": "stamps",
                "enable.partition.eof": True, "auto.offset.reset": "earliest"}  # fmt: skip
    consumer = Consumer(settings)
    try:
        consumer.assign([TopicPartition(topic, p, 0) for p in range(partitions)])
        got, ended = [], set()
        while len(ended) < partitions:
            msg = consumer.poll(10)
            assert msg is not None, f"{topic}: no end after {len(got)} records"
            if msg.error():
                assert msg.error().code() == KafkaError._PARTITION_EOF, msg.error().str()
                ended.add(msg.partition())
                continue
            got.append((msg.value(), msg.timestamp()[1]))
        return got
    finally:
        consumer.close()


def _history() -> list[tuple[str, str, str, dict]]:
    """(role, customer, type, fields): ties at one millisecond across two topics."""
    rows = []
    for n in range(6):
        c = f"c{n}"
        rows += [
            ("clickstream", c, "session_start", {}),
            ("clickstream", c, "add_to_cart", {"product_id": "p1", "category": "shoes"}),
            ("customers", c, "consent_withdrawn" if n % 2 else "profile_updated",
             {"channel": "email"} if n % 2 else {"email": f"{c}@example.com"}),
        ]  # fmt: skip
    return rows  # then an event 3 h on (_LATER): the carts' timers fall due


_LATER = ("clickstream", "z", "session_start", {})


@pytest.mark.integration
def test_two_replays_of_one_file_cut_the_same_steps_and_give_the_same_triggers(stack, monkeypatch):
    """Three events a step (a rate of 3 a second, not 20,000), so the small file spans
    steps; each of two
    replays into its own topics stamps every record as the other does (a step apart per
    three records, whatever the producing took), and their triggers are the same."""
    monkeypatch.setattr(replay_mod, "REPLAY_EVENTS_PER_SECOND", 3)
    runs = []
    for _ in range(2):
        config = isolated(stack, partitions=1)
        topics = config.kafka.topics.by_role
        events = []
        for k, (role, customer, kind, fields) in enumerate([*_history(), _LATER]):
            at = T0_MS + (k // 3) * 1000 + (3 * 3_600_000 if customer == "z" else 0)
            body = {"event_id": f"{customer}-{k}", "customer_id": customer,
                    "event_type": kind, "event_time": at, **fields}  # fmt: skip
            events.append((topics[role], customer.encode(), orjson.dumps(body)))
        replay_mod.replay(stack, config, events)
        stamps = {}
        for role in ("clickstream", "customers"):
            for value, ts in _stamps(list(stack.brokers), topics[role], 1):
                stamps[value] = ts
        first = min(stamps.values())
        relative = [stamps[value] - first for _topic, _key, value in events]
        step = config.processing.step_ms
        assert relative == [(i // 3) * step for i in range(len(events))]
        triggers = read_topic(stack, config.kafka.topics.triggers, idle_s=1.0)
        suppressed = read_topic(stack, config.kafka.topics.suppressions, idle_s=1.0)
        runs.append((
            sorted((t["trigger_id"], t["trigger_type"], t["customer_id"]) for t in triggers),
            sorted((s["trigger_id"], s.get("policy")) for s in suppressed),
        ))  # fmt: skip
    assert runs[0][0], "no trigger: the comparison would be empty"
    assert runs[0] == runs[1]


@pytest.mark.integration
def test_records_without_a_key_go_to_one_partition_in_every_replay(stack):
    """A line with no readable customer_id is produced without a key; librdkafka's
    default partitioner sent each such record to a random partition, so two replays of
    one file put its dead letters (and the offsets after them) in different places
    (outsider 46). Now they all go to one partition, in file order."""
    placed = []
    for _ in range(2):
        config = isolated(stack, partitions=4)
        topic = config.kafka.topics.clickstream
        events = [(topic, None, b'{"event_type": "page_view", "n": %d}' % k) for k in range(12)]
        replay_mod.produce_events(stack, config, events, None)
        placed.append(_partitions(list(stack.brokers), topic, 4))
    assert len(set(placed[0].values())) == 1, placed[0]
    assert placed[0] == placed[1]


def _partitions(brokers: list[str], topic: str, partitions: int) -> dict[bytes, int]:
    """Each record's value -> the partition it is in."""
    settings = {"bootstrap.servers": ",".join(brokers), "group.id": "where",
                "enable.partition.eof": True, "auto.offset.reset": "earliest"}  # fmt: skip
    consumer = Consumer(settings)
    try:
        consumer.assign([TopicPartition(topic, p, 0) for p in range(partitions)])
        got, ended = {}, set()
        while len(ended) < partitions:
            msg = consumer.poll(10)
            assert msg is not None, f"{topic}: no end after {len(got)} records"
            if msg.error():
                ended.add(msg.partition())
                continue
            got[msg.value()] = msg.partition()
        return got
    finally:
        consumer.close()


@pytest.mark.integration
def test_a_replay_onto_topics_holding_unapplied_records_is_refused_before_producing(stack):
    """An outsider replayed a file twice onto the same topics (`--brokers`) into a new
    key prefix: the flow read the topics from offset 0, and 145 customers were counted
    twice, exit 0. Now refused before anything is produced; once the flow has applied
    what the topics hold, the replay goes on."""
    config = isolated(stack, partitions=1)
    topic = config.kafka.topics.clickstream
    old = [(topic, b"c1", orjson.dumps({"event_id": f"old-{k}", "customer_id": "c1",
                                        "event_type": "page_view", "event_time": T0_MS + k}))
           for k in range(3)]  # fmt: skip
    replay_mod.produce_events(stack, config, old, None)
    body = {"event_id": "new-0", "customer_id": "c2", "event_type": "page_view",
            "event_time": T0_MS}  # fmt: skip
    new = [(topic, b"c2", orjson.dumps(body))]
    with pytest.raises(ReplayError, match=rf"{topic}\[0\] from offset 0\. The replay would"):
        replay_mod.replay(stack, config, new)
    assert len(_partitions(list(stack.brokers), topic, 1)) == 3  # nothing produced
    run_flow(config, stack)  # the state applies what the topic holds
    replay_mod.replay(stack, config, new)
    assert len(_partitions(list(stack.brokers), topic, 1)) == 4

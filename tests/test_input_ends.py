"""The flow's start compares what Redis says each shard applied with what the input
partitions hold.

An outsider found that a progress offset past a partition's end (99999999 in one
shard's progress hash) made that shard skip the partition's new events without a word:
each shard drops what is at or below its applied offset as already applied. The same
happens when a topic is deleted and created again, or when the broker loses its data
(Tansu, in memory, does on a restart) while Redis keeps the state. The start now refuses
that state, naming the partition, its end, the offset and the shard.
"""

from __future__ import annotations

import orjson
import pytest
from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from crmstream.flows.input_ends import problems
from crmstream.metrics import get_metrics
from crmstream.state.store import Progress, encode_progress
from tests.conftest import T0_MS, isolated, run_flow
from tests.test_cli_errors import crm, one_line_error

pytestmark = pytest.mark.integration

HELD = {0: 5, 1: 3, 2: 0}  # messages per partition of the topic the property reads


@pytest.fixture(scope="module")
def held(stack):
    """A topic whose partition 0 holds 5 messages in one record batch (Tansu then lists
    its end as 1: the last batch's base offset plus one), partition 1 three, each its
    own batch, and partition 2 none."""
    config = isolated(stack, partitions=3)
    topic = config.kafka.topics.clickstream
    producer = Producer({"bootstrap.servers": ",".join(stack.brokers), "linger.ms": 100})
    for _ in range(HELD[0]):
        producer.produce(topic, b"{}", b"k", partition=0)
    assert producer.flush(30) == 0
    for _ in range(HELD[1]):
        producer.produce(topic, b"{}", b"k", partition=1)
        assert producer.flush(30) == 0
    config = {"bootstrap.servers": ",".join(stack.brokers), "group.id": "ends"}
    yield AdminClient({"bootstrap.servers": ",".join(stack.brokers)}), config, topic


@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])  # fmt: skip
@given(
    offset=st.integers(-1, 8) | st.integers(0, 2**62),
    shard=st.integers(0, 63),
    partition=st.sampled_from([*sorted(HELD), 3]),  # 3: no such partition
)
def test_an_applied_offset_at_or_past_the_end_is_named(held, offset, shard, partition):
    admin, config, topic = held
    applied = {(topic, partition): (offset, shard)} if offset >= 0 else {}
    found = problems(admin, config, applied, {(topic, partition): (offset + 1, 0)})
    if partition not in HELD:
        named = f"{topic}[{partition}] does not exist, but shard {shard} has applied its "
        assert found == ([f"{named}events up to offset {offset}"] if offset >= 0 else [])
    elif offset < HELD[partition]:
        assert found == []
    else:
        assert found == [
            f"{topic}[{partition}] ends at offset {HELD[partition]}, but shard {shard} has "
            f"applied its events up to offset {offset}"
        ]


def test_partitions_are_named_in_order_each_once(held):
    """Every partition at once (one request for all their offsets), a missing one too."""
    admin, config, topic = held
    applied = {(topic, 4): (4, 4), (topic, 2): (2, 2), (topic, 1): (4, 1), (topic, 0): (4, 0)}
    assert problems(admin, config, applied, {}) == [
        f"{topic}[1] ends at offset 3, but shard 1 has applied its events up to offset 4",
        f"{topic}[2] ends at offset 0, but shard 2 has applied its events up to offset 2",
        f"{topic}[4] does not exist, but shard 4 has applied its events up to offset 4",
    ]


def _events(customer: str, count: int, first: int) -> list[bytes]:
    return [
        orjson.dumps({
            "event_id": f"{customer}-{first + i}", "customer_id": customer,
            "event_type": "page_view", "event_time": T0_MS + (first + i) * 1000,
        })
        for i in range(count)
    ]  # fmt: skip


def test_a_shard_with_progress_past_the_end_stops_the_start_and_loses_nothing(stack):
    """One shard's progress raised past the partition's end by hand: `crmstream run`
    ends in one line naming it, and no event is skipped; once the field is put right,
    the flow applies the new events."""
    config = isolated(stack, partitions=1)
    topic = config.kafka.topics.clickstream
    producer = Producer({"bootstrap.servers": ",".join(stack.brokers)})
    for value in _events("c1", 3, 0):
        producer.produce(topic, value, b"c1", partition=0)
    assert producer.flush(30) == 0
    runtime = run_flow(config, stack)
    store = runtime.store
    shards = config.processing.shards
    applied = store.applied_offsets(shards, [(topic, 0)])
    assert applied[(topic, 0)][0] == 2, applied
    shard = applied[(topic, 0)][1]
    key = store.progress_key(shard)
    client = store.client
    kept = client.hget(key, f"{topic}|0")
    held = Progress.decode(kept)
    client.hset(key, mapping=encode_progress({(topic, 0): held._replace(offset=99_999_999)}))
    for value in _events("c1", 2, 3):
        producer.produce(topic, value, b"c1", partition=0)
    assert producer.flush(30) == 0

    sets = [f"kafka.topics.{role}={name}" for role, name in config.kafka.topics.by_role.items()]
    sets += [f"redis.key_prefix={config.redis.key_prefix}", "metrics.enabled=false",
             "kafka.partitions=1"]  # fmt: skip
    args = ["run", "--brokers", ",".join(stack.brokers), "--redis-url", stack.redis_url]
    for item in sets:
        args += ["--set", item]
    said = f"shard {shard} has applied its events up to offset 99999999"
    line = one_line_error(crm(*args), f"{topic}[0] ends at offset 5", said)
    assert "clean state" in line

    client.hset(key, f"{topic}|0", kept)  # put right: the two new events are applied
    metrics = get_metrics()
    accepted = metrics.events_in.labels(topic, "page_view")._value.get()
    skipped = metrics.skipped_events.labels(topic)._value.get()
    run_flow(config, stack)
    assert store.applied_offsets(shards, [(topic, 0)])[(topic, 0)][0] == 4
    assert metrics.events_in.labels(topic, "page_view")._value.get() == accepted + 2
    assert metrics.skipped_events.labels(topic)._value.get() == skipped

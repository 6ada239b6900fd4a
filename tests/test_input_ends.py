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

import time
from zlib import crc32

import orjson
import pytest
from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from crmstream.flows.input_ends import _iso, problems
from crmstream.flows.source import CrmKafkaSource, SourceError
from crmstream.metrics import get_metrics
from crmstream.state.store import Progress, encode_progress
from tests.conftest import T0_MS, isolated, run_flow
from tests.test_cli_errors import crm, one_line_error

pytestmark = pytest.mark.integration

HELD = {0: 5, 1: 3, 2: 0, 3: 2}  # messages per partition of the topic the property reads
MISSING = 4  # no such partition


def _stamp(partition: int, offset: int) -> int:
    """The Kafka time the fixture gives the record at ``offset`` of ``partition``:
    partition 3's are before 1970 (a librdkafka producer may set them)."""
    if partition == 3:
        return -5000 - offset
    return T0_MS + partition * 1000 + offset


def _value(partition: int, offset: int) -> bytes:
    return b'{"p": %d, "o": %d}' % (partition, offset)


@pytest.fixture(scope="module")
def held(stack):
    """A topic whose partition 0 holds 5 messages in one record batch (Tansu then lists
    its end as 1: the last batch's base offset plus one), partition 1 three, each its
    own batch, partition 2 none and partition 3 two stamped before 1970."""
    config = isolated(stack, partitions=4)
    topic = config.kafka.topics.clickstream
    producer = Producer({"bootstrap.servers": ",".join(stack.brokers), "linger.ms": 100})
    for p in (0, 3):
        for i in range(HELD[p]):
            producer.produce(topic, _value(p, i), b"k", partition=p, timestamp=_stamp(p, i))
    assert producer.flush(30) == 0
    for i in range(HELD[1]):
        producer.produce(topic, _value(1, i), b"k", partition=1, timestamp=_stamp(1, i))
        assert producer.flush(30) == 0
    config = {"bootstrap.servers": ",".join(stack.brokers), "group.id": "ends"}
    yield AdminClient({"bootstrap.servers": ",".join(stack.brokers)}), config, topic


@settings(max_examples=20, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])  # fmt: skip
@given(
    offset=st.integers(-1, 8) | st.integers(0, 2**62),
    shard=st.integers(0, 63),
    partition=st.sampled_from([*sorted(HELD), MISSING]),
)
# each partition's end and the offset before it, whatever is drawn
@example(offset=4, shard=1, partition=0).via("the last record")
@example(offset=5, shard=1, partition=0).via("the end")
@example(offset=2, shard=2, partition=1).via("the last record")
@example(offset=3, shard=2, partition=1).via("the end")
@example(offset=0, shard=3, partition=2).via("an empty partition's end")
@example(offset=1, shard=3, partition=3).via("the last record")
@example(offset=2, shard=3, partition=3).via("the end")
@example(offset=0, shard=4, partition=MISSING).via("no such partition")
def test_an_applied_offset_at_or_past_the_end_is_named(held, offset, shard, partition):
    admin, config, topic = held
    applied = {(topic, partition): (offset, shard, -1, -1)} if offset >= 0 else {}
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


@settings(max_examples=30, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])  # fmt: skip
@given(
    at=st.sampled_from([(p, k) for p in (0, 1, 3) for k in range(HELD[p])]),
    shift=st.sampled_from([None, 0, 0, 1, -1, 1000, -(2**40)]),  # None: not known
    other_bytes=st.sampled_from([None, False, False, True]),  # None: not known
    shard=st.integers(0, 63),
)
def test_another_record_at_the_applied_offset_is_named(held, at, shift, other_bytes, shard):
    """Input written again past the old offsets (a broker that lost its data, then
    producers): the record at the applied offset has another Kafka time, or other bytes,
    than the one the progress keeps. Found at any offset within the partition, not only
    at its end; what the progress does not know is not compared."""
    admin, config, topic = held
    partition, offset = at
    stamp = -1 if shift is None else _stamp(partition, offset) + shift
    digest = crc32(_value(partition, offset))
    digest = -1 if other_bytes is None else digest ^ 1 if other_bytes else digest
    if (shift is None or other_bytes is None) and stamp == -1 and digest == -1:
        return  # nothing known: compared by the end only (the property above)
    found = problems(admin, config, {(topic, partition): (offset, shard, stamp, digest)}, {})
    differs = (shift is not None and shift != 0) or other_bytes is True
    if not differs:
        assert found == []
    else:
        assert len(found) == 1, found
        assert found[0].startswith(
            f"{topic}[{partition}] holds another record at offset {offset} than the one "
            f"shard {shard} applied (Kafka time "
        ), found
        said = "as then, other bytes)" if not shift else f"not {_iso(stamp)})"
        assert found[0].endswith(said), found


def test_partitions_are_named_in_order_each_once(held):
    """Every partition at once (one request for all their offsets), a missing one too."""
    admin, config, topic = held
    applied = {(topic, 4): (4, 4, -1, -1), (topic, 2): (2, 2, 9, 9), (topic, 1): (4, 1, -1, -1),
               (topic, 0): (4, 0, _stamp(0, 4), crc32(_value(0, 4)))}  # fmt: skip
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


def test_each_shard_keeps_the_kafka_time_of_the_record_it_applied_last(stack):
    """The flow's progress keeps, per partition, the Kafka time of the record at its
    offset (route → sequencer → progress), for every shard; a start that finds another
    record there refuses, naming both times, and applies nothing."""
    config = isolated(stack, "processing.shards=2", partitions=1)
    topic = config.kafka.topics.clickstream
    producer = Producer({"bootstrap.servers": ",".join(stack.brokers), "linger.ms": 50})
    values = _events("c1", 3, 0) + _events("c2", 3, 0)
    for k, value in enumerate(values):
        producer.produce(topic, value, b"c", partition=0, timestamp=T0_MS + 7 * k)
    assert producer.flush(30) == 0
    runtime = run_flow(config, stack)
    store = runtime.store
    for shard in range(2):
        progress = store.load_progress(shard)
        assert progress[(topic, 0)].offset == 5 and progress[(topic, 0)].stamp == T0_MS + 35
        assert progress[(topic, 0)].digest == crc32(values[5])
    # As if the partition had been written again: the shards kept another time there.
    for shard in range(2):
        key = store.progress_key(shard)
        changed = Progress.decode(store.client.hget(key, f"{topic}|0"))._replace(stamp=T0_MS + 36)
        store.client.hset(key, mapping=encode_progress({(topic, 0): changed}))
    with pytest.raises(Exception) as raised:  # before Bytewax starts: the error itself
        run_flow(config, stack)
    said = str(raised.value)
    assert f"{topic}[0] holds another record at offset 5 than the one shard 0 applied" in said
    assert "2026-01-01T00:00:00.035+00:00, not 2026-01-01T00:00:00.036+00:00" in said, said


@pytest.mark.parametrize("first_ms", [-5000, 2 * 86_400_000], ids=["before-1970", "2-days-ahead"])
def test_a_partitions_first_records_are_applied_whatever_their_kafka_time(stack, first_ms):
    """A librdkafka producer may stamp a record before 1970 (Kafka's Java producer may
    not), or days ahead. Such records first in a partition moved no step, so they stayed
    in step -1, which is no step: the shards dropped them without a word. Now they are
    applied; their Kafka time goes into the progress as it is, and every later start
    reads that progress (an outsider's record stamped -5000 made every start refuse it)."""
    config = isolated(stack, partitions=1)
    topic = config.kafka.topics.clickstream
    first = first_ms if first_ms < 0 else int(time.time() * 1000) + first_ms
    producer = Producer({"bootstrap.servers": ",".join(stack.brokers)})
    for k, value in enumerate(_events("c1", 2, 0)):
        producer.produce(topic, value, b"c1", partition=0, timestamp=first + k)
    assert producer.flush(30) == 0
    metrics = get_metrics()
    accepted = metrics.events_in.labels(topic, "page_view")._value.get()
    runtime = run_flow(config, stack)
    assert metrics.events_in.labels(topic, "page_view")._value.get() == accepted + 2
    shard = runtime.store.applied_offsets(config.processing.shards)[(topic, 0)][1]
    assert runtime.store.load_progress(shard)[(topic, 0)].stamp == first + 1
    for value in _events("c1", 1, 2):
        producer.produce(topic, value, b"c1", partition=0, timestamp=first + 2)
    assert producer.flush(30) == 0
    again = run_flow(config, stack)
    assert again.store.applied_offsets(config.processing.shards)[(topic, 0)][0] == 2
    assert metrics.events_in.labels(topic, "page_view")._value.get() == accepted + 3


def test_the_refusal_names_five_partitions_and_counts_the_rest(held, stack):
    """An outsider's refusal named 200 partitions in 17,962 bytes, which container log
    drivers split (16 KiB): at most five are named, then how many more."""
    _admin, _config, topic = held
    source = CrmKafkaSource(list(stack.brokers), [topic], {}, lambda positions: {}, 100, 1000,
                            tail=False)  # fmt: skip
    applied = {(topic, p): (9, p, -1, -1) for p in range(7)}  # 0-3 past the end, 4-6 missing
    with pytest.raises(SourceError) as raised:
        source.check_input_ends(applied, {})
    said = str(raised.value)
    named = [f"{topic}[{p}]" for p in range(7) if f"{topic}[{p}]" in said]
    assert named == [f"{topic}[{p}]" for p in range(5)], said
    assert "; and 2 more. The topic was deleted" in said, said

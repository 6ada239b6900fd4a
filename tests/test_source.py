"""The source: its stall warning (what it says depends on whether other partitions
deliver), and its consumer's settings."""

from __future__ import annotations

import itertools
import logging

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from crmstream.flows.source import STALL_SECONDS, CrmKafkaSource, _Partition, _WorkerReader


# The stall clock is monotonic time, a large float: 1020.1811269051169 + 5.0 - itself comes
# out as 4.99999999999989, which once reported a 5 s stall 3 s late ("8 s"; issue 35).
@pytest.mark.parametrize("start", [1000.0, 1020.1811269051169, 4095.9894697332443])
@pytest.mark.parametrize(
    "others_got_data, says, not_says",
    [
        (False, "is the broker reachable?", "waits behind them"),
        (True, "other partitions are delivering, so it waits behind them", "reachable?"),
    ],
    ids=["nothing-delivers", "others-deliver"],
)
def test_a_stalled_partition_is_reported_once_and_its_recovery_too(
    caplog, others_got_data, says, not_says, start
):
    from prometheus_client import REGISTRY

    def stalls() -> float:
        value = REGISTRY.get_sample_value("crmstream_source_stalls_total", {"topic": "crm.orders"})
        return value or 0.0

    before = stalls()
    stall_s = 5.0
    part = _Partition("crm.orders", 3, start_offset=120, start_step=0)
    part.last_data = start  # times are given, never read from the clock
    with caplog.at_level(logging.WARNING, logger="crmstream.flows.source"):
        _WorkerReader._watch_stall(part, False, start + stall_s - 0.1, others_got_data, stall_s)
        assert not caplog.records  # not yet
        for late in (stall_s, stall_s + 3):
            _WorkerReader._watch_stall(part, False, start + late, others_got_data, stall_s)
        _WorkerReader._watch_stall(part, True, start + stall_s + 4, others_got_data, stall_s)
    stalled, again = [r.getMessage() for r in caplog.records]
    assert stalled.startswith("crm.orders[3]: no data for 5 s although not read to its end at "
                              "offset 120: ")  # fmt: skip
    assert says in stalled and not_says not in stalled
    assert again == "crm.orders[3]: data again after 9.0 s"
    assert stalls() - before == 1  # counted once, as logged (docs/metrics.md)


def test_the_stall_warning_waits_30_s_by_default():
    """Under CPU load a healthy broker's partitions went 5 s without data 43 times in 20
    minutes, each a warning; the default now waits kafka.stall_warning_seconds (30 s)."""
    from crmstream.config import load_config

    assert STALL_SECONDS == 30.0
    assert load_config(env={}).kafka.stall_warning_seconds == STALL_SECONDS
    part = _Partition("crm.orders", 3, start_offset=120, start_step=0)
    part.last_data = 1000.0
    _WorkerReader._watch_stall(part, False, 1000.0 + 29.0, False)
    assert not part.stalled
    _WorkerReader._watch_stall(part, False, 1000.0 + 30.0, False)
    assert part.stalled


def test_the_consumer_fetches_soon_after_its_full_queue_drained_unless_told_otherwise():
    def config(client: dict) -> dict:
        source = CrmKafkaSource(["b:9092"], ["crm.clickstream"], client, dict, 2000, 1000, False)
        return source.consumer_config()

    default = config({})
    # librdkafka's own 1000 ms left the flow waiting while catching up (RESULTS.md, round 13)
    assert default["fetch.queue.backoff.ms"] == 20 and default["fetch.wait.max.ms"] == 50
    tuned = config({"fetch.queue.backoff.ms": 100, "group.id": "mine", "linger.ms": 5})
    assert tuned["fetch.queue.backoff.ms"] == 100 and tuned["linger.ms"] == 5
    assert tuned["group.id"] == "crmstream-source"  # partitions are assigned, never a group's
    assert tuned["enable.partition.eof"] is True


# -- a producer's clock far ahead ---------------------------------------------------------
T0 = 1_767_258_600_000  # 2026-01-01T09:10:00Z: the processing clock of these reads
STEP_MS = 60_000
SKEW_MS = 86_400_000  # processing.max_future_skew_seconds, the default day
_topics = itertools.count()


def _steps(stack, stamps: list[int]) -> list[int]:
    """The steps the source gives messages with these Kafka timestamps, in one partition
    read from its start (the processing clock at ``T0``)."""
    from confluent_kafka import Producer
    from confluent_kafka.admin import AdminClient, NewTopic

    topic = f"source-stamps-{next(_topics)}"
    brokers = ",".join(stack.brokers)
    admin = AdminClient({"bootstrap.servers": brokers})
    admin.create_topics([NewTopic(topic, 1)])[topic].result(30)
    producer = Producer({"bootstrap.servers": brokers})
    for k, ts in enumerate(stamps):
        producer.produce(topic, b"%d" % k, b"k", timestamp=ts)
    assert producer.flush(30) == 0

    def starts(mine: list) -> dict:
        return {p: (0, -1) for p in mine}

    source = CrmKafkaSource(list(stack.brokers), [topic], {}, starts, 500, STEP_MS, False,
                            clock_ms=lambda: T0, max_future_ms=SKEW_MS)  # fmt: skip
    reader = source.build("s", 0, 1)
    got: dict[int, int] = {}
    try:
        while len(got) < len(stamps):
            for msg in reader.next_batch():
                if msg.value is not None:
                    got[int(msg.value)] = msg.step
    except StopIteration:
        pass
    finally:
        reader.close()
    return [got[k] for k in range(len(stamps))]


@pytest.mark.integration
@settings(max_examples=6, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])  # fmt: skip
@given(
    normal=st.lists(st.integers(-3 * STEP_MS, 3 * STEP_MS), min_size=1, max_size=8),
    outliers=st.lists(st.tuples(st.integers(0, 8), st.integers(1, 10**15)), max_size=3),
)  # fmt: skip
def test_a_timestamp_beyond_the_future_skew_moves_no_step(stack, normal, outliers):
    """A message stamped more than ``processing.max_future_skew_seconds`` past the
    processing clock (a producer's clock in 2100, say) leaves its partition's step where
    it was: every other message gets the step it gets without it (docs/triggers.md)."""
    stamps = [T0 + d for d in normal]
    mixed = list(stamps)
    at = []
    for pos, beyond in sorted(outliers, reverse=True):
        pos = min(pos, len(mixed))
        mixed.insert(pos, T0 + SKEW_MS + beyond)
        at = [a + 1 if a >= pos else a for a in at] + [pos]
    steps = _steps(stack, mixed)
    assert [s for k, s in enumerate(steps) if k not in at] == _steps(stack, stamps)
    assert all(s <= (T0 + 3 * STEP_MS) // STEP_MS for s in steps)


@pytest.mark.integration
def test_a_timestamp_at_the_future_skew_still_moves_the_step(stack):
    edge = T0 + SKEW_MS
    assert _steps(stack, [T0, edge, T0 + 1]) == [T0 // STEP_MS, edge // STEP_MS, edge // STEP_MS]
    assert _steps(stack, [T0, edge + 1, T0 + 1]) == [T0 // STEP_MS] * 3


@given(
    read_to=st.integers(0, 10**6),
    ends=st.lists(st.integers(-1, 10**6 + 5), min_size=1, max_size=8),
)
def test_an_end_below_where_the_partition_was_read_to_is_said_once_each_time(read_to, ends):
    """A running flow whose broker lost its data (or whose topic was created again) sees
    the partition's end fall below where it read it to (outsider 45: it then skipped the
    new events in silence). Said once as an error when it falls, once when it is back;
    -1 (no fetch answer yet) is no end."""
    part = _Partition("crm.orders", 3, start_offset=read_to, start_step=0)
    handler = _Collect()
    logger = logging.getLogger("crmstream.flows.source")
    logger.addHandler(handler)
    try:
        for high in ends:
            _WorkerReader._watch_shrink(part, high)
    finally:
        logger.removeHandler(handler)
    expected, shrunk = [], False
    for high in ends:
        now = 0 <= high < read_to
        if now and not shrunk:
            expected.append(("ERROR", f"crm.orders[3] now ends at offset {high}, before offset "
                                      f"{read_to}, which the flow has read it to"))  # fmt: skip
        elif shrunk and not now:
            expected.append(("WARNING", f"crm.orders[3] ends at offset {high} again"))
        shrunk = now
    got = [(r.levelname, r.getMessage()) for r in handler.records]
    assert len(got) == len(expected), (got, expected)
    for (level, message), (want_level, start) in zip(got, expected, strict=True):
        assert level == want_level and message.startswith(start), (message, start)


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

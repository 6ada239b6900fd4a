"""Partitions added to an input topic while the flow runs: the flow reads the partitions it
listed at its start, so it must say when a topic has more (flows/partition_watch.py)."""

from __future__ import annotations

import logging
from concurrent.futures import Future
from types import SimpleNamespace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import REGISTRY

from crmstream.flows.partition_watch import NAMED, PartitionWatch, describe_with
from crmstream.flows.source import CrmKafkaSource
from crmstream.topics import admin_client

_LOGGER = "crmstream.flows.partition_watch"


def _unread(topic: str) -> float | None:
    return REGISTRY.get_sample_value("crmstream_input_partitions_unread", {"topic": topic})


class Broker:
    """Answers ``describe`` with the partition counts set on it; each question's futures
    stay open until ``answer`` (a broker that takes its time)."""

    def __init__(self, counts: dict[str, int]):
        self.counts = dict(counts)
        self.asked: list[list[str]] = []
        self.open: dict[str, Future] = {}
        self.refuse = False

    def describe(self, topics: list[str]) -> dict[str, Future]:
        if self.refuse:
            raise RuntimeError("broker down")
        self.asked.append(topics)
        self.open = {t: Future() for t in topics}
        return self.open

    def answer(self, fail: str | None = None) -> None:
        for topic, future in self.open.items():
            if topic == fail:
                future.set_exception(RuntimeError("unknown topic"))
            else:
                parts = [SimpleNamespace(id=i) for i in range(self.counts[topic])]
                future.set_result(SimpleNamespace(partitions=parts))


def test_added_partitions_are_named_counted_and_warned_about_once(caplog):
    broker = Broker({"w1.orders": 2, "w1.clicks": 3})
    watch = PartitionWatch(broker.describe, {"w1.orders": [0, 1], "w1.clicks": [0, 1, 2]},
                           every_s=60)  # fmt: skip
    with caplog.at_level(logging.DEBUG, logger=_LOGGER):
        watch.poll(1000.0)  # asks at once
        assert broker.asked == [["w1.orders", "w1.clicks"]]
        watch.poll(1001.0)  # no answer yet: nothing taken, nothing asked, no wait
        assert len(broker.asked) == 1 and watch.unread["w1.orders"] == []
        broker.answer()
        watch.poll(1002.0)
        assert watch.unread == {"w1.orders": [], "w1.clicks": []}
        assert _unread("w1.orders") == 0
        broker.counts["w1.orders"] = 9  # partitions added
        watch.poll(1059.0)  # not due yet
        assert len(broker.asked) == 1
        watch.poll(1060.0)
        broker.answer()
        watch.poll(1061.0)
        assert watch.unread["w1.orders"] == list(range(2, 9))
        assert _unread("w1.orders") == 7 and _unread("w1.clicks") == 0
        for at in (1120.0, 1180.0):  # the same count again: said once
            watch.poll(at)
            broker.answer()
            watch.poll(at + 1)
        assert len(broker.asked) == 4
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == [
        "w1.orders now has 9 partitions; this flow reads the 2 it found at its start. Events "
        f"in {', '.join(f'w1.orders[{p}]' for p in range(2, 2 + NAMED))} and 2 more wait "
        "unread until every process restarts (the start reads them from their first offset): "
        'restart the flow (docs/operations.md, "Adding input partitions")'
    ]


def test_a_broker_that_fails_to_answer_changes_nothing_and_is_asked_again(caplog):
    broker = Broker({"w2.orders": 4})
    watch = PartitionWatch(broker.describe, {"w2.orders": [0, 1]}, every_s=60)
    broker.refuse = True
    watch.poll(0.0)  # raised inside: not out of poll
    assert broker.asked == [] and _unread("w2.orders") == 0
    broker.refuse = False
    watch.poll(30.0)  # not due again yet
    assert broker.asked == []
    watch.poll(60.0)
    broker.answer(fail="w2.orders")
    watch.poll(61.0)
    assert watch.unread["w2.orders"] == [] and _unread("w2.orders") == 0
    watch.poll(120.0)
    broker.answer()
    with caplog.at_level(logging.WARNING, logger=_LOGGER):
        watch.poll(121.0)
    assert _unread("w2.orders") == 2
    assert "w2.orders[2], w2.orders[3] wait unread" in caplog.text


@settings(max_examples=60, deadline=None)
@given(
    read=st.integers(1, 4),
    counts=st.lists(st.integers(0, 12), min_size=1, max_size=8),
)
def test_the_gauge_and_the_warnings_follow_every_answer(read, counts):
    """Whatever the broker answers in turn: the gauge holds the partitions of the last
    answer that the flow does not read, and a warning goes out each time that number
    of partitions changes to one with unread partitions (never twice in a row for one)."""
    topic = f"w3.t{read}.{'-'.join(map(str, counts))}"
    broker = Broker({topic: read})
    watch = PartitionWatch(broker.describe, {topic: list(range(read))}, every_s=1)
    logger = logging.getLogger(_LOGGER)
    said: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: said.append(record.getMessage())  # type: ignore[method-assign]
    logger.addHandler(handler)
    try:
        expected = 0
        last = None
        for k, count in enumerate(counts):
            broker.counts[topic] = count
            watch.poll(float(2 * k))
            broker.answer()
            watch.poll(float(2 * k) + 0.5)
            assert watch.unread[topic] == list(range(read, count))
            assert _unread(topic) == max(0, count - read)
            if count > read and count != last:
                expected += 1
            last = count if count > read else None
        assert len([s for s in said if s.startswith(f"{topic} now has")]) == expected
    finally:
        logger.removeHandler(handler)


@pytest.mark.integration
def test_the_watch_asks_a_real_broker_and_the_first_worker_alone_runs_it(stack, isolated_config):
    config = isolated_config(partitions=4)
    clicks = config.kafka.topics.clickstream
    admin = admin_client(list(stack.brokers), {})
    # As if the flow had started when the topic had 2 partitions.
    watch = PartitionWatch(describe_with(admin), {clicks: [0, 1]}, every_s=60)
    watch.poll(0.0)
    for future in watch._pending.values():  # the broker's answer, awaited
        future.result(30)
    watch.poll(1.0)
    assert watch.unread == {clicks: [2, 3]}
    assert _unread(clicks) == 2

    source = CrmKafkaSource(
        brokers=list(stack.brokers),
        topics=list(config.kafka.topics.inputs),
        client_config={},
        resume_offsets=lambda positions: {pos: (0, 0) for pos in positions},
        batch_size=100,
        step_ms=config.processing.step_ms,
        tail=False,
    )
    first, second = (source.build("input", k, 2) for k in range(2))
    try:
        assert second._partition_watch is None
        own = first._partition_watch
        assert own is not None
        # It knows every partition the flow reads (both workers'), topic by topic.
        assert own._read == {t: [0, 1, 2, 3] for t in config.kafka.topics.inputs}
    finally:
        first.close()
        second.close()

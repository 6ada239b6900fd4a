"""The source: its stall warning (what it says depends on whether other partitions
deliver), and its consumer's settings."""

from __future__ import annotations

import logging

import pytest

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

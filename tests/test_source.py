"""The source's stall warning: what it says depends on whether other partitions deliver."""

from __future__ import annotations

import logging

import pytest

from crmstream.flows.source import STALL_SECONDS, _Partition, _WorkerReader


@pytest.mark.parametrize(
    "others_got_data, says, not_says",
    [
        (False, "is the broker reachable?", "waits behind them"),
        (True, "other partitions are delivering, so it waits behind them", "reachable?"),
    ],
    ids=["nothing-delivers", "others-deliver"],
)
def test_a_stalled_partition_is_reported_once_and_its_recovery_too(
    caplog, others_got_data, says, not_says
):
    part = _Partition("crm.orders", 3, start_offset=120, start_step=0)
    start = part.last_data
    with caplog.at_level(logging.WARNING, logger="crmstream.flows.source"):
        _WorkerReader._watch_stall(part, False, start + STALL_SECONDS - 0.1, others_got_data)
        assert not caplog.records  # not yet
        for late in (STALL_SECONDS, STALL_SECONDS + 3):
            _WorkerReader._watch_stall(part, False, start + late, others_got_data)
        _WorkerReader._watch_stall(part, True, start + STALL_SECONDS + 4, others_got_data)
    stalled, again = [r.getMessage() for r in caplog.records]
    assert stalled.startswith("crm.orders[3]: no data for 5 s although not read to its end at "
                              "offset 120: ")  # fmt: skip
    assert says in stalled and not_says not in stalled
    assert again == "crm.orders[3]: data again after 9.0 s"

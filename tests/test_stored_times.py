"""Times an earlier version committed, that validation refuses today, never stop a start
(issue 34: a promise of -1e15 ms was committed, and firing its timer raised every start)."""

from __future__ import annotations

import logging

import pytest

from crmstream.state.store import StateStore, connect
from crmstream.state.timers import EARLIEST_DUE_MS, timer_member
from tests.conftest import T0_MS, read_topic, run_flow

pytestmark = pytest.mark.integration
H = 3_600_000
NO_DATE = -1_000_000_000_000_000  # year -29719: no datetime, no local date
ANCIENT = -14_831_769_600_000  # 1500-01-01: a date, but before 1970
OLD = 631_152_000_000  # 1990-01-01: out of today's range, and a time the state can keep


@pytest.mark.parametrize("policies", [False, True])
def test_committed_promises_out_of_every_range_never_stop_a_start(
    isolated_config, script, stack, caplog, policies
):
    config = isolated_config("processing.shards=1", policies=policies)
    s = script(config)
    for order in ("o1", "o2"):
        s.event("orders", "dz", "order_shipped", 0, order_id=order,
                promised_delivery_time=T0_MS + 86_400_000)  # fmt: skip
    s.flush()
    run_flow(config, stack)
    store = StateStore(connect(stack.redis_url, config.redis), config.redis.key_prefix)
    client, key = store.client, store.timers.key(0)
    # What the version before issue 34 committed for such promises.
    client.hset(store.promises_key("dz"), mapping={"o1": NO_DATE, "o2": ANCIENT, "o3": OLD})
    gone = [timer_member("dz", "delivery", o) for o in ("o1", "o2")]
    client.zadd(key, {gone[0]: NO_DATE + 48 * H, gone[1]: ANCIENT + 48 * H,
                      timer_member("dz", "delivery", "o3"): OLD + 48 * H})  # fmt: skip
    assert ANCIENT + 48 * H < EARLIEST_DUE_MS < OLD
    s.event("clickstream", "later", "session_start", 3600)
    s.flush()
    with caplog.at_level(logging.WARNING):
        run_flow(config, stack)  # both due: before issue 34, ValueError at every start
    fired = [r for r in read_topic(stack, config.kafka.topics.triggers)
             if r["trigger_type"] == "delivery_delay"]  # fmt: skip
    assert [r["payload"]["order_id"] for r in fired] == ["o3"]
    assert fired[0]["reason"]["values"]["promised_at"] == "1990-01-01T00:00:00.000+00:00"
    assert [client.zscore(key, member) for member in gone] == [None, None]
    assert "removed 2 timer(s) due before 1970" in caplog.text
    run_flow(config, stack)  # and the next start too

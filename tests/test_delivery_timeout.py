"""A broker that never acknowledges: the shard step gives up after
``kafka.delivery_timeout_seconds`` and loses nothing (docs/guarantees.md, section 3).

The shard step runs in this process (tests/shard_driver.py) with a producer
pointed at a port nothing listens on: its commits go on (the records wait in the
shard's outbox in Redis), each 5 s of waiting is logged and counted
(``crmstream_delivery_waits_total``), and at the end of input it raises
``DeliveryError`` once the timeout has passed, which ends the process. A run
with the real broker then sends what the outbox holds.
"""

from __future__ import annotations

import socket
import time

import orjson
import pytest
from prometheus_client import REGISTRY

from crmstream.flows.runtime import Endpoints
from crmstream.flows.sink import DeliveryError
from crmstream.state.store import StateStore, connect
from tests.conftest import read_topic
from tests.shard_driver import Cutting, Message, run_log

pytestmark = pytest.mark.integration

T0 = 1_767_258_600_000
TIMEOUT_S = 12  # past the first 5-second wait, so that one is counted


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _views(n: int) -> list[Message]:
    out = []
    for k in range(n):
        body = {"event_id": f"dt-{k}", "customer_id": "dee", "event_type": "product_view",
                "event_time": T0 + k * 1000, "product_id": "p", "category": "toys"}  # fmt: skip
        out.append(Message("clickstream", 0, b"dee", orjson.dumps(body), T0 + k))
    return out


@pytest.mark.slow  # a fault test: the slow suite (keeps the default one under 15 min)
def test_no_acknowledgement_gives_up_after_the_timeout_and_the_outbox_keeps_the_records(
    isolated_config, stack
):
    config = isolated_config(f"kafka.delivery_timeout_seconds={TIMEOUT_S}",
                             "processing.shards=1", partitions=1)  # fmt: skip
    dead = Endpoints([f"127.0.0.1:{_free_port()}"], stack.redis_url)
    waits = REGISTRY.get_sample_value("crmstream_delivery_waits_total") or 0.0
    log = _views(3)  # the 3rd view fires browse interest
    started = time.monotonic()
    with pytest.raises(DeliveryError, match=r"unacknowledged after 12 s|not delivered"):
        run_log(config, dead, log, Cutting(10**13, (100,), 0), T0 + 10_000)
    waited = time.monotonic() - started
    assert waited >= TIMEOUT_S  # it did wait the timeout out (no upper bound asserted)
    assert (REGISTRY.get_sample_value("crmstream_delivery_waits_total") or 0.0) > waits
    store = StateStore(connect(stack.redis_url, config.redis), config.redis.key_prefix)
    assert store.client.llen(store.outbox_key(0)) == 1  # committed, not delivered
    assert _outbox_gauge() == 1  # crmstream_outbox_records shows what waits
    print(f"gave up after {waited:.1f} s (timeout {TIMEOUT_S} s)")

    # A run with the broker sends what the outbox held, once, and trims it.
    run_log(config, stack, log, Cutting(10**13, (100,), 0), T0 + 10_000)
    triggers = read_topic(stack, config.kafka.topics.triggers)
    assert [t["trigger_type"] for t in triggers] == ["browse_interest"]
    assert store.client.llen(store.outbox_key(0)) == 0
    assert _outbox_gauge() == 0


def _outbox_gauge() -> float | None:
    return REGISTRY.get_sample_value("crmstream_outbox_records", {"shard": "0"})

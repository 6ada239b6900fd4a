"""The shard step's own promises (flows/shard_step.py), run in-process on the real
redis-server and broker (tests/shard_driver.py): an erasure suppresses the candidates
of its instant and not the earlier ones of the same step; ``processing.exactly_once:
false`` does what docs/guarantees.md says it gives up.
"""

from __future__ import annotations

import orjson
import pytest

from crmstream.profile import customer_view
from crmstream.state.store import StateStore, connect
from tests.conftest import read_topic
from tests.shard_driver import Cutting, Message, run_log

pytestmark = pytest.mark.integration

T0 = 1_767_258_600_000  # 2026-01-01T09:10:00Z
ONE_STEP = Cutting(10**13, (5000,), 0)


def _event(kind: str, at_s: float, customer: str = "eve", **fields) -> Message:
    body = {"event_id": f"{customer}-{kind}-{at_s}", "customer_id": customer,
            "event_type": kind, "event_time": T0 + int(at_s * 1000), **fields}  # fmt: skip
    role = {"erasure_requested": "customers"}.get(kind, "clickstream")
    return Message(role, 0, customer.encode(), orjson.dumps(body), T0 + int(at_s * 1000))


def _view(at_s: float, category: str, customer: str = "eve") -> Message:
    return _event("product_view", at_s, customer, product_id="p", category=category)


def test_an_erasure_suppresses_the_candidates_of_its_instant_not_the_earlier_ones(
    isolated_config, stack
):
    """docs/triggers.md, policy 2: in one step, the candidates before the erasure in the
    customer's timeline are decided as live (they go out); those at its instant (here
    the churn risk the erasure event itself derives, with a churn bias that makes every
    customer's score high) are suppressed as ``erasure`` for customer "erased", with no
    key; the state after it starts from nothing and the audit entry holds no id."""
    config = isolated_config("processing.shards=1", "timers.idle_watermark_ms=0",
                             "churn.bias=5", partitions=1)  # fmt: skip
    log = [_view(0, "beauty"), _view(1, "beauty"), _view(2, "beauty"),
           _event("erasure_requested", 5, "fay"),  # its only event: churn risk at it
           _event("erasure_requested", 12), _view(20, "books")]  # fmt: skip
    out = run_log(config, stack, log, ONE_STEP, T0 + 60_000)
    def seen(records):
        return sorted((r["event_time"][11:19], r["trigger_type"], r["customer_id"],
                       r.get("policy")) for r in records)  # fmt: skip

    # eve: churn risk at her first event (before the erasure) goes out, and again in the
    # new life that starts after it; fay's, at the erasure itself, is suppressed
    assert seen(out.triggers) == [("09:10:00", "churn_risk", "eve", None),
                                  ("09:10:20", "churn_risk", "eve", None)]  # fmt: skip
    assert seen(out.suppressions) == [("09:10:02", "browse_interest", "eve", "priority"),
                                      ("09:10:05", "churn_risk", "erased", "erasure")]
    assert [s["_key"] for s in out.suppressions if s["policy"] == "erasure"] == [None]
    store = StateStore(connect(stack.redis_url, config.redis), config.redis.key_prefix)
    view = customer_view(store, config, "eve")
    assert view["event_counts"] == {"product_view": 1}  # the view after the erasure only
    assert customer_view(store, config, "fay") is None
    audit = [v for k, v in out.redis.items() if k.endswith(":audit")]
    assert len(audit[0]) == 2 and b"eve" not in repr(audit).encode()


def test_without_exactly_once_nothing_is_checked_and_records_skip_the_outbox(
    isolated_config, stack
):
    """docs/guarantees.md, "What breaks it": ``processing.exactly_once: false`` makes no
    offset or duplicate checks and produces records before the commit, with no outbox."""
    config = isolated_config("processing.shards=1", "processing.exactly_once=false",
                             partitions=1)  # fmt: skip
    dup = _view(1, "pets")
    log = [_view(0, "pets"), dup, dup._replace(kafka_ms=dup.kafka_ms + 1)]  # a retry
    out = run_log(config, stack, log, ONE_STEP, T0 + 60_000)
    assert out.triggers == []  # nothing went through the outbox...
    triggers = read_topic(stack, config.kafka.topics.triggers)
    assert [t["trigger_type"] for t in triggers] == ["browse_interest"]  # ...it was sent
    store = StateStore(connect(stack.redis_url, config.redis), config.redis.key_prefix)
    assert store.client.exists(store.outbox_key(0)) == 0
    assert customer_view(store, config, "eve")["event_counts"] == {"product_view": 3}
    store.client.delete(store.progress_key(0))
    run_log(config, stack, log, ONE_STEP, T0 + 60_000)  # read again: applied again
    assert customer_view(store, config, "eve")["event_counts"] == {"product_view": 6}


def test_an_event_older_than_the_lateness_is_counted_late(isolated_config, stack):
    """docs/state.md: older than the customer's newest event by more than
    ``state.allowed_lateness_seconds`` (1 h), it counts in the lifetime totals only, and in
    ``crmstream_late_events_total``; one within the lateness is not late."""
    from prometheus_client import REGISTRY

    def late() -> float:
        return REGISTRY.get_sample_value("crmstream_late_events_total") or 0.0

    config = isolated_config("processing.shards=1", "timers.idle_watermark_ms=0", partitions=1)
    # the last two reach Kafka after the newest (their Kafka time), in this order
    arrive = T0 + 7_210_000  # steps later (1 s steps)
    log = [_view(0, "books"), _view(7200, "books"),
           _view(3601, "books")._replace(kafka_ms=arrive),
           _view(3599, "books")._replace(kafka_ms=arrive + 1)]  # fmt: skip
    before = late()
    run_log(config, stack, log, Cutting(1000, (1,), 0), T0 + 7_300_000)
    assert late() - before == 1


def test_candidates_before_an_erasure_in_the_step_are_held_to_the_stored_send_history(
    isolated_config, stack
):
    """docs/triggers.md, policy 2: candidates before the erasure in the customer's timeline
    are decided as live, so with the customer's sends so far: a second browse interest
    within the cooldown of one sent in an earlier step is suppressed, though the
    customer is erased later in the same step."""
    config = isolated_config("processing.shards=1", "timers.idle_watermark_ms=0", partitions=1)
    first = [_view(0, "beauty"), _view(1, "beauty"), _view(2, "beauty")]
    one = run_log(config, stack, first, ONE_STEP, T0 + 10_000)
    assert [r["trigger_type"] for r in one.triggers] == ["browse_interest"]
    second = [*first, _view(60, "books"), _view(61, "books"), _view(62, "books"),
              _event("erasure_requested", 120)]  # fmt: skip
    two = run_log(config, stack, second, ONE_STEP, T0 + 200_000)
    cooling = [(r["trigger_type"], r["policy"]) for r in two.suppressions
               if r["event_time"][11:19] == "09:11:02"]  # fmt: skip
    assert cooling == [("browse_interest", "cooldown")]


def test_more_due_timers_than_a_round_fires_all_fire_once_each(isolated_config, stack):
    """``timers.fire_batch`` (here 2) bounds the timers a round fires for customers with no
    event in it: the rest fire in the next rounds, each once, at its own time."""
    config = isolated_config("processing.shards=1", "timers.idle_watermark_ms=0",
                             "timers.fire_batch=2", "rules.churn_risk.enabled=false",
                             partitions=1)  # fmt: skip
    carts = [_event("add_to_cart", k, f"c{k}", product_id="p", category="beauty")
             for k in range(5)]  # fmt: skip
    log = [*carts, _event("session_start", 7200, "zed")]
    out = run_log(config, stack, log, ONE_STEP, T0 + 7_200_000)
    nudges = sorted((r["customer_id"], r["event_time"][11:19]) for r in out.triggers
                    if r["trigger_type"] == "cart_abandoned")  # fmt: skip
    assert nudges == [(f"c{k}", f"10:10:0{k}") for k in range(5)]


def test_live_timers_are_observed_as_late_as_the_wall_clock_says(isolated_config, stack):
    """Live input: each fired timer's lateness (wall clock at firing minus due time, in
    seconds) goes to ``crmstream_timer_lateness_seconds``. The driver's wall clock is the
    input's arrival time: a view every second around the nudge's due time fires it
    within a second."""
    from prometheus_client import REGISTRY

    def seen() -> tuple[float, float]:
        get = REGISTRY.get_sample_value
        return (get("crmstream_timer_lateness_seconds_count") or 0.0,
                get("crmstream_timer_lateness_seconds_sum") or 0.0)  # fmt: skip

    config = isolated_config("processing.shards=1", "timers.idle_watermark_ms=0",
                             "rules.churn_risk.enabled=false", partitions=1)  # fmt: skip
    log = [_event("add_to_cart", 0, product_id="p", category="beauty"),
           *(_event("session_start", s, "zed") for s in range(3590, 3611))]  # fmt: skip
    count, total = seen()
    out = run_log(config, stack, log, Cutting(1000, (1,), 0, live=True), T0 + 3_611_000)
    assert [r["trigger_type"] for r in out.triggers] == ["cart_abandoned"]
    fired, late_s = seen()[0] - count, seen()[1] - total
    assert fired == 1 and 0 <= late_s <= 1.0, (fired, late_s)


def test_an_idle_live_input_fires_the_timers_the_wall_clock_passes(isolated_config, stack):
    """Live, with nothing more to read, the watermark follows the wall clock (after
    ``timers.idle_watermark_ms``): a round with no event fires the stored timers due
    before it, of customers with no event in it."""
    config = isolated_config("processing.shards=1", "timers.idle_watermark_ms=0",
                             "rules.churn_risk.enabled=false", partitions=1)  # fmt: skip
    log = [_event("add_to_cart", 0, product_id="p", category="beauty"),
           _event("session_start", 10, "zed")]
    out = run_log(config, stack, log, Cutting(1000, (1,), 0, live=True), T0 + 2 * 3_600_000)
    assert [(r["trigger_type"], r["event_time"][11:19]) for r in out.triggers] == [
        ("cart_abandoned", "10:10:00")]  # fmt: skip

"""Absence triggers on durable event-time timers, through the real flow, broker and Redis."""

from __future__ import annotations

import contextlib
import time
from datetime import datetime

import orjson
import pytest
from kafka import KafkaConsumer, TopicPartition

from crmstream.state.store import StateStore, connect
from crmstream.state.timers import parse_member
from tests.conftest import live_flow, read_topic, run_flow, wait_until_started

pytestmark = pytest.mark.integration
H = 3600.0
D = 86400.0


def _fired(records, kind):
    found = [(r["customer_id"], r["reason"]["values"]) for r in records
             if r["trigger_type"] == kind]  # fmt: skip
    return sorted(found, key=lambda pair: (pair[0], sorted(pair[1].items())))  # fmt: skip


def _pending(config, stack, kinds=("cart_1", "cart_2", "delivery")):
    """Pending timers of these kinds, over every shard: members of the timer sets and
    those kept in the customers' states (each under a ``wake`` member)."""
    from crmstream.operators.timer_slots import WAKE, TimerSlots
    from crmstream.state.encoding import decode_batch

    store = StateStore(connect(stack.redis_url, config.redis), config.redis.key_prefix)
    slots = TimerSlots(config)
    found, woken = 0, set()
    for shard in range(config.processing.shards):
        for member in store.client.zrange(store.timers.key(shard), 0, -1):
            customer, kind, _, _ = parse_member(member, 0)
            found += kind in kinds
            if kind == WAKE:
                woken.add(customer)
    customers = sorted(woken)
    keys = [store.state_key(c) for c in customers]
    records = decode_batch([store.client.get(k) for k in keys], keys)
    for timers in slots.timers_of(customers, records):
        found += sum(t.kind in kinds for t in timers)
    return found


def test_cart_abandoned_nudges_once_then_again_and_not_after_an_order(
    isolated_config, script, stack
):
    config = isolated_config()
    s = script(config)
    s.event("clickstream", "alice", "add_to_cart", 0, product_id="p", category="shoes")
    s.event("clickstream", "carol", "add_to_cart", 0, product_id="p", category="shoes")
    s.event("orders", "carol", "order_placed", 1800, order_id="o1", amount=10, currency="USD")
    s.event("clickstream", "dave", "add_to_cart", 0, product_id="p", category="shoes")
    s.event("clickstream", "dave", "session_start", 25 * H)  # the clock passes both nudges
    s.event("clickstream", "bob", "session_start", 2 * H)
    s.flush()
    run_flow(config, stack)
    fired = [r for r in read_topic(stack, config.kafka.topics.triggers)
             if r["trigger_type"] == "cart_abandoned"]  # fmt: skip
    got = sorted((r["customer_id"], r["payload"]["nudge"]) for r in fired)
    assert got == [("alice", 1), ("alice", 2), ("dave", 1), ("dave", 2)]
    first = next(r for r in fired if r["customer_id"] == "alice" and r["payload"]["nudge"] == 1)
    assert first["event_time"] == "2026-01-01T01:00:00.000+00:00"  # due: cart + 60 min
    assert first["reason"]["thresholds"]["first_delay_minutes"] == 60
    assert first["payload"]["offer_template"] == "cart_reminder"


def test_dormant_win_back_steps_and_a_repeat_order_resets_them(isolated_config, script, stack):
    config = isolated_config()
    s = script(config)
    s.event("orders", "eve", "order_placed", 0, order_id="e1", amount=10, currency="USD")
    s.event("orders", "frank", "order_placed", 0, order_id="f1", amount=10, currency="USD")
    s.event("orders", "frank", "order_placed", 20 * D, order_id="f2", amount=10, currency="USD")
    s.event("clickstream", "zed", "session_start", 95 * D)  # time passes
    s.flush()
    run_flow(config, stack)
    got = _fired(read_topic(stack, config.kafka.topics.triggers), "dormant_win_back")
    steps = [(c, v["days_without_purchase"]) for c, v in got]
    # eve: 30 and 90 days; frank re-anchored at day 20: his 30-day step at day 50 and
    # 90-day step at day 110 (not yet); nothing from his first order.
    assert sorted(steps) == [("eve", 30), ("eve", 90), ("frank", 30)]


def test_delivery_delay_waits_longer_for_customs_and_never_fires_for_delivered_orders(
    isolated_config, script, stack
):
    config = isolated_config()
    s = script(config)
    promised = "2026-01-03T00:00:00+00:00"  # 2 days after T0
    for cust in ("gil", "hal", "ida"):
        s.event("orders", cust, "order_shipped", 0, order_id=f"{cust}-1",
                promised_delivery_time=promised)  # fmt: skip
    s.event("orders", "hal", "order_delivered", 2 * D + 10 * H, order_id="hal-1")
    s.event("orders", "ida", "logistics_update", 2 * D + H, order_id="ida-1", status="customs_hold")
    s.event("clickstream", "zed", "session_start", 2 * D + 60 * H)  # 60 h after the promise
    s.flush()
    run_flow(config, stack)
    got = _fired(read_topic(stack, config.kafka.topics.triggers), "delivery_delay")
    assert [(c, v["order_id"], v["hours_late"]) for c, v in got] == [("gil", "gil-1", 48.0)]

    # 80 h after the promise the customs hold's longer allowance has passed too
    s.event("clickstream", "zed", "session_start", 2 * D + 80 * H)
    s.flush()
    run_flow(config, stack)
    got = _fired(read_topic(stack, config.kafka.topics.triggers), "delivery_delay")
    assert [(c, v["hours_late"]) for c, v in got] == [("gil", 48.0), ("ida", 72.0)]
    assert _pending(config, stack, kinds=("delivery",)) == 0  # all fired or cancelled


def test_a_timer_pending_at_stop_fires_after_restart(isolated_config, script, stack):
    config = isolated_config()
    s = script(config)
    s.event("clickstream", "jo", "add_to_cart", 0, product_id="p", category="toys")
    s.flush()
    run_flow(config, stack)
    assert _pending(config, stack) == 2  # both nudges wait in Redis
    assert _fired(read_topic(stack, config.kafka.topics.triggers, idle_s=1), "cart_abandoned") == []
    s.event("clickstream", "kim", "session_start", 2 * H)  # the clock moves on
    s.flush()
    run_flow(config, stack)  # a new process: the timer comes from Redis
    fired = _fired(read_topic(stack, config.kafka.topics.triggers), "cart_abandoned")
    assert [c for c, _ in fired] == ["jo"]
    assert _pending(config, stack) == 1  # the 24 h nudge is still pending


def test_live_mode_fires_a_due_timer_while_input_is_idle(isolated_config, script, stack):
    delay_s = 4.0
    config = isolated_config(f"rules.cart_abandoned.first_delay_minutes={delay_s / 60}")
    s = script(config)
    consumer = KafkaConsumer(bootstrap_servers=list(stack.brokers), enable_auto_commit=False,
                             auto_offset_reset="earliest", consumer_timeout_ms=500)  # fmt: skip
    with live_flow(config, stack), contextlib.closing(consumer):
        wait_until_started(config, stack)
        added_ms = int(time.time() * 1000)
        s.event("clickstream", "liv", "add_to_cart", 0, event_time=added_ms, product_id="p",
                category="toys")  # fmt: skip
        s.flush()
        consumer.assign([TopicPartition(config.kafka.topics.triggers, p) for p in (0, 1)])
        consumer.seek_to_beginning()
        deadline = time.time() + delay_s + 20
        trigger = None
        while trigger is None and time.time() < deadline:
            for msg in consumer:
                record = orjson.loads(msg.value)
                if record["trigger_type"] == "cart_abandoned":
                    trigger = record
                    break
        assert trigger is not None, "no cart_abandoned trigger within 20 s of its due time"
        due_ms = added_ms + int(delay_s * 1000)
        emitted_ms = int(datetime.fromisoformat(trigger["emitted_at"]).timestamp() * 1000)
        fired_for_ms = int(datetime.fromisoformat(trigger["event_time"]).timestamp() * 1000)
        # No event came after the cart: only the idle clock can have moved the
        # watermark past the due time. How late it fired is printed, not asserted
        # (no wall-clock thresholds in tests).
        lateness = emitted_ms - due_ms
        print(f"live timer fired {lateness} ms after its due time")
        assert abs(fired_for_ms - due_ms) <= 1, (trigger["event_time"], due_ms)
        assert lateness >= 0, f"fired {-lateness} ms before its due time"


def test_timers_a_step_passes_fire_in_it_with_the_triggers_redis_would_give(
    isolated_config, script, stack, monkeypatch
):
    """A step that spans the cart delays, two win-back steps and the end of quiet hours
    fires those timers itself: none is read back from Redis. Its triggers are the ones
    two runs give, the second firing them from Redis (their ``wake``)."""
    from crmstream.state.timers import TimerStore

    read_back: list[str] = []
    due = TimerStore.due

    def spy(self, shard, upto_ms, limit=None):  # the real Redis answers; kinds are noted
        timers = due(self, shard, upto_ms, limit)
        read_back.extend(t.kind for t in timers)
        return timers

    monkeypatch.setattr(TimerStore, "due", spy)
    in_step = ("cart_1", "cart_2", "dormant_30", "dormant_90", "potential", "deferred")

    def run(split: bool) -> list[dict]:
        # Quiet hours on (policies=True): every trigger below falls in them and is held.
        config = isolated_config(
            "processing.step_ms=600000", "rules.churn_risk.enabled=false", policies=True
        )
        s = script(config)
        s.event("clickstream", "ann", "add_to_cart", 0, product_id="p", category="shoes")
        s.event("orders", "ben", "order_placed", 0, order_id="b1", amount=10, currency="USD")
        if split:
            s.flush()
            run_flow(config, stack)  # the watermark is at T0: every timer waits in Redis
        s.event("clickstream", "zed", "session_start", 95 * D)
        s.flush()
        read_back.clear()
        run_flow(config, stack)
        assert _pending(config, stack, kinds=in_step) == 0
        assert _pending(config, stack, kinds=("dormant_180",)) == 1
        records = read_topic(stack, config.kafka.topics.triggers)
        for record in records:
            del record["emitted_at"]
        return sorted(records, key=lambda r: r["trigger_id"])

    one_step = run(split=False)
    assert not set(read_back) & {*in_step, "wake"}, read_back
    two_runs = run(split=True)
    # The second run read them back: the wakes that stand for the kept ones.
    assert "wake" in read_back, read_back
    assert one_step == two_runs
    got = sorted((r["customer_id"], r["trigger_type"], r["event_time"]) for r in one_step)
    assert got == [
        ("ann", "cart_abandoned", "2026-01-01T01:00:00.000+00:00"),
        ("ann", "cart_abandoned", "2026-01-02T00:00:00.000+00:00"),
        ("ben", "dormant_win_back", "2026-01-31T00:00:00.000+00:00"),
        ("ben", "dormant_win_back", "2026-04-01T00:00:00.000+00:00"),
        ("ben", "first_order_welcome", "2026-01-01T00:00:00.000+00:00"),
    ]
    assert all(r["deferred"]["policy"] == "quiet_hours" for r in one_step)

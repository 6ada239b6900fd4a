"""The rest of the trigger catalogue through the real flow: one firing and one near miss each."""

from __future__ import annotations

import pytest

from tests.conftest import T0_MS, read_topic, run_flow

pytestmark = pytest.mark.integration
H = 3600.0
D = 86400.0


def _of(records, kind):
    return [r for r in records if r["trigger_type"] == kind]


def _customers(records, kind):
    return sorted(r["customer_id"] for r in _of(records, kind))


def _order(s, customer, at, amount=20.0, order_id=None):
    return s.event(
        "orders",
        customer,
        "order_placed",
        at,
        order_id=order_id or f"{customer}-{at}",
        amount=amount,
        currency="USD",
    )


def test_first_order_welcome_at_the_order_and_a_day_after_delivery(isolated_config, script, stack):
    config = isolated_config()
    s = script(config)
    first = _order(s, "amy", 0, order_id="a1")
    s.event("orders", "amy", "order_delivered", 3 * D, order_id="a1")
    _order(s, "ben", 0, order_id="b1")  # delivered only 10 h before the clock stops
    s.event("orders", "ben", "order_delivered", 4 * D - 10 * H, order_id="b1")
    # amy's welcome is due at 4 D: it fires once event time has passed it
    s.event("clickstream", "zed", "session_start", 4 * D + 1)
    s.flush()
    run_flow(config, stack)
    welcome = _of(read_topic(stack, config.kafka.topics.triggers), "first_order_welcome")
    stages = sorted((r["customer_id"], r["payload"]["stage"]) for r in welcome)
    assert stages == [("amy", "delivered"), ("amy", "order_placed"), ("ben", "order_placed")]
    placed = next(r for r in welcome if r["customer_id"] == "amy" and
                  r["payload"]["stage"] == "order_placed")  # fmt: skip
    assert placed["causal_event_id"] == first


def test_potential_no_repeat_needs_one_order_and_recent_browsing(isolated_config, script, stack):
    """Due 21 days after the only order, before the first win-back step (30 days): both
    are reachable with the default configuration."""
    config = isolated_config()
    s = script(config)
    for cust in ("cat", "dan", "eli"):
        _order(s, cust, 0)
    s.view("cat", "books", 15 * D)  # still browsing at day 21
    _order(s, "dan", 10 * D)  # bought again
    s.event("clickstream", "zed", "session_start", 31 * D)  # eli: not browsing
    s.flush()
    run_flow(config, stack)
    records = read_topic(stack, config.kafka.topics.triggers)
    assert _customers(records, "potential_no_repeat") == ["cat"]
    (potential,) = _of(records, "potential_no_repeat")
    assert potential["event_time"] == "2026-01-22T00:00:00.000+00:00"
    assert _customers(records, "dormant_win_back") == ["cat", "eli"]
    stopped = read_topic(stack, config.kafka.topics.suppressions)
    assert [r for r in stopped if r["trigger_type"] == "potential_no_repeat"] == []


def test_repurchase_due_a_week_before_the_expected_order(isolated_config, script, stack):
    config = isolated_config()
    s = script(config)
    # every 10 days: after day 10's order the next is expected at day 20 (reminder at
    # day 13, before day 20's order), after day 20's at day 30 (reminder at day 23)
    for day in (0, 10, 20):
        _order(s, "fay", day * D)
    # gus: every 10 days too (reminder due at day 13), but he buys at day 12, before it;
    # his new rhythm (6 days) is shorter than the reminder's lead, so none is set
    for day in (0, 10, 12):
        _order(s, "gus", day * D)
    s.event("clickstream", "zed", "session_start", 24 * D)
    s.flush()
    run_flow(config, stack)
    due = _of(read_topic(stack, config.kafka.topics.triggers), "repurchase_due")
    due.sort(key=lambda r: r["event_time"])
    assert [r["customer_id"] for r in due] == ["fay", "fay"]
    assert [r["event_time"] for r in due] == [
        "2026-01-14T00:00:00.000+00:00",
        "2026-01-24T00:00:00.000+00:00",
    ]
    assert due[1]["reason"]["values"]["expected_next_order_at"] == "2026-01-31T00:00:00.000+00:00"


def test_churn_risk_fires_once_when_a_regular_buyer_goes_quiet(isolated_config, script, stack):
    config = isolated_config()
    s = script(config)
    for day in range(0, 60, 2):  # a steady customer: sessions, views, an order every 6 days
        s.event("clickstream", "hal", "session_start", day * D)
        s.view("hal", "books", day * D + 60)
        if day % 6 == 0:
            _order(s, "hal", day * D + 120)
        s.event("clickstream", "ivy", "session_start", day * D)  # a steady browser who stays
    for day in range(60, 130, 2):
        s.event("clickstream", "ivy", "session_start", day * D)
    s.flush()
    run_flow(config, stack)
    risk = _of(read_topic(stack, config.kafka.topics.triggers), "churn_risk")
    assert [r["customer_id"] for r in risk] == ["hal"]
    values = risk[0]["reason"]["values"]
    assert values["churn_score"] >= config.churn.high
    assert {"activity_drop", "purchase_overdue"} <= set(values["top_signals"])
    assert risk[0]["causal_event_id"].startswith("derive:churn_risk:")
    # Dated at the recheck that made it true: whole weeks after hal's last event (the
    # view at day 58), not at that event; and no later recheck suppresses the same id.
    last_ms = int((58 * D + 60) * 1000)
    fired_ms = int(risk[0]["causal_event_id"].rsplit(":", 1)[1])
    weeks, rest = divmod(fired_ms - T0_MS - last_ms, 7 * int(D * 1000))
    assert weeks >= 1 and rest == 0, (weeks, rest)
    stopped = read_topic(stack, config.kafka.topics.suppressions)
    assert [r for r in stopped if r["trigger_id"] == risk[0]["trigger_id"]] == []


def test_tier_upgrade_and_high_value_entry(isolated_config, script, stack):
    config = isolated_config()
    s = script(config)
    _order(s, "jay", 0, amount=150)
    _order(s, "jay", D, amount=100)  # 250 in 365 d: silver
    _order(s, "kai", 0, amount=150)  # 150: no tier
    # lea's fifth order crosses both at once: 5 orders in 90 d averaging 51.2 (high value)
    # and 256 in 365 d (silver)
    for i, amount in enumerate((49, 49, 49, 49, 60)):
        _order(s, "lea", i * D, amount=amount)
    # mo's fourth order makes silver (240) and his fifth, a day later, high value
    for i in range(5):
        _order(s, "mo", i * D, amount=60)
    s.flush()
    run_flow(config, stack)
    ups = _of(read_topic(stack, config.kafka.topics.triggers), "tier_upgrade")
    got = sorted(
        (r["customer_id"], r["reason"]["values"]["change"], r["reason"]["values"].get("to"))
        for r in ups
    )
    # lea entered high value and silver at the same moment: one message, the other is
    # suppressed by priority arbitration and says so on the suppression topic; mo's came
    # a day apart, each at the order that made it true
    assert got == [
        ("jay", "tier", "silver"),
        ("lea", "high_value_entered", None),
        ("mo", "high_value_entered", None),
        ("mo", "tier", "silver"),
    ]
    mo = {r["reason"]["values"]["change"]: r["event_time"] for r in ups if r["customer_id"] == "mo"}
    assert mo == {
        "tier": "2026-01-04T00:00:00.000+00:00",
        "high_value_entered": "2026-01-05T00:00:00.000+00:00",
    }
    stopped = read_topic(stack, config.kafka.topics.suppressions)
    assert [
        (r["customer_id"], r["policy"], r["candidate"]["values"]["change"])
        for r in stopped
        if r["trigger_type"] == "tier_upgrade"
    ] == [("lea", "priority", "tier")]


def test_birthday_three_days_before_from_one_wake_timer_per_customer(
    isolated_config, script, stack
):
    """Birthday reminders go out 3 days before. Every customer can have a churn recheck
    and a birthday reminder pending: the timer set holds one wake-up per customer for
    both, and each still fires."""
    from crmstream.state.store import StateStore, connect
    from crmstream.state.timers import parse_member

    config = isolated_config()
    s = script(config)
    s.event("customers", "max", "profile_updated", 0, birthday="01-10")
    s.event("customers", "ned", "profile_updated", 0, birthday="02-20")
    s.event("clickstream", "zed", "session_start", 8 * D)
    s.flush()
    run_flow(config, stack)
    bday = _of(read_topic(stack, config.kafka.topics.triggers), "birthday")
    assert [(r["customer_id"], r["event_time"]) for r in bday] == [
        ("max", "2026-01-07T00:00:00.000+00:00")
    ]
    store = StateStore(connect(stack.redis_url, config.redis), config.redis.key_prefix)
    members = [
        list(parse_member(m, 0)[:2])
        for shard in range(config.processing.shards)
        for m in store.client.zrange(store.timers.key(shard), 0, -1)
    ]
    assert sorted(m[:2] for m in members if m[0] in ("max", "ned")) == [
        ["max", "wake"],
        ["ned", "wake"],
    ]
    s.event("clickstream", "zed", "session_start", 50 * D)  # past ned's reminder
    s.flush()
    run_flow(config, stack)
    bday = _of(read_topic(stack, config.kafka.topics.triggers), "birthday")
    assert [(r["customer_id"], r["event_time"]) for r in bday] == [
        ("max", "2026-01-07T00:00:00.000+00:00"),
        ("ned", "2026-02-17T00:00:00.000+00:00"),
    ]


def test_service_recovery_only_for_high_value_customers(isolated_config, script, stack):
    config = isolated_config()
    s = script(config)
    _order(s, "oli", 0, amount=600, order_id="o-big")  # gold tier
    _order(s, "pam", 0, amount=30, order_id="p-small")
    s.event("orders", "oli", "order_returned", 5 * D, order_id="o-big")
    s.event("orders", "pam", "order_returned", 5 * D, order_id="p-small")
    s.event("feedback", "oli", "service_ticket", 6 * D, sentiment=-0.8)
    s.flush()
    run_flow(config, stack)
    rec = _of(read_topic(stack, config.kafka.topics.triggers), "service_recovery")
    assert sorted((r["customer_id"], r["reason"]["values"]["reason"]) for r in rec) == [
        ("oli", "negative_ticket"),
        ("oli", "order_returned"),
    ]


def test_interest_shift_when_the_top_category_changes(isolated_config, script, stack):
    config = isolated_config()
    s = script(config)
    for i in range(10):
        s.view("quin", "beauty", i * 600)
        s.view("rex", "beauty", i * 600)
    for i in range(30):  # a week later: quin turns to baby products, rex stays
        s.view("quin", "baby", 8 * D + i * 600)
        s.view("rex", "beauty", 8 * D + i * 600)
    s.flush()
    run_flow(config, stack)
    shift = _of(read_topic(stack, config.kafka.topics.triggers), "interest_shift")
    assert [(r["customer_id"], r["reason"]["values"]["from"], r["reason"]["values"]["to"])
            for r in shift] == [("quin", "beauty", "baby")]  # fmt: skip

"""Contact policies through the real flow: each policy stops (or defers) what it should."""

from __future__ import annotations

import pytest
import redis

from tests.conftest import read_topic, run_flow

pytestmark = pytest.mark.integration
H = 3600.0
D = 86400.0
TEN_AM = 10 * H  # outside the default quiet hours (21:00-09:00) in UTC


def _views(s, customer, category, at, n=3):
    for i in range(n):
        s.view(customer, category, at + i * 10)


def _triggers(stack, config, kind=None):
    return [r for r in read_topic(stack, config.kafka.topics.triggers)
            if kind is None or r["trigger_type"] == kind]  # fmt: skip


def _stopped(stack, config):
    return [(r["customer_id"], r["trigger_type"], r["policy"])
            for r in read_topic(stack, config.kafka.topics.suppressions)]  # fmt: skip


@pytest.mark.parametrize(
    "later_run",
    [pytest.param(False, id="same run"),
     pytest.param(True, id="later run", marks=pytest.mark.slow)],  # the default's budget
)  # fmt: skip
def test_consent_withdrawal_suppresses_at_once_on_that_channel(
    isolated_config, script, stack, later_run
):
    """In a later run the consent comes from the stored profile, which the flow reads
    for customers with a stored state."""
    config = isolated_config(policies=True)
    s = script(config)
    for cust, withdrawn in (("ann", "email"), ("bea", "push")):
        s.event("customers", cust, "profile_updated", 0, preferred_channel="email")
        s.event("customers", cust, "consent_withdrawn", 60, channel=withdrawn)
    if later_run:
        s.flush()
        run_flow(config, stack)
        assert _triggers(stack, config) == [] and _stopped(stack, config) == []
    for cust in ("ann", "bea"):
        _views(s, cust, "beauty", TEN_AM)
    s.flush()
    run_flow(config, stack)  # a new run: nothing of an earlier one is left in memory
    sent = _triggers(stack, config, "browse_interest")
    assert [(r["customer_id"], r["channel"]) for r in sent] == [("bea", "email")]
    assert _stopped(stack, config) == [("ann", "browse_interest", "consent")]


def test_erasure_deletes_every_key_and_timer_and_nothing_fires_after_it(
    isolated_config, script, stack
):
    config = isolated_config(policies=True)
    s = script(config)
    s.event("customers", "cid", "profile_updated", 0, country="DE", timezone="Europe/Berlin")
    s.event("clickstream", "cid", "add_to_cart", TEN_AM, product_id="p", category="shoes")
    s.event("orders", "cid", "order_shipped", TEN_AM, order_id="c1",
            promised_delivery_time="2026-01-03T00:00:00+00:00")  # fmt: skip
    s.flush()
    run_flow(config, stack)
    client = redis.Redis.from_url(stack.redis_url)
    prefix = config.redis.key_prefix
    assert client.keys(f"{prefix}:*cid*")  # state, profile, open orders

    s.event("customers", "cid", "erasure_requested", TEN_AM + 600)
    s.flush()
    run_flow(config, stack)
    # an older event of cid, arriving from another topic after the erasure was applied:
    # the tombstone drops it, so it cannot bring the customer back
    s.view("cid", "beauty", TEN_AM + 300)
    s.event("clickstream", "zed", "session_start", 5 * D)  # every timer of cid is now due
    s.flush()
    run_flow(config, stack)

    assert list(client.scan_iter(match="*cid*", count=1000)) == []
    for key in client.scan_iter(match=f"{prefix}:timers:*"):
        assert list(client.zscan_iter(key, match="cid*")) == []
    assert [r for r in _triggers(stack, config) if r["customer_id"] == "cid"] == []
    audit = client.xrange(f"{prefix}:audit")
    assert len(audit) == 1
    entry = {k.decode(): v.decode() for k, v in audit[0][1].items()}
    assert (
        entry["action"] == "erasure" and entry["timers_removed"] == "4"
    )  # carts 2, delivery, recheck
    assert "cid" not in str(entry)
    tombstones = client.keys(f"{prefix}:erased:*")
    assert len(tombstones) == 1 and client.ttl(tombstones[0]) > 29 * 86400


def test_cooldown_per_trigger_type(isolated_config, script, stack):
    config = isolated_config(policies=True)
    s = script(config)
    _views(s, "cal", "beauty", TEN_AM)
    _views(s, "cal", "shoes", TEN_AM + 2 * H)  # a second streak 2 h later: cooling down
    _views(s, "cal", "toys", TEN_AM + D + H)  # the next day: allowed again
    s.flush()
    run_flow(config, stack)
    sent = [r["reason"]["values"]["category"] for r in _triggers(stack, config, "browse_interest")]
    assert sent == ["beauty", "toys"]
    assert _stopped(stack, config) == [("cal", "browse_interest", "cooldown")]


def test_priority_within_the_arbitration_window(isolated_config, script, stack):
    """A candidate loses to a trigger of at least its priority that fired at the same
    time or within the arbitration window (60 s) before it; never to a later one."""
    config = isolated_config(policies=True)
    s = script(config)
    nudge = TEN_AM + H  # dee's cart nudge (priority 90)
    s.event("clickstream", "dee", "add_to_cart", TEN_AM, product_id="p", category="bags")
    for at in (58, 59, 60):  # browse interest (30) 60 s after it: loses
        s.view("dee", "books", nudge + at)
    for at in (60.2, 60.6, 61):  # 61 s after it: goes out
        s.view("dee", "toys", nudge + at)
    # eva: browse interest first, then high intent (60) 9 s later: both go out
    for i in range(5):
        s.view("eva", "bags", TEN_AM + i)
    for i in range(2):
        s.event("clickstream", "eva", "add_to_cart", TEN_AM + 10 + i, product_id="p",
                category="bags")  # fmt: skip
    s.event("orders", "eva", "order_placed", TEN_AM + 20, order_id="e1", amount=5,
            currency="USD")  # fmt: skip
    s.flush()
    run_flow(config, stack)
    got = sorted((r["customer_id"], r["trigger_type"], r["payload"].get("category"))
                 for r in _triggers(stack, config))  # fmt: skip
    assert got == [
        ("dee", "browse_interest", "toys"),
        ("dee", "cart_abandoned", None),
        ("eva", "browse_interest", "bags"),
        ("eva", "first_order_welcome", None),
        ("eva", "high_intent_no_purchase", None),
    ]
    stopped = read_topic(stack, config.kafka.topics.suppressions)
    assert [(r["customer_id"], r["trigger_type"], r["policy"], r["reason"]) for r in stopped] == [
        (
            "dee",
            "browse_interest",
            "priority",
            "cart_abandoned (priority 90) fired 60 s before, within the 60 s arbitration window",
        )
    ]


def test_frequency_caps_and_the_lower_cap_after_too_often(isolated_config, script, stack):
    config = isolated_config("rules.browse_interest.cooldown_hours=0", policies=True)
    s = script(config)
    categories = ["beauty", "shoes", "toys", "books"]
    for k, category in enumerate(categories):  # four streaks, 10 minutes apart
        _views(s, "eva", category, TEN_AM + k * 600)
        _views(s, "fin", category, TEN_AM + k * 600)
    s.event("feedback", "fin", "contacted_too_often", TEN_AM - 60)
    s.flush()
    run_flow(config, stack)
    per_customer = {}
    for r in _triggers(stack, config, "browse_interest"):
        per_customer.setdefault(r["customer_id"], []).append(r["reason"]["values"]["category"])
    assert per_customer == {"eva": ["beauty", "shoes", "toys"], "fin": ["beauty"]}
    stopped = _stopped(stack, config)
    assert stopped.count(("eva", "browse_interest", "frequency_cap")) == 1
    assert stopped.count(("fin", "browse_interest", "frequency_cap")) == 3


def test_quiet_hours_defer_in_local_time_across_zones_and_a_dst_change(
    isolated_config, script, stack
):
    config = isolated_config(policies=True)
    s = script(config)
    s.event("customers", "tok", "profile_updated", 0, timezone="Asia/Tokyo")
    _views(s, "tok", "beauty", 13 * H)  # 22:00 in Tokyo: quiet until 09:00 JST
    s.event("customers", "nyc", "profile_updated", 0, timezone="America/New_York")
    # 2026-03-08 03:30 UTC is 22:30 EST on the 7th; clocks spring forward that night,
    # so 09:00 on the 8th is EDT (UTC-4): 13:00 UTC, not 14:00.
    _views(s, "nyc", "shoes", 66 * D + 3.5 * H)
    s.event("customers", "utc", "profile_updated", 0, timezone="UTC")
    _views(s, "utc", "toys", TEN_AM)  # not quiet: goes out at once
    s.event("clickstream", "zed", "session_start", 66 * D + 14 * H)
    s.flush()
    run_flow(config, stack)
    sent = {r["customer_id"]: r for r in _triggers(stack, config, "browse_interest")}
    assert sent["tok"]["deferred"]["until"] == "2026-01-02T00:00:00.000+00:00"
    assert sent["tok"]["deferred"]["local_time"] == "2026-01-01T22:00+09:00"
    assert sent["nyc"]["deferred"]["until"] == "2026-03-08T13:00:00.000+00:00"
    assert "deferred" not in sent["utc"]
    assert sent["tok"]["send_window"] == {
        "timezone": "Asia/Tokyo",
        "from": "09:00",
        "until": "21:00",
    }
    assert _stopped(stack, config) == []  # deferred, never dropped


def test_quiet_hours_not_before_mode_emits_at_once(isolated_config, script, stack):
    config = isolated_config("policies.quiet_hours.mode=not_before", policies=True)
    s = script(config)
    s.event("customers", "tok", "profile_updated", 0, timezone="Asia/Tokyo")
    _views(s, "tok", "beauty", 13 * H)
    s.flush()
    run_flow(config, stack)
    (sent,) = _triggers(stack, config, "browse_interest")
    assert sent["not_before"] == "2026-01-02T00:00:00.000+00:00" and "deferred" not in sent


def test_regional_category_exclusion(isolated_config, script, stack):
    config = isolated_config("policies.regions={SA: {exclude_categories: [fragrance]}}",
                             policies=True)  # fmt: skip
    s = script(config)
    for cust, country in (("sal", "SA"), ("sam", "US")):
        s.event("customers", cust, "profile_updated", 0, country=country)
        _views(s, cust, "fragrance", TEN_AM)
    s.flush()
    run_flow(config, stack)
    assert [r["customer_id"] for r in _triggers(stack, config, "browse_interest")] == ["sam"]
    assert _stopped(stack, config) == [("sal", "browse_interest", "regional")]

"""Timer members (state/timers.py): no customer id confused with another, earlier-format
members still parsed, and a customer's members found for erasure in both formats."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from crmstream.state.store import StateStore, connect
from crmstream.state.timers import Timer, parse_member, timer_member
from tests.conftest import read_topic, run_flow

KINDS = ["cart_1", "cart_2", "delivery", "wake", "deferred", "recheck", "birthday", "dormant"]
# Any text, the separator and the format's marks included, and ids that prefix each other.
ANY_TEXT = st.text(max_size=12) | st.sampled_from(
    ["v1", "v1\x1fwake", "v1\x1fwake\x1f", "\x1f", "\x1f\x1f", "3:v1", "\xff", "", "a:b"]
)


@given(
    customer=ANY_TEXT, kind=st.sampled_from(KINDS), ref=ANY_TEXT, due=st.integers(-(2**62), 2**62)
)
def test_a_member_gives_back_exactly_its_timer(customer, kind, ref, due):
    """Round trip for any id and ref: so two timers that differ in anything have
    different members (issue 34: ``v1\\x1fwake``'s wake fired as customer ``v1``'s)."""
    member = timer_member(customer, kind, ref)
    assert member[:1] == b"\xff"
    assert parse_member(member, due) == Timer(customer, kind, ref, due)
    assert Timer(customer, kind, ref, due).member == member


@given(
    a=st.tuples(ANY_TEXT, st.sampled_from(KINDS), ANY_TEXT),
    b=st.tuples(ANY_TEXT, st.sampled_from(KINDS), ANY_TEXT),
)
def test_different_timers_never_share_a_member(a, b):
    assert (timer_member(*a) == timer_member(*b)) == (a == b)


@given(
    customer=st.text(min_size=1, max_size=12).filter(lambda c: "\x1f" not in c),
    kind=st.sampled_from(KINDS),
    ref=st.text(max_size=12),
)
def test_members_of_the_earlier_format_are_parsed_as_before(customer, kind, ref):
    earlier = f"{customer}\x1f{kind}\x1f{ref}"
    assert parse_member(earlier.encode(), 7) == Timer(customer, kind, ref, 7)
    assert parse_member(earlier, 7) == Timer(customer, kind, ref, 7)


@pytest.mark.parametrize(
    "member",
    [b"no-separator", b"one\x1fseparator", b"\xff", b"\xffx:ab", b"\xff9:short\x1fk\x1f",
     b"\xff2:ab", b"\xff2:abXk\x1f", b"\xff2:ab\x1fkind-without-ref", b"\xff\xfe"],
)  # fmt: skip
def test_a_malformed_member_is_a_value_error_naming_it(member):
    with pytest.raises(ValueError, match=r"not a timer member|codec"):
        parse_member(member, 0)


@pytest.mark.integration
def test_erasure_finds_a_customers_members_in_both_formats_and_no_others(stack):
    """``timer_members_of`` scans with the customer's own prefix in each format; glob
    characters in ids are escaped, and ids that prefix one another stay apart."""
    store = StateStore(connect(stack.redis_url, _redis_config()), "members-of")
    key = store.timers.key(0)
    store.client.delete(key)
    ids = ["v1", "v1\x1fwake", "v1*", "[v]1", "v?", "v\\1", "v"]
    current = {c: [timer_member(c, "cart_1"), timer_member(c, "delivery", "o\x1f1")] for c in ids}
    earlier = {c: [f"{c}\x1fwake\x1f".encode()] for c in ids if "\x1f" not in c}
    for members in (*current.values(), *earlier.values()):
        store.client.zadd(key, dict.fromkeys(members, 1))
    for customer in ids:
        found = sorted(store.timer_members_of(0, customer))
        assert found == sorted(current[customer] + earlier.get(customer, [])), customer


@pytest.mark.integration
def test_an_earlier_format_member_in_redis_still_fires_its_timer(isolated_config, script, stack):
    """A wake member rewritten into the earlier format (as a previous version wrote it)
    fires the cart nudges it stands for, and is replaced by the current format."""
    config = isolated_config("processing.shards=1")
    s = script(config)
    s.event("clickstream", "jo", "add_to_cart", 0, product_id="p", category="toys")
    s.flush()
    run_flow(config, stack)
    store = StateStore(connect(stack.redis_url, config.redis), config.redis.key_prefix)
    key = store.timers.key(0)
    ((member, due),) = store.client.zrange(key, 0, -1, withscores=True)
    assert parse_member(member, due).kind == "wake" and member[:1] == b"\xff"
    store.client.zrem(key, member)
    store.client.zadd(key, {b"jo\x1fwake\x1f": due})
    s.event("clickstream", "kim", "session_start", 25 * 3600)  # the clock passes both nudges
    s.flush()
    run_flow(config, stack)
    fired = [
        (r["customer_id"], r["payload"]["nudge"])
        for r in read_topic(stack, config.kafka.topics.triggers)
        if r["trigger_type"] == "cart_abandoned"
    ]
    assert fired == [("jo", 1), ("jo", 2)]
    assert b"jo\x1fwake\x1f" not in store.client.zrange(key, 0, -1)


def _redis_config():
    from crmstream.config.schema import RedisConfig

    return RedisConfig()


@pytest.mark.integration
def test_a_due_earlier_format_member_is_rewritten_and_one_scheduled_since_wins(stack):
    store = StateStore(connect(stack.redis_url, _redis_config()), "members-due")
    timers, key = store.timers, store.timers.key(0)
    store.client.delete(key)
    store.client.zadd(key, {b"a\x1fcart_1\x1f": 100, timer_member("a", "cart_1"): 500})
    store.client.zadd(key, {b"b\x1fdelivery\x1fo\x1f1": 150})
    assert timers.due(0, 200, 10) == [Timer("b", "delivery", "o\x1f1", 150)]
    # The earlier member of "a" was dropped: the one scheduled since keeps its time.
    assert sorted(store.client.zrange(key, 0, -1, withscores=True)) == sorted(
        [(timer_member("a", "cart_1"), 500.0), (timer_member("b", "delivery", "o\x1f1"), 150.0)]
    )
    assert timers.due(0, 600, 10) == [
        Timer("b", "delivery", "o\x1f1", 150),
        Timer("a", "cart_1", "", 500),
    ]

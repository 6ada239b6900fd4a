"""The customer step without servers: each trigger of docs/triggers.md fires, and its near
miss does not, with the values, thresholds and payload the catalogue table names.

``operators.customer_step.CustomerStep`` is pure (no Redis, no Kafka): these
scenarios run it over validated events of one customer, in one step, with the
step's bound just before the customer's newest event (timers due before it
fire, as in the flow). They hold operators/catalog.py, operators/firings.py,
operators/timer_slots.py and the customer step itself to the catalogue in
docs/triggers.md, which ``test_the_catalogue_table_names_what_each_trigger_carries``
reads: each fired candidate carries the ``reason.values`` and ``payload`` keys
its row lists.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from crmstream.config import load_config
from crmstream.operators.catalog import Candidate
from tests.thresholds import DAY, HOUR, T0, body, parse, story

CONFIG = load_config(None, [], env={})
MIN = 60_000


def _fired(bodies, kind=None, config=CONFIG, **kw) -> list[Candidate]:
    out, _ = story(config, bodies, **kw)
    return [c for c in out.candidates if kind is None or c.trigger_type == kind]


def _views(n, category="beauty", at=T0, gap=MIN):
    return [body("product_view", at + k * gap, category=category) for k in range(n)]


def _tick(at_ms):
    return body("session_start", at_ms)


# One scenario per trigger type: what makes it fire, and a near miss.
SCENARIOS = {
    "browse_interest": (
        _views(3),
        _views(2) + _views(1, "toys", T0 + 5 * MIN) + _views(1, at=T0 + 6 * MIN),
    ),
    "high_intent_no_purchase": (
        _views(5) + [body("add_to_cart", T0 + HOUR + k) for k in range(2)],
        _views(5) + [body("order_placed", T0 + HOUR)]
        + [body("add_to_cart", T0 + 2 * HOUR + k) for k in range(2)],
    ),
    "cart_abandoned": (
        [body("add_to_cart", T0), _tick(T0 + HOUR + 1)],
        [body("add_to_cart", T0), body("order_placed", T0 + 30 * MIN), _tick(T0 + 2 * HOUR)],
    ),
    "first_order_welcome": (
        [body("order_placed", T0)],
        [body("page_view", T0)],
    ),
    "potential_no_repeat": (
        [body("order_placed", T0), body("page_view", T0 + 15 * DAY), _tick(T0 + 21 * DAY + 1)],
        [body("order_placed", T0), body("order_placed", T0 + 5 * DAY),
         body("page_view", T0 + 15 * DAY), _tick(T0 + 30 * DAY)],
    ),
    "repurchase_due": (
        [body("order_placed", T0), body("order_placed", T0 + 20 * DAY), _tick(T0 + 34 * DAY)],
        [body("order_placed", T0), body("order_placed", T0 + 20 * DAY),
         body("order_placed", T0 + 30 * DAY), _tick(T0 + 34 * DAY)],
    ),
    "dormant_win_back": (
        [body("order_placed", T0), _tick(T0 + 30 * DAY + 1)],
        [body("order_placed", T0), body("order_placed", T0 + 20 * DAY), _tick(T0 + 31 * DAY)],
    ),
    "churn_risk": (
        # a regular buyer who goes quiet: the recheck timers derive the score again
        [body("order_placed", T0 + k * 7 * DAY) for k in range(8)]
        + [body("service_ticket", T0 + 50 * DAY, sentiment=-0.9)]
        + [body("product_review", T0 + 50 * DAY + 1, rating=1)]
        + [body("logistics_update", T0 + 50 * DAY + k + 2) for k in range(2)]
        + [_tick(T0 + 200 * DAY)],
        [body("order_placed", T0 + k * 7 * DAY) for k in range(8)] + [_tick(T0 + 50 * DAY)],
    ),
    "tier_upgrade": (
        [body("order_placed", T0, amount=250.0)],
        [body("order_placed", T0, amount=199.0)],
    ),
    "delivery_delay": (
        [body("order_placed", T0, order_id="o1"),
         body("order_shipped", T0 + HOUR, order_id="o1", promised_delivery_time=T0 + DAY),
         _tick(T0 + 3 * DAY + 1)],
        [body("order_placed", T0, order_id="o1"),
         body("order_shipped", T0 + HOUR, order_id="o1", promised_delivery_time=T0 + DAY),
         body("order_delivered", T0 + 2 * DAY, order_id="o1"), _tick(T0 + 4 * DAY)],
    ),
    "birthday": (
        [body("profile_updated", T0, birthday="01-20"), _tick(T0 + 16 * DAY + 1)],
        [body("profile_updated", T0, birthday="01-20"), _tick(T0 + 16 * DAY)],
    ),
    "service_recovery": (
        [body("order_placed", T0, amount=600.0), body("order_returned", T0 + DAY)],
        [body("order_placed", T0, amount=100.0), body("order_returned", T0 + DAY)],
    ),
    "interest_shift": (
        _views(10, "beauty") + _views(1, "beauty", T0 + 7 * DAY)
        + _views(40, "baby", T0 + 8 * DAY),
        _views(10, "beauty") + _views(1, "beauty", T0 + 7 * DAY)
        + _views(3, "baby", T0 + 8 * DAY),
    ),
}  # fmt: skip


@pytest.mark.parametrize("kind", sorted(SCENARIOS))
def test_each_trigger_fires_and_its_near_miss_does_not(kind):
    fires, near_miss = SCENARIOS[kind]
    got = _fired(fires, kind)
    assert got, f"{kind} did not fire"
    assert _fired(near_miss, kind) == [], f"{kind} fired in its near miss"


def _catalogue() -> dict[str, tuple[set[str], set[str]]]:
    """docs/triggers.md's catalogue: per trigger, the reason.values and payload keys."""
    text = (Path(__file__).parents[1] / "docs" / "triggers.md").read_text()
    table = text[text.index("## The catalogue") :].split("\n\n")[1]
    out = {}
    for row in table.splitlines()[2:]:
        cells = [c.strip() for c in row.strip("|").split("|")]
        name = re.findall(r"`(\w+)`", cells[0])[0]
        names = [set(re.findall(r"`(\w+)`", cell)) for cell in cells[3:5]]
        out[name] = (names[0], names[1])
    return out


def test_the_catalogue_table_names_what_each_trigger_carries():
    catalogue = _catalogue()
    assert set(catalogue) == set(SCENARIOS)
    for kind, (values, payload) in catalogue.items():
        for cand in _fired(SCENARIOS[kind][0], kind):
            # tier_upgrade lists both of its changes' keys ("spend or orders", "tier or
            # segment"): the candidate carries those of its own change
            either = ({"tier", "segment", "high_value_entered"} if kind == "tier_upgrade"
                      else set())  # fmt: skip
            assert values <= set(cand.values) | either, (kind, cand.values)
            assert payload - either <= set(cand.payload), (kind, cand.payload)


def test_a_later_cart_add_moves_both_nudges():
    add = [body("add_to_cart", T0), body("add_to_cart", T0 + 30 * MIN)]
    assert _fired([*add, _tick(T0 + HOUR + 1)], "cart_abandoned") == []
    (nudge,) = _fired([*add, _tick(T0 + 90 * MIN + 1)], "cart_abandoned")
    assert nudge.values["nudge"] == 1 and nudge.event_time_ms == T0 + 90 * MIN
    both = _fired([*add, _tick(T0 + 30 * MIN + DAY + 1)], "cart_abandoned")
    assert [c.values["nudge"] for c in both] == [1, 2]


def test_win_back_steps_chain_and_an_order_re_anchors_them():
    steps = _fired([body("order_placed", T0), _tick(T0 + 181 * DAY)], "dormant_win_back")
    assert [c.values["days_without_purchase"] for c in steps] == [30, 90, 180]
    assert [c.event_time_ms for c in steps] == [T0 + d * DAY for d in (30, 90, 180)]
    again = _fired([body("order_placed", T0), body("order_placed", T0 + 40 * DAY),
                    _tick(T0 + 91 * DAY)], "dormant_win_back")  # fmt: skip
    assert [c.event_time_ms for c in again] == [T0 + 30 * DAY, T0 + 70 * DAY]


def test_an_order_at_the_very_due_time_of_a_win_back_step_re_anchors_it():
    """Events at T come before a timer due at T in the customer's timeline."""
    bodies = [body("order_placed", T0), body("order_placed", T0 + 30 * DAY),
              _tick(T0 + 61 * DAY)]  # fmt: skip
    steps = _fired(bodies, "dormant_win_back")
    assert [c.event_time_ms for c in steps] == [T0 + 60 * DAY]
    # the same with the step stored as a timer-set member (an earlier version's)
    from crmstream.state.timers import Timer

    stored = Timer("c", "dormant_30", str(T0), T0 + 30 * DAY)
    bodies = [body("order_placed", T0 + 30 * DAY), _tick(T0 + 31 * DAY)]
    assert _fired(bodies, "dormant_win_back", members=[stored]) == []


def test_a_stored_timer_the_state_has_moved_does_not_fire():
    """docs/triggers.md: a timer's condition is checked again when it fires, so a moved
    timer never fires: a stored cart nudge due an hour after an earlier cart add, when
    the state's newest cart add is later."""
    from crmstream.state.timers import Timer

    stale = Timer("c", "cart_1", "", T0 + HOUR)
    bodies = [body("add_to_cart", T0 + 30 * MIN), _tick(T0 + 2 * HOUR)]
    nudges = _fired(bodies, "cart_abandoned", members=[stale])
    assert [(c.values["nudge"], c.event_time_ms) for c in nudges] == [(1, T0 + 90 * MIN)]


def test_a_customs_hold_waits_longer_and_a_delivery_within_it_cancels():
    ship = [body("order_placed", T0, order_id="o1"),
            body("order_shipped", T0 + HOUR, order_id="o1", promised_delivery_time=T0 + DAY),
            body("logistics_update", T0 + 2 * HOUR, order_id="o1", status="customs_hold")]
    (late,) = _fired([*ship, _tick(T0 + 4 * DAY + 1)], "delivery_delay")
    assert late.event_time_ms == T0 + DAY + 72 * HOUR and late.values["hours_late"] == 72
    on_time = [*ship, body("order_delivered", T0 + DAY + 60 * HOUR, order_id="o1"),
               _tick(T0 + 5 * DAY)]  # fmt: skip
    assert _fired(on_time, "delivery_delay") == []


def test_welcome_at_the_first_order_and_a_day_after_the_first_delivery_only():
    bodies = [body("order_placed", T0, order_id="o1"), body("order_delivered", T0 + DAY),
              body("order_placed", T0 + 2 * DAY, order_id="o2"),
              body("order_delivered", T0 + 3 * DAY, order_id="o2"), _tick(T0 + 10 * DAY)]
    stages = [(c.values["stage"], c.event_time_ms) for c in _fired(bodies, "first_order_welcome")]
    assert stages == [("order_placed", T0), ("delivered", T0 + 2 * DAY)]


def test_the_birthday_comes_back_every_year():
    bodies = [body("profile_updated", T0, birthday="01-20"), _tick(T0 + 400 * DAY)]
    times = [c.event_time_ms for c in _fired(bodies, "birthday")]
    assert times == [T0 + 16 * DAY, T0 + 381 * DAY]  # 2026-01-17 and 2027-01-17, 00:00 UTC


def test_interest_shift_fires_once_per_snapshot_period():
    base = _views(10, "beauty") + _views(1, "beauty", T0 + 7 * DAY)
    more = _views(40, "baby", T0 + 8 * DAY) + _views(40, "toys", T0 + 9 * DAY)
    shifts = _fired(base + more, "interest_shift")
    assert len(shifts) == 1
    assert (shifts[0].values["from"], shifts[0].values["to"]) == ("beauty", "baby")
    later = more + _views(60, "books", T0 + 16 * DAY)  # the next period
    assert len(_fired(base + later, "interest_shift")) == 2


def test_tier_upgrade_names_each_rise_and_the_high_value_entry():
    rises = _fired([body("order_placed", T0, amount=250.0),
                    body("order_placed", T0 + DAY, amount=300.0)], "tier_upgrade")  # fmt: skip
    assert [(c.values["change"], c.values["from"], c.values["to"]) for c in rises] == [
        ("tier", "none", "silver"), ("tier", "silver", "gold")]  # fmt: skip
    orders = [body("order_placed", T0 + k * DAY, amount=60.0) for k in range(5)]
    entered = [(c.values["change"], c.event_time_ms) for c in _fired(orders, "tier_upgrade")]
    assert entered == [("tier", T0 + 3 * DAY), ("high_value_entered", T0 + 4 * DAY)]


def test_high_intent_fires_once_until_an_order_breaks_it():
    views, carts = _views(5), [body("add_to_cart", T0 + HOUR + k) for k in range(3)]
    assert len(_fired(views + carts + _views(5, at=T0 + 2 * HOUR), "high_intent_no_purchase")) == 1


def test_churn_risk_fires_once_while_high():
    config = load_config(None, ["churn.bias=5"], env={})  # every customer's score is high
    fired = _fired(_views(3) + _views(3, at=T0 + DAY), "churn_risk", config)
    assert len(fired) == 1 and fired[0].event_time_ms == T0
    assert fired[0].values["churn_score"] >= config.churn.high


def test_an_erasure_starts_the_customer_again_from_nothing():
    out, records = story(CONFIG, [*_views(2), body("erasure_requested", T0 + HOUR),
                                  body("product_view", T0 + 2 * HOUR)])  # fmt: skip
    assert [e.customer for e in out.erasures] == ["c"]
    assert int(records[0]["type_counts"].sum()) == 1
    lives = [e.life for e in out.epochs["c"]]
    assert lives[0] == 0 and lives[-1] == 1


def test_a_consent_change_is_the_context_of_the_candidates_after_it_only():
    bodies = [*_views(3), body("consent_withdrawn", T0 + HOUR, channel="email"),
              *_views(3, "toys", at=T0 + 2 * HOUR)]  # fmt: skip
    out, _ = story(CONFIG, bodies)
    contexts = [out.epochs["c"][out.epochs_of[k]].updates.get("consent.email")
                for k, c in enumerate(out.candidates) if c.trigger_type == "browse_interest"]
    assert contexts[0] is None and contexts[-1] and contexts[-1].startswith("withdrawn")


def test_a_non_buyers_churn_recheck_repeats_until_past_the_90_day_baseline():
    """Every ``recheck_days`` (7) while the customer is quiet: the last at 98 days, the
    first recheck more than 91 days after its last event (a non-buyer's labels change no
    more)."""
    out, _ = story(CONFIG, [_tick(T0)], bound_ms=T0 + 400 * DAY)
    rechecks = [(t.due_ms - T0) // DAY for t in out.fired if t.kind == "recheck"]
    assert rechecks == list(range(7, 99, 7))


def test_candidates_carry_the_thresholds_and_values_as_configured():
    """The thresholds a candidate held against, and its values as the record shows them."""
    intent = _fired(SCENARIOS["high_intent_no_purchase"][0], "high_intent_no_purchase")
    rule = CONFIG.rules.high_intent_no_purchase
    assert [c.thresholds for c in intent] == [
        {"min_views": rule.min_views, "min_cart_adds": rule.min_cart_adds, "max_orders": 0}
    ]
    # Spend to the cent: 5 orders of 60.125 are 300.625, shown as 300.62 or 300.63.
    orders = [body("order_placed", T0 + k * DAY, amount=60.125) for k in range(5)]
    (entered,) = [c for c in _fired(orders, "tier_upgrade")
                  if c.values["change"] == "high_value_entered"]  # fmt: skip
    spend = entered.values["spend_90d"]
    assert spend == round(spend, 2) and abs(spend - 300.625) <= 0.005


def test_the_top_categories_of_a_derived_candidate_include_the_first_of_the_taxonomy():
    """Category 0 of the taxonomy is a category like any other in ``top_categories``."""
    config = load_config(None, ["churn.bias=5"], env={})
    first = config.taxonomy.categories[0]
    (churn,) = _fired(_views(3, first), "churn_risk", config)
    assert churn.payload["top_categories"] == [first]


@pytest.mark.parametrize("order_first", [False, True])
def test_an_order_at_the_cart_adds_own_millisecond_cancels_its_nudges(order_first):
    """The two topics' events at one instant arrive in either order: either way the
    checkout is not an abandoned cart; an order a millisecond before the cart add is."""
    same = [body("add_to_cart", T0), body("order_placed", T0)]
    bodies = [*(same[::-1] if order_first else same), _tick(T0 + 2 * DAY)]
    assert _fired(bodies, "cart_abandoned") == []
    earlier = [body("order_placed", T0 - 1), body("add_to_cart", T0), _tick(T0 + 2 * DAY)]
    assert [c.values["nudge"] for c in _fired(earlier, "cart_abandoned")] == [1, 2]


# -- timers among the step's events (DESIGN.md decision 13), one step at a time --------
def test_two_carts_in_one_step_get_a_nudge_each_at_its_own_time():
    """A nudge due before the next cart add fires then, before that add moves it."""
    bodies = [body("add_to_cart", T0), body("add_to_cart", T0 + 4 * HOUR),
              _tick(T0 + 6 * HOUR)]  # fmt: skip
    nudges = [(c.values["nudge"], c.event_time_ms) for c in _fired(bodies, "cart_abandoned")]
    assert nudges == [(1, T0 + HOUR), (1, T0 + 5 * HOUR)]


def test_an_orders_delivery_timer_fires_before_a_late_delivery_in_the_same_step():
    """The delivery allowance (48 h after the promise) runs out before the delivery:
    the delay fires at its due time, whatever comes after it in the step."""
    ship = [body("order_placed", T0, order_id="o1"),
            body("order_shipped", T0 + HOUR, order_id="o1", promised_delivery_time=T0 + DAY)]
    late = body("order_delivered", T0 + 4 * DAY, order_id="o1")
    (delay,) = _fired([*ship, late, _tick(T0 + 5 * DAY)], "delivery_delay")
    assert delay.event_time_ms == T0 + DAY + 48 * HOUR


def test_a_stored_member_due_in_the_step_fires_and_a_wake_member_only_wakes():
    from crmstream.operators.timer_slots import WAKE
    from crmstream.state.timers import Timer

    stored = Timer("c", "cart_1", "", T0 + HOUR)
    wake = Timer("c", WAKE, "", T0 + HOUR)
    bodies = [body("add_to_cart", T0 - 1), _tick(T0 + 2 * HOUR)]
    # the record's cart add is at T0 - 1: its own nudge is due at T0 + HOUR - 1; the
    # stored member (an earlier version's) is the one at T0 + HOUR, moved: it does not fire
    out, _ = story(CONFIG, bodies, members=[stored, wake])
    assert Timer("c", "cart_1", "", T0 + HOUR) in out.fired
    assert all(t.kind != WAKE for t in out.fired)


def test_derived_triggers_at_a_timer_wave_belong_to_their_own_customers():
    """Two customers' rechecks fire in one wave and each turns a churn score high: each
    candidate names its own customer and the recheck's time."""
    orders = []
    for c in ("a", "b"):  # a steady customer (tests/test_catalog.py's hal), then quiet
        for day in range(0, 60, 2):
            at = T0 + day * DAY + (3 * DAY if c == "b" else 0)  # not the same times
            orders += [body("session_start", at, customer=c),
                       body("product_view", at + 60, customer=c)]  # fmt: skip
            if day % 6 == 0:
                orders.append(body("order_placed", at + 120, customer=c, order_id=f"{c}{day}"))
    out, _ = story(CONFIG, orders, bound_ms=T0 + 400 * DAY)
    churn = [(c.customer, c.event_time_ms) for c in out.candidates
             if c.trigger_type == "churn_risk"]  # fmt: skip
    rechecks = {(t.customer, t.due_ms) for t in out.fired if t.kind == "recheck"}
    assert {c for c, _ in churn} == {"a", "b"}
    assert all(fired in rechecks for fired in churn)


def test_a_timer_whose_ref_is_an_order_id_leaves_that_order_open():
    """Timers other than the delivery check never close an order, whatever their ref: the
    no-repeat check's ref is its order's time, which an order id may equal."""
    days = CONFIG.rules.potential_no_repeat.days
    oid = str(T0)
    ship = [body("order_placed", T0, order_id=oid),
            body("order_shipped", T0 + HOUR, order_id=oid,
                 promised_delivery_time=T0 + (days + 1) * DAY)]  # fmt: skip
    out, _ = story(CONFIG, [*ship, _tick(T0 + (days + 10) * DAY)])
    assert ("potential", T0 + days * DAY) in [(t.kind, t.due_ms) for t in out.fired]
    delays = [c.event_time_ms for c in out.candidates if c.trigger_type == "delivery_delay"]
    assert delays == [T0 + (days + 1) * DAY + 48 * HOUR]


def test_a_stored_timer_fires_before_a_later_event_of_the_step():
    """A stored win-back step due before the step's order fires then: the order does not
    re-anchor it first (each customer's timeline in event time)."""
    from crmstream.state.timers import Timer

    stored = Timer("c", "dormant_30", str(T0), T0 + 30 * DAY)
    bodies = [body("order_placed", T0 + 35 * DAY), _tick(T0 + 36 * DAY)]
    steps = _fired(bodies, "dormant_win_back", members=[stored])
    assert [c.event_time_ms for c in steps] == [T0 + 30 * DAY]


def _second_step(first: list, second: list, config=CONFIG):
    """Two steps of one customer: the first's timers wait (it ends before any is due), the
    second loads its state, stored members and open orders."""
    out, records = story(config, first, bound_ms=max(b["event_time"] for b in first))
    return story(config, second, records=records, members=out.plan.schedule,
                 promises=out.plan.promises)[0]  # fmt: skip


def test_a_stored_cart_nudge_fires_before_the_next_steps_cart_add():
    out = _second_step([body("add_to_cart", T0)],
                       [body("add_to_cart", T0 + 4 * HOUR), _tick(T0 + 6 * HOUR)])  # fmt: skip
    nudges = [c.event_time_ms for c in out.candidates if c.trigger_type == "cart_abandoned"]
    assert nudges == [T0 + HOUR, T0 + 5 * HOUR]


def test_a_stored_delivery_check_fires_before_the_next_steps_late_delivery():
    ship = [body("order_placed", T0, order_id="o1"),
            body("order_shipped", T0 + HOUR, order_id="o1", promised_delivery_time=T0 + DAY)]
    late = [body("order_delivered", T0 + 4 * DAY, order_id="o1"), _tick(T0 + 5 * DAY)]
    out = _second_step(ship, late)
    delays = [c.event_time_ms for c in out.candidates if c.trigger_type == "delivery_delay"]
    assert delays == [T0 + DAY + 48 * HOUR]


def test_a_stored_quiet_hours_hold_goes_out_when_due_in_the_step_and_not_before():
    """A hold (a ``deferred`` member) due by the customer's bound goes out in the step; one
    due later stays stored."""
    from crmstream.state.timers import Timer

    due = Timer("c", "deferred", '{"trigger_id":"t1"}', T0 + HOUR)
    later = Timer("c", "deferred", '{"trigger_id":"t2"}', T0 + 3 * HOUR)
    out, _ = story(CONFIG, [_tick(T0 + 2 * HOUR)], members=[due, later])
    assert out.held == [due]
    assert later not in out.plan.schedule and later.member not in out.plan.cancel


def test_a_customer_with_no_timer_left_has_its_wake_member_removed():
    """The wake member names the customer's earliest folded timer: after the last one
    fires, it is removed, never stored with a due time of "never"."""
    from crmstream.operators.timer_slots import WAKE
    from crmstream.state.timers import Timer

    config = load_config(None, ["rules.churn_risk.enabled=false"], env={})
    out = _second_step([body("add_to_cart", T0)], [_tick(T0 + 2 * DAY)], config)
    assert [t.kind for t in out.fired] == ["cart_1", "cart_2"]
    assert [t for t in out.plan.schedule if t.kind == WAKE] == []
    assert Timer("c", WAKE, "", 0).member in out.plan.cancel


def test_the_columns_of_no_events_are_empty_and_typed():
    """A round with only due timers has no events: every column is empty, of its type."""
    from crmstream.operators.columns import EventColumns

    some = EventColumns.of(parse(CONFIG, [body("product_view", T0)]), {"c": 0})
    none = EventColumns.of([], {})
    assert [len(c) for c in none] == [0] * len(none)
    assert [getattr(c, "dtype", None) for c in none] == [getattr(c, "dtype", None) for c in some]


# -- the catalogue's planning and firing, called directly (fast: the mutation sample's) --


def _catalog():
    from crmstream.operators.catalog import TriggerCatalog
    from crmstream.operators.params import params_from

    return TriggerCatalog(CONFIG, params_from(CONFIG).churn_weights)


def _event(kind: str, at: int, order: str = "", promised: int = 0, k: int = 0):
    from crmstream.operators.events import EVENT_CODE, ParsedEvent

    fields = {"order_id": order} if order else {}
    if promised:
        fields["promised_delivery_time"] = promised
    return ParsedEvent("cz", f"{kind}-{at}-{k}", EVENT_CODE[kind], at, -1, 0.0, "t", 0, k, at,
                       0.0, fields)  # fmt: skip


def _plan(events, before, record=None, promises=None):
    from crmstream.operators.catalog import TimerPlan
    from crmstream.state.encoding import fresh_records

    record = fresh_records(1)[0] if record is None else record
    plan = TimerPlan([], [], {}, {})
    promises = {} if promises is None else promises
    found = _catalog().plan("cz", record, events, promises, plan, before,
                            CONFIG.state.allowed_lateness_seconds * 1000)  # fmt: skip
    return found, plan, promises


def test_a_late_shipment_opens_no_order_and_the_shipments_after_it_still_do():
    """A shipment more than the allowed lateness behind the customer's newest event opens
    no order (outsider 50); one in time after it in the same segment still does."""
    from crmstream.operators.catalog import Before

    newest = T0 + 10 * DAY
    before = Before(1, 0, 0, 0, 1, newest)
    late = _event("order_shipped", T0, "o1", promised=T0 + 2 * DAY, k=1)
    on_time = _event("order_shipped", newest, "o2", promised=newest + 2 * DAY, k=2)
    _found, plan, promises = _plan([late, on_time], before)
    assert set(promises) == {"o2"}
    assert [t.ref for t in plan.schedule if t.kind == "delivery"] == ["o2"]


def test_an_older_order_on_a_new_day_plans_the_repurchase_again():
    """An order within the lateness, older than the newest one but on a day not counted
    yet, moves no ``last_order_ms`` but adds a purchase day: the repurchase is planned
    again with the new mean gap (as if the orders had come in time order)."""
    from crmstream.operators.catalog import Before
    from crmstream.state.encoding import fresh_records

    record = fresh_records(1)[0]
    last = T0 + 40 * DAY
    record["last_order_ms"] = last
    record["purchase_days"] = 3
    record["first_purchase_day"] = T0 // DAY
    record["last_purchase_day"] = last // DAY
    older = _event("order_placed", last - HOUR // 2, "o3")
    before = Before(2, 0, 0, last, 2, last)
    _found, plan, _ = _plan([older], before, record)
    assert [t.kind for t in plan.schedule if t.kind == "repurchase"] == ["repurchase"]
    same_days = Before(2, 0, 0, last, 3, last)  # nothing moved: nothing planned again
    _found, plan, _ = _plan([older], same_days, record)
    assert [t for t in plan.schedule if t.kind == "repurchase"] == []


def test_a_delivery_timer_fires_only_at_its_promise_and_allowance():
    """A delivery timer whose due time is not the open order's promise plus its allowance
    (moved by a customs hold) fires nothing; the one that is fires a delivery delay."""
    from crmstream.state.encoding import fresh_records
    from crmstream.state.promises import Promise
    from crmstream.state.timers import Timer

    catalog = _catalog()
    promise = Promise(T0 + 10**9)  # a due time past the small-integer cache
    due = promise.promised_ms + catalog.allowance_ms(promise)
    record = fresh_records(1)[0]
    fired = catalog.fire(Timer("cz", "delivery", "o1", due), record, {"o1": promise})
    assert fired is not None and fired.trigger_type == "delivery_delay"
    moved = Timer("cz", "delivery", "o1", due + 1)
    assert catalog.fire(moved, record, {"o1": promise}) is None


def test_a_repurchase_timer_fires_unless_an_order_came_after_its_anchor_by_its_due():
    from crmstream.state.encoding import fresh_records
    from crmstream.state.timers import Timer

    catalog = _catalog()
    anchor, due = T0, T0 + 20 * DAY
    record = fresh_records(1)[0]
    timer = Timer("cz", "repurchase", str(anchor), due)
    record["last_order_ms"] = anchor + DAY  # bought again before the due time
    assert catalog.fire(timer, record, {}) is None
    record["last_order_ms"] = due + DAY  # an order after the due time: it was due then
    fired = catalog.fire(timer, record, {})
    assert fired is not None and fired.trigger_type == "repurchase_due"


def test_a_delivery_closes_its_order_and_the_orders_after_it_in_the_segment_still_open():
    from crmstream.operators.catalog import Before

    events = [
        _event("order_shipped", T0, "o1", promised=T0 + 2 * DAY, k=1),
        _event("order_delivered", T0 + DAY, "o1", k=2),
        _event("order_shipped", T0 + DAY + 1, "o2", promised=T0 + 3 * DAY, k=3),
    ]
    _found, plan, promises = _plan(events, Before(1, 0, 0, 0, 1, T0))
    assert set(promises) == {"o2"}
    assert plan.delivered == {"cz": ["o1"]}
    assert [t.ref for t in plan.schedule if t.kind == "delivery"] == ["o1", "o2"]
    assert len(plan.cancel) == 1

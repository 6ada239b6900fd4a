"""The backtest's comparison, without servers: properties over drawn pairs of run outputs.

A pair of runs is drawn as outcomes of a pool of trigger ids (each id stands for
one customer, type and event time, as a deterministic id does): absent, sent at
some time with some content, or suppressed by some policy, independently per run.
"""

from __future__ import annotations

from collections import Counter

from hypothesis import given, settings
from hypothesis import strategies as st

from crmstream.backtest_diff import (
    CHANGE_KINDS,
    CONTACT_BUCKETS,
    Change,
    RunOutputs,
    classify,
    diff,
    examples,
    figures,
    run_outputs,
    sent_outcome,
)

TYPES = ("browse_interest", "cart_abandoned", "churn_risk")
POLICIES = ("cooldown", "frequency_cap", "priority", "regional")
MIRROR = {
    "only_base": "only_candidate",
    "only_candidate": "only_base",
    "sent_to_suppressed": "suppressed_to_sent",
    "suppressed_to_sent": "sent_to_suppressed",
    "policy_changed": "policy_changed",
    "send_time_moved": "send_time_moved",
    "content_changed": "content_changed",
}


def _identity(i: int) -> dict:
    """What the id fixes: customer, type, event time (the same in both runs)."""
    return {
        "trigger_id": f"id{i:02d}",
        "trigger_type": TYPES[i % len(TYPES)],
        "customer_id": f"c{i % 5}",
        "event_time": f"2026-01-01T{i % 24:02d}:00:00.000+00:00",
        "rule": {"name": TYPES[i % len(TYPES)], "version": 1},
    }


def _sent(i: int, shift: int, channel: str, top: str, held: bool) -> tuple[str, dict]:
    record = {**_identity(i), "channel": channel, "payload": {"top_categories": [top]}}
    if shift:
        until = f"2026-01-02T{(i + shift) % 24:02d}:00:00.000+00:00"
        record["deferred"] = {"policy": "quiet_hours", "until": until}
    return ("held" if held else "sent"), record


def _suppressed(i: int, policy: str) -> tuple[str, dict]:
    return "suppressed", {**_identity(i), "policy": policy, "reason": f"by {policy}"}


def _outcome(i: int, code: int) -> tuple[str, dict] | None:
    """Outcome number ``code`` (0-15) of id ``i``: none, sent (at the event time or
    deferred, on one of two channels, with one of two payloads, emitted or held), or
    suppressed by one of four policies."""
    if code < 2:
        return None
    if code < 12:
        k = code - 2
        shift, channel = (0, 0, 1, 5)[k % 4], ("push", "email")[k // 4 % 2]
        return _sent(i, shift, channel, ("toys", "beauty")[k // 8], held=k == 9)
    return _suppressed(i, POLICIES[code - 12])


@st.composite
def runs(draw) -> tuple[RunOutputs, RunOutputs]:
    n = draw(st.integers(1, 24))
    pair = []
    for _side in range(2):
        sent, stopped, held = [], [], []
        for i, code in enumerate(draw(st.lists(st.integers(0, 15), min_size=n, max_size=n))):
            got = _outcome(i, code)
            if got is not None:
                {"sent": sent, "held": held, "suppressed": stopped}[got[0]].append(got[1])
        pair.append(run_outputs(sent, stopped, held, dead_letters=draw(st.integers(0, 3))))
    return pair[0], pair[1]


def _visible(outcome) -> tuple | None:
    """What the customer sees, written independently of ``classify``."""
    if outcome is None:
        return None
    r = outcome.record
    if outcome.status == "suppressed":
        return ("suppressed", r["policy"])
    until = (r.get("deferred") or {}).get("until") or r["event_time"]
    return ("sent", until, r.get("channel"), r.get("language"), str(r.get("payload")))


@settings(max_examples=300, deadline=None)
@given(runs())
def test_the_diff_holds_exactly_the_ids_whose_visible_outcome_differs(pair):
    base, cand = pair
    changed = {ch.trigger_id for ch in diff(base, cand)}
    expected = {
        tid
        for tid in base.outcomes.keys() | cand.outcomes.keys()
        if _visible(base.outcomes.get(tid)) != _visible(cand.outcomes.get(tid))
    }
    assert changed == expected
    assert diff(base, base) == [] and diff(cand, cand) == []


@settings(max_examples=300, deadline=None)
@given(runs())
def test_counts_by_type_and_policy_reconcile_with_the_changes(pair):
    """Candidate minus base, per type and per policy, is what the changed ids add and
    take away: no change is lost or counted twice."""
    base, cand = pair
    fb, fc = figures(base), figures(cand)
    sent_delta: Counter[str] = Counter()
    policy_delta: Counter[str] = Counter()
    for ch in diff(base, cand):
        for outcome, sign in ((ch.base, -1), (ch.candidate, +1)):
            if outcome is None:
                continue
            if outcome.sent:
                sent_delta[ch.trigger_type] += sign
            else:
                policy_delta[outcome.policy] += sign
    for t in TYPES:
        assert fc.sent_by_type[t] - fb.sent_by_type[t] == sent_delta[t]
    for p in POLICIES:
        assert fc.suppressed_by_policy[p] - fb.suppressed_by_policy[p] == policy_delta[p]


@settings(max_examples=200, deadline=None)
@given(runs())
def test_swapping_base_and_candidate_mirrors_every_change(pair):
    base, cand = pair
    forward = {ch.trigger_id: ch.kind for ch in diff(base, cand)}
    backward = {ch.trigger_id: ch.kind for ch in diff(cand, base)}
    assert backward == {tid: MIRROR[kind] for tid, kind in forward.items()}
    assert set(forward.values()) <= set(CHANGE_KINDS)


@settings(max_examples=200, deadline=None)
@given(runs())
def test_customer_figures_add_up(pair):
    for run in pair:
        f = figures(run)
        sent = [o for o in run.outcomes.values() if o.sent]
        assert sum(f.contacts_per_customer.values()) == f.customers_contacted
        assert sum(f.sent_by_type.values()) == len(sent)
        assert f.customers_contacted <= f.customers_with_candidates
        assert 0.0 <= f.capped_share <= 1.0
        assert f.held_past_end == sum(o.held for o in sent)
        assert f.deferred == sum(1 for o in sent if "deferred" in o.record)
        assert set(f.contacts_per_customer) == set(CONTACT_BUCKETS)


@settings(max_examples=100, deadline=None)
@given(runs(), st.integers(0, 4))
def test_examples_pick_at_most_n_customers_per_type_from_the_changes(pair, n):
    changes = diff(*pair)
    picked = examples(changes, n)
    for kind, customers in picked.items():
        assert len(customers) <= n
        for customer, chs in customers:
            assert chs and all(c.trigger_type == kind and c.customer_id == customer for c in chs)
    shown = {c.trigger_id for customers in picked.values() for _, chs in customers for c in chs}
    if n:  # every type that changed is shown
        assert {c.trigger_type for c in changes} == set(picked)
    assert shown <= {c.trigger_id for c in changes}


def test_a_trigger_goes_out_at_its_quiet_hours_end_or_not_before_else_when_detected():
    plain = {**_identity(1), "channel": "push"}
    assert sent_outcome(plain).send_at == plain["event_time"]
    held = {**plain, "deferred": {"until": "2026-01-02T09:00:00.000+00:00"}}
    assert sent_outcome(held).send_at == "2026-01-02T09:00:00.000+00:00"
    assert sent_outcome(held).shift_ms() == (24 + 9 - 1) * 3_600_000
    later = {**plain, "not_before": "2026-01-01T09:00:00.000+00:00"}
    assert sent_outcome(later).send_at == "2026-01-01T09:00:00.000+00:00"


def test_a_record_seen_twice_counts_once_and_a_contradiction_is_reported():
    """A restart may re-emit a trigger (same id, same outcome): one outcome. An id both
    sent and suppressed would be a bug elsewhere: reported, and the send kept."""
    _, record = _sent(3, 0, "push", "toys", False)
    _, stopped = _suppressed(3, "cooldown")
    run = run_outputs([record, record], [stopped])
    assert run.repeated == 1 and run.conflicting == ["id03"]
    assert run.outcomes["id03"].sent
    assert classify(run.outcomes["id03"], run.outcomes["id03"]) is None


def test_examples_show_the_most_kinds_of_change_in_the_fewest_changes_first():
    def change(customer: str, kind: str, n: int) -> Change:
        return Change(f"{customer}{n}", "browse_interest", customer, kind, None, None)

    changes = [change("a", "only_base", 0),
               change("b", "only_base", 0), change("b", "policy_changed", 1),
               change("b", "policy_changed", 2),
               change("c", "only_base", 0), change("c", "sent_to_suppressed", 1)]  # fmt: skip
    picked = examples(changes, 2)["browse_interest"]
    assert [customer for customer, _ in picked] == ["c", "b"]

"""The contact policies one candidate at a time, without the flow (operators/policies.py):
the cooldown's and the frequency caps' decisions and reasons, held to a model of the
rules in docs/triggers.md, over many records in one engine (its caches shared)."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from crmstream.config import load_config
from crmstream.operators.catalog import Candidate
from crmstream.operators.params import MS_PER_DAY
from crmstream.operators.policies import TRIGGER_INDEX, PolicyContext, PolicyEngine
from crmstream.state.encoding import fresh_records

CONFIG = load_config(None, [], env={})
ENGINE = PolicyEngine(CONFIG)  # one engine for every example: its caches fill up
NOON = 1_767_268_800_000  # 2026-01-01T12:00Z
NOW_MIN = NOON // 60_000


def _browse(at_ms: int = NOON) -> Candidate:
    return Candidate("c", "browse_interest", "e1", at_ms, {}, {}, None, {"category": "books"})


def _iso(minute: int) -> str:
    return datetime.fromtimestamp(minute * 60, tz=UTC).isoformat(timespec="milliseconds")


@settings(max_examples=200)
@given(st.lists(st.integers(1, 24 * 60 - 1), min_size=1, max_size=20))
def test_a_cooling_candidate_names_the_send_it_cools_from(minutes_ago):
    """Each customer's text names its own last send, also when the texts of earlier
    customers (other minutes, or the same one) are already known to the engine."""
    hours = CONFIG.rules.browse_interest.cooldown_hours
    for ago in minutes_ago:
        record = fresh_records(1)[0]
        record["trigger_last_min"][TRIGGER_INDEX["browse_interest"]] = NOW_MIN - ago
        ok, stopped = ENGINE.apply("c", [_browse()], record, {}, False)
        why = f"browse_interest went out at {_iso(NOW_MIN - ago)}, within its {hours:g} h cooldown"
        assert ok == []
        assert [(s.policy, s.reason) for s in stopped] == [("cooldown", why)]


@settings(max_examples=200)
@given(st.integers(-3 * 24 * 60, 3 * 24 * 60).filter(bool))
def test_a_late_candidate_cools_within_its_cooldown_of_a_later_send(minutes_after):
    """A late candidate, decided after a send of its type later in event time, cools when
    within the cooldown of that send on either side, and goes out beyond it."""
    hours = CONFIG.rules.browse_interest.cooldown_hours
    record = fresh_records(1)[0]
    record["trigger_last_min"][TRIGGER_INDEX["browse_interest"]] = NOW_MIN + minutes_after
    ok, stopped = ENGINE.apply("c", [_browse()], record, {}, False)
    if abs(minutes_after) < hours * 60:
        assert ok == [] and [s.policy for s in stopped] == ["cooldown"]
    else:
        assert stopped == [] and len(ok) == 1


def test_a_candidate_past_its_cooldown_goes_out():
    record = fresh_records(1)[0]
    last = NOW_MIN - int(CONFIG.rules.browse_interest.cooldown_hours * 60)
    record["trigger_last_min"][TRIGGER_INDEX["browse_interest"]] = last
    ok, stopped = ENGINE.apply("c", [_browse()], record, {}, False)
    assert stopped == [] and len(ok) == 1
    assert record["trigger_last_min"][TRIGGER_INDEX["browse_interest"]] == NOW_MIN


@settings(max_examples=300)
@given(
    # Minutes before the candidate; negative: after it (a late candidate, decided after
    # sends that came later in event time: docs/triggers.md, "Lateness").
    st.lists(st.integers(-12_000, 12_000), max_size=8),
    st.booleans(),
)
def test_frequency_caps_count_the_sends_of_the_last_day_and_week(ages, too_often):
    """Sends less than 24 h (1,440 min) and 7 d (10,080 min) from the candidate, before or
    after it, count against the caps, lowered for 90 days after "contacted too often";
    free slots (0) do not."""
    record = fresh_records(1)[0]
    sends = [NOW_MIN - age for age in ages]
    record["sent_min"] = sends + [0] * (len(record["sent_min"]) - len(sends))
    if too_often:
        record["too_often_day"] = NOON // MS_PER_DAY - 1
    ok, stopped = ENGINE.apply("c", [_browse()], record, {}, False)

    caps = CONFIG.policies.caps
    day = sum(1 for age in ages if abs(age) < 1440)
    week = sum(1 for age in ages if abs(age) < 10080)
    per_day, per_week = (caps.per_day, caps.per_week)
    who = ""
    if too_often:
        per_day, per_week = caps.too_often_per_day, caps.too_often_per_week
        who = " (lowered: the customer said contacted too often)"
    if day >= per_day:
        why = f"{day} marketing triggers in the last 24 h, cap {per_day}{who}"
    elif week >= per_week:
        why = f"{week} marketing triggers in the last 7 d, cap {per_week}{who}"
    else:
        assert stopped == [] and len(ok) == 1
        return
    assert ok == [] and [(s.policy, s.reason) for s in stopped] == [("frequency_cap", why)]


@pytest.mark.parametrize("too_often_day, lowered", [(None, False), (0, True), (1, True)])
def test_contacted_too_often_on_the_first_days_of_1970_lowers_the_caps(too_often_day, lowered):
    """A "contacted too often" on epoch day 0 (1970-01-01: ``processing.min_event_time``
    may allow it) lowers the caps as on any other day; a fresh record's (None here: the
    record's empty value) lowers none."""
    caps = CONFIG.policies.caps
    assert caps.too_often_per_day < caps.per_day
    at = 5 * MS_PER_DAY + 12 * 3_600_000  # 1970-01-06T12:00Z
    record = fresh_records(1)[0]
    if too_often_day is not None:
        record["too_often_day"] = too_often_day
    sends = [at // 60_000 - 60 * (k + 1) for k in range(caps.too_often_per_day)]
    record["sent_min"] = sends + [0] * (len(record["sent_min"]) - len(sends))
    ok, stopped = ENGINE.apply("c", [_browse(at)], record, {}, False)
    if lowered:
        assert ok == [] and [s.policy for s in stopped] == ["frequency_cap"]
    else:
        assert stopped == [] and len(ok) == 1


def _cand(kind: str, at_ms: int, causal: str = "e") -> Candidate:
    return Candidate("c", kind, causal, at_ms, {}, {}, None, {})


_ARBITRATION_MS = int(CONFIG.policies.arbitration_window_seconds * 1000)


_KINDS = ["cart_abandoned", "browse_interest", "high_intent_no_purchase"]


@given(
    gap=st.sampled_from([0, 1, _ARBITRATION_MS - 1, _ARBITRATION_MS, _ARBITRATION_MS + 1]),
    first=st.sampled_from(_KINDS[:2]),
    second=st.sampled_from(_KINDS),
)
def test_priority_arbitration_at_the_window_boundary(gap, first, second):
    """A candidate loses to the last winner of arbitration when that had at least its
    priority and fired at most the window before it (60 s: 60,000 ms loses, 60,001 goes),
    and never to a later candidate. The two are separate events (keys), in time order."""
    record = fresh_records(1)[0]
    a, b = _cand(first, NOON, "e1"), _cand(second, NOON + gap, "e2")
    ctx = PolicyContext({}, int(record["too_often_day"]), False)
    ok, stopped = ENGINE.decide("c", [a, b], [ctx, ctx], [(NOON, 0), (NOON + gap, 1)], record)
    rules = CONFIG.rules
    beaten = gap <= _ARBITRATION_MS and getattr(rules, first).priority >= getattr(
        rules, second
    ).priority
    cooling = first == second and getattr(rules, first).cooldown_hours > 0
    assert ok[0].candidate == a  # the first never loses to the later one
    if cooling:
        assert [(s.candidate, s.policy) for s in stopped] == [(b, "cooldown")]
    elif beaten:
        why = (
            f"{first} (priority {getattr(rules, first).priority}) fired at the same time"
            if gap == 0
            else f"{first} (priority {getattr(rules, first).priority}) fired {gap / 1000:g} s "
            f"before, within the {_ARBITRATION_MS / 1000:g} s arbitration window"
        )
        assert [(s.candidate, s.policy, s.reason) for s in stopped] == [(b, "priority", why)]
    else:
        assert stopped == [] and [d.candidate for d in ok] == [a, b]


@given(
    late_by=st.sampled_from([1, 1000, _ARBITRATION_MS, 30 * 60_000]),
    then=st.sampled_from([0, 1, 30_000, _ARBITRATION_MS, _ARBITRATION_MS + 1]),
)
def test_a_late_candidate_does_not_lose_to_a_later_winner_nor_replace_it(late_by, then):
    """Outsider 51: a welcome whose order reached Kafka 30 minutes late lost to the cart
    nudge decided 30 minutes after it, "fired at the same time". A candidate loses only to
    a winner at or before it; and the later winner stays the last one, so a candidate
    ``then`` after it is held to it."""
    record = fresh_records(1)[0]
    ctx = PolicyContext({}, int(record["too_often_day"]), False)
    nudge = _cand("cart_abandoned", NOON + late_by, "timer")  # priority 90: wins first
    ok, stopped = ENGINE.decide("c", [nudge], [ctx], [(NOON + late_by, 0)], record)
    assert [d.candidate for d in ok] == [nudge] and stopped == []
    welcome = _cand("first_order_welcome", NOON, "late-order")  # a later step, late
    ok, stopped = ENGINE.decide("c", [welcome], [ctx], [(NOON, 0)], record)
    assert [d.candidate for d in ok] == [welcome] and stopped == []
    browse = _cand("browse_interest", NOON + late_by + then, "view")
    ok, stopped = ENGINE.decide("c", [browse], [ctx], [(NOON + late_by + then, 0)], record)
    if then <= _ARBITRATION_MS:
        assert [(s.candidate, s.policy) for s in stopped] == [(browse, "priority")]
        assert stopped[0].reason.startswith("cart_abandoned (priority 90) fired")
    else:
        assert stopped == [] and [d.candidate for d in ok] == [browse]


def test_the_candidates_of_one_late_instant_are_arbitrated_among_themselves():
    """Outsider 54 (suspected): two candidates of one late event, both before the
    record's last winner, went out together. The highest priority goes first and the
    other loses to it, as at any instant; the record's last winner stays."""
    record = fresh_records(1)[0]
    ctx = PolicyContext({}, int(record["too_often_day"]), False)
    nudge = _cand("cart_abandoned", NOON + 30 * 60_000, "timer")
    ENGINE.decide("c", [nudge], [ctx], [(NOON + 30 * 60_000, 0)], record)
    welcome, browse = _cand("first_order_welcome", NOON, "o"), _cand("browse_interest", NOON, "v")
    ok, stopped = ENGINE.decide("c", [browse, welcome], [ctx, ctx], [(NOON, 1), (NOON, 1)], record)
    assert [d.candidate for d in ok] == [welcome]
    assert [(s.candidate, s.reason) for s in stopped] == [
        (browse, "first_order_welcome (priority 70) fired at the same time")
    ]
    assert int(record["arb_ms"]) == NOON + 30 * 60_000
    assert int(record["arb_type"]) == TRIGGER_INDEX["cart_abandoned"] + 1


def test_at_one_instant_the_highest_priority_goes_first_then_the_catalogue_order():
    """Candidates of one event or timer: the highest priority wins; equal priorities go
    in the catalogue's order (TRIGGER_TYPES), whatever order they came in."""
    record = fresh_records(1)[0]
    ctx = PolicyContext({}, int(record["too_often_day"]), False)
    tier = _cand("tier_upgrade", NOON, "derive:tier:1:0")
    high = _cand("tier_upgrade", NOON, "derive:high_value:0")
    welcome = _cand("first_order_welcome", NOON, "e1")
    ok, stopped = ENGINE.decide(
        "c", [tier, high, welcome], [ctx] * 3, [(NOON, 0, 5)] * 3, record
    )
    assert [d.candidate for d in ok] == [welcome]  # priority 70 over 65
    assert [s.candidate for s in stopped] == [high, tier]  # ties: by causal id


def test_service_triggers_go_out_without_consent_and_past_the_caps():
    """docs/triggers.md: marketing triggers need consent and count against the caps;
    service triggers (delivery delay, service recovery) do not."""
    for kind, marketing in (("delivery_delay", False), ("service_recovery", False),
                            ("birthday", True)):  # fmt: skip
        assert getattr(CONFIG.rules, kind).marketing is marketing
        record = fresh_records(1)[0]
        record["sent_min"][:6] = [NOW_MIN - 10 * k - 1 for k in range(6)]  # caps reached
        channel = getattr(CONFIG.rules, kind).channel or CONFIG.policies.default_channel
        profile = {f"consent.{channel}": "withdrawn@2026-01-01T00:00:00Z"}
        ctx = PolicyContext(profile, 0, False)
        ok, stopped = ENGINE.decide("c", [_cand(kind, NOON)], [ctx], [(NOON,)], record)
        if marketing:
            assert [s.policy for s in stopped] == ["consent"], kind
            record["sent_min"][:6] = [NOW_MIN - 10 * k - 1 for k in range(6)]
            ctx = PolicyContext({}, 0, False)
            ok, stopped = ENGINE.decide("c", [_cand(kind, NOON, "e2")], [ctx], [(NOON,)], record)
            assert [s.policy for s in stopped] == ["frequency_cap"], kind
        else:
            assert stopped == [] and len(ok) == 1, (kind, stopped)
            sends = sorted(int(m) for m in record["sent_min"] if m)
            assert len(sends) == 6, "a service trigger is not a marketing send"


def test_consent_default_and_default_channel_and_language_on_the_record():
    """policies.consent_default applies to a channel never answered; a rule without a
    channel uses the customer's preferred_channel, else policies.default_channel; the
    customer's language is carried (docs/events.md, trigger records)."""
    denied = PolicyEngine(load_config(None, ["policies.consent_default=denied",
                                             "policies.default_channel=sms"], env={}))  # fmt: skip
    assert CONFIG.rules.browse_interest.channel is None
    record = fresh_records(1)[0]
    ctx = PolicyContext({}, 0, False)
    ok, stopped = denied.decide("c", [_browse()], [ctx], [(NOON,)], record)
    assert [(s.policy, s.reason) for s in stopped] == [("consent", "no consent for channel 'sms'")]
    granted = {"consent.sms": "granted@2026-01-01T00:00:00Z"}
    ok, _ = denied.decide("c", [_browse()], [PolicyContext(granted, 0, False)], [(NOON,)],
                          fresh_records(1)[0])  # fmt: skip
    assert ok[0].extras["channel"] == "sms" and ok[0].extras["language"] is None
    profile = {"preferred_channel": "line", "consent.line": "granted@2026-01-01T00:00:00Z",
               "language": "ja-JP"}  # fmt: skip
    ok, _ = denied.decide("c", [_browse()], [PolicyContext(profile, 0, False)], [(NOON,)],
                          fresh_records(1)[0])  # fmt: skip
    assert (ok[0].extras["channel"], ok[0].extras["language"]) == ("line", "ja-JP")
    ok, _ = ENGINE.decide("c", [_browse()], [ctx], [(NOON,)], fresh_records(1)[0])
    assert ok[0].extras["channel"] == CONFIG.policies.default_channel  # granted by default


def test_seasonal_weights_follow_the_utc_day_of_each_candidate():
    """Weights are worked out once per country and UTC day; a candidate a millisecond
    either side of a season's edge gets its own day's weights, in any order."""
    from datetime import UTC, datetime

    from crmstream.config import load_config
    from crmstream.operators.catalog import Candidate
    from crmstream.operators.policies import PolicyEngine

    config = load_config(
        None,
        ["policies.seasons=[{name: s, start: '11-01', end: '11-11', countries: [CN], "
         "weights: {beauty: 9.0}}]"],
        env={},
    )  # fmt: skip
    engine = PolicyEngine(config)
    edge = int(datetime(2026, 11, 1, tzinfo=UTC).timestamp() * 1000)

    def tops(at_ms: int, country: str = "CN") -> list[str]:
        payload = {"top_categories": ["electronics", "beauty"]}
        cand = Candidate("c", "browse_interest", "e", at_ms, {}, {}, None, payload)
        result = engine._regional(cand, {"country": country})
        return result.payload["top_categories"]

    inside, outside = ["beauty", "electronics"], ["electronics", "beauty"]
    assert tops(edge + 3_600_000) == inside and tops(edge + 7_200_000) == inside
    assert len(engine._weights) == 1  # one entry per country and day, not per instant
    for _ in range(2):  # the second round is answered from the cache
        assert tops(edge) == inside
        assert tops(edge - 1) == outside
        assert tops(edge + 11 * 86_400_000 - 1) == inside  # 11-11 23:59:59.999
        assert tops(edge + 11 * 86_400_000) == outside  # 11-12
        assert tops(edge, "US") == outside
    # a season over the new year (start after end), for every country
    config = load_config(
        None,
        ["policies.seasons=[{name: ny, start: '12-30', end: '01-02', "
         "weights: {beauty: 9.0}}]"],
        env={},
    )  # fmt: skip
    engine = PolicyEngine(config)
    new_year = int(datetime(2027, 1, 1, tzinfo=UTC).timestamp() * 1000)
    day = 86_400_000
    for at, expected in ((new_year - 2 * day - 1, outside), (new_year - 2 * day, inside),
                         (new_year, inside), (new_year + 2 * day - 1, inside),
                         (new_year + 2 * day, outside)):  # fmt: skip
        assert tops(at, "US") == expected, at


def test_quiet_hours_hold_or_emit_with_not_before():
    """docs/triggers.md policy 6: in quiet hours, ``hold`` keeps the trigger until the
    window's end (``deferred``); ``not_before`` emits it at once with ``not_before``;
    outside them neither is set."""
    night = NOON + 10 * 3_600_000  # 22:00 UTC, the default zone's quiet hours
    end = "2026-01-02T09:00:00.000+00:00"
    hold = PolicyEngine(load_config(None, ["policies.quiet_hours.default_timezone=UTC"], env={}))
    ctx = PolicyContext({}, 0, False)
    (held,), _ = hold.decide("c", [_browse(night)], [ctx], [(night,)], fresh_records(1)[0])
    assert held.hold_until_ms == NOON + 21 * 3_600_000
    assert held.extras["deferred"] == {"policy": "quiet_hours", "until": end,
                                       "local_time": "2026-01-01T22:00+00:00"}  # fmt: skip
    assert "not_before" not in held.extras
    sets = ["policies.quiet_hours.default_timezone=UTC", "policies.quiet_hours.mode=not_before"]
    now = PolicyEngine(load_config(None, sets, env={}))
    (sent,), _ = now.decide("c", [_browse(night)], [ctx], [(night,)], fresh_records(1)[0])
    assert sent.hold_until_ms is None and sent.extras["not_before"] == end
    assert "deferred" not in sent.extras
    (day,), _ = now.decide("c", [_browse(NOON)], [ctx], [(NOON,)], fresh_records(1)[0])
    assert "not_before" not in day.extras and "deferred" not in day.extras


@pytest.mark.parametrize(
    "sets, policy",
    [(["rules.browse_interest.cooldown_hours=24"], "cooldown"),
     (["rules.browse_interest.cooldown_hours=0", "policies.caps.per_day=1"], "frequency_cap")],
)  # fmt: skip
def test_cooldowns_and_caps_count_whole_minutes_as_documented(sets, policy):
    """docs/triggers.md: a send at 10:00:50 and a candidate 23 h 59 min 40 s later are
    1,440 minutes apart (outside 24 h); from 10:00:10 the same gap is 1,439 minutes."""
    gap = 24 * 3_600_000 - 20_000
    engine = PolicyEngine(load_config(None, sets, env={}))
    ctx = PolicyContext({}, 0, False)
    for first_s, outcome in ((50, []), (10, [policy])):
        first = NOON - 2 * 3_600_000 + first_s * 1000  # 10:00:xx
        cands = [_browse(first), _browse(first + gap)._replace(causal="e2")]
        keys = [(first, 0), (first + gap, 1)]
        _ok, stopped = engine.decide("c", cands, [ctx, ctx], keys, fresh_records(1)[0])
        assert [s.policy for s in stopped] == outcome, first_s

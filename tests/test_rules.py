"""Trigger record text: the fast ISO-8601 formatter, time zones by name, suppression records."""

from __future__ import annotations

from datetime import UTC, datetime
from zoneinfo import available_timezones

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from crmstream.config import load_config
from crmstream.operators.catalog import Candidate
from crmstream.operators.policies import PolicyEngine
from crmstream.operators.rules import iso_ms
from crmstream.operators.zones import find_zone
from crmstream.state.profile import iso_s


def _reference(epoch_ms: float) -> str:
    return datetime.fromtimestamp(epoch_ms / 1000, tz=UTC).isoformat(timespec="milliseconds")


# 1900-01-01 .. 2200-01-01: negative epochs, leap days and century years included.
@given(st.integers(min_value=-2_208_988_800_000, max_value=7_258_118_400_000))
def test_iso_ms_writes_the_same_text_as_datetime(epoch_ms):
    assert iso_ms(epoch_ms) == _reference(epoch_ms)


@given(st.integers(min_value=-2_208_988_800_000, max_value=7_258_118_400_000))
def test_iso_s_writes_the_same_text_as_strftime(epoch_ms):
    expected = datetime.fromtimestamp(epoch_ms // 1000, tz=UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    assert iso_s(epoch_ms) == expected


def test_iso_ms_takes_other_number_types_the_datetime_way():
    for value in (np.int64(1_767_225_600_123), 1_767_225_600_123.0, 1_709_164_799_999):
        assert iso_ms(value) == _reference(value)
    assert iso_ms(1_709_164_800_000) == "2024-02-29T00:00:00.000+00:00"
    assert iso_ms(-1) == "1969-12-31T23:59:59.999+00:00"


def test_zones_are_kept_and_unknown_names_are_none():
    names = sorted(available_timezones())[:50]  # far more than ZoneInfo keeps strongly
    zones = [find_zone(n) for n in names]
    assert [z.key for z in zones] == names
    assert all(find_zone(n) is z for n, z in zip(names, zones, strict=True))
    for bad in ("Mars/Olympus_Mons", "../etc/passwd", ""):
        assert find_zone(bad) is None, bad


def test_policies_send_in_the_default_zone_when_the_profile_zone_is_unknown():
    config = load_config()
    engine = PolicyEngine(config)
    noon = 1_767_268_800_000  # 2026-01-01T12:00Z, outside the default quiet hours
    cand = Candidate("c", "browse_interest", "e1", noon, {}, {}, None, {})
    rule = config.rules.browse_interest
    default = config.policies.quiet_hours.default_timezone
    for profile, zone in (({"timezone": "Mars/Olympus_Mons"}, default),
                          ({}, default), ({"timezone": "Asia/Tokyo"}, "Asia/Tokyo")):  # fmt: skip
        extras, _ = engine._delivery(cand, rule, profile)
        assert extras["send_window"]["timezone"] == zone, profile


# A cart-abandonment timer's candidate.
CART = Candidate(
    "c{1}",
    "cart_abandoned",
    "timer:cart:c{1}:1767225600000",
    1_767_225_600_123,
    {"cart_value": 42.5},
    {"cart_abandon_minutes": 30},
    {"from": "2026-01-01T00:00:00Z"},
    {"category": "shoes"},
)


def test_trigger_and_suppression_records_keep_their_bytes():
    """The records' JSON, key order included, as subscribers have received it (a replay
    must give byte-identical records: docs/guarantees.md). Pinned as text, so a
    faster way of building them cannot change what goes out."""
    import orjson

    from crmstream.operators.rules import TriggerBuilder

    builder = TriggerBuilder(load_config(env={}))
    cand = CART
    head = '{"schema_version":1,"trigger_id":"2dbaef5b5446e7171930467b2dfcc308",'
    head += '"trigger_type":"cart_abandoned",'
    rule = '"rule":{"name":"cart_abandoned","version":1,"model_version":0},'
    why = '{"values":{"cart_value":42.5},"thresholds":{"cart_abandon_minutes":30},'
    why += '"window":{"from":"2026-01-01T00:00:00Z"}}'
    times = '"event_time":"2026-01-01T00:00:00.123+00:00",'
    times += '"detected_at":"2026-01-01T00:00:00.123+00:00"'
    assert orjson.dumps(builder.build(cand)).decode() == (
        f'{head}"customer_id":"c{{1}}",{rule}"reason":{why},'
        f'"causal_event_id":"timer:cart:c{{1}}:1767225600000",{times},'
        '"payload":{"category":"shoes","offer_template":"cart_reminder"}}'
    )
    record = builder.suppression(cand, "erased", "cooldown", "went out at ...")
    assert orjson.dumps(record).decode() == (
        f'{head}"customer_id":"erased","policy":"cooldown","reason":"went out at ...",'
        f'{rule}"candidate":{why},{times}}}'
    )


def test_a_suppression_record_carries_the_trigger_id_rule_and_reason_build_gives():
    """What a subscriber to the suppression topic joins on (trigger id, rule, times)
    is the same as in the trigger record the candidate would have become."""
    from crmstream.operators.rules import TriggerBuilder

    builder = TriggerBuilder(load_config(env={}))
    cand = CART
    built = builder.build(cand)
    record = builder.suppression(cand, "erased", "cooldown", "went out at ...")
    assert record == {
        "schema_version": built["schema_version"],
        "trigger_id": built["trigger_id"],
        "trigger_type": "cart_abandoned",
        "customer_id": "erased",
        "policy": "cooldown",
        "reason": "went out at ...",
        "rule": built["rule"],
        "candidate": built["reason"],
        "event_time": "2026-01-01T00:00:00.123+00:00",
        "detected_at": built["detected_at"],
    }
    assert list(record)[:5] == [
        "schema_version",
        "trigger_id",
        "trigger_type",
        "customer_id",
        "policy",
    ]


def test_trigger_records_carry_the_value_model_version_outside_the_id():
    """The value-model parameter set in use is recorded in every trigger and suppression;
    a refit does not change the ids of triggers re-emitted for the same causal event."""
    from crmstream.operators.rules import TriggerBuilder

    config = load_config(env={})
    refitted = config.model_copy(
        update={"value": config.value.model_copy(update={"model_version": 7})}
    )
    before, after = TriggerBuilder(config).build(CART), TriggerBuilder(refitted).build(CART)
    assert (before["rule"]["model_version"], after["rule"]["model_version"]) == (0, 7)
    assert before["trigger_id"] == after["trigger_id"]
    stopped = TriggerBuilder(refitted).suppression(CART, "c{1}", "cooldown", "...")
    assert stopped["rule"]["model_version"] == 7

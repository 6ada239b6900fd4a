"""Trigger record text: the fast ISO-8601 formatter, time zones by name, suppression records."""

from __future__ import annotations

import calendar
import re
from datetime import UTC, date, datetime, timedelta
from zoneinfo import available_timezones

import numpy as np
import pytest
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


# Every millisecond datetime can show: 0001-01-01 .. 9999-12-31.
@given(st.integers(min_value=-62_135_596_800_000, max_value=253_402_300_799_999))
def test_iso_ms_writes_the_same_text_as_datetime_over_its_whole_range(epoch_ms):
    exact = datetime(1970, 1, 1, tzinfo=UTC) + timedelta(milliseconds=epoch_ms)  # no float
    assert iso_ms(epoch_ms) == exact.isoformat(timespec="milliseconds")


def _days_from_civil(year: int, month: int, day: int) -> int:
    """Days since 1970-01-01 of a proleptic Gregorian date, counted by whole years
    from 400-year cycles (146,097 days each), independently of ``_civil_date``."""
    cycles, year_in_cycle = divmod(year, 400)
    days = cycles * 146_097
    for y in range(year_in_cycle):  # whole years of the cycle before the date
        days += 366 if calendar.isleap(y) else 365
    days += (date(2000 + year_in_cycle, month, day) - date(2000 + year_in_cycle, 1, 1)).days
    return days - 719_528  # days from 0000-01-01 (a leap year) to 1970-01-01


_EXPANDED = re.compile(r"^([+-]\d{6,}|\d{4})-(\d\d)-(\d\d)T(\d\d):(\d\d):(\d\d)\.(\d{3})\+00:00$")


@given(st.integers(min_value=-(10**22), max_value=10**22))
def test_iso_ms_writes_any_integer_as_an_iso_8601_date_and_never_raises(epoch_ms):
    """Stored times out of datetime's range (issue 34: a promised delivery time of
    -1e15 ms stopped the flow at every start) are shown in ISO 8601's expanded year
    form, and the text names the same instant."""
    text = iso_ms(epoch_ms)
    match = _EXPANDED.match(text)
    assert match, text
    year, month, day, hour, minute, second, ms = (int(g) for g in match.groups())
    days = _days_from_civil(year, month, day)
    assert days * 86_400_000 + ((hour * 60 + minute) * 60 + second) * 1000 + ms == epoch_ms
    assert iso_s(epoch_ms).startswith(text[:19])


def test_iso_ms_of_the_issue_34_promise_and_of_non_numbers():
    assert iso_ms(-1_000_000_000_000_000) == "-029719-04-05T22:13:20.000+00:00"
    assert iso_ms(253_402_300_800_000) == "+010000-01-01T00:00:00.000+00:00"
    assert iso_ms(float("nan")) == "invalid time nan"
    assert iso_ms(1e300).startswith("+")  # a float past datetime: the expanded form


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


@given(
    st.sampled_from(["America", "Europe", "Etc", "posix", "right", ".", "/", "America/"])
    | st.text(max_size=400)
    | st.just("a" * 300)
    | st.integers()
    | st.none()
)
def test_find_zone_never_raises_on_any_name(name):
    """A directory of the time-zone database ("America": IsADirectoryError) or a name
    too long for a file (OSError) stopped the flow in route_batch (issue 34)."""
    zone = find_zone(name)
    assert zone is None or (zone.key == name and name in available_timezones())


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


def _documented_id(customer: str, trigger_type: str, version: int, causal: str) -> str:
    """docs/events.md and docs/triggers.md: BLAKE2b-128 (hex) of the UTF-8 of customer,
    trigger type, rule version (decimal) and causal id joined by the unit separator."""
    import hashlib

    identity = "\x1f".join((customer, trigger_type, str(version), causal)).encode("utf-8")
    return hashlib.blake2b(identity, digest_size=16).hexdigest()


@pytest.mark.parametrize("version", [1, 2, 17])
def test_a_trigger_id_is_recomputed_from_its_definition_and_a_version_bump_changes_it(version):
    """The id follows from the record's own fields as the docs define it, for every rule
    and causal kind (event, timer, derived), and bumping the rule's version gives every
    trigger of that rule a new id (subscribers see a changed rule as new triggers)."""
    from crmstream.operators.policies import TRIGGER_TYPES
    from crmstream.operators.rules import TriggerBuilder

    sets = [f"rules.{name}.version={version}" for name in TRIGGER_TYPES]
    builder = TriggerBuilder(load_config(None, sets, env={}))
    first = TriggerBuilder(load_config(env={}))
    for name in TRIGGER_TYPES:
        for causal in ("e-42", "timer:cart_1::1767261600000", "derive:churn:1767261600000"):
            cand = CART._replace(customer="顧客 ␟7", trigger_type=name, causal=causal)
            record = builder.build(cand)
            assert record["rule"]["version"] == version
            assert record["trigger_id"] == _documented_id(
                record["customer_id"], record["trigger_type"], record["rule"]["version"],
                record["causal_event_id"])  # fmt: skip
            before = first.build(cand)["trigger_id"]
            assert (record["trigger_id"] == before) == (version == 1), (name, causal)


def test_the_hour_prefix_is_the_calendars_at_every_year_and_century_end():
    """The civil-date arithmetic against the calendar: the last days of years and of
    February, the first of the next, every 25 years of four centuries (leap rules of
    the century years included), and the extremes datetime knows."""
    import calendar
    from datetime import UTC, datetime

    from crmstream.operators.rules import hour_prefix

    days = []
    for year in [*range(1600, 2401, 25), 1, 9999]:
        feb = 29 if calendar.isleap(year) else 28
        days += [(year, 12, d) for d in (28, 29, 30, 31)] + [(year, 1, 1), (year, 2, feb),
                                                              (year, 3, 1)]  # fmt: skip
    for year, month, mday in days:
        at = datetime(year, month, mday, 23, tzinfo=UTC)
        hour = int(at.timestamp()) // 3600
        assert hour_prefix(hour) == at.strftime("%Y-%m-%dT%H:").rjust(14, "0"), at

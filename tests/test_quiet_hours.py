"""Quiet hours in the customer's zone (operators/policies.py): the per-hour offset
route and the exact one both give what the documented rule, written out in this file,
gives at the instant itself (not one method of the engine checked against another)."""

from __future__ import annotations

from datetime import UTC, datetime, time, timedelta
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from crmstream.config import load_config
from crmstream.operators.policies import PolicyEngine

# DST in both hemispheres, half- and quarter-hour offsets, a 30-minute DST shift
# (Lord Howe) at a half hour UTC, a date-line change (Apia 2011), no DST at all.
ZONES = [
    "UTC",
    "Europe/Berlin",
    "America/New_York",
    "America/St_Johns",
    "Australia/Lord_Howe",
    "Asia/Kathmandu",
    "Asia/Kolkata",
    "Pacific/Chatham",
    "Pacific/Apia",
    "America/Santiago",
    "Asia/Tokyo",
]
WINDOWS = [("21:00", "09:00"), ("22:30", "07:15"), ("01:00", "06:00"), ("08:00", "08:00"),
           ("22:45", "06:50"), ("13:59", "14:01")]
ENGINES = {
    w: PolicyEngine(
        load_config(
            None,
            [f"policies.quiet_hours.start={w[0]}", f"policies.quiet_hours.end={w[1]}"],
            env={},
        )
    )
    for w in WINDOWS
}
_ms = st.integers(
    int(datetime(2005, 1, 1, tzinfo=UTC).timestamp() * 1000),
    int(datetime(2040, 1, 1, tzinfo=UTC).timestamp() * 1000),
)


def _dst_edges(zone: str, year: int) -> list[int]:
    """Epoch ms a minute either side of each offset change of ``zone`` in ``year``."""
    tz, edges = ZoneInfo(zone), []
    hour = int(datetime(year, 1, 1, tzinfo=UTC).timestamp())
    before = datetime.fromtimestamp(hour, tz).utcoffset()
    for h in range(hour, hour + 366 * 86400, 900):
        now = datetime.fromtimestamp(h, tz).utcoffset()
        if now != before:
            edges += [(h - 60) * 1000, h * 1000 - 1, h * 1000, (h + 60) * 1000]
        before = now
    return edges


def _documented(at_ms: int, tz: ZoneInfo, window: tuple[str, str]):
    """docs/triggers.md, written out here: quiet from ``start`` to ``end`` local time (a
    window over midnight when start > end, none when equal); a quiet instant is held to
    the end of its window, that local wall time on the day it falls (zoneinfo resolves
    its offset); with the local time to the minute."""
    start, end = (time.fromisoformat(t) for t in window)
    local = datetime.fromtimestamp(at_ms / 1000, tz)
    now = local.time()
    quiet = (now >= start or now < end) if start > end else (start <= now < end)
    if not quiet:
        return None
    day = local.date() + timedelta(days=1 if start > end and now >= start else 0)
    until = datetime.combine(day, end).replace(tzinfo=tz)
    return int(until.timestamp() * 1000), local.isoformat(timespec="minutes")


@settings(max_examples=1500, deadline=None)
@given(at_ms=_ms, zone=st.sampled_from(ZONES), window=st.sampled_from(WINDOWS))
def test_the_hourly_offset_route_matches_the_zone_at_the_instant(at_ms, zone, window):
    """Both routes give what the documented rule, computed here, gives."""
    engine, tz = ENGINES[window], ZoneInfo(zone)
    expected = _documented(at_ms, tz, window)
    assert engine._quiet_until(at_ms, tz) == expected
    assert engine._quiet_until_exact(at_ms, tz) == expected


@pytest.mark.parametrize("zone", ZONES)
def test_the_minutes_around_every_offset_change_match(zone):
    edges = _dst_edges(zone, 2026) + _dst_edges(zone, 2011)
    for window, engine in ENGINES.items():
        tz = ZoneInfo(zone)
        for at_ms in edges:
            expected = _documented(at_ms, tz, window)
            assert engine._quiet_until(at_ms, tz) == expected, (zone, window, at_ms)
            assert engine._quiet_until_exact(at_ms, tz) == expected, (zone, window, at_ms)


@pytest.mark.parametrize("window", WINDOWS)
@pytest.mark.parametrize("zone", ["UTC", "Asia/Kathmandu", "America/St_Johns"])
def test_the_instants_at_each_bound_of_the_window_match(window, zone):
    """A millisecond before, at and after the window's start and end, local time, on days
    in winter and summer: quiet from the start on, not quiet from the end on."""
    engine, tz = ENGINES[window], ZoneInfo(zone)
    for day in ("2026-01-15", "2026-07-15"):
        for bound in window:
            at = datetime.fromisoformat(f"{day}T{bound}").replace(tzinfo=tz)
            ms = int(at.timestamp() * 1000)
            for at_ms in (ms - 1, ms, ms + 1):
                expected = _documented(at_ms, tz, window)
                assert engine._quiet_until(at_ms, tz) == expected, (window, zone, at_ms)
                assert engine._quiet_until_exact(at_ms, tz) == expected, (window, zone, at_ms)


def test_a_quiet_instant_gives_the_window_end_and_the_local_time():
    engine, tz = ENGINES[("21:00", "09:00")], ZoneInfo("America/St_Johns")
    at_ms = int(datetime(2026, 7, 1, 1, 0, tzinfo=UTC).timestamp() * 1000)  # 22:30 NDT
    until, local = engine._quiet_until(at_ms, tz)
    assert local == "2026-06-30T22:30-02:30"
    assert until == int(datetime(2026, 7, 1, 11, 30, tzinfo=UTC).timestamp() * 1000)
    assert engine._quiet_until(at_ms + 12 * 3_600_000, tz) is None  # 10:30 NDT


@pytest.mark.parametrize("name", [["UTC"], {"UTC": 1}, {"UTC"}, b"UTC", 7, None, "America"])
def test_find_zone_refuses_what_is_not_a_zone_name_without_raising(name):
    from crmstream.operators.zones import find_zone

    assert find_zone(name) is None
    assert find_zone("Asia/Tokyo") == ZoneInfo("Asia/Tokyo")

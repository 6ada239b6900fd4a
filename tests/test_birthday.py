"""The birthday reminder's due time (operators/catalog.py): the cached per-year route
gives what datetime gives from scratch."""

from __future__ import annotations

import calendar
from datetime import UTC, date, datetime, timedelta

from hypothesis import example, given, settings
from hypothesis import strategies as st

from crmstream.operators.catalog import next_birthday_reminder


def _reminder_by_datetime(month_day: str, after_ms: int, days_before: int) -> int:
    """The birthday reminder computed from scratch with datetime (the model)."""
    month, day = int(month_day[:2]), int(month_day[3:])
    year = datetime.fromtimestamp(after_ms / 1000, tz=UTC).year
    for y in (year, year + 1, year + 2):
        d = day if (month, day) != (2, 29) or calendar.isleap(y) else 28
        due = int((datetime(y, month, d, tzinfo=UTC) - timedelta(days=days_before)).timestamp())
        if due * 1000 > after_ms:
            return due * 1000
    raise AssertionError


@settings(max_examples=500, deadline=None)
@given(
    when=st.datetimes(datetime(1999, 1, 1), datetime(2060, 1, 1)),
    birthday=st.dates(date(2000, 1, 1), date(2000, 12, 31)),  # 2000: 29 Feb included
    days_before=st.integers(0, 60),
)
@example(datetime(2027, 1, 5), date(2000, 2, 29), 7)  # 29 Feb in a common year: the 28th
@example(datetime(2027, 12, 31, 23, 59), date(2000, 12, 31), 0)  # passed by a minute
def test_birthday_reminders_match_datetime_from_scratch(when, birthday, days_before):
    after_ms = int(when.replace(tzinfo=UTC).timestamp() * 1000)
    month_day = birthday.strftime("%m-%d")
    expected = _reminder_by_datetime(month_day, after_ms, days_before)
    assert next_birthday_reminder(month_day, after_ms, days_before) == expected

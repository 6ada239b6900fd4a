"""Numbers every setting must keep to, whatever its own checks: nothing computed from one
overflows, and no infinity or NaN reaches the arithmetic.

- A duration is a setting named for its unit (``*_ms``, ``*_seconds``, ``*_minutes``,
  ``*_hours``, ``*_days``, ``days``, ``days_before``), a number or a list of numbers.
  Each must come to at most ``MAX_DURATION_DAYS`` (100 years). Outsider 52 found two
  accepted values that stopped the flow for every customer at the first event that used
  them: ``rules.cart_abandoned.first_delay_minutes=1e15`` (a timer's due time overflowed
  64 bits: exit 70 at every start) and ``policies.erasure_tombstone_days=1e12`` (Redis
  refused the tombstone's expiry inside the commit).
- An integer is at most ``MAX_INTEGER`` (2^53 - 1) either way: JSON readers and the
  compiled kernels take it exactly (outsider 53: a threshold of 10^20 stopped the
  kernels' compilation, exit 70; a rule version of 2^64 could not be written into any
  trigger, and every customer with one was set aside).
- A real number is finite (outsider 53: a currency rate of ``inf`` made every spend
  ``null``; a preference weight of ``nan`` every interest).
"""

from __future__ import annotations

import math
import re
from typing import Any

from pydantic import BaseModel

MAX_DURATION_DAYS = 36_525
MAX_INTEGER = 2**53 - 1
_UNIT_DAYS = {"ms": 1 / 86_400_000, "seconds": 1 / 86_400, "minutes": 1 / 1440,
              "hours": 1 / 24, "days": 1.0}  # fmt: skip
_NAMED = re.compile(r"(?:^|_)(ms|seconds|minutes|hours|days)(?:_before)?$")


def out_of_range(model: BaseModel, path: str = "") -> list[str]:
    """Every setting under ``model`` that breaks one of the bounds above, as
    ``key = value`` and why, for the configuration's error."""
    found = []
    for name in type(model).model_fields:
        found += _check(getattr(model, name), f"{path}.{name}" if path else name, name)
    return found


def _check(value: Any, key: str, name: str) -> list[str]:
    if isinstance(value, BaseModel):
        return out_of_range(value, key)
    if isinstance(value, dict):
        return [f for sub, item in value.items() for f in _check(item, f"{key}.{sub}", "")]
    if isinstance(value, list | tuple):
        return [f for item in value for f in _check(item, key, name)]
    if isinstance(value, bool) or not isinstance(value, int | float):
        return []
    if isinstance(value, float) and not math.isfinite(value):
        return [f"{key} = {value}: not a finite number"]
    if isinstance(value, int) and abs(value) > MAX_INTEGER:
        return [f"{key} = {value}: over 2^53 - 1 either way"]
    match = _NAMED.search(name)
    if match and abs(value) * _UNIT_DAYS[match.group(1)] > MAX_DURATION_DAYS:
        return [f"{key} = {value:g} {match.group(1)}: over {MAX_DURATION_DAYS:,} days (100 years)"]
    return []

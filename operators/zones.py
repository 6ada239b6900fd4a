"""IANA time zones by name, kept in memory for validation and the contact policies.

ZoneInfo holds only 8 zones strongly and re-reads the others from disk once
they drop out of its weak cache. With customers spread over many zones that
showed in profiles of both the validator and the policies.
"""

from __future__ import annotations

from functools import lru_cache
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError


@lru_cache(maxsize=4096)  # the IANA database has about 600 names
def find_zone(name: str) -> ZoneInfo | None:
    """The zone called ``name``, or None when the time-zone database has no such zone."""
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        return None

"""IANA time zones by name, kept in memory for validation and the contact policies.

A name is a zone only if the time-zone database lists it
(``zoneinfo.available_timezones()``, read once): ``ZoneInfo`` itself opens
whatever file the name points at, so a directory of the database ("America")
raised ``IsADirectoryError`` and a 300-character name ``OSError`` (issue 34).
ZoneInfo holds only 8 zones strongly and re-reads the others from disk once
they drop out of its weak cache. With customers spread over many zones that
showed in profiles of both the validator and the policies.
"""

from __future__ import annotations

from functools import cache, lru_cache
from typing import Any
from zoneinfo import ZoneInfo, available_timezones


@cache
def zone_names() -> frozenset[str]:
    """Every zone name the time-zone database lists (about 600), read once."""
    return frozenset(available_timezones())


def find_zone(name: Any) -> ZoneInfo | None:
    """The zone called ``name``, or None when the time-zone database lists no such zone
    (or ``name`` is not a string). Never raises."""
    if type(name) is not str or name not in zone_names():
        return None
    return _load(name)


@lru_cache(maxsize=4096)  # the IANA database has about 600 names
def _load(name: str) -> ZoneInfo | None:
    try:
        return ZoneInfo(name)
    except (ValueError, OSError, KeyError):  # listed, yet unreadable (ZoneInfoNotFoundError
        return None  # is a KeyError)

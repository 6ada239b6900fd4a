"""The ``--as-of`` time syntax, and the options the value and quarantine commands share.

This module owns parsing ``--as-of`` (``profile``, ``fit``); the options, config
loading and error handling are ``crmstream.cli``'s, re-exported here for the
command modules registered after it (``cli_value``, ``cli_quarantine``).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated

import typer

# The shared options and helpers are crmstream.cli's; this module adds the time syntax of
# the value commands (fit, profile --as-of).
from crmstream.cli import (
    BrokersOpt,
    ConfigOpt,
    RedisOpt,
    SetOpt,
    VerboseOpt,
    _config,
    _fail,
    _setup_logging,
    console,
    err_console,
)

__all__ = [
    "AsOfOpt",
    "BrokersOpt",
    "ConfigOpt",
    "RedisOpt",
    "SetOpt",
    "VerboseOpt",
    "_config",
    "_fail",
    "_setup_logging",
    "console",
    "err_console",
    "parse_as_of",
]


def parse_as_of(text: str | None) -> int | None:
    """``--as-of``: None (the watermark), ``now`` (the wall clock), or an ISO-8601 date or
    time (UTC unless it has an offset), as epoch ms. :raises typer.Exit: when unreadable."""
    if text is None or text == "watermark":
        return None
    if text == "now":
        from crmstream.profile import now_ms

        return now_ms()
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        raise _fail(
            f"--as-of must be 'now', 'watermark' or an ISO-8601 date or time "
            f"(e.g. 1997-09-30 or 1997-09-30T12:00:00+00:00), got {text!r}"
        ) from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return int(when.timestamp() * 1000)


AsOfOpt = Annotated[
    str | None,
    typer.Option(
        "--as-of",
        help="Derive as of this time: an ISO-8601 date or time (UTC unless given), 'now' "
        "(the wall clock) or 'watermark' (default: the event-time watermark of the "
        "customer's shard, so a replayed history reads as of its own time).",
    ),
]

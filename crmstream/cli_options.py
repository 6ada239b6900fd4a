"""What the ``crmstream`` commands share: consoles, common options, config loading, errors.

This module owns the pieces every command of ``crmstream.cli`` and
``crmstream.cli_value`` uses: the option types, loading the configuration
with overrides (a bad value prints one clear message and exits 2), and the
``--as-of`` time syntax.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.logging import RichHandler

from crmstream.config import ConfigError, CrmConfig, load_config

console = Console()
err_console = Console(stderr=True)

ConfigOpt = Annotated[
    Path | None,
    typer.Option(
        "--config",
        "-c",
        help="YAML config file (default: the embedded default).",
        exists=True,
        dir_okay=False,
    ),
]
SetOpt = Annotated[
    list[str] | None, typer.Option("--set", help="Override a key: section.key=value (repeatable).")
]
BrokersOpt = Annotated[
    str | None,
    typer.Option(
        "--brokers",
        help="Kafka bootstrap servers, host:port[,host:port]. Unset: an embedded broker.",
    ),
]
RedisOpt = Annotated[
    str | None, typer.Option("--redis-url", help="Redis URL. Unset: an embedded redis-server.")
]
VerboseOpt = Annotated[bool, typer.Option("--verbose", "-v", help="Log at INFO level.")]


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(message)s",
        handlers=[RichHandler(console=err_console, show_path=False)],
    )


def _config(
    path: Path | None,
    sets: list[str] | None,
    brokers: str | None = None,
    redis_url: str | None = None,
) -> CrmConfig:
    overrides = list(sets or [])
    if brokers:
        overrides.append(f"kafka.brokers={brokers}")
    if redis_url:
        overrides.append(f"redis.url={redis_url}")
    try:
        return load_config(path, overrides)
    except ConfigError as exc:
        err_console.print(f"[red]error:[/] {exc}")
        raise typer.Exit(2) from None


def _fail(message: str) -> typer.Exit:
    err_console.print(f"[red]error:[/] {message}")
    return typer.Exit(2)


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

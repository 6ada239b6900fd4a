"""The value-model commands: ``crmstream fit`` and ``crmstream model list / activate``.

This module owns their arguments and output; the work is in ``crmstream.fit``
(summaries, fits, holdout) and ``state.model`` (parameter sets in Redis).
"""

from __future__ import annotations

from datetime import date
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.table import Table

from crmstream.cli_options import (
    AsOfOpt,
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
    parse_as_of,
)

if TYPE_CHECKING:
    from crmstream.config import CrmConfig

model_app = typer.Typer(
    help="Value-model parameter sets (crmstream fit saves them).", no_args_is_help=True
)


def fit(
    source: Annotated[
        str | None,
        typer.Option(
            help="Fit on a replay's state instead of Redis's: 'cdnow' (the CDNOW dataset "
            "from the lifetimes wheel) or a JSON-lines file of events, replayed through "
            "the flow first (an embedded stack unless --brokers and --redis-url are set).",
        ),
    ] = None,
    until: Annotated[
        str | None,
        typer.Option(help="With --source: replay up to and including this day (YYYY-MM-DD)."),
    ] = None,
    holdout_from: Annotated[
        str | None,
        typer.Option(
            help="With --source: fit on the days before this one (YYYY-MM-DD), then replay "
            "the rest and compare expected with actual purchases in it.",
        ),
    ] = None,
    holdout_to: Annotated[
        str | None,
        typer.Option(help="Last day of the holdout (default: the source's last day)."),
    ] = None,
    plot: Annotated[Path, typer.Option(help="Where the holdout plot (PNG) goes.")] = Path(
        "holdout.png"
    ),
    no_plot: Annotated[bool, typer.Option("--no-plot", help="No holdout plot.")] = False,
    as_of: AsOfOpt = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Print the fit; save no parameter set.")
    ] = False,
    output: Annotated[
        Path | None, typer.Option(help="Also write the fit (and holdout) as JSON to this file.")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of tables.")] = False,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    brokers: BrokersOpt = None,
    redis_url: RedisOpt = None,
    verbose: VerboseOpt = False,
) -> None:
    """Fit BG/NBD and Gamma-Gamma by maximum likelihood on the customers' summaries and
    save them as a new parameter set, which flow processes use from their next start.

    Examples: crmstream fit --redis-url redis://redis:6379/0

      crmstream fit --source cdnow --holdout-from 1997-10-01 --plot docs/cdnow-holdout.png
    """
    from crmstream.fit import FitOptions, run_fit

    _setup_logging(verbose)
    if source is None and (until or holdout_from or holdout_to):
        raise _fail(
            "--until, --holdout-from and --holdout-to need --source: the holdout replays the "
            "source up to the day before --holdout-from, fits, then replays the holdout days"
        )
    sets = [*replay_overrides(source), *(set_ or [])]
    cfg = _config(config, sets, brokers, redis_url)
    if source is None and not cfg.redis.url:
        raise _fail("fit needs redis.url (--redis-url redis://host:6379/0) or --source")
    if source is None:
        _need_redis(cfg, "fit")
    options = FitOptions(
        source=source,
        until=_day(until, "--until"),
        holdout_from=_day(holdout_from, "--holdout-from"),
        holdout_to=_day(holdout_to, "--holdout-to"),
        plot=None if no_plot else plot,
        as_of_ms=parse_as_of(as_of),
        save=not dry_run,
        output=output,
        as_json=as_json,
    )
    message = run_fit(cfg, options, console(), err_console)
    if message:
        raise _fail(message)


def replay_overrides(source: str | None) -> list[str]:
    from crmstream.flows.replay import source_overrides

    return source_overrides(source) if source else []


def _day(text: str | None, option: str) -> date | None:
    if text is None:
        return None
    try:
        return date.fromisoformat(text)
    except ValueError:
        raise _fail(f"{option} must be YYYY-MM-DD, got {text!r}") from None


@model_app.command("list")
def model_list(config: ConfigOpt = None, set_: SetOpt = None, redis_url: RedisOpt = None) -> None:
    """List the saved value-model parameter sets; the active one is marked.

    Example: crmstream model list --redis-url redis://redis:6379/0
    """
    from crmstream.state import model
    from crmstream.state.store import StateStoreError, connect

    cfg = _config(config, set_, redis_url=redis_url)
    _need_redis(cfg, "model list")
    try:
        active, sets = model.versions(connect(cfg.redis.url, cfg.redis), cfg.redis.key_prefix)
    except StateStoreError as exc:
        raise _fail(str(exc)) from None
    table = Table(title=f"value-model parameter sets under {cfg.redis.key_prefix!r}")
    for column in ("version", "active", "fitted at", "customers", "BG/NBD r, alpha, a, b",
                   "Gamma-Gamma p, q, v", "source"):  # fmt: skip
        table.add_column(column)
    bg, gg = cfg.bgnbd, cfg.gamma_gamma
    table.add_row("0", "*" if active == 0 else "", "-", "-", f"{bg.r}, {bg.alpha}, {bg.a}, "
                  f"{bg.b}", f"{gg.p}, {gg.q}, {gg.v}", "the configuration")  # fmt: skip
    for item in sets:
        b, g = item["bgnbd"], item["gamma_gamma"]
        table.add_row(
            str(item["version"]),
            "*" if item["version"] == active else "",
            str(item.get("fitted_at", "-")),
            f"{item.get('customers', 0):,}",
            ", ".join(f"{b[k]:.4g}" for k in ("r", "alpha", "a", "b")),
            ", ".join(f"{g[k]:.4g}" for k in ("p", "q", "v")),
            str(item.get("source", "-")),
        )
    console().print(table)


@model_app.command("activate")
def model_activate(
    version: Annotated[int, typer.Argument(help="The set to use (0: the configuration's).")],
    config: ConfigOpt = None,
    set_: SetOpt = None,
    redis_url: RedisOpt = None,
) -> None:
    """Make a saved parameter set the one flow processes use from their next start.

    Example: crmstream model activate 2 --redis-url redis://redis:6379/0
    """
    from crmstream.state import model
    from crmstream.state.store import StateStoreError, connect

    cfg = _config(config, set_, redis_url=redis_url)
    _need_redis(cfg, "model activate")
    try:
        model.activate(connect(cfg.redis.url, cfg.redis), cfg.redis.key_prefix, version)
    except (StateStoreError, model.ModelError) as exc:
        raise _fail(str(exc)) from None
    console().print(
        f"parameter set {version} is active: flow processes use it from their next start "
        f"(restart them all)"
    )


def _need_redis(cfg: CrmConfig, command: str) -> None:
    """Redis configured and answering, checked first: one line within
    ``redis.connect_timeout_seconds`` when it does not (README, "Using the CLI")."""
    from crmstream.cli import need_redis

    need_redis(cfg, command)

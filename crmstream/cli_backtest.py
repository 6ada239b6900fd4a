"""The ``crmstream backtest`` command: its arguments, progress and output.

This module owns the command line of a backtest; the work is in
``crmstream.backtest`` (running), ``crmstream.backtest_diff`` (comparing) and
``crmstream.backtest_report`` (showing). ``crmstream.cli`` registers it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

from crmstream.cli_options import (
    BrokersOpt,
    RedisOpt,
    SetOpt,
    VerboseOpt,
    _fail,
    _setup_logging,
    console,
    err_console,
)

InputOpt = Annotated[
    str,
    typer.Option(
        "--input",
        help="The history: a JSON-lines file of events (e.g. from `crmstream generate "
        "--output`), 'cdnow', or Kafka topics (comma-separated, with --brokers).",
    ),
]
CandidateOpt = Annotated[
    Path,
    typer.Option(
        exists=True,
        dir_okay=False,
        help="The candidate configuration (YAML over the embedded default, as --config).",
    ),
]
BaseOpt = Annotated[
    Path | None,
    typer.Option(
        exists=True, dir_okay=False, help="The base configuration (default: the embedded default)."
    ),
]
FromOpt = Annotated[
    str | None,
    typer.Option("--from", help="First event time: YYYY-MM-DD (UTC) or an ISO-8601 time."),
]
UntilOpt = Annotated[
    str | None,
    typer.Option(help="Last event time: YYYY-MM-DD (the whole day) or an ISO-8601 time."),
]
CompareFromOpt = Annotated[
    str | None,
    typer.Option(
        help="Compare only what fired from this time on; the events before it (from "
        "--from) build the customers' state under both configurations.",
    ),
]
OutOpt = Annotated[
    Path | None,
    typer.Option(help="Also write report.json, changes.jsonl and report.png here."),
]
ExamplesOpt = Annotated[int, typer.Option(help="Example customers shown per trigger type.", min=0)]
KeepOpt = Annotated[
    bool,
    typer.Option(
        "--keep",
        help="Keep the backtest's topics and Redis keys (given --brokers and --redis-url) "
        "to look at them with triggers/explain.",
    ),
]


def backtest(
    input_: InputOpt,
    candidate: CandidateOpt,
    base: BaseOpt = None,
    from_: FromOpt = None,
    until: UntilOpt = None,
    compare_from: CompareFromOpt = None,
    out: OutOpt = None,
    examples: ExamplesOpt = 3,
    keep: KeepOpt = False,
    set_: SetOpt = None,
    brokers: BrokersOpt = None,
    redis_url: RedisOpt = None,
    verbose: VerboseOpt = False,
) -> None:
    """Replay the same history through the real flow under two configurations
    and show what would have changed: triggers by type, suppressions by policy,
    customers contacted, caps, quiet-hours send times, and example customers
    with both explanations side by side. The diff is exact: trigger ids are
    deterministic, so a trigger the change does not touch has the same id and
    outcome under both (docs/backtest.md).

    Runs on an embedded broker and redis-server, or on the ones given with
    --brokers and --redis-url (in topics and keys of its own, removed at the end).

    Examples: crmstream backtest --input last-month.jsonl --candidate cap2.yaml

      crmstream backtest --input cdnow --until 1997-06-30 --base prod.yaml
    --candidate winback.yaml --out bt/
    """
    from crmstream.backtest import prepare, run_backtest
    from crmstream.backtest_history import BacktestError, Period
    from crmstream.backtest_report import PlotError, check_plotting, render, write_files
    from crmstream.config import ConfigError
    from crmstream.state.layout import LayoutError
    from crmstream.state.store import StateStoreError
    from crmstream.topics import TopicError

    _setup_logging(verbose)
    sets = list(set_ or [])
    if brokers:
        sets.append(f"kafka.brokers={brokers}")
    if redis_url:
        sets.append(f"redis.url={redis_url}")
    try:
        if out is not None:
            check_plotting()
            _check_out(out)
        period = Period.parse(from_, until, compare_from)
        setup = prepare(base, candidate, sets, input_)
        with _progress() as progress:
            result = run_backtest(setup, input_, period, keep, progress)
    except ConfigError as exc:
        raise _fail(str(exc)) from None
    except (BacktestError, PlotError, LayoutError, StateStoreError, TopicError) as exc:
        raise _fail(str(exc)) from None
    except KeyboardInterrupt:  # the servers are stopped and the given ones cleaned by now
        err_console.print("interrupted: no report")
        raise typer.Exit(130) from None
    out_console = console()
    render(result, out_console, examples)
    if out is not None:
        for path in write_files(result, out, examples):
            out_console.print(f"wrote {path}")


def _check_out(out: Path) -> None:
    """``--out`` must be a directory that can be written: found before the runs, not
    after them."""
    if out.exists() and not out.is_dir():
        raise _fail(f"--out {str(out)!r} exists and is not a directory")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".crmstream-write-check"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise _fail(f"--out {str(out)!r} cannot be written: {exc.strerror or exc}") from None


class _Bars:
    """Progress callback: one bar per stage (a spinner when the total is unknown)."""

    def __init__(self, bar: Progress):
        self._bar = bar
        self._tasks: dict[str, object] = {}

    def __call__(self, stage: str, done: int, total: int | None) -> None:
        if stage not in self._tasks:
            self._tasks[stage] = self._bar.add_task(stage, total=total)
        self._bar.update(self._tasks[stage], completed=done, total=total)


@contextlib.contextmanager
def _progress() -> Iterator[_Bars]:
    bar = Progress(
        *Progress.get_default_columns()[:1],
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=err_console,
    )
    with bar:
        yield _Bars(bar)

"""The commands that make input or run the flow on a local stack: demo, generate, replay.

This module owns their arguments and output; ``crmstream.cli`` owns the app, the
global options and how a command ends. ``demo`` and ``replay`` are the only
commands that start an embedded broker and redis-server (for whichever is not
configured).
"""

from __future__ import annotations

import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from crmstream.cli import (
    BrokersOpt,
    ConfigOpt,
    EmbeddedBrokersOpt,
    EmbeddedRedisOpt,
    SetOpt,
    VerboseOpt,
    _config,
    _fail,
    _setup_logging,
    app,
    console,
    err_console,
    need_kafka,
    need_redis,
)
from crmstream.config import CrmConfig


@app.command()
def demo(
    duration: Annotated[
        float | None, typer.Option(help="Wall-clock seconds to generate events for.")
    ] = 30.0,
    events: Annotated[int | None, typer.Option(help="Stop after this many events.")] = None,
    rate: Annotated[float, typer.Option(help="Target events per second.")] = 2000.0,
    speed: Annotated[
        str,
        typer.Option(
            help="Shop time per wall-clock second: a duration such as 1d, 6h or 30m, or a "
            "factor (86400 = 1 s is a day). 1 (or 1s) runs in real time."
        ),
    ] = "1d",
    customers: Annotated[int, typer.Option(help="Customers in the synthetic shop.")] = 2000,
    malformed_rate: Annotated[float, typer.Option(help="Share of malformed events.")] = 0.002,
    seed: Annotated[int, typer.Option(help="Workload seed.")] = 7,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    brokers: EmbeddedBrokersOpt = None,
    redis_url: EmbeddedRedisOpt = None,
    verbose: VerboseOpt = False,
) -> None:
    """Run everything locally: broker, Redis, a shop workload and the flow; show triggers live.

    Shop time runs faster than the wall clock (--speed, a day per second by default), so
    absence triggers (abandoned carts, dormant customers, late deliveries, birthdays),
    quiet-hour deferrals, caps and cooldowns all show within the run.

    Example: crmstream demo --duration 20 --rate 3000 --speed 12h
    """
    from crmstream.demo import DemoOptions, parse_speed, run_demo

    _setup_logging(verbose)
    cfg = _config(config, set_, brokers, redis_url)
    try:
        factor = parse_speed(speed)
    except ValueError as exc:
        raise _fail(str(exc)) from None
    if cfg.kafka.brokers:
        need_kafka(cfg, "demo")
    if cfg.redis.url:
        need_redis(cfg, "demo")
    if events is not None and duration == 30.0:
        duration = None  # --events alone bounds the run
    options = DemoOptions(duration, events, rate, customers, malformed_rate, seed, factor)
    run_demo(cfg, options, console())


@app.command()
def generate(
    events: Annotated[
        int | None, typer.Option(min=1, help="How many events to produce.")
    ] = 100_000,
    duration: Annotated[
        float | None, typer.Option(min=0.001, help="Or: produce for this many seconds.")
    ] = None,
    rate: Annotated[
        float | None,
        typer.Option(min=0.001, help="Target events/s (default: as fast as possible)."),
    ] = None,
    customers: Annotated[
        int, typer.Option(min=1, help="Customers in the synthetic shop.")
    ] = 10_000,
    malformed_rate: Annotated[
        float, typer.Option(min=0, max=1, help="Share of malformed events.")
    ] = 0.001,
    seed: Annotated[int, typer.Option(help="Workload seed.")] = 7,
    live_time: Annotated[
        bool, typer.Option(help="Stamp events with the wall clock instead of simulated time.")
    ] = False,
    output: Annotated[
        Path | None,
        typer.Option(
            "--output",
            "-o",
            help="Write the events to this JSON-lines file "
            "(for `crmstream replay FILE`) instead of producing them to Kafka.",
        ),
    ] = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    brokers: BrokersOpt = None,
    verbose: VerboseOpt = False,
) -> None:
    """Produce a realistic shop workload to the input topics.

    Examples: crmstream generate --brokers localhost:9092 --events 1000000 --rate 20000

      crmstream generate --events 50000 --output last-month.jsonl
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

    from crmstream.bench.workload import Workload, WorkloadSpec, publish

    _setup_logging(verbose)
    cfg = _config(config, set_, brokers)
    workload = Workload(
        cfg, WorkloadSpec(customers=customers, seed=seed, malformed_rate=malformed_rate)
    )
    out = console()
    if output is not None:  # record to a file for `crmstream replay FILE`
        if events is None:
            raise _fail("--output needs --events")
        if output.is_dir():
            raise _fail(f"--output {str(output)!r} is a directory: name a file")
        try:
            handle = output.open("wb")
        except OSError as exc:
            raise _fail(f"--output {str(output)!r} cannot be written: {exc.strerror}") from None
        with handle:
            for _, event in zip(range(events), workload.events(), strict=False):
                handle.write(event.value + b"\n")
        out.print(f"wrote {events:,} events to {output}")
        return
    brokers_list = need_kafka(cfg, "generate", list(cfg.kafka.topics.inputs))
    total = events if duration is None else None
    with Progress(
        *Progress.get_default_columns()[:1],
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=err_console,
        disable=not sys.stderr.isatty(),
    ) as progress:
        task = progress.add_task("producing", total=total)
        stats = publish(
            brokers_list,
            cfg,
            workload,
            max_events=total,
            duration_s=duration,
            rate=rate,
            live_time=live_time,
            on_progress=lambda n: progress.update(task, completed=n),
        )
    out.print(
        f"produced {stats.events:,} events ({stats.malformed:,} malformed) in "
        f"{stats.seconds:.1f} s: {stats.events / max(stats.seconds, 1e-9):,.0f}/s"
    )


@app.command()
def replay(
    source: Annotated[
        str,
        typer.Argument(
            help="What to replay: 'cdnow' (the CDNOW dataset from the lifetimes wheel), "
            "or a JSON-lines file of input events."
        ),
    ],
    until: Annotated[
        str | None,
        typer.Option(
            help="Replay transactions up to and including "
            "this date (YYYY-MM-DD), e.g. the end of a calibration period."
        ),
    ] = None,
    show: Annotated[int, typer.Option(help="Customers to show at the end.")] = 3,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    brokers: EmbeddedBrokersOpt = None,
    redis_url: EmbeddedRedisOpt = None,
    verbose: VerboseOpt = False,
) -> None:
    """Replay recorded history through the real flow in event time, with progress.

    Examples: crmstream replay cdnow --until 1997-09-30

      crmstream replay last-month.jsonl --brokers kafka:9092 --redis-url redis://redis:6379/0
    """
    from datetime import date

    from crmstream.flows.replay import cdnow_events, cdnow_path, file_events, read_cdnow

    _setup_logging(verbose)
    customers: list[str] = []
    cutoff = None
    out = console()
    if source == "cdnow":
        # CDNOW is 1997-1998: accept event times from 1990 on.
        sets = ["processing.min_event_time=1990-01-01T00:00:00+00:00", *(set_ or [])]
        cfg = _config(config, sets, brokers, redis_url)
        try:
            cutoff = date.fromisoformat(until) if until else None
        except ValueError:
            raise _fail(f"--until must be YYYY-MM-DD, got {until!r}") from None
        rows = read_cdnow(cdnow_path(), cutoff)
        events = list(cdnow_events(rows, cfg.kafka.topics.orders))
        customers = sorted({r.customer for r in rows})
        out.print(
            f"CDNOW: {len(events):,} purchases by {len(customers):,} customers"
            + (f" up to {cutoff}" if cutoff else "")
        )
    else:
        path = Path(source)
        if not path.is_file():
            raise _fail(f"no such replay file: {source!r} (or use 'cdnow')")
        if until:
            raise _fail(
                f"--until {until!r} applies to 'cdnow' only; a file is replayed whole "
                "(crmstream backtest --from/--until replays a file's period)"
            )
        cfg = _config(config, set_, brokers, redis_url)
        events = list(file_events(path, cfg))
        out.print(f"{path}: {len(events):,} events")
    if cfg.kafka.brokers:
        need_kafka(cfg, "replay")
    if cfg.redis.url:
        need_redis(cfg, "replay")
    _replay_events(cfg, events, customers[:show], cutoff, out)


def _replay_events(
    cfg: CrmConfig, events: list[Any], show: list[str], cutoff: Any, out: Console
) -> None:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

    from crmstream.embedded import infrastructure
    from crmstream.flows import replay as replay_mod
    from crmstream.native_output import native_stderr_as_logs
    from crmstream.profile import customer_view
    from crmstream.state.store import StateStore, connect

    with infrastructure(cfg) as endpoints:
        with Progress(
            *Progress.get_default_columns()[:1],
            BarColumn(),
            MofNCompleteColumn(),
            TimeRemainingColumn(),
            console=err_console,
        ) as progress:
            tasks: dict[str, Any] = {}

            def on_progress(stage: str, done: int, total: int) -> None:
                if stage not in tasks:
                    tasks[stage] = progress.add_task(stage, total=total)
                progress.update(tasks[stage], completed=done)

            with native_stderr_as_logs():
                seconds = replay_mod.replay(endpoints, cfg, events, on_progress)
        out.print(
            f"replayed {len(events):,} events in {seconds:.1f} s "
            f"({len(events) / seconds:,.0f} events/s)"
        )
        store = StateStore(connect(endpoints.redis_url, cfg.redis), cfg.redis.key_prefix)
        as_of = None
        if cutoff:
            as_of = int(datetime.combine(cutoff, datetime.min.time(), UTC).timestamp() * 1000)
        for customer in show:
            view = customer_view(store, cfg, customer, as_of)
            if view is not None:
                out.print_json(
                    data={k: view[k] for k in ("customer_id", "as_of", "bgnbd", "rfm", "lifecycle")}
                )

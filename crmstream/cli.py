"""The ``crmstream`` command line: demo, run, generate, profile, fit, model, reshard, replay,
backtest, topics, config.

This module owns argument parsing and error presentation only; each command
calls into the module that does the work. Errors a user can fix (bad config,
unreachable infrastructure) print one clear message and exit 2, never a
traceback.
"""

from __future__ import annotations

import contextlib
import sys
from datetime import date
from pathlib import Path
from typing import Annotated

import orjson
import typer
import yaml

from crmstream.cli_backtest import backtest
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
from crmstream.cli_value import fit, model_app
from crmstream.config import mask_secrets

app = typer.Typer(
    help="crmstream: real-time CRM triggers from Kafka events.\n\n"
    "Examples:\n\n  crmstream demo --duration 30\n\n"
    "  crmstream run --config prod.yaml -w 1 -i 0 -a host0:2101 -a host1:2101\n\n"
    "  crmstream profile c0000042 --redis-url redis://localhost:6379/0",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
topics_app = typer.Typer(help="Kafka topic administration.", no_args_is_help=True)
config_app = typer.Typer(help="Inspect and validate configuration.", no_args_is_help=True)
app.add_typer(topics_app, name="topics")
app.add_typer(config_app, name="config")
app.command()(fit)
app.add_typer(model_app, name="model")
app.command()(backtest)

@app.command()
def demo(
    duration: Annotated[float | None, typer.Option(help="Seconds to generate events for.")] = 30.0,
    events: Annotated[int | None, typer.Option(help="Stop after this many events.")] = None,
    rate: Annotated[float, typer.Option(help="Target events per second.")] = 2000.0,
    customers: Annotated[int, typer.Option(help="Customers in the synthetic shop.")] = 2000,
    malformed_rate: Annotated[float, typer.Option(help="Share of malformed events.")] = 0.002,
    seed: Annotated[int, typer.Option(help="Workload seed.")] = 7,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    brokers: BrokersOpt = None,
    redis_url: RedisOpt = None,
    verbose: VerboseOpt = False,
) -> None:
    """Run everything locally: broker, Redis, a shop workload and the flow; show triggers live.

    Example: crmstream demo --duration 20 --rate 3000
    """
    from crmstream.demo import DemoOptions, run_demo

    _setup_logging(verbose)
    cfg = _config(config, set_, brokers, redis_url)
    if events is not None and duration == 30.0:
        duration = None  # --events alone bounds the run
    run_demo(cfg, DemoOptions(duration, events, rate, customers, malformed_rate, seed), console)


@app.command()
def run(
    workers: Annotated[
        int,
        typer.Option(
            "-w",
            "--workers-per-process",
            help="Worker threads per process (prefer processes: threads share the GIL).",
        ),
    ] = 1,
    process_id: Annotated[
        int | None, typer.Option("-i", "--process-id", help="This process's index in the cluster.")
    ] = None,
    addresses: Annotated[
        list[str] | None,
        typer.Option(
            "-a", "--addresses", help="host:port of every cluster process, in order (repeatable)."
        ),
    ] = None,
    recovery_dir: Annotated[
        Path | None,
        typer.Option(
            "-r", "--recovery-directory", help="Bytewax recovery database directory (optional)."
        ),
    ] = None,
    until_end: Annotated[
        bool, typer.Option(help="Stop at the end of the input instead of tailing (backfills).")
    ] = False,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    brokers: BrokersOpt = None,
    redis_url: RedisOpt = None,
    verbose: VerboseOpt = False,
) -> None:
    """Run the flow against configured Kafka and Redis (one process of a cluster).

    Example: crmstream run --brokers kafka:9092 --redis-url redis://redis:6379/0 -i 0
    -a crm-0:2101 -a crm-1:2101
    """
    from crmstream.flows.crm import RecoveryStoreError, run_cluster_process
    from crmstream.flows.runtime import Endpoints, Runtime
    from crmstream.metrics import expose_bytewax_metrics, serve
    from crmstream.state.layout import LayoutError

    _setup_logging(verbose)
    cfg = _config(config, set_, brokers, redis_url)
    if not cfg.kafka.brokers or not cfg.redis.url:
        raise _fail(
            "run needs kafka.brokers and redis.url (or use `crmstream demo` for an embedded stack)"
        )
    if cfg.metrics.enabled:
        offset = (process_id or 0) if cfg.metrics.offset_by_process else 0
        port = cfg.metrics.port + offset if cfg.metrics.port else 0
        bound = serve(cfg.metrics.bind_address, port)
        err_console.print(f"metrics on http://{cfg.metrics.bind_address}:{bound}/metrics")
        if cfg.metrics.bytewax_api_port:
            expose_bytewax_metrics(cfg.metrics.bytewax_api_port + offset)
    runtime = Runtime(cfg, Endpoints(list(cfg.kafka.brokers), cfg.redis.url))
    try:
        run_cluster_process(
            runtime,
            workers,
            process_id,
            addresses,
            str(recovery_dir) if recovery_dir else None,
            tail=not until_end,
        )
    except (RecoveryStoreError, LayoutError) as exc:
        raise _fail(str(exc)) from None


@app.command()
def generate(
    events: Annotated[int | None, typer.Option(help="How many events to produce.")] = 100_000,
    duration: Annotated[
        float | None, typer.Option(help="Or: produce for this many seconds.")
    ] = None,
    rate: Annotated[
        float | None, typer.Option(help="Target events/s (default: as fast as possible).")
    ] = None,
    customers: Annotated[int, typer.Option(help="Customers in the synthetic shop.")] = 10_000,
    malformed_rate: Annotated[float, typer.Option(help="Share of malformed events.")] = 0.001,
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
    if output is not None:  # record to a file for `crmstream replay FILE`
        if events is None:
            raise _fail("--output needs --events")
        with output.open("wb") as handle:
            for _, event in zip(range(events), workload.events(), strict=False):
                handle.write(event.value + b"\n")
        console.print(f"wrote {events:,} events to {output}")
        return
    if not cfg.kafka.brokers:
        raise _fail("generate needs kafka.brokers (--brokers host:port)")
    total = events if duration is None else None
    with Progress(
        *Progress.get_default_columns()[:1],
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=err_console,
    ) as progress:
        task = progress.add_task("producing", total=total)
        stats = publish(
            list(cfg.kafka.brokers),
            cfg,
            workload,
            max_events=total,
            duration_s=duration,
            rate=rate,
            live_time=live_time,
            on_progress=lambda n: progress.update(task, completed=n),
        )
    console.print(
        f"produced {stats.events:,} events ({stats.malformed:,} malformed) in "
        f"{stats.seconds:.1f} s: {stats.events / max(stats.seconds, 1e-9):,.0f}/s"
    )


@app.command()
def profile(
    customer_id: Annotated[str, typer.Argument(help="The customer id.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
    as_of: AsOfOpt = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    redis_url: RedisOpt = None,
) -> None:
    """Show what Redis holds for one customer, decoded (the customer-360 view), with
    everything that moves with time derived as of one time.

    Example: crmstream profile c0000042 --redis-url redis://localhost:6379/0

      crmstream profile cdnow-00008 --as-of 1997-12-31 --redis-url redis://localhost:6379/0
    """
    from crmstream.profile import ProfileError, customer_view, render
    from crmstream.state.store import StateStore, StateStoreError, connect

    cfg = _config(config, set_, redis_url=redis_url)
    if not cfg.redis.url:
        raise _fail("profile needs redis.url (--redis-url redis://host:6379/0)")
    when = parse_as_of(as_of)
    try:
        store = StateStore(connect(cfg.redis.url, cfg.redis), cfg.redis.key_prefix)
        view = customer_view(store, cfg, customer_id, when)
    except (StateStoreError, ProfileError) as exc:
        raise _fail(str(exc)) from None
    if view is None:
        raise _fail(f"no state for customer {customer_id!r}")
    if as_json:
        sys.stdout.write(orjson.dumps(view, option=orjson.OPT_INDENT_2).decode() + "\n")
    else:
        console.print(render(view))


@app.command()
def reshard(
    shards: Annotated[
        int | None, typer.Option(help="New processing.shards (default: the configured one).")
    ] = None,
    step_ms: Annotated[
        int | None, typer.Option(help="New processing.step_ms (default: the configured one).")
    ] = None,
    yes: Annotated[bool, typer.Option("--yes", help="Do not ask for confirmation.")] = False,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    redis_url: RedisOpt = None,
) -> None:
    """Rewrite the Redis state's per-shard keys for new shard settings.

    Stop the producers, let the flow drain (lag 0) and stop it first. Timers and
    undelivered outbox records move to their new shards; nothing else is
    rewritten. Interrupted, run it again: it finishes the same move. A state
    written before the layout was recorded is taken to have the configured step_ms.

    Example: crmstream reshard --shards 4 --redis-url redis://redis:6379/0
    """
    from rich.progress import Progress

    from crmstream.state.layout import Layout, LayoutError, stored_layout
    from crmstream.state.layout import reshard as do_reshard
    from crmstream.state.store import StateStore, StateStoreError, connect

    cfg = _config(config, set_, redis_url=redis_url)
    if not cfg.redis.url:
        raise _fail("reshard needs redis.url (--redis-url redis://host:6379/0)")
    target = Layout(shards or cfg.processing.shards, step_ms or cfg.processing.step_ms)
    if not 1 <= target.shards <= 4096 or target.step_ms < 1:
        raise _fail(
            f"shards must be 1..4096 and step_ms >= 1, got {target.shards}, {target.step_ms}"
        )
    try:
        store = StateStore(connect(cfg.redis.url, cfg.redis), cfg.redis.key_prefix)
        source, unfinished = stored_layout(store, cfg.processing.step_ms)
        if source is None:
            raise _fail(f"no state under key prefix {cfg.redis.key_prefix!r}: nothing to reshard")
        if source == target and unfinished is None:
            console.print(f"the state already has {source.shards} shards, step_ms {source.step_ms}")
            return
        console.print(
            f"{cfg.redis.key_prefix!r}: {source.shards} shards, step_ms {source.step_ms} -> "
            f"{target.shards} shards, step_ms {target.step_ms}"
            + (" (finishing an interrupted reshard)" if unfinished else "")
        )
        if not yes and not typer.confirm("Is the flow stopped and drained?"):
            raise typer.Exit(1)
        with Progress(console=err_console, transient=True) as bar:
            tasks: dict[str, int] = {}

            def advance(what: str, n: int) -> None:
                if what not in tasks:
                    tasks[what] = bar.add_task(f"moving {what}", total=None)
                bar.advance(tasks[what], n)

            report = do_reshard(store, target, cfg.processing.step_ms, advance)
    except (LayoutError, StateStoreError) as exc:
        raise _fail(str(exc)) from None
    console.print(
        f"resharded: {report.timers:,} timers and {report.outbox:,} outbox records moved; "
        f"{report.positions} input partitions' progress merged; "
        f"{report.customers:,} customers counted. Start the flow with processing.shards="
        f"{target.shards} and processing.step_ms={target.step_ms}."
    )


@app.command()
def replay(
    source: Annotated[
        str,
        typer.Argument(
            help="What to replay: 'cdnow' (the CDNOW dataset from the lifetimes wheel)."
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
    brokers: BrokersOpt = None,
    redis_url: RedisOpt = None,
    verbose: VerboseOpt = False,
) -> None:
    """Replay recorded history through the real flow in event time, with progress.

    Examples: crmstream replay cdnow --until 1997-09-30

      crmstream replay last-month.jsonl --brokers kafka:9092 --redis-url redis://redis:6379/0
    """

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

    from crmstream.embedded import infrastructure
    from crmstream.flows import replay as replay_mod
    from crmstream.flows.replay import (
        ReplayError,
        cdnow_events,
        cdnow_path,
        file_events,
        read_cdnow,
    )
    from crmstream.profile import customer_views
    from crmstream.state.layout import LayoutError
    from crmstream.state.store import StateStore, connect

    _setup_logging(verbose)
    customers: list[str] = []
    cutoff = None
    if source == "cdnow":
        # CDNOW is 1997-1998: accept event times from 1990 on.
        sets = ["processing.min_event_time=1990-01-01T00:00:00+00:00", *(set_ or [])]
        cfg = _config(config, sets, brokers, redis_url)
        try:
            cutoff = date.fromisoformat(until) if until else None
        except ValueError:
            raise _fail(f"--until must be YYYY-MM-DD, got {until!r}") from None
        try:
            rows = read_cdnow(cdnow_path(), cutoff)
        except ReplayError as exc:
            raise _fail(str(exc)) from None
        events = list(cdnow_events(rows, cfg.kafka.topics.orders))
        customers = sorted({r.customer for r in rows})
        console.print(
            f"CDNOW: {len(events):,} purchases by {len(customers):,} customers"
            + (f" up to {cutoff}" if cutoff else "")
        )
    else:
        path = Path(source)
        if not path.is_file():
            raise _fail(f"no such replay file: {source!r} (or use 'cdnow')")
        cfg = _config(config, set_, brokers, redis_url)
        events = list(file_events(path, cfg))
        console.print(f"{path}: {len(events):,} events")
    with infrastructure(cfg) as endpoints:
        with Progress(
            *Progress.get_default_columns()[:1],
            BarColumn(),
            MofNCompleteColumn(),
            TimeRemainingColumn(),
            console=err_console,
        ) as progress:
            tasks: dict[str, object] = {}

            def on_progress(stage: str, done: int, total: int) -> None:
                if stage not in tasks:
                    tasks[stage] = progress.add_task(stage, total=total)
                progress.update(tasks[stage], completed=done)

            try:
                seconds = replay_mod.replay(endpoints, cfg, events, on_progress)
            except LayoutError as exc:
                raise _fail(str(exc)) from None
        console.print(
            f"replayed {len(events):,} events in {seconds:.1f} s "
            f"({len(events) / seconds:,.0f} events/s)"
        )
        store = StateStore(connect(endpoints.redis_url, cfg.redis), cfg.redis.key_prefix)
        shown = ("customer_id", "as_of", "as_of_source", "bgnbd", "value", "rfm", "lifecycle")
        for view in customer_views(store, cfg, customers[:show]).values():
            console.print_json(data={k: view[k] for k in shown})


@app.command()
def triggers(
    follow: Annotated[
        bool, typer.Option("--follow", "-f", help="Keep the table live as triggers arrive.")
    ] = False,
    trigger_type: Annotated[
        list[str] | None, typer.Option("--type", "-t", help="Only this trigger type (repeatable).")
    ] = None,
    customer: Annotated[str | None, typer.Option(help="Only this customer id.")] = None,
    last: Annotated[int, typer.Option(help="Rows to show.")] = 20,
    limit: Annotated[
        int | None, typer.Option(help="Stop after this many matching triggers.")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON record per line.")] = False,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    brokers: BrokersOpt = None,
) -> None:
    """Show the latest triggers on the trigger topic as a table; --follow tails it live.

    Reads with no consumer group, so subscribers' offsets are untouched.

    Example: crmstream triggers --brokers kafka:9092 --follow --type cart_abandoned

      crmstream triggers --brokers kafka:9092 --customer c000123 --json
    """
    from crmstream.ops import tail_triggers

    cfg = _config(config, set_, brokers)
    if not cfg.kafka.brokers:
        raise _fail("triggers needs kafka.brokers (--brokers host:port)")
    known = set(cfg.rules.model_fields)
    unknown = sorted(set(trigger_type or []) - known)
    if unknown:
        raise _fail(f"unknown trigger type(s) {unknown}; known: {sorted(known)}")
    with contextlib.suppress(KeyboardInterrupt):
        tail_triggers(
            cfg, console, follow, list(trigger_type or []), customer, last, limit, as_json
        )


@app.command()
def explain(
    trigger_id: Annotated[str, typer.Argument(help="The trigger_id of a trigger or suppression.")],
    config: ConfigOpt = None,
    set_: SetOpt = None,
    brokers: BrokersOpt = None,
) -> None:
    """Why a trigger fired (rule, values against thresholds, causal event, delivery), or
    which policy suppressed it and why. Exit code 1 when the id is not found.

    Example: crmstream explain 3f9c0a... --brokers kafka:9092
    """
    from crmstream.ops import explain as explain_trigger

    cfg = _config(config, set_, brokers)
    if not cfg.kafka.brokers:
        raise _fail("explain needs kafka.brokers (--brokers host:port)")
    if not explain_trigger(cfg, trigger_id, console):
        raise typer.Exit(1)


@topics_app.command("create")
def topics_create(
    partitions: Annotated[
        int | None, typer.Option(help="Partitions per topic (default: kafka.partitions).")
    ] = None,
    replication_factor: Annotated[
        int | None, typer.Option(help="Replicas per partition (default: kafka.replication_factor).")
    ] = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    brokers: BrokersOpt = None,
) -> None:
    """Create every input and output topic (existing ones are left as they are).

    Example: crmstream topics create --brokers localhost:9092 --partitions 8
    """
    from crmstream.topics import TopicError, create_topics

    cfg = _config(config, set_, brokers)
    if not cfg.kafka.brokers:
        raise _fail("topics create needs kafka.brokers (--brokers host:port)")
    try:
        result = create_topics(list(cfg.kafka.brokers), cfg, partitions, replication_factor)
    except TopicError as exc:
        raise _fail(str(exc)) from None
    for name, outcome in result.items():
        console.print(f"{name}: {outcome}")


@config_app.command("show")
def config_show(config: ConfigOpt = None, set_: SetOpt = None) -> None:
    """Print the effective configuration as YAML, secrets masked.

    Example: CRMSTREAM__PROCESSING__SHARDS=16 crmstream config show
    """
    cfg = _config(config, set_)
    dump = mask_secrets(cfg.model_dump(mode="json"))
    console.print(yaml.safe_dump(dump, sort_keys=False), end="", markup=False, highlight=False)


@config_app.command("validate")
def config_validate(config: ConfigOpt = None, set_: SetOpt = None) -> None:
    """Check a configuration and exit non-zero, naming the key, if it is invalid.

    Example: crmstream config validate --config prod.yaml
    """
    _config(config, set_)
    console.print("configuration is valid")


def main() -> None:
    app()


if __name__ == "__main__":
    main()

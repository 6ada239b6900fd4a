"""The read-only commands: triggers, explain, dead-letters, profile.

This module owns how operators see crmstream's outputs and state: tables for
people, ``--json`` for machines (one record per line, or one document), and
exit code 1 when what was asked for is not there (``failures.EXIT_NOT_FOUND``).
The output topics are read from their end (``ops.TopicReader``).
"""

from __future__ import annotations

import contextlib
import re
import sys
import time
from collections import deque
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Annotated

import orjson
import typer
from rich.live import Live
from rich.table import Table

from crmstream import logs
from crmstream.cli import (
    BrokersOpt,
    ConfigOpt,
    RedisOpt,
    SetOpt,
    _config,
    _fail,
    app,
    console,
    need_kafka,
    need_redis,
)
from crmstream.cli_options import AsOfOpt, parse_as_of
from crmstream.config import CrmConfig
from crmstream.failures import EXIT_NOT_FOUND
from crmstream.ops import MIN_PREFIX, Record, TopicReader, find_trigger

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*$")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}

SinceOpt = Annotated[
    str | None,
    typer.Option(
        help="Only records from this long ago on (30m, 6h, 2d): read from the offsets for "
        "that time instead of backwards from the end."
    ),
]
LastOpt = Annotated[int, typer.Option(min=0, help="Show this many of the latest matching records.")]
LimitOpt = Annotated[
    int | None,
    typer.Option(min=1, help="Stop after this many records in all (with --follow: history + new)."),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="One JSON record per line.")]
FollowOpt = Annotated[
    bool, typer.Option("--follow", "-f", help="Keep going: show new records as they arrive.")
]


def _field(record: dict) -> str:
    """A dead letter's field as the tables and ``--field`` show it: ``message`` when the
    message could not be read, ``processing_error`` for the events of a customer set aside
    (readable; counted under that field in ``crmstream_invalid_events_total`` too)."""
    field = record.get("field")
    if field:
        return str(field)
    if str(record.get("reason", "")).startswith("processing_error"):
        return "processing_error"
    return "message"


def _source(record: dict) -> dict:
    """A dead letter's source position; empty when it has none (outsider 53: a dead letter
    standing for a damaged outbox entry has ``"source": null``, and the view exited 70)."""
    src = record.get("source")
    return src if isinstance(src, dict) else {}


def parse_duration(text: str) -> float:
    """Seconds of ``30m``, ``6h``, ``2d``, ``1w`` or ``45s``."""
    match = _DURATION.match(text)
    if match is None:
        raise ValueError(f"not a duration: {text!r} (write e.g. 45s, 30m, 6h, 2d, 1w)")
    return float(match.group(1)) * _UNIT_S[match.group(2)]


def _since_ms(since: str | None) -> int | None:
    if since is None:
        return None
    try:
        # From before 1970 (--since 99999999d): everything kept, from the first record.
        return int(max(0.0, time.time() - parse_duration(since)) * 1000)
    except ValueError as exc:
        raise _fail(f"--since: {exc}") from None


def _kafka_time(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="seconds")[:19]


def _show_records(
    reader: TopicReader,
    matches: Callable[[Record], bool],
    last: int,
    limit: int | None,
    follow: bool,
    as_json: bool,
    since_ms: int | None,
    table: Callable[[list[Record]], Table],
) -> int:
    """The latest ``last`` matching records (a table, or JSON lines), then with ``follow``
    every new one, until ``limit`` records were shown in all. Returns how many."""
    wanted = last if limit is None else min(last, limit)
    history = reader.latest(
        lambda records: sum(1 for r in records if matches(r)) >= wanted,
        first_window=max(wanted, 200),
        since_ms=since_ms,
    )
    rows: deque[Record] = deque((r for r in history if matches(r)), maxlen=max(1, wanted))
    if wanted == 0:
        rows.clear()
    shown = len(rows)
    out = console()
    if as_json:
        for record in rows:
            sys.stdout.write(orjson.dumps(record.value).decode() + "\n")
        sys.stdout.flush()
    live: Live | None = None
    if not as_json:
        if follow:
            live = Live(table(list(rows)), console=out, refresh_per_second=4)
            live.start()
        else:
            out.print(table(list(rows)))
    if not follow or (limit is not None and shown >= limit):
        if live is not None:
            live.stop()
        return shown
    rows = deque(rows, maxlen=max(1, last))
    count = [shown]  # read by the reader's stop test
    try:
        for record in reader.follow(lambda: limit is not None and count[0] >= limit):
            if not matches(record):
                continue
            shown += 1
            count[0] = shown
            if as_json:
                sys.stdout.write(orjson.dumps(record.value).decode() + "\n")
                sys.stdout.flush()
            rows.append(record)
            if live is not None:
                live.update(table(list(rows)))
            if limit is not None and shown >= limit:
                break
    finally:
        if live is not None:
            live.stop()
    return shown


def _trigger_table(config: CrmConfig, title: str, with_outcome: bool) -> Callable[..., Table]:
    suppressions = config.kafka.topics.suppressions

    def build(records: list[Record]) -> Table:
        table = Table(title=title, expand=False)
        columns = ["event time", "type", "customer"]
        columns += ["outcome"] if with_outcome else []
        columns += ["channel", "why", "trigger id"]
        for col in columns:
            table.add_column(col, overflow="fold", no_wrap=col == "trigger id")
        for rec in records:
            r = rec.value
            suppressed = rec.topic == suppressions
            reason = r.get("candidate", {}) if suppressed else r.get("reason", {})
            values = reason.get("values", {}) if isinstance(reason, dict) else {}
            why = ", ".join(f"{k}={v}" for k, v in list(values.items())[:3])
            row = [str(r.get("event_time", ""))[:19], r.get("trigger_type", ""),
                   r.get("customer_id", "")]  # fmt: skip
            if with_outcome:
                row.append(f"suppressed: {r.get('policy')}" if suppressed else "sent")
            row += [r.get("channel") or "", why, r.get("trigger_id", "")]
            table.add_row(*[str(c) for c in row])
        return table

    return build


@app.command()
def triggers(
    follow: FollowOpt = False,
    trigger_type: Annotated[
        list[str] | None, typer.Option("--type", "-t", help="Only this trigger type (repeatable).")
    ] = None,
    customer: Annotated[str | None, typer.Option(help="Only this customer id.")] = None,
    with_suppressions: Annotated[
        bool,
        typer.Option(
            "--suppressions",
            help="Also show the suppressed ones, with the policy that stopped them.",
        ),
    ] = False,
    last: LastOpt = 20,
    limit: LimitOpt = None,
    since: SinceOpt = None,
    as_json: JsonOpt = False,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    brokers: BrokersOpt = None,
) -> None:
    """Show the latest triggers (newest last) as a table; --follow keeps it live.

    Reads the topic from its end with no consumer group, so subscribers' offsets are
    untouched. Trigger ids are shown in full (explain takes them, or a prefix).

    Example: crmstream triggers --brokers kafka:9092 --follow --type cart_abandoned

      crmstream triggers --brokers kafka:9092 --customer c000123 --suppressions --json
    """
    cfg = _config(config, set_, brokers)
    known = set(type(cfg.rules).model_fields)
    unknown = sorted(set(trigger_type or []) - known)
    if unknown:
        raise _fail(f"unknown trigger type(s) {unknown}; known: {sorted(known)}")
    topics = cfg.kafka.topics
    names = [topics.triggers, topics.suppressions] if with_suppressions else [topics.triggers]
    brokers_list = need_kafka(cfg, "triggers", names)
    types = set(trigger_type or [])

    def matches(record: Record) -> bool:
        r = record.value
        return (not types or r.get("trigger_type") in types) and (
            customer is None or r.get("customer_id") == customer
        )

    title = (
        " + ".join(names)
        + (f" type in {sorted(types)}" if types else "")
        + (f" customer {customer}" if customer else "")
    )
    since_ms = _since_ms(since)
    table = _trigger_table(cfg, title, with_suppressions)
    reader = TopicReader(brokers_list, cfg.kafka.consumer_properties(), names, 15)
    with reader, contextlib.suppress(KeyboardInterrupt):
        _show_records(reader, matches, last, limit, follow, as_json, since_ms, table)


@app.command()
def explain(
    trigger_id: Annotated[
        str,
        typer.Argument(
            help=f"The trigger_id of a trigger or suppression, or its first {MIN_PREFIX}+ "
            "characters."
        ),
    ],
    as_json: Annotated[bool, typer.Option("--json", help="Print the records as JSON.")] = False,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    brokers: BrokersOpt = None,
) -> None:
    """Why a trigger fired (rule, values against thresholds, causal event, delivery), or
    which policy suppressed it and why. Exit code 1 when the id is not found.

    Searches the trigger and suppression topics from their end backwards.

    Example: crmstream explain 3f9c0a1e --brokers kafka:9092
    """
    cfg = _config(config, set_, brokers)
    if len(trigger_id) < MIN_PREFIX:
        raise _fail(f"give at least {MIN_PREFIX} characters of the trigger id, got {trigger_id!r}")
    topics = cfg.kafka.topics
    names = [topics.triggers, topics.suppressions]
    brokers_list = need_kafka(cfg, "explain", names)
    started = time.monotonic()
    with TopicReader(brokers_list, cfg.kafka.consumer_properties(), names, 15) as reader:
        found = find_trigger(reader, trigger_id)
        read = reader.read
    if not found:
        logs.error(
            f"no trigger or suppression with id {trigger_id} on {topics.triggers} or "
            f"{topics.suppressions} ({read:,} records read in {time.monotonic() - started:.1f} s)"
        )
        raise typer.Exit(EXIT_NOT_FOUND)
    if as_json:
        doc = {
            "trigger_id": found[0].value["trigger_id"],
            "records": [
                {
                    "outcome": "sent" if rec.topic == topics.triggers else "suppressed",
                    "topic": rec.topic,
                    "partition": rec.partition,
                    "offset": rec.offset,
                    "record": rec.value,
                }
                for rec in found
            ],
        }
        sys.stdout.write(orjson.dumps(doc, option=orjson.OPT_INDENT_2).decode() + "\n")
        return
    _print_explanation(cfg, found)


def _print_explanation(cfg: CrmConfig, found: list[Record]) -> None:
    out = console()
    topics = cfg.kafka.topics
    for rec in found:
        r = rec.value
        sent = rec.topic == topics.triggers
        rule = r.get("rule", {})
        out.print(
            f"[bold]{r.get('trigger_type')}[/] for customer [bold]{r.get('customer_id')}[/]: "
            + ("[green]SENT[/]" if sent else f"[red]SUPPRESSED[/] by policy {r.get('policy')}")
        )
        out.print(f"  trigger id  {r.get('trigger_id')}")
        out.print(f"  rule        {rule.get('name')} v{rule.get('version')}")
        out.print(f"  event time  {r.get('event_time')}  detected {r.get('detected_at')}")
        if sent:
            out.print(f"  causal      event {r.get('causal_event_id')}")
            reason = r.get("reason", {})
        else:
            out.print(f"  why stopped {r.get('reason')}")
            reason = r.get("candidate", {})
        values, limits = reason.get("values", {}), reason.get("thresholds", {})
        out.print(f"  why fired   values {values}")
        if limits:
            out.print(f"              thresholds {limits}")
        if sent:
            delivery = {
                k: r[k]
                for k in ("channel", "language", "send_window", "deferred", "not_before")
                if r.get(k) is not None
            }
            out.print(f"  delivery    {delivery}  emitted {r.get('emitted_at')}")
    if sum(1 for rec in found if rec.topic == topics.triggers) > 1:
        out.print("  (delivered more than once: a restart re-emitted it; dedupe on trigger_id)")


def _dead_letter_table(title: str) -> Callable[..., Table]:
    def build(records: list[Record]) -> Table:
        table = Table(title=title, expand=False)
        for col in ("kafka time", "source", "field", "customer", "reason"):
            table.add_column(col, overflow="fold", no_wrap=col == "source")
        for rec in records:
            r = rec.value
            src = _source(r)
            table.add_row(
                _kafka_time(rec.timestamp_ms),
                f"{src.get('topic')}:{src.get('partition')}:{src.get('offset')}",
                _field(r),
                str(r.get("customer_id") or ""),
                str(r.get("reason", "")),
            )
        return table

    return build


@app.command("dead-letters")
def dead_letters(
    source: Annotated[
        str | None,
        typer.Option(
            help="Show the one dead letter of this input message, TOPIC:PARTITION:OFFSET, "
            "in full (exit code 1 when there is none)."
        ),
    ] = None,
    topic: Annotated[
        str | None, typer.Option(help="Only dead letters from this input topic.")
    ] = None,
    field: Annotated[
        str | None,
        typer.Option(
            help="Only those rejected for this field ('message': unreadable; "
            "'processing_error': a customer set aside)."
        ),
    ] = None,
    customer: Annotated[str | None, typer.Option(help="Only this customer id.")] = None,
    follow: FollowOpt = False,
    last: LastOpt = 20,
    limit: LimitOpt = None,
    since: SinceOpt = None,
    as_json: JsonOpt = False,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    brokers: BrokersOpt = None,
) -> None:
    """Show the latest dead letters: rejected input messages, why, and where they came from.

    Example: crmstream dead-letters --brokers kafka:9092 --topic crm.orders --field price

      crmstream dead-letters --brokers kafka:9092 --source crm.orders:3:1042
    """
    cfg = _config(config, set_, brokers)
    name = cfg.kafka.topics.dead_letter
    brokers_list = need_kafka(cfg, "dead-letters", [name])
    wanted_source = _parse_source(source) if source else None

    def matches(record: Record) -> bool:
        r = record.value
        src = _source(r)
        if wanted_source is not None:
            return (src.get("topic"), src.get("partition"), src.get("offset")) == wanted_source
        return (
            (topic is None or src.get("topic") == topic)
            and (field is None or _field(r) == field)
            and (customer is None or r.get("customer_id") == customer)
        )

    since_ms = _since_ms(since)
    with TopicReader(brokers_list, cfg.kafka.consumer_properties(), [name], 15) as reader:
        if wanted_source is not None:
            found = [r for r in reader.latest(lambda rs: any(map(matches, rs)), 2000, since_ms)
                     if matches(r)]  # fmt: skip
            if not found:
                logs.error(f"no dead letter for {source} on {name} ({reader.read:,} records read)")
                raise typer.Exit(EXIT_NOT_FOUND)
            sys.stdout.write(
                orjson.dumps(found[-1].value, option=orjson.OPT_INDENT_2).decode() + "\n"
            )
            return
        with contextlib.suppress(KeyboardInterrupt):
            _show_records(reader, matches, last, limit, follow, as_json, since_ms,
                          _dead_letter_table(name))  # fmt: skip


def _parse_source(text: str) -> tuple[str, int, int]:
    topic, _, rest = text.rpartition(":")
    name, _, partition = topic.rpartition(":")
    if not name or not partition.isdigit() or not rest.isdigit():
        raise _fail(f"--source takes TOPIC:PARTITION:OFFSET, got {text!r}")
    return name, int(partition), int(rest)


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
    everything that moves with time derived as of one time. Exit code 1 when Redis holds
    nothing for the customer.

    Example: crmstream profile c0000042 --redis-url redis://localhost:6379/0

      crmstream profile cdnow-00008 --as-of 1997-12-31 --redis-url redis://localhost:6379/0
    """
    from crmstream.profile import ProfileError, customer_view, render
    from crmstream.state.store import StateStore, connect

    cfg = _config(config, set_, redis_url=redis_url)
    url = need_redis(cfg, "profile")
    when = parse_as_of(as_of)
    store = StateStore(connect(url, cfg.redis), cfg.redis.key_prefix)
    try:
        view = customer_view(store, cfg, customer_id, when)
    except ProfileError as exc:
        raise _fail(str(exc)) from None
    if view is None:
        logs.error(
            f"no state for customer {customer_id!r} under key prefix {cfg.redis.key_prefix!r}"
        )
        raise typer.Exit(EXIT_NOT_FOUND)
    if as_json:
        sys.stdout.write(orjson.dumps(view, option=orjson.OPT_INDENT_2).decode() + "\n")
    else:
        console().print(render(view))

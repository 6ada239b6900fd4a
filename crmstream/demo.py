"""``crmstream demo``: the whole system on a laptop, in accelerated shop time, shown live.

This module owns the demo's orchestration: infrastructure (embedded unless
configured), the flow in a background thread, the workload generator with the
scripted storyline customers (``bench.storylines``), a live table fed by an
independent consumer of the trigger and suppression topics, and a summary of
every trigger type at the end.

Shop time runs ``speed`` times as fast as the wall clock (a day per second by
default): the generator stamps events with a ``ShopClock`` and the flow runs
on the same clock, so its idle watermark follows shop time and an hour's cart
delay, a 30-day win-back or a birthday reminder passes in seconds. Nothing in
the flow knows it is a demo. The run ends by itself after ``duration``/``events``;
Ctrl-C ends it early. Either way the flow is drained or stopped and the embedded
servers are stopped.
"""

from __future__ import annotations

import re
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import orjson
from confluent_kafka import Consumer, KafkaError, TopicPartition
from rich.console import Console, Group
from rich.live import Live
from rich.table import Table

from crmstream.bench.storylines import storyline_base, storylines
from crmstream.bench.workload import PublishStats, Workload, WorkloadSpec, publish
from crmstream.clients import librdkafka_config
from crmstream.config import CrmConfig
from crmstream.embedded import infrastructure
from crmstream.flows.crm import run_in_process
from crmstream.flows.runtime import Runtime, ShopClock
from crmstream.flows.source import StopSignals
from crmstream.metrics import counter_total, get_metrics, serve
from crmstream.native_output import native_stderr_as_logs
from crmstream.profile import customer_view, render
from crmstream.topics import partitions_of

_SPEED = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*$")
_UNIT_S = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_speed(text: str) -> float:
    """Shop seconds per wall-clock second: ``1d`` (86400), ``6h``, ``30m``, or a factor."""
    match = _SPEED.match(text)
    if match is None or float(match.group(1)) <= 0:
        raise ValueError(f"--speed takes a duration per second (1d, 6h, 30m) or a factor > 0, "
                         f"got {text!r}")  # fmt: skip
    return float(match.group(1)) * _UNIT_S[match.group(2)]


@dataclass
class DemoOptions:
    duration_s: float | None = 30.0
    events: int | None = None
    rate: float = 2000.0
    customers: int = 2000
    malformed_rate: float = 0.002
    seed: int = 7
    speed: float = 86400.0  # shop seconds per wall-clock second
    storylines: bool = True


@dataclass
class _Tally:
    triggers: Counter[str] = field(default_factory=Counter)
    suppressions: Counter[str] = field(default_factory=Counter)
    per_customer: Counter[str] = field(default_factory=Counter)
    recent: deque[dict[str, Any]] = field(default_factory=lambda: deque(maxlen=12))
    deferred: int = 0
    dead_letters: int = 0


METADATA_TIMEOUT_S = 30.0


def _output_consumer(brokers: list[str], config: CrmConfig) -> Consumer:
    consumer = Consumer(
        {
            "group.id": "crmstream-demo-viewer",
            "enable.auto.commit": False,
            **librdkafka_config(brokers, config.kafka.consumer_properties()),
        }
    )
    topics = config.kafka.topics
    parts = []
    try:
        for topic in (topics.triggers, topics.suppressions, topics.dead_letter):
            ids = partitions_of(consumer, topic, METADATA_TIMEOUT_S)
            parts += [TopicPartition(topic, p, 0) for p in ids]
        consumer.assign(parts)
    except BaseException:
        consumer.close()
        raise
    return consumer


def _drain_outputs(consumer: Consumer, config: CrmConfig, tally: _Tally, wait_s: float) -> int:
    topics = config.kafka.topics
    got = 0
    for msg in consumer.consume(500, wait_s):
        if msg.error() is not None:
            if msg.error().code() != KafkaError._PARTITION_EOF:
                raise RuntimeError(f"reading outputs: {msg.error().str()}")
            continue
        got += 1
        if msg.topic() == topics.dead_letter:
            tally.dead_letters += 1
            continue
        record = orjson.loads(msg.value())
        if msg.topic() == topics.suppressions:
            tally.suppressions[record["policy"]] += 1
            record["_outcome"] = f"suppressed: {record['policy']}"
        else:
            tally.triggers[record["trigger_type"]] += 1
            tally.per_customer[record["customer_id"]] += 1
            deferred = record.get("deferred")
            if deferred:
                tally.deferred += 1
                record["_outcome"] = f"held until {str(deferred.get('until', ''))[11:16]} UTC"
            else:
                record["_outcome"] = "sent"
        tally.recent.appendleft(record)
    return got


def _view(tally: _Tally, published: int, processed: float, elapsed: float, shop_ms: int) -> Group:
    live = Table(title="latest triggers and suppressions", expand=True)
    for col in ("event time (shop)", "type", "customer", "outcome", "why"):
        live.add_column(col, overflow="fold")
    for rec in tally.recent:
        reason = rec.get("candidate") if "policy" in rec else rec.get("reason")
        values = (reason or {}).get("values", {}) if isinstance(reason, dict) else {}
        why = ", ".join(f"{k}={v}" for k, v in list(values.items())[:3])
        live.add_row(str(rec.get("event_time", ""))[:16], rec["trigger_type"], rec["customer_id"],
                     rec.get("_outcome", ""), why)  # fmt: skip
    stats = Table.grid(padding=(0, 3))
    stats.add_row(
        f"[bold]{elapsed:5.1f} s[/]",
        f"shop time [bold]{_shop(shop_ms)}[/]",
        f"published [bold]{published:,}[/]",
        f"processed [bold]{int(processed):,}[/]",
        f"triggers [bold]{sum(tally.triggers.values()):,}[/] "
        f"([bold]{len(tally.triggers)}[/] of 13 types)",
        f"held [bold]{tally.deferred:,}[/]",
        f"suppressed [bold]{sum(tally.suppressions.values()):,}[/]",
        f"dead letters [bold]{tally.dead_letters:,}[/]",
    )
    return Group(stats, live)


def _shop(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%a %d %b %H:%M")


def run_demo(config: CrmConfig, options: DemoOptions, console: Console) -> dict[str, Any]:
    """Run the demo; returns the summary it prints."""
    signals = StopSignals(threading.Event(), threading.Event())
    shop = ShopClock(options.speed)
    with infrastructure(config) as endpoints:
        console.print(f"broker {','.join(endpoints.brokers)}  redis {endpoints.redis_url}")
        console.print(f"shop time runs {_speed_text(options.speed)}, from {_shop(shop.start_ms)}")
        if config.metrics.enabled:
            port = serve(config.metrics.bind_address, 0)
            console.print(f"metrics http://{config.metrics.bind_address}:{port}/metrics")
        runtime = Runtime(config, endpoints, shop)
        flow_error: list[BaseException] = []

        def flow_main() -> None:
            try:
                run_in_process(runtime, tail=True, signals=signals)
            except BaseException as exc:  # surfaced in the main thread
                flow_error.append(exc)

        gen, published, stats = _generator(config, options, endpoints, shop, signals.stop)
        flow = threading.Thread(target=flow_main, name="crmstream-flow", daemon=True)
        consumer = _output_consumer(endpoints.brokers, config)
        tally = _Tally()
        metrics = get_metrics()
        started = time.monotonic()

        def refresh(live: Live) -> None:
            processed = counter_total(metrics.events_in)
            live.update(_view(tally, published[0], processed, time.monotonic() - started, shop()))

        flow.start()
        gen.start()
        try:
            with native_stderr_as_logs(), Live(console=console, refresh_per_second=4) as live:
                while flow.is_alive():
                    if not gen.is_alive():
                        signals.drain.set()  # read to the end of input, then stop
                    _drain_outputs(consumer, config, tally, 0.25)
                    refresh(live)
                while _drain_outputs(consumer, config, tally, 1.0):
                    pass
                refresh(live)
        except KeyboardInterrupt:
            console.print("[yellow]interrupted: stopping the flow and the local servers[/]")
            signals.stop.set()
            flow.join(30)
            gen.join(30)
            raise
        finally:
            consumer.close()
        elapsed = time.monotonic() - started
        gen.join()
        if flow_error:
            raise flow_error[0]
        summary = _summary(config, tally, stats, published[0], elapsed, shop, metrics)
        _print_summary(console, summary)
        if tally.per_customer:
            top, _n = tally.per_customer.most_common(1)[0]
            view = customer_view(runtime.store, config, top, shop())
            if view is not None:
                console.print(render(view))
        runtime.close()
        return summary


def _generator(
    config: CrmConfig,
    options: DemoOptions,
    endpoints: Any,
    shop: ShopClock,
    stop: threading.Event,
) -> tuple[threading.Thread, list[int], list[PublishStats]]:
    """The workload generator's thread (not started), events published so far, and its
    result: the random shop on the shop clock, and the storyline customers."""
    published = [0]
    stats: list[PublishStats] = []
    spec = WorkloadSpec(customers=options.customers, seed=options.seed,
                        malformed_rate=options.malformed_rate)  # fmt: skip
    workload = Workload(config, spec)
    cast = storylines(storyline_base(shop.start_ms)) if options.storylines else []

    def generator_main() -> None:
        stats.append(
            publish(
                endpoints.brokers,
                config,
                workload,
                max_events=options.events,
                duration_s=options.duration_s,
                rate=options.rate,
                live_time=True,
                stop=stop,
                on_progress=lambda n: published.__setitem__(0, n),
                clock=shop,
                scripted=cast,
            )
        )

    thread = threading.Thread(target=generator_main, name="crmstream-generator", daemon=True)
    return thread, published, stats


def _speed_text(speed: float) -> str:
    if speed == 1:
        return "in real time"
    for unit, seconds in (("day", 86400), ("hour", 3600), ("minute", 60)):
        if speed >= seconds:
            return f"{speed / seconds:g} {unit}(s) per second"
    return f"{speed:g} times as fast as the wall clock"


def _summary(
    config: CrmConfig,
    tally: _Tally,
    stats: list[PublishStats],
    published: int,
    elapsed: float,
    shop: ShopClock,
    metrics: Any,
) -> dict[str, Any]:
    processed = counter_total(metrics.events_in)
    kinds = list(type(config.rules).model_fields)
    return {
        "seconds": round(elapsed, 1),
        "shop_days": round((shop() - shop.start_ms) / 86_400_000, 1),
        "events_published": stats[0].events if stats else published,
        "events_processed": int(processed),
        "events_per_second": round(processed / elapsed, 1) if elapsed else 0.0,
        "trigger_types_seen": f"{sum(1 for k in kinds if tally.triggers[k])} of {len(kinds)}",
        "triggers_by_type": {kind: tally.triggers[kind] for kind in kinds},
        "held_for_quiet_hours": tally.deferred,
        "suppressions_by_policy": dict(sorted(tally.suppressions.items())),
        "dead_letters": tally.dead_letters,
    }


def _print_summary(console: Console, summary: dict[str, Any]) -> None:
    table = Table(title="demo summary", show_header=False)
    for key, value in summary.items():
        if key == "triggers_by_type":
            for kind, count in value.items():
                table.add_row(f"  {kind}", f"{count:,}" if count else "[dim]0[/]")
            continue
        if isinstance(value, dict):
            text = ", ".join(f"{k}: {v:,}" for k, v in value.items()) or "none"
        elif isinstance(value, int | float):
            text = f"{value:,}"
        else:
            text = str(value)
        table.add_row(key, text)
    console.print(table)

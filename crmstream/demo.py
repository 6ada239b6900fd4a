"""``crmstream demo``: the whole system on a laptop, with triggers shown live.

This module owns the demo's orchestration: infrastructure (embedded unless
configured), the flow in a background thread, the workload generator at a
target rate with live event times, a live table fed by an independent
consumer of the trigger topic, and a summary at the end. The run ends by
itself after ``duration``/``events``; Ctrl-C ends it early. Either way the
flow is drained or stopped and the embedded servers are stopped.
"""

from __future__ import annotations

import threading
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any

import orjson
from confluent_kafka import Consumer, KafkaError, TopicPartition
from rich.console import Console, Group
from rich.live import Live
from rich.table import Table

from crmstream.bench.workload import PublishStats, Workload, WorkloadSpec, publish
from crmstream.clients import librdkafka_config
from crmstream.config import CrmConfig
from crmstream.embedded import infrastructure
from crmstream.flows.crm import run_in_process
from crmstream.flows.runtime import Runtime
from crmstream.flows.source import StopSignals
from crmstream.metrics import counter_total, get_metrics, serve
from crmstream.profile import customer_view, render
from crmstream.topics import partitions_of


@dataclass
class DemoOptions:
    duration_s: float | None = 30.0
    events: int | None = None
    rate: float = 2000.0
    customers: int = 2000
    malformed_rate: float = 0.002
    seed: int = 7


@dataclass
class _Tally:
    triggers: Counter[str] = field(default_factory=Counter)
    per_customer: Counter[str] = field(default_factory=Counter)
    recent: deque[dict[str, Any]] = field(default_factory=lambda: deque(maxlen=12))
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
    topics = [config.kafka.topics.triggers, config.kafka.topics.dead_letter]
    parts = []
    try:
        for topic in topics:
            ids = partitions_of(consumer, topic, METADATA_TIMEOUT_S)
            parts += [TopicPartition(topic, p, 0) for p in ids]
        consumer.assign(parts)
    except BaseException:
        consumer.close()
        raise
    return consumer


def _drain_outputs(consumer: Consumer, config: CrmConfig, tally: _Tally, wait_s: float) -> int:
    got = 0
    for msg in consumer.consume(500, wait_s):
        if msg.error() is not None:
            if msg.error().code() != KafkaError._PARTITION_EOF:
                raise RuntimeError(f"reading outputs: {msg.error().str()}")
            continue
        got += 1
        if msg.topic() == config.kafka.topics.dead_letter:
            tally.dead_letters += 1
            continue
        record = orjson.loads(msg.value())
        tally.triggers[record["trigger_type"]] += 1
        tally.per_customer[record["customer_id"]] += 1
        tally.recent.appendleft(record)
    return got


def _view(tally: _Tally, published: int, processed: float, elapsed: float) -> Group:
    live = Table(title="latest triggers", expand=True)
    for col in ("emitted_at", "type", "customer", "why"):
        live.add_column(col, overflow="fold")
    for rec in tally.recent:
        why = ", ".join(f"{k}={v}" for k, v in rec["reason"]["values"].items())
        live.add_row(rec["emitted_at"][11:23], rec["trigger_type"], rec["customer_id"], why)
    stats = Table.grid(padding=(0, 3))
    stats.add_row(
        f"[bold]{elapsed:5.1f} s[/]",
        f"published [bold]{published:,}[/]",
        f"processed [bold]{int(processed):,}[/]",
        f"triggers [bold]{sum(tally.triggers.values()):,}[/]",
        f"dead letters [bold]{tally.dead_letters:,}[/]",
    )
    return Group(stats, live)


def run_demo(config: CrmConfig, options: DemoOptions, console: Console) -> dict[str, Any]:
    """Run the demo; returns the summary it prints."""
    signals = StopSignals(threading.Event(), threading.Event())
    with infrastructure(config) as endpoints:
        console.print(f"broker {','.join(endpoints.brokers)}  redis {endpoints.redis_url}")
        if config.metrics.enabled:
            port = serve(config.metrics.bind_address, 0)
            console.print(f"metrics http://{config.metrics.bind_address}:{port}/metrics")
        runtime = Runtime(config, endpoints)
        flow_error: list[BaseException] = []

        def flow_main() -> None:
            try:
                run_in_process(runtime, tail=True, signals=signals)
            except BaseException as exc:  # surfaced in the main thread
                flow_error.append(exc)

        published = [0]
        stats: list[PublishStats] = []
        workload = Workload(
            config,
            WorkloadSpec(
                customers=options.customers,
                seed=options.seed,
                malformed_rate=options.malformed_rate,
            ),
        )

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
                    stop=signals.stop,
                    on_progress=lambda n: published.__setitem__(0, n),
                )
            )

        flow = threading.Thread(target=flow_main, name="crmstream-flow", daemon=True)
        gen = threading.Thread(target=generator_main, name="crmstream-generator", daemon=True)
        consumer = _output_consumer(endpoints.brokers, config)
        tally = _Tally()
        metrics = get_metrics()
        started = time.monotonic()

        def refresh(live: Live) -> None:
            processed = counter_total(metrics.events_in)
            live.update(_view(tally, published[0], processed, time.monotonic() - started))

        flow.start()
        gen.start()
        try:
            with Live(console=console, refresh_per_second=4, transient=False) as live:
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
        processed = counter_total(metrics.events_in)
        summary = {
            "seconds": round(elapsed, 1),
            "events_published": stats[0].events if stats else published[0],
            "events_processed": int(processed),
            "events_per_second": round(processed / elapsed, 1) if elapsed else 0.0,
            "triggers_by_type": dict(tally.triggers),
            "dead_letters": tally.dead_letters,
        }
        table = Table(title="demo summary", show_header=False)
        for key, value in summary.items():
            table.add_row(
                key,
                ", ".join(f"{k}: {v}" for k, v in value.items())
                if isinstance(value, dict)
                else f"{value:,}",
            )
        console.print(table)
        if tally.per_customer:
            top, _n = tally.per_customer.most_common(1)[0]
            view = customer_view(runtime.store, config, top)
            if view is not None:
                console.print(render(view))
        runtime.close()
        return summary

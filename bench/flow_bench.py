"""Flow throughput against the raw consume-and-parse ceiling, measured in one run.

This module owns the foundation benchmark (``make bench``). It writes one
recorded shop workload to the input topics once, then reads those same topics
twice on the same broker and Redis:

1. ceiling: a confluent-kafka consumer that polls every input partition and
   ``orjson.loads`` each value, nothing else (one process, like the flow);
2. crmstream: the full flow (parse, validate, route, Redis load, kernel,
   triggers, delivery-checked produce, atomic commit) to the end of input.

``--exactly-once-cost`` adds a run without the exactly-once machinery;
``--gc-cost`` adds runs with Python's own garbage-collector settings, one
before and one after the main run, and reports the seconds each spent in the
collector. ``--front-only`` adds a run of the flow's front half alone: it
reads, validates and routes as the flow does and hands each shard its steps,
which the shard drops instead of applying. That is what the flow could reach
if the state step cost nothing. ``--io-floor`` adds a run in which each shard's
step does only the Redis I/O that DESIGN.md's state of record asks of it: one
load of the step's customers' state and one MULTI/EXEC writing it back with the
shard's input positions (a new customer gets a fresh record), and nothing else:
no kernels, timers, triggers, policies or profiles. That is what the flow could
reach if all of its computing cost nothing. Every extra run has its own Redis
prefix and output topics. ``--fetch-bytes`` gives the ceiling's and every
flow's consumer the fetch size ``make bench-all`` gives its contenders.

It prints events/s for all, their ratio, and the CPU time per event of the
process (time spent waiting for a shared CPU does not count in it), and writes
bench/out/flow.json.
Figures are only comparable within one run; the machine is shared and noisy.
"""

from __future__ import annotations

import argparse
import gc
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import orjson
from rich.console import Console
from rich.table import Table

from crmstream.bench.workload import Workload, WorkloadSpec, publish
from crmstream.config import CrmConfig, load_config
from crmstream.embedded import EmbeddedStack
from crmstream.flows.crm import run_in_process
from crmstream.flows.runtime import Endpoints, Runtime
from crmstream.flows.sequencer import Step
from crmstream.flows.shard import ShardLogic
from crmstream.flows.shard_step import Changes, ShardStep
from crmstream.flows.step_work import Work
from crmstream.metrics import counter_total, get_metrics
from crmstream.operators.kernels import warm_up
from crmstream.state.encoding import encode_records, fresh_records
from crmstream.topics import create_topics

# Python's own thresholds, read before any flow is built (build_flow applies tune_gc).
PYTHON_GC_THRESHOLDS = gc.get_threshold()


class Run(NamedTuple):
    messages: int
    seconds: float
    cpu_seconds: float  # CPU time of this process (all its threads) while it ran


def raw_consume_parse(endpoints: Endpoints, config: CrmConfig) -> Run:
    """Read every input partition to its end, parsing each value."""
    from crmstream.bench.harness import consume_and_parse

    fetch_bytes = int(config.kafka.consumer_properties().get("max.partition.fetch.bytes", 0))
    report = consume_and_parse(
        ",".join(endpoints.brokers), list(config.kafka.topics.inputs), fetch_bytes=fetch_bytes
    )
    return Run(report["events"], report["seconds"], report["cpu_seconds"])


def flow_run(endpoints: Endpoints, config: CrmConfig) -> Run:
    """Run the flow to the end of input."""
    metrics = get_metrics()

    def handled() -> float:
        return counter_total(metrics.events_in, metrics.invalid_events)

    before = handled()
    runtime = Runtime(config, endpoints)
    warm_up(config)  # compile/load kernels first: measure the steady state, not Numba's start-up
    started, cpu_started = time.perf_counter(), time.process_time()
    run_in_process(runtime, tail=False)
    seconds, cpu_seconds = time.perf_counter() - started, time.process_time() - cpu_started
    runtime.close()
    return Run(int(handled() - before), seconds, cpu_seconds)


def front_run(endpoints: Endpoints, config: CrmConfig) -> Run:
    """The flow with each shard dropping its steps (counted) instead of applying them."""
    dropped = 0
    apply_step = ShardLogic._apply

    def drop(shard: ShardLogic, step: Step) -> list[dict[str, int]]:
        nonlocal dropped
        dropped += len(step.events) + len(step.invalid)
        return []

    ShardLogic._apply = drop  # type: ignore[method-assign]
    try:
        run = flow_run(endpoints, config)
    finally:
        ShardLogic._apply = apply_step  # type: ignore[method-assign]
    return run._replace(messages=dropped)


def io_floor_run(endpoints: Endpoints, config: CrmConfig) -> Run:
    """The flow with each shard's step reduced to its state's Redis round trips: load the
    step's customers, write their state back with the positions in one MULTI/EXEC."""
    applied, customers_seen = 0, set()
    apply = ShardStep._apply

    def io_only(
        shard: ShardStep, events: list, with_events: list, members: list, *_ignored: Any
    ) -> Changes:
        nonlocal applied
        applied += len(events)
        customers = list(dict.fromkeys([ev.customer_id for ev in events]))
        customers_seen.update(customers)
        blobs, _promises = shard._rt.store.load_states(customers)
        new = sum(b is None for b in blobs)
        fresh = iter(encode_records(fresh_records(new)))
        states = {c: next(fresh) if b is None else b for c, b in zip(customers, blobs, strict=True)}
        return Changes(Work.only_states(states, new))

    ShardStep._apply = io_only  # type: ignore[method-assign]
    try:  # the run counts the invalid messages only: io_only counts no event in
        run = flow_run(endpoints, config)
    finally:
        ShardStep._apply = apply  # type: ignore[method-assign]
    # Every customer's state was written, and counted once as new.
    runtime = Runtime(config, endpoints)
    store, keys = runtime.store, sorted(customers_seen)
    written = sum(
        store.client.exists(*[store.state_key(c) for c in keys[i : i + 10_000]])
        for i in range(0, len(keys), 10_000)
    )
    counted = sum(int(n) for n in store.client.hvals(store.customers_key()))
    runtime.close()
    if not written == counted == len(keys):
        raise SystemExit(
            f"the I/O floor run saw {len(keys)} customers but wrote {written} states "
            f"and counted {counted}"
        )
    return run._replace(messages=run.messages + applied)


class CollectorClock:
    """Seconds the cyclic garbage collector ran while installed (``gc.callbacks``)."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self._started = 0.0

    def __call__(self, phase: str, _info: dict) -> None:
        if phase == "start":
            self._started = time.perf_counter()
        else:
            self.seconds += time.perf_counter() - self._started

    def timed(self, run: Callable[[], Run]) -> tuple[Run, float]:
        """One run, and the seconds it spent in the collector."""
        self.seconds = 0.0
        gc.callbacks.append(self)
        try:
            result = run()
        finally:
            gc.callbacks.remove(self)
        return result, self.seconds


def _variant(endpoints: Endpoints, base: list[str], name: str, *sets: str) -> CrmConfig:
    """The ``base`` configuration with its own key prefix and output topics (created), plus
    ``sets``."""
    config = load_config(
        None,
        [
            *base,
            f"redis.key_prefix={name}",
            f"kafka.topics.triggers=triggers-{name}",
            f"kafka.topics.suppressions=suppressions-{name}",
            f"kafka.topics.dead_letter=dead-letter-{name}",
            *sets,
        ],
    )
    create_topics(endpoints.brokers, config)
    return config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument("--customers", type=int, default=20_000)
    parser.add_argument("--partitions", type=int, default=4)
    parser.add_argument(
        "--fetch-bytes",
        type=int,
        default=0,
        help="max.partition.fetch.bytes of the ceiling's and every flow's consumer, as "
        "`make bench-all` gives them (8388608); 0: librdkafka's default",
    )
    parser.add_argument("--out", type=Path, default=Path("bench/out/flow.json"))
    parser.add_argument(
        "--exactly-once-cost",
        action="store_true",
        help="also run the flow with processing.exactly_once=false (fresh state) and compare",
    )
    parser.add_argument(
        "--gc-cost",
        action="store_true",
        help="also run the flow with Python's own GC settings (processing.gc_young_threshold=0, "
        "fresh state) before and after the main run, and compare",
    )
    parser.add_argument(
        "--front-only",
        action="store_true",
        help="also run the flow's front half alone (read, validate, route; each shard drops "
        "its steps): the bound a free state step would leave",
    )
    parser.add_argument(
        "--io-floor",
        action="store_true",
        help="also run the flow with each shard's step doing only its state's Redis I/O "
        "(load, then write back with the positions in one MULTI/EXEC): the bound if all "
        "computing in the step cost nothing",
    )
    args = parser.parse_args()
    console = Console()
    base = [f"kafka.partitions={args.partitions}"]
    if args.fetch_bytes:
        base.append(f"kafka.consumer.max.partition.fetch.bytes={args.fetch_bytes}")
    config = load_config(None, base)
    with EmbeddedStack(config) as stack:
        assert stack.endpoints is not None
        endpoints = stack.endpoints
        workload = Workload(config, WorkloadSpec(customers=args.customers))
        console.print(f"writing {args.events:,} events for {args.customers:,} customers ...")
        stats = publish(endpoints.brokers, config, workload, max_events=args.events)
        console.print("ceiling: raw consume + parse ...")
        raw = raw_consume_parse(endpoints, config)
        clock = CollectorClock()
        untuned: list[tuple[Run, float]] = []

        def python_gc_run(label: str) -> None:
            console.print(f"crmstream flow with Python's GC settings ({label}) ...")
            gc.unfreeze()  # undo an earlier run's tune_gc: this run is Python's defaults
            gc.set_threshold(*PYTHON_GC_THRESHOLDS)
            cfg = _variant(endpoints, base, f"gc-{label}", "processing.gc_young_threshold=0")
            untuned.append(clock.timed(lambda: flow_run(endpoints, cfg)))

        if args.gc_cost:
            python_gc_run("before")
        console.print("crmstream flow ...")
        flow, flow_gc_s = clock.timed(lambda: flow_run(endpoints, config))
        if args.gc_cost:
            python_gc_run("after")
        loose = None
        if args.exactly_once_cost:
            console.print("crmstream flow without the exactly-once machinery ...")
            loose_config = _variant(
                endpoints, base, "at-least-once", "processing.exactly_once=false"
            )
            loose = flow_run(endpoints, loose_config)
        front = None
        if args.front_only:
            console.print("the flow's front half alone (each shard drops its steps) ...")
            front = front_run(endpoints, _variant(endpoints, base, "front"))
            if front.messages != raw.messages:
                raise SystemExit(
                    f"the front half dropped {front.messages} messages in its steps "
                    f"but the topics hold {raw.messages}"
                )
        io_floor = None
        if args.io_floor:
            console.print(
                "the state I/O floor: the flow with only its state's Redis I/O in the step ..."
            )
            io_floor = io_floor_run(endpoints, _variant(endpoints, base, "io-floor"))
            if io_floor.messages != raw.messages:
                raise SystemExit(
                    f"the I/O floor run handled {io_floor.messages} messages "
                    f"but the topics hold {raw.messages}"
                )
    raw_rate, flow_rate = raw.messages / raw.seconds, flow.messages / flow.seconds
    table = Table(title=f"foundation benchmark: {stats.events:,} events, 1 process")
    columns = ("contender", "messages", "seconds", "events/s", "ratio to ceiling", "CPU µs/event")
    for col in columns:
        table.add_column(col, justify="right")

    def add_row(label: str, run: Run) -> None:
        rate = run.messages / run.seconds
        table.add_row(
            label,
            f"{run.messages:,}",
            f"{run.seconds:.2f}",
            f"{rate:,.0f}",
            f"{rate / raw_rate:.3f}",
            f"{run.cpu_seconds / run.messages * 1e6:.1f}",
        )

    add_row("raw consume+parse", raw)
    add_row("crmstream flow", flow)
    if loose is not None:
        add_row("crmstream, at-least-once", loose)
    if front is not None:
        add_row("front half alone", front)
    if io_floor is not None:
        add_row("state I/O floor", io_floor)
    for label, (run, _) in zip(("before", "after")[: len(untuned)], untuned, strict=True):
        add_row(f"Python's GC settings ({label})", run)
    console.print(table)
    console.print(
        "CPU µs/event: CPU time of the process (librdkafka's and Bytewax's threads "
        "included) per message; time spent waiting for the CPU does not count."
    )
    if untuned:
        console.print(
            f"seconds in the garbage collector: {flow_gc_s:.2f} with "
            f"processing.gc_young_threshold={config.processing.gc_young_threshold}, "
            + ", ".join(f"{g:.2f}" for _, g in untuned)
            + " with Python's settings"
        )
    if loose is not None:
        loose_rate = loose.messages / loose.seconds
        console.print(
            f"exactly-once costs {1 - flow_rate / loose_rate:.1%} of at-least-once throughput "
            f"(exactly-once / at-least-once = {flow_rate / loose_rate:.3f})"
        )
    result = {
        "events": stats.events,
        "customers": args.customers,
        "partitions": args.partitions,
        "fetch_bytes": args.fetch_bytes,
        "ceiling_events_per_s": round(raw_rate),
        "flow_events_per_s": round(flow_rate),
        "ratio": round(flow_rate / raw_rate, 4),
        "flow_messages": flow.messages,
        "ceiling_messages": raw.messages,
        "ceiling_cpu_us_per_event": round(raw.cpu_seconds / raw.messages * 1e6, 2),
        "flow_cpu_us_per_event": round(flow.cpu_seconds / flow.messages * 1e6, 2),
        "machine": f"{platform.machine()} {platform.python_version()}",
    }
    if loose is not None:
        result["at_least_once_events_per_s"] = round(loose.messages / loose.seconds)
    if front is not None:
        result["front_events_per_s"] = round(front.messages / front.seconds)
        result["front_cpu_us_per_event"] = round(front.cpu_seconds / front.messages * 1e6, 2)
    if io_floor is not None:
        result["io_floor_events_per_s"] = round(io_floor.messages / io_floor.seconds)
        result["io_floor_cpu_us_per_event"] = round(
            io_floor.cpu_seconds / io_floor.messages * 1e6, 2
        )
    result["flow_gc_seconds"] = round(flow_gc_s, 3)
    if untuned:
        result["python_gc_events_per_s"] = [round(r.messages / r.seconds) for r, _ in untuned]
        result["python_gc_seconds"] = [round(g, 3) for _, g in untuned]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(orjson.dumps(result, option=orjson.OPT_INDENT_2).decode())
    if flow.messages != raw.messages:
        raise SystemExit(
            f"flow handled {flow.messages} messages but the topics hold {raw.messages}"
        )


if __name__ == "__main__":
    main()

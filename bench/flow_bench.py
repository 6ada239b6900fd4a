"""Flow throughput against the raw consume-and-parse ceiling, measured in one run.

This module owns the foundation benchmark (``make bench``). It writes one
recorded shop workload to the input topics once, then reads those same topics
twice on the same broker and Redis:

1. ceiling: a confluent-kafka consumer that polls every input partition and
   ``orjson.loads`` each value, nothing else (one process, like the flow);
2. crmstream: the full flow (parse, validate, route, Redis load, kernel,
   triggers, delivery-checked produce, atomic commit) to the end of input.

It prints events/s for both and their ratio, and writes bench/out/flow.json.
Figures are only comparable within one run; the machine is shared and noisy.
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import orjson
from rich.console import Console
from rich.table import Table

from crmstream.bench.workload import Workload, WorkloadSpec, publish
from crmstream.config import CrmConfig, load_config
from crmstream.embedded import EmbeddedStack
from crmstream.flows.crm import run_in_process
from crmstream.flows.runtime import Endpoints, Runtime
from crmstream.metrics import counter_total, get_metrics
from crmstream.operators.kernels import warm_up
from crmstream.topics import create_topics


def raw_consume_parse(endpoints: Endpoints, config: CrmConfig) -> tuple[int, float]:
    """Read every input partition to its end, parsing each value; (messages, seconds)."""
    from crmstream.bench.harness import consume_and_parse

    report = consume_and_parse(",".join(endpoints.brokers), list(config.kafka.topics.inputs))
    return report["events"], report["seconds"]


def flow_run(endpoints: Endpoints, config: CrmConfig) -> tuple[int, float]:
    """Run the flow to the end of input; (messages handled, seconds)."""
    metrics = get_metrics()

    def handled() -> float:
        return counter_total(metrics.events_in, metrics.invalid_events)

    before = handled()
    runtime = Runtime(config, endpoints)
    warm_up(config)  # compile/load kernels first: measure the steady state, not Numba's start-up
    started = time.perf_counter()
    run_in_process(runtime, tail=False)
    seconds = time.perf_counter() - started
    runtime.close()
    return int(handled() - before), seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument("--customers", type=int, default=20_000)
    parser.add_argument("--partitions", type=int, default=4)
    parser.add_argument("--out", type=Path, default=Path("bench/out/flow.json"))
    parser.add_argument(
        "--exactly-once-cost",
        action="store_true",
        help="also run the flow with processing.exactly_once=false (fresh state) and compare",
    )
    args = parser.parse_args()
    console = Console()
    config = load_config(None, [f"kafka.partitions={args.partitions}"])
    with EmbeddedStack(config) as stack:
        assert stack.endpoints is not None
        endpoints = stack.endpoints
        workload = Workload(config, WorkloadSpec(customers=args.customers))
        console.print(f"writing {args.events:,} events for {args.customers:,} customers ...")
        stats = publish(endpoints.brokers, config, workload, max_events=args.events)
        console.print("ceiling: raw consume + parse ...")
        raw_n, raw_s = raw_consume_parse(endpoints, config)
        console.print("crmstream flow ...")
        flow_n, flow_s = flow_run(endpoints, config)
        loose = None
        if args.exactly_once_cost:
            console.print("crmstream flow without the exactly-once machinery ...")
            loose_config = load_config(
                None,
                [
                    f"kafka.partitions={args.partitions}",
                    "redis.key_prefix=at-least-once",
                    "kafka.topics.triggers=triggers-alo",
                    "kafka.topics.suppressions=suppressions-alo",
                    "kafka.topics.dead_letter=dead-letter-alo",
                    "processing.exactly_once=false",
                ],
            )
            create_topics(endpoints.brokers, loose_config)
            loose = flow_run(endpoints, loose_config)
    raw_rate, flow_rate = raw_n / raw_s, flow_n / flow_s
    table = Table(title=f"foundation benchmark: {stats.events:,} events, 1 process")
    for col in ("contender", "messages", "seconds", "events/s", "ratio to ceiling"):
        table.add_column(col, justify="right")
    table.add_row("raw consume+parse", f"{raw_n:,}", f"{raw_s:.2f}", f"{raw_rate:,.0f}", "1.00")
    table.add_row(
        "crmstream flow",
        f"{flow_n:,}",
        f"{flow_s:.2f}",
        f"{flow_rate:,.0f}",
        f"{flow_rate / raw_rate:.3f}",
    )
    if loose is not None:
        loose_rate = loose[0] / loose[1]
        table.add_row(
            "crmstream, at-least-once",
            f"{loose[0]:,}",
            f"{loose[1]:.2f}",
            f"{loose_rate:,.0f}",
            f"{loose_rate / raw_rate:.3f}",
        )
    console.print(table)
    if loose is not None:
        console.print(
            f"exactly-once costs {1 - flow_rate / loose_rate:.1%} of at-least-once throughput "
            f"(exactly-once / at-least-once = {flow_rate / loose_rate:.3f})"
        )
    result = {
        "events": stats.events,
        "customers": args.customers,
        "partitions": args.partitions,
        "ceiling_events_per_s": round(raw_rate),
        "flow_events_per_s": round(flow_rate),
        "ratio": round(flow_rate / raw_rate, 4),
        "flow_messages": flow_n,
        "ceiling_messages": raw_n,
        "machine": f"{platform.machine()} {platform.python_version()}",
    }
    if loose is not None:
        result["at_least_once_events_per_s"] = round(loose[0] / loose[1])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(orjson.dumps(result, option=orjson.OPT_INDENT_2).decode())
    if flow_n != raw_n:
        raise SystemExit(f"flow handled {flow_n} messages but the topics hold {raw_n}")


if __name__ == "__main__":
    main()

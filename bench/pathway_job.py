"""The Pathway contender: the part of the CRM job Pathway's built-in reducers reach.

Pathway (``pathway`` on PyPI) reads each input topic with its Kafka reader
(JSON, a typed schema), concatenates them, and keeps per customer, with
built-in reducers only: counts by event type (a groupby on customer and type),
carts, orders, spend (the amounts of ``order_placed``) and the last event
time. A customer with 2 or more carts and no order gets one trigger
(``deduplicate`` keeps the first qualifying row of each customer) on the
trigger topic; its ``event_time`` is the customer's last event time then, and
the harness reads the latency from the record's Kafka timestamp. Differences
from crmstream: bench/README.md.

It runs in its own virtualenv (``.venv-pathway``: Pathway brings about a
hundred packages crmstream does not use), so it imports nothing from
crmstream. The number of Pathway worker threads comes from ``PATHWAY_THREADS``.
Run: python bench/pathway_job.py --brokers H:P --topics a,b --triggers T
[--expect-rows N] [--autocommit-ms MS] [--fetch-bytes N]. With
``--expect-rows`` it ends once that many rows are in and no more came for
``--settle`` seconds, printing {"events": rows, "seconds": s, "cpu_seconds": c, ...}, timed from
``pw.run`` to the last row's update (``watch``); without, it runs until
killed (the latency runs).
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time

import pathway as pw


class Event(pw.Schema):
    customer_id: str
    event_type: str
    event_time: int
    amount: float | None = pw.column_definition(default_value=None)


def _count(kind: str) -> pw.ColumnExpression:
    return pw.reducers.sum(pw.if_else(pw.this.event_type == kind, 1, 0))


def build(args: argparse.Namespace, progress: dict[str, float]) -> None:
    """The dataflow: readers, per-customer state, the trigger output, and the row count
    the job watches to know it has read everything."""
    settings = {
        "bootstrap.servers": args.brokers,
        "group.id": args.group,
        "auto.offset.reset": "earliest",
        # Tansu, the test broker, forms a group in about a third of the session
        # timeout (20 s at librdkafka's default): 2 s keeps the join near 1 s.
        "session.timeout.ms": "2000",
        "heartbeat.interval.ms": "300",
        # The fetch settings every contender's consumer gets (bench/README.md).
        "fetch.wait.max.ms": "50",
        "fetch.queue.backoff.ms": "20",
    }
    if args.fetch_bytes:
        settings["max.partition.fetch.bytes"] = str(args.fetch_bytes)
    tables = [
        pw.io.kafka.read(
            settings,
            topic=topic,
            schema=Event,
            format="json",
            autocommit_duration_ms=args.autocommit_ms,
            name=f"read-{topic}",
        )
        for topic in args.topics.split(",")
    ]
    events = pw.Table.concat_reindex(*tables)
    by_type = events.groupby(pw.this.customer_id, pw.this.event_type).reduce(
        pw.this.customer_id, pw.this.event_type, events=pw.reducers.count()
    )
    customers = events.groupby(pw.this.customer_id).reduce(
        pw.this.customer_id,
        carts=_count("add_to_cart"),
        orders=_count("order_placed"),
        spend=pw.reducers.sum(
            pw.if_else(pw.this.event_type == "order_placed", pw.coalesce(pw.this.amount, 0.0), 0.0)
        ),
        last_event_time=pw.reducers.max(pw.this.event_time),
    )
    triggers = (
        customers.filter((pw.this.carts >= 2) & (pw.this.orders == 0))
        .deduplicate(
            value=pw.this.last_event_time,
            instance=pw.this.customer_id,
            acceptor=lambda new, old: False,  # the first qualifying row only
        )
        .select(
            pw.this.customer_id,
            trigger_type="high_intent_no_purchase",
            event_time=pw.this.last_event_time,
        )
    )
    pw.io.null.write(by_type)  # kept up to date, as the others keep theirs
    pw.io.kafka.write(triggers, {"bootstrap.servers": args.brokers}, args.triggers, format="json")
    total = events.reduce(rows=pw.reducers.count())

    def on_total(key, row, time, is_addition) -> None:  # Pathway calls it with these names
        if is_addition:
            now, cpu = _clock(), _cpu()
            if "first" not in progress:  # the first minibatch: start-up and group join before
                progress.update(first=now, first_rows=row["rows"], first_cpu=cpu)
            progress.update(rows=row["rows"], changed=now, cpu=cpu)

    pw.io.subscribe(total, on_change=on_total)


def _clock() -> float:
    return time.perf_counter()


def _cpu() -> float:
    return time.process_time()  # every thread of the process: Pathway's workers included


def watch(args: argparse.Namespace, progress: dict[str, float], started: list[float]) -> None:
    """End the process once ``--expect-rows`` rows are in and none came for ``--settle``
    seconds (Pathway's streaming reader never ends by itself), printing the report; or
    after ``--give-up`` seconds without a new row, with what it has."""
    while True:
        time.sleep(0.05)
        if not started:
            continue
        now, changed = _clock(), progress.get("changed", started[0])
        enough = progress.get("rows", 0) >= args.expect_rows
        if (enough and now - changed >= args.settle) or now - changed >= args.give_up:
            report = {
                # From pw.run() to the last row's update: Pathway's start-up and its
                # reader's consumer-group join are in it (first_update_s shows them).
                "events": int(progress.get("rows", 0)),
                "seconds": changed - started[0],
                "cpu_seconds": progress.get("cpu", started[1]) - started[1],
                "complete": enough,
                "first_update_s": progress.get("first", changed) - started[0],
                "first_update_rows": int(progress.get("first_rows", 0)),
                "started_at": started[2],
                "threads": int(os.environ.get("PATHWAY_THREADS", "1")),
                "fetch_bytes": args.fetch_bytes,
                "pathway_version": pw.__version__,
            }
            sys.stdout.write(_json(report) + "\n")
            sys.stdout.flush()
            os._exit(0 if enough else 3)


def _json(report: dict[str, object]) -> str:
    import json

    return json.dumps(report)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--brokers", required=True)
    parser.add_argument("--topics", required=True)
    parser.add_argument("--triggers", required=True)
    parser.add_argument("--group", default="pathway-bench")
    parser.add_argument("--expect-rows", type=int, default=0, help="0: run until killed")
    parser.add_argument(
        "--autocommit-ms",
        type=int,
        default=1500,
        help="Pathway's autocommit_duration_ms (its default 1500; the latency runs use less)",
    )
    parser.add_argument("--settle", type=float, default=1.0)
    parser.add_argument("--give-up", type=float, default=60.0)
    parser.add_argument(
        "--fetch-bytes", type=int, default=0, help="max.partition.fetch.bytes (0: librdkafka's)"
    )
    args = parser.parse_args()
    progress: dict[str, float] = {}
    build(args, progress)
    started: list[float] = []
    if args.expect_rows:
        threading.Thread(target=watch, args=(args, progress, started), daemon=True).start()
    started += [_clock(), _cpu(), time.time()]
    pw.run(monitoring_level=pw.MonitoringLevel.NONE, terminate_on_error=False)


if __name__ == "__main__":
    main()

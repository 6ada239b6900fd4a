"""Operator views of the output topics: tail the triggers, explain one trigger id.

This module owns reading the trigger and suppression topics for people: a
plain consumer that assigns every partition (no consumer group, so it never
disturbs downstream subscribers' offsets) and reads from the beginning.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any

import orjson
from confluent_kafka import Consumer, KafkaError, TopicPartition
from rich.console import Console
from rich.live import Live
from rich.table import Table

from crmstream.clients import librdkafka_config
from crmstream.config import CrmConfig
from crmstream.explanation import explanation_rows, headline
from crmstream.topics import TopicError, partitions_of


def reader_config(brokers: list[str], client: dict[str, Any]) -> dict[str, Any]:
    """The consumer configuration of ``read_records`` (``client``: the consumer's
    librdkafka properties)."""
    return {
        **librdkafka_config(brokers, client),
        "group.id": "crmstream-cli",  # required by librdkafka; assign() joins no group
        "enable.auto.commit": False,
        "enable.partition.eof": True,
    }


def read_records(
    brokers: list[str],
    client: dict[str, Any],
    topics: list[str],
    follow: bool,
    stop: Callable[[], bool] = lambda: False,
) -> Iterator[tuple[str, dict[str, Any] | None]]:
    """(topic, record) for every record of ``topics`` from the beginning; with ``follow``
    it then waits for new ones. A ``(topic, None)`` pair marks "all caught up"."""
    consumer = Consumer(reader_config(brokers, client))
    try:
        parts = []
        for topic in topics:
            try:
                ids = partitions_of(consumer, topic, 15)
            except TopicError as exc:
                raise SystemExit(str(exc)) from None
            parts += [TopicPartition(topic, p, 0) for p in ids]
        consumer.assign(parts)
        pending = {(p.topic, p.partition) for p in parts}
        caught_up = False
        while not stop():
            for msg in consumer.consume(500, 0.2):
                err = msg.error()
                if err is not None:
                    if err.code() == KafkaError._PARTITION_EOF:
                        pending.discard((msg.topic(), msg.partition()))
                    continue
                try:
                    yield msg.topic(), orjson.loads(msg.value())
                except orjson.JSONDecodeError:
                    continue
            if not pending and not caught_up:
                caught_up = True
                yield "", None
                if not follow:
                    return
    finally:
        consumer.close()


def matches(record: dict[str, Any], types: list[str], customer: str | None) -> bool:
    return (not types or record.get("trigger_type") in types) and (
        customer is None or record.get("customer_id") == customer
    )


def trigger_table(rows: deque[dict[str, Any]], title: str) -> Table:
    table = Table(title=title, expand=False)
    for col in ("event time", "type", "customer", "channel", "why", "trigger id"):
        table.add_column(col, overflow="fold")
    for r in rows:
        values = r.get("reason", {}).get("values", {})
        why = ", ".join(f"{k}={v}" for k, v in list(values.items())[:3])
        table.add_row(
            r.get("event_time", "")[:19],
            r.get("trigger_type", ""),
            r.get("customer_id", ""),
            r.get("channel") or "",
            why,
            r.get("trigger_id", "")[:12],
        )
    return table


def tail_triggers(
    config: CrmConfig,
    console: Console,
    follow: bool,
    types: list[str],
    customer: str | None,
    last: int,
    limit: int | None,
    as_json: bool,
) -> int:
    """Show the latest matching triggers; with ``follow``, keep the table live. Returns
    how many matching records were read."""
    topic = config.kafka.topics.triggers
    rows: deque[dict[str, Any]] = deque(maxlen=last)
    seen = 0
    title = (
        f"{topic}"
        + (f" type in {types}" if types else "")
        + (f" customer {customer}" if customer else "")
    )

    def done() -> bool:
        return limit is not None and seen >= limit

    records = read_records(
        list(config.kafka.brokers), config.kafka.consumer_properties(), [topic], follow, done
    )
    live: Live | None = None
    try:
        for _topic, record in records:
            if record is None:  # caught up: show what there is, then go live
                if not as_json:
                    if follow:
                        live = Live(
                            trigger_table(rows, title), console=console, refresh_per_second=4
                        )
                        live.start()
                    else:
                        console.print(trigger_table(rows, title))
                continue
            if not matches(record, types, customer):
                continue
            seen += 1
            if as_json:
                print(orjson.dumps(record).decode(), flush=True)
            rows.append(record)
            if live is not None:
                live.update(trigger_table(rows, title))
    finally:
        if live is not None:
            live.stop()
    return seen


def explain(config: CrmConfig, trigger_id: str, console: Console) -> bool:
    """Print why a trigger fired, or why it was suppressed or held; False when not found."""
    topics = config.kafka.topics
    found: list[tuple[str, dict[str, Any]]] = []
    started = time.monotonic()
    for topic, record in read_records(
        list(config.kafka.brokers),
        config.kafka.consumer_properties(),
        [topics.triggers, topics.suppressions],
        follow=False,
    ):
        if record is not None and record.get("trigger_id") == trigger_id:
            found.append((topic, record))
    if not found:
        console.print(
            f"no trigger or suppression with id {trigger_id} on {topics.triggers} or "
            f"{topics.suppressions} (read in {time.monotonic() - started:.1f} s)"
        )
        return False
    for topic, r in found:
        sent = topic == topics.triggers
        console.print(headline(r, sent))
        for label, text in explanation_rows(r, sent):
            console.print(f"  {label:<11} {text}")
    if len([t for t, _ in found if t == topics.triggers]) > 1:
        console.print("  (delivered more than once: a restart re-emitted it; dedupe on trigger_id)")
    return True

"""The Quix Streams contender: the naive baseline's state updates, written idiomatically
for Quix Streams: a StreamingDataFrame per input topic, concatenated, a per-event
stateful ``apply`` on RocksDB state keyed by the message key (the customer), and
``to_topic`` for the triggers. Differences from crmstream: bench/README.md.

It runs in its own virtualenv (quixstreams pins confluent-kafka below crmstream's
version), so it imports nothing from crmstream. Run:
python bench/quix_job.py --brokers H:P --topics a,b --triggers T --state-dir D
[--idle-timeout S]. Prints {"events": n, "seconds": s, "cpu_seconds": c} at the end.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from datetime import UTC, datetime

import orjson
from quixstreams import Application

DAY_MS = 86_400_000
HALF_LIFE_DAYS = 7.0
WEIGHTS = {"product_view": 1.0, "favourite": 2.0, "add_to_cart": 3.0, "order_placed": 5.0}
# Tansu does not report retention.ms; Quix reads it when it checks topics, so
# the topics are declared here with explicit configs.
TOPIC_EXTRA = {"retention.ms": "604800000", "cleanup.policy": "delete"}


def _iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="milliseconds")


def update(event: dict, state) -> dict | None:
    """One event against the customer's RocksDB state; a trigger or None."""
    if type(event) is not dict or "event_type" not in event or "event_time" not in event:
        return None
    try:
        at = int(event["event_time"])
    except (TypeError, ValueError):
        return None  # a malformed event: skip it
    kind = event["event_type"]
    counts = state.get("counts", {})
    counts[kind] = counts.get(kind, 0) + 1
    state.set("counts", counts)
    days = state.get("days", {})
    if kind in ("product_view", "add_to_cart", "order_placed"):
        bucket = days.setdefault(str(at // DAY_MS), {})
        bucket[kind] = bucket.get(kind, 0) + 1
        cutoff = at // DAY_MS - 30
        days = {d: v for d, v in days.items() if int(d) > cutoff}
        state.set("days", days)
    category = event.get("category")
    if kind in WEIGHTS and category:
        ref = state.get("ref", 0)
        decay = math.pow(0.5, max(0, at - ref) / (HALF_LIFE_DAYS * DAY_MS))
        prefs = {c: w * decay for c, w in state.get("prefs", {}).items()}
        prefs[category] = prefs.get(category, 0.0) + WEIGHTS[kind]
        state.set("prefs", prefs)
        state.set("ref", max(ref, at))
    trigger = None
    if kind == "product_view":
        streak = state.get("streak", [None, 0])
        streak = [category, streak[1] + 1] if streak[0] == category else [category, 1]
        state.set("streak", streak)
        if streak[1] == 3:
            trigger = "browse_interest"
    views = sum(v.get("product_view", 0) for v in days.values())
    carts = sum(v.get("add_to_cart", 0) for v in days.values())
    orders = sum(v.get("order_placed", 0) for v in days.values())
    intent = views >= 5 and carts >= 2 and orders == 0
    if intent and not state.get("intent", False) and trigger is None:
        trigger = "high_intent_no_purchase"
    state.set("intent", intent)
    if kind == "order_placed":
        state.set("spend", state.get("spend", 0.0) + float(event.get("amount", 0.0)))
    if trigger is None:
        return None
    return {
        "trigger_type": trigger,
        "customer_id": event.get("customer_id"),
        "causal_event_id": event.get("event_id"),
        "event_time": _iso(at),
        "emitted_at": _iso(time.time_ns() // 1_000_000),
    }


def _safe_json(value: bytes) -> object:
    try:
        return orjson.loads(value)
    except orjson.JSONDecodeError:
        return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--brokers", required=True)
    parser.add_argument("--topics", required=True)
    parser.add_argument("--triggers", required=True)
    parser.add_argument("--state-dir", required=True)
    parser.add_argument("--group", default="quix-bench")
    parser.add_argument("--partitions", type=int, default=4)
    parser.add_argument("--idle-timeout", type=float, default=5.0, help="0: run until killed")
    parser.add_argument(
        "--fetch-bytes", type=int, default=0, help="max.partition.fetch.bytes (0: librdkafka's)"
    )
    args = parser.parse_args()

    counter = [0]

    def processed(topic: str, partition: int, offset: int) -> None:
        counter[0] += 1

    consumer_config = {"session.timeout.ms": 6000, "fetch.wait.max.ms": 50}
    if args.fetch_bytes:
        consumer_config["max.partition.fetch.bytes"] = args.fetch_bytes
    app = Application(
        broker_address=args.brokers,
        consumer_group=args.group,
        auto_offset_reset="earliest",
        state_dir=args.state_dir,
        use_changelog_topics=False,
        auto_create_topics=False,
        consumer_extra_config=consumer_config,
        on_message_processed=processed,
        loglevel="WARNING",
    )
    config = app._topic_manager.topic_config(  # explicit configs: see TOPIC_EXTRA
        num_partitions=args.partitions, replication_factor=1, extra_config=TOPIC_EXTRA
    )
    frames = [
        app.dataframe(
            app.topic(name, value_deserializer="bytes", key_deserializer="str", config=config)
        ).apply(_safe_json)
        for name in args.topics.split(",")
    ]
    sdf = frames[0]
    for other in frames[1:]:
        sdf = sdf.concat(other)
    sdf = sdf.apply(update, stateful=True).filter(lambda t: t is not None)
    out = app.topic(args.triggers, value_serializer="json", config=config)
    sdf.to_topic(out)
    started, cpu = time.perf_counter(), time.process_time()
    app.run(timeout=args.idle_timeout)
    seconds = time.perf_counter() - started - args.idle_timeout  # minus the final idle wait
    fetch_bytes = consumer_config.get("max.partition.fetch.bytes", 0)
    report = {
        "events": counter[0],
        "seconds": seconds,
        # every thread, librdkafka's and RocksDB's included; the final idle wait costs
        # next to nothing
        "cpu_seconds": time.process_time() - cpu,
        "fetch_bytes": fetch_bytes,
    }
    sys.stdout.write(orjson.dumps(report).decode() + "\n")


if __name__ == "__main__":
    main()

"""The naive baseline: the CRM state updates written the way tutorials do it.

Bytewax's own KafkaSource, ``key_on`` the customer, and a per-event
``stateful_map`` that reads the customer's JSON state from Redis, updates it in
Python and writes it back: one GET and one SET per event. Triggers go out
through Bytewax's KafkaSink. The state and triggers follow crmstream's where
they translate (bench/README.md lists the differences): per-type counts, daily
windows of views, carts and orders, the decayed preference vector, the browse
streak (browse_interest) and high intent without purchase.

Run: python -m crmstream.bench.naive --brokers H:P --redis-url URL --topics a,b
--triggers T [--tail]. Prints {"events": n, "seconds": s, "cpu_seconds": c} at the end.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from datetime import UTC, datetime

import bytewax.operators as op
import orjson
import redis
from bytewax.connectors.kafka import KafkaSink, KafkaSinkMessage, KafkaSource
from bytewax.dataflow import Dataflow

from crmstream.bench.harness import fetch_config

DAY_MS = 86_400_000
HALF_LIFE_DAYS = 7.0
WEIGHTS = {"product_view": 1.0, "favourite": 2.0, "add_to_cart": 3.0, "order_placed": 5.0}


def _iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="milliseconds")


def update(client: redis.Redis, prefix: str, event: dict) -> dict | None:
    """One event: GET the customer's state, update it, SET it back; a trigger or None."""
    key = f"{prefix}:{event['customer_id']}"
    raw = client.get(key)
    state = orjson.loads(raw) if raw else {"counts": {}, "days": {}, "prefs": {}, "ref": 0}
    kind, at = event["event_type"], int(event["event_time"])
    state["counts"][kind] = state["counts"].get(kind, 0) + 1
    day = str(at // DAY_MS)
    if kind in ("product_view", "add_to_cart", "order_placed"):
        bucket = state["days"].setdefault(day, {})
        bucket[kind] = bucket.get(kind, 0) + 1
        cutoff = at // DAY_MS - 30
        state["days"] = {d: v for d, v in state["days"].items() if int(d) > cutoff}
    category = event.get("category")
    if kind in WEIGHTS and category:
        decay = math.pow(0.5, max(0, at - state["ref"]) / (HALF_LIFE_DAYS * DAY_MS))
        state["prefs"] = {c: w * decay for c, w in state["prefs"].items()}
        state["prefs"][category] = state["prefs"].get(category, 0.0) + WEIGHTS[kind]
        state["ref"] = max(state["ref"], at)
    trigger = None
    if kind == "product_view":
        streak = state.get("streak", [None, 0])
        streak = [category, streak[1] + 1] if streak[0] == category else [category, 1]
        state["streak"] = streak
        if streak[1] == 3:
            trigger = "browse_interest"
    views = sum(v.get("product_view", 0) for v in state["days"].values())
    carts = sum(v.get("add_to_cart", 0) for v in state["days"].values())
    orders = sum(v.get("order_placed", 0) for v in state["days"].values())
    intent = views >= 5 and carts >= 2 and orders == 0
    if intent and not state.get("intent") and trigger is None:
        trigger = "high_intent_no_purchase"
    state["intent"] = intent
    if kind == "order_placed":
        state["spend"] = state.get("spend", 0.0) + float(event.get("amount", 0.0))
    client.set(key, orjson.dumps(state))
    if trigger is None:
        return None
    now = time.time_ns() // 1_000_000
    return {
        "trigger_type": trigger,
        "customer_id": event["customer_id"],
        "causal_event_id": event["event_id"],
        "event_time": _iso(at),
        "emitted_at": _iso(now),
    }


def consumer_config(args: argparse.Namespace) -> dict[str, str]:
    """What the source's consumer gets over Bytewax's own settings."""
    fetch = {key: str(value) for key, value in fetch_config(args.fetch_bytes).items()}
    return {"fetch.wait.max.ms": "50", **fetch}


class _Source(KafkaSource):
    """Bytewax's Kafka source, its partitions listed by a source without the consumer
    settings: Bytewax gives ``add_config`` to its admin client too, and librdkafka
    warns about each consumer-only property there."""

    def __init__(self, brokers: list[str], topics: list[str], tail: bool, config: dict):
        super().__init__(brokers, topics, tail=tail, add_config=config)
        self._lister = KafkaSource(brokers, topics, tail=tail)

    def list_parts(self) -> list[str]:
        return self._lister.list_parts()


def build(args: argparse.Namespace, counter: list[int]) -> Dataflow:
    client = redis.Redis.from_url(args.redis_url)
    flow = Dataflow("naive")
    source = _Source(
        args.brokers.split(","), args.topics.split(","), args.tail, consumer_config(args)
    )
    messages = op.input("in", flow, source)

    def parse(msg) -> dict | None:
        counter[0] += 1
        try:
            event = orjson.loads(msg.value)
        except orjson.JSONDecodeError:
            return None
        ok = type(event) is dict and type(event.get("customer_id")) is str
        return event if ok and "event_time" in event else None

    events = op.filter_map("parse", messages, parse)
    keyed = op.key_on("customer", events, lambda e: e["customer_id"])

    def step(_state: None, event: dict) -> tuple[None, dict | None]:
        try:
            return None, update(client, args.prefix, event)
        except (KeyError, TypeError, ValueError):  # a malformed event: skip it
            return None, None

    triggers = op.filter_map("triggers", op.stateful_map("state", keyed, step), lambda kv: kv[1])
    out = op.map(
        "record", triggers, lambda t: KafkaSinkMessage(t["customer_id"].encode(), orjson.dumps(t))
    )
    op.output("out", out, KafkaSink(args.brokers.split(","), args.triggers))
    return flow


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--brokers", required=True)
    parser.add_argument("--redis-url", required=True)
    parser.add_argument("--topics", required=True)
    parser.add_argument("--triggers", required=True)
    parser.add_argument("--prefix", default="naive")
    parser.add_argument("--tail", action="store_true")
    parser.add_argument(
        "--fetch-bytes", type=int, default=0, help="max.partition.fetch.bytes (0: librdkafka's)"
    )
    args = parser.parse_args()
    from bytewax.testing import run_main

    counter = [0]
    started, cpu = time.perf_counter(), time.process_time()
    run_main(build(args, counter))
    seconds = time.perf_counter() - started
    fetch_bytes = int(consumer_config(args).get("max.partition.fetch.bytes", 0))
    report = {
        "events": counter[0],
        "seconds": seconds,
        "cpu_seconds": time.process_time() - cpu,  # every thread, librdkafka's included
        "fetch_bytes": fetch_bytes,
    }
    sys.stdout.write(orjson.dumps(report).decode() + "\n")


if __name__ == "__main__":
    main()

"""The harness's child roles: what runs inside a contender's own process.

This module owns the code the harness starts as ``python -m
crmstream.bench.harness <role> ...``: the ceiling (a raw consume + parse
loop), one crmstream process of a cluster, and the latency floor (a raw
consumer tailing live input). Each prints one JSON line with its events, its
seconds and its CPU time over the timed window, so the harness can measure
its resident memory from outside and run several at once. It also owns the
consumer settings every contender shares (the fetch size) and the wait for a
cluster's peers to listen.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

import orjson

ROLES = ("ceiling", "crmstream", "floor")


class Stopwatch:
    """Wall time and CPU time (all threads) of a block, and the wall-clock time it began:
    a child's report (``together`` lines processes up by ``started_at``)."""

    def __enter__(self) -> Stopwatch:
        self.started_at = time.time()
        self._wall, self._cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.perf_counter() - self._wall
        self.cpu_seconds = time.process_time() - self._cpu

    def report(self) -> dict[str, float]:
        return {
            "seconds": self.seconds,
            "cpu_seconds": self.cpu_seconds,
            "started_at": self.started_at,
        }


def consume_and_parse(
    brokers: str, topics: list[str], part: int = 0, of: int = 1, fetch_bytes: int = 0
) -> dict:
    """The ceiling: consume + parse every input partition with index % of == part, to its
    end, nothing else; {"events": n, "seconds": s, "cpu_seconds": CPU time of the process,
    librdkafka's threads included}."""
    from confluent_kafka import KafkaError

    consumer, remaining = _raw_consumer(brokers, topics, "bench-ceiling", part, of, fetch_bytes)
    count = 0
    with Stopwatch() as watch:
        while remaining:
            for msg in consumer.consume(2000, 0.5):
                err = msg.error()
                if err is not None:
                    if err.code() == KafkaError._PARTITION_EOF:
                        remaining -= 1
                    continue
                try:  # noqa: SIM105 - a context manager per message would slow the ceiling
                    orjson.loads(msg.value())
                except orjson.JSONDecodeError:
                    pass
                count += 1
    consumer.close()
    return {"events": count, "fetch_bytes": fetch_bytes, **watch.report()}


# The broker of these runs (Tansu) spends CPU per fetch that grows with the partition's
# length: with librdkafka's 1 MiB per partition it took 4.0 to 4.6 µs per event to serve
# a 2M-event input, with 8 MiB 2.5 to 2.6 (bench/RESULTS.md, round 22).
BENCH_FETCH_BYTES = 8 << 20


def fetch_config(fetch_bytes: int) -> dict[str, int]:
    """The fetch size the harness gives every contender's consumer (``--fetch-bytes``;
    0: librdkafka's own 1 MiB). bench/README.md says why."""
    return {"max.partition.fetch.bytes": fetch_bytes} if fetch_bytes else {}


def _raw_consumer(
    brokers: str, topics: list[str], group: str, part: int = 0, of: int = 1, fetch_bytes: int = 0
) -> tuple[Any, int]:
    """A consumer assigned every input partition with index % of == part, from offset 0
    (with the flow's own fetch settings and the harness's fetch size); and how many
    partitions that is."""
    from confluent_kafka import Consumer, TopicPartition

    from crmstream.flows.source import FETCH_DEFAULTS

    consumer = Consumer(
        {
            "bootstrap.servers": brokers,
            "group.id": group,
            "enable.auto.commit": False,
            "enable.partition.eof": True,
            **FETCH_DEFAULTS,
            **fetch_config(fetch_bytes),
        }
    )
    parts = []
    for topic in topics:
        meta = consumer.list_topics(topic, timeout=30).topics[topic]
        parts += [TopicPartition(topic, p, 0) for p in sorted(meta.partitions)]
    parts = [p for i, p in enumerate(parts) if i % of == part]
    consumer.assign(parts)
    return consumer, len(parts)


def kafka_floor(
    brokers: str, topics: list[str], stop: threading.Event, fetch_bytes: int = 0
) -> dict[str, Any]:
    """The latency floor: a raw consumer tailing the input until ``stop``, doing nothing
    but read each event's time. Receive time - event_time over every event, in ms: what
    the broker, the client and the shared machine add before any processing."""
    consumer, _ = _raw_consumer(brokers, topics, "bench-floor", fetch_bytes=fetch_bytes)
    latencies = []
    while not stop.is_set():
        # What is there, else wait for the next message: a batch wait would age the batch.
        for msg in consumer.consume(2000, 0) or consumer.consume(1, 0.1):
            if msg.error() is not None:
                continue
            received_ms = time.time_ns() / 1e6
            try:
                at = orjson.loads(msg.value())["event_time"]
            except (orjson.JSONDecodeError, KeyError, TypeError):
                continue  # a malformed event of the workload
            if isinstance(at, int):
                latencies.append(received_ms - at)
    consumer.close()
    return {
        "events": len(latencies),
        "p50_ms": percentile(latencies, 0.5),
        "p99_ms": percentile(latencies, 0.99),
    }


def role_ceiling(args: argparse.Namespace) -> dict[str, Any]:
    return consume_and_parse(
        args.brokers, args.topics.split(","), args.part, args.of, args.fetch_bytes
    )


def _listening(port: int) -> bool:
    """Whether a socket on this machine listens on TCP ``port`` (Linux: /proc/net/tcp*)."""
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            rows = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            local, state = row.split()[1:4:2]
            if state == "0A" and int(local.rsplit(":", 1)[1], 16) == port:  # 0A: LISTEN
                return True
    return False


def await_peers(addresses: list[str], part: int, timeout_s: float = 60.0) -> float:
    """Wait until the cluster's processes before ``part`` listen; the seconds waited.

    Under Bytewax, timely has process i connect to processes 0 .. i-1, and when a
    connect is refused it sleeps a whole second before trying again. Started
    together, process 1 often tried before process 0 listened: a 2-process run
    then began with a 1 s pause, a third of a 3 s run at 100k customers
    (bench/RESULTS.md, round 13). A deployment pays that once per start; the
    harness, which times the run, waits for the listener instead. After
    ``timeout_s`` it goes on, and timely's own retries take over."""
    started = time.monotonic()
    for address in addresses[:part]:
        port = int(address.rsplit(":", 1)[1])
        while not _listening(port) and time.monotonic() - started < timeout_s:
            time.sleep(0.005)
    return time.monotonic() - started


def role_crmstream(args: argparse.Namespace) -> dict[str, Any]:
    """One crmstream process of ``args.of``, timed from after the kernels are loaded and
    the processes it connects to listen."""
    from crmstream.config import load_config
    from crmstream.flows.crm import run_cluster_process
    from crmstream.flows.runtime import Endpoints, Runtime
    from crmstream.metrics import counter_total, get_metrics
    from crmstream.operators.kernels import warm_up

    sets = orjson.loads(args.sets)
    config = load_config(None, sets, env={})
    warm_up(config)
    runtime = Runtime(config, Endpoints(args.brokers.split(","), args.redis_url))
    addresses = args.addresses.split(",") if args.of > 1 else None
    metrics = get_metrics()
    part = args.part if args.of > 1 else None
    waited = await_peers(addresses, args.part) if addresses else 0.0
    with Stopwatch() as watch:
        run_cluster_process(runtime, 1, part, addresses, tail=args.tail)
    runtime.close()
    handled = counter_total(metrics.events_in, metrics.invalid_events, metrics.skipped_events)
    return {
        "events": int(handled),
        "peer_wait_seconds": waited,
        "fetch_bytes": int(config.kafka.consumer_properties().get("max.partition.fetch.bytes", 0)),
        **watch.report(),
    }


def _child_main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="harness child")
    parser.add_argument("role", choices=ROLES)
    parser.add_argument("--brokers", required=True)
    parser.add_argument("--topics", default="")
    parser.add_argument("--redis-url", default="")
    parser.add_argument("--sets", default="[]")
    parser.add_argument("--part", type=int, default=0)
    parser.add_argument("--of", type=int, default=1)
    parser.add_argument("--addresses", default="")
    parser.add_argument("--tail", action="store_true")
    parser.add_argument("--fetch-bytes", type=int, default=0)
    args = parser.parse_args(argv)
    if args.role == "floor":
        stop = threading.Event()
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
        result = kafka_floor(args.brokers, args.topics.split(","), stop, args.fetch_bytes)
    else:
        result = role_ceiling(args) if args.role == "ceiling" else role_crmstream(args)
    sys.stdout.write(orjson.dumps(result).decode() + "\n")


def percentile(values: list[float], q: float) -> float | None:
    """The ``q`` quantile of ``values`` (the value at rank ``int(q * n)``), to 0.1; None
    for no values."""
    if not values:
        return None
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 1)

"""The hot-key stress run, and each shard's progress while one customer is hot.

This module owns the harness's answer to "a hot customer must never stall the
other shards". The stress workload is the generator's Zipf 1.1 activity (the
busiest of 100k customers holds 13.5 % of the sessions; until issue 38 the
default workload), written to topics of its own and run like the calibrated
one (the ceiling and crmstream with 1 and 2 processes, once each), reported
but not a target.

While crmstream runs with 2 processes, ``ShardProgress`` samples every shard's
committed progress in Redis (``{prefix}:progress:<shard>``: per input
partition, the highest offset the shard has applied). A shard's *own* input is
the partitions that hold its customers: with the default partitioner and a
partition count that is a multiple of the shard count, partition ``p`` holds
the customers of shard ``p % shards`` (bench/README.md). For each shard the
run reports its own events and when it had applied 50 %, 90 % and all of
them: a shard held back by the hot one finishes with it, not when its own
input allows.
"""

from __future__ import annotations

import threading
import time
from typing import Any

SAMPLE_S = 0.1


class ShardProgress:
    """Samples each shard's applied offsets from Redis in a thread, while a run lasts."""

    def __init__(self, client: Any, prefix: str, shards: int, ends: dict[tuple[str, int], int]):
        self._client, self._prefix, self._shards = client, prefix, shards
        self._ends = ends  # input partition -> its message count (end offset)
        self.samples: list[tuple[float, list[dict[tuple[str, int], int]]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _sample(self) -> None:
        from crmstream.state.store import decode_progress

        pipe = self._client.pipeline(transaction=False)
        for shard in range(self._shards):
            pipe.hgetall(f"{self._prefix}:progress:{shard}")
        applied = [
            {pos: rec.offset + 1 for pos, rec in decode_progress(raw).items()}
            for raw in pipe.execute()
        ]
        self.samples.append((time.time(), applied))

    def _loop(self) -> None:
        while not self._stop.wait(SAMPLE_S):
            self._sample()

    def __enter__(self) -> ShardProgress:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()

    def own(self, shard: int) -> list[tuple[str, int]]:
        """The input partitions that hold the shard's customers (module docstring)."""
        return sorted(pos for pos in self._ends if pos[1] % self._shards == shard)

    def report(self, started_at: float) -> list[dict[str, Any]]:
        """Per shard: its own events, and the seconds after ``started_at`` at which it had
        applied 50 %, 90 % and 100 % of them (None: not within the run)."""
        rows = []
        for shard in range(self._shards):
            own = self.own(shard)
            total = sum(self._ends[pos] for pos in own)
            reached: dict[str, float | None] = {"50%": None, "90%": None, "100%": None}
            for at, applied in self.samples:
                done = sum(min(applied[shard].get(pos, 0), self._ends[pos]) for pos in own)
                for mark, share in (("50%", 0.5), ("90%", 0.9), ("100%", 1.0)):
                    if reached[mark] is None and total and done >= share * total:
                        reached[mark] = round(max(0.0, at - started_at), 2)
            rows.append({"shard": shard, "own_events": total, "seconds_to": reached})
        return rows


def partition_ends(brokers: list[str], topics: list[str]) -> dict[tuple[str, int], int]:
    """Each input partition's end offset, read to its end (the broker's reported high
    watermark can lag the last record batch on Tansu: bench/README.md, Pathway)."""
    from confluent_kafka import Consumer, KafkaError, TopicPartition

    consumer = Consumer(
        {
            "bootstrap.servers": ",".join(brokers),
            "group.id": "bench-ends",
            "enable.auto.commit": False,
            "enable.partition.eof": True,
            "max.partition.fetch.bytes": 8 << 20,
        }
    )
    parts = []
    for topic in topics:
        meta = consumer.list_topics(topic, timeout=30).topics[topic]
        parts += [TopicPartition(topic, p, 0) for p in sorted(meta.partitions)]
    consumer.assign(parts)
    ends = {(p.topic, p.partition): 0 for p in parts}
    remaining = len(parts)
    while remaining:
        for msg in consumer.consume(5000, 1.0):
            if msg.error() is not None:
                remaining -= msg.error().code() == KafkaError._PARTITION_EOF
                continue
            pos = (msg.topic(), msg.partition())
            ends[pos] = max(ends[pos], msg.offset() + 1)
    consumer.close()
    return ends

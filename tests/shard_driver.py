"""Drive the dataflow's shard step in this process over a given input log and cutting.

The shard step is run as Bytewax runs it (``route_batch``, then ``ShardLogic``'s
``on_batch`` / ``on_notify`` / ``on_eof`` per shard) on the real redis-server and
with the real producer on the real broker; only the reading is simulated: the
log is cut into processing steps by a chosen ``step_ms`` and read in batches of
chosen sizes, from the partitions in a chosen interleaving, or in event-time
order with the wall clock following it (live). What the shards send is taken
from their outboxes as they send it, and the Redis state is read at the end.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator
from typing import Any, ClassVar, NamedTuple

import orjson

from crmstream.config import CrmConfig
from crmstream.flows import shard as shard_module
from crmstream.flows.route import route_batch
from crmstream.flows.routing import shard_keys
from crmstream.flows.runtime import Endpoints, Runtime
from crmstream.flows.shard import ShardLogic
from crmstream.flows.sink import Outbox
from crmstream.flows.source import CAUGHT_UP_OFFSET, RawMessage
from crmstream.state.store import Position


class Message(NamedTuple):
    """One input message of a log: its role's topic, partition, key, bytes, Kafka time."""

    role: str
    partition: int
    key: bytes
    value: bytes
    kafka_ms: int


class Cutting(NamedTuple):
    """How a log is cut into processing steps and read."""

    step_ms: int
    batch_sizes: tuple[int, ...]  # cycled
    seed: int  # the partitions' interleaving
    live: bool = False


class Outcome(NamedTuple):
    triggers: list[dict[str, Any]]  # without emitted_at, sorted by trigger id
    suppressions: list[dict[str, Any]]
    dead_letters: list[dict[str, Any]]
    redis: dict[str, Any]  # every key of the prefix but progress, outbox, commit, layout


class _RecordingOutbox(Outbox):
    sent: ClassVar[list[tuple[str, bytes | None, bytes]]] = []

    def send(self, records):  # type: ignore[override]
        records = list(records)
        _RecordingOutbox.sent.extend((r.topic, r.key, r.value) for r in records)
        return super().send(records)


@contextlib.contextmanager
def recording() -> Iterator[list[tuple[str, bytes | None, bytes]]]:
    """What every shard outbox is given to send, while the block runs."""
    saved = shard_module.Outbox
    _RecordingOutbox.sent = []
    shard_module.Outbox = _RecordingOutbox  # type: ignore[misc]
    try:
        yield _RecordingOutbox.sent
    finally:
        shard_module.Outbox = saved  # type: ignore[misc]


PARTITIONS = (0, 1)  # of every input topic


def driver_config(endpoints: Endpoints, tag: str, *sets: str) -> CrmConfig:
    """The default configuration on topics of its own (``<tag>.<role>``, created), with
    metrics off, plus ``sets``."""
    from crmstream.config import load_config
    from crmstream.topics import create_topics

    roles = ("clickstream", "orders", "customers", "feedback", "triggers", "suppressions",
             "dead_letter")  # fmt: skip
    config = load_config(
        None,
        [
            *(f"kafka.topics.{r}={tag}.{r}" for r in roles),
            f"kafka.brokers={','.join(endpoints.brokers)}",
            f"redis.url={endpoints.redis_url}",
            "metrics.enabled=false",
            *sets,
        ],
        env={},
    )
    create_topics(list(endpoints.brokers), config)
    return config


def _read_batches(
    log: list[Message], topics: dict[str, str], cutting: Cutting, first: dict[Position, int]
) -> Iterator[tuple[int, list[RawMessage]]]:
    """The log as the source would hand it over: (wall clock, batch) pairs; ``first``:
    each partition's first offset (0 when absent). A partition with nothing to read is
    at its end from the first batch, as the source reports it."""
    offsets: dict[Position, int] = dict(first)
    steps: dict[Position, int] = {}
    raw: list[RawMessage] = []
    for msg in log:
        pos = (topics[msg.role], msg.partition)
        offset = offsets.get(pos, 0)
        offsets[pos] = offset + 1
        step = max(steps.get(pos, -1), msg.kafka_ms // cutting.step_ms)
        steps[pos] = step
        raw.append(RawMessage(msg.key, msg.value, pos[0], pos[1], offset, msg.kafka_ms, step))
    sizes = list(cutting.batch_sizes)
    idle = [RawMessage(None, None, topics[role], p, CAUGHT_UP_OFFSET, 0, -1)
            for role in ("clickstream", "orders", "customers", "feedback") for p in PARTITIONS
            if (topics[role], p) not in steps]  # fmt: skip
    if idle:
        yield 0 if not raw else raw[0].timestamp_ms, idle
    if cutting.live:  # as it arrives: in Kafka-time order, each partition at its end after
        arrival = sorted(range(len(raw)), key=lambda i: (raw[i].timestamp_ms, i))
        k = 0
        while arrival:
            size = sizes[k % len(sizes)]
            # An instant's messages arrive together: live mode applies what arrived apart
            # as separate parts of a step (docs/guarantees.md, "Live mode").
            while size < len(arrival) and (
                raw[arrival[size]].timestamp_ms == raw[arrival[size - 1]].timestamp_ms
            ):
                size += 1
            taken, arrival = arrival[:size], arrival[size:]
            k += 1
            batch = [raw[i] for i in sorted(taken)]
            ends = {(m.topic, m.partition): m.step for m in batch}
            batch += [RawMessage(None, None, t, p, CAUGHT_UP_OFFSET, 0, s)
                      for (t, p), s in ends.items()]  # fmt: skip
            yield max(m.timestamp_ms for m in batch), batch
        return
    rng = random.Random(cutting.seed)
    queues: dict[Position, list[RawMessage]] = {}
    for m in raw:
        queues.setdefault((m.topic, m.partition), []).append(m)
    reported: set[Position] = set()
    k = 0
    while any(queues.values()):
        size = sizes[k % len(sizes)]
        k += 1
        batch: list[RawMessage] = []
        while len(batch) < size and any(queues.values()):
            pos = rng.choice(sorted(p for p, q in queues.items() if q))
            run = rng.randint(1, size - len(batch))
            batch += queues[pos][:run]
            del queues[pos][:run]
        for pos, queue in queues.items():
            if not queue and pos not in reported:
                reported.add(pos)
                last_step = steps[pos]
                batch.append(RawMessage(None, None, pos[0], pos[1], CAUGHT_UP_OFFSET, 0, last_step))
        yield 0, batch


def run_log(
    config: CrmConfig,
    endpoints: Endpoints,
    log: list[Message],
    cutting: Cutting,
    end_ms: int,
    shared: Runtime | None = None,
    first_offsets: dict[Position, int] | None = None,
) -> Outcome:
    """Run the log through the shard step under ``cutting``; ``end_ms``: the wall clock of
    a bounded run (and of the last live tick). ``shared``: a runtime whose Redis client
    and producer are used (runs many logs on one connection each). ``first_offsets``:
    where each partition's offsets start (a log that goes on from an earlier run's)."""
    clock = [end_ms]
    runtime = Runtime(config, endpoints, clock_ms=lambda: clock[0])
    if shared is not None:
        from crmstream.state.store import StateStore

        runtime.__dict__["producer"] = shared.producer
        runtime.__dict__["store"] = StateStore(
            shared.store.client, config.redis.key_prefix, config.policies.audit_salt
        )
    topics = config.kafka.topics.by_role
    shards = config.processing.shards
    keys = shard_keys(shards, 1)
    partitions = sorted(
        (topics[role], p)
        for role in ("clickstream", "orders", "customers", "feedback")
        for p in PARTITIONS
    )
    with recording() as sent:
        logics = [ShardLogic(runtime, cutting.live, partitions) for _ in range(shards)]
        try:
            for wall, batch in _read_batches(log, topics, cutting, first_offsets or {}):
                if cutting.live:
                    clock[0] = wall
                by_shard: dict[int, list] = {}
                for _key, item in route_batch(runtime, batch, keys):
                    by_shard.setdefault(item.shard, []).append(item)
                for shard in sorted(by_shard):
                    logics[shard].on_batch(by_shard[shard])
                if cutting.live:
                    for logic in logics:
                        if logic._step is not None:
                            logic.on_notify()
            clock[0] = end_ms
            for logic in logics:
                logic.on_eof()
            runtime.producer.flush()
        finally:
            if shared is None:
                runtime.close()
    client = (shared or runtime).store.client if shared is not None else None
    return Outcome(*_outputs(sent, config), redis=snapshot(config, endpoints, client))


def _outputs(sent: list[tuple[str, bytes | None, bytes]], config: CrmConfig) -> tuple:
    topics = config.kafka.topics
    by_topic: dict[str, list[dict[str, Any]]] = {}
    for topic, key, value in sent:
        record = orjson.loads(value)
        record.pop("emitted_at", None)
        record["_key"] = key.decode() if key else None
        by_topic.setdefault(topic, []).append(record)
    triggers = sorted(by_topic.get(topics.triggers, []), key=lambda r: r["trigger_id"])
    suppressions = sorted(by_topic.get(topics.suppressions, []), key=lambda r: r["trigger_id"])
    dead = sorted(by_topic.get(topics.dead_letter, []), key=lambda r: orjson.dumps(r["source"]))
    return triggers, suppressions, dead


_SKIPPED = (":progress:", ":outbox:", ":commit:", ":layout")


def snapshot(config: CrmConfig, endpoints: Endpoints, client: Any = None) -> dict[str, Any]:
    """Every Redis key of the config's prefix with its value, but the step bookkeeping
    (progress, outbox, commit fence, layout): those record how the input was cut."""
    from crmstream.state.store import connect

    own = client is None
    client = connect(endpoints.redis_url, config.redis) if own else client
    out: dict[str, Any] = {}
    try:
        for raw_key in client.scan_iter(f"{config.redis.key_prefix}:*", count=1000):
            key = raw_key.decode()
            if any(part in key for part in _SKIPPED):
                continue
            kind = client.type(raw_key).decode()
            if kind == "string":
                out[key] = client.get(raw_key)
            elif kind == "hash":
                out[key] = client.hgetall(raw_key)
            elif kind == "zset":
                out[key] = client.zrange(raw_key, 0, -1, withscores=True)
            elif kind == "stream":  # the audit: when it was applied is wall-clock time, and
                # entries of customers on different shards come in either order
                out[key] = sorted(
                    sorted((k, v) for k, v in fields.items() if k != b"applied_at")
                    for _id, fields in client.xrange(raw_key)
                )
            else:
                out[key] = kind
    finally:
        if own:
            client.close()
    return out

"""The input path: Kafka partitions as a Bytewax source that resumes from Redis.

This module owns where reading starts and when it stops. Each Bytewax worker
reads its share of the input topics' partitions with one Kafka consumer,
starting from the offsets committed in Redis (``StateStore.resume_offsets``),
with or without Bytewax recovery, so a restart neither re-reads a topic from
its start nor skips events a shard had read but not yet committed. Batches are
lists of ``RawMessage`` tuples, from any of the worker's partitions; no
per-message objects beyond that.

Each message carries its processing step (its Kafka timestamp's bucket, never
below its predecessor's; ``_WorkerReader.next_batch``): shards apply input step
by step, so the result does not depend on how reads were batched. A timestamp
more than ``processing.max_future_skew_seconds`` past the processing clock moves
no step (``_WorkerReader.newest_stamp``).

Stopping: with ``tail=False`` a worker's reader ends once each of its
partitions is read to its end offset (bounded runs, tests, benchmarks). A
``drain`` event set by the caller makes a tailing source read up to the end
and stop; a ``stop`` event stops it at once.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any, NamedTuple

from bytewax.inputs import DynamicSource, StatelessSourcePartition
from confluent_kafka import Consumer, KafkaError, KafkaException, TopicPartition
from redis import RedisError

from crmstream.clients import librdkafka_config
from crmstream.flows import input_ends
from crmstream.flows.finish import Finisher, LocalBarrier, StepBarrier
from crmstream.flows.partition_watch import PartitionWatch, describe_with
from crmstream.flows.routing import parse_part_name, part_name, worker_share
from crmstream.flows.runtime import wall_clock_ms
from crmstream.metrics import get_metrics
from crmstream.operators.events import new_tuple
from crmstream.state.store import Position, StateStoreError
from crmstream.topics import TopicError, admin_client, partitions_of

log = logging.getLogger(__name__)

_IDLE_BACKOFF = timedelta(milliseconds=20)
STALL_SECONDS = 30.0  # kafka.stall_warning_seconds
DEFAULT_MAX_FUTURE_MS = 86_400_000  # processing.max_future_skew_seconds
# Elapsed times are differences of large monotonic readings: (t + 5.0) - t can come out
# a hair under 5.0, which once reported a 5 s stall 3 s late (as "8 s").
_CLOCK_SLACK_S = 1e-6
# The source consumer's fetching (``kafka.client`` or ``kafka.consumer`` overrides either):
# - fetch.wait.max.ms: how long the broker may hold a fetch for new data (latency).
# - fetch.queue.backoff.ms: once librdkafka's local queue is over its limits
#   (queued.min.messages, queued.max.messages.kbytes: 64 MB, which a backlog
#   passes), it fetches that partition again only after this long. With
#   librdkafka's 1000 ms the flow emptied the queue and then waited, up to 0.7 s
#   of a 6 s catch-up run (bench/RESULTS.md, round 13).
FETCH_DEFAULTS = {"fetch.wait.max.ms": 50, "fetch.queue.backoff.ms": 20}


class RawMessage(NamedTuple):
    key: bytes | None
    value: bytes | None
    topic: str
    partition: int
    offset: int
    timestamp_ms: int
    step: int  # the processing step the message belongs to (see ``_WorkerReader.next_batch``)


CAUGHT_UP_OFFSET = -1  # a RawMessage with this offset says: the partition is read to its end


class SourceError(RuntimeError):
    """An input topic cannot be read (missing topic, authorisation, ...)."""


class StopSignals(NamedTuple):
    drain: threading.Event  # read to the current end, then stop
    stop: threading.Event  # stop now
    # finish the step: every worker reads up to the step the cluster agrees on
    # (``barrier``, ``flows.finish``), then stops; what a SIGTERM asks for
    finish: threading.Event | None = None
    barrier: StepBarrier | None = None


class _Partition:
    """What the reader knows of one input partition: its step, position, end and health."""

    __slots__ = (
        "at_end",
        "lag",
        "last_data",
        "next_offset",
        "partition",
        "reported_end",
        "shrunk",
        "stalled",
        "step",
        "topic",
        "tp",
    )

    def __init__(self, topic: str, partition: int, start_offset: int, start_step: int):
        self.topic = topic
        self.partition = partition
        self.tp = TopicPartition(topic, partition)
        # Step 0 at the least: a partition's first records may move no step (stamped
        # before 1970, or past the future skew), and a step of -1 is no step (NO_STEP:
        # the shards would drop what it holds without a word).
        self.step = max(start_step, 0)
        self.next_offset = start_offset
        self.at_end = False
        self.reported_end = False
        self.last_data = time.monotonic()
        self.stalled = False
        self.shrunk = False  # its end fell below next_offset (``_WorkerReader._watch_shrink``)
        self.lag = get_metrics().consumer_lag.labels(topic, str(partition))


class _WorkerReader(StatelessSourcePartition[RawMessage]):
    """One Kafka consumer for all the input partitions a worker reads.

    One consumer per worker, not one per partition: each batch then spans the
    partitions, so the steps after it get one item per shard per batch however
    many partitions there are, and a worker runs one consumer's threads and
    buffers instead of one set per partition (bench/RESULTS.md, round 7).
    """

    def __init__(
        self,
        config: dict[str, Any],
        starts: dict[Position, tuple[int, int]],
        step_ms: int,
        batch_size: int,
        tail: bool,
        signals: StopSignals | None,
        stall_s: float = STALL_SECONDS,
        group_commits: GroupCommits | None = None,
        finisher: Finisher | None = None,
        clock_ms: Callable[[], int] = wall_clock_ms,
        max_future_ms: int = DEFAULT_MAX_FUTURE_MS,
        partition_watch: PartitionWatch | None = None,
    ):
        self._clock_ms = clock_ms
        self._partition_watch = partition_watch
        self._max_future_ms = max_future_ms
        self._parts = {
            pos: _Partition(pos[0], pos[1], offset, step) for pos, (offset, step) in starts.items()
        }
        self._consumer = Consumer(config)
        if self._parts:
            self._consumer.assign(
                [TopicPartition(t, p, offset) for (t, p), (offset, _step) in starts.items()]
            )
        self._step_ms = step_ms
        self._batch_size = batch_size
        self._tail = tail
        self._signals = signals
        self._idle = False
        self._ended = False
        self._lag_checked = 0.0
        self._stall_s = stall_s
        self._group_commits = group_commits
        self._finisher = finisher
        self.finished = False  # set by the finisher once every partition is done

    # What ``flows.finish.Finisher`` reads and drives.
    @property
    def partitions(self) -> dict[Position, _Partition]:
        return self._parts

    @property
    def consumer(self) -> Consumer:
        return self._consumer

    @property
    def step_ms(self) -> int:
        return self._step_ms

    @property
    def batch_size(self) -> int:
        return self._batch_size

    def newest_stamp(self) -> int:
        """The newest Kafka timestamp that moves a partition's step: at most
        ``processing.max_future_skew_seconds`` past the processing clock. A later one (a
        producer's clock far ahead) would hold every later message of its partition in
        its step, behind the others' (docs/triggers.md, "Lateness"): it does not move it."""
        return self._clock_ms() + self._max_future_ms

    def on_error(self, msg: Any, err: KafkaError) -> None:
        self._on_error(msg, err)

    def next_batch(self) -> list[RawMessage]:
        if self._ended:
            raise StopIteration
        if self._signals is not None:
            if self._signals.stop.is_set():
                raise StopIteration
            if self._finishing():
                batch = self._finisher.next_batch(self)  # type: ignore[union-attr]
                self._ended = self.finished
                self._idle = not batch
                return batch
        batch: list[RawMessage] = []
        parts = self._parts
        step_ms = self._step_ms
        newest = self.newest_stamp()
        got: set[_Partition] = set()
        append = batch.append
        # Messages come in runs of one partition: its bookkeeping is looked up when a
        # run starts and written back when it ends, not per message.
        part: _Partition | None = None
        topic, partition, step, offset = "", -1, 0, -1
        # Non-blocking: Bytewax polls its inputs in turn, so a wait here would delay
        # the rest of the worker; an idle reader backs off through next_awake.
        for msg in self._consumer.consume(self._batch_size, 0) if parts else ():
            err = msg.error()
            if err is not None:
                partition = -1  # the next message starts a run: end flags are set again
                self._on_error(msg, err)
                continue
            if msg.partition() != partition or msg.topic() != topic:
                if part is not None:
                    part.step, part.next_offset = step, offset + 1
                part = parts[(msg.topic(), msg.partition())]
                topic, partition, step = part.topic, part.partition, part.step
                part.at_end = False
                part.reported_end = False  # new data: report the end again when reached
                got.add(part)
            ts_type, ts = msg.timestamp()
            ts = ts if ts_type else 0
            # The message's processing step: its Kafka timestamp's bucket, never below
            # its predecessor's. Steps are a function of the partition's log alone, so
            # a replay cuts the input into the same steps however the reads are
            # batched (docs/guarantees.md).
            if ts // step_ms > step and ts <= newest:
                step = ts // step_ms
            offset = msg.offset()
            # RawMessage(...) without its Python-level constructor
            append(
                new_tuple(RawMessage, (msg.key(), msg.value(), topic, partition, offset, ts, step))
            )
        if part is not None:
            part.step, part.next_offset = step, offset + 1
        now = time.monotonic()
        short = len(batch) < self._batch_size
        delivered = bool(got)
        for part in parts.values():
            self._watch_stall(part, part in got, now, delivered, self._stall_s)
            if self._tail and short:
                # Live input: a busy partition may never see an end-of-partition event
                # (each fetch brings more); the high watermark of the last fetch
                # response is its end for now, so the shards' steps can close.
                _low, high = self._consumer.get_watermark_offsets(part.tp, cached=True)
                if not part.at_end:
                    part.at_end = 0 <= high <= part.next_offset
                self._watch_shrink(part, high)
            if part.at_end and not part.reported_end:
                # Tell the shards this partition holds nothing more for now: it stops
                # holding their event-time watermark back.
                batch.append(
                    RawMessage(
                        None, None, part.topic, part.partition, CAUGHT_UP_OFFSET, 0, part.step
                    )
                )
                part.reported_end = True
        self._report_lag(now)
        if self._partition_watch is not None:
            self._partition_watch.poll(now)
        if self._group_commits is not None:
            self._group_commits.maybe_commit(self._consumer, now)
        draining = not self._tail or (self._signals is not None and self._signals.drain.is_set())
        if draining and not batch and all(part.at_end for part in parts.values()):
            self._ended = True  # emit nothing more; StopIteration on the next call
        self._idle = not batch
        return batch

    def _finishing(self) -> bool:
        """A drain asked every worker to finish the step (``flows.finish``)."""
        finish = self._signals.finish if self._signals is not None else None
        return self._finisher is not None and finish is not None and finish.is_set()

    def _on_error(self, msg: Any, err: KafkaError) -> None:
        pos = (msg.topic(), msg.partition())
        if err.code() == KafkaError._PARTITION_EOF:
            if pos in self._parts:
                self._parts[pos].at_end = True
            return
        if err.fatal() or err.code() in (
            KafkaError.UNKNOWN_TOPIC_OR_PART,
            KafkaError.TOPIC_AUTHORIZATION_FAILED,
        ):
            raise SourceError(f"cannot read {pos[0]}[{pos[1]}]: {err.str()}")
        log.warning("transient error reading %s[%s]: %s", pos[0], pos[1], err.str())

    def _report_lag(self, now: float) -> None:
        """Consumer lag from the high watermark of the last fetch response, once a second."""
        if now - self._lag_checked < 1.0:
            return
        self._lag_checked = now
        for part in self._parts.values():
            _low, high = self._consumer.get_watermark_offsets(part.tp, cached=True)
            if high >= 0:
                part.lag.set(max(0, high - part.next_offset))

    @staticmethod
    def _watch_shrink(part: _Partition, high: int) -> None:
        """Say so, once, when a partition's end falls below where the flow has read it
        to: the broker lost its data (an in-memory broker restarted) or the topic was
        created again while the flow ran. The start checks this (``flows.input_ends``);
        a running flow can only tell: what is written there up to the old offset will
        be skipped as applied."""
        shrunk = 0 <= high < part.next_offset
        if shrunk and not part.shrunk:
            log.error(
                "%s[%d] now ends at offset %d, before offset %d, which the flow has read it "
                "to: the topic was created again or the broker lost its data. What is "
                "written there up to that offset will be skipped as already applied: stop "
                "the flow and start it on a clean state (docs/operations.md, \"Recovery "
                "after failures\")",
                part.topic, part.partition, high, part.next_offset,
            )  # fmt: skip
        elif part.shrunk and not shrunk:
            log.warning("%s[%d] ends at offset %d again, at or past where it was read to",
                        part.topic, part.partition, high)  # fmt: skip
        part.shrunk = shrunk

    @staticmethod
    def _watch_stall(
        part: _Partition,
        got_data: bool,
        now: float,
        others_got_data: bool,
        stall_s: float = STALL_SECONDS,
    ) -> None:
        """Say so when a partition not yet read to its end delivers nothing for a while.

        While other partitions of the same reader deliver, the broker is reachable:
        the partition may wait behind them (catching up, librdkafka's fetch queue is
        shared), or its own leader may be down; the warning says both.
        """
        if got_data or part.at_end:
            if part.stalled:
                log.warning(
                    "%s[%d]: data again after %.1f s",
                    part.topic,
                    part.partition,
                    now - part.last_data,
                )
                part.stalled = False
            part.last_data = now
        elif not part.stalled and now - part.last_data >= stall_s - _CLOCK_SLACK_S:
            part.stalled = True
            get_metrics().source_stalls.labels(part.topic).inc()
            log.warning(
                "%s[%d]: no data for %.0f s although not read to its end at offset %d: %s",
                part.topic,
                part.partition,
                now - part.last_data,
                part.next_offset,
                "other partitions are delivering, so it waits behind them (catching up) "
                "or its leader broker is unreachable"
                if others_got_data
                else "is the broker reachable?",
            )

    def next_awake(self) -> datetime | None:
        # An idle reader is polled every 20 ms instead of spinning a core.
        return datetime.now(UTC) + _IDLE_BACKOFF if self._idle else None

    def close(self) -> None:
        self._consumer.close()


class CrmKafkaSource(DynamicSource[RawMessage]):
    """Every partition of the input topics, read from the offsets Redis holds.

    Each worker reads its share of the partitions (``routing.worker_share``)
    with one consumer. Bytewax keeps no
    resume state for it: Redis, the state of record, says where to start.
    """

    def __init__(
        self,
        brokers: list[str],
        topics: list[str],
        client_config: dict[str, Any],
        resume_offsets: Callable[[list[Position]], dict[Position, tuple[int, int]]],
        batch_size: int,
        step_ms: int,
        tail: bool,
        signals: StopSignals | None = None,
        consumer_config: dict[str, Any] | None = None,
        stall_s: float = STALL_SECONDS,
        group: str | None = None,
        group_commit_s: float = 5.0,
        clock_ms: Callable[[], int] = wall_clock_ms,
        max_future_ms: int = DEFAULT_MAX_FUTURE_MS,
    ):
        """``client_config`` goes to every client the source makes (its metadata
        lookups too), ``consumer_config`` over it to its consumers only (``kafka.client``
        and ``kafka.consumer``). ``group``: the consumer group the applied offsets are
        committed to every ``group_commit_s`` (``kafka.consumer_group``), None for none."""
        self._brokers = brokers
        self._topics = topics
        self._client_config = client_config
        self._consumer_overrides = dict(consumer_config or {})
        self._resume_offsets = resume_offsets
        self._batch_size = batch_size
        self._step_ms = step_ms
        self._tail = tail
        self._signals = signals
        self._stall_s = stall_s
        self._group = group
        self._group_commit_s = group_commit_s
        self._clock_ms = clock_ms
        self._max_future_ms = max_future_ms

    def list_parts(self) -> list[str]:
        """Every input partition's name, sorted (``routing.part_name``)."""
        admin = admin_client(self._brokers, self._client_config)
        parts = []
        for topic in self._topics:
            try:
                ids = partitions_of(admin, topic, 30)
            except TopicError as exc:
                raise SourceError(
                    f"input {exc} (create it with `crmstream topics create`)"
                ) from None
            parts.extend(part_name(topic, p) for p in ids)
        return sorted(parts)

    def positions(self) -> list[Position]:
        """Every input (topic, partition), as ``list_parts`` names them."""
        return [parse_part_name(p) for p in self.list_parts()]

    def build(self, step_id: str, worker_index: int, worker_count: int) -> _WorkerReader:
        every = self.list_parts()
        mine = worker_share(every, worker_index, worker_count)
        starts = self._resume_offsets(mine) if mine else {}
        for (topic, partition), (offset, _step) in starts.items():
            log.info("reading %s[%d] from offset %d", topic, partition, offset)
        commits = None
        if self._group and mine:
            commits = GroupCommits(self._resume_offsets, mine, self._group_commit_s)
        finisher = None
        if self._signals is not None and self._signals.finish is not None:
            barrier = self._signals.barrier or LocalBarrier()
            finisher = Finisher(barrier, worker_index, worker_count)
        watch = None
        if worker_index == 0:  # one per cluster: partitions added while it runs
            read: dict[str, list[int]] = {topic: [] for topic in self._topics}
            for topic, partition in map(parse_part_name, every):
                read[topic].append(partition)
            admin = admin_client(self._brokers, self._client_config)
            watch = PartitionWatch(describe_with(admin), read)
        return _WorkerReader(
            self.consumer_config(),
            starts,
            self._step_ms,
            self._batch_size,
            self._tail,
            self._signals,
            self._stall_s,
            commits,
            finisher,
            self._clock_ms,
            self._max_future_ms,
            watch,
        )

    def check_input_ends(
        self,
        applied: dict[Position, tuple[int, int, int, int]],
        starts: dict[Position, tuple[int, int]],
    ) -> None:
        """``flows.input_ends.problems``, raised (before the flow starts reading).

        :raises SourceError: naming the input partitions whose records are not those the
            shards applied (at most ``input_ends.NAMED`` of them, and how many more), or
            whose offsets cannot be read.
        """
        admin = admin_client(self._brokers, self._client_config)
        try:
            found = input_ends.problems(admin, self.consumer_config(), applied, starts)
        except KafkaException as exc:
            raise SourceError(f"cannot read the input partitions' offsets: {exc}") from None
        if found:
            named = found[: input_ends.NAMED]
            more = f"; and {len(found) - len(named)} more" if len(found) > len(named) else ""
            raise SourceError(
                "the state in Redis does not belong to this input: "
                + "; ".join(named)
                + more
                + ". The topic was deleted and created again, or the broker lost its data "
                "(an in-memory broker does on a restart), so these events would be skipped "
                "as already applied. Start with a clean state (another redis.key_prefix, or "
                "an empty Redis), or give the flow its input back"
            )

    def consumer_config(self) -> dict[str, Any]:
        """A worker's consumer: ``kafka.client`` and ``kafka.consumer`` over the fetch
        defaults; it never joins a group (partitions are assigned, and only commits go to
        the group) and reports each partition's end."""
        group = {"group.id": self._group, "on_commit": _on_commit} if self._group else {}
        return {
            **FETCH_DEFAULTS,
            # kafka.client, and kafka.consumer over it: either may set a fetch default
            **librdkafka_config(self._brokers, {**self._client_config, **self._consumer_overrides}),
            "group.id": "crmstream-source",  # required by librdkafka; assign() never joins
            **group,
            "enable.auto.commit": False,
            "enable.partition.eof": True,
            "auto.offset.reset": "earliest",
        }


def _on_commit(err: KafkaError | None, _partitions: list[TopicPartition]) -> None:
    if err is not None:
        log.warning("committing the applied offsets to the consumer group failed: %s", err.str())


class GroupCommits:
    """Commits the input offsets the shards have applied (what Redis holds, what a
    restart resumes from) to the consumer group, so lag tools see the flow's lag.
    crmstream itself never reads them back."""

    def __init__(
        self,
        applied: Callable[[list[Position]], dict[Position, tuple[int, int]]],
        positions: list[Position],
        every_s: float,
    ):
        self._applied = applied
        self._positions = positions
        self._every_s = every_s
        self._last = time.monotonic()

    def maybe_commit(self, consumer: Consumer, now: float) -> None:
        if now - self._last < self._every_s:
            return
        self._last = now
        self.commit(consumer, asynchronous=True)

    def commit(self, consumer: Consumer, asynchronous: bool) -> None:
        try:
            starts = self._applied(self._positions)
        except (RedisError, StateStoreError) as exc:  # the shards report Redis trouble
            log.warning("cannot read the applied offsets for the consumer group: %s", exc)
            return
        offsets = [TopicPartition(t, p, off) for (t, p), (off, _step) in starts.items() if off > 0]
        if offsets:
            consumer.commit(offsets=offsets, asynchronous=asynchronous)

"""Finishing the step on a drain: every worker of the cluster stops at one step boundary.

This module owns how a source stops when ``crmstream run`` is asked to drain
(SIGTERM/SIGINT, ``crmstream.lifecycle``). Stopping each reader where it
happens to be would leave the shards a step with part of its input, and
applying that part changes what the step does (its timers fire against
another watermark): the resumed run would differ from an uninterrupted one.
Instead every worker reports the last step it has handed on, the cluster
agrees on the highest of them (``StepBarrier``), and each worker then reads
every partition up to the end of that step and no further: each step the
shards hold is complete, so the drain applies whole steps only, and the
restart resumes at the first message of the next step, as after a crash.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Protocol

from confluent_kafka import KafkaError

if TYPE_CHECKING:
    import redis

    from crmstream.flows.source import RawMessage, _WorkerReader

_ASK_EVERY_S = 0.1


class StepBarrier(Protocol):
    def agree(self, worker: int, workers: int, step: int) -> int | None:
        """Report this worker's last step; the step every worker finishes once all
        ``workers`` have reported (None until then)."""


class LocalBarrier:
    """The barrier of a single worker: its own step."""

    def agree(self, worker: int, workers: int, step: int) -> int | None:
        return step if workers == 1 else None


class RedisBarrier:
    """The cluster's barrier: a Redis hash per drain (``generation``: the drain counter's
    value, ``lifecycle.ClusterDrain``) of each worker's last step."""

    def __init__(self, client: redis.Redis, prefix: str):
        self._client = client
        self._prefix = prefix
        self.generation = "0"
        self._reported: set[int] = set()

    def agree(self, worker: int, workers: int, step: int) -> int | None:
        if workers == 1:
            return step
        key = f"{self._prefix}:drain:{self.generation}:steps"
        if worker not in self._reported:
            pipe = self._client.pipeline(transaction=False)
            pipe.hset(key, str(worker), step)
            pipe.expire(key, 86_400)
            pipe.execute()
            self._reported.add(worker)
        steps = self._client.hvals(key)
        if len(steps) < workers:
            return None
        return max(int(s) for s in steps)


class Finisher:
    """One worker's reader during a drain (see module docstring)."""

    def __init__(self, barrier: StepBarrier, worker: int, workers: int):
        self._barrier = barrier
        self._worker = worker
        self._workers = workers
        self.step: int | None = None
        self._asked = 0.0
        self._done: set[tuple[str, int]] = set()

    def next_batch(self, reader: _WorkerReader) -> list[RawMessage]:
        """What to hand on next; sets ``reader.finished`` once every partition is done."""
        from crmstream.flows.source import CAUGHT_UP_OFFSET, RawMessage

        parts = reader.partitions
        if self.step is None:
            now = time.monotonic()
            if now - self._asked < _ASK_EVERY_S:
                return []
            self._asked = now
            mine = max((p.step for p in parts.values()), default=-1)
            self.step = self._barrier.agree(self._worker, self._workers, mine)
            if self.step is None:
                return []  # hold: the others have not reported yet
            # at its end before the drain (in live mode: the last fetch's end)
            self._done = {pos for pos, p in parts.items() if p.at_end}
        batch: list[RawMessage] = []
        step_ms = reader.step_ms
        newest = reader.newest_stamp()
        for msg in reader.consumer.consume(reader.batch_size, 0) if parts else ():
            pos = (msg.topic(), msg.partition())
            err = msg.error()
            if err is not None:
                if err.code() == KafkaError._PARTITION_EOF and pos in parts:
                    part = parts[pos]
                    part.at_end = True
                    self._done.add(pos)
                    batch.append(RawMessage(None, None, pos[0], pos[1], CAUGHT_UP_OFFSET, 0,
                                            part.step))  # fmt: skip
                else:
                    reader.on_error(msg, err)
                continue
            if pos in self._done:
                continue
            part = parts[pos]
            ts_type, ts = msg.timestamp()
            ts = ts if ts_type else 0
            step = max(part.step, ts // step_ms) if ts <= newest else part.step
            if step > self.step:
                self._done.add(pos)  # the next step starts here: the restart reads it
                continue
            part.step, part.next_offset = step, msg.offset() + 1
            batch.append(RawMessage(msg.key(), msg.value(), pos[0], pos[1], msg.offset(), ts, step))
        if len(self._done) >= len(parts):
            reader.finished = True
        return batch

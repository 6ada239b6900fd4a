"""The per-shard stateful step of the dataflow: Bytewax's side of a state shard.

This module owns the glue between Bytewax and the parts of a shard
(docs/architecture.md draws them):

- ``flows.route``: one item per shard per input batch and processing step;
- ``flows.sequencer``: which steps every input partition has passed, and the
  event-time watermark;
- ``flows.shard_step``: a step's rounds of Redis and Kafka I/O around
  ``operators.customer_step``, the pure per-customer event-time step.

``ShardLogic`` applies steps as they close, ticks the watermark in live mode
(``notify_at``), and at start produces what an earlier run left in the outbox.
The outbox makes triggers at-least-once with stable ids and keeps the broker
out of the step's critical path; the offsets inside the committed state make
the state's effect exactly-once.
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta

from bytewax.operators import StatefulBatchLogic

from crmstream.flows.route import NO_STEP, ShardBatch, route_batch
from crmstream.flows.runtime import Runtime
from crmstream.flows.sequencer import Step, StepSequencer
from crmstream.flows.shard_step import ShardStep
from crmstream.flows.sink import Outbox, Outgoing, decode_outgoing
from crmstream.state.store import Position

__all__ = ["NO_STEP", "ShardBatch", "ShardLogic", "route_batch"]

log = logging.getLogger(__name__)
DAMAGED_TOPIC = "(unknown: damaged outbox entry)"  # the ``unsent`` topic of its dead letter


class ShardLogic(StatefulBatchLogic[ShardBatch, dict[str, int], None]):
    """One state shard. Its durable state is in Redis; Bytewax snapshots hold nothing."""

    def __init__(self, runtime: Runtime, live: bool, partitions: list[Position]):
        # Bytewax hands the builder no key, so the shard is learnt from the first item.
        self._rt = runtime
        self._live = live
        self._timers_cfg = runtime.config.timers
        self._sequencer = StepSequencer(partitions, live)
        self._outbox = Outbox(runtime.producer)  # named once the shard is known
        self._step: ShardStep | None = None

    def snapshot(self) -> None:
        return None

    def notify_at(self) -> datetime | None:
        if not self._live or self._step is None:
            return None
        return datetime.now(UTC) + timedelta(milliseconds=self._timers_cfg.tick_ms)

    def on_notify(self) -> tuple[Iterable[dict[str, int]], bool]:
        return self._step.run([], [], {}, self._mark), StatefulBatchLogic.RETAIN

    def on_eof(self) -> tuple[Iterable[dict[str, int]], bool]:
        if self._step is None:
            return [], StatefulBatchLogic.RETAIN
        summaries = []
        for step in self._sequencer.drain():
            summaries += self._apply(step)
        summaries += self._step.run([], [], {}, self._mark)
        if self._rt.config.processing.exactly_once and self._outbox.pending():
            self._rt.producer.flush()
            self._step.commit_idle(self._rt.clock_ms())  # trims the outbox
        return summaries, StatefulBatchLogic.RETAIN

    def on_batch(self, items: list[ShardBatch]) -> tuple[Iterable[dict[str, int]], bool]:
        if self._step is None:
            self._start(items[0].shard)
        self._sequencer.add(items, self._rt.clock_ms())
        summaries = []
        for step in self._sequencer.ready():
            summaries += self._apply(step)
        return summaries, StatefulBatchLogic.RETAIN

    def _start(self, shard: int) -> None:
        self._outbox = Outbox(self._rt.producer, f"shard {shard} outbox")
        self._step = ShardStep(self._rt, shard, self._live, self._outbox)
        for pos, rec in self._step.progress.items():
            self._sequencer.watermark.seed(pos, rec.max_event_ms)
        left = self._rt.store.load_outbox(shard)
        if left:  # what an earlier run committed to the outbox and did not see delivered
            log.warning(
                "shard %d: sending %d record(s) left in the outbox by an earlier run "
                "(at-least-once: same ids)",
                shard,
                len(left),
            )
            key = self._rt.store.outbox_key(shard)
            self._outbox.send(self._left(key, k, entry) for k, entry in enumerate(left))

    def _left(self, key: str, k: int, entry: bytes) -> Outgoing:
        """An outbox entry as the record it holds; one that is not an outbox record (cut
        short or edited by hand) or is addressed to no output topic of this
        configuration, as the dead letter that stands for it, so that it does not fail
        every start or go to another topic (cause ``damaged``)."""
        try:
            record = decode_outgoing(entry)
        except (struct.error, ValueError) as error:  # UnicodeDecodeError too
            why = f"entry {k} of {key!r} is not an outbox record ({error})"
            return self._rt.producer.stand_in(DAMAGED_TOPIC, None, entry, why, "damaged")
        outputs = self._rt.config.kafka.topics.outputs
        if record.topic not in outputs:
            why = f"entry {k} of {key!r} is addressed to {record.topic!r}, not to {outputs}"
            return self._rt.producer.stand_in(DAMAGED_TOPIC, None, entry, why, "damaged")
        return record

    def _apply(self, step: Step) -> list[dict[str, int]]:
        self._sequencer.watermark.observe(step.event_times, self._rt.clock_ms(), step.positions)
        taken = self._step.unapplied(
            step.number, step.events, step.invalid, step.positions,
            self._sequencer.watermark.newest, step.marks,
        )  # fmt: skip
        if taken is None:
            return []
        return self._step.run(*taken, self._mark)

    def _mark(self, wall_ms: int) -> int | None:
        return self._sequencer.mark(wall_ms, self._timers_cfg.idle_watermark_ms)

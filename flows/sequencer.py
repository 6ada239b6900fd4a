"""Step sequencing and the event-time watermark of one state shard.

This module owns when a processing step is applied and how far event time has
passed. Input is applied one processing step at a time
(``source.RawMessage.step``): a step is applied once every input partition has
delivered a later step or is read to its end, so what a step holds follows
from the input log alone, not from how reads happened to be batched. The
watermark says which timers may fire (``Watermark``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

from crmstream.flows.route import NO_STEP, ShardBatch
from crmstream.operators.events import InvalidEvent, ParsedEvent
from crmstream.state.store import Position


class Watermark:
    """A shard's event-time watermark over the input partitions.

    The watermark is the lowest, over partitions that still hold it back, of
    each partition's newest event time: no timer fires while a lagging
    partition (say, orders behind clickstream) could still cancel it; there is
    none while one that holds it back has brought no event yet. A
    partition holds it back after step n while it has data in a later step or
    is not read to its end; when none does, it is the newest event time. In
    live mode an input idle for ``idle_ms`` lets it follow the wall clock.
    Per-partition times are committed with the shard's progress and seeded
    from it on restart, so a replayed step sees the watermark it first saw.
    """

    def __init__(self) -> None:
        self._times: dict[Position, int] = {}
        self._seen: set[Position] = set()  # partitions a step applied brought messages of
        self._last_data_ms = 0

    def seed(self, pos: Position, max_event_ms: int) -> None:
        self._seen.add(pos)
        if max_event_ms > self._times.get(pos, -1):
            self._times[pos] = max_event_ms

    def newest(self, pos: Position) -> int:
        return self._times.get(pos, -1)

    def observe(
        self, event_times: dict[Position, int], wall_ms: int, positions: Iterable[Position] = ()
    ) -> None:
        self._seen.update(positions)
        for pos, ts in event_times.items():
            if ts > self._times.get(pos, -1):
                self._times[pos] = ts
        self._last_data_ms = wall_ms

    def value(
        self,
        partitions: list[Position],
        holding: Callable[[Position], bool],
        live: bool,
        wall_ms: int,
        idle_ms: int,
    ) -> int | None:
        held = [p for p in partitions if holding(p)]
        if any(p not in self._times and p not in self._seen for p in held):
            # A partition that holds it back and has brought nothing yet: its first
            # event may be of any time, so no timer may fire on the others' word. (One
            # that brought only invalid messages does not hold it: those never end.)
            return None
        active = [self._times[p] for p in held if p in self._times]
        mark = min(active) if active else max(self._times.values(), default=None)
        if live and not active and wall_ms - self._last_data_ms >= idle_ms:
            mark = wall_ms if mark is None else max(mark, wall_ms)
        return mark


_NO_MARK = (-1, -1)


class Step:
    """A processing step's input gathered for one shard until every partition has passed it."""

    __slots__ = ("event_times", "events", "invalid", "marks", "number", "positions")

    def __init__(self, number: int) -> None:
        self.number = number
        self.events: list[ParsedEvent] = []
        self.invalid: list[InvalidEvent] = []
        self.positions: dict[Position, int] = {}
        self.event_times: dict[Position, int] = {}
        self.marks: dict[Position, tuple[int, int]] = {}  # the record at each position

    def add(self, item: ShardBatch) -> None:
        self.events += item.events
        self.invalid += item.invalid
        for pos, off in item.positions.items():
            if off > self.positions.get(pos, -1):
                self.positions[pos] = off
                self.marks[pos] = item.marks.get(pos, _NO_MARK)
        for pos, ts in item.event_times.items():
            if ts > self.event_times.get(pos, -1):
                self.event_times[pos] = ts


class StepSequencer:
    """Gathers a shard's items into steps and hands out those every partition has passed.

    Bounded runs (backfills, replays, the crash test) wait for proof that a
    partition has passed a step: a later step from it, or its end. Live input
    under steady load rarely has every partition at its end at once, so there
    a partition that reached its end since the step opened has passed it: what
    it brings later of this step is applied as more of it (latency over
    determinism; a bounded replay of the same log is still deterministic).
    """

    def __init__(self, partitions: list[Position], live: bool):
        self._partitions = partitions
        self._live = live
        self._pending: dict[int, Step] = {}
        self._last_step: dict[Position, int] = {}
        self._caught_up: set[Position] = set()
        self._applied_step = NO_STEP
        # Live input: when each partition last reached its end, and when each
        # pending step got its first data (see _passed).
        self._end_seen_ms: dict[Position, int] = {}
        self._step_opened_ms: dict[int, int] = {}
        self.watermark = Watermark()

    def add(self, items: list[ShardBatch], wall_ms: int) -> None:
        for item in items:
            if item.step != NO_STEP:
                # Live input can bring more of a step already applied: it is applied
                # as more of that step. Never as a later one: step numbers follow the
                # input's Kafka time, and a restart resumes from them (RawMessage.step).
                number = max(item.step, self._applied_step)
                pending = self._pending.get(number)
                if pending is None:
                    pending = self._pending[number] = Step(number)
                    self._step_opened_ms[number] = wall_ms
                pending.add(item)
                for pos in item.positions:
                    self._caught_up.discard(pos)
                    if item.step > self._last_step.get(pos, NO_STEP):
                        self._last_step[pos] = item.step
            self._caught_up.update(item.caught_up)
            for pos in item.caught_up:
                self._end_seen_ms[pos] = wall_ms

    def ready(self) -> Iterator[Step]:
        """The pending steps every partition has passed, in order, each taken out as it
        is handed out (it is the step applied then)."""
        while self._pending:
            number = min(self._pending)
            if not all(self._passed(pos, number) for pos in self._partitions):
                return
            yield self._close(number)

    def drain(self) -> Iterator[Step]:
        """Every pending step, in order (the input ended)."""
        while self._pending:
            yield self._close(min(self._pending))

    def holds(self, pos: Position) -> bool:
        """The partition holds the watermark back: it has more to deliver after this step."""
        return pos not in self._caught_up or self._last_step.get(pos, NO_STEP) > self._applied_step

    def mark(self, wall_ms: int, idle_ms: int) -> int | None:
        """The watermark now (see ``Watermark``). The wall clock moves it only while no
        step waits to be applied: catching up on a backlog, a step's timers must not fire
        past the events of the steps after it."""
        idle = self._live and not self._pending
        return self.watermark.value(self._partitions, self.holds, idle, wall_ms, idle_ms)

    def _passed(self, pos: Position, step: int) -> bool:
        if pos in self._caught_up or self._last_step.get(pos, NO_STEP) > step:
            return True
        return self._live and self._end_seen_ms.get(pos, -1) >= self._step_opened_ms[step]

    def _close(self, number: int) -> Step:
        step = self._pending.pop(number)
        self._step_opened_ms.pop(number, None)
        self._applied_step = number
        return step

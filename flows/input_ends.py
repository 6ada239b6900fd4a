"""What Redis says was applied, against what the input partitions hold: checked once,
before the flow starts reading (``crm.check_input``, in every process of a cluster).

Each shard drops the events at or below the offset it has applied of a partition as
already applied. When a partition ends before that offset, its events are other ones:
the topic was deleted and created again, or the broker lost its data (Tansu, in
memory, does on a restart). Each shard would then skip them without a word, until the
new offsets passed the old ones.

A partition's end is asked of the broker (ListOffsets). Tansu answers the base offset of
the last record batch plus one, which is below the end when that batch holds more than
one record; so an applied offset at or past the answer is confirmed by reading the
partition from there to its end (a fetch reports the end exactly), not refused at once.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from typing import Any

from confluent_kafka import Consumer, KafkaError, TopicPartition
from confluent_kafka.admin import AdminClient, OffsetSpec

from crmstream.state.store import Position

log = logging.getLogger(__name__)

PROBE_SECONDS = 30.0  # to read a partition's last records to its end


NAMED = 5  # partitions an error names; the rest are counted


def problems(
    admin: AdminClient,
    consumer_config: dict[str, Any],
    applied: dict[Position, tuple[int, int]],
    starts: dict[Position, tuple[int, int]],
    timeout_s: float = PROBE_SECONDS,
) -> list[str]:
    """One line per partition that ends at or before an offset a shard has applied, or
    no longer exists (``applied``: partition -> (highest offset applied, its shard)).
    The partitions' first and end offsets are asked in two requests for them all.

    A partition whose first offset is past where reading starts (``starts``: partition
    -> (next offset, step)) lost events to retention before they were applied: logged
    as a warning, as Kafka's own consumers go on from the first offset kept.

    :raises confluent_kafka.KafkaException: when the broker does not answer.
    """
    if not applied:
        return []
    found: dict[Position, str] = {}
    firsts = _offsets(admin, applied, OffsetSpec.earliest(), timeout_s)
    ends = _offsets(admin, applied, OffsetSpec.latest(), timeout_s)
    suspect: dict[Position, int] = {}  # partition -> its listed end
    for pos in sorted(applied):
        offset, shard = applied[pos]
        low, high = firsts[pos], ends[pos]
        if low is None or high is None:
            found[pos] = (f"{pos[0]}[{pos[1]}] does not exist, but shard {shard} has applied "
                          f"its events up to offset {offset}")  # fmt: skip
            continue
        if offset >= high:
            suspect[pos] = max(low, high)
        start = starts.get(pos, (0, -1))[0]
        if 0 < start < low:
            log.warning(
                "%s[%d]: offsets %d to %d were deleted (retention) before they were "
                "applied; reading goes on from %d: %d messages are lost",
                pos[0], pos[1], start, low - 1, low, low - start,
            )  # fmt: skip
    if suspect:
        probe = Consumer(
            {
                **{k: v for k, v in consumer_config.items() if k != "on_commit"},
                "group.id": "crmstream-input-ends",
                "enable.auto.commit": False,
                "enable.partition.eof": True,
                "auto.offset.reset": "error",
            }
        )
        try:
            read = _ends_by_reading(probe, suspect, applied, timeout_s)
        finally:
            probe.close()
        for pos in sorted(suspect):
            offset, shard = applied[pos]
            end = read.get(pos)
            if end is None:
                log.warning(
                    "%s[%d]: cannot read to its end within %.0f s to compare it with "
                    "offset %d, which shard %d has applied; going on",
                    pos[0], pos[1], timeout_s, offset, shard,
                )  # fmt: skip
            elif offset >= end:
                found[pos] = (f"{pos[0]}[{pos[1]}] ends at offset {end}, but shard {shard} "
                              f"has applied its events up to offset {offset}")  # fmt: skip
    return [found[pos] for pos in sorted(found)]


def _offsets(
    admin: AdminClient, positions: Iterable[Position], spec: OffsetSpec, timeout_s: float
) -> dict[Position, int | None]:
    """Each partition's offset by ``spec``, in one request; None for a partition the
    broker does not have (a topic created again with fewer partitions, or gone)."""
    positions = list(positions)
    meta = admin.list_topics(timeout=timeout_s).topics
    there = {
        (t, p)
        for t, p in positions
        if t in meta and meta[t].error is None and p in meta[t].partitions
    }
    got: dict[Position, int | None] = dict.fromkeys(positions)
    if there:
        asked = {TopicPartition(t, p): spec for t, p in sorted(there)}
        for tp, future in admin.list_offsets(asked, request_timeout=timeout_s).items():
            got[tp.topic, tp.partition] = future.result().offset
    return got


def _ends_by_reading(
    probe: Consumer,
    starts: dict[Position, int],
    applied: dict[Position, tuple[int, int]],
    timeout_s: float,
) -> dict[Position, int]:
    """Per partition, read from ``starts`` on (all at once): its end offset, or, as soon
    as a record at or past its applied offset is read, that record's offset plus one
    (the partition holds the applied offset). Partitions with neither within
    ``timeout_s`` are left out.

    A fetch past the end is answered with an out-of-range error by Kafka and with
    nothing by Tansu; the listed end is never past the real one, so reading from it
    sees a record or the end itself."""
    probe.assign([TopicPartition(t, p, off) for (t, p), off in starts.items()])
    ends: dict[Position, int] = {}
    try:
        deadline = time.monotonic() + timeout_s
        while len(ends) < len(starts) and time.monotonic() < deadline:
            msg = probe.poll(0.05)
            if msg is None:
                continue
            pos = (msg.topic(), msg.partition())
            if pos not in starts or pos in ends:
                continue
            err = msg.error()
            if err is None:
                if msg.offset() >= applied[pos][0]:
                    ends[pos] = msg.offset() + 1
            elif err.code() == KafkaError._PARTITION_EOF:
                ends[pos] = msg.offset()
            elif err.code() in (KafkaError._AUTO_OFFSET_RESET, KafkaError.OFFSET_OUT_OF_RANGE):
                ends[pos] = starts[pos]
        return ends
    finally:
        probe.unassign()

"""What Redis says was applied, against what the input partitions hold: checked once,
before a worker reads its partitions (``source.CrmKafkaSource.build``).

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
from typing import Any

from confluent_kafka import Consumer, KafkaError, TopicPartition

from crmstream.state.store import Position

log = logging.getLogger(__name__)

PROBE_SECONDS = 30.0  # to read a partition's last records to its end


def problems(
    consumer_config: dict[str, Any],
    applied: dict[Position, tuple[int, int]],
    starts: dict[Position, tuple[int, int]],
    timeout_s: float = PROBE_SECONDS,
) -> list[str]:
    """One line per partition that ends at or before an offset a shard has applied
    (``applied``: partition -> (highest offset applied, its shard)).

    A partition whose first offset is past where reading starts (``starts``: partition
    -> (next offset, step)) lost events to retention before they were applied: logged
    as a warning, as Kafka's own consumers go on from the first offset kept.

    :raises confluent_kafka.KafkaException: when the broker does not answer.
    """
    found = []
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
        suspect: dict[Position, int] = {}  # partition -> its listed end
        for pos in sorted(set(applied) | set(starts)):
            low, high = probe.get_watermark_offsets(TopicPartition(*pos), timeout=timeout_s,
                                                    cached=False)  # fmt: skip
            if applied.get(pos, (-1, -1))[0] >= high:
                suspect[pos] = max(low, high)
            start = starts.get(pos, (0, -1))[0]
            if 0 < start < low:
                log.warning(
                    "%s[%d]: offsets %d to %d were deleted (retention) before they were "
                    "applied; reading goes on from %d: %d messages are lost",
                    pos[0], pos[1], start, low - 1, low, low - start,
                )  # fmt: skip
        ends = _ends_by_reading(probe, suspect, applied, timeout_s) if suspect else {}
        for pos in sorted(suspect):
            offset, shard = applied[pos]
            end = ends.get(pos)
            if end is None:
                log.warning(
                    "%s[%d]: cannot read to its end within %.0f s to compare it with "
                    "offset %d, which shard %d has applied; going on",
                    pos[0], pos[1], timeout_s, offset, shard,
                )  # fmt: skip
            elif offset >= end:
                found.append(
                    f"{pos[0]}[{pos[1]}] ends at offset {end}, but shard {shard} has "
                    f"applied its events up to offset {offset}"
                )
    finally:
        probe.close()
    return found


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

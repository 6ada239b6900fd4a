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
        for pos in sorted(set(applied) | set(starts)):
            tp = TopicPartition(*pos)
            low, high = probe.get_watermark_offsets(tp, timeout=timeout_s, cached=False)
            offset, shard = applied.get(pos, (-1, -1))
            if offset >= high:
                end = _end_by_reading(probe, tp, max(low, high - 1), offset, timeout_s)
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
            start = starts.get(pos, (0, -1))[0]
            if 0 < start < low:
                log.warning(
                    "%s[%d]: offsets %d to %d were deleted (retention) before they were "
                    "applied; reading goes on from %d: %d messages are lost",
                    pos[0], pos[1], start, low - 1, low, low - start,
                )  # fmt: skip
    finally:
        probe.close()
    return found


def _end_by_reading(
    probe: Consumer, tp: TopicPartition, start: int, wanted: int, timeout_s: float
) -> int | None:
    """The partition's end offset, read from ``start`` on; or, as soon as a record at or
    past ``wanted`` is read, that record's offset plus one (the partition holds
    ``wanted``). None when neither is seen within ``timeout_s``.

    A fetch past the end is answered with an out-of-range error by Kafka and with
    nothing by Tansu: reading from at most the listed end minus one sees a record or
    the end itself."""
    probe.assign([TopicPartition(tp.topic, tp.partition, start)])
    try:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            msg = probe.poll(0.2)
            if msg is None:
                continue
            err = msg.error()
            if err is None:
                if msg.offset() >= wanted:
                    return msg.offset() + 1
            elif err.code() == KafkaError._PARTITION_EOF:
                return msg.offset()
            elif err.code() in (KafkaError._AUTO_OFFSET_RESET, KafkaError.OFFSET_OUT_OF_RANGE):
                return start
        return None
    finally:
        probe.unassign()

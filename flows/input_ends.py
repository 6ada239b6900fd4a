"""What Redis says was applied, against what the input partitions hold: checked once,
before the flow starts reading (``crm.check_input``, in every process of a cluster).

Each shard drops the events at or below the offset it has applied of a partition as
already applied. When the partition now holds other records at those offsets, they
would be skipped without a word: the topic was deleted and created again, or the broker
lost its data (Tansu, in memory, does on a restart). Two checks tell:

- the partition ends at or before the applied offset (or no longer exists);
- the record at the applied offset is not the one applied: its Kafka time or the CRC-32
  of its value differs from the one the shard's progress keeps (``Progress.stamp``,
  ``Progress.digest``; progress an earlier release wrote keeps neither, and is compared
  by its end only). This catches input written again past the old offsets before the
  flow came back, replays of two files within one processing step too.

A partition's end is asked of the broker (ListOffsets). Tansu answers the base offset of
the last record batch plus one, which is below the end when that batch holds more than
one record; so an applied offset at or past the answer is confirmed by reading the
partition from there (a fetch reports the end exactly), not refused at once.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any, NamedTuple
from zlib import crc32

from confluent_kafka import Consumer, KafkaError, TopicPartition
from confluent_kafka.admin import AdminClient, OffsetSpec

from crmstream.state.store import Position

log = logging.getLogger(__name__)

PROBE_SECONDS = 30.0  # to read the records at the applied offsets, or the ends
NAMED = 5  # partitions an error names; the rest are counted


class _Seen(NamedTuple):
    """What reading a partition from an offset found first: the first record at or past
    the offset wanted (``at_end`` False: its offset, Kafka time and value CRC-32), or
    the end."""

    at_end: bool
    offset: int
    stamp: int
    digest: int


def problems(
    admin: AdminClient,
    consumer_config: dict[str, Any],
    applied: dict[Position, tuple[int, int, int, int]],
    starts: dict[Position, tuple[int, int]],
    timeout_s: float = PROBE_SECONDS,
) -> list[str]:
    """One line per partition whose records are not those a shard applied (``applied``:
    partition -> (highest offset applied, its shard, the Kafka time and value CRC-32 of
    that record, each -1 when not known)): it no longer exists, ends at or before the
    offset, or holds another record there. The partitions' first and end offsets are asked in two
    requests for them all, and their records read with one consumer.

    A partition whose first offset is past where reading starts (``starts``: partition
    -> (next offset, step)) lost events to retention before they were applied: logged
    as a warning, as Kafka's own consumers go on from the first offset kept.

    :raises confluent_kafka.KafkaException: when the broker does not answer.
    """
    if not applied:
        return []
    found: dict[Position, str] = {}
    firsts, ends = _offsets(admin, applied, [OffsetSpec.earliest(), OffsetSpec.latest()],
                            timeout_s)  # fmt: skip
    read_from: dict[Position, int] = {}
    for pos in sorted(applied):
        offset, shard, stamp, digest = applied[pos]
        low, high = firsts[pos], ends[pos]
        if low is None or high is None:
            found[pos] = (f"{pos[0]}[{pos[1]}] does not exist, but shard {shard} has applied "
                          f"its events up to offset {offset}")  # fmt: skip
            continue
        if offset >= high:  # past the listed end: confirmed by reading from there
            read_from[pos] = max(low, high)
        elif (stamp != -1 or digest != -1) and offset >= low:  # still there to compare
            read_from[pos] = offset
        start = starts.get(pos, (0, -1))[0]
        if 0 < start < low:
            log.warning(
                "%s[%d]: offsets %d to %d were deleted (retention) before they were "
                "applied; reading goes on from %d: %d messages are lost",
                pos[0], pos[1], start, low - 1, low, low - start,
            )  # fmt: skip
    if read_from:
        wanted = {pos: applied[pos][0] for pos in read_from}
        seen = _read(consumer_config, read_from, wanted, timeout_s)
        for pos in sorted(read_from):
            why = _differs(pos, applied[pos], seen.get(pos), timeout_s)
            if why:
                found[pos] = why
    return [found[pos] for pos in sorted(found)]


def unapplied(
    admin: AdminClient,
    consumer_config: dict[str, Any],
    starts: dict[Position, int],
    timeout_s: float = PROBE_SECONDS,
) -> dict[Position, int]:
    """The partitions that hold records at or past ``starts`` (partition -> the next
    offset the state would read), each with the first such offset: input the state has
    not applied. A partition that does not exist holds none.

    Each end is asked in one request for them all; an end listed at or below the start
    is confirmed by reading from it (Tansu lists ends short: the module's docstring)."""
    (ends,) = _offsets(admin, starts, [OffsetSpec.latest()], timeout_s)
    found: dict[Position, int] = {}
    read_from: dict[Position, int] = {}
    for pos, start in starts.items():
        end = ends[pos]
        if end is None:
            continue
        if end > start:
            found[pos] = start
        else:
            read_from[pos] = end
    if read_from:
        for pos, seen in _read(consumer_config, read_from, starts, timeout_s).items():
            if not seen.at_end:
                found[pos] = seen.offset
    return found


def _differs(
    pos: Position, applied: tuple[int, int, int, int], seen: _Seen | None, timeout_s: float
) -> str | None:
    """Why the partition's records are not those applied, or None."""
    offset, shard, stamp, digest = applied
    name = f"{pos[0]}[{pos[1]}]"
    if seen is None:
        log.warning(
            "%s: cannot read offset %d, which shard %d has applied, within %.0f s to "
            "compare it; going on", name, offset, shard, timeout_s,
        )  # fmt: skip
        return None
    if seen.at_end:
        if offset >= seen.offset:
            return (f"{name} ends at offset {seen.offset}, but shard {shard} has applied its "
                    f"events up to offset {offset}")  # fmt: skip
        return None
    if seen.offset != offset:  # a gap at its offset (compaction, a marker): nothing to compare
        return None
    other = f"{name} holds another record at offset {offset} than the one shard {shard} applied"
    if stamp != -1 and seen.stamp != stamp:
        return f"{other} (Kafka time {_iso(seen.stamp)}, not {_iso(stamp)})"
    if digest != -1 and seen.digest != digest:
        return f"{other} (Kafka time {_iso(seen.stamp)} as then, other bytes)"
    return None


def _iso(ms: int) -> str:
    try:
        return datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="milliseconds")
    except (OverflowError, ValueError, OSError):
        return str(ms)


def _offsets(
    admin: AdminClient,
    positions: Iterable[Position],
    specs: list[OffsetSpec],
    timeout_s: float,
) -> list[dict[Position, int | None]]:
    """Each partition's offset by each of ``specs``, one request a spec after one metadata
    request; None for a partition the broker does not have (a topic created again with
    fewer partitions, or gone)."""
    positions = list(positions)
    meta = admin.list_topics(timeout=timeout_s).topics
    there = sorted(
        (t, p)
        for t, p in positions
        if t in meta and meta[t].error is None and p in meta[t].partitions
    )
    found = []
    for spec in specs:
        got: dict[Position, int | None] = dict.fromkeys(positions)
        if there:
            asked = {TopicPartition(t, p): spec for t, p in there}
            for tp, future in admin.list_offsets(asked, request_timeout=timeout_s).items():
                got[tp.topic, tp.partition] = future.result().offset
        found.append(got)
    return found


def _read(
    consumer_config: dict[str, Any],
    read_from: dict[Position, int],
    wanted: dict[Position, int],
    timeout_s: float,
) -> dict[Position, _Seen]:
    """Per partition, read from ``read_from`` on (all at once, one consumer): the first
    record at or past its ``wanted`` offset, or its end. Partitions with neither within
    ``timeout_s`` are left out.

    A fetch past the end is answered with an out-of-range error by Kafka and with
    nothing by Tansu; the listed end is never past the real one, so reading from it
    sees a record or the end itself."""
    probe = Consumer(
        {
            **{k: v for k, v in consumer_config.items() if k != "on_commit"},
            "group.id": "crmstream-input-ends",
            "enable.auto.commit": False,
            "enable.partition.eof": True,
            "auto.offset.reset": "error",
        }
    )
    seen: dict[Position, _Seen] = {}
    try:
        probe.assign([TopicPartition(t, p, off) for (t, p), off in read_from.items()])
        deadline = time.monotonic() + timeout_s
        while len(seen) < len(read_from) and time.monotonic() < deadline:
            msg = probe.poll(0.05)
            if msg is None:
                continue
            pos = (msg.topic(), msg.partition())
            if pos not in read_from or pos in seen:
                continue
            err = msg.error()
            if err is None:
                if msg.offset() >= wanted[pos]:
                    ts_type, ts = msg.timestamp()
                    digest = crc32(msg.value() or b"")
                    seen[pos] = _Seen(False, msg.offset(), ts if ts_type else 0, digest)
            elif err.code() == KafkaError._PARTITION_EOF:
                seen[pos] = _Seen(True, msg.offset(), -1, -1)
            elif err.code() in (KafkaError._AUTO_OFFSET_RESET, KafkaError.OFFSET_OUT_OF_RANGE):
                seen[pos] = _Seen(True, read_from[pos], -1, -1)
        return seen
    finally:
        probe.close()

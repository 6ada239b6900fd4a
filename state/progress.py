"""A shard's progress per input partition, as its Redis hash holds it
(``<prefix>:progress:<shard>``: ``<topic>|<partition>`` -> ``Progress.encode``)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import NamedTuple

from crmstream.operators.params import LAST_TIME_MS
from crmstream.state.connection import StateStoreError

Position = tuple[str, int]  # (topic, partition)


class Progress(NamedTuple):
    """How far a shard has applied one input partition.

    ``offset`` is the highest offset applied, ``step`` the processing step it
    belonged to and ``max_event_ms`` the partition's newest event time so far:
    a restart resumes the source's step numbering and the shard's watermark
    from them, so the replayed steps equal the ones first processed. ``stamp`` and
    ``digest`` are the Kafka time and the CRC-32 of the value of the record at
    ``offset`` (-1: not known, as in progress an earlier release wrote): the start reads
    that record again to tell the input the state was built from from other input at
    the same offsets (``flows.input_ends``).
    """

    offset: int
    step: int
    max_event_ms: int
    stamp: int = -1
    digest: int = -1

    def encode(self) -> str:
        return f"{self.offset}:{self.step}:{self.max_event_ms}:{self.stamp}:{self.digest}"

    @classmethod
    def decode(cls, raw: bytes) -> Progress:
        offset, _, rest = raw.decode().partition(":")
        step, _, rest = rest.partition(":")
        max_event, _, rest = rest.partition(":")
        stamp, _, digest = rest.partition(":")
        return cls(int(offset), int(step or -1), int(max_event or -1), int(stamp or -1),
                   int(digest or -1))  # fmt: skip


def encode_progress(progress: Mapping[Position, Progress]) -> dict[str, str]:
    """A progress hash's fields: ``<topic>|<partition>`` -> ``Progress.encode``."""
    return {f"{t}|{p}": rec.encode() for (t, p), rec in progress.items()}


def lowest_progress(per_shard: Sequence[Mapping[Position, Progress]]) -> dict[Position, Progress]:
    """Per input partition, the lowest progress (by offset) over the shards. A partition
    some shard has no record of is left out: that shard has applied nothing from it."""
    if not per_shard:
        return {}
    common = set(per_shard[0]).intersection(*per_shard[1:])
    return {pos: min((p[pos] for p in per_shard), key=lambda r: r.offset) for pos in common}


def decode_progress(raw: Mapping[bytes, bytes], key: str = "") -> dict[Position, Progress]:
    """A progress hash as read from Redis (``key``: where, for the error).

    :raises StateStoreError: naming the key and field of a value that is not progress (the
        flow writes ``<topic>|<partition>`` -> ``<offset>:<step>:<newest event ms>``).
    """
    result = {}
    for field, value in raw.items():
        try:
            topic, _, partition = field.decode().rpartition("|")
            rec = result[topic, int(partition)] = Progress.decode(value)
            if not (
                int(partition) >= 0
                and rec.offset >= -1
                and rec.step >= -1
                and -1 <= rec.max_event_ms <= LAST_TIME_MS
                and -(2**63) <= rec.stamp < 2**63  # a producer may stamp before 1970
                and -1 <= rec.digest < 2**32
            ):
                raise ValueError("out of range")
        except ValueError:  # UnicodeDecodeError too
            raise StateStoreError(
                f"progress at {key!r}: field {field!r} = {value!r:.80} is not "
                "'<offset>:<step>:<event ms>[:<Kafka time>:<CRC>]' under '<topic>|<partition>' "
                "(offset and step >= -1, an event time up to the year 9999; "
                "edited by hand?); put it right or remove the field before starting"
            ) from None
    return result

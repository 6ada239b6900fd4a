"""A list of events as columns: the arrays the exactly-once checks, the step's bounds
and the customer step read, built once per round.

This module owns the transposition of parsed events into arrays (one C-level
pass, not a generator per field) and the selection of a subset of them.
"""

from __future__ import annotations

from itertools import compress
from typing import NamedTuple

import numpy as np

from crmstream.operators.events import ParsedEvent


class EventColumns(NamedTuple):
    """A list of events as arrays, one per field the step reads, in the list's order."""

    cust: np.ndarray  # int32: the customer's row
    time: np.ndarray  # int64 event time, ms
    ingest: np.ndarray  # int64 Kafka time, ms
    type_code: np.ndarray  # int8
    category: np.ndarray  # int16
    amount: np.ndarray  # float64, base currency
    aux: np.ndarray  # float64
    partition: np.ndarray  # int32
    offset: np.ndarray  # int64
    event_id: tuple[str, ...]
    topic: tuple[str, ...]

    @classmethod
    def of(cls, events: list[ParsedEvent], index: dict[str, int]) -> EventColumns:
        """The columns of ``events``, transposed once in C (not a generator per field)."""
        n = len(events)
        if not n:
            return cls(*(np.zeros(0, d) for d in _COLUMN_TYPES), (), ())
        cols = ParsedEvent._make(zip(*events, strict=True))
        return cls(
            np.fromiter(map(index.__getitem__, cols.customer_id), np.int32, n),
            np.fromiter(cols.event_time_ms, np.int64, n),
            np.fromiter(cols.ingest_ms, np.int64, n),
            np.fromiter(cols.type_code, np.int8, n),
            np.fromiter(cols.category, np.int16, n),
            np.fromiter(cols.amount_base, np.float64, n),
            np.fromiter(cols.aux, np.float64, n),
            np.fromiter(cols.partition, np.int32, n),
            np.fromiter(cols.offset, np.int64, n),
            cols.event_id,
            cols.topic,
        )

    def take(self, mask: np.ndarray) -> EventColumns:
        """The columns of the events ``mask`` keeps."""
        arrays = [column[mask] for column in self[: len(_COLUMN_TYPES)]]
        return EventColumns(*arrays, tuple(compress(self.event_id, mask)),
                            tuple(compress(self.topic, mask)))  # fmt: skip


_COLUMN_TYPES = (
    np.int32, np.int64, np.int64, np.int8, np.int16, np.float64, np.float64, np.int32, np.int64
)  # fmt: skip

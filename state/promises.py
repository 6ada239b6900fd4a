"""Open orders: each shipped order's promised delivery time, kept until it is delivered.

This module owns the values of ``{prefix}:{<customer>}:o`` (a hash of order id
to promise). A value is the promised time in epoch ms, followed by
``;customs`` once a customs hold gave the order the longer allowance. Values
written before customs holds were kept are plain numbers and read as such.
"""

from __future__ import annotations

from typing import NamedTuple


class Promise(NamedTuple):
    """An open order's promised delivery time, and whether customs held it."""

    promised_ms: int
    customs: bool = False

    def encode(self) -> str:
        return f"{self.promised_ms};customs" if self.customs else str(self.promised_ms)

    @classmethod
    def decode(cls, raw: bytes | str) -> Promise:
        text = raw.decode() if isinstance(raw, bytes) else raw
        ms, _, flag = text.partition(";")
        return cls(int(ms), flag == "customs")

"""Timers kept in the customer's record instead of the shard's timer set.

A timer set member costs about 130 bytes of Redis, and most customers have a
churn recheck pending, many a win-back step, a cart nudge or a potential
no-repeat. Those kinds (``FOLDED``) are kept in the customer's binary state as
what their due time and ref follow from: the recheck's and birthday's due
times, a bit per cart nudge (due at ``last_cart_ms`` plus its delay), the
win-back step (anchored at ``last_order_ms``) and the first order's time. One
``wake`` member per customer, due at the earliest of them, stands for them in
the timer set, so a quiet customer is still woken by the watermark.

This module owns that mapping: the due time of each slot (``due_columns``),
putting a scheduled timer into its slot when the record can give it back
exactly (``keep``), taking a due one out (``timers_of``, ``clear``). A timer the
record cannot give back exactly (a due time that is not the newest cart add
plus the delay, say) stays a member of the set. Scheduling a kind again
replaces its pending timer, as scheduling the same member again moves it.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from crmstream.config import CrmConfig
from crmstream.operators.params import (
    MS_PER_DAY,
    MS_PER_HOUR,
)
from crmstream.state.encoding import FLAG_CART_1, FLAG_CART_2
from crmstream.state.timers import Timer

WAKE = "wake"
# Timer kinds the record keeps (a win-back step under ``dormant``), in column order.
FOLDED = ("recheck", "birthday", "cart_1", "cart_2", "dormant", "potential")
CART_FLAGS = {"cart_1": FLAG_CART_1, "cart_2": FLAG_CART_2}
NEVER = np.iinfo(np.int64).max
# The record fields ``TimerSlots.due_of`` reads.
_DUE_FIELDS = ("recheck_due_ms", "birthday_due_ms", "rule_flags", "last_cart_ms", "dormant_days",
               "last_order_ms", "potential_ref_ms")  # fmt: skip
_CLEAR = {
    "recheck": ("recheck_due_ms",),
    "birthday": ("birthday_due_ms",),
    "dormant": ("dormant_days",),
    "potential": ("potential_ref_ms",),
}


def slot_of(kind: str) -> str | None:
    """The folded kind a timer kind is kept under, or None (a member of the timer set)."""
    if kind.startswith("dormant_"):
        return "dormant"
    return kind if kind in FOLDED else None


def _last_of(rows: np.ndarray) -> np.ndarray:
    """The positions of each row's last occurrence in ``rows`` (NumPy does not say which
    of repeated indices an assignment keeps)."""
    reverse_first = np.unique(rows[::-1], return_index=True)[1]
    return len(rows) - 1 - reverse_first


class TimerSlots:
    """The folded timers' due times and refs, from the configured delays."""

    def __init__(self, config: CrmConfig):
        rules = config.rules
        self._cart_delay = {
            "cart_1": int(rules.cart_abandoned.first_delay_minutes * 60_000),
            "cart_2": int(rules.cart_abandoned.second_delay_hours * MS_PER_HOUR),
        }
        self._potential_ms = rules.potential_no_repeat.days * MS_PER_DAY

    def due_of(self, kind: str, records: Any) -> Any:
        """The due time of the ``kind`` timer kept in each record (0: none pending):
        ``records`` is one record or an array of them (NumPy either way)."""
        if kind in ("recheck", "birthday"):
            return records[f"{kind}_due_ms"]
        if kind in CART_FLAGS:
            pending = records["rule_flags"] & CART_FLAGS[kind]
            return np.where(pending, records["last_cart_ms"] + self._cart_delay[kind], 0)
        if kind == "dormant":
            days = records["dormant_days"].astype(np.int64)
            return np.where(days > 0, records["last_order_ms"] + days * MS_PER_DAY, 0)
        ref = records["potential_ref_ms"]
        return np.where(ref != 0, ref + self._potential_ms, 0)

    @staticmethod
    def fields_at(records: np.ndarray, rows: np.ndarray) -> dict[str, np.ndarray]:
        """The fields the folded timers are kept in, of ``records[rows]``: what ``due_of``
        and ``due_columns`` read, without copying whole records."""
        return {field: records[field][rows] for field in _DUE_FIELDS}

    def due_columns(self, records: np.ndarray) -> np.ndarray:
        """``due_of`` every kind (columns in ``FOLDED`` order) for every record at once."""
        return np.stack([self.due_of(kind, records) for kind in FOLDED], axis=1)

    def earliest(self, records: np.ndarray) -> np.ndarray:
        """Per record, the earliest folded due time (``NEVER``: none pending)."""
        dues = self.due_columns(records)
        return np.where(dues > 0, dues, NEVER).min(axis=1, initial=NEVER)

    def timers_of(
        self, customers: list[str], records: np.ndarray, upto_ms: np.ndarray | None = None
    ) -> list[list[Timer]]:
        """Per record, the timers it keeps (only those due by ``upto_ms``, one bound per
        record, when given), earliest first."""
        dues = self.due_columns(records)
        hit = dues > 0
        if upto_ms is not None:
            hit &= dues <= np.asarray(upto_ms, np.int64)[:, None]
        out: list[list[Timer]] = [[] for _ in customers]
        rows, cols = np.nonzero(hit)
        for row, col, due in zip(
            rows.tolist(), cols.tolist(), dues[rows, cols].tolist(), strict=True
        ):
            out[row].append(self.timer(customers[row], records[row], FOLDED[col], due))
        for timers in out:
            timers.sort(key=lambda t: t.due_ms)
        return out

    @staticmethod
    def timer(customer: str, record: np.void, slot: str, due: int) -> Timer:
        """The timer a record keeps in ``slot``, due at ``due``."""
        kind, ref = slot, ""
        if slot == "birthday":
            month_day = int(record["birthday_md"])
            ref = f"{month_day // 100:02d}-{month_day % 100:02d}"
        elif slot == "dormant":
            kind, ref = f"dormant_{int(record['dormant_days'])}", str(record["last_order_ms"])
        elif slot == "potential":
            ref = str(int(record["potential_ref_ms"]))
        return Timer(customer, kind, ref, due)

    def keep(self, timers: list[Timer], rows: np.ndarray, records: np.ndarray) -> np.ndarray:
        """Put each timer of a folded kind into its record (``records[rows[k]]``) where the
        record gives back its due time and ref exactly; returns which were kept. Of
        several kept for one record, the last in the list wins, as one at a time."""
        kept = np.zeros(len(timers), bool)
        by_slot: dict[str, list[int]] = {}
        for k, timer in enumerate(timers):
            slot = slot_of(timer.kind)
            if slot is not None:
                by_slot.setdefault(slot, []).append(k)
        for slot, positions in by_slot.items():
            chosen = [timers[k] for k in positions]
            kept[positions] = self._keep(slot, chosen, rows[positions], records)
        return kept

    def _keep(
        self, slot: str, timers: list[Timer], rows: np.ndarray, records: np.ndarray
    ) -> np.ndarray:
        due = np.fromiter([t.due_ms for t in timers], np.int64, len(timers))
        ok = np.ones(len(timers), bool)
        # Recheck and birthday are always kept; the other kinds are each tried on a copy
        # of the timer's own record's timer fields (fields_at).
        checked = slot not in ("recheck", "birthday")
        trial = self.fields_at(records, rows) if checked else None
        if slot == "recheck":
            field, values = "recheck_due_ms", due
        elif slot == "birthday":
            md = np.array([int(t.ref[:2]) * 100 + int(t.ref[3:]) for t in timers], np.int64)
            last = _last_of(rows)
            records["birthday_md"][rows[last]] = md[last]
            field, values = "birthday_due_ms", due
        elif slot in CART_FLAGS:
            field = "rule_flags"
            values = trial[field] | np.uint8(CART_FLAGS[slot])
        elif slot == "dormant":
            days = np.fromiter([int(t.kind.split("_", 1)[1]) for t in timers], np.int64)
            anchors = [str(a) for a in trial["last_order_ms"].tolist()]
            ok = (days <= 65535) & np.array(
                [t.ref == a for t, a in zip(timers, anchors, strict=True)], bool
            )
            field, values = "dormant_days", np.where(ok, days, 0)
        else:  # potential
            field, values = "potential_ref_ms", np.array([int(t.ref) for t in timers], np.int64)
        if checked:
            trial[field] = values
            ok &= self.due_of(slot, trial) == due
        last = _last_of(rows[ok])
        records[field][rows[ok][last]] = values[ok][last]
        return ok

    @staticmethod
    def clear(slots: list[str], records: np.ndarray, rows: list[int]) -> None:
        """Forget the pending timer in ``slots[k]`` of ``records[rows[k]]``."""
        by_slot: dict[str, list[int]] = {}
        for slot, row in zip(slots, rows, strict=True):
            by_slot.setdefault(slot, []).append(row)
        for slot, of_slot in by_slot.items():
            if slot in CART_FLAGS:
                records["rule_flags"][of_slot] &= ~np.uint8(CART_FLAGS[slot])
            else:
                for field in _CLEAR[slot]:
                    records[field][of_slot] = 0

"""Failure stays with one customer (DESIGN.md decision 14, docs/architecture.md).

This module owns what happens when computing a round raises: which customers
made it raise (``failing``: the round computed again for halves of its
customers, down to single ones), and what becomes of them (``quarantine``):
their events of the round go to the dead-letter topic with
``reason: "processing_error: <type>: <message>"`` and their source positions,
their stored timers that were due and their ``wake`` move from the timer set
to the shard's quarantine (so they cannot make the next round raise again),
and their state stays as it was. The rest of the round is computed again
without them and commits as usual. ``crmstream quarantine`` lists and
releases quarantined timers.
"""

from __future__ import annotations

import logging
import traceback
from collections.abc import Callable
from typing import NamedTuple

import orjson

from crmstream.flows.dead_letters import dead_letter_record
from crmstream.flows.sink import Outgoing
from crmstream.operators.events import InvalidEvent, ParsedEvent
from crmstream.operators.timer_slots import WAKE
from crmstream.state.timers import Timer

log = logging.getLogger(__name__)

_REASON_CHARS = 300  # of the exception's message in a dead letter's reason
NAMED_PER_ROUND = 20  # customers set aside that a round logs one by one, with a traceback


class Quarantine(NamedTuple):
    """What a round writes for the customers it set aside."""

    customers: list[str]
    dead_letters: list[Outgoing]
    entries: dict[bytes, bytes]  # timer member -> what the quarantine keeps of it
    members: list[bytes]  # to remove from the timer set


def reason_of(error: BaseException) -> str:
    """``processing_error: <type>: <message>``, the message cut to a bounded length."""
    message = str(error)
    if len(message) > _REASON_CHARS:
        message = message[:_REASON_CHARS] + "…"
    return f"processing_error: {type(error).__name__}: {message}"


def failing(compute: Callable[[list[int]], object], rows: list[int]) -> dict[int, BaseException]:
    """The rows whose computation raises on its own, with the error each raised: ``rows``
    computed in halves, recursively, down to single rows (a failure is kept from the
    rows it was computed with). Empty when ``rows`` computes as a whole."""
    try:
        compute(rows)
    except Exception as error:  # any failure of one customer's work
        if len(rows) == 1:
            return {rows[0]: error}
        half = len(rows) // 2
        return {**failing(compute, rows[:half]), **failing(compute, rows[half:])}
    return {}


def quarantine(
    customers: dict[str, BaseException],
    events: list[ParsedEvent],
    members: list[Timer],
    wake_due: dict[str, int | None],
    dead_letter_topic: str,
    redact: object,
    now_ms: int,
    shard: int,
) -> Quarantine:
    """Set aside the ``customers`` whose work raised: dead letters for their ``events``,
    and their due ``members`` moved to the quarantine, with the ``wake`` that stands for
    the timers their state keeps (due at ``wake_due``; None: none pending)."""
    dead: list[Outgoing] = []
    for ev in events:
        error = customers.get(ev.customer_id)
        if error is None:
            continue
        bad = InvalidEvent(reason_of(error), None, ev.customer_id, ev.customer_id.encode(),
                           _as_parsed(ev), ev.topic, ev.partition, ev.offset)  # fmt: skip
        dead.append(Outgoing(dead_letter_topic, bad.key, dead_letter_record(bad, redact)))
    entries: dict[bytes, bytes] = {}
    for timer in members:
        error = customers.get(timer.customer)
        if error is not None:
            entry = {"customer": timer.customer, "kind": timer.kind, "ref": timer.ref,
                     "due_ms": timer.due_ms}  # fmt: skip
            entries[timer.member] = orjson.dumps(
                {**entry, "reason": reason_of(error), "at_ms": now_ms}
            )
    removed = list(entries)
    for customer, error in customers.items():  # a wake not loaded now would come due again
        wake = Timer(customer, WAKE, "", 0).member
        removed.append(wake)
        due = wake_due.get(customer)
        if due is not None:
            entry = {"customer": customer, "kind": WAKE, "ref": "", "due_ms": due}
            entries[wake] = orjson.dumps({**entry, "reason": reason_of(error), "at_ms": now_ms})
    # Each customer named, not held back as a repeat of the last one (outsider 49: the
    # log's once-a-minute limit named 2 of 6), up to a bound per round against a flood.
    named = list(customers.items())
    for customer, error in named[:NAMED_PER_ROUND]:
        log.error(
            "shard %d: customer %r set aside: %s; its events of the round are dead-lettered "
            "and its due timers quarantined (crmstream quarantine)\n%s",
            shard,
            customer,
            reason_of(error),
            "".join(traceback.format_exception(error)[-6:]),
            extra={"unlimited": True},
        )
    if len(named) > NAMED_PER_ROUND:
        rest = [customer for customer, _ in named[NAMED_PER_ROUND:]]
        for start in range(0, len(rest), 100):  # every one named (outsider 50: 60 of 300 not)
            log.error(
                "shard %d: %d more customers set aside in the round (crmstream quarantine list "
                "shows each)%s: %s",
                shard, len(rest), f", {start + 1} to {min(start + 100, len(rest))}"
                if len(rest) > 100 else "", ", ".join(map(repr, rest[start:start + 100])),
                extra={"unlimited": True},
            )  # fmt: skip
    return Quarantine(list(customers), dead, entries, sorted(set(removed)))


def _as_parsed(ev: ParsedEvent) -> bytes:
    """The event as the flow read it (its original bytes are not kept past parsing; its
    source position names them): id, customer, type, time and the fields it kept."""
    from crmstream.operators.events import EVENT_TYPES

    head = {"event_id": ev.event_id, "customer_id": ev.customer_id,
            "event_type": EVENT_TYPES[ev.type_code], "event_time": ev.event_time_ms}  # fmt: skip
    return orjson.dumps({**head, **(ev.fields or {})})

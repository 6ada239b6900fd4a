"""Comparing two runs of the same history: the exact diff and each run's figures.

This module owns what ``crmstream backtest`` compares, with no I/O. Each run's
outputs become one ``Outcome`` per trigger id: sent (when, on which channel,
with which payload) or suppressed (by which policy). Trigger ids are
deterministic (customer, type, rule version, causal event or timer), so the
same trigger has the same id under both configurations, and the diff matches
ids exactly: an id whose outcome is the same under both is not in it. An id is

- ``only_base`` / ``only_candidate``: the rule fired (sent or suppressed) under
  one configuration only;
- ``sent_to_suppressed`` / ``suppressed_to_sent``: a policy decided otherwise;
- ``policy_changed``: suppressed under both, by different policies;
- ``send_time_moved``: sent under both, at different times (quiet hours);
- ``content_changed``: sent under both at the same time, with another channel
  or payload (e.g. a regional rule took a category out of ``top_categories``).

The figures of each run: triggers sent by type, suppressions by policy,
customers contacted and contacts per customer, the share of customers stopped
by a frequency cap at least once, and quiet-hours deferrals.
"""

from __future__ import annotations

import statistics
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import orjson

CHANGE_KINDS = (
    "only_base",
    "only_candidate",
    "sent_to_suppressed",
    "suppressed_to_sent",
    "policy_changed",
    "send_time_moved",
    "content_changed",
)
CONTACT_BUCKETS = ("1", "2", "3", "4", "5", "6-10", "11+")
SHIFT_BUCKETS_H = (
    (0, 1, "<1 h"),
    (1, 3, "1-3 h"),
    (3, 6, "3-6 h"),
    (6, 12, "6-12 h"),
    (12, 10**9, "12 h+"),
)
ERASED = "erased"  # the customer id suppressions show after an erasure (docs/triggers.md)


def _ms(iso: str | None) -> int | None:
    if not iso:
        return None
    try:
        return int(datetime.fromisoformat(iso).timestamp() * 1000)
    except (TypeError, ValueError):
        return None


@dataclass(frozen=True)
class Outcome:
    """What became of one trigger id in one run."""

    trigger_id: str
    trigger_type: str
    customer_id: str
    status: str  # "sent" | "suppressed"
    policy: str | None  # the suppressing policy
    event_time: str  # when the rule fired (event time)
    send_at: str | None  # when it goes out: the quiet-hours end, not_before, or event time
    held: bool  # held through quiet hours past the history's end (not yet emitted)
    record: dict[str, Any] = field(compare=False, hash=False)

    @property
    def sent(self) -> bool:
        return self.status == "sent"

    def content(self) -> bytes:
        """What the customer would get besides the time: channel, language, payload."""
        r = self.record
        return orjson.dumps(
            [r.get("channel"), r.get("language"), r.get("payload")], option=orjson.OPT_SORT_KEYS
        )

    def shift_ms(self) -> int:
        """How long quiet hours moved the send (0: sent at the event time)."""
        at, fired = _ms(self.send_at), _ms(self.event_time)
        return max(0, at - fired) if at is not None and fired is not None else 0

    def as_json(self) -> dict[str, Any]:
        return {
            "status": self.status,
            "policy": self.policy,
            "event_time": self.event_time,
            "send_at": self.send_at,
            "held_past_end": self.held,
        }


def sent_outcome(record: dict[str, Any], held: bool = False) -> Outcome:
    """The outcome of a trigger record (emitted, or ``held`` in a quiet-hours timer)."""
    deferred = record.get("deferred") or {}
    send_at = deferred.get("until") or record.get("not_before") or record.get("event_time")
    return Outcome(
        record["trigger_id"],
        record["trigger_type"],
        record["customer_id"],
        "sent",
        None,
        record.get("event_time", ""),
        send_at,
        held,
        record,
    )


def suppressed_outcome(record: dict[str, Any]) -> Outcome:
    return Outcome(
        record["trigger_id"],
        record["trigger_type"],
        record["customer_id"],
        "suppressed",
        record.get("policy"),
        record.get("event_time", ""),
        None,
        False,
        record,
    )


@dataclass
class RunOutputs:
    """One run's outcomes by trigger id, and what else it emitted."""

    outcomes: dict[str, Outcome] = field(default_factory=dict)
    dead_letters: int = 0
    repeated: int = 0  # records seen again with the same id and outcome (re-emitted)
    conflicting: list[str] = field(default_factory=list)  # ids with two different outcomes

    def add(self, outcome: Outcome) -> None:
        seen = self.outcomes.get(outcome.trigger_id)
        if seen is None:
            self.outcomes[outcome.trigger_id] = outcome
        elif seen == outcome:
            self.repeated += 1
        else:  # the first kept: ``run_outputs`` adds what went out first
            self.conflicting.append(outcome.trigger_id)


def detected_since(run: RunOutputs, since_ms: int | None) -> RunOutputs:
    """``run`` with only the triggers detected at or after ``since_ms`` (None: all)."""
    if since_ms is None:
        return run
    kept = {tid: o for tid, o in run.outcomes.items() if (_ms(o.event_time) or 0) >= since_ms}
    return RunOutputs(kept, run.dead_letters, run.repeated, run.conflicting)


def run_outputs(
    triggers: Iterable[dict[str, Any]],
    suppressions: Iterable[dict[str, Any]],
    held: Iterable[dict[str, Any]] = (),
    dead_letters: int = 0,
) -> RunOutputs:
    """A run's outcomes from its trigger and suppression records and the trigger records
    still held through quiet hours when the history ended. An id both sent and
    suppressed (which the flow never does) keeps the send: it is what the customer got."""
    out = RunOutputs(dead_letters=dead_letters)
    for record in triggers:
        out.add(sent_outcome(record))
    for record in held:
        out.add(sent_outcome(record, held=True))
    for record in suppressions:
        out.add(suppressed_outcome(record))
    return out


@dataclass(frozen=True)
class Change:
    trigger_id: str
    trigger_type: str
    customer_id: str
    kind: str  # one of CHANGE_KINDS
    base: Outcome | None
    candidate: Outcome | None

    @property
    def event_time(self) -> str:
        either = self.base or self.candidate
        assert either is not None
        return either.event_time


def classify(base: Outcome | None, candidate: Outcome | None) -> str | None:
    """The kind of change between two outcomes of one id (None: the same outcome)."""
    if base is None or candidate is None:
        return "only_candidate" if base is None else "only_base"
    if base.sent != candidate.sent:
        return "sent_to_suppressed" if base.sent else "suppressed_to_sent"
    if not base.sent:
        return None if base.policy == candidate.policy else "policy_changed"
    if base.send_at != candidate.send_at:
        return "send_time_moved"
    return None if base.content() == candidate.content() else "content_changed"


def diff(base: RunOutputs, candidate: RunOutputs) -> list[Change]:
    """Every trigger id whose outcome differs, ordered by event time, type, customer, id."""
    changes = []
    for tid in base.outcomes.keys() | candidate.outcomes.keys():
        b, c = base.outcomes.get(tid), candidate.outcomes.get(tid)
        kind = classify(b, c)
        if kind is not None:
            either = b or c
            assert either is not None
            changes.append(Change(tid, either.trigger_type, either.customer_id, kind, b, c))
    changes.sort(key=lambda ch: (ch.event_time, ch.trigger_type, ch.customer_id, ch.trigger_id))
    return changes


def _contact_bucket(n: int) -> str:
    return str(n) if n <= 5 else ("6-10" if n <= 10 else "11+")


def _shift_bucket(hours: float) -> str:
    return next(label for low, high, label in SHIFT_BUCKETS_H if low <= hours < high)


@dataclass
class RunFigures:
    """The figures of one run that the report shows side by side."""

    sent_by_type: Counter[str]
    suppressed_by_policy: Counter[str]
    customers_with_candidates: int
    customers_contacted: int
    contacts_per_customer: dict[str, int]  # CONTACT_BUCKETS -> customers
    contacts_mean: float
    contacts_median: float
    contacts_max: int
    customers_capped: int
    capped_share: float  # of the customers with candidates
    deferred: int  # sent later than their event time (quiet hours)
    deferred_by_shift: dict[str, int]  # SHIFT_BUCKETS_H labels -> triggers
    shift_mean_hours: float
    held_past_end: int
    dead_letters: int

    def as_json(self) -> dict[str, Any]:
        data = dict(self.__dict__)
        data["sent_by_type"] = dict(sorted(self.sent_by_type.items()))
        data["suppressed_by_policy"] = dict(sorted(self.suppressed_by_policy.items()))
        return data


def figures(run: RunOutputs) -> RunFigures:
    sent = [o for o in run.outcomes.values() if o.sent]
    stopped = [o for o in run.outcomes.values() if not o.sent]
    per_customer = Counter(o.customer_id for o in sent)
    with_candidates = {o.customer_id for o in run.outcomes.values()} - {ERASED}
    capped = {o.customer_id for o in stopped if o.policy == "frequency_cap"} - {ERASED}
    counts = sorted(per_customer.values())
    buckets = Counter(_contact_bucket(n) for n in counts)
    shifts = [o.shift_ms() / 3_600_000 for o in sent if o.shift_ms() > 0]
    by_shift = Counter(_shift_bucket(h) for h in shifts)
    return RunFigures(
        sent_by_type=Counter(o.trigger_type for o in sent),
        suppressed_by_policy=Counter(o.policy or "?" for o in stopped),
        customers_with_candidates=len(with_candidates),
        customers_contacted=len(per_customer),
        contacts_per_customer={b: buckets.get(b, 0) for b in CONTACT_BUCKETS},
        contacts_mean=statistics.fmean(counts) if counts else 0.0,
        contacts_median=statistics.median(counts) if counts else 0.0,
        contacts_max=counts[-1] if counts else 0,
        customers_capped=len(capped),
        capped_share=len(capped) / len(with_candidates) if with_candidates else 0.0,
        deferred=len(shifts),
        deferred_by_shift={label: by_shift.get(label, 0) for _, _, label in SHIFT_BUCKETS_H},
        shift_mean_hours=statistics.fmean(shifts) if shifts else 0.0,
        held_past_end=sum(o.held for o in sent),
        dead_letters=run.dead_letters,
    )


def changes_by_type(changes: list[Change]) -> dict[str, Counter[str]]:
    """trigger type -> change kind -> how many ids."""
    table: dict[str, Counter[str]] = defaultdict(Counter)
    for ch in changes:
        table[ch.trigger_type][ch.kind] += 1
    return dict(sorted(table.items()))


def send_time_moves(changes: list[Change]) -> dict[str, float | int]:
    """Triggers sent under both configurations at different times: how many, and how far
    the candidate moved them (hours; positive: later)."""
    moves = []
    for ch in changes:
        if ch.kind == "send_time_moved" and ch.base and ch.candidate:
            b, c = _ms(ch.base.send_at), _ms(ch.candidate.send_at)
            if b is not None and c is not None:
                moves.append((c - b) / 3_600_000)
    return {
        "moved": len(moves),
        "earlier": sum(m < 0 for m in moves),
        "later": sum(m > 0 for m in moves),
        "mean_hours": statistics.fmean(moves) if moves else 0.0,
    }


def examples(changes: list[Change], per_type: int) -> dict[str, list[tuple[str, list[Change]]]]:
    """Per trigger type, up to ``per_type`` customers whose outcome changed, each with its
    changes of that type in time order: first those showing the most kinds of change,
    then the fewest changes (the shortest story), then by customer id."""
    grouped: dict[str, dict[str, list[Change]]] = defaultdict(lambda: defaultdict(list))
    for ch in changes:
        grouped[ch.trigger_type][ch.customer_id].append(ch)
    picked = {}
    for kind, by_customer in sorted(grouped.items()):
        order = sorted(
            by_customer.items(),
            key=lambda item: (-len({c.kind for c in item[1]}), len(item[1]), item[0]),
        )
        picked[kind] = order[:per_type]
    return picked

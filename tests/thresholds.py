"""Probes for tests/test_thresholds.py: each measures one configurable threshold's decision.

A probe takes the configuration and a value of the quantity its threshold is
held against (a gap in ms, a count, an amount, ...) and says whether the
threshold was crossed, by running the real code without servers: the event
validator, the Numba kernels, the customer step (events and timers in event
time) and the contact policies. ``tests/test_thresholds.py`` calls each at the
threshold, one unit below and one unit above.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import orjson

from crmstream.config import CrmConfig
from crmstream.operators import kernels as K
from crmstream.operators.catalog import Candidate
from crmstream.operators.columns import EventColumns
from crmstream.operators.customer_step import CustomerStep
from crmstream.operators.events import TOPIC_ROLE_TYPES, EventValidator, ParsedEvent
from crmstream.operators.hashing import event_id_digests
from crmstream.operators.policies import TRIGGER_INDEX, PolicyContext, PolicyEngine
from crmstream.operators.step_io import StepInput
from crmstream.state.encoding import fresh_records

T0 = 1_767_225_600_000  # 2026-01-01T00:00:00Z
DAY = 86_400_000
HOUR = 3_600_000
NOON = T0 + 12 * HOUR
FAR_NOW = T0 + 2000 * DAY  # the validator's clock: no event is in the future
ROLE_OF = {t: role for role, types in TOPIC_ROLE_TYPES.items() for t in types}


_BUILT: dict[int, tuple] = {}


def _parts(config: CrmConfig) -> tuple[EventValidator, CustomerStep, K.Params, PolicyEngine]:
    """The parts built from ``config``, once per config object (kept alive here)."""
    if id(config) not in _BUILT:
        params = K.params_from(config)
        parts = (EventValidator(config), CustomerStep(config, params), params,
                 PolicyEngine(config))  # fmt: skip
        _BUILT[id(config)] = (config, *parts)
    return _BUILT[id(config)][1:]


def body(kind: str, at_ms: int, customer: str = "c", **fields: Any) -> dict[str, Any]:
    """An input event of ``kind`` at ``at_ms`` with the fields its type requires."""
    out: dict[str, Any] = {"event_id": f"{kind}-{at_ms}-{len(fields)}", "customer_id": customer,
                           "event_type": kind, "event_time": at_ms}  # fmt: skip
    if kind in ("product_view", "add_to_cart", "favourite", "remove_from_cart"):
        out |= {"product_id": "p1", "category": "beauty"}
    elif kind in ("order_placed", "order_paid", "order_refunded"):
        out |= {"order_id": f"o{at_ms}", "amount": 10.0, "currency": "USD"}
    elif kind in ("order_cancelled", "order_delivered", "order_returned"):
        out["order_id"] = "o1"
    elif kind == "order_shipped":
        out |= {"order_id": "o1", "promised_delivery_time": at_ms + DAY}
    elif kind == "logistics_update":
        out |= {"order_id": "o1", "status": "delay"}
    elif kind == "service_ticket":
        out["sentiment"] = 0.5
    elif kind == "product_review":
        out |= {"product_id": "p1", "rating": 5}
    return out | fields


def parse(config: CrmConfig, bodies: list[dict[str, Any]], now_ms: int = FAR_NOW) -> list:
    """The validator's verdict on each body (its input position: its index)."""
    validator = _parts(config)[0]
    topics = config.kafka.topics.by_role
    out = []
    for i, b in enumerate(bodies):
        raw = b if isinstance(b, bytes) else orjson.dumps(b)
        role = ROLE_OF.get(b.get("event_type"), "clickstream") if isinstance(b, dict) else (
            "clickstream")  # fmt: skip
        out.append(validator.parse_checked(None, raw, topics[role], 0, i, T0, now_ms))
    return out


def story(
    config: CrmConfig,
    bodies: list[dict[str, Any]],
    bound_ms: int | None = None,
    members: list | None = None,
    promises: dict | None = None,
    records: np.ndarray | None = None,
):
    """Run one step of the customer step over ``bodies`` (fresh state; ``members``: stored
    timer-set members that may fall due): timers fire up to ``bound_ms`` (default: just
    before each customer's newest event, as the shard step bounds a step without a
    watermark). Returns the step's output and the records."""
    events = parse(config, bodies)
    bad = [e for e in events if not isinstance(e, ParsedEvent)]
    assert not bad, bad
    step = _parts(config)[1]
    customers = list(dict.fromkeys(e.customer_id for e in events))
    # ``records``: the customers' states as loaded (an earlier step's), else fresh
    records = fresh_records(len(customers)) if records is None else records.copy()
    bound = np.empty(len(customers), np.int64)
    for i, c in enumerate(customers):
        newest = max(e.event_time_ms for e in events if e.customer_id == c)
        bound[i] = newest - 1 if bound_ms is None else bound_ms
    columns = EventColumns.of(events, {c: i for i, c in enumerate(customers)})
    out = step.run(
        StepInput(customers, records, events, columns, members or [], promises or {}, bound)
    )
    return out, records


def fired(config: CrmConfig, bodies: list[dict[str, Any]], kind: str, **kw: Any) -> bool:
    out, _ = story(config, bodies, **kw)
    return any(c.trigger_type == kind for c in out.candidates)


def derived(config: CrmConfig, bodies: list[dict[str, Any]], as_of_ms: int) -> tuple:
    """The record after the bodies, and its derived columns as of ``as_of_ms``."""
    _, records = story(config, bodies)
    params = _parts(config)[2]
    row = K.derive_batch(records, np.array([as_of_ms], np.int64), params)[0]
    return records[0], row


# -- policies -----------------------------------------------------------------------------
def policy(config: CrmConfig, cands: list[Candidate], record=None, too_often_day: int = 0):
    """The contact policies' decision on one customer's candidates (each its own event)."""
    engine = _parts(config)[3]
    record = fresh_records(1)[0] if record is None else record
    ctx = PolicyContext({}, too_often_day, False)
    keys = [(c.event_time_ms, k) for k, c in enumerate(cands)]
    return engine.decide("c", cands, [ctx] * len(cands), keys, record)


def cand(kind: str, at_ms: int = NOON, causal: str = "e") -> Candidate:
    return Candidate("c", kind, causal, at_ms, {}, {}, None, {"category": "books"})


def stopped_by(config: CrmConfig, cands: list[Candidate], **kw: Any) -> list[str]:
    """The policies that stopped the last candidate ([] when it went out)."""
    _ok, stopped = policy(config, cands, **kw)
    return [s.policy for s in stopped if s.candidate is cands[-1]]


def with_sends(minutes_ago: list[int], too_often_day: int = 0) -> np.void:
    record = fresh_records(1)[0]
    now_min = NOON // 60_000
    sends = [now_min - m for m in minutes_ago]
    record["sent_min"] = sends + [0] * (len(record["sent_min"]) - len(sends))
    record["too_often_day"] = too_often_day
    return record


def capped(config: CrmConfig, minutes_ago: list[int], too_often_day: int = 0) -> bool:
    record = with_sends(minutes_ago, too_often_day)
    return stopped_by(config, [cand("browse_interest")], record=record,
                      too_often_day=too_often_day) == ["frequency_cap"]  # fmt: skip


def cooling(config: CrmConfig, rule: str, minutes_ago: int) -> bool:
    record = fresh_records(1)[0]
    record["trigger_last_min"][TRIGGER_INDEX[rule]] = NOON // 60_000 - minutes_ago
    return stopped_by(config, [cand(rule)], record=record) == ["cooldown"]


# -- exactly-once checks -----------------------------------------------------------------
def duplicate_after(config: CrmConfig, seconds: int) -> bool:
    """Is an event id seen again ``seconds`` later a duplicate?"""
    records = fresh_records(1)
    horizon = config.processing.dedup_horizon_seconds
    digests = event_id_digests(["e1", "e1"])
    verdict = K.check_batch(
        records, np.zeros(2, np.int32), np.zeros(2, np.int8), np.zeros(2, np.int32),
        np.array([0, 1], np.int64), digests, np.array([1_000_000, 1_000_000 + seconds]),
        horizon,
    )  # fmt: skip
    return int(verdict[1]) == K.DUPLICATE

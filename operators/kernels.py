"""Numba kernels that update a whole batch of customer records and derive their signals.

This module owns the per-event and per-customer loops:

- ``apply_events`` walks the batch's events (sorted by customer, then event
  time) and updates the records in place: lifetime counts, event-time window
  rings, orders and purchase days (for RFM and BG/NBD), the decaying preference
  vector and its periodic snapshot, feedback counters, and the event-driven
  rules (browse streak, high intent), whose firings it writes to ``out``.
- after every event (and at every fired timer, ``evaluate_at``) the derived
  labels (``operators.derive``) are evaluated as of the customer's clock, and
  their changes are firings too: churn risk, tier and high-value upgrades,
  interest shift.
- ``check_events`` makes the exactly-once checks of a batch.

Parameters and codes: ``operators.params``; window rings: ``operators.windows``.

``operators.reference`` restates both in plain Python; tests check they agree.
All thresholds arrive in ``KernelParams`` / ``DeriveParams`` built from the
configuration. Window semantics are documented in docs/state.md.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from numba import njit

from crmstream.config import CrmConfig
from crmstream.operators.derive import (
    MEMO_SIZE,
    derive_batch,
    derive_one,
)
from crmstream.operators.events import (
    EVENT_TYPES,
    NUM_EVENT_TYPES,
)
from crmstream.operators.params import (
    _C_INTEREST_SHIFT,
    _C_OLD_CHURN_LEVEL,
    _C_OLD_SEGMENT,
    _C_OLD_TIER,
    _FIRINGS_PER_EVENT,
    _HIGH_VALUE,
    ADD_TO_CART,
    CONTACTED_TOO_OFTEN,
    DERIVED,
    DUPLICATE,
    FRESH,
    HIGH_CLV,
    INT64_MIN,
    LAST_CLICKSTREAM,
    LOGISTICS_UPDATE,
    MAX_TOP_K,
    MIN_AFFINITY,
    MS_PER_10M,
    MS_PER_DAY,
    MS_PER_HOUR,
    ORDER_PLACED,
    PRODUCT_REVIEW,
    PRODUCT_VIEW,
    REPLAYED,
    RULE_BROWSE_INTEREST,
    RULE_CHURN_HIGH,
    RULE_HIGH_INTENT,
    RULE_HIGH_VALUE,
    RULE_INTEREST_SHIFT,
    RULE_TIER_UP,
    SERVICE_TICKET,
    SESSION_START,
    Params,
    params_from,
)
from crmstream.operators.windows import (
    _add2,
    _add_order,
    week_of,
    window_sum,
)
from crmstream.state.encoding import (
    EMPTY_BASE,
    FLAG_HIGH_INTENT,
    FLAG_SHIFT_FIRED,
    KIND_ACTIVITY,
    KIND_CARTS,
    KIND_ORDERS,
    KIND_SESSIONS,
    KIND_VIEWS,
    PREF_CATEGORIES,
    SEGMENTS,
)

# -- per-event update ----------------------------------------------------------


@njit(cache=True, nogil=True)
def _purchase_day(r, day):
    """Track distinct purchase days exactly (64-day bitmap) and the squared gaps."""
    if r.purchase_days == 0:
        r.first_purchase_day = day
        r.last_purchase_day = day
        r.purchase_day_bits = np.uint64(1)
        r.purchase_days = 1
        return
    last = r.last_purchase_day
    if day > last:
        gap = day - last
        r.ipt_sq_sum += gap * gap
        if gap < 64:
            r.purchase_day_bits = (r.purchase_day_bits << np.uint64(gap)) | np.uint64(1)
        else:
            r.purchase_day_bits = np.uint64(1)
        r.last_purchase_day = day
        r.purchase_days += 1
        return
    k = last - day
    if k == 0 or k >= 64 or (r.purchase_day_bits >> np.uint64(k)) & np.uint64(1):
        return  # a day already counted (k >= 64 cannot happen within the allowed lateness)
    r.purchase_day_bits |= np.uint64(1) << np.uint64(k)
    r.purchase_days += 1
    if day < r.first_purchase_day:
        gap = r.first_purchase_day - day
        r.ipt_sq_sum += gap * gap
        r.first_purchase_day = day
        return
    later = k - 1  # nearest later purchase day: the highest set bit below k
    while not (r.purchase_day_bits >> np.uint64(later)) & np.uint64(1):
        later -= 1
    earlier = k + 1  # nearest earlier purchase day: the lowest set bit above k
    while earlier < 64 and not (r.purchase_day_bits >> np.uint64(earlier)) & np.uint64(1):
        earlier += 1
    q = last - later
    p = last - earlier if earlier < 64 else r.first_purchase_day
    r.ipt_sq_sum += (day - p) ** 2 + (q - day) ** 2 - (q - p) ** 2


@njit(cache=True, nogil=True)
def _first_day_spend(r, day, amount):
    """Keep the first purchase day's spend (before ``_purchase_day`` sees ``day``)."""
    if r.purchase_days == 0 or day < r.first_purchase_day:
        r.first_day_spend = amount
    elif day == r.first_purchase_day:
        r.first_day_spend += amount


@njit(cache=True, nogil=True)
def _prefer(r, category, weight, ts, day, half_life_ms, snapshot_days):
    """Add ``weight`` to a category of the exponentially decaying preference vector."""
    if r.pref_ref_ms == INT64_MIN or ts >= r.pref_ref_ms:
        if r.pref_ref_ms != INT64_MIN:
            factor = 2.0 ** (-(ts - r.pref_ref_ms) / half_life_ms)
            for k in range(PREF_CATEGORIES):
                r.pref[k] *= factor
        r.pref_ref_ms = ts
        if r.pref_snap_day == EMPTY_BASE or day - r.pref_snap_day >= snapshot_days:
            top = 0.0
            for k in range(PREF_CATEGORIES):
                top = max(top, r.pref[k])
            for k in range(PREF_CATEGORIES):
                r.pref_snap[k] = (
                    round(255.0 * max(r.pref[k], 0.0) / top) if top > MIN_AFFINITY else 0
                )
            r.pref_snap_day = day
            r.rule_flags &= ~np.uint8(FLAG_SHIFT_FIRED)  # a new period for interest shift
        r.pref[category] += weight
    else:  # a late event: decay its weight to the vector's reference time
        r.pref[category] += weight * 2.0 ** (-(r.pref_ref_ms - ts) / half_life_ms)


@njit(cache=True, nogil=True)
def apply_events(
    records, cust_idx, type_code, category, event_time_ms, amount, aux, start,
    p, dp, pref_weights, churn_weights, r_cuts, f_cuts, m_cuts, scratch, outs,
):  # fmt: skip
    """Apply events ``start:`` in order, evaluating the derived labels after each one.

    Firings (event rules and derived-label changes) go to ``out_*``. Returns
    (the index of the first event not applied, firings written, late events):
    the kernel stops before an event once the firing arrays might not hold all
    it could fire, so the caller can take them and call again from there.
    """
    out_event, out_rule, out_a, out_b, out_c, out_time, out_top, out_row = outs
    n_out = 0
    n_late = 0
    cap = out_event.shape[0]
    memo = np.empty(MEMO_SIZE)  # derive_one's, for the customer at hand
    memo_of = -1
    for i in range(start, cust_idx.shape[0]):
        if n_out + _FIRINGS_PER_EVENT > cap:
            return i, n_out, n_late
        if cust_idx[i] != memo_of:
            memo[:] = -1.0
            memo_of = cust_idx[i]
        r = records[cust_idx[i]]
        t = type_code[i]
        ts = event_time_ms[i]
        if r.type_counts[t] < 65535:
            r.type_counts[t] += 1
        if t == ORDER_PLACED:
            r.orders_total += 1
            r.spend_total += amount[i]
        if r.last_seen_ms != INT64_MIN and r.last_seen_ms - ts > p.lateness_ms:
            n_late += 1  # too late for windows: lifetime totals only
            n_out = _evaluate_labels(r, ts, i, p, dp, churn_weights, r_cuts, f_cuts, m_cuts,
                                     scratch, memo, outs, n_out)  # fmt: skip
            continue
        if ts > r.last_seen_ms:
            r.last_seen_ms = ts
        if ts < r.first_seen_ms:
            r.first_seen_ms = ts

        day = ts // MS_PER_DAY
        week = week_of(day)
        if t <= LAST_CLICKSTREAM:
            r.base_10m = _add2(r.win_10m, r.base_10m, ts // MS_PER_10M, KIND_ACTIVITY, 1, 255)
            r.base_1h = _add2(r.win_1h, r.base_1h, ts // MS_PER_HOUR, KIND_ACTIVITY, 1, 255)
            r.base_1d = _add2(r.win_1d, r.base_1d, day, KIND_ACTIVITY, 1, 255)
            r.base_1w = _add2(r.win_1w, r.base_1w, week, KIND_ACTIVITY, 1, 65535)
        kind = -1
        if t == PRODUCT_VIEW:
            kind = KIND_VIEWS
            r.base_10m = _add2(r.win_10m, r.base_10m, ts // MS_PER_10M, KIND_VIEWS, 1, 255)
            r.base_1h = _add2(r.win_1h, r.base_1h, ts // MS_PER_HOUR, KIND_VIEWS, 1, 255)
        elif t == ADD_TO_CART:
            kind = KIND_CARTS
            if ts > r.last_cart_ms:
                r.last_cart_ms = ts
        elif t == SESSION_START:
            kind = KIND_SESSIONS
        elif t == ORDER_PLACED:
            kind = KIND_ORDERS
            r.base_orders_1d = _add_order(r.orders_1d, r.spend_1d, r.base_orders_1d, day, amount[i])
            if ts >= r.last_seen_ms:
                r.last_order_amount = amount[i]
            if ts > r.last_order_ms:
                r.last_order_ms = ts
            _first_day_spend(r, day, amount[i])
            _purchase_day(r, day)
        if kind >= 0:
            r.base_1d = _add2(r.win_1d, r.base_1d, day, kind, 1, 255)
            r.base_1w = _add2(r.win_1w, r.base_1w, week, kind, 1, 65535)

        if (t == SERVICE_TICKET and aux[i] <= p.negative_sentiment) or (
            t == PRODUCT_REVIEW and aux[i] <= p.negative_rating
        ):
            r.neg_feedback = min(r.neg_feedback + 1, 255)
        elif t == LOGISTICS_UPDATE and aux[i] > 0:
            r.delays = min(r.delays + 1, 255)
        elif t == CONTACTED_TOO_OFTEN and day > r.too_often_day:
            r.too_often_day = day

        weight = pref_weights[t]
        if weight != 0 and category[i] >= 0:
            _prefer(r, category[i], weight, ts, day, p.half_life_ms, p.snapshot_days)

        if t == PRODUCT_VIEW:
            if category[i] == r.streak_category:
                if r.streak_len < 65535:
                    r.streak_len += 1
            else:
                r.streak_category = category[i]
                r.streak_len = 1
            if p.browse_enabled and r.streak_len == p.browse_views:
                out_event[n_out] = i
                out_rule[n_out] = RULE_BROWSE_INTEREST
                out_a[n_out] = category[i]
                out_b[n_out] = r.streak_len
                out_c[n_out] = 0
                _event_firing(n_out, ts, r, p, out_time, out_top, out_row)
                n_out += 1

        if p.intent_enabled and (t in (PRODUCT_VIEW, ADD_TO_CART, ORDER_PLACED)):
            span = p.intent_window_days
            views = window_sum(r.win_1d, r.base_1d, day, span, KIND_VIEWS)
            carts = window_sum(r.win_1d, r.base_1d, day, span, KIND_CARTS)
            orders = window_sum(r.win_1d, r.base_1d, day, span, KIND_ORDERS)
            holds = views >= p.intent_min_views and carts >= p.intent_min_carts and orders == 0
            was = (r.rule_flags & FLAG_HIGH_INTENT) != 0
            if holds and not was:
                r.rule_flags |= FLAG_HIGH_INTENT
                out_event[n_out] = i
                out_rule[n_out] = RULE_HIGH_INTENT
                out_a[n_out] = views
                out_b[n_out] = carts
                out_c[n_out] = orders
                _event_firing(n_out, ts, r, p, out_time, out_top, out_row)
                n_out += 1
            elif was and not holds:
                r.rule_flags &= ~np.uint8(FLAG_HIGH_INTENT)

        n_out = _evaluate_labels(r, ts, i, p, dp, churn_weights, r_cuts, f_cuts, m_cuts,
                                 scratch, memo, outs, n_out)  # fmt: skip
    return cust_idx.shape[0], n_out, n_late


@njit(cache=True, nogil=True)
def _top_categories(pref, k, into):
    """The ``k`` highest positive affinities' indexes into ``into`` (-1 past them);
    ties go to the lower index, as a stable descending sort gives."""
    into[:] = -1
    for slot in range(min(k, into.shape[0])):
        best = -1
        for c in range(pref.shape[0]):
            if pref[c] <= 0:
                continue
            taken = False
            for j in range(slot):
                if into[j] == c:
                    taken = True
                    break
            if not taken and (best < 0 or pref[c] > pref[best]):
                best = c
        if best < 0:
            return
        into[slot] = best


@njit(cache=True, nogil=True)
def _event_firing(n, ts, r, p, out_time, out_top, out_row):
    """The time, top categories and (empty) derived row of an event rule's firing."""
    out_time[n] = ts
    out_row[n, :] = 0.0
    _top_categories(r.pref, p.top_k, out_top[n])


@njit(cache=True, nogil=True)
def _argmax(values):
    best = 0
    for k in range(1, values.shape[0]):
        if values[k] > values[best]:
            best = k
    return best


@njit(cache=True, nogil=True)
def _fire(n, event, rule, a, b, c, as_of, r, p, row, outs):
    """Write one derived-label firing at ``outs[*][n]``; returns the next free index."""
    out_event, out_rule, out_a, out_b, out_c, out_time, out_top, out_row = outs
    out_event[n] = event
    out_rule[n] = rule
    out_a[n] = a
    out_b[n] = b
    out_c[n] = c
    out_time[n] = as_of
    out_row[n, :] = row
    _top_categories(r.pref, p.top_k, out_top[n])
    return n + 1


@njit(cache=True, nogil=True)
def _evaluate_labels(r, ts, event, p, dp, churn_weights, r_cuts, f_cuts, m_cuts, row, memo,
                     outs, n_out):  # fmt: skip
    """Move the customer's clock to ``ts`` (never back), derive its labels as of the
    clock and write a firing for each label change a rule looks at."""
    if ts > r.clock_ms:
        r.clock_ms = ts
    as_of = r.clock_ms
    derive_one(r, as_of, dp, churn_weights, r_cuts, f_cuts, m_cuts, row, False, memo)
    if p.churn_enabled and r.churn_level == 2 and row[_C_OLD_CHURN_LEVEL] < 2:
        n_out = _fire(n_out, event, RULE_CHURN_HIGH, 0, 0, 0, as_of, r, p, row, outs)
    if p.tier_enabled:
        old_tier = np.int64(row[_C_OLD_TIER])
        if r.tier > old_tier:
            n_out = _fire(n_out, event, RULE_TIER_UP, old_tier, r.tier, 0, as_of, r, p, row, outs)
        old_segment = np.int64(row[_C_OLD_SEGMENT])
        if r.segment == _HIGH_VALUE and old_segment != _HIGH_VALUE:
            n_out = _fire(
                n_out, event, RULE_HIGH_VALUE, old_segment, r.segment, 0, as_of, r, p, row, outs
            )
    if (
        p.shift_enabled
        and row[_C_INTEREST_SHIFT] >= p.shift_min_distance
        and not r.rule_flags & FLAG_SHIFT_FIRED
    ):
        now_top = _argmax(r.pref)
        was_top = _argmax(r.pref_snap)
        if now_top != was_top:
            r.rule_flags |= FLAG_SHIFT_FIRED
            n_out = _fire(n_out, event, RULE_INTEREST_SHIFT, was_top, now_top, r.pref_snap_day,
                          as_of, r, p, row, outs)
    return n_out


@njit(cache=True, nogil=True)
def evaluate_at(records, rows, as_of_ms, p, dp, churn_weights, r_cuts, f_cuts, m_cuts, scratch,
                outs):  # fmt: skip
    """``_evaluate_labels`` of ``records[rows[k]]`` as of ``as_of_ms[k]`` (fired timers),
    in order; a firing's event is ``-1 - k``. Returns (rows done, firings written)."""
    n_out = 0
    cap = outs[0].shape[0]
    memo = np.empty(MEMO_SIZE)
    for k in range(rows.shape[0]):
        if n_out + 4 > cap:
            return k, n_out
        memo[:] = -1.0
        n_out = _evaluate_labels(records[rows[k]], as_of_ms[k], -1 - k, p, dp, churn_weights,
                                 r_cuts, f_cuts, m_cuts, scratch, memo, outs, n_out)  # fmt: skip
    return rows.shape[0], n_out


# -- batch entry points --------------------------------------------------------------


class Firings(NamedTuple):
    """Rule firings of one batch: row k fired on event ``event[k]`` (``-1 - j``: at the
    j-th evaluation time of ``evaluate_batch``), as of ``time[k]``."""

    event: np.ndarray  # int32
    rule: np.ndarray  # int8, RULE_*
    a: np.ndarray  # int64, per rule (see RULE_*)
    b: np.ndarray
    c: np.ndarray
    time: np.ndarray  # int64: the customer's clock when it fired
    top: np.ndarray  # int8 (n, MAX_TOP_K): the top categories then, -1 past them
    row: np.ndarray  # float64 (n, len(DERIVED)): the derived row then


def _firing_arrays(cap: int) -> list[np.ndarray]:
    return [
        np.empty(cap, np.int32),
        np.empty(cap, np.int8),
        np.empty(cap, np.int64),
        np.empty(cap, np.int64),
        np.empty(cap, np.int64),
        np.empty(cap, np.int64),
        np.empty((cap, MAX_TOP_K), np.int8),
        np.empty((cap, len(DERIVED)), np.float64),
    ]


def _collect(parts: list[list[np.ndarray]]) -> Firings:
    if len(parts) == 1:
        return Firings(*parts[0])
    return Firings(*(np.concatenate(columns) for columns in zip(*parts, strict=True)))


def _derive_args(params: Params) -> tuple:
    return (
        params.derive,
        params.churn_weights,
        params.recency_cuts,
        params.frequency_cuts,
        params.monetary_cuts,
        np.zeros(len(DERIVED), np.float64),
    )


class BatchEvents(NamedTuple):
    """A batch's events as arrays, sorted by customer then event time."""

    cust_idx: np.ndarray  # int32 index into the batch's records
    type_code: np.ndarray  # int8
    category: np.ndarray  # int16, -1 none
    event_time_ms: np.ndarray  # int64
    amount: np.ndarray  # float64, base currency
    aux: np.ndarray  # float64


@njit(cache=True, nogil=True)
def check_events(
    floor_part, floor_off, applied_part, applied_off, recent_ids, recent_s, recent_next,
    cust, role, partition, offset, digest, seconds, repeated, horizon_s, verdict,
):  # fmt: skip
    """Exactly-once checks of a batch's events, in the customers' timeline order,
    updating the records.

    ``verdict[i]`` becomes ``FRESH``, ``REPLAYED`` (at or below the offset the
    customer's state held for the event's input role before the batch, ``floor_*``,
    or ``repeated``: an input position already in the batch) or ``DUPLICATE`` (its
    event-id hash is in the customer's ring of recent ids within ``horizon_s``
    seconds; 0 turns the duplicate check off). The replay test reads the state as
    loaded, so the order of the batch does not change it.
    """
    ring = recent_ids.shape[1]
    for i in range(cust.shape[0]):
        c, r = cust[i], role[i]
        if repeated[i] or (floor_part[c, r] == partition[i] and offset[i] <= floor_off[c, r]):
            verdict[i] = REPLAYED
            continue
        if horizon_s > 0:
            duplicate = False
            for k in range(ring):
                if recent_ids[c, k] == digest[i]:
                    duplicate = abs(seconds[i] - np.int64(recent_s[c, k])) <= horizon_s
                    break
            if duplicate:
                verdict[i] = DUPLICATE
                continue
            slot = recent_next[c]
            recent_ids[c, slot] = digest[i]
            recent_s[c, slot] = seconds[i]
            recent_next[c] = (slot + 1) % ring
        if applied_part[c, r] != partition[i]:  # first event, or re-partitioned
            applied_part[c, r] = partition[i]
            applied_off[c, r] = offset[i]
        elif offset[i] > applied_off[c, r]:
            applied_off[c, r] = offset[i]
        verdict[i] = FRESH


def apply_batch(records: np.ndarray, events: BatchEvents, params: Params) -> tuple[Firings, int]:
    """Apply a batch to ``records`` in place, each customer's derived labels evaluated
    after each of its events; return the firings and the number of late events."""
    n = events.cust_idx.shape[0]
    derive_args = _derive_args(params)
    cap = max(64, n // 8)
    parts, late, start = [], 0, 0
    while True:
        out = _firing_arrays(cap)
        start, n_out, n_late = apply_events(
            records, *events, start, params.kernel, derive_args[0], params.pref_weights,
            *derive_args[1:], tuple(out),
        )  # fmt: skip
        late += n_late
        parts.append([column[:n_out] for column in out])
        if start >= n:
            return _collect(parts), late
        cap *= 2


def evaluate_batch(
    records: np.ndarray, rows: np.ndarray, as_of_ms: np.ndarray, params: Params
) -> Firings:
    """Evaluate the derived labels of ``records[rows[k]]`` as of ``as_of_ms[k]`` (the due
    times of fired timers), in order, moving each customer's clock; the firings' events
    are ``-1 - k``."""
    derive_args = _derive_args(params)
    cap = max(16, 2 * len(rows))
    parts, done = [], 0
    rows = np.asarray(rows, np.int64)
    as_of_ms = np.asarray(as_of_ms, np.int64)
    while True:
        out = _firing_arrays(cap)
        k, n_out = evaluate_at(
            records, rows[done:], as_of_ms[done:], params.kernel, *derive_args, tuple(out)
        )
        columns = [column[:n_out] for column in out]
        columns[0] = np.where(columns[0] < 0, columns[0] - done, columns[0]).astype(np.int32)
        parts.append(columns)
        done += k
        if done >= len(rows):
            return _collect(parts)
        cap *= 2


def check_batch(
    records: np.ndarray,
    cust: np.ndarray,
    role: np.ndarray,
    partition: np.ndarray,
    offset: np.ndarray,
    digest: np.ndarray,
    seconds: np.ndarray,
    horizon_s: int,
    repeated: np.ndarray | None = None,
    offsets: bool = True,
) -> np.ndarray:
    """``check_events`` over a batch's event columns (in the customers' timeline order);
    returns the verdict per event. ``repeated``: input positions already in the batch.
    ``offsets=False`` (a test hook, flows/shard_step.GUARDS) leaves the per-customer
    offsets and ``repeated`` unchecked, so that only the event-id check drops events."""
    verdict = np.empty(cust.shape[0], np.int8)
    if repeated is None or not offsets:
        repeated = np.zeros(cust.shape[0], np.bool_)
    floor_part = records["applied_partition"].copy()
    if not offsets:
        floor_part[:] = -1  # no partition: nothing is at or below a recorded offset
    check_events(
        floor_part,
        records["applied_offset"].copy(),
        records["applied_partition"],
        records["applied_offset"],
        records["recent_ids"],
        records["recent_s"],
        records["recent_next"],
        cust,
        role,
        partition,
        offset,
        digest,
        seconds,
        repeated,
        horizon_s,
        verdict,
    )
    return verdict


def events_of(rows: list[tuple[int, int, int, int, float, float]]) -> BatchEvents:
    """BatchEvents from (customer index, type, category, time, amount, aux) tuples."""
    columns = list(zip(*rows, strict=True)) if rows else [()] * 6
    dtypes = (np.int32, np.int8, np.int16, np.int64, np.float64, np.float64)
    return BatchEvents(*(np.array(col, dtype=d) for col, d in zip(columns, dtypes, strict=True)))


def warm_up(config: CrmConfig) -> None:
    """Compile (or load from cache) the kernels before the first batch needs them.

    Loading pulls in NumPy/SciPy pieces and takes about a second; doing it at
    start-up keeps it out of the first trigger's latency.
    """
    from crmstream.operators.hashing import event_id_digests
    from crmstream.state.encoding import decode_batch, encode_records, fresh_records

    params = params_from(config)
    records = fresh_records(1)
    apply_batch(records, events_of([(0, ORDER_PLACED, 0, MS_PER_DAY, 1.0, 0.0)]), params)
    derive_batch(records, np.array([MS_PER_DAY], np.int64), params)
    evaluate_batch(records, np.zeros(1, np.int64), np.array([MS_PER_DAY], np.int64), params)
    decode_batch(encode_records(records), ["warm-up"])
    one = np.zeros(1, np.int64)
    check_batch(records, one.astype(np.int32), one.astype(np.int8), one.astype(np.int32), one,
                one.astype(np.uint64), one, 1)  # fmt: skip
    event_id_digests(["warm-up"])


assert len(EVENT_TYPES) == NUM_EVENT_TYPES
assert SEGMENTS[HIGH_CLV] == "high_clv"

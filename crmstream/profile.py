"""The customer-360 read: customers' live state, decoded for people, as of a time.

This module owns turning customers' Redis state blobs and profile hashes into
readable dictionaries (``customer_views`` for many, ``customer_view`` for one)
and a rich table (``render``). It is read-only and uses the same keys, layout,
derivation code and value-model parameter set (``state.model``) as the flow.

Everything that moves with time (windows, RFM, churn signals, stage, P(alive),
expected purchases, CLV) is derived on read as of one time. By default that
is the event-time watermark of the customer's shard (the newest event time it
has applied), or the customer's own newest event if later: a replayed history
reads as of its own time, and a live flow's watermark trails the wall clock by
its lag. ``as_of_ms`` asks for another time, not before the day of the
customer's newest event (the state keeps no history).
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable
from typing import Any

import numpy as np
import redis
from rich.table import Table

from crmstream.config import CrmConfig
from crmstream.operators.btyd import bgnbd, clv, gamma_gamma_spend
from crmstream.operators.derive import derive_batch
from crmstream.operators.events import EVENT_TYPES
from crmstream.operators.params import (
    COL,
    MS_PER_10M,
    MS_PER_DAY,
    MS_PER_HOUR,
    params_from,
)
from crmstream.operators.rules import iso_ms
from crmstream.operators.windows import (
    week_of,
    window_sum,
)
from crmstream.state import model
from crmstream.state.encoding import (
    CHURN_LEVELS,
    EMPTY_BASE,
    ROLES,
    SEGMENTS,
    SIGNALS,
    STAGES,
    TIERS,
    WINDOW_KINDS,
    StateEncodingError,
    decode_batch,
)
from crmstream.state.layout import shard_of, stored_layout
from crmstream.state.profile import churn_contributors, top_categories
from crmstream.state.store import StateStore

CHUNK = 5000


class ProfileError(ValueError):
    """A view was asked for a time the state cannot answer."""


def _windows(rec: np.void, as_of_ms: int) -> dict[str, dict[str, int]]:
    """Counts per kind over 1 h, 24 h, 7 d, 30 d and 90 d as of ``as_of_ms``."""
    day = as_of_ms // MS_PER_DAY
    spans = {
        "1h": ("win_10m", "base_10m", as_of_ms // MS_PER_10M, 6),
        "24h": ("win_1h", "base_1h", as_of_ms // MS_PER_HOUR, 24),
        "7d": ("win_1d", "base_1d", day, 7),
        "30d": ("win_1d", "base_1d", day, 30),
        "90d": ("win_1w", "base_1w", week_of(day), 13),
    }
    view: dict[str, dict[str, int]] = {}
    for kind_index, kind in enumerate(WINDOW_KINDS):
        counts = {}
        for label, (ring, base, idx, span) in spans.items():
            if kind_index >= rec[ring].shape[1]:
                continue  # the short rings keep activity and views only
            counts[label] = int(window_sum(rec[ring], rec[base], idx, span, kind_index))
        view[kind] = counts
    return view


def _num(value: float, digits: int = 3) -> float | None:
    return None if math.isnan(value) else round(float(value), digits)


class AsOf:
    """Where each customer's "as of" comes from: one fixed time, or (default) the
    event-time watermark of the customer's shard."""

    def __init__(self, store: StateStore, config: CrmConfig, as_of_ms: int | None):
        self.fixed = as_of_ms
        self._watermarks: dict[int, int] = {}
        self._shards = config.processing.shards
        if as_of_ms is None:
            layout, _ = stored_layout(store, config.processing.step_ms)
            self._shards = layout.shards if layout else self._shards
            self._watermarks = store.event_times(self._shards)

    def of(self, customer_id: str, last_seen_ms: int) -> tuple[int, str]:
        """(as-of time, where it came from) for a customer whose newest event is at
        ``last_seen_ms``. :raises ProfileError: for a fixed time before that day."""
        if self.fixed is not None:
            if last_seen_ms > 0 and self.fixed // MS_PER_DAY < last_seen_ms // MS_PER_DAY:
                raise ProfileError(
                    f"customer {customer_id!r}: as of {iso_ms(self.fixed)} is before the day of "
                    f"its newest event ({iso_ms(last_seen_ms)}); the state keeps no history, "
                    f"so ask for that day or later"
                )
            return self.fixed, "asked"
        shard = shard_of(customer_id, self._shards)
        mark = self._watermarks.get(shard, -1)
        if mark >= last_seen_ms:
            return mark, f"shard {shard} event-time watermark"
        return max(last_seen_ms, 0), "the customer's newest event"


def customer_views(
    store: StateStore,
    config: CrmConfig,
    customer_ids: Iterable[str],
    as_of_ms: int | None = None,
) -> dict[str, dict[str, Any]]:
    """The views of every customer Redis holds anything for (others are left out), read
    and derived ``CHUNK`` customers at a time, as of ``as_of_ms`` (default: module
    docstring). The value model is the flow's: the active fitted set, if any.

    :raises ProfileError: when ``as_of_ms`` is before the day of a customer's newest event.
    """
    config = model.adopt(config, store.client)
    params = params_from(config)
    when = AsOf(store, config, as_of_ms)
    ids = list(customer_ids)
    views: dict[str, dict[str, Any]] = {}
    for start in range(0, len(ids), CHUNK):
        chunk = ids[start : start + CHUNK]
        pipe = store.client.pipeline(transaction=False)
        for customer in chunk:
            pipe.get(store.state_key(customer))
            pipe.hgetall(store.profile_key(customer))
        replies = pipe.execute(raise_on_error=False)
        for k, reply in enumerate(replies):
            if isinstance(reply, redis.ResponseError) and str(reply).startswith("WRONGTYPE"):
                customer = chunk[k // 2]
                key = store.profile_key(customer) if k % 2 else store.state_key(customer)
                raise StateEncodingError(f"{key!r} is unreadable: {reply}")
            if isinstance(reply, Exception):
                raise reply
        blobs, hashes = replies[0::2], replies[1::2]
        held = [i for i, b in enumerate(blobs) if b is not None]
        for i, raw in enumerate(hashes):
            if blobs[i] is None and raw:
                profile = _decoded(raw, store.profile_key(chunk[i]))
                views[chunk[i]] = {"customer_id": chunk[i], "profile": profile}
        if not held:
            continue
        names = [chunk[i] for i in held]
        records = decode_batch([blobs[i] for i in held], [store.state_key(c) for c in names])
        stored_models = records["model_version"].copy()
        times = [when.of(c, int(r)) for c, r in zip(names, records["last_seen_ms"], strict=True)]
        as_of = np.array([t for t, _ in times], np.int64)
        derived = derive_batch(records, as_of, params)
        for k, customer in enumerate(names):
            view = _view(customer, records[k], derived[k], int(as_of[k]), config, params)
            view["as_of_source"] = times[k][1]
            # the set the stored labels (profile hash) were derived with by the flow
            view["value"]["stored_model_version"] = int(stored_models[k])
            view["state_bytes"] = len(blobs[held[k]])
            view["profile"] = _decoded(hashes[held[k]], store.profile_key(customer))
            views[customer] = view
    return views


def customer_view(
    store: StateStore, config: CrmConfig, customer_id: str, as_of_ms: int | None = None
) -> dict[str, Any] | None:
    """Everything Redis holds for a customer, decoded; None when it holds nothing."""
    return customer_views(store, config, [customer_id], as_of_ms).get(customer_id)


def now_ms() -> int:
    """The wall clock, for ``--as-of now``."""
    return int(time.time() * 1000)


def _decoded(raw: dict[bytes, bytes], key: str) -> dict[str, str]:
    """The profile hash at ``key`` as text; a field or value that is not UTF-8 (written by
    hand: the flow writes only text) raises StateEncodingError naming the key."""
    try:
        return {k.decode(): v.decode() for k, v in raw.items()}
    except UnicodeDecodeError as error:
        raise StateEncodingError(f"profile at {key!r} is not UTF-8 text: {error}") from None


def _category(config: CrmConfig, index: int) -> str | None:
    """A stored category index as its name; one past the taxonomy (stored before a
    category was removed from the configuration) as ``#<index>``."""
    if index < 0:
        return None
    categories = config.taxonomy.categories
    return categories[index] if index < len(categories) else f"#{index}"


def value_of(rec: np.void, row: np.ndarray, as_of: int, config: CrmConfig) -> dict[str, Any]:
    """P(alive), expected purchases over the configured horizons, expected spend and CLV
    of one customer as of ``as_of`` (``row``: its derived values then)."""
    value: dict[str, Any] = {"model_version": config.value.model_version}
    if int(rec["purchase_days"]) == 0:  # the model starts at the first purchase
        horizons = config.value.expected_horizons_days
        none = dict.fromkeys(f"expected_purchases_{days}d" for days in horizons)
        return value | none | {"p_alive": None, "clv": None, "expected_spend_per_purchase": None}
    bg, gg = config.bgnbd, config.gamma_gamma
    x = float(rec["purchase_days"]) - 1
    first = int(rec["first_purchase_day"])
    t_x = (int(rec["last_purchase_day"]) - first) / 7.0
    big_t = max(as_of // MS_PER_DAY - first, 0) / 7.0
    for days in config.value.expected_horizons_days:
        _, expected = bgnbd(x, t_x, big_t, days / 7.0, bg.r, bg.alpha, bg.a, bg.b)
        value[f"expected_purchases_{days}d"] = _num(expected)
    mean = (float(rec["spend_total"]) - float(rec["first_day_spend"])) / x if x else 0.0
    spend = gamma_gamma_spend(x, mean, gg.p, gg.q, gg.v)
    months, discount = config.value.clv_months, config.value.monthly_discount_rate
    value["expected_spend_per_purchase"] = _num(spend, 2)
    value["p_alive"] = _num(row[COL["p_alive"]])
    value["clv"] = _num(clv(x, t_x, big_t, spend, months, discount, bg.r, bg.alpha, bg.a, bg.b), 2)
    value["clv_months"] = months
    return value


def _view(
    customer_id: str, rec: np.void, row: np.ndarray, as_of: int, config: CrmConfig, params: Any
) -> dict[str, Any]:
    buyer = int(rec["purchase_days"]) > 0
    value = value_of(rec, row, as_of, config)
    view: dict[str, Any] = {
        "customer_id": customer_id,
        "as_of": iso_ms(as_of),
        "lifecycle": {
            "stage": STAGES[rec["stage"]],
            "segment": SEGMENTS[rec["segment"]],
            "tier": TIERS[rec["tier"]],
        },
        "churn": {
            "score": _num(row[COL["churn_score"]]),
            "level": CHURN_LEVELS[rec["churn_level"]],
            "top_signals": churn_contributors(row, params.churn_weights),
            **{name: _num(row[COL[name]]) for name in SIGNALS},
        },
        "bgnbd": {
            "p_alive": value["p_alive"],
            **{k: v for k, v in value.items() if k.startswith("expected_purchases_")},
            "frequency_x": int(rec["purchase_days"]) - 1 if buyer else None,
            "recency_t_x_days": int(rec["last_purchase_day"] - rec["first_purchase_day"])
            if buyer
            else None,
            "age_T_days": int(as_of // MS_PER_DAY - rec["first_purchase_day"]) if buyer else None,
        },
        "value": {
            k: v
            for k, v in value.items()
            if k != "p_alive" and not k.startswith("expected_purchases_")
        },
        "rfm": {
            "score": "-".join(str(int(row[COL[x]])) for x in ("r", "f", "m")),
            "days_since_purchase": _num(row[COL["days_since_purchase"]], 1) if buyer else None,
            "orders_90d": int(row[COL["orders_90d"]]),
            "orders_365d": int(row[COL["orders_365d"]]),
            "spend_90d": _num(row[COL["spend_90d"]], 2),
            "spend_365d": _num(row[COL["spend_365d"]], 2),
            "orders_total": int(rec["orders_total"]),
            "spend_total": _num(rec["spend_total"], 2),
            "aov": _num(row[COL["aov"]], 2),
            "interpurchase_mean_days": _num(row[COL["ipt_mean_days"]], 1),
            "interpurchase_std_days": _num(row[COL["ipt_std_days"]], 1),
        },
        "preferences": {
            "top_categories": top_categories(
                rec["pref"], config.taxonomy.categories, config.preferences.top_k
            ),
            "interest_shift": _num(row[COL["interest_shift"]]),
        },
        "windows": _windows(rec, as_of) if rec["base_1d"] != EMPTY_BASE else {},
        "event_counts": {EVENT_TYPES[t]: int(n) for t, n in enumerate(rec["type_counts"]) if n},
        "first_seen": iso_ms(int(rec["first_seen_ms"])),
        "last_seen": iso_ms(int(rec["last_seen_ms"])),
        "browse_streak": {
            "category": _category(config, int(rec["streak_category"])),
            "views": int(rec["streak_len"]),
        },
        "stage_since": iso_ms(int(rec["stage_since_ms"])) if rec["stage_since_ms"] else None,
        "applied_offsets": {
            role: {"partition": int(p), "offset": int(o)}
            for role, p, o in zip(
                ROLES, rec["applied_partition"], rec["applied_offset"], strict=True
            )
            if p >= 0
        },
        "layout_version": int(rec["version"]),
    }
    return view


def render(view: dict[str, Any]) -> Table:
    table = Table(title=f"customer {view['customer_id']}", show_header=False, expand=False)
    table.add_column("field", style="bold cyan")
    table.add_column("value")
    for key, value in view.items():
        if key == "customer_id":
            continue
        if isinstance(value, dict):
            text = "\n".join(f"{k}: {v}" for k, v in value.items()) or "-"
        else:
            text = str(value)
        table.add_row(key, text)
    return table

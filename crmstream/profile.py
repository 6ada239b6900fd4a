"""The customer-360 read: one customer's live state, decoded for people.

This module owns turning a customer's Redis state blob and profile hash into
a readable dictionary (``customer_view``) and a rich table (``render``). It is
read-only and uses the same key, layout and derivation code as the flow;
derived values are computed as of the time asked for (default: now), so a
customer who went quiet shows as dormant even before new events arrive.
"""

from __future__ import annotations

import math
import time
from typing import Any

import numpy as np
from rich.table import Table

from crmstream.config import CrmConfig
from crmstream.operators.events import EVENT_TYPES
from crmstream.operators.kernels import (
    COL,
    MS_PER_10M,
    MS_PER_DAY,
    MS_PER_HOUR,
    SIGNALS,
    derive_batch,
    params_from,
    week_of,
    window_sum,
)
from crmstream.operators.rules import iso_ms
from crmstream.state.encoding import (
    CHURN_LEVELS,
    EMPTY_BASE,
    ROLES,
    SEGMENTS,
    STAGES,
    TIERS,
    WINDOW_KINDS,
    decode_batch,
)
from crmstream.state.profile import churn_contributors, top_categories
from crmstream.state.store import StateStore


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


def customer_view(
    store: StateStore, config: CrmConfig, customer_id: str, as_of_ms: int | None = None
) -> dict[str, Any] | None:
    """Everything Redis holds for a customer, decoded; None when it holds nothing."""
    blob, profile = store.read_customer(customer_id)
    if blob is None and not profile:
        return None
    view: dict[str, Any] = {"customer_id": customer_id}
    if blob is None:
        view["profile"] = profile
        return view
    records = decode_batch([blob], [store.state_key(customer_id)])
    rec = records[0]
    as_of = int(time.time() * 1000) if as_of_ms is None else as_of_ms
    params = params_from(config)
    row = derive_batch(records, np.array([as_of], np.int64), params)[0]
    buyer = int(rec["purchase_days"]) > 0
    view.update(
        {
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
                "p_alive": _num(row[COL["p_alive"]]),
                "expected_purchases_30d": _num(row[COL["expected_30d"]]),
                "expected_purchases_90d": _num(row[COL["expected_90d"]]),
                "frequency_x": int(rec["purchase_days"]) - 1 if buyer else None,
                "recency_t_x_days": int(rec["last_purchase_day"] - rec["first_purchase_day"])
                if buyer
                else None,
                "age_T_days": int(as_of // MS_PER_DAY - rec["first_purchase_day"])
                if buyer
                else None,
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
            "windows": _windows(rec, as_of),
            "event_counts": {EVENT_TYPES[t]: int(n) for t, n in enumerate(rec["type_counts"]) if n},
            "first_seen": iso_ms(int(rec["first_seen_ms"])),
            "last_seen": iso_ms(int(rec["last_seen_ms"])),
            "browse_streak": {
                "category": config.taxonomy.categories[rec["streak_category"]]
                if rec["streak_category"] >= 0
                else None,
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
            "state_bytes": len(blob),
            "profile": profile,
        }
    )
    if rec["base_1d"] == EMPTY_BASE:
        view["windows"] = {}
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

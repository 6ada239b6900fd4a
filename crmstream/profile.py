"""The customer-360 read: one customer's live state, decoded for people.

This module owns turning a customer's Redis state blob and profile hash into
a readable dictionary (``customer_view``) and a rich table (``render``). It is
read-only and uses the same key and layout code as the flow.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from rich.table import Table

from crmstream.config import CrmConfig
from crmstream.operators.events import EVENT_TYPES
from crmstream.operators.kernels import MS_PER_DAY, RING_DAYS
from crmstream.operators.rules import iso_ms
from crmstream.state.encoding import ROLES, decode_batch
from crmstream.state.store import StateStore


def _window(ring: np.ndarray, base_day: int, days: int) -> int:
    lo = max(base_day - days + 1, base_day - RING_DAYS + 1)
    return int(sum(ring[d % RING_DAYS] for d in range(lo, base_day + 1)))


def customer_view(store: StateStore, config: CrmConfig, customer_id: str) -> dict[str, Any] | None:
    """Everything Redis holds for a customer, decoded; None when it holds nothing."""
    blob, profile = store.read_customer(customer_id)
    if blob is None and not profile:
        return None
    view: dict[str, Any] = {"customer_id": customer_id, "profile": profile}
    if blob is None:
        return view
    rec = decode_batch([blob], [store.state_key(customer_id)])[0]
    base = int(rec["ring_base_day"])
    window_days = config.rules.high_intent_no_purchase.window_days
    streak_cat = int(rec["streak_category"])
    view.update(
        {
            "layout_version": int(rec["version"]),
            "state_bytes": len(blob),
            "first_seen": iso_ms(int(rec["first_seen_ms"])),
            "last_seen": iso_ms(int(rec["last_seen_ms"])),
            "event_counts": {EVENT_TYPES[t]: int(n) for t, n in enumerate(rec["type_counts"]) if n},
            "browse_streak": {
                "category": config.taxonomy.categories[streak_cat] if streak_cat >= 0 else None,
                "views": int(rec["streak_len"]),
            },
            f"window_{window_days}d": {
                "as_of_day": iso_ms(base * MS_PER_DAY)[:10],
                "product_views": _window(rec["ring_views"], base, window_days),
                "cart_adds": _window(rec["ring_carts"], base, window_days),
                "orders": _window(rec["ring_orders"], base, window_days),
            },
            "high_intent_condition_holds": bool(rec["flags"] & 1),
            "applied_offsets": {
                role: {"partition": int(p), "offset": int(o)}
                for role, p, o in zip(
                    ROLES, rec["applied_partition"], rec["applied_offset"], strict=True
                )
                if p >= 0
            },
        }
    )
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

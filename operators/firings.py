"""Trigger candidates from the kernels' firings: event rules and derived-label changes.

This module owns the records of the triggers the kernels detect
(``operators.kernels.RULE_*``): browse interest and high intent on an event,
and churn risk, tier upgrade, high value entered and interest shift whenever a
customer's derived labels change, after any of its events or at a fired timer.
A firing carries what held at that instant (the derived row, the top
categories, the customer's clock), so a candidate says why it fired as of then,
whatever happened later in the same step.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from crmstream.config import CrmConfig
from crmstream.operators.catalog import Candidate
from crmstream.operators.events import ParsedEvent, new_tuple
from crmstream.operators.kernels import Firings
from crmstream.operators.params import (
    COL,
    RULE_BROWSE_INTEREST,
    RULE_CHURN_HIGH,
    RULE_HIGH_INTENT,
    RULE_HIGH_VALUE,
    RULE_INTEREST_SHIFT,
    RULE_TIER_UP,
)
from crmstream.operators.rules import iso_ms
from crmstream.state.encoding import TIERS
from crmstream.state.profile import churn_contributors


class FiringCandidates:
    """Builds candidates from firings, with the configured thresholds they held against."""

    def __init__(self, config: CrmConfig, churn_weights: np.ndarray):
        self._config = config
        self._categories = config.taxonomy.categories
        self._churn_weights = churn_weights
        rules, seg, churn = config.rules, config.segments, config.churn
        intent = rules.high_intent_no_purchase
        self._thresholds: dict[int, dict[str, Any]] = {
            RULE_BROWSE_INTEREST: {"consecutive_views": rules.browse_interest.consecutive_views},
            RULE_HIGH_INTENT: {
                "min_views": intent.min_views,
                "min_cart_adds": intent.min_cart_adds,
                "max_orders": 0,
            },
            RULE_CHURN_HIGH: {"high": churn.high, "hysteresis": churn.hysteresis},
            RULE_TIER_UP: {
                "silver_spend_365d": seg.silver_spend_365d,
                "gold_spend_365d": seg.gold_spend_365d,
            },
            RULE_HIGH_VALUE: {
                "min_orders_90d": seg.high_value_min_orders_90d,
                "min_aov": seg.high_value_min_aov,
            },
            RULE_INTEREST_SHIFT: {"min_distance": rules.interest_shift.min_distance},
        }
        self._intent_days = intent.window_days

    def candidates(
        self, firings: Firings, customers: list[str], events: list[ParsedEvent | None]
    ) -> list[Candidate]:
        """One candidate per firing: ``customers[k]`` fired it, on ``events[k]`` (None at a
        fired timer)."""
        columns = (
            firings.rule.tolist(),
            firings.a.tolist(),
            firings.b.tolist(),
            firings.c.tolist(),
            firings.time.tolist(),
        )
        out = []
        for k, (rule, a, b, c, at) in enumerate(zip(*columns, strict=True)):
            fields = self._fields(rule, a, b, c, at, customers[k], events[k], firings, k)
            out.append(new_tuple(Candidate, fields))
        return out

    def _top(self, firings: Firings, k: int) -> list[str]:
        names = self._categories
        return [names[i] for i in firings.top[k].tolist() if 0 <= i < len(names)]

    def _fields(
        self,
        rule: int,
        a: int,
        b: int,
        c: int,
        at: int,
        customer: str,
        ev: ParsedEvent | None,
        firings: Firings,
        k: int,
    ) -> tuple[Any, ...]:
        thresholds = self._thresholds[rule]
        row = firings.row[k]
        if rule == RULE_BROWSE_INTEREST:
            category = self._categories[a]
            values = {"category": category, "consecutive_views": b}
            return (customer, "browse_interest", ev.event_id, at, values, thresholds, None,
                    {"category": category})  # fmt: skip
        if rule == RULE_HIGH_INTENT:
            values = {"views": a, "cart_adds": b, "orders": c}
            window = {"days": self._intent_days, "end": iso_ms(at)}
            return (customer, "high_intent_no_purchase", ev.event_id, at, values, thresholds,
                    window, {})  # fmt: skip
        if rule == RULE_CHURN_HIGH:
            values = {
                "churn_score": round(float(row[COL["churn_score"]]), 4),
                "top_signals": churn_contributors(row, self._churn_weights),
            }
            return (customer, "churn_risk", f"derive:churn_risk:{at}", at, values, thresholds,
                    None, {"top_categories": self._top(firings, k)})  # fmt: skip
        if rule == RULE_TIER_UP:
            values = {
                "change": "tier",
                "from": TIERS[a],
                "to": TIERS[b],
                "spend_365d": round(float(row[COL["spend_365d"]]), 2),
            }
            return (customer, "tier_upgrade", f"derive:tier:{b}:{at}", at, values, thresholds,
                    None, {"tier": TIERS[b]})  # fmt: skip
        if rule == RULE_HIGH_VALUE:
            values = {
                "change": "high_value_entered",
                "orders_90d": int(row[COL["orders_90d"]]),
                "spend_90d": round(float(row[COL["spend_90d"]]), 2),
            }
            return (customer, "tier_upgrade", f"derive:high_value:{at}", at, values, thresholds,
                    None, {"segment": "high_value"})  # fmt: skip
        values = {
            "from": self._categories[a],
            "to": self._categories[b],
            "cosine_distance": round(float(row[COL["interest_shift"]]), 4),
        }
        return (customer, "interest_shift", f"derive:interest_shift:{c}", at, values, thresholds,
                None, {"top_categories": self._top(firings, k)})  # fmt: skip

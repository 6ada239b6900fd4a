"""Turning kernel rule firings into trigger records with deterministic ids.

This module owns the trigger record schema (docs/events.md, "triggers") and
the trigger id: a hash of the customer, the trigger type, the rule version and
the causal event id, so a replay or a restart re-emits the same id and
subscribers can dedupe.
"""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime
from typing import Any

from crmstream.config import CrmConfig
from crmstream.operators.kernels import RULE_BROWSE_INTEREST, RULE_HIGH_INTENT, RULE_NAMES

TRIGGER_SCHEMA_VERSION = 1


def trigger_id(customer_id: str, trigger_type: str, rule_version: int, causal: str) -> str:
    """Deterministic id: 32 hex chars of BLAKE2b over the trigger's identity."""
    identity = "\x1f".join((customer_id, trigger_type, str(rule_version), causal))
    return hashlib.blake2b(identity.encode(), digest_size=16).hexdigest()


def iso_ms(epoch_ms: int) -> str:
    """Epoch milliseconds as ISO-8601 UTC with millisecond precision."""
    return datetime.fromtimestamp(epoch_ms / 1000, tz=UTC).isoformat(timespec="milliseconds")


class TriggerBuilder:
    """Builds trigger records for the rules in the configuration."""

    def __init__(self, config: CrmConfig):
        self._categories = config.taxonomy.categories
        self._rules = config.rules

    def build(
        self,
        rule: int,
        customer_id: str,
        causal_event_id: str,
        event_time_ms: int,
        detected_at_ms: int,
        values: tuple[int, int, int],
    ) -> dict[str, Any]:
        """One trigger record (without ``emitted_at``, which the sink stamps)."""
        name = RULE_NAMES[rule]
        a, b, c = values
        if rule == RULE_BROWSE_INTEREST:
            cfg = self._rules.browse_interest
            category = self._categories[a]
            fired = {"category": category, "consecutive_views": b}
            thresholds = {"consecutive_views": cfg.consecutive_views}
            payload = {"category": category}
            window = None
        elif rule == RULE_HIGH_INTENT:
            cfg = self._rules.high_intent_no_purchase
            fired = {"views": a, "cart_adds": b, "orders": c}
            thresholds = {
                "min_views": cfg.min_views,
                "min_cart_adds": cfg.min_cart_adds,
                "max_orders": 0,
            }
            payload = {}
            window = {"days": cfg.window_days, "end": iso_ms(event_time_ms)}
        else:  # pragma: no cover - kernels only emit known rule ids
            raise ValueError(f"unknown rule id {rule!r}")
        record: dict[str, Any] = {
            "schema_version": TRIGGER_SCHEMA_VERSION,
            "trigger_id": trigger_id(customer_id, name, cfg.version, causal_event_id),
            "trigger_type": name,
            "customer_id": customer_id,
            "rule": {"name": name, "version": cfg.version},
            "reason": {"values": fired, "thresholds": thresholds, "window": window},
            "causal_event_id": causal_event_id,
            "event_time": iso_ms(event_time_ms),
            "detected_at": iso_ms(detected_at_ms),
            "payload": payload,
        }
        return record

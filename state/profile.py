"""The readable profile hash written next to each customer's binary state.

This module owns the format of ``{prefix}:{<customer>}:p``, the part of the
state that downstream readers (customer 360, service desks) use without
knowing the binary layout: lifecycle stage, value segment, tier, churn score,
level and top contributing signals, P(alive), expected purchases, RFM and the
top categories. Values are short strings; numbers have three decimals.
"""

from __future__ import annotations

import math
from datetime import UTC, datetime
from typing import Any

import numpy as np

from crmstream.config import CrmConfig
from crmstream.operators.kernels import COL, SIGNALS
from crmstream.state.encoding import CHURN_LEVELS, SEGMENTS, STAGES, TIERS

PROFILE_ATTRIBUTES = (
    "country",
    "timezone",
    "language",
    "birthday",
    "preferred_channel",
    "email_hash",  # keyed hashes, never the address or number (privacy.pii_salt)
    "phone_hash",
)


def iso_s(epoch_ms: int) -> str:
    """Compact UTC time to the second, e.g. 2026-01-01T00:00:20Z."""
    return datetime.fromtimestamp(epoch_ms // 1000, tz=UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _num(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{value:.3f}"


def top_categories(pref: np.ndarray, names: list[str], k: int) -> list[str]:
    """The ``k`` categories with the highest positive affinity, best first."""
    order = np.argsort(-pref, kind="stable")
    return [names[i] for i in order[:k] if i < len(names) and pref[i] > 0]


def churn_contributors(row: np.ndarray, weights: np.ndarray, k: int = 3) -> list[str]:
    """The signals contributing most to the churn score (weight x signal > 0)."""
    first = COL[SIGNALS[0]]
    contrib = weights * row[first : first + len(SIGNALS)]
    order = np.argsort(-contrib, kind="stable")
    return [SIGNALS[i] for i in order[:k] if contrib[i] > 0]


def profile_fields(
    record: np.void, row: np.ndarray, config: CrmConfig, churn_weights: np.ndarray
) -> dict[str, str]:
    """The profile hash fields for one customer from its record and derived row."""
    return {
        "stage": STAGES[record["stage"]],
        "stage_since": iso_s(int(record["stage_since_ms"])) if record["stage_since_ms"] else "",
        "segment": SEGMENTS[record["segment"]],
        "tier": TIERS[record["tier"]],
        "churn_level": CHURN_LEVELS[record["churn_level"]],
        "churn_score": _num(row[COL["churn_score"]]),
        "churn_top": ",".join(churn_contributors(row, churn_weights)),
        "p_alive": _num(row[COL["p_alive"]]),
        "expected_30d": _num(row[COL["expected_30d"]]),
        "expected_90d": _num(row[COL["expected_90d"]]),
        "rfm": "-".join(str(int(row[COL[x]])) for x in ("r", "f", "m")),
        "top_categories": ",".join(
            top_categories(record["pref"], config.taxonomy.categories, config.preferences.top_k)
        ),
        "interest_shift": _num(row[COL["interest_shift"]]),
        "last_seen": iso_s(int(record["last_seen_ms"])) if record["last_seen_ms"] > 0 else "",
    }


def event_fields(event_type: str, fields: dict[str, Any], event_time_ms: int) -> dict[str, str]:
    """Profile fields set directly by a customer event (attributes, consent per channel)."""
    if event_type == "profile_updated":
        return {name: str(fields[name]) for name in PROFILE_ATTRIBUTES if name in fields}
    if event_type in ("consent_granted", "consent_withdrawn"):
        state = "granted" if event_type == "consent_granted" else "withdrawn"
        return {f"consent.{fields['channel']}": f"{state}@{iso_s(event_time_ms)}"}
    return {}

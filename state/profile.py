"""The readable profile hash written next to each customer's binary state.

This module owns the format of ``{prefix}:{<customer>}:p``, the part of the
state that downstream readers (customer 360, service desks) use without
knowing the binary layout. By default it holds lifecycle stage, value
segment, tier, churn level, top categories and the value-model version they
were derived with (``state.profile_fields``; churn score and contributors, RFM,
stage since, interest shift and last seen can be added, and ``crmstream
profile`` shows them all from the binary state). P(alive), expected purchases
and CLV are never stored: they change with time alone, so the profile view
computes them on read. Customer events add attributes and
consent. Values are short strings; numbers have three decimals.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np

from crmstream.config import CrmConfig
from crmstream.config.schema import PROFILE_FIELD_CHOICES
from crmstream.operators.params import COL
from crmstream.operators.rules import hour_prefix
from crmstream.state.encoding import CHURN_LEVELS, SEGMENTS, SIGNALS, STAGES, TIERS

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
    """Compact UTC time to the second, e.g. 2026-01-01T00:00:20Z (the date and hour
    built once per hour, as ``iso_ms`` does)."""
    hour, second = divmod(epoch_ms // 1000, 3600)
    return "%s%02d:%02dZ" % (hour_prefix(hour), second // 60, second % 60)  # noqa: UP031


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


class _Field(NamedTuple):
    source: str | None  # the record field it is computed from; None: the derived row
    value: Callable[[np.void, np.ndarray, CrmConfig, np.ndarray], str]


# Fields computed from the derived row (churn score, P(alive), ...) move with time,
# so they are always written; the others only when their record field changed.
_FIELDS: dict[str, _Field] = {
    "stage": _Field("stage", lambda rec, row, cfg, w: STAGES[rec["stage"]]),
    "stage_since": _Field(
        "stage_since_ms",
        lambda rec, row, cfg, w: iso_s(int(rec["stage_since_ms"])) if rec["stage_since_ms"] else "",
    ),
    "segment": _Field("segment", lambda rec, row, cfg, w: SEGMENTS[rec["segment"]]),
    "tier": _Field("tier", lambda rec, row, cfg, w: TIERS[rec["tier"]]),
    "churn_level": _Field("churn_level", lambda rec, row, cfg, w: CHURN_LEVELS[rec["churn_level"]]),
    "churn_score": _Field(None, lambda rec, row, cfg, w: _num(row[COL["churn_score"]])),
    "churn_top": _Field(None, lambda rec, row, cfg, w: ",".join(churn_contributors(row, w))),
    "rfm": _Field(
        None, lambda rec, row, cfg, w: "-".join(str(int(row[COL[x]])) for x in ("r", "f", "m"))
    ),
    "top_categories": _Field(
        "pref",
        lambda rec, row, cfg, w: ",".join(
            top_categories(rec["pref"], cfg.taxonomy.categories, cfg.preferences.top_k)
        ),
    ),
    "interest_shift": _Field(None, lambda rec, row, cfg, w: _num(row[COL["interest_shift"]])),
    "last_seen": _Field(
        "last_seen_ms",
        lambda rec, row, cfg, w: iso_s(int(rec["last_seen_ms"])) if rec["last_seen_ms"] > 0 else "",
    ),
    "model_version": _Field("model_version", lambda rec, row, cfg, w: str(rec["model_version"])),
}
assert tuple(_FIELDS) == PROFILE_FIELD_CHOICES  # what the config may choose


def _top_k(pref: np.ndarray, k: int) -> np.ndarray:
    """Per row, the indexes of the top ``k`` positive affinities (-1 past the positive ones)."""
    order = np.argsort(-pref, axis=1, kind="stable")[:, :k]
    return np.where(np.take_along_axis(pref, order, 1) > 0, order, -1)


def profile_changed(before: np.ndarray, after: np.ndarray, config: CrmConfig) -> np.ndarray:
    """Per record, whether a configured profile field can differ between the two
    versions (a hash write can be skipped where it cannot)."""
    changed = np.zeros(len(after), bool)
    for name in config.state.profile_fields:
        source = _FIELDS[name].source
        if source is None:
            return np.ones(len(after), bool)
        if source == "pref":
            k = config.preferences.top_k
            changed |= (_top_k(before["pref"], k) != _top_k(after["pref"], k)).any(axis=1)
        else:
            changed |= before[source] != after[source]
    return changed


def profile_fields(
    record: np.void, row: np.ndarray, config: CrmConfig, churn_weights: np.ndarray
) -> dict[str, str]:
    """The configured profile hash fields (``state.profile_fields``) for one customer
    from its record and derived row."""
    return {
        name: _FIELDS[name].value(record, row, config, churn_weights)
        for name in config.state.profile_fields
    }


def _named(names: tuple[str, ...], field: str) -> Callable[[np.ndarray, CrmConfig], list[str]]:
    return lambda records, config: [names[code] for code in records[field].tolist()]


def _top_names(records: np.ndarray, config: CrmConfig) -> list[str]:
    names = config.taxonomy.categories
    top = _top_k(records["pref"], config.preferences.top_k).tolist()
    return [",".join([names[i] for i in row if 0 <= i < len(names)]) for row in top]


# Fields computed for many records at once (the others go one record at a time).
_COLUMNS: dict[str, Callable[[np.ndarray, CrmConfig], list[str]]] = {
    "stage": _named(STAGES, "stage"),
    "segment": _named(SEGMENTS, "segment"),
    "tier": _named(TIERS, "tier"),
    "churn_level": _named(CHURN_LEVELS, "churn_level"),
    "top_categories": _top_names,
    "model_version": lambda records, config: [str(v) for v in records["model_version"].tolist()],
}


def profile_rows(
    records: np.ndarray, derived: np.ndarray, config: CrmConfig, churn_weights: np.ndarray
) -> list[dict[str, str]]:
    """``profile_fields`` for every record of a batch (and its derived row), with the
    default fields computed per field over the whole batch."""
    columns = []
    for name in config.state.profile_fields:
        batch = _COLUMNS.get(name)
        if batch is not None:
            columns.append(batch(records, config))
        else:
            value = _FIELDS[name].value
            pairs = zip(records, derived, strict=True)
            columns.append([value(rec, row, config, churn_weights) for rec, row in pairs])
    names = config.state.profile_fields
    if not names:
        return [{} for _ in range(len(records))]
    return [dict(zip(names, values, strict=True)) for values in zip(*columns, strict=True)]


def event_fields(event_type: str, fields: dict[str, Any], event_time_ms: int) -> dict[str, str]:
    """Profile fields set directly by a customer event (attributes, consent per channel)."""
    if event_type == "profile_updated":
        return {name: str(fields[name]) for name in PROFILE_ATTRIBUTES if name in fields}
    if event_type in ("consent_granted", "consent_withdrawn"):
        state = "granted" if event_type == "consent_granted" else "withdrawn"
        return {f"consent.{fields['channel']}": f"{state}@{iso_s(event_time_ms)}"}
    return {}

"""Why one trigger record went out, or which policy stopped it, as labelled lines.

This module owns the wording of an explanation: the rule and its version, the
event time, the causal event, the values that fired the rule against their
thresholds, and the delivery (channel, send window, quiet-hours deferral), or
the policy and its reason for a suppression. ``crmstream explain`` prints these
lines for one id; ``crmstream backtest`` shows two of them side by side (the
same trigger under the base and the candidate configuration).
"""

from __future__ import annotations

from typing import Any

DELIVERY_FIELDS = ("channel", "language", "send_window", "deferred", "not_before")


def headline(record: dict[str, Any], sent: bool) -> str:
    """``<type> for customer <id>: SENT`` or ``... SUPPRESSED by policy <p>`` (rich markup)."""
    outcome = "[green]SENT[/]" if sent else f"[red]SUPPRESSED[/] by policy {record.get('policy')}"
    return (
        f"[bold]{record.get('trigger_type')}[/] for customer "
        f"[bold]{record.get('customer_id')}[/]: {outcome}"
    )


def explanation_rows(record: dict[str, Any], sent: bool) -> list[tuple[str, str]]:
    """(label, text) lines explaining a trigger record (``sent``) or a suppression record,
    in the order ``crmstream explain`` prints them; a label of "" continues the line
    above."""
    rule = record.get("rule", {})
    rows = [
        ("rule", f"{rule.get('name')} v{rule.get('version')}"),
        ("event time", f"{record.get('event_time')}  detected {record.get('detected_at')}"),
    ]
    if sent:
        rows.append(("causal", f"event {record.get('causal_event_id')}"))
        reason = record.get("reason", {})
    else:
        rows.append(("why stopped", f"{record.get('reason')}"))
        reason = record.get("candidate", {})
    values, limits = reason.get("values", {}), reason.get("thresholds", {})
    rows.append(("why fired", f"values {values}"))
    if limits:
        rows.append(("", f"thresholds {limits}"))
    if sent:
        delivery = {k: record[k] for k in DELIVERY_FIELDS if record.get(k) is not None}
        emitted = record.get("emitted_at")
        rows.append(("delivery", f"{delivery}" + (f"  emitted {emitted}" if emitted else "")))
    return rows

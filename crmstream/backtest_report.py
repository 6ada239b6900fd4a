"""The backtest report: rich tables in the terminal, JSON and a PNG with ``--out``.

This module owns how a ``crmstream.backtest.Result`` is shown: the settings
the candidate changes, triggers by type and suppressions by policy under each
configuration and the difference, customers contacted and contacts per
customer, the share of customers stopped by a cap, quiet-hours send times,
and for each trigger type a few customers whose outcome changed with both
explanations side by side (``crmstream.explanation``, as ``crmstream
explain`` words them). ``--out DIR`` writes ``report.json`` (the same figures),
``changes.jsonl`` (every changed trigger id with both records) and
``report.png``.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
from rich.console import Console, Group
from rich.table import Table
from rich.text import Text

from crmstream.backtest import Result
from crmstream.backtest_diff import (
    CHANGE_KINDS,
    Change,
    Outcome,
    RunFigures,
    changes_by_type,
    examples,
    figures,
    send_time_moves,
)
from crmstream.explanation import explanation_rows
from crmstream.operators.policies import TRIGGER_TYPES

KIND_LABEL = {
    "only_base": "only under base",
    "only_candidate": "only under candidate",
    "sent_to_suppressed": "sent -> suppressed",
    "suppressed_to_sent": "suppressed -> sent",
    "policy_changed": "other policy",
    "send_time_moved": "send time moved",
    "content_changed": "content changed",
}


ROWS_PER_EXAMPLE = 4  # changes shown per example customer in the terminal


class PlotError(RuntimeError):
    """The PNG cannot be drawn (matplotlib is missing)."""


def _iso(ms: int | None) -> str:
    return "-" if ms is None else datetime.fromtimestamp(ms / 1000, UTC).isoformat()[:19]


def _delta(a: float, b: float, digits: int = 0) -> str:
    d = b - a
    if not d:
        return "0"
    return f"{d:+,.{digits}f}"


def _types(base: RunFigures, cand: RunFigures, changed: dict[str, Any]) -> list[str]:
    seen = set(base.sent_by_type) | set(cand.sent_by_type) | set(changed)
    return [t for t in TRIGGER_TYPES if t in seen] + sorted(seen - set(TRIGGER_TYPES))


def summary(result: Result, per_type: int = 3) -> dict[str, Any]:
    """The report as plain data (``report.json``)."""
    base, cand = figures(result.base), figures(result.candidate)
    by_type = changes_by_type(result.changes)
    setup = result.setup
    return {
        "input": result.source,
        "events": result.events,
        "first_event_time": _iso(result.first_event_ms),
        "last_event_time": _iso(result.last_event_ms),
        "compare_from": None
        if result.period.compare_from_ms is None
        else _iso(result.period.compare_from_ms),
        "candidate_changes": [{"key": k, "base": a, "candidate": b} for k, a, b in setup.changes],
        "pinned_to_base": {k: {"base": a, "candidate": b} for k, (a, b) in setup.pinned.items()},
        "namespace": setup.namespace.token,
        "kept": result.kept,
        "base": base.as_json(),
        "candidate": cand.as_json(),
        "triggers_by_type": {
            t: {
                "base": base.sent_by_type.get(t, 0),
                "candidate": cand.sent_by_type.get(t, 0),
                "difference": cand.sent_by_type.get(t, 0) - base.sent_by_type.get(t, 0),
                "changed": dict(by_type.get(t, {})),
            }
            for t in _types(base, cand, by_type)
        },
        "suppressions_by_policy": {
            p: {
                "base": base.suppressed_by_policy.get(p, 0),
                "candidate": cand.suppressed_by_policy.get(p, 0),
                "difference": cand.suppressed_by_policy.get(p, 0)
                - base.suppressed_by_policy.get(p, 0),
            }
            for p in sorted(set(base.suppressed_by_policy) | set(cand.suppressed_by_policy))
        },
        "changed_ids": len(result.changes),
        "changed_by_kind": {k: sum(c.kind == k for c in result.changes) for k in CHANGE_KINDS},
        "send_time_moves": send_time_moves(result.changes),
        "examples": {
            t: [
                {"customer_id": cust, "changes": [change_json(ch) for ch in chs]}
                for cust, chs in picked
            ]
            for t, picked in examples(result.changes, per_type).items()
        },
        "anomalies": {
            side: {"repeated": run.repeated, "conflicting": run.conflicting[:20]}
            for side, run in (("base", result.base), ("candidate", result.candidate))
        },
        "seconds": {k: round(v, 3) for k, v in result.seconds.items()},
    }


def change_json(ch: Change) -> dict[str, Any]:
    """One changed trigger id with both outcomes and records (``changes.jsonl``)."""
    return {
        "trigger_id": ch.trigger_id,
        "trigger_type": ch.trigger_type,
        "customer_id": ch.customer_id,
        "change": ch.kind,
        "base": None if ch.base is None else {**ch.base.as_json(), "record": ch.base.record},
        "candidate": None
        if ch.candidate is None
        else {**ch.candidate.as_json(), "record": ch.candidate.record},
    }


# -- the terminal -----------------------------------------------------------------------


def render(result: Result, console: Console, per_type: int = 3) -> None:
    """Print the report (see module docstring)."""
    data = summary(result, per_type)
    console.print(_header(result, data))
    console.print(_changes_table(result))
    console.print(_trigger_table(data))
    console.print(_policy_table(data))
    console.print(_customer_table(data))
    console.print(_quiet_table(data))
    if not result.changes:
        console.print(
            "[bold]No trigger changed:[/] every trigger id has the same outcome under both "
            "configurations."
        )
    else:
        kinds = ", ".join(f"{n:,} {KIND_LABEL[k]}" for k, n in data["changed_by_kind"].items() if n)
        console.print(f"[bold]{len(result.changes):,} trigger ids changed outcome:[/] {kinds}")
        for kind, picked in examples(result.changes, per_type).items():
            for customer, changes in picked:
                console.print(_example_table(kind, customer, changes))
    secs = result.seconds
    console.print(
        f"{result.events:,} events; read {secs.get('read_history', 0):.1f} s, kernels "
        f"{secs.get('kernels', 0):.1f} s, produced "
        f"{secs.get('produce', 0):.1f} s, base run {secs.get('run_base', 0):.1f} s, candidate "
        f"run {secs.get('run_candidate', 0):.1f} s, outputs read "
        f"{secs.get('read_base', 0) + secs.get('read_candidate', 0):.1f} s; "
        f"total {secs.get('total', 0):.1f} s"
    )


def _header(result: Result, data: dict[str, Any]) -> Text:
    text = Text.from_markup(
        f"[bold]Backtest of {result.source}[/]: {result.events:,} events, "
        f"{data['first_event_time']} .. {data['last_event_time']} (UTC)\n"
    )
    if data["compare_from"]:
        text.append(
            f"Compared: what fired from {data['compare_from']} on; the events before it "
            "built the customers' state under both configurations.\n"
        )
    if result.setup.pinned:
        pins = ", ".join(f"{k} {a} (candidate {b})" for k, (a, b) in result.setup.pinned.items())
        text.append(
            f"The candidate ran with the base's {pins}: rule versions are part of the trigger "
            "ids, and the processing steps decide how late events apply, so both stay the "
            "base's for unchanged triggers to keep their ids and outcomes (docs/backtest.md).\n"
        )
    if result.kept:
        ns = result.setup.namespace
        text.append(f"Kept the runs' topics and keys (crmstream-backtest.{ns.token}.*). ")
        for side in ("base", "candidate"):
            topics = result.setup.config(side).kafka.topics
            text.append(
                f"\n  {side}: key prefix {ns.key_prefix(side)}; crmstream explain ID --brokers ... "
                f"--set kafka.topics.triggers={topics.triggers} "
                f"--set kafka.topics.suppressions={topics.suppressions}"
            )
        text.append("\n")
    return text


def _changes_table(result: Result) -> Table | Text:
    if not result.setup.changes:
        return Text("The candidate changes no setting: its diff must be empty.")
    table = Table(title="Settings the candidate changes", title_justify="left")
    for col in ("key", "base", "candidate"):
        table.add_column(col, overflow="fold")
    for key, a, b in result.setup.changes:
        table.add_row(key, orjson.dumps(a).decode(), orjson.dumps(b).decode())
    return table


def _counts_table(title: str, first: str) -> Table:
    table = Table(title=title, title_justify="left")
    table.add_column(first)
    for col in ("base", "candidate", "difference"):
        table.add_column(col, justify="right")
    return table


def _trigger_table(data: dict[str, Any]) -> Table:
    table = _counts_table("Triggers sent, by type", "type")
    table.add_column("trigger ids changed", overflow="fold")
    for kind, row in data["triggers_by_type"].items():
        how = ", ".join(f"{n} {KIND_LABEL[k]}" for k, n in row["changed"].items())
        base, cand = row["base"], row["candidate"]
        table.add_row(kind, f"{base:,}", f"{cand:,}", _delta(base, cand), how or "-")
    return table


def _policy_table(data: dict[str, Any]) -> Table:
    table = _counts_table("Suppressions, by policy", "policy")
    for policy, row in data["suppressions_by_policy"].items():
        base, cand = row["base"], row["candidate"]
        table.add_row(policy, f"{base:,}", f"{cand:,}", _delta(base, cand))
    return table


Row = tuple[str, float, float, int]  # label, base, candidate, decimals


def _figure_rows(title: str, rows: list[Row]) -> Table:
    """A table of figures under both configurations; a bucket row (indented) that is 0
    under both is left out."""
    table = _counts_table(title, "")
    for label, x, y, digits in rows:
        if label.startswith("  ") and not x and not y:
            continue
        table.add_row(label, f"{x:,.{digits}f}", f"{y:,.{digits}f}", _delta(x, y, digits))
    return table


def _customer_table(data: dict[str, Any]) -> Table:
    b, c = data["base"], data["candidate"]
    per = "contacts per contacted customer"
    rows: list[Row] = [
        ("with a trigger or suppression", b["customers_with_candidates"],
         c["customers_with_candidates"], 0),
        ("contacted (sent at least one)", b["customers_contacted"], c["customers_contacted"], 0),
        (f"{per}, mean", b["contacts_mean"], c["contacts_mean"], 2),
        (f"{per}, median", b["contacts_median"], c["contacts_median"], 1),
        (f"{per}, max", b["contacts_max"], c["contacts_max"], 0),
    ]  # fmt: skip
    rows += [(f"  contacted {n} time(s)", b["contacts_per_customer"][n],
              c["contacts_per_customer"][n], 0) for n in b["contacts_per_customer"]]  # fmt: skip
    rows.append(("stopped by a frequency cap at least once", b["customers_capped"],
                 c["customers_capped"], 0))  # fmt: skip
    table = _figure_rows("Customers", rows)
    x, y = 100 * b["capped_share"], 100 * c["capped_share"]
    table.add_row("share stopped by a cap (of customers with one)", f"{x:.2f} %", f"{y:.2f} %",
                  _delta(x, y, 2) + (" pp" if x != y else ""))  # fmt: skip
    return table


def _quiet_table(data: dict[str, Any]) -> Table:
    b, c = data["base"], data["candidate"]
    rows: list[Row] = [
        ("sent later than detected (deferred)", b["deferred"], c["deferred"], 0),
        ("mean deferral, hours", b["shift_mean_hours"], c["shift_mean_hours"], 2),
    ]
    rows += [(f"  deferred {k}", b["deferred_by_shift"][k], c["deferred_by_shift"][k], 0)
             for k in b["deferred_by_shift"]]  # fmt: skip
    rows.append(("held past the history's end", b["held_past_end"], c["held_past_end"], 0))
    table = _figure_rows("Send times (quiet hours)", rows)
    moves = data["send_time_moves"]
    table.caption = (
        f"same trigger, other send time: {moves['moved']:,} ({moves['earlier']:,} earlier, "
        f"{moves['later']:,} later, mean {moves['mean_hours']:+.2f} h)"
    )
    return table


def _cell(outcome: Outcome | None, other: Outcome | None) -> Text:
    """One side of an example: the outcome and its explanation as ``crmstream explain``
    words it (without ``emitted_at``: the wall-clock time of the backtest's run)."""
    if outcome is None:
        when = other.event_time if other else ""
        return Text(f"no such trigger: the rule did not fire for this customer at {when}",
                    style="dim")  # fmt: skip
    text = Text()
    if outcome.sent:
        text.append("SENT", style="green")
        if outcome.held:
            text.append(f" (held until {outcome.send_at}, past the history's end)")
    else:
        text.append("SUPPRESSED", style="red")
        text.append(f" by policy {outcome.policy}")
    record = {k: v for k, v in outcome.record.items() if k != "emitted_at"}
    for label, line in explanation_rows(record, outcome.sent):
        text.append(f"\n{label:<11} {line}")
    return text


def _example_table(kind: str, customer: str, changes: list[Change]) -> Table:
    shown = changes[:ROWS_PER_EXAMPLE]
    table = Table(title=f"{kind}: customer {customer} ({len(changes)} changed)",
                  title_justify="left", show_lines=True)  # fmt: skip
    table.add_column("trigger id / change", overflow="fold", max_width=22)
    table.add_column("base", overflow="fold", ratio=1)
    table.add_column("candidate", overflow="fold", ratio=1)
    for ch in shown:
        table.add_row(Group(Text(ch.trigger_id), Text(KIND_LABEL[ch.kind], style="bold")),
                      _cell(ch.base, ch.candidate), _cell(ch.candidate, ch.base))  # fmt: skip
    if len(changes) > len(shown):
        table.caption = f"and {len(changes) - len(shown)} more (all in changes.jsonl with --out)"
    return table


# -- files --------------------------------------------------------------------------------


def check_plotting() -> None:
    """:raises PlotError: when matplotlib (the ``fit`` extra) is missing."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise PlotError(
            "--out draws report.png with matplotlib: pip install 'crmstream[fit]'"
        ) from None


def write_files(result: Result, out: Path, per_type: int = 3) -> list[Path]:
    """report.json, changes.jsonl and report.png in ``out``; the paths written."""
    out.mkdir(parents=True, exist_ok=True)
    data = summary(result, per_type)
    report = out / "report.json"
    report.write_bytes(orjson.dumps(data, option=orjson.OPT_INDENT_2))
    changes = out / "changes.jsonl"
    with changes.open("wb") as handle:
        for ch in result.changes:
            handle.write(orjson.dumps(change_json(ch)) + b"\n")
    png = out / "report.png"
    plot(data, png)
    return [report, changes, png]


def plot(data: dict[str, Any], path: Path) -> None:
    """Six panels: triggers by type, suppressions by policy, contacts per customer and
    quiet-hours deferrals (base and candidate side by side), the changed trigger ids
    by type and kind of change, and the settings the candidate changes."""
    check_plotting()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(18, 9))
    pairs = [
        ("Triggers sent, by type", data["triggers_by_type"]),
        ("Suppressions, by policy", data["suppressions_by_policy"]),
        ("Contacted customers, by contacts", _pairs(data, "contacts_per_customer")),
        ("Deferred triggers, by deferral", _pairs(data, "deferred_by_shift")),
    ]
    for ax, (title, rows) in zip(axes.flat[[0, 1, 3, 4]], pairs, strict=True):
        xs = range(len(rows))
        ax.bar([x - 0.2 for x in xs], [r["base"] for r in rows.values()], 0.4, label="base")
        ax.bar([x + 0.2 for x in xs], [r["candidate"] for r in rows.values()], 0.4,
               label="candidate")  # fmt: skip
        ax.set_xticks(list(xs), list(rows), rotation=30, ha="right", fontsize=8)
        ax.set_title(title)
        ax.legend()
    _changed_panel(axes.flat[2], data)
    _settings_panel(axes.flat[5], data)
    fig.suptitle(f"Backtest of {data['input']}: {data['events']:,} events, "
                 f"{data['changed_ids']:,} trigger ids changed")  # fmt: skip
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _pairs(data: dict[str, Any], name: str) -> dict[str, dict[str, int]]:
    return {k: {"base": v, "candidate": data["candidate"][name][k]}
            for k, v in data["base"][name].items()}  # fmt: skip


def _changed_panel(ax: Any, data: dict[str, Any]) -> None:
    types = [t for t, row in data["triggers_by_type"].items() if row["changed"]]
    bottom = [0] * len(types)
    for i, kind in enumerate(CHANGE_KINDS):  # colours C2..: C0 and C1 are base, candidate
        heights = [data["triggers_by_type"][t]["changed"].get(kind, 0) for t in types]
        if any(heights):
            ax.bar(range(len(types)), heights, bottom=bottom, label=KIND_LABEL[kind],
                   color=f"C{i + 2}")  # fmt: skip
            bottom = [b + h for b, h in zip(bottom, heights, strict=True)]
    ax.set_xticks(range(len(types)), types, rotation=30, ha="right", fontsize=8)
    ax.set_title("Trigger ids changed, by type")
    if types:
        ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, "none", ha="center", va="center", transform=ax.transAxes)


def _settings_panel(ax: Any, data: dict[str, Any]) -> None:
    ax.axis("off")
    ax.set_title("Settings the candidate changes")
    lines = [f"{c['key']}: {orjson.dumps(c['base']).decode()} -> "
             f"{orjson.dumps(c['candidate']).decode()}"
             for c in data["candidate_changes"][:20]] or ["none"]  # fmt: skip
    ax.text(0, 1, "\n".join(line[:90] for line in lines), va="top", family="monospace",
            fontsize=8, transform=ax.transAxes)  # fmt: skip

"""The harness's plot: throughput per contender and p99 latency against offered load."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = results["runs"]
    fig, axes = plt.subplots(len(runs), 2, figsize=(13, 4.5 * len(runs)), squeeze=False)
    for row, run in zip(axes, runs, strict=True):
        names = [c["name"] for c in run["contenders"]]
        rates = [c["events_per_s"] for c in run["contenders"]]
        row[0].barh(names, rates, color="#4477aa")
        row[0].set_xlabel("events/s")
        row[0].set_title(f"throughput, {run['customers']:,} customers")
        row[0].invert_yaxis()
        for contender in sorted({r["contender"] for r in run.get("latency", [])}):
            points = [r for r in run["latency"] if r["contender"] == contender and r["p99_ms"]]
            row[1].plot(
                [p["offered_events_per_s"] for p in points],
                [p["p99_ms"] for p in points],
                marker="o",
                label=f"{contender} p99",
            )
        row[1].axhline(500, color="grey", linestyle="--", label="500 ms target")
        row[1].set_yscale("log")
        row[1].set_xlabel("offered events/s")
        row[1].set_ylabel("event → trigger, ms")
        row[1].set_title("latency against offered load")
        row[1].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)

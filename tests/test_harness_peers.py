"""The harness's new measurements: shard progress, timer lateness, CPU per event, and a
peer that cannot run here left out with the reason (no servers needed)."""

from __future__ import annotations

import argparse
import stat
from pathlib import Path

import pytest

from crmstream.bench.harness import contenders
from crmstream.bench.harness.measure import Result, split_latencies
from crmstream.bench.harness.report import _latency_cells, _throughput_cells
from crmstream.bench.harness.runs import Harness, SizeRun
from crmstream.bench.harness.shards import ShardProgress

CLICK = "h.clickstream"


def _progress(samples: list[tuple[float, dict[int, int], dict[int, int]]]) -> ShardProgress:
    """Two shards over one topic of 4 partitions of 100 messages; each sample gives the
    applied counts per partition of shard 0 and of shard 1."""
    ends = {(CLICK, p): 100 for p in range(4)}
    progress = ShardProgress(client=None, prefix="h", shards=2, ends=ends)
    for at, zero, one in samples:
        progress.samples.append(
            (
                at,
                [{(CLICK, p): n for p, n in zero.items()}, {(CLICK, p): n for p, n in one.items()}],
            )
        )
    return progress


def test_each_shard_is_timed_over_the_partitions_of_its_own_customers():
    """Shard 1 (partitions 1 and 3) finishes its own input at 2 s while shard 0 (0 and 2,
    the hot one) needs 9 s; shard 1 having read the hot partitions' positions late does
    not count against it."""
    progress = _progress(
        [
            (101.0, {0: 20, 2: 20}, {1: 60, 3: 40, 0: 5}),
            (102.0, {0: 50, 2: 50}, {1: 100, 3: 100, 0: 10}),
            (105.0, {0: 90, 2: 90}, {1: 100, 3: 100, 0: 50}),
            (109.0, {0: 100, 2: 100}, {1: 100, 3: 100, 0: 100}),
        ]
    )
    assert progress.own(0) == [(CLICK, 0), (CLICK, 2)]
    zero, one = progress.report(started_at=100.0)
    assert zero == {
        "shard": 0,
        "own_events": 200,
        "seconds_to": {"50%": 2.0, "90%": 5.0, "100%": 9.0},
    }
    assert one["seconds_to"] == {"50%": 1.0, "90%": 2.0, "100%": 2.0}


def test_a_shard_that_never_finishes_says_so():
    (zero, one) = _progress([(101.0, {0: 60, 2: 30}, {1: 10, 3: 10})]).report(started_at=100.0)
    assert zero["seconds_to"] == {"50%": None, "90%": None, "100%": None}  # 90 of 200
    assert one["seconds_to"]["50%"] is None


def test_timer_triggers_are_timed_from_their_due_time_apart_from_event_triggers():
    records = [
        {"causal_event_id": "e1", "event_time": "2026-01-01T00:00:00.000+00:00",
         "emitted_at": "2026-01-01T00:00:00.120+00:00"},
        {"causal_event_id": "timer:cart_abandoned:c1:1767225603000",
         "event_time": "2026-01-01T00:00:03.000+00:00",
         "emitted_at": "2026-01-01T00:00:03.450+00:00"},
    ]  # fmt: skip
    events, timers = split_latencies(records)
    assert events == [pytest.approx(120, abs=0.01)]
    assert timers == [pytest.approx(450, abs=0.01)]


def test_cpu_per_event_and_the_ceiling_a_peer_is_compared_with_are_shown():
    pathway = Result("Pathway (2 threads)", 1, 200_000, 4.0, [300.0], cpu_seconds=3.0, cores=2)
    assert pathway.cpu_us_per_event == pytest.approx(15.0)
    runs = [
        Result("ceiling (1 proc)", 1, 200_000, 1.0, [100.0]),
        Result("ceiling (2 proc)", 2, 200_000, 0.8, [90.0, 90.0]),
        pathway,
    ]
    row = SizeRun.row(pathway, [pathway], runs)
    assert row["ceiling"] == "ceiling (2 proc)" and row["ratio_to_ceiling"] == 0.2
    cells = _throughput_cells(row)
    assert cells[3] == "0.200 (to ceiling (2 proc))" and cells[4] == "15.0"
    assert Result("naive (1 proc)", 1, 10, 1.0, [1.0]).cpu_us_per_event is None


def test_the_latency_row_shows_timer_lateness_only_where_timers_fired():
    row = {
        "contender": "crmstream", "offered_load": 0.5, "offered_events_per_s": 30_000,
        "triggers": 900, "p50_ms": 80.0, "p99_ms": 300.0, "timers": 40,
        "timer_late_p50_ms": 350.0, "timer_late_p99_ms": 900.0, "timer_late_max_ms": 1200.0,
        "cpu_pct": {"contender": 70, "broker": 60, "generator": 20},
    }  # fmt: skip
    assert _latency_cells(row)[6:8] == ["40", "350.0 / 900.0 / 1200.0"]
    assert _latency_cells({**row, "contender": "quix", "timers": None})[6:8] == ["-", "-"]


def _fake_python(path: Path, message: str) -> None:
    path.parent.mkdir(parents=True)
    path.write_text(f"#!/bin/sh\necho '{message}' >&2\nexit 1\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)


def test_pathway_that_cannot_be_installed_is_left_out_with_the_reason(tmp_path, monkeypatch):
    venv = tmp_path / ".venv-pathway"
    _fake_python(venv / "bin" / "python", "ERROR: No matching distribution found for pathway")
    monkeypatch.setattr(contenders, "PATHWAY_VENV", venv)
    with pytest.raises(contenders.PeerUnavailable, match="importing pathway failed: ERROR: No"):
        contenders.ensure_pathway_venv(lambda _line: None)
    harness = Harness(argparse.Namespace(no_pathway=False))
    assert harness.pathway_python() is None
    assert harness.results["left_out"]["pathway"].startswith("importing pathway failed")


def test_the_shard_progress_of_the_sampled_run_is_kept_whichever_run_is_the_median():
    sampled = Result("crmstream (2 proc)", 2, 100, 2.0, [1.0, 1.0], shards=[{"shard": 0}])
    median = Result("crmstream (2 proc)", 2, 100, 1.0, [1.0, 1.0])
    runs = [Result("ceiling (2 proc)", 2, 100, 0.5, [1.0, 1.0]), median]
    assert SizeRun.row(median, [sampled, median], runs)["shards"] == [{"shard": 0}]

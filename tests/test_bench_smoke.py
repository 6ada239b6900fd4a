"""The benchmark harness's --smoke mode runs every contender end to end (no timing asserted)."""

from __future__ import annotations

import subprocess
import sys

import orjson
import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_harness_smoke_runs_every_contender_and_writes_the_table_and_plot(tmp_path):
    run = subprocess.run(
        [sys.executable, "-m", "crmstream.bench.harness", "--smoke", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=1500,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    result = orjson.loads((tmp_path / "harness.json").read_bytes())
    (size,) = result["runs"]
    names = [c["name"] for c in size["contenders"]]
    assert names[:5] == [
        "ceiling (1 proc)",
        "crmstream (1 proc)",
        "ceiling (2 proc)",
        "crmstream (2 proc)",
        "naive (1 proc)",
    ]
    assert "Quix Streams (1 proc)" in names
    for contender in size["contenders"]:
        assert contender["events"] == size["events"], contender  # everyone read all input
        assert all(m > 0 for m in contender["peak_rss_mb"])
    assert {r["contender"] for r in size["latency"]} == {"crmstream", "naive", "quix"}
    assert all(r["triggers"] > 0 for r in size["latency"])
    assert (tmp_path / "harness.png").stat().st_size > 10_000
    print(f"harness smoke: {size['ratios']}")

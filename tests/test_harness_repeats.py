"""The harness reports each ceiling and crmstream contender by its median run.

One run's rate moved by a third between harness runs (bench/RESULTS.md, round 13).
"""

from __future__ import annotations

import pytest

from crmstream.bench.harness import Result, _runs_cell, main, median_run


def _run(events: int, seconds: float = 1.0) -> Result:
    return Result("crmstream (1 proc)", 1, events, seconds, [100.0])


def test_the_median_run_is_the_middle_rate_whatever_the_order():
    runs = [_run(70_000), _run(50_000), _run(90_000, seconds=2.0)]  # 45,000 events/s last
    assert median_run(runs) is runs[1]
    assert median_run(runs[:1]) is runs[0]
    # Of an even number, the lower of the middle two: the table never shows the best run.
    assert median_run([_run(60_000), _run(80_000)]).rate == 60_000


def test_the_runs_cell_lists_every_run_only_when_there_were_several():
    assert _runs_cell({"runs_events_per_s": [70_923, 65_001, 72_400]}) == "70,923; 65,001; 72,400"
    assert _runs_cell({"runs_events_per_s": [3_085]}) == "-"
    assert _runs_cell({}) == "-"


def test_repeats_below_one_are_refused_with_the_value(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--repeats", "0", "--no-quix"])
    assert exit_info.value.code == 2
    assert "--repeats must be at least 1, got 0" in capsys.readouterr().err

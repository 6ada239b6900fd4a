"""The generator's customer activity is calibrated to a real shop's history (CDNOW).

bench/activity.py: the figures come from CDNOW_master.txt in the lifetimes wheel,
and the default workload's sessions spread over its customers as CDNOW's purchases
do; Zipf 1.1 stays available as the hot-key stress workload.
"""

from __future__ import annotations

import itertools
from collections import Counter

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from crmstream.bench.activity import (
    CDNOW_CUSTOMERS,
    CDNOW_PURCHASES,
    CDNOW_SHARES,
    Shares,
    cdnow_shares,
    weights,
)
from crmstream.bench.workload import Workload, WorkloadSpec
from crmstream.config import load_config

CONFIG = load_config(None, [], env={})

# How far one draw of CDNOW's 69,659 sessions may be from CDNOW's own shares: about
# three standard deviations of the draw's chance (40 seeds: top 1 +2 % +- 8 %, top 10
# +1 % +- 2 %, top 1 % +2 % +- 1 %; bench/README.md, "Customer activity").
TOLERANCE = Shares(top1=0.25, top10=0.07, top1pct=0.05)


def test_the_cdnow_figures_are_those_of_the_data_file():
    measured = cdnow_shares()
    assert measured.top1 == pytest.approx(CDNOW_SHARES.top1, abs=1e-6)
    assert measured.top10 == pytest.approx(CDNOW_SHARES.top10, abs=1e-6)
    assert measured.top1pct == pytest.approx(CDNOW_SHARES.top1pct, abs=1e-6)
    # the figures, rounded as it gives them
    assert (round(100 * measured.top1, 2), round(100 * measured.top10, 2)) == (0.31, 1.86)
    assert int(1000 * measured.top1pct) == 109


def _session_shares(spec: WorkloadSpec, sessions: int) -> Shares:
    workload = Workload(CONFIG, spec)
    drawn = Counter(workload.session_customer().cid for _ in range(sessions))
    return Shares.of_counts(drawn.values(), spec.customers)


def test_the_default_workload_spreads_sessions_as_cdnow_spreads_purchases():
    spec = WorkloadSpec(customers=CDNOW_CUSTOMERS)
    assert spec.activity == "cdnow"
    got = _session_shares(spec, CDNOW_PURCHASES)
    for field in ("top1", "top10", "top1pct"):
        ratio = getattr(got, field) / getattr(CDNOW_SHARES, field)
        assert abs(ratio - 1) <= getattr(TOLERANCE, field), (field, got, CDNOW_SHARES)


def test_the_hot_key_stress_workload_keeps_the_old_skew():
    """Zipf 1.1: the busiest of 100k customers held 13.5 % of the sessions."""
    got = _session_shares(WorkloadSpec(customers=100_000, activity="zipf"), 30_000)
    assert 0.12 < got.top1 < 0.15, got


def _busiest_share_of_sessions(activity: str) -> float:
    workload = Workload(CONFIG, WorkloadSpec(customers=2_000, activity=activity, seed=5))
    starts = Counter()
    for event in itertools.islice(workload.events(), 40_000):
        if event.valid and orjson.loads(event.value)["event_type"] == "session_start":
            starts[event.key] += 1
    return max(starts.values()) / sum(starts.values())


def test_the_event_stream_draws_its_sessions_by_the_activity():
    # 2,000 customers: the busiest weighs 1.8 % under cdnow, 15 % under Zipf 1.1.
    assert _busiest_share_of_sessions("cdnow") < 0.04
    assert _busiest_share_of_sessions("zipf") > 0.10


def test_an_unknown_activity_is_refused_with_its_name():
    with pytest.raises(ValueError, match="unknown customer activity 'pareto'"):
        Workload(CONFIG, WorkloadSpec(customers=10, activity="pareto"))
    with pytest.raises(ValueError, match="at least one customer, got 0"):
        weights("cdnow", 0)


@settings(max_examples=30, deadline=None)
@given(customers=st.integers(2_000, 400_000))
def test_the_cdnow_shape_does_not_depend_on_the_number_of_customers(customers):
    """More customers of the same kind: the top 1 % keep their share of the weight, the
    busiest customer's share falls, and rank never raises a weight."""
    w = weights("cdnow", customers)
    total = sum(w)
    assert all(a >= b > 0 for a, b in itertools.pairwise(w))
    top_pct = sum(w[: round(customers * 0.01)]) / total
    assert 0.095 < top_pct < 0.115, top_pct
    assert w[0] / total < 120 / customers

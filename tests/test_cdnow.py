"""CDNOW: real purchases through the real flow, checked against the BTYD summary.

The calibration period ends 1997-09-30. The standard BTYD summary (frequency
= repeat purchase days, recency t_x and age T in days from the first purchase)
is computed here independently from the raw file, and P(alive) and the
expected purchases from SciPy's 2F1. Every customer must match.
"""

from __future__ import annotations

from collections import defaultdict
from datetime import UTC, date, datetime

import numpy as np
import pytest
import redis

from crmstream.flows.replay import cdnow_events, cdnow_path, read_cdnow, replay
from crmstream.operators.kernels import COL, MS_PER_DAY, derive_batch, params_from
from crmstream.operators.reference import reference_bgnbd
from crmstream.state.encoding import decode_batch

pytestmark = pytest.mark.integration
CALIBRATION_END = date(1997, 9, 30)


def btyd_summary(path, end: date) -> dict[str, tuple[int, int, int]]:
    """customer -> (frequency, recency, T) in days, straight from the file."""
    days: dict[str, set[date]] = defaultdict(set)
    with path.open() as handle:
        next(handle)
        for line in handle:
            cid, ymd, _n, _usd = line.split()
            day = date(int(ymd[:4]), int(ymd[4:6]), int(ymd[6:]))
            if day <= end:
                days["cdnow-" + cid].add(day)
    return {c: (len(d) - 1, (max(d) - min(d)).days, (end - min(d)).days) for c, d in days.items()}


def test_stream_btyd_summary_and_bgnbd_match_for_every_customer(isolated_config, stack):
    config = isolated_config("processing.min_event_time=1990-01-01T00:00:00+00:00", partitions=4)
    path = cdnow_path()
    rows = read_cdnow(path, CALIBRATION_END)
    replay(stack, config, list(cdnow_events(rows, config.kafka.topics.orders)))

    expected = btyd_summary(path, CALIBRATION_END)
    customers = sorted(expected)
    assert len(customers) == 23_570
    client = redis.Redis.from_url(stack.redis_url)
    prefix = config.redis.key_prefix
    keys = [f"{prefix}:{{{c}}}:s" for c in customers]
    blobs = []
    for i in range(0, len(keys), 5000):
        blobs += client.mget(keys[i : i + 5000])
    assert all(b is not None for b in blobs)
    records = decode_batch(blobs, keys)

    end_ms = int(datetime(1997, 9, 30, tzinfo=UTC).timestamp() * 1000)
    end_day = end_ms // MS_PER_DAY
    got_x = records["purchase_days"].astype(np.int64) - 1
    got_tx = (records["last_purchase_day"] - records["first_purchase_day"]).astype(np.int64)
    got_t = end_day - records["first_purchase_day"].astype(np.int64)
    want = np.array([expected[c] for c in customers])
    mismatched = [
        c for i, c in enumerate(customers) if (got_x[i], got_tx[i], got_t[i]) != tuple(want[i])
    ]
    assert not mismatched, f"{len(mismatched)} customers differ, e.g. {mismatched[:5]}"

    params = params_from(config)
    derived = derive_batch(records, np.full(len(customers), end_ms, np.int64), params)
    bg = config.bgnbd
    for i, (x, t_x, big_t) in enumerate(want):
        p_alive, e30 = reference_bgnbd(x, t_x / 7, big_t / 7, 30 / 7, bg.r, bg.alpha, bg.a, bg.b)
        _, e90 = reference_bgnbd(x, t_x / 7, big_t / 7, 90 / 7, bg.r, bg.alpha, bg.a, bg.b)
        row = derived[i]
        assert row[COL["p_alive"]] == pytest.approx(p_alive, rel=1e-9), customers[i]
        assert row[COL["expected_30d"]] == pytest.approx(e30, rel=1e-9), customers[i]
        assert row[COL["expected_90d"]] == pytest.approx(e90, rel=1e-9), customers[i]
    # the data set is what it is: most CDNOW customers never came back
    assert (want[:, 0] == 0).mean() > 0.5

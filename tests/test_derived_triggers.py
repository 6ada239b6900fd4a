"""The batch test of derived-label triggers gives what the per-customer one gives."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from crmstream.config import load_config
from crmstream.operators import kernels as K
from crmstream.operators.catalog import TriggerCatalog
from crmstream.state.encoding import PREF_CATEGORIES, SEGMENTS, TIERS, fresh_records

BASE_MS = 20_000 * K.MS_PER_DAY
CONFIGS = {
    "default": load_config(env={}),
    "tier upgrade off": load_config(env={}, overrides=["rules.tier_upgrade.enabled=false"]),
}


def _customer(
    data: st.DataObject, records: np.ndarray, derived: np.ndarray, i: int, min_shift: float
) -> None:
    """Labels as they may be after a step, and as they were before it."""
    rec = records[i : i + 1]
    rec["churn_level"] = data.draw(st.integers(0, 2))
    rec["tier"] = data.draw(st.integers(0, len(TIERS) - 1))
    rec["segment"] = data.draw(st.integers(0, len(SEGMENTS) - 1))
    rec["rule_flags"] = data.draw(st.integers(0, 255))
    rec["last_seen_ms"] = BASE_MS + i
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    rec["pref"] = rng.random(PREF_CATEGORIES, np.float32)
    rec["pref_snap"] = rng.permutation(PREF_CATEGORIES).astype(np.uint8)
    derived[i] = rng.random(len(K.COL))
    derived[i, K.COL["old_churn_level"]] = data.draw(st.integers(0, 2))
    derived[i, K.COL["old_tier"]] = data.draw(st.integers(0, len(TIERS) - 1))
    derived[i, K.COL["old_segment"]] = data.draw(st.integers(0, len(SEGMENTS) - 1))
    derived[i, K.COL["interest_shift"]] = data.draw(
        st.sampled_from([0.0, min_shift / 2, min_shift, (1 + min_shift) / 2])
    )


@pytest.mark.parametrize("name", sorted(CONFIGS))
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_the_batch_gives_every_candidate_the_per_customer_test_gives(name, data):
    config = CONFIGS[name]
    catalog = TriggerCatalog(config, K.params_from(config).churn_weights)
    n = data.draw(st.integers(1, 8))
    records, derived = fresh_records(n), np.zeros((n, len(K.COL)))
    for i in range(n):
        _customer(data, records, derived, i, config.rules.interest_shift.min_distance)
    customers = [f"c{i}" for i in range(n)]
    one_by_one, batch = records.copy(), records.copy()
    want = [
        cand
        for i, customer in enumerate(customers)
        for cand in catalog.from_derived(customer, one_by_one[i], derived[i])
    ]
    assert catalog.from_derived_batch(customers, batch, derived) == want
    assert batch.tobytes() == one_by_one.tobytes()  # the interest-shift flag, set alike

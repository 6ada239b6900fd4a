"""Versioned value-model parameter sets (state/model.py) and the as-of profile view: the
flow runs with the active fitted set from its next start and records its version in
triggers and profiles; the view derives as of the shard's event-time watermark."""

from __future__ import annotations

import numpy as np
import pytest
import redis

from crmstream.operators.btyd import clv, gamma_gamma_spend
from crmstream.operators.rules import iso_ms
from crmstream.profile import ProfileError, customer_view, customer_views
from crmstream.state import model
from crmstream.state.layout import shard_of
from crmstream.state.store import StateStore
from tests.conftest import T0_MS, read_topic, run_flow

pytestmark = pytest.mark.integration
D = 86400.0
CDNOW_FIT = {"r": 0.2516, "alpha": 4.789, "a": 0.723, "b": 2.161}
BIG_SPENDERS = {"p": 6.25, "q": 3.74, "v": 15_440.0}  # a thousand times CDNOW's spend


def _set(bgnbd=None, gamma_gamma=None, **extra):
    return {"bgnbd": bgnbd or CDNOW_FIT, "gamma_gamma": gamma_gamma or BIG_SPENDERS, **extra}


def test_sets_get_new_versions_and_one_is_active(isolated_config, stack):
    config = isolated_config()
    client, prefix = redis.Redis.from_url(stack.redis_url), config.redis.key_prefix
    assert model.versions(client, prefix) == (0, [])
    assert model.adopt(config, client) == config  # nothing fitted: the configuration
    first = model.save(client, prefix, _set(customers=10))
    second = model.save(client, prefix, _set(gamma_gamma={"p": 1, "q": 2, "v": 3}), False)
    assert (first, second) == (1, 2)
    active, sets = model.versions(client, prefix)
    assert active == 1 and [s["version"] for s in sets] == [1, 2]
    assert sets[0]["customers"] == 10 and sets[1]["gamma_gamma"] == {"p": 1, "q": 2, "v": 3}
    adopted = model.adopt(config, client)
    assert adopted.value.model_version == 1 and adopted.bgnbd.alpha == CDNOW_FIT["alpha"]
    assert adopted.gamma_gamma.v == BIG_SPENDERS["v"] and adopted.rules == config.rules
    model.activate(client, prefix, 2)
    assert model.adopt(config, client).gamma_gamma.q == 2
    off = config.model_copy(update={"value": config.value.model_copy(update={"use_fitted": False})})
    assert model.adopt(off, client) == off
    model.activate(client, prefix, 0)
    assert model.adopt(config, client) == config
    with pytest.raises(model.ModelError, match="no parameter set version 9"):
        model.activate(client, prefix, 9)
    with pytest.raises(model.ModelError, match=r"gamma_gamma.q must be > 1, got 0.5"):
        model.save(client, prefix, _set(gamma_gamma={"p": 1, "q": 0.5, "v": 3}))
    with pytest.raises(model.ModelError, match=r"bgnbd.alpha must be a number > 0, got -1"):
        model.save(client, prefix, _set(bgnbd={**CDNOW_FIT, "alpha": -1}))
    assert model.versions(client, prefix)[1][-1]["version"] == 2  # nothing half-saved


def _order(s, customer, at, amount):
    return s.event("orders", customer, "order_placed", at, order_id=f"{customer}-{at}",
                   amount=amount, currency="USD")  # fmt: skip


def test_the_flow_runs_with_the_active_set_and_records_its_version(isolated_config, script, stack):
    """A fitted set saved before the flow starts is what it derives with: its spend
    parameters put the repeat buyer in the high-CLV segment (the configured ones do
    not), and every trigger, the state and the profile hash name its version."""
    config = isolated_config()
    client, prefix = redis.Redis.from_url(stack.redis_url), config.redis.key_prefix
    version = model.save(client, prefix, _set())
    s = script(config)
    for at in (0, 10 * D, 20 * D):
        _order(s, "vic", at, 20.0)
    s.flush()
    run_flow(config, stack)

    triggers = read_topic(stack, config.kafka.topics.triggers)
    assert triggers and {t["rule"]["model_version"] for t in triggers} == {version}
    store = StateStore(client, prefix)
    profile = store.read_customer("vic")[1]
    assert profile["model_version"] == str(version) and profile["segment"] == "high_clv"
    assert not {"p_alive", "expected_30d", "expected_90d", "clv"} & set(profile)
    view = customer_view(store, config, "vic")
    assert view["value"]["model_version"] == view["value"]["stored_model_version"] == version
    # on read: the fitted set's CLV, computed independently from the closed forms
    x, t_x, big_t = 2.0, 20 / 7, 20 / 7
    spend = gamma_gamma_spend(x, 20.0, **{k: BIG_SPENDERS[k] for k in "pqv"})
    want = clv(x, t_x, big_t, spend, 12, 0.01, *CDNOW_FIT.values())
    assert view["value"]["clv"] == pytest.approx(want, abs=0.01) and want > 500
    # with the configured parameters (a reader that does not use fitted sets): not high CLV
    plain = config.model_copy(
        update={"value": config.value.model_copy(update={"use_fitted": False})}
    )
    again = customer_view(store, plain, "vic")
    assert again["value"]["model_version"] == 0 and again["value"]["clv"] < 500
    assert again["lifecycle"]["segment"] == "regular"


def test_the_view_reads_as_of_the_shards_watermark_not_the_wall_clock(
    isolated_config, script, stack
):
    """After a run, each customer is read as of the newest event time its shard applied
    (or its own newest event if later), so history replayed years later reads as of its
    own time; a time before the customer's newest event's day is refused."""
    config = isolated_config("processing.shards=2")
    s = script(config)
    customers = [f"w{i}" for i in range(12)]
    for i, customer in enumerate(customers):
        _order(s, customer, i * D, 30.0)
    s.flush()
    run_flow(config, stack)

    client = redis.Redis.from_url(stack.redis_url)
    store = StateStore(client, config.redis.key_prefix)
    views = customer_views(store, config, [*customers, "nobody"])
    assert set(views) == set(customers)
    # every shard reads every input partition: its watermark is the input's newest time
    newest = T0_MS + int(11 * D * 1000)
    assert {shard_of(c, 2) for c in customers} == {0, 1}
    for customer in customers:
        shard = shard_of(customer, 2)
        assert views[customer]["as_of"] == iso_ms(newest), customer
        assert views[customer]["as_of_source"] == f"shard {shard} event-time watermark"
    first = views["w0"]  # quiet for 11 days of event time: read as such
    assert first["rfm"]["days_since_purchase"] == 11 == first["bgnbd"]["age_T_days"]
    # a fixed time: everyone as of then; the wall clock; and a time the state cannot give
    later = T0_MS + int(400 * D * 1000)
    fixed = customer_views(store, config, customers, later)
    assert {v["as_of"] for v in fixed.values()} == {iso_ms(later)}
    assert fixed["w0"]["lifecycle"]["stage"] == "lost" and fixed["w0"]["rfm"]["orders_365d"] == 0
    with pytest.raises(ProfileError, match=r"customer 'w\d+': as of .* is before the day of"):
        customer_views(store, config, customers, T0_MS + int(5 * D * 1000))
    assert np.isfinite(first["value"]["clv"])

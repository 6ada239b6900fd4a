"""Events of one customer at the same event time and Kafka time in two topics.

A finer cutting cannot split them (one Kafka millisecond is one step), so the step
orders them: by their topics' roles (customers, orders, clickstream, feedback), then
partition and offset (docs/triggers.md, "Event time"). Outsider 51 found the order
taken from the topics' names: the same log gave other triggers when only the names
changed, a backtest (its own topic names) disagreed with the flow, and with the default
names a browse interest went out on the push channel withdrawn at the same millisecond.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from crmstream.config import CrmConfig
from crmstream.flows.runtime import Runtime
from tests.shard_driver import Message, Outcome, driver_config, run_log
from tests.test_batching import _ROLE, ONE_STEP, cuttings, histories

pytestmark = pytest.mark.integration

T0 = 1_767_268_680_000  # 2026-01-01T11:58:00Z
MIN = 60_000
_runs = itertools.count()


@pytest.fixture(scope="module")
def named(stack) -> dict[str, CrmConfig]:
    """Two configurations whose input topics' names sort in opposite orders."""
    as_roles = driver_config(stack, "ties-runs", "timers.idle_watermark_ms=0")
    reversed_ = driver_config(
        stack, "ties-rev-runs", "timers.idle_watermark_ms=0",
        "kafka.topics.orders=a-ties-orders", "kafka.topics.feedback=b-ties-feedback",
        "kafka.topics.customers=c-ties-customers", "kafka.topics.clickstream=d-ties-clicks",
    )  # fmt: skip
    return {"role names": as_roles, "reversed names": reversed_}


@pytest.fixture(scope="module")
def shared(named, stack) -> Iterator[Runtime]:
    runtime = Runtime(named["role names"], stack)
    yield runtime
    runtime.close()


def _run(config: CrmConfig, stack, log: list[Message], cutting, shared) -> Outcome:
    prefix = f"tie{next(_runs)}"
    own = config.model_copy(
        update={"redis": config.redis.model_copy(update={"key_prefix": prefix})}
    )
    outcome = run_log(own, stack, log, cutting, max(m.kafka_ms for m in log), shared)
    redis = {key.split(":", 1)[1]: value for key, value in outcome.redis.items()}
    return outcome._replace(redis=redis, dead_letters=[])  # none: every message is valid


def _msg(customer: str, kind: str, at: int, **fields: Any) -> Message:
    body = {"event_id": f"{customer}-{kind}-{at}", "customer_id": customer,
            "event_type": kind, "event_time": at, **fields}  # fmt: skip
    return Message(_ROLE.get(kind, "clickstream"), 0, customer.encode(), orjson.dumps(body), at)


def _view(at: int) -> Message:
    return _msg("tia", "product_view", at, product_id=f"p{at}", category="beauty")


# The outsider's log: the third view completes a browse interest at 12:00:00.000, the
# millisecond the customer withdraws push consent.
_WITHDRAWN_AT_THE_VIEW = [
    _view(T0),
    _view(T0 + MIN),
    _msg("tia", "consent_withdrawn", T0 + 2 * MIN, channel="push"),
    _view(T0 + 2 * MIN),
    _msg("zed", "page_view", T0 + 62 * MIN),
]


@pytest.mark.parametrize("names", ["role names", "reversed names"])
def test_a_withdrawal_stops_a_candidate_of_the_same_millisecond(named, stack, shared, names):
    outcome = _run(named[names], stack, _WITHDRAWN_AT_THE_VIEW, ONE_STEP, shared)
    assert [r["trigger_type"] for r in outcome.triggers] == []
    stopped = [(r["trigger_type"], r["policy"]) for r in outcome.suppressions]
    assert stopped == [("browse_interest", "consent")]


@st.composite
def tied_histories(draw: st.DrawFn) -> list[Message]:
    """``histories`` with some events moved to the instant of the event before them (in
    event and Kafka time): same-millisecond events of one customer in two topics."""
    log = draw(histories(max_events=16))
    out: list[Message] = []
    for msg in log:
        if out and draw(st.booleans()):
            at = out[-1].kafka_ms
            body = orjson.loads(msg.value)
            body["event_time"] = at
            msg = msg._replace(value=orjson.dumps(body), kafka_ms=at)
        out.append(msg)
    return out


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(log=tied_histories(), cutting=cuttings)
@example(log=_WITHDRAWN_AT_THE_VIEW, cutting=ONE_STEP)
def test_ties_give_the_same_outcome_under_any_topic_names_and_cutting(
    named, stack, shared, log, cutting
):
    """The state, triggers and suppressions of a log with ties: one step on topics named
    as their roles, any cutting on topics whose names sort the other way."""
    whole = _run(named["role names"], stack, log, ONE_STEP, shared)
    other = _run(named["reversed names"], stack, log, cutting, shared)
    assert other.triggers == whole.triggers
    assert other.suppressions == whole.suppressions
    assert other.redis == whole.redis

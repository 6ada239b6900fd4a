"""Each exactly-once guard alone (docs/guarantees.md, section 1; issue 39).

Three guards keep a re-read event from being applied twice: the shard's own
progress (``ShardStep.unapplied`` drops what is at or below its committed
offset per input partition), the offsets in each customer's state
(``check_events`` against the floor as loaded), and the event-id check (the
customer's last 8 event ids within ``processing.dedup_horizon_seconds``). In
the full flow each hides the others' mistakes, so each is run here with the
other two switched off (``flows.shard_step.GUARDS``, a test hook): a replay of
what was applied, with new events after it, must give the state and triggers
of one run over the input. The checks themselves are also held at their
boundaries without servers: an event at the customer's recorded offset, the
ring of 8 ids and the horizon. Invalid events, which no per-customer guard sees,
are held at the shard's offset (below, at and after it) with every guard on.
"""

from __future__ import annotations

import numpy as np
import orjson
import pytest
from prometheus_client import REGISTRY

from crmstream.config import load_config
from crmstream.flows import shard_step
from crmstream.operators import kernels as K
from crmstream.operators.hashing import event_id_digests
from crmstream.state.encoding import DEDUP_IDS, decode_batch, fresh_records
from tests.shard_driver import Cutting, Message, run_log

CONFIG = load_config(None, [], env={})
HORIZON = CONFIG.processing.dedup_horizon_seconds
T0 = 1_767_258_600_000  # 2026-01-01T09:10:00Z


# -- the checks, without servers ----------------------------------------------------------
def _check(records, offsets, ids, seconds=None, partitions=None, horizon=HORIZON, **kw):
    n = len(offsets)
    seconds = [1_000_000] * n if seconds is None else seconds
    partitions = [0] * n if partitions is None else partitions
    return K.check_batch(
        records, np.zeros(n, np.int32), np.zeros(n, np.int8), np.array(partitions, np.int32),
        np.array(offsets, np.int64), event_id_digests(ids), np.array(seconds, np.int64),
        horizon, **kw,
    ).tolist()  # fmt: skip


def _applied(offset: int, partition: int = 0):
    records = fresh_records(1)
    records["applied_partition"][0, 0] = partition
    records["applied_offset"][0, 0] = offset
    return records


def test_an_event_at_the_customers_recorded_offset_is_a_replay_and_the_next_is_not():
    R, F = K.REPLAYED, K.FRESH
    assert _check(_applied(41), [40, 41, 42], ["a", "b", "c"], horizon=0) == [R, R, F]
    # another partition of the same role: the customer moved (re-partitioned), not a replay
    assert _check(_applied(41, 1), [40, 41], ["a", "b"], horizon=0) == [F, F]


def test_the_floor_is_the_offset_as_loaded_not_as_the_batch_moves_it():
    """A batch's own later offsets do not make its earlier events replays: the order
    of a batch (its timeline order) does not change the verdicts."""
    verdicts = _check(_applied(10), [15, 12, 11], ["a", "b", "c"], horizon=0)
    assert verdicts == [K.FRESH] * 3


def test_an_input_position_read_twice_in_one_batch_is_applied_once():
    repeated = np.array([False, True])
    assert _check(fresh_records(1), [5, 5], ["a", "a2"], horizon=0, repeated=repeated) == [
        K.FRESH, K.REPLAYED]  # fmt: skip


def test_the_ring_holds_the_last_8_ids():
    """The 9th distinct id pushes the first out: it is applied again; the 2nd is still
    in the ring."""
    ids = [f"e{k}" for k in range(DEDUP_IDS + 1)]
    first = _check(fresh_records(1), list(range(DEDUP_IDS + 1)), ids)
    assert first == [K.FRESH] * (DEDUP_IDS + 1)
    records = fresh_records(1)
    again = _check(records, list(range(DEDUP_IDS + 3)), [*ids, "e0", "e2"])
    assert again[-2:] == [K.FRESH, K.DUPLICATE]


def test_duplicates_within_the_horizon_either_side_and_none_with_the_check_off():
    t = 1_000_000
    D, F = K.DUPLICATE, K.FRESH
    for gap, verdict in ((HORIZON, D), (-HORIZON, D), (HORIZON + 1, F), (-HORIZON - 1, F)):
        assert _check(fresh_records(1), [0, 1], ["x", "x"], [t, t + gap])[1] == verdict, gap
    assert _check(fresh_records(1), [0, 1], ["x", "x"], horizon=0) == [F, F]


def test_the_offsets_hook_leaves_only_the_event_id_check():
    records = _applied(41)
    verdicts = K.check_batch(
        records, np.zeros(2, np.int32), np.zeros(2, np.int8), np.zeros(2, np.int32),
        np.array([40, 41], np.int64), event_id_digests(["a", "a"]),
        np.array([1_000_000] * 2, np.int64), HORIZON, None, offsets=False,
    )  # fmt: skip
    assert verdicts.tolist() == [K.FRESH, K.DUPLICATE]


# -- each guard alone, through the shard step (real redis-server and broker) ------------
def _views(customer: str, n: int, at: int) -> list[Message]:
    out = []
    for k in range(n):
        body = {"event_id": f"{customer}-{at + k}", "customer_id": customer,
                "event_type": "product_view", "event_time": at + k * 1000,
                "product_id": "p1", "category": "beauty"}  # fmt: skip
        out.append(Message("clickstream", 0, customer.encode(), orjson.dumps(body), at + k))
    return out


def _config(isolated_config):
    config = isolated_config("processing.shards=1", "timers.idle_watermark_ms=0", partitions=1)
    return config


ONE_STEP = Cutting(10**13, (5000,), 0)


def _fields(redis: dict, masked: tuple[str, ...]) -> dict:
    """The Redis state without the prefix, customer states decoded (but the ``masked``
    fields), so that the fields that differ are named."""
    out = {}
    for key, value in redis.items():
        key = key.split(":", 1)[1]
        if key.endswith(":s"):
            record = decode_batch([value], [key])[0]
            out[key] = {n: record[n].tolist() for n in record.dtype.names if n not in masked}
        else:
            out[key] = value
    return out


def _replay(isolated_config, stack, guards: frozenset[str], retry: bool):
    """A run that applies the input's first part, then the input read again from offset
    0 in one step with new events (a restart whose progress is older than the customers'
    state), or with a producer's retry of the first part at new offsets (``retry``);
    only ``guards`` on. Returns the second run's outcome, both runs' trigger ids, and
    the outcome of one run over the input with every guard on."""
    first = _views("ann", 2, T0) + _views("bo", 3, T0 + 10)  # bo's 3rd view: browse interest
    rest = _views("ann", 1, T0 + 100_000) + _views("bo", 1, T0 + 100_000)  # ann's 3rd
    log_1, log_2 = first, (first + first + rest) if retry else (first + rest)
    end = T0 + 200_000
    reference = run_log(_config(isolated_config), stack, first + rest, ONE_STEP, end)
    saved = shard_step.GUARDS
    shard_step.GUARDS = guards
    try:
        config = _config(isolated_config)
        one = run_log(config, stack, log_1, ONE_STEP, end)
        before = _dropped(config)
        two = run_log(config, stack, log_2, ONE_STEP, end)
        dropped = {k: v - before[k] for k, v in _dropped(config).items()}
    finally:
        shard_step.GUARDS = saved
    ids = sorted(t["trigger_id"] for t in one.triggers + two.triggers)
    return two._replace(dead_letters=dropped), ids, reference


def _dropped(config) -> dict[str, float]:
    """The metrics of events dropped as replayed and as duplicates on the config's
    clickstream topic (docs/metrics.md)."""
    labels = {"topic": config.kafka.topics.clickstream}
    return {name: REGISTRY.get_sample_value(name, labels) or 0.0
            for name in ("crmstream_replayed_events_skipped_total",
                         "crmstream_duplicate_events_total")}  # fmt: skip


@pytest.mark.integration
@pytest.mark.parametrize("alone", sorted(shard_step.GUARDS))
def test_each_guard_alone_keeps_a_replay_from_counting_twice(alone, isolated_config, stack):
    """With only ``alone`` on, the state and the triggers are those of one run over the
    input: bo's and ann's browse interest, once each."""
    two, ids, reference = _replay(isolated_config, stack, frozenset({alone}),
                                  retry=alone == "event_ids")  # fmt: skip
    # What the guards that were off record is not written (the ring of recent ids), and
    # a producer's retry puts the new events at later offsets than in the reference.
    masked = {"event_ids": ("applied_offset",)}.get(alone, ("recent_ids", "recent_s",
                                                            "recent_next"))  # fmt: skip
    got, want = _fields(two.redis, masked), _fields(reference.redis, masked)
    assert got.keys() == want.keys()
    for key in want:
        if key.endswith(":s"):
            differ = [f for f in want[key] if got[key][f] != want[key][f]]
            assert differ == [], (key, {f: (got[key][f], want[key][f]) for f in differ})
    assert got == want
    assert ids == sorted(t["trigger_id"] for t in reference.triggers)
    assert len(ids) == 2, ids
    # each drop is counted as what it was: the 5 events read again as replayed, or both
    # copies of the 5 retried ones as duplicates (two.dead_letters: the metrics' increase)
    kind, n = ("duplicate", 10.0) if alone == "event_ids" else ("replayed_events_skipped", 5.0)
    assert two.dead_letters == {
        name: (n if kind in name else 0.0) for name in two.dead_letters}  # fmt: skip


@pytest.mark.integration
@pytest.mark.parametrize("retry", [False, True])
def test_with_every_guard_off_the_replay_counts_twice(retry, isolated_config, stack):
    """The control: with no guard, the same replays are applied again, so each test above
    sees its guard at work and not a scenario that needs none."""
    two, _ids, reference = _replay(isolated_config, stack, frozenset(), retry)
    masked = ("recent_ids", "recent_s", "recent_next", "applied_offset")
    got, want = _fields(two.redis, masked), _fields(reference.redis, masked)
    views = K.PRODUCT_VIEW
    assert [got[k]["type_counts"][views] for k in ("{ann}:s", "{bo}:s")] == (
        [7, 10] if retry else [5, 7])  # fmt: skip
    assert [want[k]["type_counts"][views] for k in ("{ann}:s", "{bo}:s")] == [3, 4]


def _invalid(name: str, at: int) -> Message:
    """A clickstream view without its product: a dead letter, never a customer's event."""
    body = {"event_id": name, "customer_id": "ann", "event_type": "product_view",
            "event_time": at, "category": "beauty"}  # fmt: skip
    return Message("clickstream", 0, b"ann", orjson.dumps(body), at)


@pytest.mark.integration
def test_invalid_events_at_or_below_the_shards_offset_are_not_dead_lettered_again(
    isolated_config, stack
):
    """Invalid events pass no per-customer guard: the shard's progress alone keeps a
    replay from dead-lettering them twice. The first run ends at offset 2 (``at``);
    read again with an offset after it, only the one after (``after``) goes out."""
    first = [*_views("ann", 1, T0), _invalid("below", T0 + 1), _invalid("at", T0 + 2)]
    rest = [_invalid("after", T0 + 100_000), *_views("ann", 1, T0 + 100_001)]
    config = _config(isolated_config)
    one = run_log(config, stack, first, ONE_STEP, T0 + 200_000)
    two = run_log(config, stack, first + rest, ONE_STEP, T0 + 200_000)

    def offsets(out):
        return sorted(d["source"]["offset"] for d in out.dead_letters)

    assert (offsets(one), offsets(two)) == ([1, 2], [3])


def test_the_step_keeps_only_fresh_events_and_counts_each_drop_as_what_it_was():
    """The verdicts, as the step reads them: a replay (at or below the customer's recorded
    offset) is skipped, a duplicate id dropped, the rest kept (no servers: the step's
    checks before the customer step)."""
    from crmstream.flows.step_work import StepWork
    from crmstream.operators.events import EventValidator
    from crmstream.operators.params import params_from
    from crmstream.operators.rules import TriggerBuilder
    from tests.thresholds import body, parse

    validator = EventValidator(CONFIG)
    work = StepWork(CONFIG, params_from(CONFIG), None, 0, validator.role,
                    TriggerBuilder(CONFIG))  # fmt: skip
    views = [body("product_view", T0 + k, event_id=f"v{k}") for k in range(4)]
    views[3]["event_id"] = "v2"  # the third view's id again, later
    events = parse(CONFIG, views)  # offsets 0..3 of one clickstream partition
    records = _applied(0)  # offset 0 of that role's partition 0 is applied
    fresh, counts, keep = work.unapplied(events, records, {"c": 0})
    assert [ev.event_id for ev in fresh] == ["v1", "v2"]
    assert keep.tolist() == [False, True, True, False]
    topic = CONFIG.kafka.topics.clickstream
    assert counts == {("skipped_events", topic, None): 1, ("duplicate_events", topic, None): 1,
                      ("events_in", topic, "product_view"): 2}  # fmt: skip

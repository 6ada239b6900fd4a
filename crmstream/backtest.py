"""``crmstream backtest``: one recorded history through the real flow under two configurations.

This module owns running a backtest. The history (``crmstream.backtest_history``:
a JSON-lines file, Kafka topics, or CDNOW, optionally cut to event times) is
produced once to input topics of the backtest's own; the flow then reads it
twice, once per configuration, each run with its own Redis key prefix and its
own output topics (``Namespace``), on the embedded stack or on the Kafka and
Redis given. Each run's outputs are read back with the project's reader
(``crmstream.ops.TopicReader``), plus the triggers still held through quiet
hours when the history ended (their timers in Redis), and compared by
trigger id (``crmstream.backtest_diff``). Against given infrastructure the
backtest's topics and keys are removed at the end unless ``keep``.

The base and the candidate are configuration files as ``--config`` takes them
(each over the embedded default); the backtest replaces only what isolates the
runs (topics, key prefix, addresses). The candidate runs with the base's rule
versions and processing steps (``pinned_keys``), so that what its change does
not touch keeps its id and outcome.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from crmstream.backtest_diff import Change, RunOutputs, detected_since, diff, run_outputs
from crmstream.backtest_history import (
    WHOLE_HISTORY,
    BacktestError,
    Event,
    Period,
    Progress,
    event_ms,
    load_history,
)
from crmstream.config import CrmConfig, load_config, mask_secrets
from crmstream.config.schema import TopicsConfig
from crmstream.embedded import infrastructure
from crmstream.flows.crm import check_state_layout
from crmstream.flows.replay import produce_events, run_to_end, source_overrides
from crmstream.flows.runtime import Endpoints, Runtime
from crmstream.operators.kernels import warm_up
from crmstream.ops import TopicReader
from crmstream.state.model import model_key
from crmstream.state.store import StateStore, connect
from crmstream.state.timers import parse_member
from crmstream.topics import admin_client, create_topics

log = logging.getLogger(__name__)
SIDES = ("base", "candidate")
# Keys that only say where a run reads and writes: the backtest sets them itself.
PLACEMENT_KEYS = ("kafka.brokers", "redis.url", "redis.key_prefix", "kafka.topics.")


@dataclass(frozen=True)
class Namespace:
    """Where the two runs read and write: shared input topics, per-run outputs and keys."""

    token: str

    @classmethod
    def new(cls) -> Namespace:
        return cls(secrets.token_hex(4))

    def key_prefix(self, side: str) -> str:
        return f"bt-{self.token}-{side[:4]}"

    def topic(self, role: str, side: str) -> str:
        shared = role in ("clickstream", "orders", "customers", "feedback")
        return f"crmstream-backtest.{self.token}." + (role if shared else f"{side}.{role}")

    def overrides(self, side: str) -> list[str]:
        sets = [f"kafka.topics.{r}={self.topic(r, side)}" for r in TopicsConfig.model_fields]
        return [*sets, f"redis.key_prefix={self.key_prefix(side)}"]


@dataclass(frozen=True)
class Setup:
    """The two run configurations and what the candidate changes."""

    base: CrmConfig
    candidate: CrmConfig
    namespace: Namespace
    changes: list[tuple[str, Any, Any]]  # (dotted key, base value, candidate value)
    pinned: dict[str, tuple[Any, Any]]  # dotted key -> (base value, candidate's own)
    model_prefixes: tuple[str, str]  # each configuration's own key prefix (fitted models)

    def config(self, side: str) -> CrmConfig:
        return self.base if side == "base" else self.candidate


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """Dotted key -> value of every leaf (an empty mapping has none)."""
    if isinstance(tree, dict):
        out: dict[str, Any] = {}
        for key, value in tree.items():
            out.update(_flatten(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: tree}


def config_changes(base: CrmConfig, candidate: CrmConfig) -> list[tuple[str, Any, Any]]:
    """(dotted key, base value, candidate value) of every setting the candidate changes,
    secrets masked, placement (addresses, topics, key prefix) left out."""
    a = _flatten(mask_secrets(base.model_dump(mode="json")))
    b = _flatten(mask_secrets(candidate.model_dump(mode="json")))
    keys = sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))
    return [(k, a.get(k), b.get(k)) for k in keys if not k.startswith(PLACEMENT_KEYS)]


def pinned_keys(base: CrmConfig, candidate: CrmConfig) -> dict[str, tuple[Any, Any]]:
    """Settings the candidate's run takes from the base: dotted key -> (base value,
    candidate's own value), where they differ.

    - ``rules.<name>.version``: a version is part of every trigger id of its rule, so
      the candidate's own would give every trigger of the rule a new id, changed or
      not, and nothing of the rule could be matched.
    - ``processing.step_ms``: the steps the input is cut into decide which of a
      customer's events arrive late (after a later event of its own was applied,
      docs/triggers.md, "Lateness"), and late events apply differently; the same
      steps keep the diff to what the rules and policies decide.
    """
    pinned: dict[str, tuple[Any, Any]] = {}
    for name, rule in base.rules:
        own = getattr(candidate.rules, name).version
        if own != rule.version:
            pinned[f"rules.{name}.version"] = (rule.version, own)
    if candidate.processing.step_ms != base.processing.step_ms:
        pinned["processing.step_ms"] = (base.processing.step_ms, candidate.processing.step_ms)
    return pinned


def prepare(
    base_file: Path | None,
    candidate_file: Path,
    sets: list[str],
    source: str,
    namespace: Namespace | None = None,
    env: dict[str, str] | None = None,
) -> Setup:
    """Load and check both configurations and give each run its namespace.

    ``sets`` (``--set``, ``--brokers``, ``--redis-url``) apply to both; the addresses
    are the base's. :raises ConfigError: naming the file, key and value.
    """
    ns = namespace or Namespace.new()
    common = [*source_overrides(source), *sets]
    base_own = load_config(base_file, common, env=env)
    cand_own = load_config(candidate_file, common, env=env)
    placement = []
    if base_own.kafka.brokers:
        placement.append(f"kafka.brokers={','.join(base_own.kafka.brokers)}")
    if base_own.redis.url:
        placement.append(f"redis.url={base_own.redis.url}")
    pinned = pinned_keys(base_own, cand_own)
    pins = [f"{key}={base_value}" for key, (base_value, _own) in pinned.items()]
    base = load_config(base_file, [*common, *placement, *ns.overrides("base")], env=env)
    candidate = load_config(
        candidate_file, [*common, *placement, *ns.overrides("candidate"), *pins], env=env
    )
    return Setup(
        base,
        candidate,
        ns,
        config_changes(base_own, cand_own),
        pinned,
        (base_own.redis.key_prefix, cand_own.redis.key_prefix),
    )


# -- running -------------------------------------------------------------------------


@dataclass
class Result:
    """What a backtest ran and what it found."""

    setup: Setup
    source: str
    events: int
    first_event_ms: int | None
    last_event_ms: int | None
    base: RunOutputs
    candidate: RunOutputs
    changes: list[Change]
    seconds: dict[str, float] = field(default_factory=dict)
    period: Period = WHOLE_HISTORY
    kept: bool = False


def held_records(store: StateStore, shards: int) -> list[dict[str, Any]]:
    """Trigger records still held through quiet hours (their "deferred" timers): approved,
    due to go out after the history's end."""
    held = []
    for shard in range(shards):
        for member, due in store.client.zscan_iter(store.timers.key(shard), count=1000):
            timer = parse_member(member, due)
            if timer.kind == "deferred":
                held.append(orjson.loads(timer.ref))
    return held


def read_outputs(
    endpoints: Endpoints, config: CrmConfig, on_progress: Progress | None = None
) -> RunOutputs:
    """A run's triggers, suppressions and dead letters (read to the end of their topics)
    and its triggers still held in Redis."""
    topics = config.kafka.topics
    found: dict[str, list[dict[str, Any]]] = {topics.triggers: [], topics.suppressions: []}
    dead = 0
    names = [topics.triggers, topics.suppressions, topics.dead_letter]
    props = config.kafka.consumer_properties()
    if on_progress:
        on_progress("reading outputs", 0, None)
    with TopicReader(list(endpoints.brokers), props, names, 15) as reader:
        records = reader.every()
    for record in records:
        if record.topic == topics.dead_letter:
            dead += 1
        else:
            found[record.topic].append(record.value)
    if on_progress:
        on_progress("reading outputs", len(records), len(records))
    store = StateStore(connect(endpoints.redis_url, config.redis), config.redis.key_prefix)
    try:
        held = held_records(store, config.processing.shards)
    finally:
        store.client.close()
    return run_outputs(found[topics.triggers], found[topics.suppressions], held, dead)


def _copy_model(endpoints: Endpoints, config: CrmConfig, own_prefix: str) -> None:
    """Give the run the fitted value model its configuration would use live: the
    parameter sets under its own key prefix in the given Redis, if there are any."""
    store = StateStore(connect(endpoints.redis_url, config.redis), config.redis.key_prefix)
    try:
        sets = store.client.hgetall(model_key(own_prefix))
        if sets:
            store.client.hset(model_key(config.redis.key_prefix), mapping=sets)
    finally:
        store.client.close()


def _run_side(
    endpoints: Endpoints, config: CrmConfig, total: int, label: str, on_progress: Progress | None
) -> None:
    runtime = Runtime(config, endpoints)
    try:
        check_state_layout(runtime)
        run_to_end(runtime, total, _labelled(label, on_progress))
    finally:
        runtime.close()


def _labelled(label: str, on_progress: Progress | None) -> Callable[[str, int, int], None] | None:
    if on_progress is None:
        return None
    return lambda stage, done, total: on_progress(f"{label}: {stage}", done, total)


def remove_namespace(
    endpoints: Endpoints, setup: Setup, topics: bool = True, keys: bool = True
) -> None:
    """Delete the backtest's ``topics`` and Redis ``keys`` (on given servers: the embedded
    ones go away with everything on them)."""
    names = sorted({setup.namespace.topic(r, s) for r in TopicsConfig.model_fields for s in SIDES})
    admin = admin_client(list(endpoints.brokers), setup.base.kafka.client)
    deleting = admin.delete_topics(names, request_timeout=30) if topics else {}
    for name, future in deleting.items():
        try:
            future.result(timeout=60)
        except Exception as exc:  # a leftover topic is worth a warning, not a failure
            log.warning("could not delete backtest topic %s: %s", name, exc)
    for side in SIDES if keys else ():
        config = setup.config(side)
        client = connect(endpoints.redis_url, config.redis)
        try:
            batch = []
            for key in client.scan_iter(match=f"{config.redis.key_prefix}:*", count=1000):
                batch.append(key)
                if len(batch) == 1000:
                    client.unlink(*batch)
                    batch.clear()
            if batch:
                client.unlink(*batch)
        finally:
            client.close()


def run_backtest(
    setup: Setup,
    source: str,
    period: Period = WHOLE_HISTORY,
    keep: bool = False,
    on_progress: Progress | None = None,
) -> Result:
    """Replay ``source`` (the events of ``period``) under the base and the candidate
    configuration and compare what they fired from ``period.compare_from_ms`` on.

    :raises BacktestError: when the history cannot be read or is empty.
    :raises LayoutError, StateStoreError, TopicError: from the infrastructure.
    """
    seconds: dict[str, float] = {}
    started = time.monotonic()
    base = setup.base
    events = load_history(source, base, period.from_ms, period.until_ms, on_progress)
    if not events:
        raise BacktestError(f"--input {source!r} has no events in the given period")
    times = [t for t in (event_ms(e[2]) for e in events) if t is not None]
    seconds["read_history"] = time.monotonic() - started
    given_kafka, given_redis = bool(base.kafka.brokers), bool(base.redis.url)
    with infrastructure(base) as endpoints:
        try:
            outputs = _replay_twice(setup, endpoints, events, seconds, on_progress)
        finally:
            if not keep and (given_kafka or given_redis):
                remove_namespace(endpoints, setup, topics=given_kafka, keys=given_redis)
    mark = time.monotonic()
    outputs = {side: detected_since(run, period.compare_from_ms) for side, run in outputs.items()}
    changes = diff(outputs["base"], outputs["candidate"])
    seconds["compare"] = time.monotonic() - mark
    seconds["total"] = time.monotonic() - started
    return Result(
        setup,
        source,
        len(events),
        min(times, default=None),
        max(times, default=None),
        outputs["base"],
        outputs["candidate"],
        changes,
        seconds,
        period,
        kept=keep and (given_kafka or given_redis),
    )


def _replay_twice(
    setup: Setup,
    endpoints: Endpoints,
    events: list[Event],
    seconds: dict[str, float],
    on_progress: Progress | None,
) -> dict[str, RunOutputs]:
    for side in SIDES:
        config = setup.config(side)
        create_topics(list(endpoints.brokers), config)
        _copy_model(endpoints, config, setup.model_prefixes[SIDES.index(side)])
    mark = time.monotonic()
    if on_progress:  # compiled on a clone's first run (a minute), else loaded from cache
        on_progress("loading the flow's kernels", 0, 1)
    warm_up(setup.base)
    if on_progress:
        on_progress("loading the flow's kernels", 1, 1)
    seconds["kernels"] = time.monotonic() - mark
    mark = time.monotonic()
    produce_events(endpoints, setup.base, events, _labelled("history", on_progress))
    seconds["produce"] = time.monotonic() - mark
    outputs = {}
    for side in SIDES:
        mark = time.monotonic()
        _run_side(endpoints, setup.config(side), len(events), side, on_progress)
        seconds[f"run_{side}"] = time.monotonic() - mark
    for side in SIDES:
        mark = time.monotonic()
        outputs[side] = read_outputs(endpoints, setup.config(side), _labelled(side, on_progress))
        seconds[f"read_{side}"] = time.monotonic() - mark
    return outputs

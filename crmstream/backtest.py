"""``crmstream backtest``: one recorded history through the real flow under two configurations.

This module owns running a backtest. The history (a JSON-lines file, Kafka
topics, or CDNOW, optionally cut to event times ``--from`` .. ``--until``) is
produced once to input topics of the backtest's own; the flow then reads it
twice, once per configuration, each run with its own Redis key prefix and its
own output topics (``Namespace``), on the embedded stack or on the Kafka and
Redis given. Each run's outputs are read back with the project's reader
(``crmstream.ops.read_records``), plus the triggers still held through quiet
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
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any, NamedTuple

import orjson
from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, TopicPartition

from crmstream.backtest_diff import Change, RunOutputs, detected_since, diff, run_outputs
from crmstream.config import CrmConfig, load_config, mask_secrets
from crmstream.config.schema import TopicsConfig
from crmstream.embedded import infrastructure
from crmstream.flows.crm import check_state_layout
from crmstream.flows.replay import (
    ReplayError,
    produce_events,
    route_event,
    run_to_end,
    source_events,
    source_overrides,
    topics_by_event_type,
)
from crmstream.flows.runtime import Endpoints, Runtime
from crmstream.operators.kernels import warm_up
from crmstream.ops import read_records, reader_config
from crmstream.state.model import model_key
from crmstream.state.store import StateStore, connect
from crmstream.state.timers import parse_member
from crmstream.topics import TopicError, admin_client, create_topics, partitions_of

log = logging.getLogger(__name__)
SIDES = ("base", "candidate")
Event = tuple[str, bytes | None, bytes]
Progress = Callable[[str, int, int | None], None]
# Keys that only say where a run reads and writes: the backtest sets them itself.
PLACEMENT_KEYS = ("kafka.brokers", "redis.url", "redis.key_prefix", "kafka.topics.")


class BacktestError(RuntimeError):
    """The backtest cannot run as asked (bad input, configuration or infrastructure)."""


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


# -- the history ---------------------------------------------------------------------


def parse_bound(text: str | None, end: bool, flag: str | None = None) -> int | None:
    """``--from`` / ``--until``: an ISO-8601 date (the whole day, UTC) or time (UTC unless
    it has an offset), as epoch ms; ``end``: a date means its last millisecond."""
    if text is None:
        return None
    try:
        if len(text) == 10:
            day = date.fromisoformat(text)
            start = int(datetime(day.year, day.month, day.day, tzinfo=UTC).timestamp() * 1000)
            return start + 86_399_999 if end else start
        when = datetime.fromisoformat(text)
    except ValueError:
        flag = flag or ("--until" if end else "--from")
        raise BacktestError(
            f"{flag} must be an ISO-8601 date or time (e.g. 2026-01-02 or "
            f"2026-01-02T08:00:00+00:00), got {text!r}"
        ) from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return int(when.timestamp() * 1000)


class Period(NamedTuple):
    """Which events a backtest replays (``from_ms`` .. ``until_ms``, inclusive; None:
    unbounded) and from when it compares what they fired (``compare_from_ms``: the
    events before it only build the customers' state)."""

    from_ms: int | None = None
    until_ms: int | None = None
    compare_from_ms: int | None = None

    @classmethod
    def parse(cls, start: str | None, until: str | None, compare_from: str | None) -> Period:
        """From ``--from``, ``--until`` and ``--compare-from``.

        :raises BacktestError: naming an unreadable or inconsistent bound."""
        period = cls(parse_bound(start, end=False), parse_bound(until, end=True),
                     parse_bound(compare_from, end=False, flag="--compare-from"))  # fmt: skip
        lo, hi, cmp = period
        if lo is not None and hi is not None and lo > hi:
            raise BacktestError(f"--from {start} is after --until {until}")
        if cmp is not None and ((lo is not None and cmp < lo) or (hi is not None and cmp > hi)):
            raise BacktestError(f"--compare-from {compare_from} is outside --from .. --until")
        return period


WHOLE_HISTORY = Period()


def event_ms(value: bytes) -> int | None:
    """The event time of a recorded event, or None when the flow could not read one."""
    from crmstream.operators.events import _Invalid, parse_time_ms

    try:
        body = orjson.loads(value)
        return parse_time_ms(body["event_time"])
    except (orjson.JSONDecodeError, TypeError, KeyError, _Invalid):
        return None


def within(events: list[Event], from_ms: int | None, until_ms: int | None) -> list[Event]:
    """The events with event times in [from_ms, until_ms]. With a bound, an event whose
    time cannot be read is left out (the flow would dead-letter it): nothing is moved
    between periods. Without one, every event is kept."""
    if from_ms is None and until_ms is None:
        return events
    lo = -(2**63) if from_ms is None else from_ms
    hi = 2**63 if until_ms is None else until_ms
    kept = []
    for ev in events:
        ms = event_ms(ev[2])
        if ms is not None and lo <= ms <= hi:
            kept.append(ev)
    return kept


def topic_events(
    config: CrmConfig, topics: list[str], on_progress: Progress | None = None
) -> list[Event]:
    """Every record of ``topics`` on the configured brokers, from the start, in Kafka-time
    order (then topic, partition, offset), routed to the flow's input topics by event
    type as a file's lines are (``flows.replay.route_event``)."""
    brokers = list(config.kafka.brokers or [])
    consumer = Consumer(reader_config(brokers, config.kafka.consumer_properties()))
    found: list[tuple[int, str, int, int, bytes | None, bytes]] = []
    try:
        parts = []
        for topic in topics:
            try:
                ids = partitions_of(consumer, topic, 15)
            except TopicError as exc:
                raise BacktestError(f"--input: {exc}") from None
            parts += [TopicPartition(topic, p, OFFSET_BEGINNING) for p in ids]
        consumer.assign(parts)
        pending = {(p.topic, p.partition) for p in parts}
        while pending:
            for msg in consumer.consume(1000, 1.0):
                err = msg.error()
                if err is not None:
                    if err.code() == KafkaError._PARTITION_EOF:
                        pending.discard((msg.topic(), msg.partition()))
                        continue
                    raise BacktestError(f"--input: reading {msg.topic()}: {err.str()}")
                _kind, ts = msg.timestamp()
                found.append(
                    (ts, msg.topic(), msg.partition(), msg.offset(), msg.key(), msg.value() or b"")
                )
            if on_progress:
                on_progress("reading the input topics", len(found), None)
    finally:
        consumer.close()
    found.sort(key=lambda m: m[:4])
    by_type = topics_by_event_type(config)
    fallback = config.kafka.topics.clickstream
    return [route_event(value, by_type, fallback, key) for *_, key, value in found]


def load_history(
    source: str,
    config: CrmConfig,
    from_ms: int | None,
    until_ms: int | None,
    on_progress: Progress | None = None,
) -> list[Event]:
    """The input events of ``source``: 'cdnow', a JSON-lines file, or (with brokers
    configured) comma-separated Kafka topics; routed to ``config``'s input topics.

    :raises BacktestError: when the source cannot be found or read.
    """
    if source == "cdnow" or Path(source).is_file():
        try:
            events = source_events(source, config)
        except ReplayError as exc:
            raise BacktestError(str(exc)) from None
    elif config.kafka.brokers:
        events = topic_events(
            config, [t.strip() for t in source.split(",") if t.strip()], on_progress
        )
    else:
        raise BacktestError(
            f"--input {source!r}: no such file; give a JSON-lines file, 'cdnow', or Kafka "
            f"topics with --brokers"
        )
    return within(events, from_ms, until_ms)


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
    read = 0
    for topic, record in read_records(list(endpoints.brokers), props, names, follow=False):
        if record is None:
            continue
        read += 1
        if topic == topics.dead_letter:
            dead += 1
        else:
            found[topic].append(record)
        if on_progress and read % 5000 == 0:
            on_progress("reading outputs", read, None)
    if on_progress:
        on_progress("reading outputs", read, read)
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


def remove_namespace(endpoints: Endpoints, setup: Setup) -> None:
    """Delete the backtest's topics and Redis keys (given infrastructure, without keep)."""
    names = sorted({setup.namespace.topic(r, s) for r in TopicsConfig.model_fields for s in SIDES})
    admin = admin_client(list(endpoints.brokers), setup.base.kafka.client)
    for name, future in admin.delete_topics(names, request_timeout=30).items():
        try:
            future.result(timeout=60)
        except Exception as exc:  # a leftover topic is worth a warning, not a failure
            log.warning("could not delete backtest topic %s: %s", name, exc)
    for side in SIDES:
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
    given = bool(base.kafka.brokers and base.redis.url)
    with infrastructure(base) as endpoints:
        try:
            outputs = _replay_twice(setup, endpoints, events, seconds, on_progress)
        finally:
            if given and not keep:
                remove_namespace(endpoints, setup)
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
        kept=given and keep,
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

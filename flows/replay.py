"""Replaying recorded history through the real flow, in event time.

This module owns ``crmstream replay``: it turns a recorded source into input
events, produces them to the input topics (keyed by customer) and runs the
flow until it has read them all. The first source is the CDNOW dataset
(69,659 purchases by 23,570 customers, 1997-01 to 1998-06), read as a data
file from the ``lifetimes`` wheel, never by importing that package.
"""

from __future__ import annotations

import importlib.util
import logging
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, date, datetime
from pathlib import Path
from typing import NamedTuple

import orjson

from crmstream.config import CrmConfig
from crmstream.flows import input_ends
from crmstream.flows.crm import check_state_layout, input_source, run_in_process
from crmstream.flows.runtime import Endpoints, Runtime, wall_clock_ms
from crmstream.flows.sink import DeliveryCheckedProducer, record_limit
from crmstream.metrics import counter_total, get_metrics
from crmstream.operators.events import TOPIC_ROLE_TYPES, _Invalid, parse_time_ms
from crmstream.topics import admin_client

log = logging.getLogger(__name__)
CDNOW_CUSTOMER_PREFIX = "cdnow-"


class ReplayError(RuntimeError):
    """The replay source cannot be found or read."""


class Transaction(NamedTuple):
    customer: str
    day: date
    amount: float
    line: int


def cdnow_path() -> Path:
    """CDNOW_master.txt inside the installed ``lifetimes`` wheel (located, not imported)."""
    spec = importlib.util.find_spec("lifetimes")
    if spec is None or not spec.submodule_search_locations:
        raise ReplayError(
            "the CDNOW dataset ships in the 'lifetimes' wheel: "
            "pip install --no-deps lifetimes==0.11.3 (make setup does this)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "datasets" / "CDNOW_master.txt"
    if not path.is_file():
        raise ReplayError(f"no CDNOW dataset at {path}")
    return path


def read_cdnow(path: Path, until: date | None = None) -> list[Transaction]:
    """The transactions (optionally up to and including ``until``), in file order."""
    rows = []
    with path.open(encoding="ascii") as handle:
        for line_no, line in enumerate(handle, start=1):
            parts = line.split()
            if line_no == 1 and parts and not parts[0].isdigit():
                continue  # header
            if len(parts) != 4:
                raise ReplayError(f"{path}:{line_no}: expected 4 columns, got {line.strip()!r}")
            cid, ymd, _cds, dollars = parts
            day = date(int(ymd[:4]), int(ymd[4:6]), int(ymd[6:]))
            if until is None or day <= until:
                rows.append(Transaction(CDNOW_CUSTOMER_PREFIX + cid, day, float(dollars), line_no))
    return rows


def cdnow_events(rows: list[Transaction], topic: str) -> Iterator[tuple[str, bytes, bytes]]:
    """One order_placed event per transaction, at noon UTC of its day, in USD."""
    for tx in rows:
        noon = datetime(tx.day.year, tx.day.month, tx.day.day, 12, tzinfo=UTC)
        body = {
            "event_id": f"cdnow-{tx.line}",
            "customer_id": tx.customer,
            "event_type": "order_placed",
            "event_time": int(noon.timestamp() * 1000),
            "order_id": f"cdnow-order-{tx.line}",
            "amount": tx.amount,
            "currency": "USD",
        }
        yield topic, tx.customer.encode(), orjson.dumps(body)


def file_events(path: Path, config: CrmConfig) -> Iterator[tuple[str, bytes | None, bytes]]:
    """A JSON-lines file of input events, each routed to its topic by ``event_type``
    (``route_event``). Blank lines are no events. A line the producer cannot send (key
    and value over its ``message.max.bytes``) is not replayed, with a warning naming its
    line number and size; every other line is (a live producer could not send it
    either, so a live run would never have seen it)."""
    by_type = topics_by_event_type(config)
    limit = record_limit(config.kafka.producer_properties())
    too_large: list[tuple[int, int]] = []
    with path.open("rb") as handle:
        for number, line in enumerate(handle, start=1):
            raw = line.rstrip(b"\r\n")
            if not raw.strip():
                continue
            topic, key, value = route_event(raw, by_type, config.kafka.topics.clickstream)
            if len(value) + len(key or b"") > limit:
                too_large.append((number, len(value)))
                continue
            yield topic, key, value
    if too_large:
        shown = ", ".join(f"line {n} ({size:,} bytes)" for n, size in too_large[:5])
        more = f" and {len(too_large) - 5} more" if len(too_large) > 5 else ""
        log.warning(
            "%s: %d line(s) not replayed: over what the producer sends (message.max.bytes, "
            "%s bytes with the key): %s%s",
            path,
            len(too_large),
            f"{limit:,}",
            shown,
            more,
        )


def topics_by_event_type(config: CrmConfig) -> dict[str, str]:
    """Event type -> the input topic the flow expects it on."""
    role_topic = config.kafka.topics.by_role
    return {t: role_topic[role] for role, types in TOPIC_ROLE_TYPES.items() for t in types}


def route_event(
    raw: bytes, by_type: dict[str, str], fallback: str, key: bytes | None = None
) -> tuple[str, bytes | None, bytes]:
    """(topic, key, value) of one recorded event: the topic of its ``event_type``, keyed by
    its ``customer_id`` (else ``key``).

    An event that cannot be routed (not JSON, no known event type) still goes to
    ``fallback`` (the clickstream topic), where the flow dead-letters it with the
    reason: nothing is lost and the replay sees exactly what a live run would.
    """
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        body = None
    kind = body.get("event_type") if isinstance(body, dict) else None
    customer = body.get("customer_id") if isinstance(body, dict) else None
    if isinstance(customer, str):
        key = customer.encode()
    topic = by_type.get(kind, fallback) if isinstance(kind, str) else fallback
    return topic, key, raw


def source_overrides(source: str) -> list[str]:
    """Configuration a source needs: CDNOW is 1997-1998, so event times from 1990 on."""
    return ["processing.min_event_time=1990-01-01T00:00:00+00:00"] if source == "cdnow" else []


def source_events(
    source: str, config: CrmConfig, since: date | None = None, until: date | None = None
) -> list[tuple[str, bytes | None, bytes]]:
    """A replay source's input events ('cdnow', or a JSON-lines file of events) on the
    days ``since`` .. ``until`` (inclusive, UTC; None: unbounded), in source order. A
    file line whose event time cannot be read is kept only when no bound is given (the
    flow dead-letters it): nothing is silently moved between periods.

    :raises ReplayError: when the source cannot be found or read.
    """
    if source == "cdnow":
        rows = [tx for tx in read_cdnow(cdnow_path(), until) if since is None or tx.day >= since]
        return list(cdnow_events(rows, config.kafka.topics.orders))
    path = Path(source)
    if not path.is_file():
        raise ReplayError(f"no such replay file: {source!r} (or use 'cdnow')")
    events = list(file_events(path, config))
    if since is None and until is None:
        return events
    return [e for e in events if _within(_event_day(e[2]), since, until)]


def _event_day(value: bytes) -> date | None:
    try:
        body = orjson.loads(value)
        ms = parse_time_ms(body["event_time"])
    except (orjson.JSONDecodeError, TypeError, KeyError, _Invalid):
        return None  # not an event the flow would accept
    return datetime.fromtimestamp(ms / 1000, UTC).date()


def _within(day: date | None, since: date | None, until: date | None) -> bool:
    if day is None:
        return False
    return (since is None or day >= since) and (until is None or day <= until)


def replay(
    endpoints: Endpoints,
    config: CrmConfig,
    events: list[tuple[str, bytes | None, bytes]],
    on_progress: Callable[[str, int, int], None] | None = None,
) -> float:
    """Produce (topic, key, value) events and run the flow until it has read them; seconds.

    :raises LayoutError: before producing anything, when Redis holds state cut by other
        shard settings (the flow would refuse to read what was produced).
    :raises ReplayError: before producing anything, when the input topics hold records
        the state has not applied (they would be applied with the replay).
    """
    started = time.monotonic()
    runtime = Runtime(config, endpoints)
    try:
        check_state_layout(runtime)
        check_topics_applied(runtime)
        produce_events(endpoints, config, events, on_progress)
        run_to_end(runtime, len(events), on_progress)
    finally:
        runtime.close()
    return time.monotonic() - started


def check_topics_applied(runtime: Runtime) -> None:
    """Refuse a replay whose input topics hold records the state has not applied: the
    flow reads them from where the state stopped, so they would be applied with the
    replay, without a word (an outsider replayed a file twice onto the same topics into
    a new key prefix: 145 customers counted twice).

    :raises ReplayError: naming the partitions and where their unapplied records start.
    """
    source = input_source(runtime, tail=False)
    positions = source.positions()
    shards = runtime.config.processing.shards
    starts = {pos: max(off, 0) for pos, (off, _step) in
              runtime.store.resume_offsets(shards, positions).items()}  # fmt: skip
    found = input_ends.unapplied(
        admin_client(runtime.endpoints.brokers, dict(runtime.config.kafka.client)),
        source.consumer_config(),
        starts,
    )
    if found:
        named = "; ".join(f"{t}[{p}] from offset {off}" for (t, p), off in sorted(found.items()))
        raise ReplayError(
            f"the input topics hold records this state has not applied: {named}. The replay "
            "would apply them with its own. Replay into empty topics (other kafka.topics.* "
            "names, or no --brokers: an embedded broker), or run the flow on them first"
        )


def produce_events(
    endpoints: Endpoints,
    config: CrmConfig,
    events: list[tuple[str, bytes | None, bytes]],
    on_progress: Callable[[str, int, int], None] | None,
) -> None:
    """Produce (topic, key, value) events with delivery checks, reporting progress.

    Their Kafka times cut them into the flow's processing steps (``source``). They follow
    the events' order alone (``replay_stamps``: a steady rate), not the wall clock as
    they are produced. What a step holds, and so the order of events at the same event time in
    two topics and which events come late, is then a function of ``events`` alone: two
    replays of one file give the same results (stamped with the wall clock as they were
    produced, they could differ; docs/triggers.md, "Lateness")."""
    step_ms = config.processing.step_ms
    now_ms = wall_clock_ms()
    if events:
        ahead_ms = replay_last_stamp(len(events), step_ms, now_ms) - now_ms
        skew_ms = int(config.processing.max_future_skew_seconds * 1000)
        if ahead_ms > skew_ms:
            raise ReplayError(
                f"{len(events):,} events replayed at {REPLAY_EVENTS_PER_SECOND:,} a second "
                f"take Kafka times up to {ahead_ms / 1000:,.0f} s past now, more than "
                f"processing.max_future_skew_seconds ({skew_ms / 1000:g} s): later times "
                "would move no processing step. Raise it to at least "
                f"{-(-ahead_ms // 1000):,} for the replay"
            )
    properties = dict(config.kafka.producer_properties())
    # Records without a key (no readable customer_id) go to one partition, as the file
    # orders them, not to a random one each replay; keyed ones as before.
    chosen = properties.get("partitioner", "consistent_random")
    properties["partitioner"] = _KEYLESS_TO_ONE.get(chosen, chosen)
    producer = DeliveryCheckedProducer(list(endpoints.brokers), properties, 60.0)
    stamps = replay_stamps(len(events), step_ms, now_ms)
    for i, ((topic, key, value), stamp) in enumerate(zip(events, stamps, strict=True), start=1):
        producer.produce(topic, key, value, timestamp_ms=stamp)
        if i % 5000 == 0:
            producer.poll()
            if on_progress:
                on_progress("producing", i, len(events))
    producer.flush()
    if on_progress:
        on_progress("producing", len(events), len(events))


REPLAY_EVENTS_PER_SECOND = 20_000  # the steady rate a replay's Kafka times follow


# librdkafka's partitioners that send records without a key to a random partition, and
# the ones that hash keys alike and send those records to one partition
_KEYLESS_TO_ONE = {
    "consistent_random": "consistent",
    "random": "consistent",
    "murmur2_random": "murmur2",
    "fnv1a_random": "fnv1a",
}


def replay_last_stamp(count: int, step_ms: int, now_ms: int) -> int:
    """The Kafka time of the last of ``count`` replayed events (``replay_stamps``)."""
    first = now_ms // step_ms * step_ms
    return first + ((count - 1) * 1000 // REPLAY_EVENTS_PER_SECOND // step_ms) * step_ms


def replay_stamps(count: int, step_ms: int, now_ms: int) -> Iterator[int]:
    """The Kafka times of ``count`` replayed events (``produce_events``): as if produced
    at a steady ``REPLAY_EVENTS_PER_SECOND`` from the start of the step ``now_ms`` is in,
    each time floored to its processing step (with the default 1 s step: 20,000 events a
    step)."""
    first = now_ms // step_ms * step_ms
    rate = REPLAY_EVENTS_PER_SECOND
    for i in range(count):
        yield first + (i * 1000 // rate // step_ms) * step_ms


def run_to_end(
    runtime: Runtime, total: int, on_progress: Callable[[str, int, int], None] | None
) -> None:
    """Run the flow to the end of its input, reporting how many events it handled."""
    metrics = get_metrics()

    def handled() -> float:
        return counter_total(metrics.events_in, metrics.invalid_events, metrics.skipped_events)

    before = handled()
    done = threading.Event()

    def report() -> None:
        while not done.wait(0.5):
            if on_progress:
                on_progress("processing", min(int(handled() - before), total), total)

    reporter = threading.Thread(target=report, daemon=True)
    reporter.start()
    try:
        run_in_process(runtime, tail=False)
    finally:
        done.set()
        reporter.join()
    if on_progress:
        on_progress("processing", total, total)

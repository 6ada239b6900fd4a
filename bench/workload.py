"""A realistic shop workload: skewed customers, sessions, a purchase funnel, orders.

This module owns the synthetic event stream used by the demo, the benchmarks
and scale tests. It is deterministic for a seed. Properties that matter for a
CRM engine, and how they are modelled:

- activity is skewed across customers as in a real shop's purchase history
  (``bench/activity.py``: fitted to CDNOW, where the busiest customer holds
  0.31 % of the purchases and the busiest 1 % of customers 10.97 %), or, for
  the hot-key stress run, Zipf 1.1 (the busiest of 100k holds 13.5 %);
- each customer has their own category affinities (a sparse Dirichlet draw)
  and sticks to a category within a session, so browse streaks happen;
- sessions run a funnel: product views -> cart adds (~9 % of views) ->
  checkout (~55 % of carts) -> order (~70 % of checkouts);
- orders go through paid -> shipped (with a promised delivery time) ->
  delivered, with customs holds, delays, returns and refunds, each sent when
  it happens (event time never runs ahead of the stream by more than a
  session);
- customers live in regions with their own currency, time zone and language;
- a configurable share of messages is malformed in the ways real producers
  get it wrong, to exercise the dead-letter path.
"""

from __future__ import annotations

import bisect
import itertools
import random
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, NamedTuple

import orjson

from crmstream.bench.activity import ZIPF_S, weights
from crmstream.config import CrmConfig

REGIONS = (
    # country, currency, time zone, language, weight
    ("US", "USD", "America/New_York", "en-US", 30),
    ("GB", "GBP", "Europe/London", "en-GB", 10),
    ("DE", "EUR", "Europe/Berlin", "de-DE", 10),
    ("FR", "EUR", "Europe/Paris", "fr-FR", 6),
    ("JP", "JPY", "Asia/Tokyo", "ja-JP", 8),
    ("CN", "CNY", "Asia/Shanghai", "zh-CN", 12),
    ("SG", "SGD", "Asia/Singapore", "en-SG", 4),
    ("BR", "BRL", "America/Sao_Paulo", "pt-BR", 6),
    ("AU", "AUD", "Australia/Sydney", "en-AU", 4),
    ("ID", "IDR", "Asia/Jakarta", "id-ID", 5),
    ("MX", "MXN", "America/Mexico_City", "es-MX", 5),
)
_PRODUCT_EVENTS = frozenset({"product_view", "favourite", "add_to_cart"})
CONTACT_CHANNELS = ("push", "email", "sms", "whatsapp", "line")
SURFACES = ("app", "web", "mini_program")


class GeneratedEvent(NamedTuple):
    role: str  # clickstream | orders | customers | feedback
    key: bytes
    value: bytes
    valid: bool


@dataclass
class _Customer:
    cid: str
    region: tuple[str, str, str, str, int]
    affinity_cum: list[float]
    surface: str
    orders: int = 0
    onboarded: bool = False


@dataclass(frozen=True)
class WorkloadSpec:
    customers: int = 10_000
    # How sessions spread over customers: "cdnow" (fitted to a real shop's history)
    # or "zipf" (1 / rank ** zipf_s: the hot-key stress workload). bench/activity.py.
    activity: str = "cdnow"
    zipf_s: float = ZIPF_S
    malformed_rate: float = 0.001
    seed: int = 7
    # Simulated event time: start (epoch ms) and mean gap between sessions.
    start_ms: int = 1_767_225_600_000  # 2026-01-01T00:00:00Z
    session_gap_ms: int = 2_000


class Workload:
    """An endless, deterministic stream of shop events (see module docstring)."""

    def __init__(self, config: CrmConfig, spec: WorkloadSpec):
        self._spec = spec
        self._rng = random.Random(spec.seed)
        self._categories = list(config.taxonomy.categories)
        self._rates = config.currency.rates
        self._seq = itertools.count()
        activity = weights(spec.activity, spec.customers, spec.zipf_s)
        self._cust_cum = list(itertools.accumulate(activity))
        region_cum = list(itertools.accumulate(r[4] for r in REGIONS))
        self._customers = [self._make_customer(i, region_cum) for i in range(spec.customers)]
        self.now_ms = spec.start_ms
        self._live_clock: Any = None
        self._pending_orders: list[tuple[int, str, str, int, str]] = []  # due, kind, cust, order

    def _make_customer(self, i: int, region_cum: list[int]) -> _Customer:
        rng = self._rng
        region = REGIONS[bisect.bisect_right(region_cum, rng.random() * region_cum[-1])]
        # Sparse affinity: a handful of categories carry most of the weight.
        raw = [rng.gammavariate(0.15, 1.0) + 1e-6 for _ in self._categories]
        cid = f"c{i:07d}"
        return _Customer(cid, region, list(itertools.accumulate(raw)), rng.choice(SURFACES))

    # -- building blocks ---------------------------------------------------
    def _event(
        self, role: str, cust: _Customer, kind: str, ts: int, **fields: Any
    ) -> GeneratedEvent:
        body = {
            # The seed in the id: two workloads of different seeds share no event id (outsider
            # 49: a second `generate` reused them, and a customer's events were dropped as
            # duplicates); one seed generated again is the same events, with the same ids.
            "event_id": f"e{self._spec.seed}-{next(self._seq):010d}",
            "customer_id": cust.cid,
            "event_type": kind,
            # Live: the moment of emission; simulated: the session's own timeline.
            "event_time": ts if self._live_clock is None else self._live_clock(),
            **fields,
        }
        return GeneratedEvent(role, cust.cid.encode(), orjson.dumps(body), True)

    def _category(self, cust: _Customer) -> str:
        cum = cust.affinity_cum
        return self._categories[bisect.bisect_right(cum, self._rng.random() * cum[-1])]

    def _price(self, cust: _Customer) -> tuple[float, str]:
        currency = cust.region[1]
        usd = round(self._rng.lognormvariate(3.3, 0.8), 2)  # median ~27 USD
        return round(usd / self._rates.get(currency, 1.0), 2), currency

    # -- the stream --------------------------------------------------------
    def events(self, live_clock: Any = None) -> Iterator[GeneratedEvent]:
        """Yield events forever. ``live_clock()`` (epoch ms) replaces simulated time."""
        rng = self._rng
        self._live_clock = live_clock
        while True:
            if live_clock is None:
                self.now_ms += int(rng.expovariate(1.0 / self._spec.session_gap_ms))
            else:
                self.now_ms = live_clock()
            yield from self._due_order_updates()
            for event in self._session(self.session_customer()):
                if rng.random() < self._spec.malformed_rate:
                    yield self._malform(event)
                else:
                    yield event

    def session_customer(self) -> _Customer:
        """The customer of the next session, drawn by the workload's customer activity."""
        draw = self._rng.random() * self._cust_cum[-1]
        return self._customers[bisect.bisect_right(self._cust_cum, draw)]

    def _session(self, cust: _Customer) -> Iterator[GeneratedEvent]:
        rng, ts = self._rng, self.now_ms
        if not cust.onboarded:
            cust.onboarded = True
            country, _currency, tz, lang, _w = cust.region
            yield self._event(
                "customers",
                cust,
                "profile_updated",
                ts,
                country=country,
                timezone=tz,
                language=lang,
                birthday=f"{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}",
                preferred_channel=rng.choice(CONTACT_CHANNELS),
            )
            yield self._event("customers", cust, "consent_granted", ts, channel="push")
        yield self._event(
            "clickstream", cust, "session_start", ts, channel=cust.surface, country=cust.region[0]
        )
        category = self._category(cust)
        cart: list[tuple[str, str, float]] = []
        for _ in range(max(1, int(rng.expovariate(1 / 5.0)))):
            ts += rng.randint(5_000, 60_000)
            if rng.random() < 0.25:  # drift to another category of theirs
                category = self._category(cust)
            if rng.random() < 0.1:
                yield self._event(
                    "clickstream", cust, "search", ts, category=category, query=f"{category} sale"
                )
            product = f"p{rng.randint(1, 50_000):06d}"
            price, currency = self._price(cust)
            yield self._event(
                "clickstream",
                cust,
                "product_view",
                ts,
                product_id=product,
                category=category,
                price=price,
                currency=currency,
                channel=cust.surface,
                country=cust.region[0],
            )
            roll = rng.random()
            if roll < 0.04:
                yield self._event(
                    "clickstream",
                    cust,
                    "favourite",
                    ts + 1000,
                    product_id=product,
                    category=category,
                )
            elif roll < 0.13:
                cart.append((product, category, price))
                yield self._event(
                    "clickstream",
                    cust,
                    "add_to_cart",
                    ts + 2000,
                    product_id=product,
                    category=category,
                    price=price,
                    currency=currency,
                )
        if rng.random() < 0.01:
            yield self._event(
                "feedback",
                cust,
                rng.choice(("contacted_too_often", "recommendation_dismissed")),
                ts,
                category=category,
            )
        if not cart or rng.random() > 0.55:
            return  # cart abandoned (or nothing in it)
        ts += rng.randint(10_000, 120_000)
        yield self._event("clickstream", cust, "checkout_started", ts)
        if rng.random() > 0.70:
            return
        yield from self._order(cust, cart, ts + rng.randint(5_000, 60_000))

    def _order(
        self, cust: _Customer, cart: list[tuple[str, str, float]], ts: int
    ) -> Iterator[GeneratedEvent]:
        rng = self._rng
        cust.orders += 1
        order_id = f"o-{cust.cid}-{cust.orders}"
        currency = cust.region[1]
        items = [{"product_id": p, "category": c, "price": pr, "quantity": 1} for p, c, pr in cart]
        amount = round(sum(i["price"] for i in items), 2)
        yield self._event(
            "orders",
            cust,
            "order_placed",
            ts,
            order_id=order_id,
            amount=amount,
            currency=currency,
            items=items,
        )
        yield self._event(
            "orders",
            cust,
            "order_paid",
            ts + 30_000,
            order_id=order_id,
            amount=amount,
            currency=currency,
        )
        hour = 3_600_000
        ship = ts + rng.randint(2, 24) * hour
        promised = ship + rng.randint(48, 120) * hour
        self._schedule(ship, "ship", cust, order_id, promised, amount)

    def _schedule(self, due: int, kind: str, cust: _Customer, order_id: str, *extra: Any) -> None:
        bisect.insort(
            self._pending_orders, (due, kind, cust.cid, order_id, extra), key=lambda t: t[0]
        )

    def _due_order_updates(self) -> Iterator[GeneratedEvent]:
        rng = self._rng
        while self._pending_orders and self._pending_orders[0][0] <= self.now_ms:
            due, kind, cid, order_id, extra = self._pending_orders.pop(0)
            cust = self._customers[int(cid[1:])]
            if kind == "ship":
                promised, amount = extra
                yield self._event(
                    "orders",
                    cust,
                    "order_shipped",
                    due,
                    order_id=order_id,
                    promised_delivery_time=promised,
                )
                roll = rng.random()
                late = 0
                if roll < 0.03:
                    late = rng.randint(48, 120) * 3_600_000
                    self._schedule(due + 3_600_000, "customs", cust, order_id)
                elif roll < 0.10:
                    late = rng.randint(12, 72) * 3_600_000
                    self._schedule(due + 3_600_000, "delay", cust, order_id)
                self._schedule(
                    promised + late - rng.randint(0, 24) * 3_600_000,
                    "deliver",
                    cust,
                    order_id,
                    amount,
                )
            elif kind in ("customs", "delay"):
                status = "customs_hold" if kind == "customs" else "delay"
                yield self._event(
                    "orders", cust, "logistics_update", due, order_id=order_id, status=status
                )
            elif kind == "deliver":
                (amount,) = extra
                yield self._event("orders", cust, "order_delivered", due, order_id=order_id)
                # What follows a delivery is sent when it happens, as a shop's systems
                # send it, not ahead with a future event time.
                if rng.random() < 0.06:
                    ret = due + rng.randint(24, 240) * 3_600_000
                    self._schedule(ret, "return", cust, order_id, amount)
                if rng.random() < 0.05:
                    self._schedule(due + 86_400_000, "review", cust, order_id, rng.randint(1, 5))
            elif kind == "return":
                (amount,) = extra
                yield self._event("orders", cust, "order_returned", due, order_id=order_id)
                self._schedule(due + 86_400_000, "refund", cust, order_id, amount)
            elif kind == "refund":
                (amount,) = extra
                yield self._event(
                    "orders",
                    cust,
                    "order_refunded",
                    due,
                    order_id=order_id,
                    amount=amount,
                    currency=cust.region[1],
                )
            elif kind == "review":
                (rating,) = extra
                yield self._event(
                    "feedback", cust, "product_review", due, product_id="p000001", rating=rating
                )

    def _malform(self, event: GeneratedEvent) -> GeneratedEvent:
        """Damage an event the way real producers do."""
        rng = self._rng
        kind = rng.randrange(7)
        if kind == 0:
            value = event.value[: max(1, len(event.value) // 2)]  # truncated JSON
        elif kind == 1:
            value = b"\xff\xfe" + event.value  # invalid UTF-8
        else:
            body = orjson.loads(event.value)
            if kind >= 5 and body["event_type"] not in _PRODUCT_EVENTS:
                kind = 4  # price and category only bind on product events
            if kind == 2:
                body.pop("customer_id", None)
            elif kind == 3:
                body["event_time"] = "yesterday"
            elif kind == 4:
                body["event_type"] = "page_veiw"
            elif kind == 5:
                body["price"] = -abs(body.get("price", 1.0)) or -1.0
                body.setdefault("currency", "USD")
            else:
                body["category"] = "unknown_category"
            value = orjson.dumps(body)
        return GeneratedEvent(event.role, event.key, value, False)


class RecordedMessage(NamedTuple):
    """A workload event as the in-process benchmarks read it: one partition, in order."""

    key: bytes | None
    value: bytes
    topic: str
    offset: int


def recorded_messages(config: CrmConfig, customers: int, events: int) -> list[RecordedMessage]:
    """The first ``events`` events of the recorded workload for ``customers``, each with the
    input topic of its role and its offset in one partition."""
    topic_of = {role: topic for topic, role in config.kafka.topics.inputs.items()}
    workload = Workload(config, WorkloadSpec(customers=customers))
    return [
        RecordedMessage(e.key, e.value, topic_of[e.role], offset)
        for offset, e in enumerate(itertools.islice(workload.events(), events))
    ]


class PublishStats(NamedTuple):
    events: int
    malformed: int
    seconds: float


def publish(
    brokers: list[str],
    config: CrmConfig,
    workload: Workload,
    max_events: int | None = None,
    duration_s: float | None = None,
    rate: float | None = None,
    live_time: bool = False,
    stop: Any = None,
    on_progress: Any = None,
    clock: Callable[[], int] | None = None,
    scripted: list[Any] = (),
) -> PublishStats:
    """Produce the workload to the input topics, keyed by customer id.

    Bounded by ``max_events`` and/or ``duration_s``; ``rate`` (events/s) paces
    it, otherwise it produces as fast as the broker takes it. With
    ``live_time`` the events carry the wall clock as their event time, or
    ``clock()`` (epoch ms: the accelerated demo's shop clock).
    ``scripted`` (``bench.storylines.Scripted``: time, event) are sent as their
    times come, those already past at once. ``stop`` (a threading.Event) ends it
    early.
    """
    import time

    from crmstream.flows.sink import DeliveryCheckedProducer

    if max_events is None and duration_s is None:
        raise ValueError("publish needs max_events or duration_s")
    topics = config.kafka.topics.by_role
    producer = DeliveryCheckedProducer(brokers, config.kafka.producer_properties(), 60.0)
    if live_time and clock is None:
        clock = lambda: time.time_ns() // 1_000_000  # noqa: E731
    elif not live_time:
        clock = None
    pending = sorted(scripted, key=lambda item: item.at_ms)
    started = time.monotonic()
    sent = malformed = 0

    def send_scripted(until_ms: int) -> None:
        nonlocal sent
        while pending and pending[0].at_ms <= until_ms:
            item = pending.pop(0)
            producer.produce(topics[item.event.role], item.event.key, item.event.value)
            sent += 1

    for event in workload.events(live_clock=clock):
        if pending and clock is not None:
            send_scripted(clock())
        producer.produce(topics[event.role], event.key, event.value)
        sent += 1
        malformed += not event.valid
        if sent % 1000 == 0:
            producer.poll()
            elapsed = time.monotonic() - started
            if on_progress is not None:
                on_progress(sent)
            if duration_s is not None and elapsed >= duration_s:
                break
            if stop is not None and stop.is_set():
                break
        if max_events is not None and sent >= max_events:
            break
        if rate is not None:
            ahead = sent / rate - (time.monotonic() - started)
            if ahead > 0.002:
                time.sleep(ahead)
    if pending and clock is not None:
        send_scripted(clock())  # what came due while the last events went out
    producer.flush()
    if on_progress is not None:
        on_progress(sent)
    return PublishStats(sent, malformed, time.monotonic() - started)


# Scheduled publishing (publish_scheduled): events are built with their times
# counted from this base, then moved to the send time when sent. Every
# absolute time in a generated event is a 13-digit integer JSON value.
_SCHEDULE_BASE_MS = 1_000_000_000_000
_TIME_VALUE = re.compile(rb"(?<=:)1\d{12}(?=[,}])")


class _ScheduleClock:
    """The workload's clock during building: event ``count``'s planned send time."""

    def __init__(self, rate: float):
        self.rate = rate
        self.count = 0

    def __call__(self) -> int:
        return _SCHEDULE_BASE_MS + int(self.count * 1000 / self.rate)


def publish_scheduled(
    brokers: list[str],
    config: CrmConfig,
    workload: Workload,
    rate: float,
    duration_s: float,
    window: Callable[[str], None] | None = None,
    linger_ms: int | None = None,
) -> PublishStats:
    """Live load at ``rate`` events/s for ``duration_s``, for latency measurements.

    The events are built first and then moved to their planned send times,
    ``t0 + i / rate``, so the window itself holds nothing but waiting and
    producing: the generator's own Python work stays out of it (the contender
    shares the machine with it). The first event is sent alone and
    acknowledged, so the producer is connected before the window opens. Event
    i is sent at its planned time and carries that time as its event time (its
    other times, such as a promised delivery, move with it). If the sender
    falls behind its plan, the lag counts as latency: it never flatters the
    contender. ``window("open")`` and ``window("close")`` are called as the
    window opens and once every event is acknowledged (the harness measures
    CPU use there). ``linger_ms`` replaces the producer's ``linger.ms`` (the
    flow's sink setting, 5 ms, by default); the time an event waits in the
    producer counts as latency too.
    """
    import gc

    from crmstream.flows.sink import DeliveryCheckedProducer

    topics = config.kafka.topics.by_role
    clock = _ScheduleClock(rate)
    total = int(rate * duration_s)
    built: list[tuple[str, bytes, bytes]] = []
    malformed = 0
    for event in workload.events(live_clock=clock):
        built.append((topics[event.role], event.key, event.value))
        malformed += not event.valid
        clock.count += 1
        if len(built) >= total:
            break
    if not built:
        return PublishStats(0, 0, 0.0)
    client = config.kafka.producer_properties()
    if linger_ms is not None:
        client["linger.ms"] = linger_ms
    producer = DeliveryCheckedProducer(brokers, client, 60.0)

    def shifted(value: bytes, shift: int) -> bytes:  # planned times -> wall clock
        return _TIME_VALUE.sub(lambda m: b"%d" % (int(m[0]) + shift), value)

    # Connect (an idempotent producer first gets its producer id) before the
    # window opens: the first event is sent and acknowledged on its own.
    topic, key, value = built[0]
    producer.produce(topic, key, shifted(value, time.time_ns() // 1_000_000 - _SCHEDULE_BASE_MS))
    producer.flush()
    # t0 leaves room for moving every event to its send time; the estimate comes
    # from timing the first 1,000 (generous: a late start would count as latency).
    probe = time.perf_counter()
    for _topic, _key, value in built[:1000]:
        shifted(value, 0)
    estimate_s = (time.perf_counter() - probe) * len(built) / min(1000, len(built))
    t0_ms = time.time_ns() // 1_000_000 + int(2000 * estimate_s) + 200
    shift = t0_ms - _SCHEDULE_BASE_MS
    planned = [(t, k, shifted(v, shift)) for t, k, v in itertools.islice(built, 1, None)]
    del built
    gc.collect()
    gc.freeze()  # no collector pauses over the built events while sending
    started = time.monotonic() + (t0_ms - time.time_ns() // 1_000_000) / 1000
    if window is not None:
        time.sleep(max(0.0, started - time.monotonic()))
        window("open")
    try:
        for i, (topic, key, value) in enumerate(planned):
            ahead = started + (i + 1) / rate - time.monotonic()
            if ahead > 0.002:
                time.sleep(ahead)
            producer.produce(topic, key, value)
            if i % 1000 == 0:
                producer.poll()
        producer.flush()
        if window is not None:
            window("close")
    finally:
        gc.unfreeze()
    return PublishStats(len(planned) + 1, malformed, time.monotonic() - started)

"""The typed, frozen configuration schema of crmstream.

This module owns what a valid configuration is: every section, key, type and
bound. Values come from YAML (``config/default.yaml`` is the embedded default),
env vars and CLI flags; ``config.loader`` merges them and validates against
these models. Code reads numbers from here and never hard-codes a threshold.
"""

from __future__ import annotations

import itertools
import re
from datetime import datetime
from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator

from crmstream.config.base import PositiveFloat, PositiveInt, _Frozen
from crmstream.config.contact import PoliciesConfig, RulesConfig

_TOPIC_NAME = re.compile(r"^(?!\.{1,2}$)[A-Za-z0-9._-]{1,249}$")  # Kafka refuses "." and ".."
_CURRENCY = re.compile(r"^[A-Z]{3}$")
_CATEGORY = re.compile(r"^[a-z0-9_]{1,40}$")


class TopicsConfig(_Frozen):
    """Kafka topic names, by role."""

    clickstream: str = "crm.clickstream"
    orders: str = "crm.orders"
    customers: str = "crm.customers"
    feedback: str = "crm.feedback"
    triggers: str = "crm.triggers"
    suppressions: str = "crm.suppressions"
    dead_letter: str = "crm.dead-letter"

    @field_validator("*")
    @classmethod
    def _valid_topic(cls, value: str) -> str:
        if not _TOPIC_NAME.match(value):
            raise ValueError(f"not a valid Kafka topic name: {value!r}")
        return value

    @property
    def inputs(self) -> dict[str, str]:
        """Input topic name -> role (clickstream, orders, customers, feedback)."""
        return {
            self.clickstream: "clickstream",
            self.orders: "orders",
            self.customers: "customers",
            self.feedback: "feedback",
        }

    @property
    def by_role(self) -> dict[str, str]:
        """Input role (clickstream, orders, customers, feedback) -> topic name."""
        return {role: topic for topic, role in self.inputs.items()}

    @property
    def outputs(self) -> list[str]:
        return [self.triggers, self.suppressions, self.dead_letter]

    @model_validator(mode="after")
    def _distinct(self) -> TopicsConfig:
        names = [self.clickstream, self.orders, self.customers, self.feedback, *self.outputs]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"each topic role needs its own topic; shared: {dupes}")
        return self


ClientProperties = dict[str, str | int | float | bool]


class KafkaConfig(_Frozen):
    brokers: list[str] | None = None
    # librdkafka properties: ``client`` for every client, ``consumer`` and
    # ``producer`` over it for the consumers or producers only (a property one kind
    # of client does not know makes librdkafka warn, e.g. a fetch size on a producer).
    client: ClientProperties = Field(default_factory=dict)
    consumer: ClientProperties = Field(default_factory=dict)
    producer: ClientProperties = Field(default_factory=dict)
    topics: TopicsConfig = TopicsConfig()
    partitions: PositiveInt = 4
    replication_factor: PositiveInt = 1
    batch_size: Annotated[int, Field(ge=1, le=100_000)] = 2000
    delivery_timeout_seconds: PositiveFloat = 30.0
    # Every command first asks the brokers for metadata and fails in one line when
    # they have not answered within this long (authentication and TLS refusals at once).
    connect_timeout_seconds: PositiveFloat = 10.0
    # A source partition not read to its end that delivers nothing for this long is
    # counted (crmstream_source_stalls_total) and logged.
    stall_warning_seconds: PositiveFloat = 30.0
    # The flow commits the input offsets it has applied (the ones Redis holds) to this
    # consumer group, for lag tools (kafka-consumer-groups, Burrow, kafka-exporter).
    # crmstream itself resumes from Redis and never reads them. null: no commits.
    consumer_group: str | None = "crmstream"
    # Seconds between those commits.
    consumer_group_commit_seconds: PositiveFloat = 5.0

    def consumer_properties(self) -> ClientProperties:
        """What a consumer is given: ``client``, then ``consumer`` over it."""
        return {**self.client, **self.consumer}

    def producer_properties(self) -> ClientProperties:
        """What a producer is given: ``client``, then ``producer`` over it."""
        return {**self.client, **self.producer}

    @field_validator("brokers", mode="before")
    @classmethod
    def _split_brokers(cls, value: object) -> object:
        if isinstance(value, str):
            return [b.strip() for b in value.split(",") if b.strip()] or None
        return value

    @field_validator("brokers")
    @classmethod
    def _host_port(cls, value: list[str] | None) -> list[str] | None:
        for broker in value or []:
            host, _, port = broker.rpartition(":")
            if not host or not port.isdigit():
                raise ValueError(f"broker must be host:port, got {broker!r}")
        return value


class RedisConfig(_Frozen):
    url: str | None = None
    # Redis Cluster: url names any node. Each customer's keys share a slot ({id}
    # hash tag); a shard's commit is then per-customer atomic (docs/guarantees.md).
    cluster: bool = False
    # AUTH: an ACL user (Redis 6+) or just the password (requirepass). Prefer
    # ${env:NAME} or ${file:/run/secrets/...} to a literal password.
    username: str | None = None
    password: str | None = None
    # TLS (with a rediss:// URL): CA bundle to verify the server, and a client
    # certificate and key when the server asks for one.
    tls_ca_file: str | None = None
    tls_cert_file: str | None = None
    tls_key_file: str | None = None
    key_prefix: Annotated[str, Field(pattern=r"^[A-Za-z0-9_.-]{1,32}$")] = "crm"
    socket_timeout_seconds: PositiveFloat = 10.0
    retry_attempts: PositiveInt = 30
    retry_base_seconds: PositiveFloat = 0.05
    retry_max_seconds: PositiveFloat = 2.0
    # ... and for at most this long in all, whatever the attempts left.
    retry_budget_seconds: PositiveFloat = 60.0
    # Every command first PINGs Redis and fails in one line when it has not answered
    # within this long (authentication and TLS refusals at once).
    connect_timeout_seconds: PositiveFloat = 10.0

    @field_validator("url")
    @classmethod
    def _scheme(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError(f"must start with redis://, rediss:// or unix://, got {value!r}")
        return value

    @model_validator(mode="after")
    def _tls_needs_rediss(self) -> RedisConfig:
        tls = [f"tls_{n}_file" for n in ("ca", "cert", "key") if getattr(self, f"tls_{n}_file")]
        if tls and self.url is not None and not self.url.startswith("rediss://"):
            raise ValueError(f"{', '.join(tls)} set but url {self.url!r} is not rediss://")
        return self


class ProcessingConfig(_Frozen):
    shards: Annotated[int, Field(ge=1, le=4096)] = 2
    epoch_interval_seconds: PositiveFloat = 2.0
    # Processing steps: input is applied in buckets of this many ms of Kafka
    # message time, so a replay after a crash cuts it the same way (guarantees.md).
    step_ms: Annotated[int, Field(ge=1)] = 1000
    # false: at-least-once state (no per-customer offset and duplicate checks, no
    # MULTI/EXEC, no delivery wait before the commit). For measuring what
    # exactly-once costs (bench); a crash then double-counts. Keep it true.
    exactly_once: bool = True
    # Duplicates: an event whose event_id matches one of the customer's last 8
    # (``state.encoding.DEDUP_IDS``) within this much event time is dropped.
    dedup_horizon_seconds: Annotated[int, Field(ge=0)] = 86400
    max_event_bytes: Annotated[int, Field(ge=256)] = 65536
    max_future_skew_seconds: Annotated[int, Field(ge=0)] = 86400
    min_event_time: datetime = datetime.fromisoformat("2000-01-01T00:00:00+00:00")
    # A dead letter keeps at most this many bytes of the (redacted) rejected message;
    # a longer one is cut, with the original's length and SHA-256 (docs/events.md).
    dead_letter_max_original_bytes: Annotated[int, Field(ge=0, le=262_144)] = 16_384
    # order_shipped's promised_delivery_time: at most this many days before or after
    # the event's own time; a promise outside is dead-lettered.
    promised_delivery_max_days_before: Annotated[int, Field(ge=0, le=3650)] = 365
    promised_delivery_max_days_after: Annotated[int, Field(ge=0, le=3650)] = 365
    # Python's cyclic garbage collector: tracked objects allocated, net of those
    # freed, between young-generation collections (Python's default is 700), and
    # start-up objects frozen out of its scans (``flows.runtime.tune_gc``).
    # 0 keeps Python's own settings.
    gc_young_threshold: Annotated[int, Field(ge=0, le=2**31 - 1)] = 500_000  # gc's C int
    # SIGTERM or SIGINT: stop reading, finish the step, commit, flush the producer and
    # exit 0. A drain still running after this long ends the process with exit code 3
    # (the state stays consistent: the next start resumes from Redis).
    drain_timeout_seconds: PositiveFloat = 30.0

    @field_validator("min_event_time")
    @classmethod
    def _aware(cls, value: datetime) -> datetime:
        if value.tzinfo is None:
            raise ValueError(f"needs a UTC offset, got {value.isoformat()!r}")
        if value.timestamp() < 0:  # the state keeps times as unsigned counts since 1970
            raise ValueError(f"must be 1970-01-01 or later, got {value.isoformat()!r}")
        return value

    @property
    def min_event_time_ms(self) -> int:
        return int(self.min_event_time.timestamp() * 1000)


class MetricsConfig(_Frozen):
    enabled: bool = True
    bind_address: str = "127.0.0.1"
    port: Annotated[int, Field(ge=0, le=65535)] = 9464
    # Bytewax's own dataflow metrics (bytewax_*), re-served on our endpoint. They
    # come from Bytewax's API server on this port, which listens on all
    # interfaces (Bytewax's choice); 0 turns it off.
    bytewax_api_port: Annotated[int, Field(ge=0, le=65535)] = 3030
    # Process i of a cluster serves on port + i (processes sharing one host).
    # false: every process on the same port (one process per pod/host).
    offset_by_process: bool = True


# Names, addresses and free text, as fields of the events' producers commonly call them.
PERSONAL_FIELDS = (
    "name", "first_name", "last_name", "full_name", "given_name", "family_name",
    "middle_name", "nickname", "display_name", "customer_name", "recipient",
    "address", "street", "street_address", "address_line1", "address_line2",
    "billing_address", "shipping_address", "postcode", "postal_code", "zip", "zip_code",
    "date_of_birth", "birth_date", "dob",
    "query", "text", "comment", "comments", "message", "note", "notes", "body",
    "review", "review_text", "description", "feedback",
)  # fmt: skip


class PrivacyConfig(_Frozen):
    # Key of the keyed hash (BLAKE2b) that replaces e-mail and phone on ingest.
    # Set it per deployment, from ${env:...} or ${file:...}; keep it stable, or
    # the hashes of the same address stop matching.
    pii_salt: Annotated[str, Field(min_length=8)] = "crmstream-dev-pii-salt"
    # Fields that hold personal data (names, addresses, free text), matched by name
    # (any case, at any depth) in the copy of a rejected message a dead letter keeps.
    personal_fields: tuple[str, ...] = PERSONAL_FIELDS
    # drop: personal fields are left out of dead-letter copies (their names are
    # listed); keep: they stay (e-mail addresses and phone numbers are still hashed).
    dead_letter_personal_fields: Literal["drop", "keep"] = "drop"

    @field_validator("personal_fields")
    @classmethod
    def _folded(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(dict.fromkeys(name.casefold() for name in value if name))


class CurrencyConfig(_Frozen):
    base: str = "USD"
    rates: dict[str, PositiveFloat] = Field(default_factory=lambda: {"USD": 1.0})

    @model_validator(mode="after")
    def _codes(self) -> CurrencyConfig:
        for code in [self.base, *self.rates]:
            if not _CURRENCY.match(code):
                raise ValueError(f"currency codes are 3 capital letters (ISO 4217), got {code!r}")
        if self.rates.get(self.base) != 1.0:
            raise ValueError(
                f"the base currency {self.base!r} must have rate 1.0, "
                f"got {self.rates.get(self.base)!r}"
            )
        return self


class TaxonomyConfig(_Frozen):
    # At most 32: the preference vector in the state layout has 32 slots.
    categories: list[str] = Field(min_length=1, max_length=32)

    @field_validator("categories")
    @classmethod
    def _names(cls, value: list[str]) -> list[str]:
        for name in value:
            if not _CATEGORY.match(name):
                raise ValueError(f"category names are lower-case [a-z0-9_], got {name!r}")
        dupes = sorted({n for n in value if value.count(n) > 1})
        if dupes:
            raise ValueError(f"duplicate categories: {dupes}")
        return value


class TimersConfig(_Frozen):
    # Live mode: an input idle this long lets the watermark follow the wall clock.
    idle_watermark_ms: Annotated[int, Field(ge=0)] = 500
    # How often an idle shard checks its due timers (live mode).
    tick_ms: Annotated[int, Field(ge=50)] = 250
    # Most timers one shard fires per batch or tick.
    fire_batch: Annotated[int, Field(ge=1)] = 5000


PROFILE_FIELD_CHOICES = (
    "stage",
    "stage_since",
    "segment",
    "tier",
    "churn_level",
    "churn_score",
    "churn_top",
    "rfm",
    "top_categories",
    "interest_shift",
    "last_seen",
    "model_version",
)
# Values that change with time alone: never stored, computed on read as of the time
# asked (docs/state.md, "Fresh values").
COMPUTED_ON_READ = ("p_alive", "expected_30d", "expected_90d", "clv")


class StateConfig(_Frozen):
    # Events older than this behind the customer's newest event update lifetime totals only.
    allowed_lateness_seconds: Annotated[int, Field(ge=0, le=7 * 86400)] = 3600
    # Derived fields written to the readable profile hash (each costs Redis memory
    # per customer; `crmstream profile` shows all of them from the binary state).
    profile_fields: tuple[str, ...] = (
        "stage",
        "segment",
        "tier",
        "churn_level",
        "top_categories",
        "model_version",
    )

    @field_validator("profile_fields")
    @classmethod
    def _known_profile_fields(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        on_read = [name for name in value if name in COMPUTED_ON_READ]
        if on_read:
            raise ValueError(
                f"{', '.join(map(repr, on_read))} change with time alone, so they are not "
                f"stored: `crmstream profile` and the customer-360 view compute them on read "
                f'as of the time asked (docs/state.md, "Fresh values"); remove them'
            )
        unknown = [name for name in value if name not in PROFILE_FIELD_CHOICES]
        if unknown:
            raise ValueError(
                f"unknown profile field(s) {', '.join(map(repr, unknown))}; "
                f"choose from {', '.join(PROFILE_FIELD_CHOICES)}"
            )
        return tuple(dict.fromkeys(value))


class PreferencesConfig(_Frozen):
    half_life_days: PositiveFloat = 7.0
    # Affinity added per event type; types not listed add nothing. Negative = dislike.
    weights: dict[str, float] = Field(
        default_factory=lambda: {
            "product_view": 1.0,
            "favourite": 2.0,
            "add_to_cart": 3.0,
            "order_placed": 5.0,
            "recommendation_dismissed": -3.0,
        }
    )
    top_k: Annotated[int, Field(ge=1, le=10)] = 3
    snapshot_days: Annotated[int, Field(ge=1, le=90)] = 7

    @field_validator("weights")
    @classmethod
    def _known_types(cls, value: dict[str, float]) -> dict[str, float]:
        from crmstream.operators.events import EVENT_CODE

        unknown = sorted(set(value) - set(EVENT_CODE))
        if unknown:
            raise ValueError(f"unknown event types: {unknown}")
        return value


def _ascending(name: str, cuts: list[float]) -> list[float]:
    if len(cuts) != 4 or any(b <= a for a, b in itertools.pairwise(cuts)):
        raise ValueError(f"{name} needs 4 strictly ascending cut points, got {cuts}")
    return cuts


class RfmConfig(_Frozen):
    # Score 5..1: recency at or under the 1st cut scores 5, over the 4th scores 1.
    recency_days_cuts: list[float] = Field(default_factory=lambda: [30, 90, 180, 365])
    # Score 1..5: orders in 365 d at or over the 4th cut scores 5.
    frequency_cuts: list[float] = Field(default_factory=lambda: [2, 3, 5, 8])
    # Score 1..5: spend in 365 d (base currency) at or over the 4th cut scores 5.
    monetary_cuts: list[float] = Field(default_factory=lambda: [50, 150, 400, 1000])

    @model_validator(mode="after")
    def _cuts(self) -> RfmConfig:
        _ascending("recency_days_cuts", self.recency_days_cuts)
        _ascending("frequency_cuts", self.frequency_cuts)
        _ascending("monetary_cuts", self.monetary_cuts)
        return self


class ChurnConfig(_Frozen):
    # Logistic combination: score = 1 / (1 + exp(-(bias + sum(weight * signal)))).
    bias: float = -3.0
    weights: dict[str, float] = Field(
        default_factory=lambda: {
            "activity_drop": 1.5,
            "login_drop": 0.8,
            "cart_abandon": 0.6,
            "purchase_overdue": 1.5,
            "aov_swing": 0.3,
            "returns": 0.6,
            "negative_feedback": 1.0,
            "delivery_delays": 0.7,
            "contacted_too_often": 0.8,
            "not_alive": 2.0,
        }
    )
    recent_days: Annotated[int, Field(ge=1, le=30)] = 14  # activity drop: last 14 d ...
    baseline_min_events: PositiveFloat = 3.0  # ... vs. a baseline of at least this much
    activity_drop_threshold: Annotated[float, Field(gt=0, le=1)] = 0.5  # -50 % = signal 1
    cart_abandon_threshold: Annotated[float, Field(gt=0, le=1)] = 0.7
    negative_sentiment: Annotated[float, Field(ge=-1, le=0)] = -0.3
    negative_rating: Annotated[int, Field(ge=1, le=5)] = 2
    medium: Annotated[float, Field(gt=0, lt=1)] = 0.4
    high: Annotated[float, Field(gt=0, lt=1)] = 0.7
    hysteresis: Annotated[float, Field(ge=0, lt=0.5)] = 0.1
    too_often_days: PositiveInt = 90

    @model_validator(mode="after")
    def _check(self) -> ChurnConfig:
        from crmstream.state.encoding import SIGNALS

        if set(self.weights) != set(SIGNALS):
            raise ValueError(
                f"weights must name exactly the signals {list(SIGNALS)}, got {sorted(self.weights)}"
            )
        if not self.medium < self.high:
            raise ValueError(f"medium ({self.medium}) must be below high ({self.high})")
        return self


class BgNbdConfig(_Frozen):
    """BG/NBD parameters, time in weeks (default: the CDNOW fit of Fader, Hardie & Lee 2005)."""

    r: PositiveFloat = 0.243
    alpha: PositiveFloat = 4.414
    a: PositiveFloat = 0.793
    b: PositiveFloat = 2.426

    @model_validator(mode="after")
    def _regular(self) -> BgNbdConfig:
        # The conditional expectation divides by a - 1, and its 2F1 has c = a + b - 1
        # for a customer with no repeat purchase.
        if self.a == 1.0:
            raise ValueError("a = 1 is a singular point of the expected purchases; use e.g. 1.0001")
        if self.a + self.b == 1.0:
            raise ValueError(f"a + b = 1 (a={self.a}, b={self.b}) is a singular point of the "
                             f"expected purchases; move either a little")  # fmt: skip
        return self


class GammaGammaConfig(_Frozen):
    """Gamma-Gamma spend-per-purchase parameters (default: the CDNOW fit of Fader &
    Hardie's note on the Gamma-Gamma model, 946 repeat buyers)."""

    p: PositiveFloat = 6.25
    q: Annotated[float, Field(gt=1)] = 3.74  # the mean spend pv/(q-1) needs q > 1
    v: PositiveFloat = 15.44


class ValueConfig(_Frozen):
    """Customer value: expected purchases, CLV and the fitted parameter sets in use."""

    # Horizons of the expected purchases shown by the profile (computed on read).
    expected_horizons_days: Annotated[list[PositiveInt], Field(min_length=1, max_length=8)] = Field(
        default_factory=lambda: [30, 90]
    )
    # CLV: expected spend over this many 30-day months (BG/NBD x Gamma-Gamma),
    # month i discounted by (1 + monthly_discount_rate) ** i.
    clv_months: Annotated[int, Field(ge=1, le=120)] = 12
    monthly_discount_rate: Annotated[float, Field(ge=0, lt=1)] = 0.01
    # Use the active parameter set `crmstream fit` saved in Redis, when there is
    # one, instead of bgnbd / gamma_gamma above (read at start; state/model.py).
    use_fitted: bool = True
    # The parameter set in use, recorded in triggers and profiles: 0 is the one in
    # this configuration; at start it becomes the active fitted set's version.
    model_version: Annotated[int, Field(ge=0, le=65535)] = 0

    @field_validator("expected_horizons_days")
    @classmethod
    def _distinct(cls, value: list[int]) -> list[int]:
        if len(set(value)) != len(value):
            raise ValueError(f"horizons must be distinct, got {value}")
        return value


class LifecycleConfig(_Frozen):
    new_days: PositiveInt = 30
    loyal_min_orders_365d: PositiveInt = 5
    dormant_days: PositiveInt = 90
    lost_days: PositiveInt = 180


class SegmentsConfig(_Frozen):
    high_value_min_orders_90d: PositiveInt = 5
    high_value_min_aov: PositiveFloat = 50.0
    potential_days: PositiveInt = 30
    dormant_days: PositiveInt = 180
    silver_spend_365d: PositiveFloat = 200.0
    gold_spend_365d: PositiveFloat = 500.0
    # "high CLV": a customer not high value, dormant or potential whose CLV
    # (value.clv_months, base currency) is at least this; 0 turns it off.
    high_clv_min: Annotated[float, Field(ge=0)] = 500.0


class CrmConfig(_Frozen):
    """The whole validated configuration."""

    config_version: Annotated[int, Field(ge=1, le=1)] = 1
    kafka: KafkaConfig = KafkaConfig()
    redis: RedisConfig = RedisConfig()
    processing: ProcessingConfig = ProcessingConfig()
    metrics: MetricsConfig = MetricsConfig()
    privacy: PrivacyConfig = PrivacyConfig()
    currency: CurrencyConfig = CurrencyConfig()
    taxonomy: TaxonomyConfig
    rules: RulesConfig = RulesConfig()
    timers: TimersConfig = TimersConfig()
    policies: PoliciesConfig = PoliciesConfig()
    state: StateConfig = StateConfig()
    preferences: PreferencesConfig = Field(default_factory=PreferencesConfig)
    rfm: RfmConfig = RfmConfig()
    churn: ChurnConfig = Field(default_factory=ChurnConfig)
    bgnbd: BgNbdConfig = BgNbdConfig()
    gamma_gamma: GammaGammaConfig = GammaGammaConfig()
    value: ValueConfig = Field(default_factory=ValueConfig)
    lifecycle: LifecycleConfig = LifecycleConfig()
    segments: SegmentsConfig = SegmentsConfig()

    @model_validator(mode="after")
    def _dead_letters_fit(self) -> CrmConfig:
        """A dead letter keeping its whole allowance of the original must fit the
        producer's message.max.bytes (flows/dead_letters.py)."""
        from crmstream.flows.dead_letters import dead_letter_bytes
        from crmstream.flows.sink import DEFAULT_MESSAGE_MAX_BYTES, RECORD_FRAMING_BYTES

        raw = self.kafka.producer_properties().get("message.max.bytes", DEFAULT_MESSAGE_MAX_BYTES)
        try:
            limit = int(raw) - RECORD_FRAMING_BYTES
        except (TypeError, ValueError):
            raise ValueError(
                f"kafka.producer message.max.bytes must be bytes, got {raw!r}"
            ) from None
        copy = self.processing.dead_letter_max_original_bytes
        if dead_letter_bytes(copy) > limit:
            fits = max(n for n in (0, 64, 256, 1024, 4096, 8192, 16384, 65536, 262144)
                       if dead_letter_bytes(n) <= limit or n == 0)  # fmt: skip
            raise ValueError(
                f"processing.dead_letter_max_original_bytes={copy}: such a dead letter can "
                f"take {dead_letter_bytes(copy)} bytes, over what the producer accepts "
                f"(message.max.bytes {raw}); set it to {fits} or less, or raise "
                "message.max.bytes"
            )
        return self

    @model_validator(mode="after")
    def _numbers_fit(self) -> CrmConfig:
        from crmstream.config.bounds import out_of_range

        found = out_of_range(self)
        if found:
            raise ValueError("; ".join(found) + " (config/bounds.py)")
        return self

    @model_validator(mode="after")
    def _categories_exist(self) -> CrmConfig:
        known = set(self.taxonomy.categories)
        named = [c for r in self.policies.regions.values() for c in r.exclude_categories]
        named += [c for season in self.policies.seasons for c in season.weights]
        unknown = sorted(set(named) - known)
        if unknown:
            raise ValueError(f"policies name categories outside the taxonomy: {unknown}")
        return self

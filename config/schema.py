"""The typed, frozen configuration schema of crmstream.

This module owns what a valid configuration is: every section, key, type and
bound. Values come from YAML (``config/default.yaml`` is the embedded default),
env vars and CLI flags; ``config.loader`` merges them and validates against
these models. Code reads numbers from here and never hard-codes a threshold.
"""

from __future__ import annotations

import re
from datetime import datetime
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

_TOPIC_NAME = re.compile(r"^[A-Za-z0-9._-]{1,249}$")
_CURRENCY = re.compile(r"^[A-Z]{3}$")
_CATEGORY = re.compile(r"^[a-z0-9_]{1,40}$")

PositiveInt = Annotated[int, Field(ge=1)]
PositiveFloat = Annotated[float, Field(gt=0)]


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


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
    def outputs(self) -> list[str]:
        return [self.triggers, self.suppressions, self.dead_letter]

    @model_validator(mode="after")
    def _distinct(self) -> TopicsConfig:
        names = [self.clickstream, self.orders, self.customers, self.feedback, *self.outputs]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"each topic role needs its own topic; shared: {dupes}")
        return self


class KafkaConfig(_Frozen):
    brokers: list[str] | None = None
    client: dict[str, str | int | float | bool] = Field(default_factory=dict)
    topics: TopicsConfig = TopicsConfig()
    partitions: PositiveInt = 4
    replication_factor: PositiveInt = 1
    batch_size: Annotated[int, Field(ge=1, le=100_000)] = 2000
    delivery_timeout_seconds: PositiveFloat = 30.0

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
    key_prefix: Annotated[str, Field(pattern=r"^[A-Za-z0-9_.-]{1,32}$")] = "crm"
    socket_timeout_seconds: PositiveFloat = 10.0
    retry_attempts: PositiveInt = 8
    retry_base_seconds: PositiveFloat = 0.05
    retry_max_seconds: PositiveFloat = 2.0

    @field_validator("url")
    @classmethod
    def _scheme(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError(f"must start with redis://, rediss:// or unix://, got {value!r}")
        return value


class ProcessingConfig(_Frozen):
    shards: Annotated[int, Field(ge=1, le=4096)] = 8
    epoch_interval_seconds: PositiveFloat = 2.0
    max_event_bytes: Annotated[int, Field(ge=256)] = 65536
    max_future_skew_seconds: Annotated[int, Field(ge=0)] = 86400
    min_event_time: datetime = datetime.fromisoformat("2000-01-01T00:00:00+00:00")

    @field_validator("min_event_time")
    @classmethod
    def _aware(cls, value: datetime) -> datetime:
        if value.tzinfo is None:
            raise ValueError(f"needs a UTC offset, got {value.isoformat()!r}")
        return value

    @property
    def min_event_time_ms(self) -> int:
        return int(self.min_event_time.timestamp() * 1000)


class MetricsConfig(_Frozen):
    enabled: bool = True
    bind_address: str = "127.0.0.1"
    port: Annotated[int, Field(ge=0, le=65535)] = 9464


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
    categories: list[str] = Field(min_length=1, max_length=255)

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


class _Rule(_Frozen):
    enabled: bool = True
    version: PositiveInt = 1


class BrowseInterestRule(_Rule):
    consecutive_views: Annotated[int, Field(ge=2, le=1000)] = 3


class HighIntentRule(_Rule):
    window_days: Annotated[int, Field(ge=1, le=32)] = 30
    min_views: PositiveInt = 5
    min_cart_adds: PositiveInt = 2


class RulesConfig(_Frozen):
    browse_interest: BrowseInterestRule = BrowseInterestRule()
    high_intent_no_purchase: HighIntentRule = HighIntentRule()


class CrmConfig(_Frozen):
    """The whole validated configuration."""

    config_version: Annotated[int, Field(ge=1, le=1)] = 1
    kafka: KafkaConfig = KafkaConfig()
    redis: RedisConfig = RedisConfig()
    processing: ProcessingConfig = ProcessingConfig()
    metrics: MetricsConfig = MetricsConfig()
    currency: CurrencyConfig = CurrencyConfig()
    taxonomy: TaxonomyConfig
    rules: RulesConfig = RulesConfig()

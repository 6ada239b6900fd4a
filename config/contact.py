"""Trigger rules and contact policies: the sections ``rules`` and ``policies`` of the schema.

Part of ``config.schema`` (which assembles ``CrmConfig``), kept apart by job: what each
trigger rule takes (thresholds, delays, priority, cooldown, channel) and what the contact
policies take (caps, quiet hours, regions, seasons, erasure).
"""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator

from crmstream.config.base import PositiveFloat, PositiveInt, _Frozen
from crmstream.operators.zones import find_zone


class _Rule(_Frozen):
    enabled: bool = True
    version: PositiveInt = 1
    # Higher wins when several triggers fire for one customer in one batch.
    priority: Annotated[int, Field(ge=0, le=1000)] = 50
    # No second trigger of this type for a customer within this many hours.
    cooldown_hours: Annotated[float, Field(ge=0)] = 24.0
    # Contact channel; null: the customer's preferred channel (default push).
    channel: str | None = None
    offer_template: str = ""
    # Marketing triggers need consent and count against the frequency caps.
    marketing: bool = True


class BrowseInterestRule(_Rule):
    consecutive_views: Annotated[int, Field(ge=2, le=1000)] = 3
    priority: int = 30
    offer_template: str = "new_in_category"


class HighIntentRule(_Rule):
    window_days: Annotated[int, Field(ge=1, le=30)] = 30
    min_views: PositiveInt = 5
    min_cart_adds: PositiveInt = 2
    priority: int = 60
    cooldown_hours: float = 72.0
    offer_template: str = "personal_offer"


class CartAbandonedRule(_Rule):
    first_delay_minutes: Annotated[float, Field(gt=0)] = 60.0
    second_delay_hours: Annotated[float, Field(gt=0)] = 24.0
    priority: int = 90
    cooldown_hours: float = 0.0  # the two nudges are the rhythm
    offer_template: str = "cart_reminder"

    @model_validator(mode="after")
    def _second_after_first(self) -> CartAbandonedRule:
        if self.second_delay_hours * 60 <= self.first_delay_minutes:  # outsider 53
            raise ValueError(
                f"second_delay_hours ({self.second_delay_hours:g} h) must come after "
                f"first_delay_minutes ({self.first_delay_minutes:g} min): nudge 2 follows nudge 1"
            )
        return self


class DormantWinBackRule(_Rule):
    # At least one step (outsider 53: [] set every customer with an order aside); switch
    # the rule off with enabled: false.
    days: Annotated[list[PositiveInt], Field(min_length=1)] = Field(
        default_factory=lambda: [30, 90, 180]
    )
    priority: int = 45
    cooldown_hours: float = 0.0
    offer_template: str = "win_back_coupon"


class DeliveryDelayRule(_Rule):
    hours_after_promise: PositiveFloat = 48.0
    customs_hours_after_promise: PositiveFloat = 72.0
    priority: int = 95
    cooldown_hours: float = 0.0
    offer_template: str = "delay_apology_coupon"
    marketing: bool = False


class FirstOrderWelcomeRule(_Rule):
    after_delivery_hours: PositiveFloat = 24.0
    priority: int = 70
    cooldown_hours: float = 0.0
    offer_template: str = "welcome_pack"


class PotentialNoRepeatRule(_Rule):
    days: PositiveInt = 21
    browsing_days: PositiveInt = 14  # "still browsing": any activity in these last days
    priority: int = 40
    offer_template: str = "style_guide"


class RepurchaseDueRule(_Rule):
    days_before: Annotated[float, Field(ge=0)] = 7.0
    min_purchase_days: Annotated[int, Field(ge=2)] = 2
    priority: int = 50
    cooldown_hours: float = 0.0
    offer_template: str = "replenishment_reminder"


class ChurnRiskRule(_Rule):
    # Fires when the churn level enters "high" (churn.high, with churn.hysteresis).
    # Quiet customers are re-derived this many days after their newest event, and
    # every such period after that, so absence alone can raise the risk.
    recheck_days: Annotated[float, Field(gt=0)] = 7.0
    priority: int = 80
    cooldown_hours: float = 168.0
    offer_template: str = "retention_offer"


class TierUpgradeRule(_Rule):
    # Fires when the tier rises or the customer enters the high-value segment.
    priority: int = 65
    cooldown_hours: float = 0.0
    offer_template: str = "tier_perks"


class BirthdayRule(_Rule):
    days_before: Annotated[int, Field(ge=0, le=30)] = 3
    priority: int = 55
    cooldown_hours: float = 0.0
    offer_template: str = "birthday_gift"


class ServiceRecoveryRule(_Rule):
    # Returns, refunds and negative tickets of high-value or gold customers.
    priority: int = 85
    cooldown_hours: float = 24.0
    offer_template: str = "vip_follow_up"
    marketing: bool = False


class InterestShiftRule(_Rule):
    min_distance: Annotated[float, Field(gt=0, le=1)] = 0.5  # cosine distance
    priority: int = 20
    cooldown_hours: float = 168.0
    offer_template: str = "new_journey"


class RulesConfig(_Frozen):
    browse_interest: BrowseInterestRule = BrowseInterestRule()
    high_intent_no_purchase: HighIntentRule = HighIntentRule()
    cart_abandoned: CartAbandonedRule = CartAbandonedRule()
    first_order_welcome: FirstOrderWelcomeRule = FirstOrderWelcomeRule()
    potential_no_repeat: PotentialNoRepeatRule = PotentialNoRepeatRule()
    repurchase_due: RepurchaseDueRule = RepurchaseDueRule()
    dormant_win_back: DormantWinBackRule = DormantWinBackRule()
    churn_risk: ChurnRiskRule = ChurnRiskRule()
    tier_upgrade: TierUpgradeRule = TierUpgradeRule()
    delivery_delay: DeliveryDelayRule = DeliveryDelayRule()
    birthday: BirthdayRule = BirthdayRule()
    service_recovery: ServiceRecoveryRule = ServiceRecoveryRule()
    interest_shift: InterestShiftRule = InterestShiftRule()


class CapsConfig(_Frozen):
    """Rolling frequency caps on marketing triggers per customer."""

    per_day: Annotated[int, Field(ge=0, le=8)] = 3
    per_week: Annotated[int, Field(ge=0, le=8)] = 6
    # For customers who said "contacted too often" (within churn.too_often_days).
    too_often_per_day: Annotated[int, Field(ge=0, le=8)] = 1
    too_often_per_week: Annotated[int, Field(ge=0, le=8)] = 2


_TIME_OF_DAY = re.compile(r"^([01][0-9]|2[0-3]):[0-5][0-9]$")
_MONTH_DAY = re.compile(r"^(0[1-9]|1[0-2])-(0[1-9]|[12][0-9]|3[01])$")


class QuietHoursConfig(_Frozen):
    start: str = "21:00"
    end: str = "09:00"
    # hold: keep the trigger as a timer and emit it at the end of the quiet hours;
    # not_before: emit it now with a not_before time for the sender.
    mode: Literal["hold", "not_before"] = "hold"
    default_timezone: str = "UTC"

    @field_validator("start", "end")
    @classmethod
    def _time_of_day(cls, value: str) -> str:
        if not _TIME_OF_DAY.match(value):
            raise ValueError(f"must be a time of day HH:MM from 00:00 to 23:59, got {value!r}")
        return value

    @field_validator("default_timezone")
    @classmethod
    def _tz(cls, value: str) -> str:
        if find_zone(value) is None:  # a directory such as "America" raised IsADirectoryError
            raise ValueError(f"not an IANA time zone: {value!r}")
        return value


def _country(code: str) -> str:
    """An event's ``country`` as docs/events.md has it (ISO 3166-1 alpha-2, upper case):
    a region or season keyed otherwise matches no event (outsider 53: ``sa`` did nothing)."""
    from crmstream.operators.fields import is_country

    if not is_country(code):
        raise ValueError(f"{code!r} is not a country code as events carry it (e.g. 'SA')")
    return code


class RegionConfig(_Frozen):
    exclude_categories: list[str] = Field(default_factory=list)


class SeasonConfig(_Frozen):
    """Category weight adjustments for a date range (MM-DD, inclusive), e.g. a holiday."""

    name: str
    start: str
    end: str
    countries: list[str] = Field(default_factory=list)  # empty: every country
    weights: dict[str, PositiveFloat] = Field(default_factory=dict)

    @field_validator("countries")
    @classmethod
    def _countries(cls, value: list[str]) -> list[str]:
        for code in value:
            _country(code)
        return value

    @field_validator("start", "end")
    @classmethod
    def _month_day(cls, value: str) -> str:
        if not _MONTH_DAY.match(value):
            raise ValueError(f"must be a day of the year MM-DD (01-01 to 12-31), got {value!r}")
        return value


class PoliciesConfig(_Frozen):
    # Consent for a channel the customer never answered: granted or denied.
    consent_default: Literal["granted", "denied"] = "granted"
    default_channel: str = "push"
    # Priority arbitration: candidates of one customer this close in event time
    # compete and only the highest priority goes out.
    arbitration_window_seconds: Annotated[float, Field(ge=0)] = 60.0
    caps: CapsConfig = CapsConfig()
    quiet_hours: QuietHoursConfig = QuietHoursConfig()
    regions: dict[str, RegionConfig] = Field(default_factory=dict)  # by country code
    seasons: list[SeasonConfig] = Field(default_factory=list)

    @field_validator("regions")
    @classmethod
    def _region_codes(cls, value: dict[str, RegionConfig]) -> dict[str, RegionConfig]:
        for code in value:
            _country(code)
        return value

    # Salt of the hashed subject in erasure audit records and tombstones.
    audit_salt: str = "crmstream-audit"
    # After an erasure, events of the customer up to the erasure's time are dropped
    # for this long (they may still arrive from other topics).
    erasure_tombstone_days: PositiveFloat = 30.0

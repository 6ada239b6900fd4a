"""Contact policies: what happens to a trigger candidate before anything is emitted.

This module owns the policy order (docs/triggers.md) and the reason each
suppression gives. Per customer and step:

1. consent per channel (marketing triggers; a withdrawal suppresses at once);
2. erasure (a customer erased in this step gets nothing);
3. cooldown per trigger type;
4. priority: of several candidates for one customer, the highest wins;
5. rolling frequency caps per day and week (marketing), lower after
   "contacted too often";
6. quiet hours in the customer's time zone: deferred to the end of the quiet
   window, never dropped (held as a timer, or emitted with ``not_before``);
7. regional rules: excluded categories suppress or are removed from the
   payload; seasonal weights re-rank the payload's categories.

Times are event times (the candidate's), so a replay decides as live did.
"""

from __future__ import annotations

from datetime import UTC, datetime, time, timedelta
from typing import Any, NamedTuple
from zoneinfo import ZoneInfo

import numpy as np

from crmstream.config import CrmConfig
from crmstream.operators.catalog import Candidate
from crmstream.operators.events import CONTACT_CHANNELS, new_tuple
from crmstream.operators.params import MS_PER_DAY
from crmstream.operators.rules import hour_prefix, iso_ms
from crmstream.operators.zones import find_zone

TRIGGER_TYPES = (
    "browse_interest",
    "high_intent_no_purchase",
    "cart_abandoned",
    "first_order_welcome",
    "potential_no_repeat",
    "repurchase_due",
    "dormant_win_back",
    "churn_risk",
    "tier_upgrade",
    "delivery_delay",
    "birthday",
    "service_recovery",
    "interest_shift",
)
TRIGGER_INDEX = {name: i for i, name in enumerate(TRIGGER_TYPES)}


class Suppressed(NamedTuple):
    candidate: Candidate
    policy: str
    reason: str


class PolicyContext(NamedTuple):
    """What the policies know of a customer at one instant of its timeline."""

    profile: dict[str, str]  # consent, time zone, country, language, preferred channel
    too_often_day: int  # the customer's last "contacted too often" (epoch day)
    erased: bool  # the customer asked to be erased at this instant


class Approved(NamedTuple):
    candidate: Candidate
    extras: dict[str, Any]  # channel, language, send window, not_before / deferred
    hold_until_ms: int | None  # quiet hours, "hold" mode: emit at this time


_MAX_CACHED_WEIGHTS = 4096  # (country, day) pairs: a few days of every country
_MAX_CACHED_HOURS = 65_536  # entries of each of the two quiet-hours caches: a few MB
_MAX_CACHED_REASONS = 65_536  # cooldown reasons: a few MB
_EPOCH = datetime(1970, 1, 1)  # naive: local days count from it


def _minutes(ms: int) -> int:
    return int(ms // 60_000)


class PolicyEngine:
    """The contact policies, built once from the configuration."""

    def __init__(self, config: CrmConfig):
        self._config = config
        self._policies = config.policies
        quiet = config.policies.quiet_hours
        self._quiet_start = time.fromisoformat(quiet.start)
        self._quiet_end = time.fromisoformat(quiet.end)
        self._quiet_minutes = (
            self._quiet_start.hour * 60 + self._quiet_start.minute,
            self._quiet_end.hour * 60 + self._quiet_end.minute,
        )
        # Per (zone, UTC hour): the offset; per (zone, local day): the window's end.
        self._offsets: dict[tuple[ZoneInfo, int], int | None] = {}
        self._ends: dict[tuple[ZoneInfo, int], int] = {}
        self._default_zone = ZoneInfo(quiet.default_timezone)  # checked by the schema
        # Looked up per candidate: resolved once here, not by getattr on the config.
        self._rule = {name: getattr(config.rules, name) for name in TRIGGER_TYPES}
        self._excluded = {
            country: frozenset(region.exclude_categories)
            for country, region in config.policies.regions.items()
        }
        self._weights: dict[tuple[str, int], dict[str, float]] = {}  # (country, epoch day)
        caps = config.policies.caps
        self._lowest_caps = (
            min(caps.per_day, caps.too_often_per_day),
            min(caps.per_week, caps.too_often_per_week),
        )
        # The profile fields the policies read, and all a step loads of stored profiles.
        # A channel comes from a rule, the default, or a validated preferred_channel.
        channels = {rule.channel for rule in self._rule.values() if rule.channel}
        channels |= CONTACT_CHANNELS | {self._policies.default_channel}
        consents = [f"consent.{channel}" for channel in sorted(channels)]
        self.profile_fields = ("preferred_channel", "country", "timezone", "language", *consents)
        self._consent_field = {channel: f"consent.{channel}" for channel in channels}
        # (trigger type, minute it last went out) -> the cooldown's reason: one customer's
        # repeated candidates in one cooldown give the same text.
        self._cooldown_reasons: dict[tuple[str, int], str] = {}

    def apply(
        self,
        customer: str,
        candidates: list[Candidate],
        record: np.void,
        profile: dict[str, str],
        erased: bool,
    ) -> tuple[list[Approved], list[Suppressed]]:
        """``decide`` with one context for every candidate: ``profile`` as the customer's
        profile, the record's "too often" day, and ``erased``."""
        context = PolicyContext(profile, int(record["too_often_day"]), erased)
        keys = [(c.event_time_ms,) for c in candidates]
        return self.decide(customer, candidates, [context] * len(candidates), keys, record)

    def decide(
        self,
        customer: str,
        candidates: list[Candidate],
        contexts: list[PolicyContext],
        keys: list[tuple[int, ...]],
        record: np.void,
    ) -> tuple[list[Approved], list[Suppressed]]:
        """Run one customer's candidates through the policies in its timeline order
        (``keys[k]``: the place of the event or timer ``candidates[k]`` fired at; of one
        place's candidates the highest priority first, then the order of
        ``TRIGGER_TYPES``), each with the context of its instant (``contexts[k]``);
        updates the record's cooldown, arbitration and send history."""
        suppressed: list[Suppressed] = []
        approved: list[Approved] = []
        # The record's send history as Python lists, read once and written back once:
        # a field of a numpy record costs a view and a scalar per access.
        history = _History(
            record["trigger_last_min"].tolist(),
            record["sent_min"].tolist(),
            int(record["arb_ms"]),
            int(record["arb_type"]),
        )
        rules = self._rule
        window_ms = self._policies.arbitration_window_seconds * 1000
        order = sorted(range(len(candidates)), key=lambda k: self._order(keys[k], candidates[k]))
        late_win = (0, 0)  # a winner of this call before the record's last one: (ms, type)
        for k in order:
            cand, context = candidates[k], contexts[k]
            if not self._admit(cand, history, context.profile, context.erased, suppressed):
                continue
            rule = rules[cand.trigger_type]
            priority = rule.priority
            beaten = self._arbitrate(cand, priority, history.arb_ms, history.arb_type, window_ms)
            if not beaten and late_win[1]:
                beaten = self._arbitrate(cand, priority, *late_win, window_ms)
            if beaten:
                suppressed.append(new_tuple(Suppressed, (cand, "priority", beaten)))
                continue
            won = (cand.event_time_ms, TRIGGER_INDEX[cand.trigger_type] + 1)
            if cand.event_time_ms >= history.arb_ms or not history.arb_type:
                history.arb_ms, history.arb_type = won
                history.changed = True
            else:  # a late candidate's win: the record's last winner stays (it came after)
                late_win = won
            capped = self._capped(cand, history, context.too_often_day) if rule.marketing else None
            if capped:
                suppressed.append(new_tuple(Suppressed, (cand, "frequency_cap", capped)))
                continue
            regional = self._regional(cand, context.profile)
            if isinstance(regional, str):
                suppressed.append(new_tuple(Suppressed, (cand, "regional", regional)))
                continue
            extras, hold = self._delivery(cand, rule, context.profile)
            self._record_sent(cand, rule, history)
            approved.append(new_tuple(Approved, (regional, extras, hold)))
        if history.changed:
            record["trigger_last_min"] = history.last_min
            record["sent_min"] = history.sends
            record["arb_ms"] = history.arb_ms
            record["arb_type"] = history.arb_type
        return approved, suppressed

    def _order(self, key: tuple[int, ...], cand: Candidate) -> tuple:
        name = cand.trigger_type
        return (key, -self._rule[name].priority, TRIGGER_INDEX[name], cand.causal)

    def _arbitrate(
        self, cand: Candidate, priority: int, arb_ms: int, arb_type: int, window_ms: float
    ) -> str | None:
        """Why ``cand`` loses priority arbitration to the winner that fired at ``arb_ms``
        (``TRIGGER_TYPES`` index ``arb_type`` - 1; 0: none), or None: that winner (at the
        same instant, or within the window before) had at least its priority. The winner
        is the record's last, or a late winner decided earlier in the same call.
        Decided in timeline order, so a later candidate never takes back an earlier one's
        win: the outcome does not depend on how the input was cut into steps."""
        if not arb_type:
            return None
        gap = cand.event_time_ms - arb_ms
        if gap > window_ms or gap < 0:
            # Only a winner at or before it: a late candidate (its event reached Kafka after
            # a later one's trigger had won) does not lose to a winner after it (outsider
            # 51: "fired at the same time" of a nudge 30 minutes later).
            return None
        winner = TRIGGER_TYPES[arb_type - 1]
        top = self._rule[winner].priority
        if top < priority:
            return None
        if gap == 0:
            return f"{winner} (priority {top}) fired at the same time"
        return (
            f"{winner} (priority {top}) fired {gap / 1000:g} s before, within the "
            f"{window_ms / 1000:g} s arbitration window"
        )

    def _admit(
        self,
        cand: Candidate,
        history: _History,
        profile: dict[str, str],
        erased: bool,
        suppressed: list[Suppressed],
    ) -> bool:
        """Consent, erasure and cooldown; False (with the reason recorded) stops the candidate."""
        name = cand.trigger_type
        rule = self._rule[name]
        if rule.marketing:
            channel = (
                rule.channel or profile.get("preferred_channel") or self._policies.default_channel
            )
            why = self.no_consent(name, channel, profile)
            if why:
                suppressed.append(new_tuple(Suppressed, (cand, "consent", why)))
                return False
        if erased:
            why = "the customer asked to be erased"
            suppressed.append(new_tuple(Suppressed, (cand, "erasure", why)))
            return False
        hours = rule.cooldown_hours
        last = history.last_min[TRIGGER_INDEX[name]]
        # Either side: a late candidate may come before its type's last send (docs/triggers.md,
        # "Lateness"); in timeline order the send is never after it.
        if hours and last and abs(_minutes(cand.event_time_ms) - last) < hours * 60:
            why = self._cooldown_reasons.get((name, last)) or self._cooldown_reason(
                name, last, hours
            )
            suppressed.append(new_tuple(Suppressed, (cand, "cooldown", why)))
            return False
        return True

    def no_consent(self, name: str, channel: str, profile: dict[str, str]) -> str | None:
        """Why a trigger of type ``name`` may not go out on ``channel`` to a customer with
        ``profile`` (None: it may): a marketing trigger needs consent for its channel."""
        if not self._rule[name].marketing:
            return None
        field = self._consent_field.get(channel) or f"consent.{channel}"
        consent = profile.get(field, self._policies.consent_default)
        if consent.startswith("withdrawn") or consent == "denied":
            return f"no consent for channel {channel!r}"
        return None

    def _cooldown_reason(self, name: str, last: int, hours: float) -> str:
        """Why a candidate of type ``name`` is cooling: it went out at minute ``last``,
        within its cooldown of ``hours``."""
        why = f"{name} went out at {iso_ms(last * 60_000)}, within its {hours:g} h cooldown"
        if len(self._cooldown_reasons) >= _MAX_CACHED_REASONS:
            self._cooldown_reasons.clear()
        self._cooldown_reasons[(name, last)] = why
        return why

    # -- individual policies ----------------------------------------------------
    def _capped(self, cand: Candidate, history: _History, too_often_day: int) -> str | None:
        caps = self._policies.caps
        now = _minutes(cand.event_time_ms)
        day = week = 0
        for m in history.sends:  # a few slots; 0 is a free one
            # Either side of it, as the cooldown (a late candidate may precede a send).
            if m and abs(now - m) < 10080:
                week += 1
                day += abs(now - m) < 1440
        if day < self._lowest_caps[0] and week < self._lowest_caps[1]:
            return None  # under either pair of caps: no need to read which applies
        cand_day = cand.event_time_ms // MS_PER_DAY
        # Epoch days from 0 (events are not before 1970); a fresh record's is negative.
        if too_often_day >= 0 and cand_day - too_often_day <= self._config.churn.too_often_days:
            per_day, per_week, who = caps.too_often_per_day, caps.too_often_per_week, "(lowered: "
            who += "the customer said contacted too often) "
        else:
            per_day, per_week, who = caps.per_day, caps.per_week, ""
        if day >= per_day:
            return f"{day} marketing triggers in the last 24 h, cap {per_day} {who}".strip()
        if week >= per_week:
            return f"{week} marketing triggers in the last 7 d, cap {per_week} {who}".strip()
        return None

    def _regional(self, cand: Candidate, profile: dict[str, str]) -> Candidate | str:
        """The candidate with its payload's categories adjusted, or why it is suppressed."""
        country = profile.get("country", "")
        excluded = self._excluded.get(country, frozenset())
        payload = cand.payload
        if payload.get("category") in excluded:
            return f"category {payload['category']!r} is excluded in {country}"
        if "top_categories" not in payload:
            return cand
        payload = dict(payload)
        tops = [c for c in payload["top_categories"] if c not in excluded]
        weights = self._season_weights(country, cand.event_time_ms)
        if weights:
            rank = {c: (-(weights.get(c, 1.0)) / (i + 1)) for i, c in enumerate(tops)}
            tops.sort(key=lambda c: rank[c])
        payload["top_categories"] = tops
        return cand._replace(payload=payload)

    def _season_weights(self, country: str, at_ms: int) -> dict[str, float]:
        if not self._policies.seasons:
            return {}
        key = (country, at_ms // MS_PER_DAY)  # seasons are whole UTC days
        weights = self._weights.get(key)
        if weights is None:
            if len(self._weights) >= _MAX_CACHED_WEIGHTS:
                self._weights.clear()
            weights = self._weights[key] = self._compute_weights(country, at_ms)
        return weights

    def _compute_weights(self, country: str, at_ms: int) -> dict[str, float]:
        month_day = datetime.fromtimestamp(at_ms / 1000, tz=UTC).strftime("%m-%d")
        weights: dict[str, float] = {}
        for season in self._policies.seasons:
            inside = (
                season.start <= month_day <= season.end
                if season.start <= season.end
                else month_day >= season.start or month_day <= season.end
            )
            if inside and (not season.countries or country in season.countries):
                weights.update(season.weights)
        return weights

    def _delivery(
        self, cand: Candidate, rule: Any, profile: dict[str, str]
    ) -> tuple[dict[str, Any], int | None]:
        """Channel, language, the local send window, and quiet-hours deferral."""
        quiet = self._policies.quiet_hours
        tz = find_zone(profile.get("timezone") or quiet.default_timezone) or self._default_zone
        extras: dict[str, Any] = {
            "channel": rule.channel
            or profile.get("preferred_channel")
            or self._policies.default_channel,
            "language": profile.get("language"),
            "send_window": {"timezone": tz.key, "from": quiet.end, "until": quiet.start},
        }
        quiet_until = self._quiet_until(cand.event_time_ms, tz)
        if quiet_until is None:
            return extras, None
        until_ms, local_time = quiet_until
        if quiet.mode == "not_before":
            extras["not_before"] = iso_ms(until_ms)
            return extras, None
        extras["deferred"] = {
            "policy": "quiet_hours",
            "until": iso_ms(until_ms),
            "local_time": local_time,
        }
        return extras, until_ms

    def _quiet_until(self, at_ms: int, tz: ZoneInfo) -> tuple[int, str] | None:
        """If ``at_ms`` is within quiet hours in ``tz``: when they end (epoch ms) and
        the local time as ISO 8601 to the minute with its offset; else None.

        The zone's offset is looked up once per UTC hour and the local time follows
        by arithmetic (the window's bounds are whole minutes: the schema says so).
        An hour in which the offset changes, or an offset that is not whole minutes,
        takes ``_quiet_until_exact``, which tests/test_quiet_hours.py holds this equal to.
        """
        offset = self._offset_ms(tz, at_ms)
        if offset is None:
            return self._quiet_until_exact(at_ms, tz)
        local_ms = at_ms + offset
        minute = local_ms // 60_000 % 1440
        start, end = self._quiet_minutes
        if not ((start <= minute or minute < end) if start > end else (start <= minute < end)):
            return None
        day = local_ms // MS_PER_DAY + (1 if start > end and minute >= start else 0)
        until_ms = self._window_end(tz, day)
        # The local wall time's date and hour: the text hour_prefix gives for that hour
        # number read as UTC (and caches).
        prefix = hour_prefix(local_ms // 3_600_000)
        sign, size = ("-", -offset) if offset < 0 else ("+", offset)
        hours, minutes = divmod(size // 60_000, 60)
        return until_ms, "%s%02d%s%02d:%02d" % (  # noqa: UP031
            prefix,
            local_ms // 60_000 % 60,
            sign,
            hours,
            minutes,
        )

    def _quiet_until_exact(self, at_ms: int, tz: ZoneInfo) -> tuple[int, str] | None:
        """``_quiet_until`` through ``datetime`` and the zone at the instant itself."""
        local = datetime.fromtimestamp(at_ms / 1000, tz=tz)
        if not self._in_quiet_hours(local.time()):
            return None
        allowed = self._next_allowed(local, tz)
        return int(allowed.timestamp() * 1000), local.isoformat(timespec="minutes")

    def _offset_ms(self, tz: ZoneInfo, at_ms: int) -> int | None:
        """The zone's UTC offset in ms through the UTC hour of ``at_ms``; None if it
        changes within that hour or is not whole minutes."""
        key = (tz, at_ms // 3_600_000)
        try:
            return self._offsets[key]
        except KeyError:
            pass
        start = datetime.fromtimestamp(key[1] * 3600, tz=tz).utcoffset()
        last = datetime.fromtimestamp(key[1] * 3600 + 3599, tz=tz).utcoffset()
        offset = None
        if start == last and not start % timedelta(minutes=1):
            offset = start // timedelta(milliseconds=1)
        if len(self._offsets) >= _MAX_CACHED_HOURS:
            self._offsets.clear()
        self._offsets[key] = offset
        return offset

    def _window_end(self, tz: ZoneInfo, day: int) -> int:
        """Epoch ms of the quiet window's end on local day ``day`` (days since
        1970-01-01) in ``tz``, as ``_next_allowed`` resolves it."""
        key = (tz, day)
        until = self._ends.get(key)
        if until is None:
            naive = datetime.combine(_EPOCH.date() + timedelta(days=day), self._quiet_end)
            until = int(naive.replace(tzinfo=tz).timestamp() * 1000)
            if len(self._ends) >= _MAX_CACHED_HOURS:
                self._ends.clear()
            self._ends[key] = until
        return until

    def _in_quiet_hours(self, t: time) -> bool:
        start, end = self._quiet_start, self._quiet_end
        return (start <= t or t < end) if start > end else (start <= t < end)

    def _next_allowed(self, local: datetime, tz: ZoneInfo) -> datetime:
        """The end of the quiet window that ``local`` is in, as an aware time (DST-safe)."""
        day = local.date()
        if self._quiet_start > self._quiet_end and local.time() >= self._quiet_start:
            day += timedelta(days=1)
        naive = datetime.combine(day, self._quiet_end)
        return naive.replace(tzinfo=tz)  # zoneinfo resolves the offset of that wall time

    @staticmethod
    def _record_sent(cand: Candidate, rule: Any, history: _History) -> None:
        now = _minutes(cand.event_time_ms)
        history.last_min[TRIGGER_INDEX[cand.trigger_type]] = now
        if rule.marketing:
            sends = history.sends
            sends[sends.index(min(sends))] = now  # replace the oldest of the last sends
        history.changed = True


class _History:
    """One customer's send history from its record, as lists (written back if changed)."""

    __slots__ = ("arb_ms", "arb_type", "changed", "last_min", "sends")

    def __init__(self, last_min: list[int], sends: list[int], arb_ms: int, arb_type: int):
        self.last_min = last_min  # per trigger type, the minute it last went out (0: never)
        self.sends = sends  # the minutes of the last marketing sends (0: free slot)
        self.arb_ms = arb_ms  # when the last winner of priority arbitration fired
        self.arb_type = arb_type  # its TRIGGER_TYPES index + 1 (0: none yet)
        self.changed = False

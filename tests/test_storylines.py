"""The demo's scripted customers, through the real flow with the default policies: each
storyline shows what ``bench.storylines.SHOWS`` says it shows, so the demo shows every
trigger type, a quiet-hours deferral and each kind of suppression whatever the machine's
speed."""

from __future__ import annotations

import pytest

from crmstream.bench.storylines import D_MS, PREFIX, SHOWS, storyline_base, storylines
from tests.conftest import T0_MS, read_topic, run_flow

pytestmark = pytest.mark.integration


def test_every_storyline_shows_what_it_promises(isolated_config, script, stack):
    config = isolated_config(policies=True)
    s = script(config)
    base = storyline_base(T0_MS + 45 * D_MS)
    topics = config.kafka.topics.by_role
    for item in storylines(base):
        s.raw(item.event.role, item.event.value, item.event.key)
    # another customer's visit 10 days on moves the event-time watermark past every payoff
    s.event("clickstream", "zed", "session_start", (base + 10 * D_MS - T0_MS) / 1000)
    s.flush()
    run_flow(config, stack)
    seen: dict[str, set[str]] = {}
    for record in read_topic(stack, config.kafka.topics.triggers):
        who = record["customer_id"].removeprefix(PREFIX)
        seen.setdefault(who, set()).add(record["trigger_type"])
        if record.get("deferred"):
            seen[who].add("deferred")
    for record in read_topic(stack, config.kafka.topics.suppressions):
        who = record["customer_id"].removeprefix(PREFIX)
        seen.setdefault(who, set()).add(f"suppressed:{record['policy']}")
    missing = {who: sorted(set(shows) - seen.get(who, set()))
               for who, shows in SHOWS.items() if set(shows) - seen.get(who, set())}  # fmt: skip
    assert not missing, f"missing {missing}; seen {seen}"
    types = {t for shows in SHOWS.values() for t in shows if ":" not in t and t != "deferred"}
    assert types == set(type(config.rules).model_fields)  # all 13
    assert len(topics) == 4

"""Input partitions added while the flow runs: said, counted, and read at the next start.

This module owns one question: does an input topic now have partitions that the
running flow does not read? The source lists each topic's partitions once, when
its readers are built (``CrmKafkaSource.build``), and Bytewax assigns them to
workers then; Kafka can add partitions to a topic at any time
(``kafka-topics.sh --alter --partitions``). Events written to an added partition
wait there, unread, until every process restarts: the start lists the new
partitions and reads them from their first offset, as it reads any partition the
state has no progress for, so nothing is lost, but nothing is sent for them
either. So one worker per cluster asks the broker every minute, without waiting
for the answer (``describe_topics`` gives futures, polled on later batches), and
when a topic has more partitions than the flow reads, logs a warning naming them
and sets ``crmstream_input_partitions_unread{topic}``, which the alert
``CrmstreamInputPartitionsUnread`` watches (docs/operations.md, "Adding input
partitions").
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from typing import Any

from crmstream.metrics import get_metrics

log = logging.getLogger(__name__)

CHECK_SECONDS = 60.0  # how often the broker is asked
NAMED = 5  # added partitions named in the warning, then a count


class PartitionWatch:
    """Compares each input topic's partitions on the broker with those read.

    ``describe`` asks the broker about some topics and returns a future per topic
    whose result has ``partitions`` (``AdminClient.describe_topics``); ``read`` is
    each input topic's partition ids as the flow listed them at its start.
    ``poll(now)`` never blocks: it sends a question when one is due and reads the
    answers once they are all in. A failed question is asked again at the next
    interval: a broker that does not answer is what the stall warnings report.
    """

    def __init__(
        self,
        describe: Callable[[list[str]], Mapping[str, Future]],
        read: Mapping[str, list[int]],
        every_s: float = CHECK_SECONDS,
    ):
        self._describe = describe
        self._read = {topic: sorted(ids) for topic, ids in read.items()}
        self._every_s = every_s
        self._next = 0.0  # the first question goes with the first poll
        self._pending: Mapping[str, Future] | None = None
        self._warned: dict[str, int] = {}  # topic -> partition count last warned about
        self.unread: dict[str, list[int]] = {topic: [] for topic in self._read}
        gauge = get_metrics().input_partitions_unread
        for topic in self._read:
            gauge.labels(topic).set(0)

    def poll(self, now: float) -> None:
        """Ask when due; take the answers in when they are all in."""
        if self._pending is None:
            if now < self._next or not self._read:
                return
            self._next = now + self._every_s
            try:
                self._pending = self._describe(list(self._read))
            except Exception as exc:  # asked again at the next interval
                log.debug("cannot ask the broker for the input topics' partitions: %s", exc)
            return
        if not all(future.done() for future in self._pending.values()):
            return
        answers, self._pending = self._pending, None
        for topic, future in answers.items():
            try:
                ids = sorted(p.id for p in future.result().partitions)
            except Exception as exc:  # a topic deleted: the reader says so
                log.debug("cannot read the partitions of %s: %s", topic, exc)
                continue
            self._take(topic, ids)

    def _take(self, topic: str, ids: list[int]) -> None:
        known = set(self._read.get(topic, ()))
        added = [p for p in ids if p not in known]
        self.unread[topic] = added
        get_metrics().input_partitions_unread.labels(topic).set(len(added))
        if not added:
            self._warned.pop(topic, None)
            return
        if self._warned.get(topic) == len(ids):
            return
        self._warned[topic] = len(ids)
        named = ", ".join(f"{topic}[{p}]" for p in added[:NAMED])
        more = f" and {len(added) - NAMED} more" if len(added) > NAMED else ""
        log.warning(
            "%s now has %d partitions; this flow reads the %d it found at its start. Events "
            "in %s%s wait unread until every process restarts (the start reads them from "
            "their first offset): restart the flow (docs/operations.md, \"Adding input "
            "partitions\")",
            topic, len(ids), len(known), named, more,
        )  # fmt: skip


def describe_with(admin: Any) -> Callable[[list[str]], Mapping[str, Future]]:
    """``PartitionWatch``'s question, asked with a confluent-kafka ``AdminClient``."""
    from confluent_kafka import TopicCollection

    return lambda topics: admin.describe_topics(TopicCollection(topics))

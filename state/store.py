"""The Redis state store: keys, batch load, atomic batch commit, progress, profiles.

This module owns every Redis key crmstream writes and the order of writes:

- ``{prefix}:{<customer>}:s``: the binary hot state (``state.encoding``), which
  also records the input offsets applied to that customer;
- ``{prefix}:{<customer>}:p``: the readable profile hash for downstream readers;
- ``{prefix}:progress:<shard>``: per input partition, the highest offset the
  shard has fully applied; the lower bound the source resumes from;
- ``{prefix}:outbox:<shard>``: records committed with the state and not yet
  confirmed delivered (``flows.sink.Outbox``);
- ``{prefix}:commit:<shard>``: the token of the shard's last transaction, which
  keeps a retried commit from running twice (``StateStore.transact_once``).

A batch is loaded with one MGET and committed with one MULTI/EXEC that holds
the states, the profiles, the outgoing records and the shard's progress
together. Customer keys carry the ``{customer}`` hash tag; because each state
blob records its own applied offsets, a replay never double-counts even where
the store cannot span slots in one transaction (Redis Cluster).
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import re
import secrets
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING

import redis
from redis.backoff import NoBackoff
from redis.cluster import RedisCluster
from redis.retry import Retry

from crmstream.metrics import get_metrics, observe_redis
from crmstream.state.commands import CommandBatch
from crmstream.state.connection import (  # noqa: F401  (re-exported: callers import them here)
    ObservedRetry,
    StateStoreError,
    connect,
    credentials,
    safe_url,
    single_attempt,
    tls_failure,
)
from crmstream.state.encoding import StateEncodingError
from crmstream.state.progress import (
    Position,
    Progress,
    decode_progress,
    encode_progress,
    lowest_progress,
)
from crmstream.state.promises import Promise
from crmstream.state.timers import MARK, SEP, TimerStore, member_prefix, parse_member

if TYPE_CHECKING:
    from crmstream.operators.catalog import TimerPlan

log = logging.getLogger(__name__)
_GLOB_SPECIAL = re.compile(rb"([\\*?\[\]])")  # escaped in a SCAN MATCH pattern


class StateStore:
    """Batch access to customer state in Redis."""

    def __init__(self, client: redis.Redis, prefix: str, salt: str = "crmstream-audit"):
        self._client = client
        self._prefix = prefix
        self._salt = salt.encode()[:64]
        # Redis Cluster: no multi-key commands across slots, no MULTI/EXEC across
        # customers; each customer's keys share a slot through the {customer} tag.
        self._cluster = isinstance(client, RedisCluster)
        self.timers = TimerStore(client, prefix)
        # Transactions go through a client that never retries by itself:
        # transact_once decides whether a broken one is sent again.
        self._transactions_via: tuple[redis.Redis, Retry] | None = None
        self._retry = Retry(NoBackoff(), 0)  # for command batches (a single server only)
        if not self._cluster:
            self._retry = client.get_retry() or self._retry
            self._transactions_via = (single_attempt(client), self._retry)
        self._run_id = secrets.token_hex(6)
        self._transactions = itertools.count(1)
        # Erasure tombstones (customer -> erasure event time) seen by the last load_states.
        self.last_tombstones: dict[str, int] = {}
        # Customers whose stored open orders the last load_states could not read.
        self.last_unreadable: dict[str, Exception] = {}

    @property
    def client(self) -> redis.Redis:
        return self._client

    @property
    def prefix(self) -> str:
        return self._prefix

    def state_key(self, customer_id: str) -> str:
        return f"{self._prefix}:{{{customer_id}}}:s"

    def profile_key(self, customer_id: str) -> str:
        return f"{self._prefix}:{{{customer_id}}}:p"

    def progress_key(self, shard: int) -> str:
        return f"{self._prefix}:progress:{shard}"

    def promises_key(self, customer_id: str) -> str:
        return f"{self._prefix}:{{{customer_id}}}:o"

    def load_states(
        self, customer_ids: list[str], with_promises: list[str] = ()
    ) -> tuple[list[bytes | None], dict[str, dict[str, Promise]]]:
        """Every customer's state blob (None for new customers) and, for ``with_promises``,
        their open orders' promised delivery times; one round trip."""
        if not customer_ids:
            return [], {}
        started = time.perf_counter()
        n = len(customer_ids)
        checked = False  # whether a state key may be of the wrong type (single Redis)
        if self._cluster:
            pipe = self._client.pipeline(transaction=False)
            for key in [self.state_key(c) for c in customer_ids]:
                pipe.get(key)
            for key in [self.tombstone_key(c) for c in customer_ids]:
                pipe.get(key)
            for customer in with_promises:
                pipe.hgetall(self.promises_key(customer))
            # A refusal of one customer's key (WRONGTYPE: a key of the wrong type) makes
            # that customer unreadable, not the round: the results carry it, not raising.
            results = pipe.execute(raise_on_error=False)
        else:  # packed by hiredis (state/commands.py): the keys are packed twice here
            state_keys = [self.state_key(c) for c in customer_ids]
            tomb_keys = [self.tombstone_key(c) for c in customer_ids]
            batch = CommandBatch()
            batch.command("MGET", *state_keys)
            batch.command("MGET", *tomb_keys)
            # MGET answers nil for a key of the wrong type, as for a missing one: more
            # keys existing than values read means one is of the wrong type.
            batch.command("EXISTS", *state_keys)
            batch.command("EXISTS", *tomb_keys)
            for customer in with_promises:
                batch.command("HGETALL", self.promises_key(customer))
            results = self._retry.call_with_retry(
                lambda: batch.execute(self._client, refusals=True), lambda _error: None
            )
            results[4:] = [_as_hash(r) for r in results[4:]]
        if self._cluster:
            blobs, tombs, raw = results[:n], results[n : 2 * n], results[2 * n :]
        else:
            (blobs, tombs, n_states, n_tombs), raw = results[:4], results[4:]
            for result in (blobs, tombs, n_states, n_tombs):
                _customers_own(result)  # MGET or EXISTS refused: not one customer's
            checked = len(blobs) - blobs.count(None) < n_states
            blobs, tombs = self._wrong_types(blobs, tombs, n_states, n_tombs, state_keys, tomb_keys)
        observe_redis("load", started)
        promises: dict[str, dict[str, Promise]] = {}
        unreadable: dict[str, Exception] = {}
        self.last_unreadable = unreadable
        for customer, orders in zip(with_promises, raw, strict=True):
            try:
                if _customers_own(orders):
                    raise ValueError(f"Redis refused to read it: {orders}")
                promises[customer] = {k.decode(): Promise.decode(v) for k, v in orders.items()}
            except (ValueError, UnicodeDecodeError) as error:
                unreadable[customer] = StateEncodingError(
                    f"open orders at {self.promises_key(customer)!r} are unreadable: {error}"
                )
        self.last_tombstones = {}
        for customer, tomb in zip(customer_ids, tombs, strict=True):
            if tomb is None:
                continue
            try:
                if _customers_own(tomb):
                    raise ValueError(f"Redis refused to read it: {tomb}")
                self.last_tombstones[customer] = int(tomb)
            except ValueError as error:  # the customer is set aside: no event of it applies
                unreadable[customer] = StateEncodingError(
                    f"erasure tombstone at {self.tombstone_key(customer)!r} is unreadable "
                    f"({tomb!r:.80}): {error}"
                )
        if self._cluster or checked:  # a state key of the wrong type: refused alone
            blobs = list(blobs)
            for k, (customer, blob) in enumerate(zip(customer_ids, blobs, strict=True)):
                if _customers_own(blob):
                    unreadable[customer] = StateEncodingError(
                        f"state at {self.state_key(customer)!r} is unreadable: {blob}"
                    )
                    blobs[k] = None
        return blobs, promises

    def _wrong_types(
        self,
        blobs: list,
        tombs: list,
        n_states: int,
        n_tombs: int,
        state_keys: list[str],
        tomb_keys: list[str],
    ) -> tuple[list, list]:
        """MGET's values with a refusal (WRONGTYPE) in place of each nil that is a key of
        the wrong type; a second round trip, only when EXISTS counted more keys than
        MGET read values (a state or tombstone key that is not a string)."""
        return (
            self._with_refusals(blobs, n_states, state_keys),
            self._with_refusals(tombs, n_tombs, tomb_keys),
        )

    def _with_refusals(self, values: list, existing: int, keys: list[str]) -> list:
        """MGET's ``values`` of ``keys``, each nil that is a key of the wrong type replaced
        by its refusal (WRONGTYPE); a second round trip only when EXISTS counted more keys
        (``existing``) than MGET read values."""
        nil = [k for k, v in enumerate(values) if v is None]
        if existing <= len(values) - len(nil):
            return values
        pipe = self._client.pipeline(transaction=False)
        for k in nil:
            pipe.get(keys[k])
        values = list(values)
        for k, value in zip(nil, pipe.execute(raise_on_error=False), strict=True):
            if _customers_own(value):
                values[k] = value
        return values

    def read_states(self, keys: list[str]) -> list[bytes | None]:
        """The state blobs at ``keys`` (None: no such key), for readers outside the flow
        (``crmstream fit``); a key of the wrong type raises StateEncodingError naming it
        (MGET answers nil for it, as for a missing key)."""
        if not keys:
            return []
        if self._cluster:
            return self._client.mget(keys)
        pipe = self._client.pipeline(transaction=False)
        pipe.mget(keys)
        pipe.exists(*keys)
        blobs, existing = pipe.execute()
        for key, blob in zip(keys, self._with_refusals(blobs, existing, keys), strict=True):
            if isinstance(blob, Exception):
                kind = self._client.type(key)
                raise StateEncodingError(
                    f"state at {key!r} is unreadable: a {kind.decode()}, not a string"
                )
        return blobs

    def subject(self, customer_id: str) -> str:
        """Salted hash of a customer id: what erasure records keep instead of the id."""
        return hashlib.blake2b(customer_id.encode(), key=self._salt, digest_size=16).hexdigest()

    def tombstone_key(self, customer_id: str) -> str:
        return f"{self._prefix}:erased:{self.subject(customer_id)}"

    def commit(
        self,
        shard: int,
        states: Mapping[str, bytes],
        profiles: Mapping[str, Mapping[str, str]],
        progress: Mapping[Position, Progress],
        plan: TimerPlan | None = None,
        fired: list[bytes] = (),  # timer members (state/timers.py)
        erase: list[tuple[str, list[bytes], dict[str, str], int, int]] = (),
        atomic: bool = True,
        customers_delta: int = 0,
        outbox: list[bytes] = (),
        outbox_trim: int = 0,
        quarantine: Mapping[bytes, bytes] | None = None,
    ) -> None:
        """Write states, profiles, timers and the shard's progress in one MULTI/EXEC.

        Fired timers are removed before the plan's timers are added, so a timer
        that fired and was scheduled again in the same step stays scheduled.
        ``erase`` holds (customer, timer members, audit entry): every key and
        timer of the customer goes first, and the audit stream gets the entry;
        what the customer did after its erasure in the step is written after.
        ``customers_delta`` (new customers minus erased ones) keeps the shard's
        customer count; it and the shard's pending timers feed two gauges.
        ``outbox`` entries (records to send) are appended to the shard's outbox
        after its first ``outbox_trim`` entries (delivered) are removed.
        ``quarantine``: timer members set aside with a customer whose work raised
        (``flows.quarantine``; they are among ``fired``, which leave the timer set).
        """
        started = time.perf_counter()
        atomic = atomic and not self._cluster
        timers_key = self.timers.key(shard)

        def stage(pipe: CommandBatch | redis.client.Pipeline) -> None:
            """Queue the step's writes, and last the two gauge reads. Erasures go first:
            what a customer did after its erasure in the same step is written after."""
            for customer, members, audit, tombstone_ms, ttl_s in erase:
                pipe.delete(
                    self.state_key(customer),
                    self.profile_key(customer),
                    self.promises_key(customer),
                )
                if members:
                    pipe.zrem(timers_key, *members)
                pipe.xadd(self.audit_key(), audit)
                pipe.set(self.tombstone_key(customer), tombstone_ms, ex=ttl_s)
            if self._cluster:
                for customer, blob in states.items():
                    pipe.set(self.state_key(customer), blob)
            elif states:
                pipe.mset({self.state_key(c): blob for c, blob in states.items()})
            for customer_id, fields in profiles.items():
                if fields:
                    pipe.hset(self.profile_key(customer_id), mapping=dict(fields))
            if fired:
                pipe.zrem(timers_key, *fired)
            if plan is not None:
                if plan.cancel:
                    pipe.zrem(timers_key, *plan.cancel)
                if plan.schedule:
                    pipe.zadd(timers_key, {t.member: t.due_ms for t in plan.schedule})
                for customer, orders in plan.promises.items():
                    if orders:
                        mapping = {order: p.encode() for order, p in orders.items()}
                        pipe.hset(self.promises_key(customer), mapping=mapping)
                for customer, order_ids in plan.delivered.items():
                    if order_ids:
                        pipe.hdel(self.promises_key(customer), *order_ids)
            if quarantine:
                pipe.hset(self.quarantine_key(shard), mapping=dict(quarantine))
            if outbox_trim:
                pipe.ltrim(self.outbox_key(shard), outbox_trim, -1)
            if outbox:
                pipe.rpush(self.outbox_key(shard), *outbox)
            if atomic and progress:
                pipe.hset(self.progress_key(shard), mapping=encode_progress(progress))
            pipe.hincrby(self.customers_key(), str(shard), customers_delta)
            pipe.zcard(timers_key)

        if atomic:
            results = self.transact_once(shard, stage)
            if results is None:  # ran on an earlier attempt whose reply was lost
                customers = int(self._client.hget(self.customers_key(), str(shard)) or 0)
                pending = self._client.zcard(timers_key)
            else:
                *_, customers, pending = results
        else:
            pipe = self._client.pipeline(transaction=False)
            stage(pipe)
            *_, customers, pending = pipe.execute()
            if progress:  # only after the state it covers is written
                self._client.hset(self.progress_key(shard), mapping=encode_progress(progress))
        observe_redis("commit", started)
        metrics = get_metrics()
        metrics.customers.labels(str(shard)).set(customers)
        metrics.pending_timers.labels(str(shard)).set(pending)

    def commit_key(self, shard: int) -> str:
        return f"{self._prefix}:commit:{shard}"

    def transact_once(self, shard: int, stage: Callable[[CommandBatch], None]) -> list | None:
        """Run the commands ``stage`` queues as one MULTI/EXEC, exactly once.

        A connection lost after EXEC was sent leaves it unknown whether Redis ran
        the transaction; a plain retry would run it again, and trimming or
        appending to the outbox or adding to a count twice is not idempotent.
        So each transaction also writes a token of its own to the shard's
        ``commit`` key, and a retry first reads that key: if it holds the token,
        the transaction ran and is not sent again (None is returned). Otherwise
        the transaction is sent again, with the client's backoff.
        """
        if self._transactions_via is None:
            raise StateStoreError(
                "one transaction over a shard's keys needs a single Redis primary"
            )
        once, retry = self._transactions_via
        token = f"{self._run_id}:{next(self._transactions)}".encode()
        fence = self.commit_key(shard)
        attempts = 0

        def attempt() -> list | None:  # each call one try: the backoff below paces them
            nonlocal attempts
            attempts += 1
            if attempts > 1 and once.get(fence) == token:
                log.warning("shard %d: Redis had run the transaction whose reply was lost", shard)
                return None
            batch = CommandBatch()
            stage(batch)
            batch.set(fence, token)
            return batch.execute(once, transaction=True)[:-1]

        return retry.call_with_retry(attempt, lambda _error: None)

    def quarantine_key(self, shard: int) -> str:
        return self.timers.quarantine_key(shard)

    def timer_scores(self, shard: int, members: list[bytes]) -> list[int | None]:
        """The due times of these members of the shard's timer set (None: not in it)."""
        pipe = self._client.pipeline(transaction=False)
        key = self.timers.key(shard)
        for member in members:
            pipe.zscore(key, member)
        return [None if s is None else int(s) for s in pipe.execute()]

    def load_quarantine(self, shards: int) -> dict[int, dict[bytes, bytes]]:
        """Every shard's quarantined timers: member -> what was kept of it (JSON)."""
        pipe = self._client.pipeline(transaction=False)
        for shard in range(shards):
            pipe.hgetall(self.quarantine_key(shard))
        return dict(enumerate(pipe.execute()))

    def release_quarantine(
        self, shard: int, members: dict[bytes, int | None], to_shard: int | None = None
    ) -> None:
        """Put quarantined timers of the shard's quarantine back in the timer set of
        ``to_shard`` (default: the same shard) at their due times (None: dropped) and out
        of the quarantine, in one MULTI/EXEC. A member the timer set holds already keeps
        the earlier of its two due times (ZADD LT, Redis 6.2): a customer's ``wake`` that
        its events re-armed since, for a sooner timer, is not put back later (outsider 50:
        a cart nudge armed after the repair fired six days late)."""
        due = {m: when for m, when in members.items() if when is not None}
        pipe = self._client.pipeline(transaction=True)
        if due:
            pipe.zadd(self.timers.key(shard if to_shard is None else to_shard), due, lt=True)
        pipe.hdel(self.quarantine_key(shard), *members)
        pipe.execute()

    def outbox_key(self, shard: int) -> str:
        return f"{self._prefix}:outbox:{shard}"

    def load_outbox(self, shard: int) -> list[bytes]:
        """The shard's outbox entries not yet confirmed delivered, oldest first."""
        return self._client.lrange(self.outbox_key(shard), 0, -1)

    def customers_key(self) -> str:
        return f"{self._prefix}:customers"

    def load_profiles(
        self, customer_ids: list[str], fields: Sequence[str]
    ) -> dict[str, dict[str, str]]:
        """These ``fields`` of the customers' readable profile hashes (those present),
        one round trip."""
        started = time.perf_counter()
        keys = [self.profile_key(c) for c in customer_ids]
        if self._cluster:
            pipe = self._client.pipeline(transaction=False)
            for key in keys:
                pipe.hmget(key, fields)
            raw_profiles = pipe.execute()
        else:
            batch = CommandBatch()
            for key in keys:
                batch.command("HMGET", key, *fields)
            raw_profiles = self._retry.call_with_retry(
                lambda: batch.execute(self._client), lambda _error: None
            )
        observe_redis("profiles", started)
        return {
            c: {name: value.decode() for name, value in zip(fields, raw, strict=True) if value}
            for c, raw in zip(customer_ids, raw_profiles, strict=True)
        }

    def timer_members_of(self, shard: int, customer_id: str) -> list[bytes]:
        """Every pending timer member of one customer, in either member format
        (state/timers.py): two scans of the shard's set, for erasure only."""
        key = self.timers.key(shard)
        members = []
        for prefix in (member_prefix(customer_id), customer_id.encode() + SEP.encode()):
            pattern = _GLOB_SPECIAL.sub(rb"\\\1", prefix) + b"*"
            for member, _ in self._client.zscan_iter(key, match=pattern):
                if member[:1] == MARK or _earlier_of(member, customer_id):
                    members.append(member)
        return members

    def audit_key(self) -> str:
        return f"{self._prefix}:audit"

    def load_progress(self, shard: int) -> dict[Position, Progress]:
        """The shard's applied high-water marks per input partition."""
        key = self.progress_key(shard)
        return decode_progress(self._client.hgetall(key), key)

    def event_times(self, shards: int) -> dict[int, int]:
        """Per shard, the newest event time it has applied over its input partitions:
        its event-time watermark once its input is read to the end (docs/state.md,
        "As of"). Shards that applied no event are left out."""
        newest = {
            shard: max((p.max_event_ms for p in progress.values()), default=-1)
            for shard, progress in enumerate(self._every_progress(shards))
        }
        return {shard: ms for shard, ms in newest.items() if ms >= 0}

    def resume_offsets(
        self, shards: int, positions: Iterable[Position]
    ) -> dict[Position, tuple[int, int]]:
        """Where to start reading each input partition, and the step numbering to go on from.

        The lowest next offset over all shards; a shard with no record for a
        partition has applied nothing from it, so that partition starts from its
        beginning (offset 0, no step yet). Each shard then skips what it holds.
        """
        lowest = lowest_progress(self._every_progress(shards))
        start = Progress(-1, -1, -1)
        resume = {}
        for pos in positions:
            rec = lowest.get(pos, start)
            resume[pos] = (rec.offset + 1, rec.step)
        return resume

    def applied_offsets(
        self, shards: int, positions: Iterable[Position] | None = None
    ) -> dict[Position, tuple[int, int, int, int]]:
        """Per input partition some shard has applied events of (of ``positions`` only,
        when given): the highest offset applied, the shard that applied it, and the
        Kafka time and value CRC-32 of the record there (-1: not known). The flow's
        start compares them with the partition (``flows.input_ends``)."""
        highest: dict[Position, tuple[int, int, int, int]] = {}
        for shard, progress in enumerate(self._every_progress(shards)):
            for pos, rec in progress.items():
                if rec.offset >= 0 and rec.offset > highest.get(pos, (-1,))[0]:
                    highest[pos] = (rec.offset, shard, rec.stamp, rec.digest)
        if positions is None:
            return highest
        wanted = set(positions)
        return {pos: found for pos, found in highest.items() if pos in wanted}

    def _every_progress(self, shards: int) -> list[dict[Position, Progress]]:
        """Every shard's progress hash, decoded, in shard order."""
        pipe = self._client.pipeline(transaction=False)
        for shard in range(shards):
            pipe.hgetall(self.progress_key(shard))
        return [decode_progress(raw, self.progress_key(s)) for s, raw in enumerate(pipe.execute())]

    def read_customer(self, customer_id: str) -> tuple[bytes | None, dict[str, str]]:
        """The raw state blob and the profile hash of one customer."""
        pipe = self._client.pipeline(transaction=False)
        pipe.get(self.state_key(customer_id))
        pipe.hgetall(self.profile_key(customer_id))
        blob, profile = pipe.execute()
        return blob, {k.decode(): v.decode() for k, v in profile.items()}


def _earlier_of(member: bytes, customer_id: str) -> bool:
    """An earlier-format member of customer "a" also matches "a\x1f..." of another id
    (that format's ambiguity): it is the customer's only if it parses as theirs."""
    try:
        return parse_member(member, 0).customer == customer_id
    except (ValueError, UnicodeDecodeError):
        return False


def _as_hash(reply: object) -> object:
    """An HGETALL reply as redis-py gives it: a dict (a refusal stays as it is)."""
    if isinstance(reply, list):
        return dict(zip(reply[0::2], reply[1::2], strict=True))
    return reply


def _customers_own(result: object) -> bool:
    """Whether a pipeline's result is a refusal of one customer's key (WRONGTYPE: the key
    holds the wrong kind of value), which sets that customer aside. Any other refusal
    (loading, out of memory, ...) is Redis's, not the customer's: raised."""
    if not isinstance(result, Exception):
        return False
    if isinstance(result, redis.ResponseError) and str(result).startswith("WRONGTYPE"):
        return True
    raise result

"""Timer firing throughput with 1M pending timers, through the real shard path.

This module owns the timer benchmark (``make bench-timers``). It writes state
for N customers and the timers the flow keeps for an active customer with
orders in flight (two cart nudges, the next dormancy step, one ``wake`` for
the churn recheck and birthday held in the record, welcome, repurchase,
potential no-repeat, and delivery checks for three orders: 10 each, so 1M
timers for 100k customers by default) into one shard of an embedded Redis,
then lets the shard's watermark pass the first three days' timers (cart nudges,
welcomes) and measures how fast the real firing path drains them from the
1M-member set: due-range read, one MGET of the customers, the catalogue's
checks, the contact policies, Kafka produce with delivery reports and the
atomic commit. Figures are timers/s and triggers/s in one run.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from rich.console import Console

from crmstream.config import load_config
from crmstream.embedded import EmbeddedStack
from crmstream.flows.runtime import Runtime
from crmstream.flows.shard_step import ShardStep
from crmstream.flows.sink import Outbox
from crmstream.operators.params import (
    MS_PER_DAY,
    MS_PER_HOUR,
)
from crmstream.operators.timer_slots import WAKE
from crmstream.state.encoding import encode_records, fresh_records
from crmstream.state.layout import shard_of
from crmstream.state.timers import timer_member

T0 = 1_767_225_600_000  # 2026-01-01T00:00Z


def seed(runtime: Runtime, customers: int, shard: int) -> int:
    """State and ten timers per customer (the module docstring lists them), all in
    ``shard``; returns the timers written."""
    store = runtime.store
    client = store.client
    shards = runtime.config.processing.shards
    ids = []
    n = 0
    while len(ids) < customers:
        cid = f"b{n:08d}"
        n += 1
        if shard_of(cid, shards) == shard:
            ids.append(cid)
    written = 0
    for start in range(0, customers, 5000):
        chunk = ids[start : start + 5000]
        records = fresh_records(len(chunk))
        offsets = np.arange(len(chunk), dtype=np.int64) * 1000
        records["last_seen_ms"] = T0 + offsets
        records["first_seen_ms"] = T0 + offsets
        records["last_cart_ms"] = T0 + offsets
        records["pref"][:, 3] = 2.0
        # What fold_wake keeps in the record: the recheck (7 days) and the birthday
        # reminder (40 days), both behind one wake member.
        records["recheck_due_ms"] = T0 + offsets + 7 * MS_PER_DAY
        records["birthday_due_ms"] = T0 + offsets + 40 * MS_PER_DAY
        records["birthday_md"] = 215
        pipe = client.pipeline(transaction=False)
        pipe.mset(
            {store.state_key(c): b for c, b in zip(chunk, encode_records(records), strict=True)}
        )
        timers = {}
        for i, c in enumerate(chunk):
            base = T0 + i * 1000
            for kind, due, ref in (
                ("cart_1", base + 60 * 60_000, ""),
                ("cart_2", base + 24 * MS_PER_HOUR, ""),
                ("dormant_30", base + 30 * MS_PER_DAY, str(base)),  # one step at a time
                (WAKE, base + 7 * MS_PER_DAY, ""),
                ("welcome", base + 2 * MS_PER_DAY, "e1"),
                ("repurchase", base + 50 * MS_PER_DAY, str(base)),
                ("potential", base + 30 * MS_PER_DAY + 1, str(base)),
                ("delivery", base + 5 * MS_PER_DAY, f"o{i}a"),
                ("delivery", base + 9 * MS_PER_DAY, f"o{i}b"),
                ("delivery", base + 12 * MS_PER_DAY, f"o{i}c"),
            ):
                timers[timer_member(c, kind, ref)] = due
        pipe.zadd(store.timers.key(shard), timers)
        pipe.execute()
        written += len(timers)
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--customers", type=int, default=100_000)
    args = parser.parse_args()
    console = Console()
    config = load_config(
        None, ["policies.quiet_hours.start=00:00", "policies.quiet_hours.end=00:00"]
    )
    with EmbeddedStack(config) as stack:
        assert stack.endpoints is not None
        runtime = Runtime(config, stack.endpoints)
        shard = 0
        console.print(f"seeding {args.customers:,} customers x 10 timers ...")
        written = seed(runtime, args.customers, shard)
        pending = runtime.store.timers.pending(shard)
        console.print(f"pending timers: {pending:,}")
        step = ShardStep(runtime, shard, live=False, outbox=Outbox(runtime.producer))
        # The first three days pass: cart nudges and welcomes fire while the set holds
        # every customer's later timers too (1M pending at the start).
        mark = T0 + 3 * MS_PER_DAY
        fired = triggers = 0
        started = time.perf_counter()
        while True:
            summary = step.round([], [], {}, lambda _now: mark)
            fired += summary["timers"]
            triggers += summary["triggers"]
            if summary["timers"] == 0:
                break
        seconds = time.perf_counter() - started
        left = runtime.store.timers.pending(shard)
        runtime.close()
    console.print(
        f"timers written {written:,}; fired {fired:,} in {seconds:.1f} s: "
        f"{fired / seconds:,.0f} timers/s, {triggers:,} triggers "
        f"({triggers / seconds:,.0f}/s); left pending {left:,}"
    )


if __name__ == "__main__":
    main()

"""``crmstream quarantine``: the timers set aside with customers whose work raised.

This module owns the command line of the quarantine (``flows/quarantine.py``,
docs/operations.md "Quarantined customers"): ``list`` shows each quarantined
timer with its customer, kind, due time and the error; ``release`` puts a
customer's timers (or all) back in the timer set, to fire when due, once the
cause is fixed.
"""

from __future__ import annotations

import sys
from typing import Annotated, Any

import orjson
import typer
from rich.table import Table

from crmstream.cli_options import ConfigOpt, RedisOpt, SetOpt, _config, _fail, console, err_console

UNREADABLE = "(unreadable)"  # the customer of a member that names no timer (state/timers.py)

quarantine_app = typer.Typer(
    help="Timers set aside with customers whose events or timers made the flow raise.",
    no_args_is_help=True,
)


def _entries(config: ConfigOpt, set_: SetOpt, redis_url: RedisOpt) -> tuple[Any, int, list[dict]]:
    """The store, the number of shards the state in Redis has, and every quarantined timer
    (each with the shard whose quarantine holds it: under every shard key found, so a
    configuration with another number of shards, or entries an earlier reshard left
    behind, hide none; outsider 49)."""
    from crmstream.cli import need_redis
    from crmstream.operators.rules import iso_ms
    from crmstream.state.layout import LayoutError, stored_layout
    from crmstream.state.store import StateStore, StateStoreError, connect

    cfg = _config(config, set_, redis_url=redis_url)
    need_redis(cfg, "quarantine")
    try:
        store = StateStore(connect(cfg.redis.url, cfg.redis), cfg.redis.key_prefix)
        layout, unfinished = stored_layout(store, cfg.processing.step_ms)
        if unfinished is not None:
            raise _fail(
                f"a reshard to {unfinished.shards} shards did not finish: run `crmstream "
                f"reshard --shards {unfinished.shards} --step-ms {unfinished.step_ms}` first"
            )
        shards = layout.shards if layout is not None else cfg.processing.shards
        head = store.quarantine_key(0)[:-1]  # "<prefix>:quarantine:", glob characters escaped
        pattern = "".join("\\" + c if c in "*?[]\\" else c for c in head) + "*"
        found = [key.rsplit(b":", 1)[1] for key in store.client.scan_iter(match=pattern)]
        numbered = [int(n) for n in found if n.isdigit()]
        by_shard = store.load_quarantine(max([shards, *(n + 1 for n in numbered)]))
    except (StateStoreError, LayoutError) as exc:
        raise _fail(str(exc)) from None
    rows = []
    for shard, entries in sorted(by_shard.items()):
        for member, raw in sorted(entries.items()):
            entry = _entry(member, raw, store.quarantine_key(shard))
            due = entry.get("due_ms")
            rows.append({**entry, "shard": shard, "member": member,
                         "due": iso_ms(due) if due is not None else None})  # fmt: skip
    return store, shards, rows


def _entry(member: bytes, raw: bytes, key: str) -> dict[str, Any]:
    """What the quarantine kept of a timer; an entry that is not what the flow writes
    (edited by hand: not JSON, fields of other types, a due time past the year 9999, or
    another customer's than its member's) as a row saying so, due at once when released."""
    import time

    from crmstream.state.timers import parse_member

    try:
        timer = parse_member(member, 0)
        customer, kind = timer.customer, timer.kind
    except (ValueError, UnicodeDecodeError):  # a member that names no timer
        customer, kind = UNREADABLE, "unreadable"
    try:
        entry = orjson.loads(raw)
        problem = _problem(entry, customer)
        if problem is None:
            return entry
    except orjson.JSONDecodeError as error:
        problem = f"not JSON ({error})"
    return {
        "customer": customer,
        "kind": kind,
        "due_ms": int(time.time() * 1000),
        "reason": f"the entry at {key!r} is {problem}: {raw!r:.80}; released, it is due at once",
    }


def _problem(entry: Any, customer: str) -> str | None:
    """Why a decoded quarantine entry is not what the flow writes (None: it is)."""
    if type(entry) is not dict or not all(
        type(entry.get(name)) is str for name in ("customer", "kind", "reason")
    ):
        return "not an object with customer, kind and reason as text"
    due = entry.get("due_ms")
    from crmstream.operators.params import LAST_TIME_MS

    if due is not None and not (type(due) is int and 0 <= due <= LAST_TIME_MS):
        return f"due at {due!r}, not a time in ms from 1970 to 9999"
    if entry["customer"] != customer:
        return f"customer {entry['customer']!r}'s, under a timer of {customer!r}"
    return None


@quarantine_app.command("list")
def quarantine_list(
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON lines.")] = False,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    redis_url: RedisOpt = None,
) -> None:
    """Every quarantined timer: customer, kind, due time, shard and why.

    Example: crmstream quarantine list --redis-url redis://localhost:6379/0
    """
    _store, _shards, rows = _entries(config, set_, redis_url)
    if as_json:
        for row in rows:
            shown = {k: v for k, v in row.items() if k != "member"}
            sys.stdout.write(orjson.dumps(shown).decode() + "\n")
        return
    table = Table(title=f"{len(rows)} quarantined timer(s)")
    for name in ("customer", "kind", "due", "shard", "reason"):
        table.add_column(name, overflow="fold")
    for row in rows:
        table.add_row(row["customer"], row["kind"], row["due"] or "-", str(row["shard"]),
                      row["reason"])  # fmt: skip
    console().print(table)


@quarantine_app.command("release")
def quarantine_release(
    customer: Annotated[
        str | None, typer.Argument(help="Release this customer's timers (default: none).")
    ] = None,
    all_: Annotated[bool, typer.Option("--all", help="Release every customer's.")] = False,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    redis_url: RedisOpt = None,
) -> None:
    """Put quarantined timers back in the timer set; they fire when due (at once if past).
    Fix what made them raise first, or they are quarantined again.

    Example: crmstream quarantine release c0000042 --redis-url redis://localhost:6379/0
    """
    if customer is None and not all_:
        raise _fail("name a customer, or --all")
    from crmstream.state.layout import shard_of

    store, shards, rows = _entries(config, set_, redis_url)
    matching = [r for r in rows if all_ or r["customer"] == customer]
    # A member that names no timer cannot fire: put back, the flow would set it aside
    # again (outsider 49). It stays, to be looked at and deleted.
    chosen = [r for r in matching if r["customer"] != UNREADABLE]
    damaged = [r for r in matching if r["customer"] == UNREADABLE]
    for row in damaged:
        key = store.quarantine_key(row["shard"])
        err_console.print(f"left in {key!r}: {row['member']!r}, which names no timer; delete "
                          "it once looked at (HDEL)")  # fmt: skip
    if not chosen:  # nothing found: exit 1 (README, "Exit codes")
        whose = "any customer" if all_ else f"customer {customer!r}"
        err_console.print(f"no quarantined timers for {whose}")
        raise typer.Exit(1)
    # Back into the timer set of the customer's shard now (a reshard may have moved it).
    moves: dict[tuple[int, int], dict[bytes, int | None]] = {}
    for row in chosen:
        to = shard_of(row["customer"], shards)
        moves.setdefault((row["shard"], to), {})[row["member"]] = row.get("due_ms")
    for (shard, to), members in moves.items():
        store.release_quarantine(shard, members, to)
    console().print(f"released {len(chosen)} timer(s) of {len({r['customer'] for r in chosen})} "
                  "customer(s)")  # fmt: skip

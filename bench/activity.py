"""Customer activity: how the generator spreads its sessions over its customers.

This module owns the generator's customer-activity model (``bench/workload.py``
draws each session's customer with these weights) and its calibration:

- ``cdnow`` (the default) is fitted to the CDNOW purchase history (69,659
  purchases by 23,570 customers, 1997-01 to 1998-06; ``CDNOW_master.txt`` in
  the ``lifetimes`` wheel, read as data). There the busiest customer holds
  0.31 % of the purchases, the ten busiest 1.86 % and the busiest 1 % of
  customers 10.97 %. The customer of rank ``r`` of ``N`` weighs
  ``(x + q) ** -s + c`` with ``x = (r - 0.5) / N``: a power law over the
  customers' rank *fraction* (Zipf-Mandelbrot) with a floor. Its shape does not
  depend on ``N``: a shop with more customers of the same kind, so the top 1 %
  keeps about the same share while no single customer grows to hold a fixed
  share of all sessions.
- ``zipf`` is ``1 / r ** 1.1``, the generator's distribution until issue 38:
  the busiest of 100k customers holds 13.5 % of the sessions. The harness runs
  it as the hot-key stress workload.

``python -m crmstream.bench.activity`` prints the CDNOW figures computed from
the file, what each model gives at CDNOW's size and at the harness's sizes;
``--fit`` repeats the grid search that chose ``CDNOW_FIT`` (bench/README.md).
"""

from __future__ import annotations

import argparse
import itertools
import math
import random
import sys
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

ACTIVITIES = ("cdnow", "zipf")
ZIPF_S = 1.1
CDNOW_CUSTOMERS = 23_570
CDNOW_PURCHASES = 69_659


@dataclass(frozen=True)
class Shares:
    """The shares of all activity held by the busiest customer, the busiest ten, and the
    busiest 1 % of customers (rounded to whole customers)."""

    top1: float
    top10: float
    top1pct: float

    @classmethod
    def of_counts(cls, counts: Iterable[int], customers: int) -> Shares:
        """The shares of ``counts`` (one per customer with any activity) among
        ``customers`` customers in all (those without activity count towards the 1 %)."""
        ordered = sorted(counts, reverse=True)
        total = sum(ordered)
        if total <= 0:
            raise ValueError(f"no activity to take shares of among {customers:,} customers")
        top_pct = max(1, round(customers * 0.01))
        return cls(ordered[0] / total, sum(ordered[:10]) / total, sum(ordered[:top_pct]) / total)

    def as_percent(self) -> str:
        return (
            f"top 1: {100 * self.top1:.2f} %, top 10: {100 * self.top10:.2f} %, "
            f"top 1 %: {100 * self.top1pct:.2f} %"
        )


# Computed from CDNOW_master.txt (``cdnow_shares``; tests/test_activity.py checks
# these against the file): 217, 1,295 and 7,644 of 69,659 purchases.
CDNOW_SHARES = Shares(top1=0.0031152, top10=0.0185906, top1pct=0.1097346)

# (s, q, c) of ``(x + q) ** -s + c``, chosen by ``fit`` (bench/README.md gives the
# grid and what it reaches): sessions drawn with these weights at CDNOW's size hold
# 0.31 / 1.84 / 11.15 % (the mean of 10 draws).
CDNOW_FIT = (0.55, 6.32e-5, 0.136)


def cdnow_shares() -> Shares:
    """The CDNOW figures, from the data file in the lifetimes wheel (one purchase per
    line of ``CDNOW_master.txt``)."""
    from crmstream.flows.replay import cdnow_path, read_cdnow

    rows = read_cdnow(cdnow_path())
    per_customer = Counter(tx.customer for tx in rows)
    return Shares.of_counts(per_customer.values(), len(per_customer))


def mandelbrot_weights(customers: int, s: float, q: float, c: float) -> list[float]:
    """``(x + q) ** -s + c`` for ``x = (rank - 0.5) / customers``, busiest first."""
    return [((rank - 0.5) / customers + q) ** -s + c for rank in range(1, customers + 1)]


def weights(activity: str, customers: int, zipf_s: float = ZIPF_S) -> list[float]:
    """Each customer's weight in the session draw, customer 0 the busiest.

    :raises ValueError: an unknown ``activity`` or no customers.
    """
    if customers < 1:
        raise ValueError(f"a workload needs at least one customer, got {customers}")
    if activity == "cdnow":
        return mandelbrot_weights(customers, *CDNOW_FIT)
    if activity == "zipf":
        return [1.0 / rank**zipf_s for rank in range(1, customers + 1)]
    raise ValueError(f"unknown customer activity {activity!r}: expected one of {ACTIVITIES}")


def session_shares(
    weights_: Sequence[float], sessions: int, seed: int
) -> tuple[Shares, Counter[int]]:
    """The shares of ``sessions`` sessions drawn with ``weights_`` (as the generator
    draws them, ``bisect`` on the cumulative weights), and the sessions per customer."""
    import bisect

    cum = list(itertools.accumulate(weights_))
    rng, total = random.Random(seed), cum[-1]
    drawn = Counter(bisect.bisect_right(cum, rng.random() * total) for _ in range(sessions))
    return Shares.of_counts(drawn.values(), len(weights_)), drawn


# -- the fit ---------------------------------------------------------------------


def _realised(weights_: Sequence[float], draws: list[object]) -> tuple[float, float, float]:
    """Mean shares over common random draws (numpy; ``fit`` only)."""
    import numpy as np

    cum = np.cumsum(np.asarray(weights_, dtype=float))
    cum /= cum[-1]
    top_pct = round(len(weights_) * 0.01)
    out = []
    for uniforms in draws:
        counts = np.bincount(np.searchsorted(cum, uniforms), minlength=len(weights_))
        top = np.sort(counts)[::-1]
        out.append((top[0], top[:10].sum(), top[:top_pct].sum()))
    mean = np.mean(out, axis=0) / len(draws[0])  # type: ignore[arg-type]
    return float(mean[0]), float(mean[1]), float(mean[2])


def fit(
    target: Shares = CDNOW_SHARES,
    customers: int = CDNOW_CUSTOMERS,
    sessions: int = CDNOW_PURCHASES,
    repeats: int = 10,
    progress: Callable[[str], None] | None = None,
) -> tuple[tuple[float, float, float], tuple[float, float, float]]:
    """The (s, q, c) on a grid whose sessions' mean shares come closest to ``target``
    (the sum of squared log ratios of the three shares), and those shares.

    ``sessions`` sessions over ``customers`` customers, as CDNOW's purchases are:
    each draw's shares include the chance of a draw, as CDNOW's do.
    """
    import numpy as np

    rng = np.random.default_rng(3)
    draws = [np.sort(rng.random(sessions)) for _ in range(repeats)]
    goal = np.log([target.top1, target.top10, target.top1pct])
    x = (np.arange(customers) + 0.5) / customers
    best: tuple[float, tuple[float, float, float], tuple[float, float, float]] | None = None
    grid_s = np.round(np.arange(0.40, 0.86, 0.05), 2)
    for i, s in enumerate(grid_s):
        for q in np.exp(np.linspace(np.log(2e-5), np.log(1e-3), 18)):
            base = (x + q) ** -s
            for c in np.exp(np.linspace(np.log(0.05), np.log(20), 25)):
                got = _realised(base + c, draws)
                err = float(np.sum((np.log(got) - goal) ** 2))
                if best is None or err < best[0]:
                    best = (err, (float(s), float(q), float(c)), got)
        if progress is not None:
            progress(f"  s = {s:.2f} done ({i + 1} of {len(grid_s)}); best so far {best[1]}")
    assert best is not None
    return best[1], best[2]


def _describe(activity: str, customers: int, sessions: int, seed: int = 7) -> str:
    from crmstream.state.layout import shard_of

    shares, drawn = session_shares(weights(activity, customers), sessions, seed)
    # The generator's customer ids (``workload._Customer``), in the default 2 shards.
    shard0 = sum(n for cust, n in drawn.items() if shard_of(f"c{cust:07d}", 2) == 0)
    return (
        f"{activity:>5}, {customers:>9,} customers, {sessions:>9,} sessions: "
        f"{shares.as_percent()}; shard 0 of 2: {100 * shard0 / sessions:.1f} % of the sessions"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--fit", action="store_true", help="repeat the grid search (minutes)")
    args = parser.parse_args(argv)
    measured = cdnow_shares()
    print(f"CDNOW (CDNOW_master.txt): {measured.as_percent()}")
    print(f"stated in this module:    {CDNOW_SHARES.as_percent()}")
    if args.fit:
        print("fitting (s, q, c) of (x + q) ** -s + c to them ...", flush=True)
        params, got = fit(progress=lambda line: print(line, flush=True))
        print(f"fit: {params}; mean shares {[f'{100 * g:.3f} %' for g in got]}")
    print(f"model in use: cdnow (s, q, c) = {CDNOW_FIT}, zipf s = {ZIPF_S}")
    for activity in ACTIVITIES:
        print(_describe(activity, CDNOW_CUSTOMERS, CDNOW_PURCHASES))
        # The harness's sizes: 2 events a customer, about 8 a session (with a new
        # customer's profile and consent events).
        for customers in (100_000, 1_000_000):
            print(_describe(activity, customers, math.ceil(customers * 2 / 8)))
    sys.stdout.flush()


if __name__ == "__main__":
    main()

"""The harness's command line: ``python -m crmstream.bench.harness [options]``.

This module owns the options of ``make bench-all`` and ``make bench-smoke``
(what ``--smoke`` shrinks), and hands a child role's arguments to
``children`` when the harness starts itself as a contender.
"""

from __future__ import annotations

import argparse
import sys

from crmstream.bench.harness.children import BENCH_FETCH_BYTES, ROLES, _child_main
from crmstream.bench.harness.contenders import ROOT

DESCRIPTION = "The benchmark harness: crmstream against its ceiling and its peers."


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ROLES:
        _child_main(argv)
        return
    parser = argparse.ArgumentParser(description=DESCRIPTION)
    parser.add_argument("--customers", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--events", type=int, default=None, help="default: 2 per customer")
    parser.add_argument("--partitions", type=int, default=4)
    parser.add_argument("--loads", type=float, nargs="+", default=[0.25, 0.5, 0.75])
    parser.add_argument("--load-seconds", type=float, default=20)
    parser.add_argument("--startup-s", type=float, default=8)
    parser.add_argument("--drain-s", type=float, default=5)
    parser.add_argument(
        "--generator-linger-ms",
        type=int,
        default=25,
        help="linger.ms of the live generator's producer (bench/README.md, latency)",
    )
    parser.add_argument(
        "--crm-set", action="append", default=[], help="extra crmstream config key=value"
    )
    parser.add_argument(
        "--fetch-bytes",
        type=int,
        default=BENCH_FETCH_BYTES,
        help="max.partition.fetch.bytes of every contender's consumer, the ceiling's and "
        "the latency floor's included (0: librdkafka's own 1 MiB; bench/README.md)",
    )
    parser.add_argument("--no-quix", action="store_true")
    parser.add_argument(
        "--no-pathway", action="store_true", help="leave Pathway (.venv-pathway) out"
    )
    parser.add_argument(
        "--no-hot-key",
        action="store_true",
        help="leave out the hot-key stress run (Zipf 1.1 workload; reported, not a target)",
    )
    parser.add_argument(
        "--timer-delay-s",
        type=float,
        default=3.0,
        help="the cart nudge's delay in crmstream's latency runs, so its timers fall due "
        "in the window and their lateness is measured (0: the configuration's 1 h)",
    )
    parser.add_argument(
        "--no-naive", action="store_true", help="leave the naive baseline out (quicker A/B runs)"
    )
    parser.add_argument("--no-latency", action="store_true")
    parser.add_argument(
        "--repeats",
        type=int,
        default=3,
        help="runs of each ceiling and crmstream contender, in turn; each is reported by "
        "its median run (the naive baseline and Quix Streams run once)",
    )
    parser.add_argument(
        "--smoke", action="store_true", help="tiny sizes: keeps the harness working"
    )
    parser.add_argument("--out", default=str(ROOT / "bench" / "out"))
    parser.add_argument(
        "--results",
        default=str(ROOT / "bench" / "RESULTS.md"),
        help="Markdown file whose harness section is replaced (empty: leave it alone)",
    )
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error(f"--repeats must be at least 1, got {args.repeats}")
    if args.smoke:
        args.customers, args.events, args.loads, args.repeats = [2_000], 6_000, [0.5], 2
        args.load_seconds, args.startup_s, args.drain_s = 4, 6, 3
    from crmstream.bench.harness.runs import Harness

    Harness(args).run()

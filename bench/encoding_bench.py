"""Encoding benchmark: ``encode_records`` and ``decode_batch``, µs per record.

The synthetic shop's workload is applied by the kernels (as ``state_bench`` does), and
the customers' records are then encoded and decoded as one batch, ``--repeat`` times;
the medians are reported. Run it in two trees to compare layouts (docs/state.md,
"Bytes per customer").
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from crmstream.bench.state_bench import recorded_batches
from crmstream.config import load_config
from crmstream.operators.derive import derive_batch
from crmstream.operators.kernels import apply_batch
from crmstream.operators.params import params_from
from crmstream.state.encoding import decode_batch, encode_records, fresh_records


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument("--customers", type=int, default=20_000)
    parser.add_argument("--repeat", type=int, default=15)
    args = parser.parse_args(argv)
    config = load_config(env={})
    batches, n = recorded_batches(config, args.events, args.customers)
    params = params_from(config)
    records = fresh_records(n)
    for batch in batches:
        apply_batch(records, batch, params)
    derive_batch(records, records["last_seen_ms"].copy(), params)
    keys = [f"crm:{{c{i}}}:s" for i in range(n)]
    decode_batch(encode_records(records), keys)  # compiled or loaded first
    encode, decode = [], []
    for _ in range(args.repeat):
        started = time.perf_counter()
        blobs = encode_records(records)
        encode.append(time.perf_counter() - started)
        started = time.perf_counter()
        again = decode_batch(blobs, keys)
        decode.append(time.perf_counter() - started)
    assert again.tobytes() == records.tobytes(), "a record did not round-trip"
    print(
        f"{n:,} records, mean blob {np.mean([len(b) for b in blobs]):.1f} B; "
        f"encode {1e6 * statistics.median(encode) / n:.3f} µs, "
        f"decode {1e6 * statistics.median(decode) / n:.3f} µs per record "
        f"(medians of {args.repeat})"
    )


if __name__ == "__main__":
    main()

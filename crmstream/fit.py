"""The work of ``crmstream fit``: customer summaries from Redis, fits, holdout checks.

This module owns reading every customer's BTYD summary out of the Redis state
(streamed in chunks, each customer as of its shard's event-time watermark or
a given time), fitting BG/NBD and Gamma-Gamma on them (``operators.fitting``),
saying how far the new parameters move the customers' values against the ones
in use, turning a fit into a parameter set to save (``state.model``), and the
holdout comparison: its table, error figures and calibration-vs-holdout plot.
The command line (``crmstream.cli``) wires these to a Redis or a replay.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import orjson
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, TimeRemainingColumn
from rich.progress import Progress as RichProgress
from rich.table import Table

from crmstream.config import CrmConfig
from crmstream.flows.replay import ReplayError
from crmstream.operators.fitting import (
    BGNBD_PARAMS,
    GAMMA_GAMMA_PARAMS,
    Fit,
    FitError,
    Holdout,
    Summaries,
    bgnbd_values,
    fit_bgnbd,
    fit_gamma_gamma,
    holdout_table,
    summaries_of,
)
from crmstream.operators.params import LAST_TIME_MS, MS_PER_DAY
from crmstream.profile import AsOf, ProfileError
from crmstream.state import model
from crmstream.state.encoding import EMPTY_BASE, StateEncodingError, decode_batch
from crmstream.state.layout import LayoutError
from crmstream.state.model import ModelError
from crmstream.state.store import StateStore, connect

CHUNK = 5000
Progress = Callable[[str, int, int | None], None]


class FitResult(NamedTuple):
    bgnbd: Fit
    gamma_gamma: Fit | None  # None: too few repeat buyers with spend
    gamma_gamma_error: str | None
    customers: int  # buyers fitted on
    as_of: str  # the as-of time(s) of the summaries


def read_summaries(
    store: StateStore,
    config: CrmConfig,
    as_of_ms: int | None = None,
    progress: Progress | None = None,
) -> tuple[Summaries, tuple[int, int]]:
    """Every buyer's summary from the Redis state, as of ``as_of_ms`` (default: each
    customer's shard watermark), and the (earliest, latest) as-of time used.

    :raises FitError: when the prefix holds no customer state.
    """
    when = AsOf(store, config, as_of_ms)
    keys = store.client.scan_iter(match=f"{store.prefix}:{{*}}:s", count=10_000)
    parts: list[Summaries] = []
    seen, lo, hi = 0, None, None
    chunk: list[bytes] = []
    for key in keys:
        chunk.append(key)
        if len(chunk) == CHUNK:
            parts.append(_summaries(store, when, chunk))
            seen += len(chunk)
            chunk = []
            if progress:
                progress("reading customer state", seen, None)
    if chunk:
        parts.append(_summaries(store, when, chunk))
        seen += len(chunk)
    if progress:
        progress("reading customer state", seen, seen)
    if not seen:
        raise FitError(f"no customer state under key prefix {store.prefix!r}: nothing to fit")
    lo = min(min(t, default=0) for _, t in parts)
    hi = max(max(t, default=0) for _, t in parts)
    return _concat([p for p, _ in parts]), (lo, hi)


def _summaries(store: StateStore, when: AsOf, keys: list[bytes]) -> tuple[Summaries, list[int]]:
    names = [k.decode() for k in keys]
    customers = [k[len(store.prefix) + 2 : -3] for k in names]  # "<prefix>:{<id>}:s"
    blobs = store.read_states(names)
    held = [i for i, b in enumerate(blobs) if b is not None]  # erased meanwhile
    records = decode_batch([blobs[i] for i in held], [names[i] for i in held])
    customers = [customers[i] for i in held]
    _check_history([names[i] for i in held], records)
    times = [when.of(c, int(t))[0] for c, t in zip(customers, records["last_seen_ms"], strict=True)]
    days = np.array(times, np.int64) // MS_PER_DAY
    return summaries_of(customers, records, days), times


def _check_history(keys: list[str], records: np.ndarray) -> None:
    """Raise StateEncodingError naming the first key whose purchase history no run of the
    flow writes (hand-edited or damaged state would bias the fit of every customer, and a
    saved set would change every customer's values): more distinct purchase days than
    days between the first and the last, a last purchase day before the first or after
    the customer's newest event, spend that is not a number >= 0, or a newest event
    outside the years 1970 to 9999."""
    seen = records["last_seen_ms"]
    buyer = (records["purchase_days"] > 0) & (records["first_purchase_day"] != EMPTY_BASE)
    first = records["first_purchase_day"].astype(np.int64)
    last = records["last_purchase_day"].astype(np.int64)
    spend = records["spend_total"]
    problems = (
        ((seen < 0) | (seen > LAST_TIME_MS), "its newest event is not between 1970 and 9999"),
        (buyer & (last < first), "its last purchase day is before its first"),
        (buyer & (last > seen // MS_PER_DAY), "its last purchase day is after its newest event"),
        (
            buyer & (records["purchase_days"].astype(np.int64) > last - first + 1),
            "it has more distinct purchase days than days from its first to its last",
        ),
        (~np.isfinite(spend) | (spend < 0), "its spend is not a number >= 0"),
    )
    for bad, why in problems:
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise StateEncodingError(
                f"state at {keys[i]!r} cannot be fitted on: {why} (purchase days "
                f"{int(records['purchase_days'][i])}, first {int(first[i])}, last {int(last[i])}, "
                f"newest event {int(seen[i])} ms, spend {float(spend[i])})"
            )


def _concat(parts: list[Summaries]) -> Summaries:
    return Summaries(
        [c for p in parts for c in p.customer],
        *(np.concatenate([getattr(p, f) for p in parts]) for f in Summaries._fields[1:]),
    )


def fit_summaries(summaries: Summaries, as_of: tuple[int, int]) -> FitResult:
    """BG/NBD on every buyer; Gamma-Gamma on the repeat buyers (its failure is reported,
    not raised: the BG/NBD fit stands on its own). :raises FitError: from BG/NBD."""
    bg = fit_bgnbd(summaries.x, summaries.t_x, summaries.big_t)
    try:
        gg, gg_error = fit_gamma_gamma(summaries.x, summaries.mean_spend), None
    except FitError as exc:
        gg, gg_error = None, str(exc)
    lo, hi = (_iso(t) for t in as_of)
    return FitResult(bg, gg, gg_error, len(summaries.x), lo if lo == hi else f"{lo} .. {hi}")


def _iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="seconds")


def parameter_set(result: FitResult, in_use: CrmConfig, source: str) -> dict[str, Any]:
    """The parameter set to save: the fitted values (Gamma-Gamma's in use when it could
    not be fitted), their standard errors and what they were fitted on."""
    gg = result.gamma_gamma
    return {
        "bgnbd": result.bgnbd.params,
        "gamma_gamma": gg.params if gg else dict(in_use.gamma_gamma),
        "std_errors": {
            "bgnbd": result.bgnbd.std_errors,
            "gamma_gamma": gg.std_errors if gg else None,
        },
        "log_likelihood": {
            "bgnbd": result.bgnbd.log_likelihood,
            "gamma_gamma": gg.log_likelihood if gg else None,
        },
        "customers": result.customers,
        "repeat_buyers": gg.customers if gg else 0,
        "as_of": result.as_of,
        "source": source,
        "fitted_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def moves(summaries: Summaries, before: dict[str, float], after: dict[str, float]) -> dict:
    """How far the new BG/NBD parameters move each customer's P(alive) and 90-day
    expectation: the largest absolute changes."""
    p0, e0 = bgnbd_values(summaries, 90 / 7, before)
    p1, e1 = bgnbd_values(summaries, 90 / 7, after)
    return {
        "p_alive_max_change": float(np.abs(p1 - p0).max()),
        "expected_90d_max_change": float(np.abs(e1 - e0).max()),
    }


def fit_table(result: FitResult, in_use: CrmConfig) -> Table:
    """The fitted parameters with standard errors, next to the ones in use."""
    table = Table(title=f"value model fitted on {result.customers:,} customers")
    for column in ("model", "parameter", "fitted", "std. error", "in use"):
        table.add_column(column, justify="left" if column in ("model", "parameter") else "right")
    rows: list[tuple[str, Fit | None, tuple[str, ...], Any]] = [
        ("BG/NBD", result.bgnbd, BGNBD_PARAMS, in_use.bgnbd),
        ("Gamma-Gamma", result.gamma_gamma, GAMMA_GAMMA_PARAMS, in_use.gamma_gamma),
    ]
    for name, fit, params, current in rows:
        for param in params:
            table.add_row(
                name,
                param,
                f"{fit.params[param]:.4f}" if fit else "-",
                f"{fit.std_errors[param]:.4f}" if fit else "-",
                f"{getattr(current, param):.4f}",
            )
    return table


def holdout_table_view(fitted: Holdout, in_use: Holdout, title: str) -> Table:
    """Mean holdout purchase days by calibration frequency: actual, and expected with the
    fitted and with the in-use parameters."""
    table = Table(title=title)
    columns = ("calibration x", "customers", "actual", "expected (fitted)", "expected (in use)")
    for column in columns:
        table.add_column(column, justify="right")
    for row, other in zip(fitted.rows, in_use.rows, strict=True):
        table.add_row(row.frequency, f"{row.customers:,}", f"{row.actual:.3f}",
                      f"{row.expected:.3f}", f"{other.expected:.3f}")  # fmt: skip
    return table


def holdout_summary(holdout: Holdout) -> dict[str, float]:
    """The error figures of a holdout comparison."""
    return {
        "holdout_weeks": round(holdout.weeks, 3),
        "actual_purchase_days": round(holdout.actual_total, 1),
        "expected_purchase_days": round(holdout.expected_total, 1),
        "total_error_pct": round(
            100 * (holdout.expected_total - holdout.actual_total) / max(holdout.actual_total, 1),
            2,
        ),
        "mae_per_customer": round(holdout.mae, 4),
        "rmse_per_customer": round(holdout.rmse, 4),
        "bin_mape_pct": round(100 * holdout.bin_mape, 2),
    }


def plot_holdout(holdouts: dict[str, Holdout], path: Path, title: str) -> None:
    """The calibration-vs-holdout plot: mean holdout purchases by calibration frequency,
    actual and expected (one line per parameter set), as a PNG.

    :raises FitError: without matplotlib (the ``fit`` extra).
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise FitError(
            "the holdout plot needs matplotlib: pip install 'crmstream[fit]', or --no-plot"
        ) from None
    first = next(iter(holdouts.values()))
    labels = [row.frequency for row in first.rows]
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    ax.plot(labels, [row.actual for row in first.rows], "o-", color="black", label="actual")
    for (name, holdout), style in zip(holdouts.items(), ("s--", "^:", "d-."), strict=False):
        ax.plot(labels, [row.expected for row in holdout.rows], style, label=f"expected: {name}")
    ax.set_xlabel("purchase days in the calibration period after the first (x)")
    ax.set_ylabel(f"mean purchase days in the {first.weeks:.0f}-week holdout")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


class FitOptions(NamedTuple):
    """What ``crmstream fit`` was asked for."""

    source: str | None  # None: the summaries in Redis
    until: date | None
    holdout_from: date | None
    holdout_to: date | None
    plot: Path | None
    as_of_ms: int | None
    save: bool
    output: Path | None
    as_json: bool


def run_fit(config: CrmConfig, options: FitOptions, console: Console, err: Console) -> str | None:
    """Run ``crmstream fit``; returns an error message for the user, or None."""
    from crmstream.state.store import StateStoreError

    try:
        if options.source is None:
            store = StateStore(connect(config.redis.url, config.redis), config.redis.key_prefix)
            report = _fit_store(store, config, options, err, f"redis:{config.redis.key_prefix}")
        else:
            report = _fit_source(config, options, err)
    except (FitError, ModelError, ReplayError, LayoutError, ProfileError, StateStoreError) as exc:
        return str(exc)
    _show(report, options, console)
    if not report["result"].bgnbd.converged:
        return (
            "the BG/NBD fit did not converge (or its information matrix is singular: too "
            "little variety in the summaries); nothing was saved"
        )
    return None


def _fit_store(
    store: StateStore, config: CrmConfig, options: FitOptions, err: Console, source: str
) -> dict[str, Any]:
    """Fit on the summaries in ``store``; save the set unless asked not to."""
    in_use = model.adopt(config, store.client)
    with _progress(err) as progress:
        summaries, as_of = read_summaries(store, config, options.as_of_ms, progress)
    with err.status(f"fitting BG/NBD and Gamma-Gamma on {len(summaries.x):,} customers ..."):
        result = fit_summaries(summaries, as_of)
    record = parameter_set(result, in_use, source)
    report: dict[str, Any] = {
        "result": result,
        "in_use": in_use,
        "parameter_set": record,
        "moves": moves(summaries, dict(in_use.bgnbd), result.bgnbd.params),
        "summaries": summaries,
        "store": store,
    }
    if options.save and result.bgnbd.converged:
        report["saved_version"] = model.save(store.client, store.prefix, record)
    return report


def _fit_source(config: CrmConfig, options: FitOptions, err: Console) -> dict[str, Any]:
    """Replay the source (up to the calibration end), fit, and with a holdout replay the
    holdout days and compare."""
    from crmstream.embedded import infrastructure
    from crmstream.flows.replay import replay, source_events

    end = options.until
    if options.holdout_from is not None:
        end = options.holdout_from - timedelta(days=1)
        if options.until is not None and options.until != end:
            raise FitError(
                f"--until {options.until} and --holdout-from {options.holdout_from} disagree: "
                f"the calibration ends the day before the holdout ({end})"
            )
    calibration = source_events(options.source, config, None, end)
    holdout = []
    if options.holdout_from is not None:
        holdout = source_events(options.source, config, options.holdout_from, options.holdout_to)
        if not holdout:
            raise FitError(f"{options.source!r} has no events from {options.holdout_from} on")
    as_of_ms = options.as_of_ms
    if as_of_ms is None and end is not None:  # the calibration's end, as the model counts T
        as_of_ms = int(datetime.combine(end, datetime.min.time(), UTC).timestamp() * 1000)
    embedded = not (config.kafka.brokers and config.redis.url)
    with infrastructure(config) as endpoints, _progress(err) as progress:
        replay(endpoints, config, calibration, _replay_progress(progress))
        store = StateStore(connect(endpoints.redis_url, config.redis), config.redis.key_prefix)
        fitted = options._replace(as_of_ms=as_of_ms, save=options.save and not embedded)
        report = _fit_store(store, config, fitted, err, _describe(options, end))
        if embedded and options.save:
            report["not_saved"] = (
                "not saved: the embedded Redis goes away with this command; give --redis-url "
                "(and --brokers) to keep the state and the parameter set, or use --output"
            )
        if holdout:
            report["holdout"] = _holdout(report, holdout, endpoints, config, options, progress)
    return report


def _describe(options: FitOptions, end: date | None) -> str:
    return f"{options.source}" + (f" up to {end}" if end else "")


def _holdout(
    report: dict[str, Any],
    events: list[tuple[str, bytes | None, bytes]],
    endpoints: Any,
    config: CrmConfig,
    options: FitOptions,
    progress: Progress,
) -> dict[str, Any]:
    """Replay the holdout days and compare each buyer's purchase days in them with the
    expectations of the fitted and of the in-use parameters."""
    from crmstream.flows.replay import _event_day, replay

    summaries: Summaries = report["summaries"]
    store: StateStore = report["store"]
    replay(endpoints, config, events, _replay_progress(progress))
    before = summaries.x + 1
    after = np.empty_like(before)
    keys = [store.state_key(c) for c in summaries.customer]
    for start in range(0, len(keys), CHUNK):
        part = keys[start : start + CHUNK]
        records = decode_batch(store.read_states(part), part)
        after[start : start + len(part)] = records["purchase_days"]
    actual = after - before
    last = options.holdout_to or max(filter(None, (_event_day(e[2]) for e in events)))
    weeks = ((last - options.holdout_from).days + 1) / 7
    in_use: CrmConfig = report["in_use"]
    fitted = holdout_table(summaries, actual, weeks, report["result"].bgnbd.params)
    current = holdout_table(summaries, actual, weeks, dict(in_use.bgnbd))
    title = f"{options.source}: {options.holdout_from} .. {last} ({weeks:.0f} weeks)"
    if options.plot is not None:
        plot_holdout({"fitted": fitted, f"in use (v{in_use.value.model_version})": current},
                     options.plot, title)  # fmt: skip
    return {"title": title, "fitted": fitted, "in_use": current, "plot": options.plot}


class _Bar:
    def __init__(self, bar: RichProgress):
        self._bar = bar
        self._tasks: dict[str, Any] = {}

    def __call__(self, what: str, done: int, total: int | None) -> None:
        if what not in self._tasks:
            self._tasks[what] = self._bar.add_task(what, total=total)
        self._bar.update(self._tasks[what], completed=done, total=total)


@contextmanager
def _progress(err: Console) -> Iterator[Progress]:
    with RichProgress(
        *RichProgress.get_default_columns()[:1],
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=err,
        transient=True,
    ) as bar:
        yield _Bar(bar)


def _replay_progress(progress: Progress) -> Callable[[str, int, int], None]:
    return lambda stage, done, total: progress(f"replay: {stage}", done, total)


def _show(report: dict[str, Any], options: FitOptions, console: Console) -> None:
    result: FitResult = report["result"]
    data = _as_data(report)
    if options.output is not None:
        options.output.parent.mkdir(parents=True, exist_ok=True)
        options.output.write_bytes(orjson.dumps(data, option=orjson.OPT_INDENT_2))
    if options.as_json:
        console.print_json(data=data)
        return
    console.print(fit_table(result, report["in_use"]))
    console.print(
        f"as of {result.as_of}; BG/NBD log-likelihood {result.bgnbd.log_likelihood:,.1f}"
        + ("" if result.bgnbd.converged else " (did NOT converge)")
    )
    if result.gamma_gamma_error:
        console.print(f"Gamma-Gamma not fitted: {result.gamma_gamma_error}")
    moved = report["moves"]
    console.print(
        f"against the parameters in use: P(alive) moves by up to "
        f"{moved['p_alive_max_change']:.3f}, the 90-day expectation by up to "
        f"{moved['expected_90d_max_change']:.3f}"
    )
    if "saved_version" in report:
        console.print(
            f"saved as parameter set {report['saved_version']} and made active: flow processes "
            f"use it from their next start (`crmstream model list`, `crmstream model activate`)"
        )
    elif "not_saved" in report:
        console.print(report["not_saved"])
    if "holdout" in report:
        hold = report["holdout"]
        console.print(holdout_table_view(hold["fitted"], hold["in_use"], hold["title"]))
        for name in ("fitted", "in_use"):
            console.print(f"{name}: {holdout_summary(hold[name])}")
        if hold["plot"] is not None:
            console.print(f"plot: {hold['plot']}")


def _as_data(report: dict[str, Any]) -> dict[str, Any]:
    data: dict[str, Any] = {
        "parameter_set": report["parameter_set"],
        "moves": report["moves"],
        "saved_version": report.get("saved_version"),
    }
    if "holdout" in report:
        hold = report["holdout"]
        data["holdout"] = {
            "title": hold["title"],
            "rows": [row._asdict() for row in hold["fitted"].rows],
            "expected_in_use": [row.expected for row in hold["in_use"].rows],
            "fitted": holdout_summary(hold["fitted"]),
            "in_use": holdout_summary(hold["in_use"]),
        }
    return data

"""`crmstream fit` with a holdout, as a user runs it: a recorded source replayed through
the flow up to the day before the holdout, fitted, then the holdout days replayed and
each buyer's actual purchase days compared with the model's expectation."""

from __future__ import annotations

from collections import defaultdict
from datetime import UTC, date, datetime

import orjson
import pytest

from crmstream.config.schema import TopicsConfig
from crmstream.flows.replay import cdnow_path, read_cdnow
from tests.test_cli import crm

pytestmark = pytest.mark.integration
HOLDOUT = date(1997, 10, 1)


def _cdnow_file(path, customers: int) -> list:
    """The purchases of the first ``customers`` CDNOW customers as a JSON-lines file of
    order events (event times as ISO-8601 text, as a shop's export might have them)."""
    rows = [tx for tx in read_cdnow(cdnow_path()) if int(tx.customer[6:]) <= customers]
    with path.open("wb") as handle:
        for tx in rows:
            at = datetime(tx.day.year, tx.day.month, tx.day.day, 15, tzinfo=UTC)
            body = {"event_id": f"e{tx.line}", "customer_id": tx.customer,
                    "event_type": "order_placed", "event_time": at.isoformat(),
                    "order_id": f"o{tx.line}", "amount": tx.amount, "currency": "USD"}  # fmt: skip
            handle.write(orjson.dumps(body) + b"\n")
        handle.write(b"not json\n")  # dead-lettered by the flow, in neither period
    return rows


def _sets(config) -> list[str]:
    sets = []
    for role in TopicsConfig.model_fields:
        sets += ["--set", f"kafka.topics.{role}={getattr(config.kafka.topics, role)}"]
    return [*sets, "--set", f"redis.key_prefix={config.redis.key_prefix}"]


@pytest.mark.slow  # the default suite took 16:25 at 6bcfa5c: in the slow suite (CI runs it)
def test_fit_with_a_holdout_on_a_file_source(isolated_config, stack, tmp_path):
    config = isolated_config("processing.min_event_time=1990-01-01T00:00:00+00:00")
    rows = _cdnow_file(tmp_path / "shop.jsonl", 600)
    plot = tmp_path / "plots" / "holdout.png"
    out = crm(
        "fit", "--source", str(tmp_path / "shop.jsonl"), "--holdout-from", str(HOLDOUT),
        "--plot", str(plot), "--json", "--output", str(tmp_path / "fit.json"),
        "--brokers", ",".join(stack.brokers), "--redis-url", stack.redis_url,
        "--set", "processing.min_event_time=1990-01-01T00:00:00+00:00", *_sets(config),
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    report = orjson.loads(out.stdout)
    assert report == orjson.loads((tmp_path / "fit.json").read_bytes())

    calibration, holdout = defaultdict(set), defaultdict(set)
    for tx in rows:
        (calibration if tx.day < HOLDOUT else holdout)[tx.customer].add(tx.day)
    buyers = set(calibration)
    table = report["holdout"]
    assert sum(row["customers"] for row in table["rows"]) == len(buyers)
    assert table["fitted"]["actual_purchase_days"] == sum(len(holdout[c]) for c in buyers)
    last = max(tx.day for tx in rows)
    assert table["fitted"]["holdout_weeks"] == pytest.approx(((last - HOLDOUT).days + 1) / 7)
    by_x = defaultdict(list)
    for c in buyers:
        by_x[min(len(calibration[c]) - 1, 7)].append(len(holdout[c]))
    for row in table["rows"]:
        x = 7 if row["frequency"] == "7+" else int(row["frequency"])
        assert row["actual"] == pytest.approx(sum(by_x[x]) / len(by_x[x])), row
        assert row["expected"] > 0
    error = table["fitted"]
    assert error["total_error_pct"] == pytest.approx(
        100 * (error["expected_purchase_days"] - error["actual_purchase_days"])
        / error["actual_purchase_days"], abs=0.01,
    )  # fmt: skip
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # fitted on the calibration only, as of its last day, and saved: the Redis is kept
    fitted = report["parameter_set"]
    assert fitted["customers"] == len(buyers) and fitted["as_of"].startswith("1997-09-30")
    assert report["saved_version"] == 1


@pytest.mark.slow  # the default suite took 16:25 at 6bcfa5c: in the slow suite (CI runs it)
def test_fit_refuses_what_it_cannot_do_with_a_clear_message(isolated_config, stack, tmp_path):
    config = isolated_config()
    redis_args = ["--redis-url", stack.redis_url, *_sets(config)]
    empty = crm("fit", *redis_args)
    assert empty.returncode == 2
    assert f"no customer state under key prefix {config.redis.key_prefix!r}" in empty.stderr
    holdout = crm("fit", "--holdout-from", "1997-10-01", *redis_args)
    assert holdout.returncode == 2 and "need --source" in holdout.stderr
    bad_day = crm("fit", "--source", "cdnow", "--holdout-from", "1997-13-01")
    assert bad_day.returncode == 2 and "--holdout-from must be YYYY-MM-DD" in bad_day.stderr
    missing = crm("fit", "--source", str(tmp_path / "nope.jsonl"), *redis_args)
    assert missing.returncode == 2 and "no such replay file" in missing.stderr
    as_of = crm("profile", "x", "--as-of", "yesterday", *redis_args)
    assert as_of.returncode == 2 and "--as-of must be 'now', 'watermark' or an ISO" in as_of.stderr
    activate = crm("model", "activate", "4", *redis_args)
    assert activate.returncode == 2 and "no parameter set version 4" in activate.stderr


@pytest.mark.slow
def test_fit_on_cdnow_with_the_standard_holdout(tmp_path):
    """The full CDNOW calibration/holdout split through the CLI on an embedded stack (the
    figures and plot in docs/state.md come from this command)."""
    out = crm(
        "fit", "--source", "cdnow", "--holdout-from", str(HOLDOUT), "--json",
        "--plot", str(tmp_path / "cdnow.png"), timeout=900,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    report = orjson.loads(out.stdout)
    assert report["saved_version"] is None  # an embedded Redis: nothing to keep it in
    fitted = report["parameter_set"]["bgnbd"]
    for name, value in {"r": 0.2516, "alpha": 4.789, "a": 0.723, "b": 2.161}.items():
        assert fitted[name] == pytest.approx(value, rel=1e-3), name
    table = report["holdout"]
    assert table["fitted"]["holdout_weeks"] == 39
    assert table["fitted"]["actual_purchase_days"] == 19_684  # counted from the raw file
    assert sum(row["customers"] for row in table["rows"]) == 23_570
    assert abs(table["fitted"]["total_error_pct"]) < abs(table["in_use"]["total_error_pct"])
    assert (tmp_path / "cdnow.png").stat().st_size > 10_000

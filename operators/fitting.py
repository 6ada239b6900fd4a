"""Maximum-likelihood fits of the BG/NBD and Gamma-Gamma models, and holdout checks.

This module owns estimating the value model's parameters from customer
summaries: BG/NBD's r, alpha, a, b from (x, t_x, T) (Fader, Hardie & Lee 2005,
eq. 6, times in weeks) and Gamma-Gamma's p, q, v from the repeat buyers' (x,
mean spend per repeat purchase day) (Fader, Hardie & Lee 2005, "RFM and CLV").
Each fit maximises the log-likelihood over the parameters' logarithms with
SciPy (Nelder-Mead, then BFGS to polish) and gives standard errors from the
inverse of the observed information (a central-difference Hessian of the
log-likelihood at the optimum, in log space, mapped back with the delta
method). It also builds the summaries from decoded state records and compares
expected and actual purchases in a holdout period.

SciPy is needed here only: ``crmstream fit`` installs it with the ``fit``
extra, and without it the fits raise ``FitError`` saying so.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np

from crmstream.operators.btyd import bgnbd_batch
from crmstream.state.encoding import EMPTY_BASE

BGNBD_PARAMS = ("r", "alpha", "a", "b")
GAMMA_GAMMA_PARAMS = ("p", "q", "v")


class FitError(ValueError):
    """The data cannot be fitted (too few customers, invalid values, no SciPy)."""


class Fit(NamedTuple):
    """A fitted model: parameters and their standard errors by name."""

    params: dict[str, float]
    std_errors: dict[str, float]
    log_likelihood: float
    customers: int
    converged: bool


class Summaries(NamedTuple):
    """Per-customer BTYD summaries, times in weeks; buyers only."""

    customer: list[str]
    x: np.ndarray  # repeat purchase days
    t_x: np.ndarray  # weeks from the first to the last purchase day
    big_t: np.ndarray  # weeks from the first purchase day to the as-of day
    mean_spend: np.ndarray  # mean spend per repeat purchase day (0 when x = 0)


def _scipy() -> Any:
    try:
        import scipy.optimize
        import scipy.special
    except ImportError:
        raise FitError(
            "fitting needs SciPy: pip install 'crmstream[fit]' (it brings scipy and matplotlib)"
        ) from None
    return scipy


def bgnbd_log_likelihood(
    params: tuple[float, float, float, float], x: np.ndarray, t_x: np.ndarray, big_t: np.ndarray
) -> np.ndarray:
    """Each customer's BG/NBD log-likelihood (FHL 2005, eq. 6)."""
    gammaln = _scipy().special.gammaln
    r, alpha, a, b = params
    a1 = gammaln(r + x) - gammaln(r) + r * np.log(alpha)
    a2 = gammaln(a + b) + gammaln(b + x) - gammaln(b) - gammaln(a + b + x)
    a3 = -(r + x) * np.log(alpha + big_t)
    repeat = x > 0
    a4 = np.full(x.shape, -np.inf)
    a4[repeat] = (
        np.log(a) - np.log(b + x[repeat] - 1) - (r + x[repeat]) * np.log(alpha + t_x[repeat])
    )
    return a1 + a2 + np.logaddexp(a3, a4)


def gamma_gamma_log_likelihood(
    params: tuple[float, float, float], x: np.ndarray, mean_spend: np.ndarray
) -> np.ndarray:
    """Each repeat buyer's Gamma-Gamma log-likelihood of its mean spend per repeat
    purchase day (x >= 1, mean_spend > 0), with the constant term of the x spends."""
    gammaln = _scipy().special.gammaln
    p, q, v = params
    px = p * x
    return (
        gammaln(px + q)
        - gammaln(px)
        - gammaln(q)
        + q * np.log(v)
        + (px - 1) * np.log(mean_spend)
        + px * np.log(x)
        - (px + q) * np.log(x * mean_spend + v)
    )


def _maximise(loglik: Callable[[np.ndarray], float], names: tuple[str, ...], customers: int) -> Fit:
    """Maximise ``loglik`` over the parameters' logarithms; standard errors from the
    observed information."""
    scipy = _scipy()

    def negative(log_params: np.ndarray) -> float:
        value = loglik(np.exp(log_params))
        return -value if math.isfinite(value) else 1e300

    start = np.zeros(len(names))
    coarse = scipy.optimize.minimize(
        negative, start, method="Nelder-Mead",
        options={"maxiter": 20_000, "xatol": 1e-9, "fatol": 1e-9},
    )  # fmt: skip
    polished = scipy.optimize.minimize(negative, coarse.x, method="BFGS", options={"gtol": 1e-6})
    best = polished if polished.fun <= coarse.fun else coarse
    hessian = _hessian(negative, best.x)
    try:
        cov_log = np.linalg.inv(hessian)
        variances = np.diag(cov_log)
        se_log = np.sqrt(np.where(variances > 0, variances, np.nan))
    except np.linalg.LinAlgError:
        se_log = np.full(len(names), np.nan)
    values = np.exp(best.x)
    return Fit(
        dict(zip(names, values.tolist(), strict=True)),
        dict(zip(names, (values * se_log).tolist(), strict=True)),  # delta method
        -float(best.fun),
        customers,
        bool(coarse.success or polished.success) and bool(np.isfinite(se_log).all()),
    )


def _hessian(f: Callable[[np.ndarray], float], at: np.ndarray, step: float = 1e-4) -> np.ndarray:
    """Central-difference Hessian of ``f`` at ``at``."""
    n = len(at)
    out = np.empty((n, n))
    for i in range(n):
        for j in range(i, n):
            e_i, e_j = np.eye(n)[i] * step, np.eye(n)[j] * step
            value = (
                f(at + e_i + e_j) - f(at + e_i - e_j) - f(at - e_i + e_j) + f(at - e_i - e_j)
            ) / (4 * step * step)
            out[i, j] = out[j, i] = value
    return out


def fit_bgnbd(x: np.ndarray, t_x: np.ndarray, big_t: np.ndarray) -> Fit:
    """BG/NBD by maximum likelihood on (x repeat purchases, t_x, T in weeks).

    Customers with the same summary are counted once with a weight.

    :raises FitError: naming the first invalid summary, or with fewer than 10 customers.
    """
    x, t_x, big_t = (np.asarray(a, np.float64) for a in (x, t_x, big_t))
    _check_summaries(x, t_x, big_t)
    rows, counts = np.unique(np.stack([x, t_x, big_t], axis=1), axis=0, return_counts=True)
    ux, utx, ut = rows.T

    def loglik(params: np.ndarray) -> float:
        return float(counts @ bgnbd_log_likelihood(tuple(params), ux, utx, ut))

    return _maximise(loglik, BGNBD_PARAMS, len(x))


def fit_gamma_gamma(x: np.ndarray, mean_spend: np.ndarray) -> Fit:
    """Gamma-Gamma by maximum likelihood on the repeat buyers (x >= 1) with a positive
    mean spend per repeat purchase day; the others are left out.

    :raises FitError: with fewer than 10 such customers.
    """
    x, mean_spend = np.asarray(x, np.float64), np.asarray(mean_spend, np.float64)
    use = (x > 0) & (mean_spend > 0) & np.isfinite(mean_spend)
    if use.sum() < 10:
        raise FitError(
            f"Gamma-Gamma needs at least 10 repeat buyers with a positive mean spend, "
            f"got {int(use.sum())}"
        )
    xs, ms = x[use], mean_spend[use]

    def loglik(params: np.ndarray) -> float:
        return float(gamma_gamma_log_likelihood(tuple(params), xs, ms).sum())

    fit = _maximise(loglik, GAMMA_GAMMA_PARAMS, int(use.sum()))
    if fit.params["q"] <= 1:
        raise FitError(
            f"the Gamma-Gamma fit has q = {fit.params['q']:.4g} <= 1: mean spend has no finite "
            f"expectation under it; the spend data does not suit the model"
        )
    return fit


def _check_summaries(x: np.ndarray, t_x: np.ndarray, big_t: np.ndarray) -> None:
    if not len(x) == len(t_x) == len(big_t):
        raise FitError(f"x, t_x and T differ in length: {len(x)}, {len(t_x)}, {len(big_t)}")
    if len(x) < 10:
        raise FitError(f"BG/NBD needs at least 10 customers, got {len(x)}")
    problems = (
        (~np.isfinite(x) | (x < 0) | (x != np.round(x)), "x must be a whole number >= 0"),
        (~np.isfinite(t_x) | (t_x < 0), "t_x must be >= 0"),
        (~np.isfinite(big_t) | (big_t < t_x), "T must be >= t_x"),
        ((x == 0) & (t_x != 0), "t_x must be 0 when x is 0"),
    )
    for bad, rule in problems:
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise FitError(f"customer summary #{i} (x={x[i]}, t_x={t_x[i]}, T={big_t[i]}): {rule}")
    # Purchase days are whole days: a history within one day leaves the model's rates
    # without time to be measured over (the fit's values would divide by 0).
    if not big_t.max() > 0:
        raise FitError(
            f"every one of the {len(x)} customers made its first purchase on the last day "
            "(T = 0): BG/NBD needs a history of more than one day to fit"
        )


def summaries_of(customers: list[str], records: np.ndarray, as_of_day: np.ndarray) -> Summaries:
    """The buyers' BTYD summaries from decoded state records, as of each record's
    ``as_of_day`` (epoch days): x repeat purchase days, t_x and T in weeks, and the
    mean spend per repeat purchase day (spend_total less the first day's, over x)."""
    buyer = (records["purchase_days"] > 0) & (records["first_purchase_day"] != EMPTY_BASE)
    rec = records[buyer]
    first = rec["first_purchase_day"].astype(np.int64)
    x = rec["purchase_days"].astype(np.float64) - 1
    t_x = (rec["last_purchase_day"].astype(np.int64) - first) / 7.0
    big_t = np.maximum(np.asarray(as_of_day)[buyer] - first, 0) / 7.0
    repeat_spend = rec["spend_total"] - rec["first_day_spend"]
    with np.errstate(divide="ignore", invalid="ignore"):
        mean = np.where(x > 0, repeat_spend / np.maximum(x, 1), 0.0)
    names = [c for c, keep in zip(customers, buyer.tolist(), strict=True) if keep]
    return Summaries(names, x, t_x, big_t, mean)


def bgnbd_values(
    summaries: Summaries, weeks: float, params: dict[str, float]
) -> tuple[np.ndarray, np.ndarray]:
    """(P(alive), expected purchases in the next ``weeks``) of each summary."""
    n = len(summaries.x)
    p_alive, expected = np.empty(n), np.empty(n)
    r, alpha, a, b = (params[name] for name in BGNBD_PARAMS)
    bgnbd_batch(summaries.x, summaries.t_x, summaries.big_t, weeks, r, alpha, a, b,
                p_alive, expected)  # fmt: skip
    return p_alive, expected


class HoldoutRow(NamedTuple):
    frequency: str  # calibration x: "0" .. "6", "7+"
    customers: int
    actual: float  # mean purchase days in the holdout
    expected: float  # mean BG/NBD expectation


class Holdout(NamedTuple):
    rows: list[HoldoutRow]
    weeks: float
    actual_total: float
    expected_total: float
    mae: float  # mean absolute error per customer
    rmse: float
    bin_mape: float  # mean absolute % error of the bins' means, weighted by customers


def holdout_table(
    summaries: Summaries, actual: np.ndarray, weeks: float, params: dict[str, float], top: int = 7
) -> Holdout:
    """Expected against actual purchase days in a holdout of ``weeks`` after the
    calibration, by calibration frequency (0 .. top-1, then top+)."""
    _, expected = bgnbd_values(summaries, weeks, params)
    bins = np.minimum(summaries.x.astype(np.int64), top)
    rows = []
    weighted_error = 0.0
    for k in range(top + 1):
        inside = bins == k
        n = int(inside.sum())
        if not n:
            continue
        mean_actual, mean_expected = float(actual[inside].mean()), float(expected[inside].mean())
        rows.append(HoldoutRow(f"{k}+" if k == top else str(k), n, mean_actual, mean_expected))
        if mean_actual > 0:
            weighted_error += n * abs(mean_expected - mean_actual) / mean_actual
    error = expected - actual
    return Holdout(
        rows,
        weeks,
        float(actual.sum()),
        float(expected.sum()),
        float(np.abs(error).mean()),
        float(np.sqrt((error * error).mean())),
        weighted_error / len(actual),
    )

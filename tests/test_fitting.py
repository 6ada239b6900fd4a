"""The value model's fits and closed forms: the published CDNOW fits reproduced from the
data files in the lifetimes wheel (read as data, never imported), standard errors
against an independent Hessian, fits of simulated data, and the CLV math as properties."""

from __future__ import annotations

import csv
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from crmstream.config import load_config
from crmstream.flows.replay import cdnow_path
from crmstream.operators.btyd import bgnbd, clv, clv_bound, expected_path, gamma_gamma_spend
from crmstream.operators.fitting import (
    BGNBD_PARAMS,
    FitError,
    bgnbd_log_likelihood,
    fit_bgnbd,
    fit_gamma_gamma,
)
from crmstream.operators.params import params_from
from crmstream.operators.reference import (
    reference_bgnbd,
    reference_clv,
    reference_gamma_gamma_spend,
)

PUBLISHED_BGNBD = {"r": 0.243, "alpha": 4.414, "a": 0.793, "b": 2.426}
PUBLISHED_GAMMA_GAMMA = {"p": 6.25, "q": 3.74, "v": 15.44}


def _cdnow_sample_summary() -> dict[str, np.ndarray]:
    """The 2,357-customer CDNOW sample's published summary (x, t_x, T in weeks, and
    zbar: mean spend per repeat transaction), as the data file ships it."""
    path = cdnow_path().parent / "cdnow_customers_summary_with_transactions.csv"
    with path.open() as handle:
        rows = list(csv.DictReader(handle))
    return {k: np.array([float(r[k]) for r in rows]) for k in ("x", "t_x", "T", "zbar")}


@pytest.fixture(scope="module")
def sample():
    return _cdnow_sample_summary()


def test_bgnbd_fit_reproduces_the_published_cdnow_fit(sample):
    fit = fit_bgnbd(sample["x"], sample["t_x"], sample["T"])
    assert fit.customers == 2357 and fit.converged
    for name, published in PUBLISHED_BGNBD.items():
        assert fit.params[name] == pytest.approx(published, rel=0.01), name
    # the published log-likelihood (FHL 2005: -9582.4)
    assert fit.log_likelihood == pytest.approx(-9582.4, abs=0.1)


def test_gamma_gamma_fit_reproduces_the_published_cdnow_fit(sample):
    fit = fit_gamma_gamma(sample["x"], sample["zbar"])
    assert fit.customers == 946 and fit.converged
    for name, published in PUBLISHED_GAMMA_GAMMA.items():
        assert fit.params[name] == pytest.approx(published, rel=0.01), name


def test_standard_errors_are_the_inverse_observed_information(sample):
    """The delta-method standard errors equal those of a Hessian taken directly in the
    parameters (an independent finite difference, another step size)."""
    x, t_x, big_t = sample["x"], sample["t_x"], sample["T"]
    fit = fit_bgnbd(x, t_x, big_t)
    theta = np.array([fit.params[n] for n in BGNBD_PARAMS])

    def nll(values: np.ndarray) -> float:
        return -float(bgnbd_log_likelihood(tuple(values), x, t_x, big_t).sum())

    steps = theta * 1e-3
    hessian = np.empty((4, 4))
    for i in range(4):
        for j in range(4):
            di, dj = np.eye(4)[i] * steps[i], np.eye(4)[j] * steps[j]
            hessian[i, j] = (
                nll(theta + di + dj) - nll(theta + di - dj) - nll(theta - di + dj)
                + nll(theta - di - dj)
            ) / (4 * steps[i] * steps[j])  # fmt: skip
    direct = np.sqrt(np.diag(np.linalg.inv(hessian)))
    for name, se in zip(BGNBD_PARAMS, direct, strict=True):
        assert fit.std_errors[name] == pytest.approx(se, rel=0.02), name
        assert 0 < fit.std_errors[name] < fit.params[name]


def simulate_bgnbd(n: int, params: dict[str, float], seed: int) -> tuple[np.ndarray, ...]:
    """Customers drawn from BG/NBD: purchase rate ~ Gamma(r, alpha), drop-out probability
    after each purchase ~ Beta(a, b), observed for T weeks after the first purchase."""
    rng = np.random.default_rng(seed)
    lam = rng.gamma(params["r"], 1 / params["alpha"], n)
    p = rng.beta(params["a"], params["b"], n)
    big_t = rng.uniform(20, 60, n)
    x, t_x = np.zeros(n), np.zeros(n)
    for i in range(n):
        t = 0.0
        while True:
            t += rng.exponential(1 / lam[i])
            if t > big_t[i]:
                break
            x[i] += 1
            t_x[i] = t
            if rng.random() < p[i]:
                break
    return x, t_x, big_t


@pytest.mark.parametrize("seed", [1, 2])
def test_a_fit_of_simulated_customers_finds_the_parameters_within_its_standard_errors(seed):
    truth = {"r": 0.5, "alpha": 6.0, "a": 0.7, "b": 3.0}
    fit = fit_bgnbd(*simulate_bgnbd(4000, truth, seed))
    for name, value in truth.items():
        z = (fit.params[name] - value) / fit.std_errors[name]
        assert abs(z) < 4, (name, fit.params[name], fit.std_errors[name])


@pytest.mark.parametrize(
    "x, t_x, big_t, message",
    [
        ([1.0], [2.0], [1.0], "T must be >= t_x"),
        ([1.5], [1.0], [2.0], "whole number"),
        ([0.0], [1.0], [2.0], "t_x must be 0 when x is 0"),
        ([-1.0], [0.0], [2.0], "whole number >= 0"),
    ],
)
def test_invalid_summaries_name_the_customer_and_the_rule(x, t_x, big_t, message):
    good = ([0.0] * 12, [0.0] * 12, [5.0] * 12)
    with pytest.raises(FitError, match=rf"customer summary #12 .*{message}"):
        fit_bgnbd(good[0] + x, good[1] + t_x, good[2] + big_t)


def test_too_few_customers_is_a_clear_error():
    with pytest.raises(FitError, match="at least 10 customers, got 3"):
        fit_bgnbd([0, 1, 2], [0, 1, 2], [3, 3, 3])
    with pytest.raises(FitError, match="at least 10 repeat buyers"):
        fit_gamma_gamma([0, 1, 2], [0, 10, 20])


DP = params_from(load_config(env={})).derive
summary = st.tuples(st.integers(0, 60), st.floats(0, 100), st.floats(0, 150)).map(
    lambda s: (float(s[0]), 0.0 if s[0] == 0 else min(s[1], s[2]), max(s[1], s[2], 0.01))
)
model = st.fixed_dictionaries(
    {
        "r": st.floats(0.05, 5),
        "alpha": st.floats(0.5, 50),
        "a": st.floats(0.05, 5).filter(lambda a: abs(a - 1) > 1e-3),
        "b": st.floats(0.05, 10),
    }
).filter(lambda m: abs(m["a"] + m["b"] - 1) > 1e-3)  # singular there: refused by the config


@settings(max_examples=200, deadline=None)
@given(s=summary, bg=model, months=st.integers(1, 36), discount=st.floats(0, 0.2),
       spend=st.floats(0.5, 500))  # fmt: skip
def test_clv_matches_a_month_by_month_scipy_sum(s, bg, months, discount, spend):
    x, t_x, big_t = s
    model = (bg["r"], bg["alpha"], bg["a"], bg["b"])
    want = reference_clv(x, t_x, big_t, spend, months, discount, *model)
    got = clv(x, t_x, big_t, spend, months, discount, *model)
    assert got == pytest.approx(want, rel=1e-6, abs=1e-9)
    # the bound the high-CLV rule checks first is never below
    assert clv_bound(x, big_t, spend, months, bg["r"], bg["alpha"]) >= got * (1 - 1e-12)


@settings(max_examples=200, deadline=None)
@given(s=summary, bg=model, weeks=st.floats(0.1, 104), n=st.integers(1, 24))
def test_the_expectation_path_is_bgnbd_at_each_horizon(s, bg, weeks, n):
    x, t_x, big_t = s
    path = np.empty(n)
    expected_path(x, t_x, big_t, weeks / n, bg["r"], bg["alpha"], bg["a"], bg["b"], path)
    for j in range(n):
        _, one = bgnbd(x, t_x, big_t, weeks / n * (j + 1), bg["r"], bg["alpha"], bg["a"], bg["b"])
        assert path[j] == pytest.approx(one, rel=1e-10, abs=1e-12)
    assert np.all(np.diff(path) >= -1e-12)  # purchases only accumulate
    _, ref = reference_bgnbd(x, t_x, big_t, weeks, bg["r"], bg["alpha"], bg["a"], bg["b"])
    assert path[-1] == pytest.approx(ref, rel=1e-8, abs=1e-12)


@settings(max_examples=200, deadline=None)
@given(s=summary, months=st.integers(1, 60), discount=st.floats(0.001, 0.2),
       spend=st.floats(0.5, 500))  # fmt: skip
def test_clv_grows_with_the_horizon_and_shrinks_with_the_discount(s, months, discount, spend):
    x, t_x, big_t = s
    bg = (DP.bg_r, DP.bg_alpha, DP.bg_a, DP.bg_b)
    base = clv(x, t_x, big_t, spend, months, discount, *bg)
    assert clv(x, t_x, big_t, spend, months + 1, discount, *bg) >= base
    assert clv(x, t_x, big_t, spend, months, discount * 2, *bg) <= base
    undiscounted = clv(x, t_x, big_t, spend, months, 0.0, *bg)
    assert clv_bound(x, big_t, spend, months, DP.bg_r, DP.bg_alpha) >= undiscounted
    _, total = bgnbd(x, t_x, big_t, 30 * months / 7, *bg)
    assert undiscounted == pytest.approx(spend * total, rel=1e-9)
    assert base <= undiscounted


@given(x=st.integers(0, 500), mean=st.floats(0.01, 1e4), p=st.floats(0.1, 50),
       q=st.floats(1.01, 50), v=st.floats(0.1, 1e3))  # fmt: skip
def test_gamma_gamma_spend_weighs_the_population_mean_and_the_customers(x, mean, p, q, v):
    """Expected spend = a weighted mean of the population's pv/(q-1) and the customer's
    own mean; the customer's weight px/(px+q-1) grows with x."""
    population = p * v / (q - 1)
    got = gamma_gamma_spend(float(x), mean, p, q, v)
    dp = DP._replace(gg_p=p, gg_q=q, gg_v=v)
    assert got == pytest.approx(reference_gamma_gamma_spend(float(x), mean, dp), rel=1e-12)
    weight = p * x / (p * x + q - 1)
    assert got == pytest.approx((1 - weight) * population + weight * mean, rel=1e-9)
    assert min(population, mean) * (1 - 1e-9) <= got <= max(population, mean) * (1 + 1e-9)
    assert not math.isnan(got)


def test_the_holdout_table_groups_by_calibration_frequency_and_sums_the_errors():
    from crmstream.operators.fitting import Summaries, holdout_table

    x = np.array([0, 0, 1, 2, 9, 12], float)
    t_x = np.array([0, 0, 3, 5, 20, 30], float)
    big_t = np.full(6, 39.0)
    summaries = Summaries(list("abcdef"), x, t_x, big_t, np.zeros(6))
    actual = np.array([0, 1, 1, 3, 5, 9], float)
    table = holdout_table(summaries, actual, 39.0, PUBLISHED_BGNBD, top=7)
    assert [(r.frequency, r.customers) for r in table.rows] == [
        ("0", 2), ("1", 1), ("2", 1), ("7+", 2)
    ]  # fmt: skip
    expected = [
        reference_bgnbd(x[i], t_x[i], big_t[i], 39.0, *PUBLISHED_BGNBD.values())[1]
        for i in range(6)
    ]
    assert table.rows[0].actual == 0.5
    assert table.rows[0].expected == pytest.approx((expected[0] + expected[1]) / 2)
    assert table.rows[3].expected == pytest.approx((expected[4] + expected[5]) / 2)
    assert table.expected_total == pytest.approx(sum(expected)) and table.actual_total == 19
    errors = np.array(expected) - actual
    assert table.mae == pytest.approx(np.abs(errors).mean())
    assert table.rmse == pytest.approx(np.sqrt((errors**2).mean()))


def test_without_scipy_or_matplotlib_the_fit_says_which_extra_to_install(monkeypatch, sample):
    """SciPy and matplotlib are the ``fit`` extra: without them the fit and the plot fail
    with a message naming it, not an ImportError deep in a stack trace."""
    import sys
    from pathlib import Path

    from crmstream.fit import plot_holdout
    from crmstream.operators.fitting import Holdout, HoldoutRow

    monkeypatch.setitem(sys.modules, "scipy", None)
    with pytest.raises(FitError, match=r"fitting needs SciPy: pip install 'crmstream\[fit\]'"):
        fit_bgnbd(sample["x"], sample["t_x"], sample["T"])
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    holdout = Holdout([HoldoutRow("0", 1, 0.0, 0.1)], 39.0, 0.0, 0.1, 0.1, 0.1, 0.0)
    with pytest.raises(FitError, match=r"the holdout plot needs matplotlib: .*\[fit\]"):
        plot_holdout({"fitted": holdout}, Path("never.png"), "title")


def test_a_fit_without_variety_is_flagged_not_converged():
    """Every customer with the same summary and no repeat purchase: the likelihood has no
    unique maximum, and the fit says so (``crmstream fit`` then saves nothing)."""
    fit = fit_bgnbd([0.0] * 50, [0.0] * 50, [10.0] * 50)
    assert not fit.converged


def test_a_history_within_one_day_is_refused_naming_why():
    """Every customer first seen on the last day (T = 0; a 23-minute history): refused
    before fitting (the fitted values divided by zero)."""
    from crmstream.operators.fitting import FitError, fit_bgnbd

    with pytest.raises(FitError, match=r"every one of the 30 customers .* \(T = 0\)"):
        fit_bgnbd([0.0] * 30, [0.0] * 30, [0.0] * 30)
    assert fit_bgnbd([0.0] * 29 + [1.0], [0.0] * 29 + [1 / 7], [0.0] * 29 + [1 / 7]).params


@pytest.mark.parametrize("t_x, rule", [(-1.0, "t_x must be >= 0"),
                                       (float("inf"), "t_x must be >= 0"),
                                       (5.0, "T must be >= t_x")])  # fmt: skip
def test_bgnbd_refuses_each_bad_summary_naming_its_rule(t_x, rule):
    from crmstream.operators.fitting import FitError, fit_bgnbd

    x, tx, big_t = [1.0] * 12, [2.0] * 12, [4.0] * 12
    tx[7], big_t[7] = t_x, 4.0
    with pytest.raises(FitError, match=f"customer summary #7 .*: {rule}"):
        fit_bgnbd(np.array(x), np.array(tx), np.array(big_t))


def test_the_gamma_gamma_likelihood_is_the_mixture_of_gammas_it_models():
    """Fader, Hardie & Lee (2005): the mean of x spends is Gamma(px, rate nu x) with nu
    ~ Gamma(q, rate v). The closed form equals that integral, computed numerically
    (the log-likelihood the fit reports, constant term included)."""
    from scipy import integrate, stats

    from crmstream.operators.fitting import gamma_gamma_log_likelihood

    p, q, v = 6.25, 3.74, 15.44
    x, mean = np.array([1.0, 2.0, 5.0]), np.array([20.0, 35.5, 12.25])
    closed = gamma_gamma_log_likelihood((p, q, v), x, mean)
    for k in range(3):
        def density(nu, k=k):
            return (stats.gamma.pdf(mean[k], p * x[k], scale=1 / (nu * x[k]))
                    * stats.gamma.pdf(nu, q, scale=1 / v))  # fmt: skip

        value, _ = integrate.quad(density, 0, np.inf, limit=200)
        assert math.log(value) == pytest.approx(closed[k], rel=1e-6, abs=1e-6)

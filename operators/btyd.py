"""Closed forms of the BG/NBD purchase model and the Gamma-Gamma spend model (Numba).

This module owns the per-customer formulas the kernels and the profile use:
the Gauss hypergeometric series, BG/NBD's P(alive) and conditional expected
purchases (Fader, Hardie & Lee 2005), Gamma-Gamma's expected spend per
purchase (Fader, Hardie & Lee 2005, "RFM and CLV: using iso-value curves") and
the discounted CLV built from both. Times are in weeks, as the model's
parameters are. Estimating the parameters is ``operators.fitting``'s.
"""

from __future__ import annotations

import numpy as np
from numba import njit


@njit(cache=True, nogil=True)
def hyp2f1(a, b, c, z):
    """Gauss hypergeometric 2F1(a, b; c; z) by its power series, for 0 <= z < 1."""
    term = 1.0
    total = 1.0
    for k in range(100_000):
        term *= (a + k) * (b + k) / ((c + k) * (k + 1)) * z
        total += term
        if abs(term) <= 1e-15 * abs(total):
            break
    return total


@njit(cache=True, nogil=True)
def bgnbd(x, t_x, big_t, horizon, r, alpha, a, b):
    """(P(alive), expected purchases in ``horizon``) for BG/NBD; times in weeks.

    x: repeat purchases; t_x: time of the last purchase; big_t: length of the
    observation period, both measured from the first purchase (Fader, Hardie &
    Lee 2005, eq. 10 and the conditional expectation of section 4.3).
    """
    odds = _dead_odds(x, t_x, big_t, r, alpha, a, b)
    p_alive = 1.0 / (1.0 + odds)
    z = horizon / (alpha + big_t + horizon)
    head = (a + b + x - 1.0) / (a - 1.0)
    tail = ((alpha + big_t) / (alpha + big_t + horizon)) ** (r + x)
    tail *= hyp2f1(r + x, b + x, a + b + x - 1.0, z)
    return p_alive, head * (1.0 - tail) / (1.0 + odds)


@njit(cache=True, nogil=True)
def _dead_odds(x, t_x, big_t, r, alpha, a, b):
    """The odds that the customer has dropped out (BG/NBD): P(alive) = 1 / (1 + odds)."""
    ratio = ((alpha + big_t) / (alpha + t_x)) ** (r + x)
    return a / (b + x - 1.0) * ratio if x > 0 else 0.0


@njit(cache=True, nogil=True)
def p_alive_of(x, t_x, big_t, r, alpha, a, b):
    """P(alive) of ``bgnbd`` alone, without the expected purchases' power series."""
    return 1.0 / (1.0 + _dead_odds(x, t_x, big_t, r, alpha, a, b))


@njit(cache=True, nogil=True)
def gamma_gamma_spend(x, mean_spend, p, q, v):
    """Expected spend per purchase day of a customer with ``x`` repeat purchase days of
    mean ``mean_spend`` (Gamma-Gamma: the population mean pv/(q-1) when x = 0)."""
    return p * (v + x * mean_spend) / (p * x + q - 1.0)


@njit(cache=True, nogil=True)
def expected_path(x, t_x, big_t, step, r, alpha, a, b, out):
    """``out[i]`` = BG/NBD's expected purchases in the next ``(i + 1) * step`` weeks.

    The same conditional expectation as ``bgnbd`` at every horizon, with the 2F1
    series of all horizons summed in one pass: their coefficients are shared, so
    a path of n horizons costs about one series, not n (CLV needs a path).
    """
    n = out.shape[0]
    ratio = ((alpha + big_t) / (alpha + t_x)) ** (r + x)
    odds = a / (b + x - 1.0) * ratio if x > 0 else 0.0
    head = (a + b + x - 1.0) / (a - 1.0)
    c1, c2, c3 = r + x, b + x, a + b + x - 1.0
    z = np.empty(n)
    term = np.ones(n)
    total = np.ones(n)
    for j in range(n):
        horizon = step * (j + 1)
        z[j] = horizon / (alpha + big_t + horizon)
    for k in range(100_000):
        factor = (c1 + k) * (c2 + k) / ((c3 + k) * (k + 1))
        converged = True
        for j in range(n):
            term[j] *= factor * z[j]
            total[j] += term[j]
            if abs(term[j]) > 1e-15 * abs(total[j]):
                converged = False
        if converged:
            break
    for j in range(n):
        horizon = step * (j + 1)
        tail = ((alpha + big_t) / (alpha + big_t + horizon)) ** (r + x) * total[j]
        out[j] = head * (1.0 - tail) / (1.0 + odds)


@njit(cache=True, nogil=True)
def clv(x, t_x, big_t, spend, months, discount, r, alpha, a, b):
    """Customer lifetime value: the expected purchases in each of the next ``months``
    30-day months (BG/NBD, times in weeks) times ``spend``, month i discounted by
    ``(1 + discount) ** i``."""
    path = np.empty(months)
    expected_path(x, t_x, big_t, 30.0 / 7.0, r, alpha, a, b, path)
    total = 0.0
    before = 0.0
    for i in range(months):
        total += (path[i] - before) * spend / (1.0 + discount) ** (i + 1)
        before = path[i]
    return total


@njit(cache=True, nogil=True)
def clv_bound(x, big_t, spend, months, r, alpha):
    """An upper bound of ``clv`` without a series: a customer alive at T buys at a
    rate whose posterior mean is (r + x) / (alpha + T) per week, P(alive) <= 1 and
    discounting only lowers the sum."""
    return spend * (r + x) / (alpha + big_t) * (30.0 * months / 7.0)


@njit(cache=True, nogil=True)
def bgnbd_batch(x, t_x, big_t, horizon, r, alpha, a, b, p_alive, expected):
    """``bgnbd`` for each customer of a batch, into ``p_alive`` and ``expected``."""
    for i in range(x.shape[0]):
        p_alive[i], expected[i] = bgnbd(x[i], t_x[i], big_t[i], horizon, r, alpha, a, b)

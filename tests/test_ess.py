"""Effective-sample-size diagnostics of importance weights (trademd.analysis.ess)."""

import math
import warnings

import numpy as np
import pytest
from scipy import stats

from trademd.analysis.ess import kish_relative_ess, pareto_k, weight_diagnostics
from trademd.errors import TradeMDError


def _direct_kish_relative_ess(log_weights: np.ndarray) -> float:
    """The textbook formula on exponentiated weights (fine for moderate log weights)."""
    w = np.exp(log_weights)
    return float(w.sum() ** 2 / (w ** 2).sum() / len(w))


def _reference_gpd_shape(exceedances: np.ndarray) -> float:
    """Zhang & Stephens with the Vehtari et al. prior, in linear space, as written in PSIS's
    ``gpdfit`` (exceedances sorted ascending, all positive)."""
    n = len(exceedances)
    m = 30 + int(n ** 0.5)
    b = 1 - np.sqrt(m / (np.arange(1, m + 1) - 0.5))
    b = b / (3 * exceedances[int(n / 4 + 0.5) - 1]) + 1 / exceedances[-1]
    k = np.mean(np.log1p(-b[:, None] * exceedances), axis=1)
    profile = n * (np.log(-b / k) - k - 1)
    weights = np.exp(profile - profile.max())
    b_mean = np.sum(b * weights) / weights.sum()
    k_mean = np.mean(np.log1p(-b_mean * exceedances))
    return (n * k_mean + 10 * 0.5) / (n + 10)


# -- Kish ESS --------------------------------------------------------------------------------

@pytest.mark.parametrize("n", [7, 1000])
def test_equal_weights(n):
    d = weight_diagnostics(np.full(n, -3.2), n_batches=1)
    assert d.n == n
    assert d.ess == pytest.approx(n)
    assert d.relative_ess == pytest.approx(1.0)
    assert d.top10_weight_share == pytest.approx(min(10, n) / n)


def test_one_dominant_weight_gives_ess_one():
    log_w = np.zeros(1000)
    log_w[123] = 800.0  # exp(800) overflows float64; the answer must not
    d = weight_diagnostics(log_w)
    assert d.ess == pytest.approx(1.0)
    assert d.relative_ess == pytest.approx(1e-3)
    assert d.top10_weight_share == pytest.approx(1.0)


@pytest.mark.parametrize("zero", [-np.inf, np.nan, np.inf])
def test_zero_weights_count_in_n(zero):
    log_w = np.full(1000, 2.5)
    log_w[::2] = zero
    assert kish_relative_ess(log_w) == pytest.approx(0.5)
    d = weight_diagnostics(log_w)
    assert d.n == 1000 and d.ess == pytest.approx(500.0)
    assert d.top10_weight_share == pytest.approx(10 / 500)


def test_kish_matches_direct_formula_and_ignores_a_constant():
    log_w = np.random.default_rng(0).normal(0.0, 1.5, 4000)
    expected = _direct_kish_relative_ess(log_w)
    assert 0.05 < expected < 0.5  # a case where a wrong formula would show
    assert kish_relative_ess(log_w) == pytest.approx(expected, rel=1e-12)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no overflow warnings either
        for shift in (-1e4, 37.0, 1e4):
            assert kish_relative_ess(log_w + shift) == pytest.approx(expected, rel=1e-9)
            assert weight_diagnostics(log_w + shift).pareto_k == pytest.approx(
                pareto_k(log_w), abs=1e-8)


# -- batches ---------------------------------------------------------------------------------

def test_batches_are_the_kish_ess_of_consecutive_slices():
    rng = np.random.default_rng(1)
    log_w = rng.normal(0.0, 1.0, 1000) * np.linspace(0.2, 2.0, 1000)  # batches differ
    log_w[rng.random(1000) < 0.05] = -np.inf
    d = weight_diagnostics(log_w, n_batches=5)
    values = np.array(d.batch_relative_ess)
    assert values.shape == (5,)
    for value, part in zip(values, log_w.reshape(5, 200)):
        finite = part[np.isfinite(part)]
        w = np.exp(finite)
        assert value == pytest.approx(w.sum() ** 2 / (w ** 2).sum() / 200, rel=1e-12)
    assert values.max() / values.min() > 2  # the slices really differ
    assert d.batch_relative_ess_min == values.min()
    assert d.batch_relative_ess_max == values.max()
    assert d.batch_relative_ess_sem == pytest.approx(values.std(ddof=1) / math.sqrt(5))
    assert d.relative_ess == pytest.approx(_direct_kish_relative_ess(log_w), rel=1e-12)


def test_batch_edge_cases():
    one = weight_diagnostics(np.zeros(10), n_batches=1)
    assert one.batch_relative_ess == (pytest.approx(1.0),) and math.isnan(one.batch_relative_ess_sem)
    log_w = np.zeros(11)
    log_w[:6] = -np.inf  # the first batch (6 of the uneven split 6 + 5) has no weight at all
    d = weight_diagnostics(log_w, n_batches=2)
    assert d.batch_relative_ess == (0.0, pytest.approx(1.0))
    assert d.relative_ess == pytest.approx(5 / 11)


# -- Pareto k --------------------------------------------------------------------------------

def test_pareto_k_matches_linear_space_reference():
    rng = np.random.default_rng(3)
    for log_w in (rng.normal(0.0, 1.5, 5000), np.log(stats.genpareto.rvs(c=0.6, size=3000, random_state=rng)),
                  rng.normal(0.0, 0.3, 800)):
        n = len(log_w)
        m = math.ceil(min(0.2 * n, 3 * math.sqrt(n)))
        top = np.exp(np.sort(log_w)[-m - 1:])
        assert pareto_k(log_w) == pytest.approx(_reference_gpd_shape(top[1:] - top[0]), abs=1e-10)


@pytest.mark.parametrize("shape, draw", [
    (0.3, lambda rng: stats.genpareto.rvs(c=0.3, size=20000, random_state=rng)),
    (0.8, lambda rng: stats.pareto.rvs(b=1 / 0.8, size=20000, random_state=rng)),
])
def test_pareto_k_recovers_known_shape(shape, draw):
    log_w = np.log(draw(np.random.default_rng(0)))
    assert pareto_k(log_w) == pytest.approx(shape, abs=0.1)


@pytest.mark.parametrize("shape", [0.3, 0.8])
def test_pareto_k_on_exact_quantiles(shape):
    """Noise-free 'samples' (the GPD quantiles at (i - 1/2) / n): little beyond the prior's pull."""
    log_w = np.log(stats.genpareto.ppf((np.arange(20000) + 0.5) / 20000, c=shape))
    assert pareto_k(log_w) == pytest.approx(shape, abs=0.03)


def test_pareto_k_light_and_extreme_tails():
    rng = np.random.default_rng(4)
    assert pareto_k(rng.normal(0.0, 0.5, 20000)) < 0.3  # log-normal weights, small sigma
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        huge = pareto_k(rng.normal(0.0, 2000.0, 20000))  # tail spans far beyond float64
    assert math.isfinite(huge) and huge > 10


def test_pareto_k_not_estimable_is_nan():
    assert math.isnan(pareto_k(np.random.default_rng(5).normal(size=20)))  # tail of 4 < 5
    assert math.isnan(pareto_k(np.zeros(1000)))  # all weights tied: no tail
    sparse = np.full(1000, -np.inf)
    sparse[:50] = np.random.default_rng(6).normal(size=50)  # 50 nonzero < M + 1 = 96
    assert math.isnan(pareto_k(sparse))
    assert math.isfinite(pareto_k(np.random.default_rng(7).normal(size=21)))  # tail of 5


# -- bad input -------------------------------------------------------------------------------

@pytest.mark.parametrize("log_w", [np.array([]), np.full(100, -np.inf), np.full(10, np.nan),
                                   np.zeros((10, 2))])
@pytest.mark.parametrize("function", [kish_relative_ess, pareto_k, weight_diagnostics])
def test_bad_input_raises(function, log_w):
    with pytest.raises(TradeMDError):
        function(log_w)


@pytest.mark.parametrize("n_batches", [0, 11])
def test_bad_batch_count_raises(n_batches):
    with pytest.raises(TradeMDError, match="n_batches"):
        weight_diagnostics(np.zeros(10), n_batches=n_batches)

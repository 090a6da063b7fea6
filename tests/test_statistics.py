"""Integrated autocorrelation times against processes where they are known exactly."""

import numpy as np
import pytest

from trademd.analysis.statistics import (
    chains_by_replica,
    effective_sample_size,
    integrated_autocorrelation_time,
)


def _ar1(rho: float, n_chains: int, n: int, seed: int) -> np.ndarray:
    """x_t = rho x_{t-1} + sqrt(1 - rho^2) e_t, started in equilibrium: tau = (1 + rho) / (1 - rho)."""
    rng = np.random.default_rng(seed)
    noise = rng.normal(size=(n_chains, n))
    x = np.empty((n_chains, n))
    x[:, 0] = noise[:, 0]
    for t in range(1, n):
        x[:, t] = rho * x[:, t - 1] + np.sqrt(1 - rho ** 2) * noise[:, t]
    return x


@pytest.mark.parametrize("rho", [0.0, 0.5, 0.9])
def test_ar1_tau(rho):
    tau = integrated_autocorrelation_time(_ar1(rho, 16, 20000, seed=1))
    assert tau == pytest.approx((1 + rho) / (1 - rho), rel=0.06)


def test_constant_series_and_chains_by_replica():
    assert integrated_autocorrelation_time(np.ones(100)) == 1.0
    values = np.array([10.0, 20.0, 11.0, 21.0, 12.0, 22.0])
    replica = np.array([0, 1, 0, 1, 0, 1])
    time_ps = np.array([1.0, 1.0, 2.0, 2.0, 3.0, 3.0])
    order = np.array([4, 1, 0, 3, 2, 5])  # files may hold frames in any order
    chains = chains_by_replica(values[order], replica[order], time_ps[order])
    assert chains.tolist() == [[10.0, 11.0, 12.0], [20.0, 21.0, 22.0]]


def test_effective_sample_size_of_correlated_replicas():
    x = _ar1(0.8, 8, 5000, seed=2)  # tau = 9
    replica = np.repeat(np.arange(8), 5000)
    time_ps = np.tile(np.arange(5000.0), 8)
    assert effective_sample_size(x.ravel(), replica, time_ps) == pytest.approx(8 * 5000 / 9, rel=0.1)

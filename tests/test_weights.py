"""The one home of self-normalised weights, the Kish ESS (trademd.weights) and the seed hash
(trademd.seeds): numpy and torch agree, non-finite log weights weigh nothing, and the hash is
the one every stored run was drawn with."""

import math

import numpy as np
import pytest
import torch

from trademd.errors import TradeMDError
from trademd.seeds import stream_seed
from trademd.weights import (
    finite_log_weights,
    kish_ess,
    kish_ess_from_sums,
    kish_ess_of_normalised,
    kish_ess_torch,
    self_normalised_weights,
    self_normalised_weights_torch,
    shifted_weights_torch,
    snis_mean_torch,
)


def test_kish_ess_is_the_same_figure_every_way():
    log_w = np.array([0.0, math.log(2.0), math.log(3.0), -np.inf])  # (1+2+3)^2 / (1+4+9) = 36/14
    assert kish_ess(log_w) == pytest.approx(36 / 14, rel=1e-14)
    assert float(kish_ess_torch(torch.as_tensor(log_w))) == pytest.approx(36 / 14, rel=1e-14)
    assert kish_ess_of_normalised(self_normalised_weights(log_w)) == pytest.approx(36 / 14, rel=1e-14)
    shifted = shifted_weights_torch(torch.as_tensor(log_w), torch.tensor(0.0, dtype=torch.float64))
    assert kish_ess_from_sums(float(shifted.sum()), float((shifted ** 2).sum())) == pytest.approx(36 / 14, rel=1e-14)
    assert kish_ess(log_w + 1e4) == pytest.approx(36 / 14, rel=1e-12)  # a constant changes nothing
    assert kish_ess_from_sums(0.0, 0.0) == 0.0 and kish_ess(np.full(3, -np.inf)) == 0.0


def test_non_finite_log_weights_weigh_nothing():
    log_w = np.array([0.0, np.nan, np.inf, -np.inf, 0.0])
    assert np.array_equal(finite_log_weights(log_w), [0.0, -np.inf, -np.inf, -np.inf, 0.0])
    assert kish_ess(log_w) == pytest.approx(2.0)
    weights = self_normalised_weights(np.where(np.isfinite(log_w), log_w, -np.inf))
    assert np.array_equal(weights, [0.5, 0.0, 0.0, 0.0, 0.5])
    as_tensor = torch.as_tensor(log_w)
    assert torch.equal(self_normalised_weights_torch(as_tensor), torch.as_tensor(weights))
    assert float(snis_mean_torch(torch.tensor([1.0, 9.0, 9.0, 9.0, 3.0], dtype=torch.float64), as_tensor)) == 2.0
    assert float(kish_ess_torch(as_tensor)) == pytest.approx(2.0)
    assert math.isnan(float(snis_mean_torch(torch.ones(2), torch.full((2,), -math.inf))))
    with pytest.raises(TradeMDError, match="zero weight"):
        self_normalised_weights(np.full(4, -np.inf))


def test_the_seed_hash_is_pinned():
    """Changing the hash would silently change every sampled file and multi-rank run."""
    assert stream_seed(7, 300_000, 2) == 7 * 1_000_003 + 300_000 * 7919 + 2 == 2_382_700_023
    assert stream_seed(2 ** 62, 1, 0) == (2 ** 62 * 1_000_003 + 7919) % 2 ** 63
    assert stream_seed(0, 0, 0) == 0 and 0 <= stream_seed(-5, 3, 1) < 2 ** 63

"""Self-normalised importance weights and the Kish effective sample size: their one home,
numpy (sampling, analysis, files) and torch (training, ranks) side by side.

Every function takes unnormalised log importance weights (dimensionless, natural log). A
weight of zero is written -inf (a flagged sample); NaN and +inf are read as -inf too, so a
non-finite log weight always weighs nothing. The Kish ESS is (sum w)^2 / sum w^2, in samples
(absolute; divide by n for the relative figure), and adding a constant to every log weight
changes nothing.
"""

import math

import numpy as np
from scipy.special import logsumexp
import torch
from torch import Tensor

from trademd.errors import TradeMDError

__all__ = [
    "finite_log_weights",
    "self_normalised_weights",
    "kish_ess",
    "kish_ess_of_normalised",
    "finite_log_weights_torch",
    "self_normalised_weights_torch",
    "snis_mean_torch",
    "kish_ess_torch",
    "shifted_weights_torch",
    "kish_ess_from_sums",
]


def finite_log_weights(log_weights: np.ndarray) -> np.ndarray:
    """float64 copy of ``log_weights`` [...] with every non-finite entry set to -inf."""
    log_weights = np.asarray(log_weights, dtype=np.float64)
    return np.where(np.isfinite(log_weights), log_weights, -np.inf)


def self_normalised_weights(log_weights: np.ndarray) -> np.ndarray:
    """Weights w_i / sum w, float64 [n] summing to 1, from log weights [n].

    Raises:
        TradeMDError: every weight is zero (nothing to normalise).
    """
    finite = np.isfinite(log_weights)
    if not finite.any():
        raise TradeMDError(
            "every sample has zero weight (wrong chirality, a flipped peptide bond or non-finite "
            "energy): the model is not usable at this temperature; train longer or check the data"
        )
    shifted = np.where(finite, np.exp(log_weights - log_weights[finite].max()), 0.0)
    return shifted / shifted.sum()


def kish_ess(log_weights: np.ndarray) -> float:
    """Kish ESS (sum w)^2 / sum w^2 of log weights [n], in samples (0.0 if every weight is
    zero), by log-sum-exp."""
    log_weights = finite_log_weights(log_weights)
    if np.isneginf(log_weights).all():
        return 0.0
    return float(np.exp(2 * logsumexp(log_weights) - logsumexp(2 * log_weights)))


def kish_ess_of_normalised(weights: np.ndarray) -> float:
    """Kish ESS 1 / sum w^2 of self-normalised weights [n] (summing to 1), in samples."""
    return float(1.0 / np.sum(weights ** 2))


def finite_log_weights_torch(log_weights: Tensor) -> Tensor:
    """``log_weights`` [...] with every non-finite entry set to -inf."""
    return torch.where(torch.isfinite(log_weights), log_weights,
                       torch.full_like(log_weights, -math.inf))


def self_normalised_weights_torch(log_weights: Tensor) -> Tensor:
    """Weights normalised to sum 1 over the last axis [..., n] (NaN where all are zero)."""
    return torch.softmax(finite_log_weights_torch(log_weights), dim=-1)


def snis_mean_torch(values: Tensor, log_weights: Tensor) -> Tensor:
    """Self-normalised importance-sampling estimate sum(w v) / sum(w) over the last axis
    (values and log weights [..., n]); NaN if no weight is finite (a bad batch)."""
    weights = self_normalised_weights_torch(log_weights)
    values = torch.where(weights > 0, values, torch.zeros_like(values))
    return (weights * values).sum(dim=-1)


def kish_ess_torch(log_weights: Tensor) -> Tensor:
    """Kish ESS (sum w)^2 / sum w^2 over the last axis of log weights [..., n], in samples."""
    log_weights = finite_log_weights_torch(log_weights)
    return torch.exp(2 * torch.logsumexp(log_weights, -1) - torch.logsumexp(2 * log_weights, -1))


def shifted_weights_torch(log_weights: Tensor, shift: Tensor) -> Tensor:
    """exp(log w - shift), float64 [n], zero for non-finite log weights: weights that sums
    over several sets (ranks) can add when all use the same ``shift`` (e.g. their largest
    finite log weight)."""
    log_weights = log_weights.double()
    finite = torch.isfinite(log_weights)
    return torch.where(finite, torch.exp(log_weights - shift), torch.zeros_like(log_weights))


def kish_ess_from_sums(sum_weights: float, sum_squared_weights: float) -> float:
    """Kish ESS (sum w)^2 / sum w^2 from the two sums (of weights on any common scale), in
    samples; 0.0 when every weight is zero."""
    return float(sum_weights ** 2 / sum_squared_weights) if sum_squared_weights > 0 else 0.0

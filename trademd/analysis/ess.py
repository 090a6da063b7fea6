"""Effective-sample-size diagnostics of self-normalised importance weights.

All functions take unnormalised log importance weights, float64 [n] (dimensionless, natural
log), in draw order. A weight of zero is written -inf (a flagged sample); NaN and +inf are
read as -inf too, as everywhere in trade-md (:mod:`trademd.weights`, the one home of the Kish ESS), so
the figures describe the weights the estimates actually use. Zero-weight samples count in n.
Everything is computed with log-sum-exp arithmetic, so adding any constant (even 1e4) to
all log weights changes nothing.

Three figures, each answering a different question:

- Kish ESS (sum w)^2 / sum w^2: how many equally weighted samples the weighted set is worth,
  if the weights are trustworthy. From a heavy-tailed weight distribution it can look fine
  while the largest weight has not been drawn yet.
- The Kish ESS of consecutive batches (min, max, standard error): how much the figure itself
  varies from draw to draw; a wide spread means the pooled ESS is not yet a stable estimate.
- Pareto k, the shape of a generalized Pareto distribution fitted to the largest weights,
  as in Pareto smoothed importance sampling (PSIS; Vehtari et al. 2015, JMLR 2024). It
  estimates how heavy the tail of the weight distribution is, including weights not yet
  drawn: k < 0.5 good, 0.5 <= k <= 0.7 usable (slower convergence), k > 0.7 unreliable
  (self-normalised estimates may be far off whatever the Kish ESS says).
"""

from dataclasses import dataclass
import math

import numpy as np
from scipy.special import logsumexp, softmax

from trademd.errors import TradeMDError
from trademd.weights import finite_log_weights, kish_ess

__all__ = ["WeightDiagnostics", "kish_relative_ess", "pareto_k", "weight_diagnostics"]

#: Fewest tail samples a Pareto fit is attempted with.
_MIN_TAIL = 5
#: Weakly informative prior of Vehtari et al. on k: PRIOR_WEIGHT pseudo-observations at 0.5.
_PRIOR_WEIGHT = 10.0
_PRIOR_K = 0.5


@dataclass(frozen=True)
class WeightDiagnostics:
    """Diagnostics of one set of importance weights (see the module docstring).

    Attributes:
        n: samples pooled, zero-weight ones included.
        ess: Kish ESS of all samples, (sum w)^2 / sum w^2 (samples, in [1, n]).
        relative_ess: ess / n, in (0, 1].
        batch_relative_ess: [n_batches] Kish relative ESS of each consecutive batch (sizes
            differ by at most one); 0.0 for a batch whose weights are all zero.
        batch_relative_ess_min, batch_relative_ess_max: extremes of those values.
        batch_relative_ess_sem: standard error of their mean, std (ddof=1) / sqrt(n_batches);
            nan for one batch.
        top10_weight_share: sum of the 10 largest normalised weights (1.0 when n <= 10).
        pareto_k: PSIS tail shape (see :func:`pareto_k`); nan where it cannot be estimated.
    """

    n: int
    ess: float
    relative_ess: float
    batch_relative_ess: tuple[float, ...]
    batch_relative_ess_min: float
    batch_relative_ess_max: float
    batch_relative_ess_sem: float
    top10_weight_share: float
    pareto_k: float


def _checked(log_weights: np.ndarray) -> np.ndarray:
    """float64 [n] copy with every non-finite entry set to -inf; raises on unusable input."""
    log_weights = np.asarray(log_weights, dtype=np.float64)
    if log_weights.ndim != 1 or log_weights.size == 0:
        raise TradeMDError(
            f"log weights must be a non-empty 1-D array, got shape {log_weights.shape}: "
            "pass one float array [n] of log importance weights"
        )
    log_weights = finite_log_weights(log_weights)
    if np.isneginf(log_weights).all():
        raise TradeMDError(
            "every importance weight is zero (all log weights -inf or NaN): no diagnostics "
            "exist; check the energies and the flagging of samples"
        )
    return log_weights


def _relative_ess(log_weights: np.ndarray) -> float:
    """Kish ESS / n of checked log weights [n]; 0.0 if all are -inf."""
    return kish_ess(log_weights) / log_weights.size


def kish_relative_ess(log_weights: np.ndarray) -> float:
    """Kish effective sample size relative to n: (sum w)^2 / (n sum w^2), in (0, 1].

    Args:
        log_weights: float64 [n] unnormalised log importance weights (-inf or NaN: zero
            weight, counted in n).

    Raises:
        TradeMDError: empty input, or every weight zero.
    """
    return _relative_ess(_checked(log_weights))


def _mean_log1m(b: np.ndarray, log_z: np.ndarray) -> np.ndarray:
    """mean_i log(1 - b_j z_i) for each j: b [J], log_z [M] = log z_i (-inf for z = 0),
    with every b_j z_i < 1; stays finite where z_i itself would overflow."""
    t = np.log(np.abs(b))[:, None] + log_z
    with np.errstate(invalid="ignore", over="ignore"):  # from the branch np.where discards
        terms = np.where(b[:, None] < 0, np.logaddexp(0.0, t), np.log1p(-np.exp(t)))
    return terms.mean(axis=1)


def _zhang_stephens_k(log_z: np.ndarray) -> float:
    """Generalized Pareto shape k of exceedances z > 0: the Zhang & Stephens (2009)
    posterior-mean estimator with the prior of Vehtari et al. (as ``gpdfit`` in PSIS).

    Args:
        log_z: [M] log exceedances, ascending, scaled so that the first-quartile one is 1
            (log 0; k does not depend on the scale). -inf (z = 0) is allowed below it.
    """
    m = log_z.size
    grid = 30 + int(math.sqrt(m))
    b = math.exp(-log_z[-1]) + (1 - np.sqrt(grid / (np.arange(1, grid + 1) - 0.5))) / 3
    k = _mean_log1m(b, log_z)
    profile_log_likelihood = m * (np.log(-b / k) - k - 1)
    b_mean = softmax(profile_log_likelihood) @ b
    k_mean = _mean_log1m(np.array([b_mean]), log_z)[0]
    return float((m * k_mean + _PRIOR_WEIGHT * _PRIOR_K) / (m + _PRIOR_WEIGHT))


def pareto_k(log_weights: np.ndarray) -> float:
    """PSIS Pareto k of importance weights: the shape of a generalized Pareto distribution
    fitted to the largest weights (Vehtari, Simpson, Gelman, Yao & Gabry, PSIS, 2015/2024).

    The M = ceil(min(n / 5, 3 sqrt(n))) largest weights (rounded up as in the R package loo;
    n counts zero weights) are taken as exceedances over the (M+1)-th largest, and k is
    fitted by the Zhang & Stephens (2009) estimator with the weakly informative prior of
    Vehtari et al. (10 pseudo-observations at k = 0.5), as PSIS does (not scipy's maximum
    likelihood fit: the 0.5 / 0.7 thresholds are calibrated for this estimator). It runs in
    log space, so a tail spanning beyond float64 range gives a large finite k.

    Reading: k < 0.5 good; 0.5 <= k <= 0.7 usable, with slower convergence; k > 0.7 the
    weight distribution is so heavy-tailed that self-normalised estimates (and the Kish ESS
    itself) are unreliable. (Vehtari et al. 2024 lower the 0.7 bound to 1 - 1 / log10(n)
    for n < 2200.)

    Args:
        log_weights: float64 [n] unnormalised log importance weights (-inf or NaN: zero).

    Returns:
        k (dimensionless); nan where it cannot be estimated: M < 5 (n <= 20), fewer than M + 1
        nonzero weights, or a quarter or more of the M largest weights tied with the (M+1)-th
        (equal weights, for example). nan is "unknown", not "good".

    Raises:
        TradeMDError: empty input, or every weight zero.
    """
    log_weights = _checked(log_weights)
    n = log_weights.size
    m = math.ceil(min(0.2 * n, 3 * math.sqrt(n)))
    if m < _MIN_TAIL:
        return math.nan
    top = np.sort(log_weights)[n - m - 1:]
    if np.isneginf(top[0]):
        return math.nan
    threshold, tail = top[0], top[1:]
    with np.errstate(divide="ignore"):  # log 0 for weights tied with the threshold
        log_exceedance = tail + np.log(-np.expm1(threshold - tail))
    log_quartile = log_exceedance[int(m / 4 + 0.5) - 1]
    if np.isneginf(log_quartile):
        return math.nan
    return _zhang_stephens_k(log_exceedance - log_quartile)


def weight_diagnostics(log_weights: np.ndarray, n_batches: int = 5) -> WeightDiagnostics:
    """Kish ESS pooled and per batch, top-10 weight share and Pareto k of one weight set.

    Args:
        log_weights: float64 [n] unnormalised log importance weights in draw order (batches
            are consecutive slices, so do not pass them sorted); -inf or NaN: zero weight,
            counted in n.
        n_batches: number of consecutive batches, 1 <= n_batches <= n.

    Raises:
        TradeMDError: empty input, every weight zero, or n_batches out of range.
    """
    log_weights = _checked(log_weights)
    n = log_weights.size
    if not 1 <= n_batches <= n:
        raise TradeMDError(f"n_batches must be between 1 and the {n} samples, got {n_batches}")
    relative_ess = _relative_ess(log_weights)
    batches = tuple(_relative_ess(part) for part in np.array_split(log_weights, n_batches))
    sem = float(np.std(batches, ddof=1) / math.sqrt(n_batches)) if n_batches > 1 else math.nan
    largest = np.sort(log_weights)[-10:]
    return WeightDiagnostics(
        n=n,
        ess=relative_ess * n,
        relative_ess=relative_ess,
        batch_relative_ess=batches,
        batch_relative_ess_min=min(batches),
        batch_relative_ess_max=max(batches),
        batch_relative_ess_sem=sem,
        top10_weight_share=float(np.exp(logsumexp(largest) - logsumexp(log_weights))),
        pareto_k=pareto_k(log_weights),
    )

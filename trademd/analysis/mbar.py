"""MBAR over a temperature ladder: the frames of every rung of a replica-exchange or
parallel-tempering run pooled into one estimate at any temperature of the ladder's range,
with its error from a block bootstrap over time.

Frame n (n = 1..N) has the potential energy U_n (kJ/mol) and was drawn at one of K
temperatures T_k (N_k frames at each); its reduced energy at T is u_n(T) = U_n / (k_B T).
MBAR (Shirts and Chodera, J. Chem. Phys. 129, 124105, 2008; solved by pymbar) finds the
reduced free energies f_k of the rungs, and the weight of frame n at any temperature T, a rung
or an unsampled state (N = 0) between them, is

    W_n(T) = exp(-u_n(T)) / sum_k N_k exp(f_k - u_n(T_k)),   normalised to sum 1.

pymbar's own errors assume uncorrelated frames. MD frames are correlated in time, and the
rungs of replica exchange are correlated with each other at equal times (they swap
configurations), so the error here is the standard deviation over bootstrap resamples of
contiguous blocks of saves, each block holding the frames of every rung at its saves.
"""

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
import math

import numpy as np

from trademd.errors import TradeMDError
from trademd.progress import quiet_loggers
from trademd.units import BOLTZMANN_KJ_MOL_K
from trademd.weights import kish_ess_of_normalised

__all__ = ["BOOTSTRAP_BLOCKS", "BOOTSTRAP_RESAMPLES", "mbar_weights", "time_blocks", "block_bootstrap",
           "region_free_energy", "LadderEstimate", "reweight_ladder"]

#: Defaults of the block bootstrap: blocks of consecutive saves, and resamples drawn.
BOOTSTRAP_BLOCKS = 20
BOOTSTRAP_RESAMPLES = 100


def mbar_weights(energy_kj_mol: np.ndarray, rung: np.ndarray, temperatures_k: Sequence[float],
                 target_temperature_k: float,
                 initial_free_energies: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """MBAR weights of the frames of a temperature ladder at one temperature.

    Args:
        energy_kj_mol: float [N], potential energy of each frame (kJ/mol).
        rung: int [N], index into ``temperatures_k`` of the temperature each frame was drawn at.
        temperatures_k: [K] the ladder (K), distinct.
        target_temperature_k: T (K): a rung, or any temperature (an unsampled state, reliable
            where the rungs' energy distributions overlap it: inside the ladder).
        initial_free_energies: the free energies a previous call returned for the same ladder
            and target, to start the solver from (a warm start for bootstrap resamples).

    Returns:
        (weights float64 [N] at T, summing to 1; reduced free energies float64 [K] or [K + 1]
        of the rungs and, when it is not a rung, the target, with f_0 = 0).
    """
    energy = np.asarray(energy_kj_mol, dtype=np.float64)
    rung = np.asarray(rung, dtype=np.int64)
    beta = 1.0 / (BOLTZMANN_KJ_MOL_K * np.asarray(temperatures_k, dtype=np.float64))
    if not np.all(np.isfinite(energy)):
        raise TradeMDError(f"{int(np.sum(~np.isfinite(energy)))} frames of the ladder have non-finite "
                           "energies: recompute them (trade-md energy FILE --write)")
    target = np.flatnonzero(np.abs(np.asarray(temperatures_k) - target_temperature_k) < 1e-6)
    if len(target):
        target_index = int(target[0])
    else:
        beta = np.append(beta, 1.0 / (BOLTZMANN_KJ_MOL_K * target_temperature_k))
        target_index = len(beta) - 1
    counts = np.bincount(rung, minlength=len(beta))
    with quiet_loggers("pymbar"):
        import pymbar

        mbar = pymbar.MBAR(beta[:, None] * energy[None, :], counts, initial_f_k=initial_free_energies,
                           x_kindices=rung)
    return mbar.weights()[:, target_index], np.asarray(mbar.f_k, dtype=np.float64)


def time_blocks(time: np.ndarray, n_blocks: int = BOOTSTRAP_BLOCKS) -> np.ndarray:
    """Block index int64 [N] of each frame: the distinct times (saves) cut into ``n_blocks``
    contiguous runs of nearly equal length, so that the frames of one save, every rung and
    every ladder, share a block (one block per save when there are fewer saves).

    Args:
        time: [N] the time (ps, or any increasing label) of each frame's save.
    """
    saves = np.unique(np.asarray(time), return_inverse=True)[1].ravel()
    n_saves = int(saves.max()) + 1
    return saves * min(n_blocks, n_saves) // n_saves


def block_bootstrap(blocks: np.ndarray, n_resamples: int = BOOTSTRAP_RESAMPLES,
                    seed: int = 0) -> Iterator[np.ndarray]:
    """Frame indices of bootstrap resamples: each draws as many blocks as there are, with
    replacement, and takes every frame of every block drawn (repeats repeated).

    Args:
        blocks: int [N] block index of each frame (:func:`time_blocks`).
        n_resamples: resamples yielded.
        seed: of the draws.
    """
    n_blocks = int(blocks.max()) + 1
    members = [np.flatnonzero(blocks == b) for b in range(n_blocks)]
    rng = np.random.default_rng(seed)
    for _ in range(n_resamples):
        yield np.concatenate([members[b] for b in rng.integers(n_blocks, size=n_blocks)])


def region_free_energy(in_region: np.ndarray, weights: np.ndarray) -> float:
    """-ln(P(A) / P(not A)) (kT) of a region A: the free energy of A relative to the rest,
    +inf when A holds no weight, -inf when it holds all.

    Args:
        in_region: bool [N], frames in A.
        weights: [N] normalised weights.
    """
    p = float(np.sum(weights[in_region]))
    if p <= 0 or p >= 1:
        return math.inf if p <= 0 else -math.inf
    return -math.log(p / (1 - p))


@dataclass
class LadderEstimate:
    """MBAR at one temperature from all rungs of a ladder, with a block-bootstrap error.

    Attributes:
        temperature_k: the temperature (K) of the estimate.
        weights: float64 [N], the frames' weights at that temperature (sum 1).
        delta_f_kt: free energy (kT) of the region against the rest, :func:`region_free_energy`.
        delta_f_kt_error: standard deviation of ``delta_f_kt`` over the resamples (kT; inf when
            some resample left the region empty or full).
        resampled_delta_f_kt: float64 [resamples], the bootstrap distribution.
        n_blocks: the blocks resampled.
    """

    temperature_k: float
    weights: np.ndarray
    delta_f_kt: float
    delta_f_kt_error: float
    resampled_delta_f_kt: np.ndarray
    n_blocks: int

    @property
    def effective_frames(self) -> float:
        """Kish effective sample size 1 / sum W_n^2 of the weights (independent frames
        assumed: an upper bound for correlated ones)."""
        return kish_ess_of_normalised(self.weights)


def reweight_ladder(energy_kj_mol: np.ndarray, rung: np.ndarray, time: np.ndarray,
                    temperatures_k: Sequence[float], target_temperature_k: float,
                    in_region: np.ndarray, n_blocks: int = BOOTSTRAP_BLOCKS,
                    n_resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0) -> LadderEstimate:
    """The MBAR weights of a ladder's frames at one temperature and the free energy of a
    region there, with its error from a block bootstrap over time.

    Args:
        energy_kj_mol: float [N], potential energy of each frame (kJ/mol).
        rung: int [N], index into ``temperatures_k`` of each frame's temperature.
        time: [N] time of each frame's save (ps): frames of one time share a bootstrap block
            across rungs.
        temperatures_k: [K] the ladder (K).
        target_temperature_k: T (K) of the estimate (a rung or between rungs).
        in_region: bool [N], the frames in the region (e.g. phi > 0).
        n_blocks: bootstrap blocks of consecutive saves.
        n_resamples: bootstrap resamples (at least 2).
        seed: of the resamples.
    """
    if n_resamples < 2:
        raise TradeMDError(f"the bootstrap needs at least 2 resamples, got {n_resamples}")
    energy = np.asarray(energy_kj_mol, dtype=np.float64)
    rung, in_region = np.asarray(rung), np.asarray(in_region, dtype=bool)
    weights, free_energies = mbar_weights(energy, rung, temperatures_k, target_temperature_k)
    blocks = time_blocks(time, n_blocks)
    resampled = np.array([
        region_free_energy(in_region[frames], mbar_weights(energy[frames], rung[frames], temperatures_k,
                                                           target_temperature_k, free_energies)[0])
        for frames in block_bootstrap(blocks, n_resamples, seed)])
    error = float(np.std(resampled, ddof=1)) if np.all(np.isfinite(resampled)) else math.inf
    return LadderEstimate(temperature_k=float(target_temperature_k), weights=weights,
                          delta_f_kt=region_free_energy(in_region, weights), delta_f_kt_error=error,
                          resampled_delta_f_kt=resampled, n_blocks=int(blocks.max()) + 1)

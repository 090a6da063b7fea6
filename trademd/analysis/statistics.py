"""Statistics of correlated time series: integrated autocorrelation time and effective
sample size of MD and replica-exchange observables.

The integrated autocorrelation time of a stationary series a_t is
tau = 1 + 2 sum_{t >= 1} rho(t), rho the normalised autocorrelation; n correlated frames
carry about n / tau independent samples. rho is estimated by FFT, averaged over independent
chains (replicas), and the sum is cut at Sokal's self-consistent window: the smallest M with
M >= c tau(M), c = 5 (Sokal, "Monte Carlo methods in statistical mechanics", 1997).
"""

import numpy as np

__all__ = ["integrated_autocorrelation_time", "chains_by_replica", "effective_sample_size"]


def integrated_autocorrelation_time(chains: np.ndarray, window_factor: float = 5.0) -> float:
    """tau_int (in frames) of one observable.

    Args:
        chains: [n] one series, or [n_chains, n] independent series of equal length.
        window_factor: Sokal's c.

    Returns:
        tau >= 1 in units of the frame interval; 1.0 for a constant series (no fluctuation
        to correlate).
    """
    chains = np.atleast_2d(np.asarray(chains, dtype=np.float64))
    n = chains.shape[1]
    centred = chains - chains.mean()
    variance = np.mean(centred ** 2)
    if n < 2 or variance <= 0:
        return 1.0
    spectrum = np.fft.rfft(centred, n=2 * n, axis=1)
    autocovariance = np.fft.irfft(spectrum * np.conj(spectrum), axis=1)[:, :n]
    autocovariance = autocovariance.sum(axis=0) / (chains.shape[0] * np.arange(n, 0, -1))
    rho = autocovariance / autocovariance[0]
    tau = 1.0 + 2.0 * np.cumsum(rho[1:])
    window = np.arange(1, n)
    inside = window >= window_factor * tau
    cut = int(np.argmax(inside)) if inside.any() else n - 2
    return float(max(1.0, tau[cut]))


def chains_by_replica(values: np.ndarray, replica: np.ndarray, time_ps: np.ndarray) -> np.ndarray:
    """Per-frame values of a trajectory file as time-ordered chains, one per replica (the
    ``replica`` and ``time_ps`` datasets), truncated to the shortest: [n_replicas, n]."""
    chains = []
    for index in np.unique(replica):
        mine = replica == index
        chains.append(values[mine][np.argsort(time_ps[mine], kind="stable")])
    length = min(len(c) for c in chains)
    return np.stack([c[:length] for c in chains])


def effective_sample_size(values: np.ndarray, replica: np.ndarray, time_ps: np.ndarray) -> float:
    """Frames / tau_int of an observable over all replicas of a trajectory."""
    chains = chains_by_replica(values, replica, time_ps)
    return float(len(values) / integrated_autocorrelation_time(chains))

"""The field's metrics, on the same footing for any method: samples against a reference.

- KL(reference || samples) and Jensen-Shannon divergence of 2-D phi/psi histograms
  (30 x 30 bins over [-pi, pi)^2, as in the TRADE paper; every bin gets ``EPSILON`` probability
  before renormalising so that empty bins stay finite), for weighted and unweighted samples;
- Wasserstein-1 distance of the energy distributions (kJ/mol);
- free-energy difference of the positive-phi region against the negative-phi (alpha/beta)
  region, in kT, with standard errors, for samples (from the Kish ESS) and reference (from
  frames / integrated autocorrelation time of the basin indicator, per replica);
- relative ESS and the fraction of flagged samples (from the samples file);
- optionally the NLL of the reference frames under the model at the reference temperature.
"""

import json
import math
from pathlib import Path

import numpy as np

from trademd.analysis.observables import basin_free_energy, phi_psi, phi_psi_histogram
from trademd.analysis.statistics import effective_sample_size
from trademd.errors import TradeMDError
from trademd.io.h5io import ensemble_temperatures, read_samples, read_trajectory
from trademd.systems import system_from_attrs

__all__ = ["metrics_path", "EPSILON", "METRIC_BINS", "kl_divergence", "js_divergence", "wasserstein_1",
           "evaluate_samples"]

#: Probability floor per bin of the histogram divergences, and bins per axis.
EPSILON = 1e-6
METRIC_BINS = 30


def _regularised(p: np.ndarray) -> np.ndarray:
    p = np.asarray(p, dtype=np.float64).ravel()
    p = p / p.sum() + EPSILON
    return p / p.sum()


def kl_divergence(p: np.ndarray, q: np.ndarray) -> float:
    """KL(p || q) = sum p log(p / q) of two histograms (any shape, regularised by EPSILON)."""
    p, q = _regularised(p), _regularised(q)
    return float(np.sum(p * np.log(p / q)))


def js_divergence(p: np.ndarray, q: np.ndarray) -> float:
    """Jensen-Shannon divergence (natural log, in [0, ln 2]) of two histograms."""
    p, q = _regularised(p), _regularised(q)
    m = 0.5 * (p + q)
    return float(0.5 * np.sum(p * np.log(p / m)) + 0.5 * np.sum(q * np.log(q / m)))


def wasserstein_1(x: np.ndarray, y: np.ndarray, x_weights: np.ndarray | None = None,
                  y_weights: np.ndarray | None = None) -> float:
    """W1 distance of two weighted 1-D samples, the integral of |F_x - F_y|
    (:func:`scipy.stats.wasserstein_distance`); non-finite values and zero weights are left out."""
    from scipy.stats import wasserstein_distance

    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    x_weights = np.full(len(x), 1.0) if x_weights is None else np.asarray(x_weights, dtype=np.float64)
    y_weights = np.full(len(y), 1.0) if y_weights is None else np.asarray(y_weights, dtype=np.float64)
    keep_x, keep_y = np.isfinite(x) & (x_weights > 0), np.isfinite(y) & (y_weights > 0)
    return float(wasserstein_distance(x[keep_x], y[keep_y], x_weights[keep_x], y_weights[keep_y]))


def metrics_path(samples_path: str | Path, temperature_k: float | None = None,
                 out: str | Path | None = None) -> Path:
    """Where ``trade-md evaluate`` writes its metrics JSON (the figure goes beside it as .png):
    ``out`` if given, else ``SAMPLES[_T<T>]_metrics.json`` next to the samples file."""
    if out is not None:
        return Path(out)
    tag = f"_T{temperature_k:g}" if temperature_k is not None else ""
    return Path(f"{Path(samples_path).with_suffix('')}{tag}_metrics.json")


def evaluate_samples(samples_path: str | Path, reference_path: str | Path,
                     temperature_k: float | None = None, model_path: str | Path | None = None,
                     out_json: str | Path | None = None, out_png: str | Path | None = None) -> dict:
    """Compare the samples at one temperature with a reference trajectory at that temperature.

    Returns the metrics (also written as JSON to ``out_json``); ``out_png`` gets the figure:
    Ramachandran plots side by side, phi marginals, energy histograms.
    """
    samples_file = read_samples(samples_path)
    ensembles = ensemble_temperatures(reference_path)
    reference = read_trajectory(reference_path, temperature_k if len(ensembles) > 1 else None)
    temperature_k = reference.temperature_k if temperature_k is None else float(temperature_k)
    if abs(reference.temperature_k - temperature_k) > 1e-6:
        raise TradeMDError(
            f"the reference was simulated at {reference.temperature_k:g} K, not {temperature_k:g} K: "
            "compare samples with a reference at the same temperature"
        )
    samples = samples_file.at(samples_path, temperature_k)
    molecule = system_from_attrs(reference.attrs, reference.topology_pdb)
    if molecule.phi_atoms is None:
        raise TradeMDError(f"system {molecule.name!r} has no phi/psi dihedrals to compare")
    ref_phi, ref_psi = phi_psi(molecule, reference.positions_nm)
    weights = samples.weights
    ref_hist, _ = phi_psi_histogram(ref_phi, ref_psi, bins=METRIC_BINS)
    weighted_hist, _ = phi_psi_histogram(samples.phi, samples.psi, weights, bins=METRIC_BINS)
    flagged = samples.flagged
    unweighted_hist, _ = phi_psi_histogram(samples.phi[~flagged], samples.psi[~flagged],
                                           bins=METRIC_BINS)
    delta_f, delta_f_error = basin_free_energy(samples.phi, weights, samples.ess)
    # reference frames are correlated: the error uses frames / tau_int of the basin indicator
    ref_effective = effective_sample_size((ref_phi > 0).astype(np.float64), reference.replica,
                                          reference.time_ps)
    ref_delta_f, ref_delta_f_error = basin_free_energy(ref_phi, ess=ref_effective)
    metrics = {
        "samples": str(samples_path), "reference": str(reference_path),
        "temperature_k": temperature_k, "n_samples": int(len(weights)),
        "n_reference_frames": reference.n_frames,
        "reference_effective_frames_positive_phi": ref_effective,
        "kl_phi_psi_weighted": kl_divergence(ref_hist, weighted_hist),
        "kl_phi_psi_unweighted": kl_divergence(ref_hist, unweighted_hist),
        "js_phi_psi_weighted": js_divergence(ref_hist, weighted_hist),
        "js_phi_psi_unweighted": js_divergence(ref_hist, unweighted_hist),
        "energy_w1_weighted_kj_mol": wasserstein_1(samples.energy_kj_mol, reference.energy_kj_mol, weights),
        "energy_w1_unweighted_kj_mol": wasserstein_1(samples.energy_kj_mol[~flagged], reference.energy_kj_mol),
        "relative_ess": samples.relative_ess,
        "fraction_flagged": float(np.mean(flagged)),
        "delta_f_positive_phi_kt": _finite_or_none(delta_f),
        "delta_f_positive_phi_kt_error": _finite_or_none(delta_f_error),
        "reference_delta_f_positive_phi_kt": _finite_or_none(ref_delta_f),
        "reference_delta_f_positive_phi_kt_error": _finite_or_none(ref_delta_f_error),
    }
    if model_path is not None:
        metrics["reference_nll"] = _reference_nll(model_path, reference, temperature_k)
    if out_json is not None:
        Path(out_json).write_text(json.dumps(metrics, indent=2))
    if out_png is not None:
        from trademd.analysis.plots import comparison_figure

        comparison_figure(out_png, (ref_phi, ref_psi), (samples.phi, samples.psi, weights),
                          reference.energy_kj_mol, samples.energy_kj_mol, temperature_k)
    return metrics


def _finite_or_none(value: float) -> float | None:
    return float(value) if math.isfinite(value) else None


def _reference_nll(model_path, reference, temperature_k: float) -> float:
    """Mean -log p(x|T) (nats) of the reference frames under the model, on the space of
    :mod:`trademd.flow.coordinates` (frames outside the model's support count as +inf)."""
    import torch

    from trademd.training.model_file import load_model

    model = load_model(model_path, platform="CPU")
    try:
        positions = torch.as_tensor(reference.positions_nm, dtype=torch.float64)
        features, log_det = model.target.coordinates(positions)
        z = torch.cat([features.torsions, features.bounded], dim=1).float()
        with torch.no_grad():
            log_p = model.flow.log_prob(z, temperature_k).double() + log_det
        return float(-log_p.mean())
    finally:
        model.close()

"""``trade-md sample`` as a library call: draw, weigh, histogram, plot and write."""

import math
from pathlib import Path

import numpy as np

from trademd.analysis.ess import weight_diagnostics
from trademd.io.h5io import group_name, write_samples
from trademd.platforms import torch_device
from trademd.analysis.plots import ramachandran_png
from trademd.io.provenance import provenance
from trademd.sample import basin_free_energy, draw_samples, load_model, phi_psi_histogram

__all__ = ["ESS_BATCHES", "sample_run", "summarise"]

#: Consecutive batches whose Kish ESS gives the spread of the pooled figure.
ESS_BATCHES = 5


def summarise(samples, path: Path) -> dict:
    """The one-line JSON summary of samples at one temperature: the Kish ESS pooled over all
    samples, that of each of ``ESS_BATCHES`` consecutive batches (its spread), the weight
    share of the 10 largest weights and the Pareto k of the weight tail
    (:mod:`trademd.analysis.ess`)."""
    finite = samples.weights > 0
    mean_energy = float(np.sum(samples.weights[finite] * samples.energy_kj_mol[finite]))
    diagnostics = weight_diagnostics(samples.log_weights, n_batches=ESS_BATCHES)
    summary = {
        "path": str(path),
        "temperature_k": samples.temperature_k,
        "n": samples.n,
        "ess": samples.ess,
        "relative_ess": samples.relative_ess,
        "relative_ess_batches": list(diagnostics.batch_relative_ess),
        "relative_ess_batch_min": diagnostics.batch_relative_ess_min,
        "relative_ess_batch_max": diagnostics.batch_relative_ess_max,
        "top10_weight_share": diagnostics.top10_weight_share,
        "pareto_k": diagnostics.pareto_k if math.isfinite(diagnostics.pareto_k) else None,
        "mean_energy_kj_mol": mean_energy,
        "fraction_flagged": samples.fraction_flagged,
    }
    if len(samples.phi):
        delta_f, error = basin_free_energy(samples.phi, samples.weights, samples.ess)
        summary["delta_f_positive_phi_kt"] = delta_f if math.isfinite(delta_f) else None
        summary["delta_f_positive_phi_kt_error"] = error if math.isfinite(error) else None
    return summary


def sample_run(model_path: str | Path, temperatures: list[float], n: int, out: str | Path,
               overwrite: bool = False, extrapolate: bool = False, device: str = "auto",
               platform: str = "auto", batch_size: int = 4096, command: str | None = None,
               show_progress: bool = True) -> list[dict]:
    """Sample a trained model at each temperature into one HDF5 file (a group per T) and a
    Ramachandran PNG per temperature next to it; returns the summaries."""
    out = Path(out)
    if out.exists() and not overwrite:
        from trademd.errors import TradeMDError

        raise TradeMDError(f"{str(out)!r} exists: pass --overwrite to replace it")
    model = load_model(model_path, device=torch_device(device), platform=platform)
    groups, summaries = [], []
    try:
        for temperature_k in temperatures:
            samples = draw_samples(model, temperature_k, n, batch_size, extrapolate, show_progress)
            summary = summarise(samples, out)
            png = ramachandran_png(samples.phi, samples.psi, samples.weights,
                                   f"{model.target.name} at {temperature_k:g} K, reweighted "
                                   f"(ESS {100 * samples.relative_ess:.1f} %)")
            suffix = "" if len(temperatures) == 1 else f"_{group_name(temperature_k)}"
            png_path = out.with_name(f"{out.stem}{suffix}_ramachandran.png")
            png_path.parent.mkdir(parents=True, exist_ok=True)
            png_path.write_bytes(png)
            weighted, edges = phi_psi_histogram(samples.phi, samples.psi, samples.weights)
            unweighted, _ = phi_psi_histogram(samples.phi, samples.psi)
            groups.append({
                "positions_nm": samples.positions_nm, "log_prob": samples.log_prob,
                "energy_kj_mol": samples.energy_kj_mol, "log_weights": samples.log_weights,
                "weights": samples.weights, "wrong_chirality": samples.wrong_chirality,
                "nonfinite_energy": samples.nonfinite_energy, "phi": samples.phi,
                "psi": samples.psi,
                "attrs": {k: v for k, v in summary.items() if k != "path" and v is not None},
                "histograms": {"phi_psi_weighted": weighted, "phi_psi_unweighted": unweighted,
                               "bin_edges_rad": edges},
                "ramachandran_png": png,
            })
            summaries.append(summary)
    finally:
        model.close()
    attrs = {
        "model": str(Path(model_path).resolve()),
        "system": model.target.name,
        "temperatures_k": [float(t) for t in temperatures],
        "trained_range_k": list(model.temperature_range),
        "reference_temperature_k": model.reference_temperature,
        **provenance(command),
    }
    write_samples(out, groups, attrs, model.target.molecule.pdb_text, overwrite=True)
    return summaries

"""Figures trade-md writes, drawn on :class:`matplotlib.figure.Figure` objects (no pyplot, so
the caller's backend, e.g. a notebook's, is left alone; no screen needed)."""

import csv
import io
import math
from pathlib import Path

from matplotlib.figure import Figure
import numpy as np

__all__ = ["plot_losses", "ramachandran_png", "ramachandran_grid_png", "comparison_figure"]


def plot_losses(metrics_csv: str | Path, out_png: str | Path) -> Path:
    """Plot every loss column of a training ``metrics.csv`` against the step."""
    with open(metrics_csv, newline="") as handle:
        rows = list(csv.DictReader(handle))
    steps = [float(r["step"]) for r in rows]
    columns = [c for c in ("nll_t0", "val_nll_t0", "refine_nll", "trade", "reverse_kl",
                           "trade_residual_rms", "continuity", "continuity_residual_rms")
               if any(r.get(c) not in (None, "") for r in rows)]
    figure = Figure(figsize=(10, 4))
    axes = figure.subplots(1, 2)
    for column in columns:
        values = [float(r[column]) if r.get(column) not in (None, "") else float("nan") for r in rows]
        axes[0 if "nll" in column else 1].plot(steps, values, label=column)
    for name in ("ess_tmin", "ess_t0", "ess_tmax"):
        if any(r.get(name) not in (None, "") for r in rows):
            axes[1].plot(steps, [float(r[name]) for r in rows], "--", label=name)
    axes[0].set_ylabel("negative log-likelihood")
    axes[1].set_yscale("symlog", linthresh=1.0)
    for axis in axes:
        axis.set_xlabel("step")
        if axis.get_legend_handles_labels()[0]:
            axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(out_png, dpi=100)
    return Path(out_png)


def ramachandran_png(phi, psi, weights=None, title: str = "", bins: int = 60) -> bytes:
    """A Ramachandran plot (free energy -ln p in kT of the phi/psi histogram) as PNG bytes."""


    figure = Figure(figsize=(4.5, 4))
    axis = figure.subplots()
    image = _draw_free_energy(axis, phi, psi, weights, bins)
    figure.colorbar(image, ax=axis, label="free energy / kT")
    axis.set_title(title, fontsize=9)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    return buffer.getvalue()


def ramachandran_grid_png(phi, psi, weights=None, title: str = "", bins: int = 60) -> bytes:
    """Ramachandran plots of every residue side by side (free energy -ln p in kT), as PNG
    bytes.

    Args:
        phi, psi: [n, residues] radians, residues in chain order.
        weights: [n] sample weights, or None.
    """
    residues = phi.shape[1]
    columns = min(residues, 3)
    rows = -(-residues // columns)
    figure = Figure(figsize=(4.2 * columns, 3.8 * rows), layout="constrained")
    axes = np.atleast_1d(figure.subplots(rows, columns)).ravel()
    for r, axis in enumerate(axes):
        if r >= residues:
            axis.set_visible(False)
            continue
        image = _draw_free_energy(axis, phi[:, r], psi[:, r], weights, bins)
        axis.set_title(f"residue {r + 1}", fontsize=9)
    figure.colorbar(image, ax=axes.tolist(), label="free energy / kT")
    figure.suptitle(title, fontsize=10)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    return buffer.getvalue()


def comparison_figure(out_png, reference_phi_psi, samples_phi_psi_weights, reference_energy,
                      samples_energy, temperature_k: float, reference_weights: np.ndarray | None = None,
                      reference_label: str = "reference") -> None:
    """The TRADE paper's Figure 3 layout: Ramachandran plots of reference and reweighted
    samples side by side, phi marginals, energy histograms.

    Args:
        reference_phi_psi: (phi, psi) [frames] (rad) of the reference.
        samples_phi_psi_weights: (phi, psi, normalised weights) [n] of the samples.
        reference_energy: [frames] (kJ/mol); samples_energy: [n] (kJ/mol).
        temperature_k: T (K), for the titles.
        reference_weights: [frames] weights of the reference frames (e.g. MBAR's over the rungs
            of a ladder); None: equal.
        reference_label: what the reference is called in titles and legends.
    """

    ref_phi, ref_psi = reference_phi_psi
    phi, psi, weights = samples_phi_psi_weights
    edges = np.linspace(-math.pi, math.pi, 61)
    figure = Figure(figsize=(17, 4))
    axes = figure.subplots(1, 4)
    for axis, (x, y, w, title) in zip(axes[:2], ((ref_phi, ref_psi, reference_weights, reference_label),
                                                 (phi, psi, weights, "samples, reweighted"))):
        _draw_free_energy(axis, x, y, w, len(edges) - 1)
        axis.set_title(f"{title}, {temperature_k:g} K")
    centres = 0.5 * (edges[1:] + edges[:-1])
    for x, w, label in ((ref_phi, reference_weights, reference_label), (phi, None, "samples"),
                        (phi, weights, "samples, reweighted")):
        density, _ = np.histogram(x, bins=edges, weights=w, density=True)
        with np.errstate(divide="ignore"):
            axes[2].plot(centres, -np.log(density), label=label)
    axes[2].set_xlabel("phi (rad)")
    axes[2].set_ylabel("free energy / kT")
    axes[2].legend(fontsize=8)
    finite = np.isfinite(samples_energy) & (weights > 0)
    low, high = np.percentile(reference_energy, [0.1, 99.9])
    bins = np.linspace(low - 20, high + 20, 80)
    for values, w, label in ((reference_energy, reference_weights, reference_label),
                             (samples_energy[finite], None, "samples"),
                             (samples_energy[finite], weights[finite], "samples, reweighted")):
        in_range = (values >= bins[0]) & (values <= bins[-1])
        mass = in_range.sum() if w is None else w[in_range].sum()
        if mass <= 0:  # nothing to draw: a density of an empty range is 0/0
            axes[3].plot([], [], label=f"{label} (outside the range)")
            continue
        axes[3].hist(values[in_range], bins=bins, density=True, histtype="step", label=label,
                     weights=None if w is None else w[in_range])
    axes[3].set_xlabel("energy (kJ/mol)")
    axes[3].legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(out_png, dpi=100)


def ess_against_temperature(out_png, series: dict) -> None:
    """Relative ESS (percent, log axis) against temperature, one line per method.

    Args:
        series: {label: (temperatures in K, relative ESS in [0, 1])}.
    """
    figure = Figure(figsize=(5, 3.5))
    axis = figure.subplots()
    for label, (temperatures_k, relative_ess) in series.items():
        axis.plot(temperatures_k, 100 * np.asarray(relative_ess), marker="o", label=label)
    axis.set_yscale("log")
    axis.set_xlabel("temperature (K)")
    axis.set_ylabel("relative ESS (%)")
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(out_png, dpi=100)


def _draw_free_energy(axis, phi, psi, weights, bins: int):
    """Draw -ln p (kT, minimum 0, capped at 8) of the phi/psi histogram on ``axis``; returns
    the mesh (for a colour bar). Empty bins stay blank."""
    edges = np.linspace(-math.pi, math.pi, bins + 1)
    histogram, _, _ = np.histogram2d(phi, psi, bins=[edges, edges], weights=weights, density=True)
    with np.errstate(divide="ignore"):
        free_energy = -np.log(histogram)
    finite = np.isfinite(free_energy)
    if finite.any():
        free_energy -= free_energy[finite].min()
    axis.set_xlabel("phi (rad)")
    axis.set_ylabel("psi (rad)")
    return axis.pcolormesh(edges, edges, free_energy.T, cmap="viridis", vmax=8)

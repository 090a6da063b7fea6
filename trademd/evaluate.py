"""The field's metrics, on the same footing for any method: samples against a reference.

- KL(reference || samples) and Jensen-Shannon divergence of 2-D phi/psi histograms
  (30 x 30 bins over [-pi, pi)^2, as in the TRADE paper; every bin gets ``EPSILON`` probability
  before renormalising so that empty bins stay finite), for weighted and unweighted samples;
- total variation 1/2 sum |p - q| of the same histograms (unregularised; the Ramachandran
  metric of the published Boltzmann-generator benchmarks);
- Wasserstein-1 distance of the energy distributions (kJ/mol);
- free-energy difference of the positive-phi region against the negative-phi (alpha/beta)
  region, in kT, with standard errors, for samples (from the Kish ESS) and reference (from
  frames / integrated autocorrelation time of the basin indicator, per replica);
- relative ESS and the fraction of flagged samples (from the samples file);
- optionally the NLL of the reference frames under the model at the reference temperature.

The reference is any file :func:`trademd.io.references.read_reference` reads: a trade-md
trajectory or replica-exchange file, an openmmtools multistate storage file, or a trajectory
mdtraj loads (energies recomputed with OpenMM for the samples' system). The metrics above use
the reference's ensemble at the temperature; a reference that holds a ladder of temperatures
(replica exchange, parallel tempering) is also pooled over all its rungs by MBAR
(:mod:`trademd.analysis.mbar`): the same divergences against the reweighted reference (keys
ending ``_mbar``) and its positive-phi free energy with a block-bootstrap error
(``reference_mbar_*``), also at temperatures between the rungs, where only these exist.
"""

import json
import math
from pathlib import Path

import numpy as np

from trademd.analysis.mbar import BOOTSTRAP_BLOCKS, BOOTSTRAP_RESAMPLES, reweight_ladder
from trademd.analysis.observables import backbone_angles, basin_free_energy, phi_psi, phi_psi_histogram
from trademd.analysis.statistics import effective_sample_size
from trademd.errors import TradeMDError
from trademd.io.samples_file import SamplesFile, TemperatureSamples, read_samples
from trademd.io.references import ReferenceEnsembles, read_reference
from trademd.recompute import frame_energies
from trademd.systems import BUILTIN_SYSTEMS, MolecularSystem, system_from_attrs, system_from_record

__all__ = ["metrics_path", "EPSILON", "METRIC_BINS", "kl_divergence", "js_divergence", "total_variation",
           "wasserstein_1", "evaluate_samples", "load_reference", "samples_system", "summary_lines"]

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


def total_variation(p: np.ndarray, q: np.ndarray) -> float:
    """Total variation distance 1/2 sum |p - q| (in [0, 1]) of two histograms of any shape,
    each normalised to sum 1 (no regularisation)."""
    p = np.asarray(p, dtype=np.float64).ravel()
    q = np.asarray(q, dtype=np.float64).ravel()
    return float(0.5 * np.abs(p / p.sum() - q / q.sum()).sum())


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
                     out_json: str | Path | None = None, out_png: str | Path | None = None,
                     topology_path: str | Path | None = None, platform: str = "auto",
                     bootstrap_blocks: int = BOOTSTRAP_BLOCKS,
                     bootstrap_resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0) -> dict:
    """Compare the samples at one temperature with a reference ensemble at that temperature.

    Args:
        samples_path: a samples file (``trade-md sample``).
        reference_path: a reference in any format :func:`load_reference` reads.
        temperature_k: T (K); default: the reference's only temperature. A reference ladder
            takes any T in its range (between rungs only the MBAR metrics exist).
        model_path: ``model.pt``, for the NLL of the reference frames.
        out_json, out_png: where the metrics and the figure (Ramachandran plots side by side,
            phi marginals, energy histograms) go; None: not written.
        topology_path: the atoms of a reference trajectory mdtraj reads.
        platform: OpenMM platform of energies recomputed for the reference.
        bootstrap_blocks, bootstrap_resamples, seed: of the block bootstrap of a ladder's MBAR
            free energy.

    Returns:
        The metrics (module docstring; docs/formats.md lists the keys).
    """
    samples_file = read_samples(samples_path)
    reference, molecule = load_reference(reference_path, samples_file, temperature_k, topology_path,
                                         platform)
    temperature_k = reference.target_temperature(temperature_k)
    samples = samples_file.at(samples_path, temperature_k)
    if molecule.phi_atoms is None:
        raise TradeMDError(f"system {molecule.name!r} has no phi/psi dihedrals to compare")
    delta_f, delta_f_error = basin_free_energy(samples.phi, samples.weights, samples.ess)
    metrics = {
        "samples": str(samples_path), "reference": str(reference_path),
        "reference_format": reference.kind,
        "reference_energies": "stored" if reference.energies_stored else "recomputed",
        "temperature_k": temperature_k, "n_samples": samples.n,
        "relative_ess": samples.relative_ess,
        "fraction_flagged": samples.fraction_flagged,
        "delta_f_positive_phi_kt": _finite_or_none(delta_f),
        "delta_f_positive_phi_kt_error": _finite_or_none(delta_f_error),
    }
    angles = [phi_psi(molecule, e.positions_nm) for e in reference.ensembles]
    at = reference.rung_index(temperature_k)
    if at is not None:
        rung, (ref_phi, ref_psi) = reference.ensembles[at], angles[at]
        # reference frames are correlated: the error uses frames / tau_int of the basin indicator
        ref_effective = effective_sample_size((ref_phi > 0).astype(np.float64), rung.replica, rung.time_ps)
        ref_delta_f, ref_delta_f_error = basin_free_energy(ref_phi, ess=ref_effective)
        metrics.update({
            "n_reference_frames": rung.n_frames,
            "reference_effective_frames_positive_phi": ref_effective,
            **_divergences(ref_phi, ref_psi, rung.energy_kj_mol, None, samples),
            "reference_delta_f_positive_phi_kt": _finite_or_none(ref_delta_f),
            "reference_delta_f_positive_phi_kt_error": _finite_or_none(ref_delta_f_error),
        })
        shown = (ref_phi, ref_psi, rung.energy_kj_mol, rung.positions_nm, None, "reference")
    if len(reference.ensembles) > 1:
        all_phi = np.concatenate([phi for phi, _ in angles])
        all_psi = np.concatenate([psi for _, psi in angles])
        energy = np.concatenate([e.energy_kj_mol for e in reference.ensembles])
        estimate = reweight_ladder(
            energy, np.repeat(np.arange(len(angles)), [e.n_frames for e in reference.ensembles]),
            np.concatenate([e.time_ps for e in reference.ensembles]), reference.temperatures_k,
            temperature_k, all_phi > 0, bootstrap_blocks, bootstrap_resamples, seed)
        metrics.update({
            "reference_mbar_rungs": reference.temperatures_k,
            "reference_mbar_frames": int(len(energy)),
            "reference_mbar_effective_frames": estimate.effective_frames,
            **_divergences(all_phi, all_psi, energy, estimate.weights, samples, "_mbar"),
            "reference_mbar_delta_f_positive_phi_kt": _finite_or_none(estimate.delta_f_kt),
            "reference_mbar_delta_f_positive_phi_kt_error": _finite_or_none(estimate.delta_f_kt_error),
            "reference_mbar_bootstrap_blocks": estimate.n_blocks,
            "reference_mbar_bootstrap_resamples": bootstrap_resamples,
        })
        if at is None:
            positions = np.concatenate([e.positions_nm for e in reference.ensembles])
            shown = (all_phi, all_psi, energy, positions, estimate.weights, "reference (MBAR)")
    ref_phi, ref_psi, ref_energy, ref_positions, ref_weights, label = shown
    if len(molecule.backbone_dihedrals) > 1:
        metrics.update(_residue_metrics(molecule, samples, ref_positions, ref_weights, label))
    if model_path is not None:
        key = "reference_nll" if ref_weights is None else "reference_mbar_nll"
        metrics[key] = _reference_nll(model_path, ref_positions, temperature_k, ref_weights)
    if out_json is not None:
        Path(out_json).write_text(json.dumps(metrics, indent=2))
    if out_png is not None:
        from trademd.analysis.plots import comparison_figure

        comparison_figure(out_png, (ref_phi, ref_psi), (samples.phi, samples.psi, samples.weights),
                          ref_energy, samples.energy_kj_mol, temperature_k, ref_weights, label)
    return metrics


def load_reference(reference_path: str | Path, samples_file: SamplesFile,
                   temperature_k: float | None = None, topology_path: str | Path | None = None,
                   platform: str = "auto") -> tuple[ReferenceEnsembles, MolecularSystem]:
    """A reference in any accepted format, with potential energies for the system compared.

    trade-md files record their system and energies. For the other formats the system is the
    samples': energies a trajectory mdtraj reads lacks are computed with OpenMM, and those an
    openmmtools storage holds are checked against it on a few frames (they must be the same
    Hamiltonian to compare energies).

    Args:
        reference_path: see :func:`trademd.io.references.read_reference`.
        samples_file: the samples compared (their system, for references that record none).
        temperature_k: the temperature (K) of a trajectory mdtraj reads.
        topology_path: the atoms of a trajectory mdtraj reads.
        platform: OpenMM platform of the energies computed.

    Returns:
        (the reference, every ensemble's ``energy_kj_mol`` [frames] finite (kJ/mol); the system).
    """
    reference = read_reference(reference_path, temperature_k, topology_path)
    first = reference.ensembles[0]
    molecule = (system_from_attrs(first.attrs, first.topology_pdb) if reference.records_system
                else samples_system(samples_file))
    atoms = first.positions_nm.shape[1]
    elements = [atom.element.symbol for atom in molecule.mdtraj_topology().atoms]
    if atoms != molecule.n_atoms or first.attrs.get("elements", elements) != elements:
        raise TradeMDError(
            f"the atoms of {str(reference_path)!r} ({atoms}) are not those of the samples' system "
            f"{molecule.name!r} ({molecule.n_atoms}, in its order): give a reference of the same "
            "molecule (and a --topology with its atoms)")
    if reference.energies_stored and not reference.records_system:
        _check_stored_energies(reference, molecule, platform)
    if not reference.energies_stored:
        for ensemble in reference.ensembles:
            energies, n_overflow, _ = frame_energies(molecule, ensemble.positions_nm, platform)
            if n_overflow:
                raise TradeMDError(
                    f"{n_overflow} frames of {str(reference_path)!r} have non-finite energies in the "
                    f"samples' system {molecule.name!r}: the frames are broken or their atoms are in "
                    "another order (check --topology)")
            ensemble.energy_kj_mol = energies
    return reference, molecule


def samples_system(samples_file: SamplesFile) -> MolecularSystem:
    """The system a samples file records: its ``system`` and ``forcefield_files`` attributes
    and its topology."""
    name = str(samples_file.attrs.get("system", ""))
    forcefield = json.loads(samples_file.attrs.get("forcefield_files", "[]"))
    if name not in BUILTIN_SYSTEMS and not forcefield:
        raise TradeMDError(
            f"the samples file records no force field for its system {name!r} (it predates trade-md "
            "recording one): sample again to compare it with a reference that is not a trade-md file")
    return system_from_record(name, samples_file.topology_pdb, forcefield)


#: Frames of a foreign reference whose stored energies are checked against the samples' system,
#: and the difference allowed (kJ/mol, plus this much relative to |U|: float32 positions).
_CHECKED_FRAMES, _ENERGY_TOLERANCE_KJ_MOL, _ENERGY_TOLERANCE_RELATIVE = 3, 0.5, 1e-4


def _check_stored_energies(reference: ReferenceEnsembles, molecule: MolecularSystem,
                           platform: str) -> None:
    """Refuse a reference whose stored energies are not those of ``molecule`` (another force
    field or solvent): its energies and MBAR weights would not be comparable."""
    ensemble = reference.ensembles[0]
    stored = ensemble.energy_kj_mol[:_CHECKED_FRAMES]
    recomputed, _, _ = frame_energies(molecule, ensemble.positions_nm[:_CHECKED_FRAMES], platform)
    difference = np.abs(recomputed - stored)
    if not np.all(difference <= _ENERGY_TOLERANCE_KJ_MOL + _ENERGY_TOLERANCE_RELATIVE * np.abs(stored)):
        raise TradeMDError(
            f"the energies stored in {str(reference.path)!r} differ from those of the samples' system "
            f"{molecule.name!r} by up to {np.nanmax(difference):.3g} kJ/mol: the reference simulated "
            "another system (force field, solvent); compare samples of the same system")


def _residue_metrics(molecule, samples: TemperatureSamples, reference_positions_nm: np.ndarray,
                     reference_weights: np.ndarray | None, label: str) -> dict:
    """Every residue's phi/psi agreement (chain order): KL(reference || samples), JS and total
    variation of the reweighted samples' histograms, and the positive-phi free energy (kT) of samples and
    reference; against the reference frames [frames, atoms, 3] (nm) with weights (None:
    equal)."""
    phi, psi = ((samples.phi_residues, samples.psi_residues) if samples.phi_residues.size
                else backbone_angles(molecule, samples.positions_nm))  # files from before they were stored
    reference_phi, reference_psi = backbone_angles(molecule, reference_positions_nm)
    kl, js, tv, delta_f, reference_delta_f = [], [], [], [], []
    for r in range(phi.shape[1]):
        reference_hist, _ = phi_psi_histogram(reference_phi[:, r], reference_psi[:, r], reference_weights,
                                              bins=METRIC_BINS)
        weighted_hist, _ = phi_psi_histogram(phi[:, r], psi[:, r], samples.weights, bins=METRIC_BINS)
        kl.append(kl_divergence(reference_hist, weighted_hist))
        js.append(js_divergence(reference_hist, weighted_hist))
        tv.append(total_variation(reference_hist, weighted_hist))
        delta_f.append(_finite_or_none(basin_free_energy(phi[:, r], samples.weights, samples.ess)[0]))
        reference_delta_f.append(_finite_or_none(basin_free_energy(reference_phi[:, r], reference_weights)[0]))
    return {"residue_reference": label, "kl_phi_psi_weighted_residues": kl,
            "js_phi_psi_weighted_residues": js, "tv_phi_psi_weighted_residues": tv,
            "delta_f_positive_phi_kt_residues": delta_f,
            "reference_delta_f_positive_phi_kt_residues": reference_delta_f}


def _divergences(reference_phi: np.ndarray, reference_psi: np.ndarray, reference_energy: np.ndarray,
                 reference_weights: np.ndarray | None, samples: TemperatureSamples, tag: str = "") -> dict:
    """KL and JS of the phi/psi histograms and W1 of the energies, samples weighted and
    unweighted (flagged samples left out), against reference frames [frames] (rad, rad,
    kJ/mol) with ``reference_weights`` [frames] (None: equal); ``tag`` ends each key's name
    (before the unit)."""
    flagged = samples.flagged
    reference_hist, _ = phi_psi_histogram(reference_phi, reference_psi, reference_weights, bins=METRIC_BINS)
    weighted_hist, _ = phi_psi_histogram(samples.phi, samples.psi, samples.weights, bins=METRIC_BINS)
    unweighted_hist, _ = phi_psi_histogram(samples.phi[~flagged], samples.psi[~flagged], bins=METRIC_BINS)
    return {
        f"kl_phi_psi_weighted{tag}": kl_divergence(reference_hist, weighted_hist),
        f"kl_phi_psi_unweighted{tag}": kl_divergence(reference_hist, unweighted_hist),
        f"js_phi_psi_weighted{tag}": js_divergence(reference_hist, weighted_hist),
        f"js_phi_psi_unweighted{tag}": js_divergence(reference_hist, unweighted_hist),
        f"tv_phi_psi_weighted{tag}": total_variation(reference_hist, weighted_hist),
        f"tv_phi_psi_unweighted{tag}": total_variation(reference_hist, unweighted_hist),
        f"energy_w1_weighted{tag}_kj_mol": wasserstein_1(samples.energy_kj_mol, reference_energy,
                                                         samples.weights, reference_weights),
        f"energy_w1_unweighted{tag}_kj_mol": wasserstein_1(samples.energy_kj_mol[~flagged], reference_energy,
                                                           None, reference_weights),
    }


def summary_lines(metrics: dict) -> list[str]:
    """The metrics in a few lines for the terminal: the divergences against the reference
    (its ensemble at T, and its MBAR pooling of a ladder), and the positive-phi free energy of
    the samples next to the reference's, each with its error."""
    lines = [f"{metrics['temperature_k']:g} K: {metrics['n_samples']} samples, relative ESS "
             f"{100 * metrics['relative_ess']:.1f} %, {100 * metrics['fraction_flagged']:.1f} % flagged; "
             f"reference {metrics['reference']} ({metrics['reference_format']}, energies "
             f"{metrics['reference_energies']})"]
    against = [("", f"reference at {metrics['temperature_k']:g} K ({metrics.get('n_reference_frames')} frames)")]
    if "reference_mbar_rungs" in metrics:
        rungs = ", ".join(f"{t:g}" for t in metrics["reference_mbar_rungs"])
        against.append(("_mbar", f"reference MBAR over {rungs} K ({metrics['reference_mbar_frames']} frames)"))
    for tag, label in against:
        if f"kl_phi_psi_weighted{tag}" in metrics:
            lines.append(
                f"vs {label}: KL phi/psi {metrics[f'kl_phi_psi_weighted{tag}']:.4f} reweighted, "
                f"{metrics[f'kl_phi_psi_unweighted{tag}']:.4f} unweighted; JS "
                f"{metrics[f'js_phi_psi_weighted{tag}']:.4f}, {metrics[f'js_phi_psi_unweighted{tag}']:.4f}; TV "
                f"{metrics[f'tv_phi_psi_weighted{tag}']:.4f}, {metrics[f'tv_phi_psi_unweighted{tag}']:.4f}; "
                f"energy W1 {metrics[f'energy_w1_weighted{tag}_kj_mol']:.3f}, "
                f"{metrics[f'energy_w1_unweighted{tag}_kj_mol']:.3f} kJ/mol")
    free_energies = [f"samples {_with_error(metrics, 'delta_f_positive_phi_kt')}"]
    if "reference_delta_f_positive_phi_kt" in metrics:
        free_energies.append(f"reference {_with_error(metrics, 'reference_delta_f_positive_phi_kt')} "
                             f"({metrics['reference_effective_frames_positive_phi']:.0f} effective frames)")
    if "reference_mbar_delta_f_positive_phi_kt" in metrics:
        free_energies.append(f"reference MBAR {_with_error(metrics, 'reference_mbar_delta_f_positive_phi_kt')} "
                             f"(block bootstrap, {metrics['reference_mbar_bootstrap_blocks']} blocks x "
                             f"{metrics['reference_mbar_bootstrap_resamples']})")
    lines.append("dF(phi>0 vs phi<0) in kT: " + "; ".join(free_energies))
    if "js_phi_psi_weighted_residues" in metrics:
        show = lambda v: "n/a" if v is None else f"{v:.2f}"
        per_residue = zip(metrics["js_phi_psi_weighted_residues"], metrics["delta_f_positive_phi_kt_residues"],
                          metrics["reference_delta_f_positive_phi_kt_residues"])
        lines.append(f"per residue vs {metrics['residue_reference']} (JS reweighted; dF(phi>0) samples / "
                     "reference, kT): " + "; ".join(f"{r + 1}: {js:.4f}, {show(f)} / {show(ref)}"
                                                   for r, (js, f, ref) in enumerate(per_residue)))
    for key, label in (("reference_nll", "reference"), ("reference_mbar_nll", "reference (MBAR-weighted)")):
        if key in metrics:
            lines.append(f"NLL of the {label} frames under the model: {metrics[key]:.3f} nats")
    return lines


def _with_error(metrics: dict, key: str) -> str:
    """``value +- error`` of a metric and its ``_error`` (``n/a`` for None: infinite)."""
    value, error = metrics[key], metrics[f"{key}_error"]
    return ("n/a" if value is None else f"{value:.3f}") + ("" if error is None else f" +- {error:.3f}")


def _finite_or_none(value: float) -> float | None:
    return float(value) if math.isfinite(value) else None


def _reference_nll(model_path, positions_nm: np.ndarray, temperature_k: float,
                   weights: np.ndarray | None = None) -> float:
    """Mean -log p(x|T) (nats) of reference frames [frames, atoms, 3] (nm) under the model,
    on the space of :mod:`trademd.flow.coordinates`, weighted by ``weights`` [frames] (sum 1;
    None: equal). Frames outside the model's support count as +inf."""
    import torch

    from trademd.training.model_file import load_model

    model = load_model(model_path, platform="CPU")
    try:
        positions = torch.as_tensor(positions_nm, dtype=torch.float64)
        features, log_det = model.target.coordinates(positions)
        z = torch.cat([features.torsions, features.bounded], dim=1).float()
        with torch.no_grad():
            log_p = model.flow.log_prob(z, temperature_k).double() + log_det
        if weights is None:
            return float(-log_p.mean())
        return float(-(torch.as_tensor(weights, dtype=torch.float64) * log_p).sum())
    finally:
        model.close()

"""Observables of molecular ensembles: backbone dihedrals, Ramachandran histograms and the
free energy of the positive-phi basin (radians, kT)."""

import math

import numpy as np

from trademd.weights import kish_ess_of_normalised

__all__ = ["PHI_PSI_BINS", "phi_psi", "backbone_angles", "phi_psi_histogram", "basin_free_energy"]

#: Bins per axis of the phi/psi histograms stored with samples.
PHI_PSI_BINS = 60


def phi_psi(molecule, positions_nm: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """phi and psi (radians) of the first residue, float64 [n] each; empty arrays if the
    system has no backbone."""
    phi, psi = backbone_angles(molecule, positions_nm)
    if phi.shape[1] == 0:
        return np.zeros(0), np.zeros(0)
    return phi[:, 0], psi[:, 0]


def backbone_angles(molecule, positions_nm: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """phi and psi (radians, by mdtraj) of every residue of ``molecule.backbone_dihedrals``,
    in chain order: float64 [n, residues] each ([n, 0] for a system without a backbone).

    Args:
        molecule: a :class:`~trademd.systems.MolecularSystem`.
        positions_nm: [n, atoms, 3] (nm).
    """
    import mdtraj

    n = len(positions_nm)
    rows = [atoms for pair in molecule.backbone_dihedrals for atoms in pair]
    if not rows:
        return np.zeros((n, 0)), np.zeros((n, 0))
    trajectory = mdtraj.Trajectory(positions_nm, molecule.mdtraj_topology())
    angles = mdtraj.compute_dihedrals(trajectory, rows).astype(np.float64)
    return angles[:, 0::2], angles[:, 1::2]


def phi_psi_histogram(phi: np.ndarray, psi: np.ndarray, weights: np.ndarray | None = None,
                      bins: int = PHI_PSI_BINS) -> tuple[np.ndarray, np.ndarray]:
    """Normalised 2-D histogram [bins, bins] (probabilities summing to 1) over [-pi, pi)^2 and
    its bin edges [bins + 1] (the same for both axes)."""
    edges = np.linspace(-math.pi, math.pi, bins + 1)
    histogram, _, _ = np.histogram2d(phi, psi, bins=[edges, edges], weights=weights)
    total = histogram.sum()
    return (histogram / total if total > 0 else histogram), edges


def basin_free_energy(phi: np.ndarray, weights: np.ndarray | None = None,
                      ess: float | None = None) -> tuple[float, float]:
    """Free-energy difference (in kT) of the positive-phi region relative to the negative-phi
    (alpha/beta) region, -ln(P(phi > 0) / P(phi < 0)), and its standard error from the
    binomial variance with ``ess`` effective samples (default: len(phi) or the Kish ESS of the
    weights). Where one of the two regions holds less than one effective sample (p ess < 1) the
    value is one sample's weight, not a measurement: its error is inf (reported as n/a)."""
    if weights is None:
        weights = np.full(len(phi), 1.0 / len(phi))
        ess = ess or float(len(phi))
    else:
        weights = weights / weights.sum()
        ess = ess or kish_ess_of_normalised(weights)
    p_positive = float(weights[phi > 0].sum())
    if p_positive <= 0 or p_positive >= 1:
        return (math.inf if p_positive <= 0 else -math.inf), math.inf
    delta_f = -math.log(p_positive / (1 - p_positive))
    if p_positive * ess < 1 or (1 - p_positive) * ess < 1:
        return delta_f, math.inf
    error = math.sqrt(p_positive * (1 - p_positive) / ess) / (p_positive * (1 - p_positive))
    return delta_f, error

"""Writing trade-md trajectories and samples as standard files through mdtraj (or NumPy)."""

import io
from pathlib import Path

import numpy as np

from trademd.errors import TradeMDError
from trademd.io.samples_file import read_samples
from trademd.io.schema import SAMPLES_FORMAT, file_format
from trademd.io.trajectory_file import read_trajectory

__all__ = ["EXPORT_FORMATS", "export_file"]

EXPORT_FORMATS = ("dcd", "xtc", "pdb", "npz")


def export_file(path: str | Path, fmt: str, out: str | Path | None = None,
                temperature_k: float | None = None, resample: int | None = None,
                seed: int = 0) -> Path:
    """Write the frames of a trajectory or samples file as ``fmt`` (dcd, xtc, pdb or npz).

    For a samples file, ``temperature_k`` picks the group (default: its only one) and
    ``resample`` draws that many frames with probability proportional to the importance
    weights (an unweighted ensemble); without it every sample is written and npz carries the
    weights. For dcd and xtc a PDB of the first frame is written beside, as the topology.
    Returns the path written (default: ``path`` with the new suffix).
    """
    if fmt not in EXPORT_FORMATS:
        raise TradeMDError(f"unknown export format {fmt!r}: choose one of {list(EXPORT_FORMATS)}")
    positions, weights, topology_pdb, extra = _frames(Path(path), temperature_k)
    if resample is not None:
        if weights is None:
            raise TradeMDError("--resample needs a samples file (importance weights)")
        if resample < 1:
            raise TradeMDError("--resample must be at least 1")
        chosen = np.random.default_rng(seed).choice(len(weights), size=resample, p=weights)
        positions, weights = positions[chosen], None
        extra = {k: v[chosen] for k, v in extra.items()}
    out = Path(out) if out is not None else Path(path).with_suffix(f".{fmt}")
    out.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "npz":
        arrays = {"positions_nm": positions, **extra}
        if weights is not None:
            arrays["weights"] = weights
        np.savez(out, **arrays)
        return out
    import mdtraj
    import openmm.app as app

    topology = mdtraj.Topology.from_openmm(app.PDBFile(io.StringIO(topology_pdb)).topology)
    trajectory = mdtraj.Trajectory(positions, topology)
    trajectory.save(str(out), force_overwrite=True)
    if fmt != "pdb":
        trajectory[0].save_pdb(str(out.with_suffix(".pdb")))
    return out


def _frames(path: Path, temperature_k: float | None):
    """(positions [n, atoms, 3], normalised weights or None, topology PDB, per-frame extras)."""
    if file_format(path) != SAMPLES_FORMAT:
        trajectory = read_trajectory(path, temperature_k)  # also the one-line errors for wrong files
        extra = {"energy_kj_mol": trajectory.energy_kj_mol, "time_ps": trajectory.time_ps}
        return trajectory.positions_nm, None, trajectory.topology_pdb, extra
    samples_file = read_samples(path)
    samples = samples_file.at(path, temperature_k)
    extra = {"energy_kj_mol": samples.energy_kj_mol, "phi": samples.phi, "psi": samples.psi}
    return samples.positions_nm, samples.weights, samples_file.topology_pdb, extra

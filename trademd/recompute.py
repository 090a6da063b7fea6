"""``trade-md energy`` as a library call: recompute the stored energies of a trajectory file
(a check of the file and of the energy bridge), and optionally write them back."""

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from trademd.energy.bridge import EnergyBridge
from trademd.errors import TradeMDError
from trademd.io.trajectory_file import read_trajectory, write_energies
from trademd.systems import MolecularSystem, system_from_attrs

__all__ = ["EnergyCheck", "frame_energies", "recompute_trajectory_energies"]


@dataclass
class EnergyCheck:
    """What ``trade-md energy`` found: energies recomputed for every frame of a file.

    Attributes:
        n_frames: frames in the file.
        max_abs_difference_kj_mol: max |recomputed - stored| (kJ/mol).
        mean_energy_kj_mol: mean recomputed energy (kJ/mol).
        n_overflow: frames whose recomputed energy is not finite.
        written: whether the recomputed energies replaced the stored ones.
        bridge: a description of how they were computed.
    """

    n_frames: int
    max_abs_difference_kj_mol: float
    mean_energy_kj_mol: float
    n_overflow: int
    written: bool
    bridge: str


def frame_energies(molecule: MolecularSystem, positions_nm: np.ndarray, platform: str = "auto",
                   batch: int = 4096) -> tuple[np.ndarray, int, str]:
    """Potential energies of frames of one molecule, computed by OpenMM through the
    :class:`EnergyBridge`.

    Args:
        molecule: the system.
        positions_nm: [frames, atoms, 3] (nm), at least one frame.
        platform: OpenMM platform (see :class:`EnergyBridge`).
        batch: frames evaluated per call.

    Returns:
        (energy_kj_mol float64 [frames], +inf where it overflowed; the number of overflows; a
        description of how they were computed).
    """
    with EnergyBridge(molecule, platform=platform) as bridge:
        energies = np.concatenate([
            bridge.evaluate_numpy(positions_nm[start:start + batch])[0]
            for start in range(0, len(positions_nm), batch)
        ])
        return energies, bridge.n_overflow, repr(bridge)


def recompute_trajectory_energies(path: str | Path, platform: str = "auto", write: bool = False,
                                  batch: int = 4096, temperature_k: float | None = None) -> EnergyCheck:
    """Recompute the potential energy of every frame of a ``trade-md simulate`` file.

    Args:
        path: the trajectory (or replica-exchange) file.
        temperature_k: the ensemble of a replica-exchange file (K).
        platform: OpenMM platform (see :class:`EnergyBridge`).
        write: replace the stored ``energy_kj_mol`` with the recomputed values.
        batch: frames evaluated per call.
    """
    trajectory = read_trajectory(path, temperature_k, require_finite_energies=False)
    if trajectory.n_frames == 0:
        raise TradeMDError(f"{str(path)!r} holds no frames: nothing to recompute")
    try:
        molecule = system_from_attrs(trajectory.attrs, trajectory.topology_pdb)
    except (KeyError, ValueError, TypeError):
        raise TradeMDError(
            f"{str(path)!r} does not record its system and force field (attributes 'system', "
            "'forcefield_files'): give a file written by `trade-md simulate`"
        ) from None
    if molecule.n_atoms != trajectory.positions_nm.shape[1]:
        raise TradeMDError(
            f"{str(path)!r} holds {trajectory.positions_nm.shape[1]} atoms per frame but its "
            f"system has {molecule.n_atoms}: the file is damaged"
        )
    energies, n_overflow, description = frame_energies(molecule, trajectory.positions_nm, platform, batch)
    if write:
        if n_overflow:
            raise TradeMDError(
                f"{n_overflow} frames of {str(path)!r} have non-finite energies: not written; "
                "the trajectory holds broken configurations"
            )
        write_energies(path, trajectory.temperature_k, energies)
    finite = np.isfinite(energies)
    return EnergyCheck(
        n_frames=trajectory.n_frames,
        max_abs_difference_kj_mol=float(np.max(np.abs(energies - trajectory.energy_kj_mol))),
        mean_energy_kj_mol=float(energies[finite].mean()) if finite.any() else float("nan"),
        n_overflow=n_overflow,
        written=write,
        bridge=description,
    )

"""Energies and forces of single configurations from a plain one-molecule OpenMM Context.

The reference every faster path is tested against, and the exact per-frame energies that
``simulate`` writes.
"""

import numpy as np
import openmm
from openmm import unit

from trademd.errors import TradeMDError
from trademd.platforms import openmm_platform

__all__ = ["MoleculeEnergy"]

_KJ_MOL = unit.kilojoule_per_mole
_KJ_MOL_NM = unit.kilojoule_per_mole / unit.nanometer


class MoleculeEnergy:
    """U(x) and F(x) of one molecule, one configuration at a time.

    Args:
        system: the single-molecule OpenMM system.
        platform: OpenMM platform name (``CPU`` by default: one small molecule gains nothing
            from a GPU).
        threads: CPU threads for the Context.
    """

    def __init__(self, system: openmm.System, platform: str = "CPU", threads: int = 1):
        self.n_atoms = system.getNumParticles()
        chosen, properties = openmm_platform(platform, threads=threads)
        self._context = openmm.Context(system, openmm.VerletIntegrator(0.001), chosen, properties)

    def __call__(self, positions_nm: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Energies and forces of configurations.

        Args:
            positions_nm: [n, atoms, 3] in nm.

        Returns:
            (energy_kj_mol float64 [n], forces_kj_mol_nm float64 [n, atoms, 3]).
        """
        positions_nm = np.asarray(positions_nm, dtype=np.float64)
        if positions_nm.ndim != 3 or positions_nm.shape[1:] != (self.n_atoms, 3):
            raise TradeMDError(
                f"positions must have shape [n, {self.n_atoms}, 3], got {positions_nm.shape}"
            )
        energies = np.empty(len(positions_nm))
        forces = np.empty_like(positions_nm)
        for k, x in enumerate(positions_nm):
            self._context.setPositions(x)
            state = self._context.getState(getEnergy=True, getForces=True)
            energies[k] = state.getPotentialEnergy().value_in_unit(_KJ_MOL)
            forces[k] = state.getForces(asNumpy=True).value_in_unit(_KJ_MOL_NM)
        return energies, forces

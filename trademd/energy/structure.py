"""What a molecule's force field says about its internal coordinates without any MD: a
minimised structure (the centre of every bond and angle) and the thermal width of every
harmonic bond and angle term, sqrt(k_B T / k). Data-free training normalises its flow
features with these instead of with statistics of MD frames.
"""

import math

import numpy as np
import openmm
from openmm import unit
import torch
from torch import Tensor

from trademd.platforms import openmm_platform
from trademd.units import BOLTZMANN_KJ_MOL_K

__all__ = ["minimised_positions", "harmonic_widths"]

#: Width (rad) at 300 K of an angle no HarmonicAngleForce term holds, scaled by sqrt(T / 300).
_DEFAULT_ANGLE_WIDTH_300K = 0.05
#: Width (nm) at 300 K of a free bond no HarmonicBondForce term holds, scaled likewise.
_DEFAULT_BOND_WIDTH_300K = 0.003


def minimised_positions(system: openmm.System, positions_nm: np.ndarray, tolerance_kj_mol_nm: float = 1.0,
                        platform: str = "CPU", max_iterations: int = 0) -> np.ndarray:
    """Positions [atoms, 3] nm after OpenMM's L-BFGS energy minimisation from ``positions_nm``
    (``max_iterations`` 0: until converged)."""
    chosen, properties = openmm_platform(platform, threads=1)
    context = openmm.Context(system, openmm.VerletIntegrator(0.001), chosen, properties)
    context.setPositions(np.asarray(positions_nm, dtype=np.float64))
    context.applyConstraints(1e-8)
    openmm.LocalEnergyMinimizer.minimize(context, tolerance_kj_mol_nm, max_iterations)
    state = context.getState(getPositions=True)
    return np.asarray(state.getPositions(asNumpy=True).value_in_unit(unit.nanometer), dtype=np.float64)


def _harmonic_terms(system: openmm.System) -> tuple[dict, dict]:
    """Force constants of the harmonic bonds {(i, j): k kJ/mol/nm^2} (i < j) and angles
    {(i, centre, k): k kJ/mol/rad^2} (i < k); a pair or triple with several terms adds them."""
    bonds: dict = {}
    angles: dict = {}
    for force in system.getForces():
        if isinstance(force, openmm.HarmonicBondForce):
            for n in range(force.getNumBonds()):
                i, j, _, k = force.getBondParameters(n)
                key = (min(i, j), max(i, j))
                bonds[key] = bonds.get(key, 0.0) + k.value_in_unit(unit.kilojoule_per_mole / unit.nanometer**2)
        elif isinstance(force, openmm.HarmonicAngleForce):
            for n in range(force.getNumAngles()):
                i, centre, j, _, k = force.getAngleParameters(n)
                key = (min(i, j), centre, max(i, j))
                angles[key] = angles.get(key, 0.0) + k.value_in_unit(unit.kilojoule_per_mole / unit.radian**2)
    return bonds, angles


def harmonic_widths(system: openmm.System, zmatrix: np.ndarray, free_bond_rows: np.ndarray,
                    temperature_k: float, ring_closures: np.ndarray | None = None) -> Tensor:
    """Thermal widths sqrt(k_B T / k) of the free bonds (Z-matrix rows ``free_bond_rows``, nm) and
    of every angle (rows 2.., rad; at ring-closure rows, ``ring_closures`` True, the ring bond
    atom - angle partner, nm), in the order of the bounded features of
    :class:`~trademd.flow.coordinates.InternalCoordinates` (float64 [n_free + atoms - 2]).

    A bond or angle with no harmonic term gets a default width (0.003 nm, 0.05 rad at 300 K,
    times sqrt(T / 300 K)).
    """
    bonds, angles = _harmonic_terms(system)
    kt = BOLTZMANN_KJ_MOL_K * temperature_k
    scale = math.sqrt(temperature_k / 300.0)
    z = np.asarray(zmatrix)
    widths = []
    for row in np.asarray(free_bond_rows):
        k = bonds.get((min(z[row, 0], z[row, 1]), max(z[row, 0], z[row, 1])))
        widths.append(math.sqrt(kt / k) if k else _DEFAULT_BOND_WIDTH_300K * scale)
    closing = np.zeros(len(z), dtype=bool) if ring_closures is None else np.asarray(ring_closures)
    for row in range(2, len(z)):
        if closing[row]:
            k = bonds.get((min(z[row, 0], z[row, 2]), max(z[row, 0], z[row, 2])))
            widths.append(math.sqrt(kt / k) if k else _DEFAULT_BOND_WIDTH_300K * scale)
            continue
        k = angles.get((min(z[row, 0], z[row, 2]), z[row, 1], max(z[row, 0], z[row, 2])))
        widths.append(math.sqrt(kt / k) if k else _DEFAULT_ANGLE_WIDTH_300K * scale)
    return torch.tensor(widths, dtype=torch.float64)

"""The replicated system is exact: each copy behaves as the isolated molecule."""

import numpy as np
import openmm
import pytest

from trademd.energy.molecule import MoleculeEnergy
from trademd.errors import TradeMDError
from trademd.energy.copies import copy_energy_parameter, replicate_system
from trademd.systems import get_system

CPU = openmm.Platform.getPlatformByName("CPU")


def _state(system, positions_nm, derivatives=False):
    context = openmm.Context(system, openmm.VerletIntegrator(0.001), CPU, {"Threads": "1"})
    context.setPositions(positions_nm)
    return context.getState(getEnergy=True, getForces=True, getParameterDerivatives=derivatives)


def test_per_copy_energies_and_forces_equal_single_molecule(molecule, perturbed):
    single = molecule.create_openmm_system()
    reference_energy, reference_forces = MoleculeEnergy(single)(perturbed)
    replicated, layout = replicate_system(single, len(perturbed), per_copy_energies=True)
    state = _state(replicated, layout.place(perturbed), derivatives=True)
    derivatives = state.getEnergyParameterDerivatives()
    energies = np.array([derivatives[copy_energy_parameter(c)] for c in range(len(perturbed))])
    forces = state.getForces(asNumpy=True)._value.reshape(perturbed.shape)
    assert np.abs(energies - reference_energy).max() < 1e-3
    assert np.abs(forces - reference_forces).max() < 1e-2
    assert state.getPotentialEnergy()._value == pytest.approx(reference_energy.sum(), abs=1e-3)


def test_dynamics_system_forces_equal_single_molecule(molecule, perturbed):
    """The MD system (one force per type, COM restraint) has the single-molecule forces and
    a total energy equal to the sum of copies (the restraint is zero at the lattice points)."""
    single = molecule.create_openmm_system()
    reference_energy, reference_forces = MoleculeEnergy(single)(perturbed)
    replicated, layout = replicate_system(
        single, len(perturbed), per_copy_energies=False, com_restraint_nm=0.5
    )
    state = _state(replicated, layout.place(perturbed))
    forces = state.getForces(asNumpy=True)._value.reshape(perturbed.shape)
    assert np.abs(forces - reference_forces).max() < 1e-2
    assert state.getPotentialEnergy()._value == pytest.approx(reference_energy.sum(), abs=1e-3)


def test_constraints_are_replicated():
    single = get_system("ala2-implicit").create_openmm_system()
    replicated, _ = replicate_system(single, 3, per_copy_energies=False)
    assert replicated.getNumConstraints() == 3 * single.getNumConstraints() == 36
    i, j, length = replicated.getConstraintParameters(2 * single.getNumConstraints())
    i0, j0, length0 = single.getConstraintParameters(0)
    assert (i, j) == (i0 + 44, j0 + 44) and length == length0


def test_lattice_keeps_copies_outside_the_cutoff(molecule):
    single = molecule.create_openmm_system()
    _, layout = replicate_system(single, 27, per_copy_energies=False, molecule_radius_nm=1.0,
                                 com_restraint_nm=0.5)
    lattice = layout.lattice_nm()
    gaps = np.linalg.norm(lattice[:, None] - lattice[None], axis=-1)[~np.eye(27, dtype=bool)]
    cutoff = layout.gb_cutoff_nm or 0.0
    assert gaps.min() - 2 * layout.max_radius_nm > cutoff
    assert len(np.unique(lattice, axis=0)) == 27


def test_energy_is_exact_after_the_copy_drifts_inside_the_restraint(molecule, perturbed):
    """A copy moved 0.4 nm off its lattice point (inside the 0.5 nm restraint) sees no other copy."""
    single = molecule.create_openmm_system()
    replicated, layout = replicate_system(single, 8, per_copy_energies=False,
                                          molecule_radius_nm=1.0, com_restraint_nm=0.5)
    configs = np.concatenate([perturbed, perturbed[:2]])
    positions = layout.place(configs).reshape(8, -1, 3)
    positions += np.array([0.5, 0.0, 0.0]) * (np.arange(8) % 2 * 2 - 1)[:, None, None] * 0.8
    state = _state(replicated, positions.reshape(-1, 3))
    reference_energy, _ = MoleculeEnergy(single)(configs)
    assert state.getPotentialEnergy()._value == pytest.approx(reference_energy.sum(), abs=2e-3)


def test_unsupported_force_is_a_clear_error(molecule):
    single = molecule.create_openmm_system()
    single.addForce(openmm.CustomExternalForce("x"))
    with pytest.raises(TradeMDError, match="CustomExternalForce"):
        replicate_system(single, 2, per_copy_energies=False)

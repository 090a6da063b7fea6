"""Built-in and user systems: topology, Z-matrix, dihedral indices, clear errors."""

import mdtraj
import numpy as np
import pytest

from trademd.errors import TradeMDError
from trademd.systems import get_system, list_systems, user_system
from trademd.systems.zmatrix import validate_zmatrix, zmatrix_from_bonds


def test_builtin_systems_are_listed():
    names = [s.name for s in list_systems()]
    assert names == ["ala2-implicit", "ala2-vacuum", "ala2-openmmtools"]


def test_alanine_zmatrix_is_valid_and_places_every_atom(molecule):
    validate_zmatrix(molecule.zmatrix, 22)
    assert molecule.zmatrix[:3, 0].tolist() == [6, 8, 14]


def test_alanine_zmatrix_bonds_are_real_bonds(molecule):
    bonds = {frozenset((b[0].index, b[1].index)) for b in molecule.pdb().topology.bonds()}
    for atom, partner, *_ in molecule.zmatrix[1:].tolist():
        assert frozenset((atom, partner)) in bonds


def test_phi_psi_indices_agree_with_mdtraj(molecule):
    trajectory = mdtraj.Trajectory(molecule.positions_nm()[None], molecule.mdtraj_topology())
    phi_idx, _ = mdtraj.compute_phi(trajectory)
    psi_idx, _ = mdtraj.compute_psi(trajectory)
    assert tuple(phi_idx[0]) == molecule.phi_atoms
    assert tuple(psi_idx[0]) == molecule.psi_atoms


def test_implicit_system_has_obc_and_hbond_constraints():
    system = get_system("ala2-implicit").create_openmm_system()
    names = {type(f).__name__ for f in system.getForces()}
    assert "GBSAOBCForce" in names
    assert system.getNumConstraints() == 12


def test_published_benchmark_system_is_openmmtools_own():
    """ala2-openmmtools is openmmtools' AlanineDipeptideImplicit(constraints=None): the same
    atoms, bonds and positions as the shipped PDB, the same forces and energy, no constraints;
    hydrogen masses repartitioned as asked."""
    import openmm
    from openmm import unit
    from openmmtools.testsystems import AlanineDipeptideImplicit

    reference = AlanineDipeptideImplicit(constraints=None)
    molecule = get_system("ala2-openmmtools")
    ours = molecule.pdb()
    assert [(a.name, a.residue.name, a.element.symbol) for a in ours.topology.atoms()] == [
        (a.name, a.residue.name, a.element.symbol) for a in reference.topology.atoms()]
    bonds = lambda topology: sorted(sorted((b[0].index, b[1].index)) for b in topology.bonds())
    assert bonds(ours.topology) == bonds(reference.topology)
    assert np.abs(molecule.positions_nm() - reference.positions.value_in_unit(unit.nanometer)).max() < 1e-4
    system = molecule.create_openmm_system()
    assert system.getNumConstraints() == 0 and molecule.constraints == "None"
    assert openmm.XmlSerializer.serialize(system) == openmm.XmlSerializer.serialize(reference.system)
    energies = []
    for candidate in (system, reference.system):
        context = openmm.Context(candidate, openmm.VerletIntegrator(0.001),
                                 openmm.Platform.getPlatformByName("Reference"))
        context.setPositions(reference.positions)
        energies.append(context.getState(getEnergy=True).getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole))
    assert energies[0] == energies[1]
    heavy_hydrogens = molecule.create_openmm_system(hydrogen_mass_amu=3.0)
    masses = [heavy_hydrogens.getParticleMass(i).value_in_unit(unit.amu) for i in range(22)]
    assert masses[0] == pytest.approx(3.0) and sum(masses) == pytest.approx(
        sum(system.getParticleMass(i).value_in_unit(unit.amu) for i in range(22)))


def test_unconstrained_system_refuses_long_time_steps(tmp_path):
    from trademd.md.settings import SimulationConfig
    from trademd.simulate import simulate

    config = SimulationConfig(system_name="ala2-openmmtools", temperature_k=600.0, time_ps=1.0,
                              timestep_ps=0.004, hydrogen_mass_amu=1.5, replicas=1, platform="CPU")
    with pytest.raises(TradeMDError, match="no bond constraints: a 4 fs time step is unstable; use --timestep 2fs"):
        simulate(config, tmp_path / "x.h5", show_progress=False)
    assert not (tmp_path / "x.h5").exists()


def test_user_system_from_pdb(tmp_path):
    pdb = tmp_path / "ala2.pdb"
    pdb.write_text(get_system("ala2-vacuum").pdb_text)
    system = user_system(pdb, ["amber99sbildn.xml", "amber96_obc.xml"])
    assert system.solvent == "implicit-obc"
    validate_zmatrix(system.zmatrix, 22)
    assert system.phi_atoms == (4, 6, 8, 14)
    bonds = {frozenset((b[0].index, b[1].index)) for b in system.pdb().topology.bonds()}
    for atom, partner, *_ in system.zmatrix[1:].tolist():
        assert frozenset((atom, partner)) in bonds


def test_zmatrix_from_random_trees():
    rng = np.random.default_rng(3)
    for n_atoms in (4, 7, 30):
        bonds = [(k, int(rng.integers(0, k))) for k in range(1, n_atoms)]
        heavy = [bool(rng.integers(0, 2)) for _ in range(n_atoms)]
        zmatrix = zmatrix_from_bonds(n_atoms, bonds, heavy)
        validate_zmatrix(zmatrix, n_atoms)
        bond_set = {frozenset(b) for b in bonds}
        for atom, partner, *_ in zmatrix[1:].tolist():
            assert frozenset((atom, partner)) in bond_set


def test_disconnected_molecule_is_refused():
    with pytest.raises(TradeMDError, match="not connected"):
        zmatrix_from_bonds(6, [(0, 1), (1, 2), (3, 4), (4, 5)], [True] * 6)


@pytest.mark.parametrize(
    "content, forcefield, message",
    [
        (None, ["amber99sbildn.xml"], "not found"),
        ("this is not a pdb\n", ["amber99sbildn.xml"], "PDB"),
        ("ala2", ["tip3p.xml"], "does not match the topology"),
        ("ala2", ["no-such-forcefield.xml"], "cannot load force field"),
    ],
)
def test_bad_user_systems_are_clear_errors(tmp_path, content, forcefield, message):
    pdb = tmp_path / "molecule.pdb"
    if content == "ala2":
        pdb.write_text(get_system("ala2-vacuum").pdb_text)
    elif content is not None:
        pdb.write_text(content)
    with pytest.raises(TradeMDError, match=message):
        user_system(pdb, forcefield)


def test_unknown_system_names_the_choices():
    with pytest.raises(TradeMDError, match="ala2-implicit"):
        get_system("ala3")


def test_chiral_centres(tmp_path):
    """Alanine has one chiral centre (CA); a user system finds it from the bond graph alone."""
    assert get_system("ala2-implicit").chiral_centres.tolist() == [[8, 6, 14, 10]]
    pdb = tmp_path / "ala2.pdb"
    pdb.write_text(get_system("ala2-vacuum").pdb_text)
    centres = user_system(pdb, ["amber99sbildn.xml"]).chiral_centres
    assert centres[:, 0].tolist() == [8]  # methyl carbons (1, 10, 18) are not chiral
    assert sorted(centres[0, 1:].tolist()) == [6, 10, 14]

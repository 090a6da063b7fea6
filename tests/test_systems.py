"""Built-in and user systems: topology, Z-matrix, dihedral indices, clear errors."""

import mdtraj
import numpy as np
import pytest

from trademd.errors import TradeMDError
from trademd.systems import get_system, list_systems, user_system
from trademd.systems.zmatrix import validate_zmatrix, zmatrix_from_bonds


def test_builtin_systems_are_listed():
    names = [s.name for s in list_systems()]
    assert names == ["ala2-implicit", "ala2-vacuum", "ala2-openmmtools", "ala4-implicit", "ala6-implicit",
                     "pro2-implicit", "trp2-implicit"]


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


@pytest.mark.parametrize("name, alanines", [("ala4-implicit", 3), ("ala6-implicit", 5)])
def test_capped_peptides_have_every_residue_and_l_alanines(name, alanines):
    """Ace-(Ala)n-Nme: a valid Z-matrix over real bonds, every alanine's phi/psi (mdtraj's),
    every C-alpha chiral with ala2's handedness (L), trans peptide bonds, a minimised energy."""
    import openmm
    from openmm import unit

    from trademd.analysis.chirality import chirality_signs

    molecule = get_system(name)
    residues = [r.name for r in molecule.pdb().topology.residues()]
    assert residues == ["ACE", *["ALA"] * alanines, "NME"] and molecule.n_atoms == 10 * alanines + 12
    validate_zmatrix(molecule.zmatrix, molecule.n_atoms)
    bonds = {frozenset((b[0].index, b[1].index)) for b in molecule.pdb().topology.bonds()}
    assert all(frozenset((atom, partner)) in bonds for atom, partner, *_ in molecule.zmatrix[1:].tolist())
    trajectory = mdtraj.Trajectory(molecule.positions_nm()[None], molecule.mdtraj_topology())
    phi_rows, _ = mdtraj.compute_phi(trajectory)
    psi_rows, _ = mdtraj.compute_psi(trajectory)
    assert [list(p) for p, _ in molecule.backbone_dihedrals] == phi_rows.tolist()
    assert [list(q) for _, q in molecule.backbone_dihedrals] == psi_rows.tolist()
    assert len(molecule.chiral_centres) == alanines
    names = [a.name for a in molecule.pdb().topology.atoms()]
    assert [names[i] for i in molecule.chiral_centres[:, 0]] == ["CA"] * alanines
    ala2 = get_system("ala2-implicit")
    reference_sign = chirality_signs(ala2.positions_nm(), ala2.chiral_centres)[0]
    assert (chirality_signs(molecule.positions_nm(), molecule.chiral_centres) == reference_sign).all()
    _, omega = mdtraj.compute_omega(trajectory)
    assert np.all(np.abs(np.abs(omega) - np.pi) < 0.35)
    system = molecule.create_openmm_system()
    context = openmm.Context(system, openmm.VerletIntegrator(0.001), openmm.Platform.getPlatformByName("Reference"))
    context.setPositions(molecule.positions_nm())
    state = context.getState(getEnergy=True, getForces=True)
    forces = state.getForces(asNumpy=True).value_in_unit(unit.kilojoule_per_mole / unit.nanometer)
    # minimised: what is left comes from the PDB's 0.001 A rounding (ala2's PDB: 936 kJ/mol/nm)
    assert np.linalg.norm(forces, axis=1).max() < 200.0
    assert state.getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole) < 0


def test_peptide_builder_uses_ideal_geometry():
    """The unminimised Ace-Ala-Nme of the builder: ala2's atoms residue by residue, the
    extended backbone dihedrals it was asked for, trans peptide bonds, ideal bond lengths."""
    import io

    from openmm import unit
    import openmm.app as app

    from trademd.systems.peptides import EXTENDED_PHI_PSI_DEG, capped_alanine_pdb

    built = app.PDBFile(io.StringIO(capped_alanine_pdb(1, minimise=False)))
    shipped = get_system("ala2-implicit").pdb()
    by_residue = lambda pdb: [(r.name, sorted(a.name for a in r.atoms())) for r in pdb.topology.residues()]
    assert by_residue(built) == by_residue(shipped)
    positions = np.asarray(built.getPositions(asNumpy=True).value_in_unit(unit.nanometer))
    trajectory = mdtraj.Trajectory(positions[None], mdtraj.Topology.from_openmm(built.topology))
    phi, psi = (np.degrees(f(trajectory)[1]).ravel() for f in (mdtraj.compute_phi, mdtraj.compute_psi))
    assert phi == pytest.approx([EXTENDED_PHI_PSI_DEG[0]], abs=0.1)
    assert psi == pytest.approx([EXTENDED_PHI_PSI_DEG[1]], abs=0.1)
    index = {(a.residue.name, a.name): a.index for a in built.topology.atoms()}
    # the two peptide bonds, ACE-ALA and ALA-NME, are trans
    rows = [[index[("ACE", "CH3")], index[("ACE", "C")], index[("ALA", "N")], index[("ALA", "CA")]],
            [index[("ALA", "CA")], index[("ALA", "C")], index[("NME", "N")], index[("NME", "C")]]]
    assert np.abs(np.degrees(mdtraj.compute_dihedrals(trajectory, rows))).ravel() == pytest.approx([180.0, 180.0], abs=0.1)
    length = lambda a, b: np.linalg.norm(positions[index[a]] - positions[index[b]])
    assert length(("ALA", "N"), ("ALA", "CA")) == pytest.approx(0.146, abs=2e-4)
    assert length(("ALA", "CA"), ("ALA", "CB")) == pytest.approx(0.153, abs=2e-4)
    assert length(("ACE", "C"), ("ALA", "N")) == pytest.approx(0.133, abs=2e-4)


@pytest.mark.parametrize("name", ["ala2-implicit", "ala4-implicit", "ala6-implicit", "pro2-implicit", "trp2-implicit"])
def test_shipped_peptides_have_trans_peptide_bonds(name):
    """Every peptide bond of a shipped structure is trans (|omega| > 170 degrees): MD at 600 K
    does not leave a cis prolyl bond (the first pro2 structure had omega = 1 degree and its
    600 K data stayed 98 % cis), so a cis start is a different, unequilibrated ensemble."""
    from trademd.systems.molecule import peptide_bond_dihedrals

    molecule = get_system(name)
    omegas = peptide_bond_dihedrals(molecule.pdb().topology)
    assert len(omegas) == len(molecule.backbone_dihedrals) + 1
    trajectory = mdtraj.Trajectory(molecule.positions_nm()[None], molecule.mdtraj_topology())
    assert np.all(np.abs(np.degrees(mdtraj.compute_dihedrals(trajectory, omegas))) > 170.0)


def test_proline_dipeptide_builder_keeps_the_peptide_bond_trans():
    """pdbfixer grows proline onto the dipeptide turned to phi = -75 degrees; at the shipped
    dipeptide's phi its CD lands on the cap's carbonyl carbon and minimisation turns the bond cis."""
    import io

    from openmm import unit
    import openmm.app as app

    from trademd.systems.molecule import peptide_bond_dihedrals
    from trademd.systems.peptides import capped_dipeptide_pdb

    built = app.PDBFile(io.StringIO(capped_dipeptide_pdb("PRO")))
    positions = np.asarray(built.getPositions(asNumpy=True).value_in_unit(unit.nanometer))
    trajectory = mdtraj.Trajectory(positions[None], mdtraj.Topology.from_openmm(built.topology))
    omegas = np.degrees(mdtraj.compute_dihedrals(trajectory, peptide_bond_dihedrals(built.topology)))
    assert np.all(np.abs(omegas) > 170.0), omegas
    assert built.topology.getNumAtoms() == get_system("pro2-implicit").n_atoms


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

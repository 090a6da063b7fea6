"""Capped peptides: how the shipped ``ala4``/``ala6`` and ring dipeptide structures were made.

**Ace-(Ala)n-Nme from standard geometry.**

Heavy atoms are placed one by one from ideal bond lengths, angles and torsions (trans
peptide bonds, L-alanine, an extended backbone), OpenMM's ``Modeller`` adds the hydrogens of
its residue templates, and the structure is minimised in the force field it will be simulated
with. ``python -m trademd.systems.peptides 4 OUT.pdb`` writes one.

**Ace-X-Nme with any standard residue X** (``pro2``, ``trp2``): the shipped alanine
dipeptide, turned to phi = -75 degrees (where a proline ring fits), with its alanine mutated by
pdbfixer (hydrogens at pH 7), minimised the same way.
``python -m trademd.systems.peptides PRO OUT.pdb`` writes one.
"""

import io
import math
import sys

import numpy as np
import openmm
from openmm import unit
import openmm.app as app
import torch

from trademd.errors import TradeMDError
from trademd.flow.coordinates import dihedral

__all__ = ["capped_alanine_pdb", "capped_dipeptide_pdb", "EXTENDED_PHI_PSI_DEG"]

#: Backbone dihedrals (degrees) every alanine is built with: the polyproline-II/beta region.
EXTENDED_PHI_PSI_DEG = (-75.0, 145.0)

# Ideal geometry (nm, degrees), Engh & Huber
_BOND_NM = {"C-N": 0.133, "N-CA": 0.146, "CA-C": 0.152, "C=O": 0.123, "CA-CB": 0.153, "CH3-C": 0.152}
_ANGLE_DEG = {"CA-C-N": 116.2, "C-N-CA": 121.7, "N-CA-C": 111.2, "N-C=O": 122.7, "C-CA-CB": 110.1}
#: Torsion N-C-CA-CB of an L-amino acid (degrees); its mirror image has the opposite sign.
_L_CB_TORSION_DEG = 122.0
#: Builds of a mutated dipeptide tried before giving up, and the smallest |omega| (rad) that
#: counts as trans.
_BUILD_ATTEMPTS = 10
_TRANS_MIN_RAD = math.radians(150.0)


def _place(a: np.ndarray, b: np.ndarray, c: np.ndarray, bond_nm: float, angle_deg: float,
           torsion_deg: float) -> np.ndarray:
    """Position [3] (nm) of atom d with |cd| = bond, angle bcd and torsion abcd (NeRF)."""
    angle, torsion = math.radians(angle_deg), math.radians(torsion_deg)
    bc = (c - b) / np.linalg.norm(c - b)
    normal = np.cross(b - a, bc)
    normal /= np.linalg.norm(normal)
    local = np.array([-bond_nm * math.cos(angle), bond_nm * math.sin(angle) * math.cos(torsion),
                      bond_nm * math.sin(angle) * math.sin(torsion)])
    frame = np.stack([bc, np.cross(normal, bc), normal], axis=1)
    return c + frame @ local


def _heavy_atoms(n_alanines: int) -> list[tuple[str, list[tuple[str, str, np.ndarray]]]]:
    """Residues (name, [(atom name, element, position nm)]) with their heavy atoms."""
    phi, psi = EXTENDED_PHI_PSI_DEG
    ch3, c_prev = np.zeros(3), np.array([_BOND_NM["CH3-C"], 0.0, 0.0])
    residues = [("ACE", [("CH3", "C", ch3), ("C", "C", c_prev)])]
    before = np.array([-0.05, 0.1, 0.0])  # fixes the plane of the first torsion only
    ca_prev = ch3  # the atoms two and one before the carbonyl carbon: before, ca_prev
    for k in range(n_alanines + 1):
        n = _place(before, ca_prev, c_prev, _BOND_NM["C-N"], _ANGLE_DEG["CA-C-N"], psi)
        ca = _place(ca_prev, c_prev, n, _BOND_NM["N-CA"], _ANGLE_DEG["C-N-CA"], 180.0)
        oxygen = _place(ca, n, c_prev, _BOND_NM["C=O"], _ANGLE_DEG["N-C=O"], 0.0)
        residues[-1][1].append(("O", "O", oxygen))  # trans peptide: O cis to the next CA
        if k == n_alanines:
            residues.append(("NME", [("N", "N", n), ("C", "C", ca)]))
            break
        c = _place(c_prev, n, ca, _BOND_NM["CA-C"], _ANGLE_DEG["N-CA-C"], phi)
        cb = _place(n, c, ca, _BOND_NM["CA-CB"], _ANGLE_DEG["C-CA-CB"], _L_CB_TORSION_DEG)
        residues.append(("ALA", [("N", "N", n), ("CA", "C", ca), ("C", "C", c), ("CB", "C", cb)]))
        before, ca_prev, c_prev = n, ca, c
    return residues


def capped_alanine_pdb(n_alanines: int, forcefield_files=("amber99sbildn.xml", "amber96_obc.xml"),
                       minimise: bool = True) -> str:
    """PDB text of Ace-(Ala)n-Nme with hydrogens, minimised in ``forcefield_files``
    (NoCutoff, HBonds constraints) unless ``minimise`` is False."""
    topology = app.Topology()
    chain = topology.addChain("A")
    positions = []
    for residue_name, atoms in _heavy_atoms(n_alanines):
        residue = topology.addResidue(residue_name, chain)
        for atom_name, element, position in atoms:
            topology.addAtom(atom_name, app.Element.getBySymbol(element), residue)
            positions.append(position)
    topology.createStandardBonds()
    forcefield = app.ForceField(*forcefield_files)
    modeller = app.Modeller(topology, np.array(positions) * unit.nanometer)
    # a named platform (CPU, the default before pocl): OpenMM's default is OpenCL where pocl
    # is installed, and addHydrogens' minimiser crashed there (segmentation fault)
    modeller.addHydrogens(forcefield, platform=openmm.Platform.getPlatformByName("CPU"))
    if minimise:
        return _minimised_pdb(modeller.topology, modeller.positions, forcefield_files)
    text = io.StringIO()
    app.PDBFile.writeFile(modeller.topology, modeller.positions, text)
    return text.getvalue()


def capped_dipeptide_pdb(residue: str,
                         forcefield_files=("amber99sbildn.xml", "amber96_obc.xml")) -> str:
    """PDB text of Ace-``residue``-Nme (three-letter code, e.g. ``PRO``), minimised in
    ``forcefield_files`` (NoCutoff, HBonds constraints), every peptide bond trans. Needs
    pdbfixer.

    pdbfixer's placement of the new side chain is not reproducible run to run (its
    minimisation on the multithreaded CPU platform); now and then a proline's CD still lands
    against the cap and the final minimisation turns the Ace-Pro bond cis. Such a build is
    discarded and the next of :data:`_BUILD_ATTEMPTS` seeds tried.

    Raises:
        TradeMDError: if no attempt keeps every peptide bond trans.
    """
    from pdbfixer import PDBFixer

    from trademd.systems.molecule import peptide_bond_dihedrals

    dipeptide = _alanine_dipeptide_at_phi(math.radians(EXTENDED_PHI_PSI_DEG[0]))
    for seed in range(_BUILD_ATTEMPTS):
        # a named platform: pdbfixer's minimisers use OpenMM's default (OpenCL where pocl is installed)
        fixer = PDBFixer(pdbfile=io.StringIO(dipeptide), platform=openmm.Platform.getPlatformByName("CPU"))
        fixer.applyMutations([f"ALA-2-{residue.upper()}"], next(fixer.topology.chains()).id)
        fixer.findMissingResidues()
        fixer.findMissingAtoms()
        fixer.addMissingAtoms(seed=seed)
        fixer.addMissingHydrogens(7.0)
        text = _minimised_pdb(fixer.topology, fixer.positions, forcefield_files)
        built = app.PDBFile(io.StringIO(text))
        x = torch.as_tensor(built.getPositions(asNumpy=True).value_in_unit(unit.nanometer))
        omegas = [float(dihedral(*x[list(quad)])) for quad in peptide_bond_dihedrals(built.topology)]
        if all(abs(omega) > _TRANS_MIN_RAD for omega in omegas):
            return text
    raise TradeMDError(f"no build of Ace-{residue.upper()}-Nme in {_BUILD_ATTEMPTS} attempts kept every "
                       "peptide bond trans: start from a structure with the residue in place")


def _alanine_dipeptide_at_phi(phi_rad: float) -> str:
    """PDB text of the shipped alanine dipeptide with its phi turned to ``phi_rad`` (the
    acetyl cap and the amide hydrogen turned about N-CA). A proline ring fits only near
    phi = -65 degrees: grown at the shipped phi, pdbfixer's CD lands 0.13 nm from the cap's
    carbonyl carbon, and minimisation relieves that by turning the peptide bond cis."""
    from importlib import resources

    pdb = app.PDBFile(io.StringIO(
        resources.files("trademd.systems").joinpath("data", "alanine-dipeptide.pdb").read_text()))
    atoms = list(pdb.topology.atoms())
    x = np.asarray(pdb.positions.value_in_unit(unit.nanometer), dtype=np.float64)
    index = {(a.residue.index, a.name): a.index for a in atoms}
    phi = (index[(0, "C")], index[(1, "N")], index[(1, "CA")], index[(1, "C")])
    moving = np.array([a.residue.index == 0 or (a.residue.index, a.name) == (1, "H") for a in atoms])
    _set_dihedral(x, phi, moving, phi_rad)
    text = io.StringIO()
    app.PDBFile.writeFile(pdb.topology, x * unit.nanometer, text)
    return text.getvalue()


def _set_dihedral(x: np.ndarray, atoms: tuple[int, int, int, int], moving: np.ndarray,
                  target_rad: float) -> None:
    """Turn the atoms where ``moving`` [n] is True rigidly about the bond atoms[1]-atoms[2]
    so that the dihedral of ``atoms`` becomes ``target_rad``; x [n, 3] in place. The moving
    side holds atoms[0]."""
    origin = x[atoms[1]]
    axis = (x[atoms[2]] - origin) / np.linalg.norm(x[atoms[2]] - origin)
    now = float(dihedral(*torch.as_tensor(x[list(atoms)])))
    turn = -(target_rad - now)  # the first atom's side turns the other way
    r = x[moving] - origin
    cos, sin = math.cos(turn), math.sin(turn)
    x[moving] = origin + r * cos + np.cross(axis, r) * sin + np.outer(r @ axis, axis) * (1 - cos)


def _minimised_pdb(topology: app.Topology, positions, forcefield_files) -> str:
    """PDB text of ``topology`` at ``positions`` minimised in ``forcefield_files`` (NoCutoff,
    HBonds constraints, Reference platform)."""
    forcefield = app.ForceField(*forcefield_files)
    system = forcefield.createSystem(topology, nonbondedMethod=app.NoCutoff, constraints=app.HBonds)
    context = openmm.Context(system, openmm.VerletIntegrator(0.001),
                             openmm.Platform.getPlatformByName("Reference"))
    context.setPositions(positions)
    openmm.LocalEnergyMinimizer.minimize(context, 1.0, 0)
    text = io.StringIO()
    app.PDBFile.writeFile(topology, context.getState(getPositions=True).getPositions(), text)
    return text.getvalue()


if __name__ == "__main__":
    what, out = sys.argv[1], sys.argv[2]
    with open(out, "w") as handle:
        handle.write(capped_alanine_pdb(int(what)) if what.isdigit() else capped_dipeptide_pdb(what))

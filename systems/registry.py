"""Built-in systems by name, and systems from a user's PDB and force field."""

from dataclasses import replace
from importlib import resources
import io
import json
from pathlib import Path

import numpy as np
import openmm.app as app

from trademd.errors import TradeMDError

from .molecule import MolecularSystem, build_openmm_system
from .published import alanine_dipeptide_openmmtools_system
from .zmatrix import close_rings, order_zmatrix, zmatrix_from_bonds

__all__ = ["BUILTIN_SYSTEMS", "get_system", "user_system", "list_systems", "record_attrs",
           "system_from_attrs", "system_from_record"]

_ALA2_PDB = "alanine-dipeptide.pdb"
_ALA2_FORCEFIELD = ("amber99sbildn.xml",)
_ALA2_IMPLICIT = ("amber99sbildn.xml", "amber96_obc.xml")

# Atom order of the PDB: 0 H1, 1 CH3, 2-3 H, 4 C, 5 O, 6 N, 7 H, 8 CA, 9 HA, 10 CB,
# 11-13 HB, 14 C, 15 O, 16 N, 17 H, 18 C, 19-21 H. Seeds N, CA, C; HA and CB are placed from
# the backbone (bond CA, angle C, torsion N), so their torsions fix the chirality of CA.
_ALA2_SEEDS = (6, 8, 14)
_ALA2_ROWS = [
    (0, 1, 4, 6), (1, 4, 6, 8), (2, 1, 4, 0), (3, 1, 4, 0), (4, 6, 8, 14), (5, 4, 6, 8),
    (7, 6, 8, 4), (9, 8, 14, 6), (10, 8, 14, 6), (11, 10, 8, 6), (12, 10, 8, 11),
    (13, 10, 8, 11), (15, 14, 8, 16), (16, 14, 8, 6), (17, 16, 14, 15), (18, 16, 14, 8),
    (19, 18, 16, 14), (20, 18, 16, 19), (21, 18, 16, 19),
]
_ALA2_PHI = (4, 6, 8, 14)
_ALA2_PSI = (6, 8, 14, 16)
# C-alpha with N, C and CB: an L-amino acid has one fixed sign of this signed volume
_ALA2_CHIRAL_CA = (8, 6, 14, 10)


def _alanine(name: str, forcefield: tuple[str, ...], solvent: str, description: str, **fields):
    """Alanine dipeptide from the shipped PDB (the atom order, names and positions of
    openmmtools' ``AlanineDipeptideImplicit`` too); ``fields`` override MolecularSystem's."""
    pdb_text = resources.files("trademd.systems").joinpath("data", _ALA2_PDB).read_text()
    return MolecularSystem(
        name=name,
        description=description,
        pdb_text=pdb_text,
        forcefield_files=forcefield,
        solvent=solvent,
        zmatrix=order_zmatrix(_ALA2_SEEDS, _ALA2_ROWS),
        backbone_dihedrals=((_ALA2_PHI, _ALA2_PSI),),
        chiral_centres=np.array([_ALA2_CHIRAL_CA], dtype=np.int64),
        **fields,
    )


def _shipped_peptide(name: str, pdb_file: str, description: str) -> MolecularSystem:
    """A capped peptide shipped as PDB (made by :mod:`trademd.systems.peptides`) in the
    force field of ``ala2-implicit``: Z-matrix from the bond graph (ring-closing bonds as
    coordinates), every residue's phi/psi and every chiral centre from the topology."""
    pdb_text = resources.files("trademd.systems").joinpath("data", pdb_file).read_text()
    molecule = _user_system_from_text(pdb_text, pdb_file, _ALA2_IMPLICIT)
    return replace(molecule, name=name, description=description)


BUILTIN_SYSTEMS = {
    "ala2-implicit": lambda: _alanine(
        "ala2-implicit",
        _ALA2_IMPLICIT,
        "implicit-obc",
        "alanine dipeptide, AMBER99SB-ILDN + OBC implicit solvent (TRADE paper system)",
    ),
    "ala2-vacuum": lambda: _alanine(
        "ala2-vacuum", _ALA2_FORCEFIELD, "vacuum", "alanine dipeptide, AMBER99SB-ILDN, vacuum"
    ),
    "ala2-openmmtools": lambda: _alanine(
        "ala2-openmmtools", (), "implicit-obc",
        "alanine dipeptide, openmmtools AlanineDipeptideImplicit, no constraints "
        "(FAB / annealed BG / CMT benchmark system)",
        constraints="None", openmm_factory=alanine_dipeptide_openmmtools_system,
        force_field="Amber ff96 + OBC1 (openmmtools prmtop)",
    ),
    "ala4-implicit": lambda: _shipped_peptide(
        "ala4-implicit", "ala4-capped.pdb",
        "alanine tetrapeptide Ace-(Ala)3-Nme, AMBER99SB-ILDN + OBC implicit solvent"),
    "ala6-implicit": lambda: _shipped_peptide(
        "ala6-implicit", "ala6-capped.pdb",
        "alanine hexapeptide Ace-(Ala)5-Nme, AMBER99SB-ILDN + OBC implicit solvent"),
    "pro2-implicit": lambda: _shipped_peptide(
        "pro2-implicit", "pro2-capped.pdb",
        "proline dipeptide Ace-Pro-Nme (5-ring), AMBER99SB-ILDN + OBC implicit solvent"),
    "trp2-implicit": lambda: _shipped_peptide(
        "trp2-implicit", "trp2-capped.pdb",
        "tryptophan dipeptide Ace-Trp-Nme (indole), AMBER99SB-ILDN + OBC implicit solvent"),
}


def list_systems() -> list[MolecularSystem]:
    """All built-in systems."""
    return [factory() for factory in BUILTIN_SYSTEMS.values()]


def get_system(name: str) -> MolecularSystem:
    """A built-in system by name."""
    if name not in BUILTIN_SYSTEMS:
        raise TradeMDError(
            f"unknown system {name!r}: choose one of {sorted(BUILTIN_SYSTEMS)} "
            "(see `trade-md systems`) or give --pdb FILE --forcefield XML"
        )
    return BUILTIN_SYSTEMS[name]()


def user_system(pdb_path: str | Path, forcefield_files: list[str]) -> MolecularSystem:
    """A system from a user's PDB file and force-field XML files (NoCutoff, vacuum or OBC).

    The Z-matrix is derived from the bond graph; phi/psi are the first backbone dihedrals
    mdtraj finds (None for a molecule without them)."""
    path = Path(pdb_path)
    if not path.is_file():
        raise TradeMDError(f"PDB file {str(path)!r} not found: check the path given to --pdb")
    if not forcefield_files:
        raise TradeMDError("a --pdb system needs --forcefield XML [XML ...]")
    return _user_system_from_text(path.read_text(), path.name, forcefield_files)


def record_attrs(molecule: MolecularSystem) -> dict:
    """The file attributes that record a system (read back by :func:`system_from_attrs`)."""
    return {
        "system": molecule.name,
        "description": molecule.description,
        "solvent": molecule.solvent,
        "forcefield_files": list(molecule.forcefield_files),
        "constraints": molecule.constraints,
        "phi_atoms": list(molecule.phi_atoms or []),
        "psi_atoms": list(molecule.psi_atoms or []),
        "backbone_dihedrals": [[list(phi), list(psi)] for phi, psi in molecule.backbone_dihedrals],
    }


def system_from_attrs(attrs, topology_pdb: str) -> MolecularSystem:
    """The system a trade-md file records in its attributes (``system``,
    ``forcefield_files`` as JSON text) and topology: built-in by name, a user system from
    its PDB text."""
    return system_from_record(str(attrs["system"]), topology_pdb, json.loads(attrs["forcefield_files"]))


def system_from_record(name: str, pdb_text: str, forcefield_files: list[str]) -> MolecularSystem:
    """The system a trade-md file records: built-in by name, a user system from its PDB text."""
    if name in BUILTIN_SYSTEMS:
        return get_system(name)
    return _user_system_from_text(pdb_text, name.removeprefix("user:"), forcefield_files)


def _user_system_from_text(pdb_text: str, file_name: str, forcefield_files) -> MolecularSystem:
    try:
        pdb = app.PDBFile(io.StringIO(pdb_text))
    except Exception as error:
        raise TradeMDError(
            f"cannot read PDB file {file_name!r}: {str(error).strip() or type(error).__name__}; "
            "give a valid PDB"
        ) from None
    topology = pdb.topology
    if topology.getNumAtoms() < 4:
        raise TradeMDError(f"PDB file {file_name!r} holds fewer than 4 atoms: give a molecule")
    system = build_openmm_system(topology, tuple(forcefield_files), "HBonds")
    solvent = (
        "implicit-obc"
        if any(type(f).__name__ == "GBSAOBCForce" for f in system.getForces())
        else "vacuum"
    )
    bonds = [(b[0].index, b[1].index) for b in topology.bonds()]
    heavy = [a.element is None or a.element.symbol != "H" for a in topology.atoms()]
    rings = close_rings(zmatrix_from_bonds(topology.getNumAtoms(), bonds, heavy), bonds)
    return MolecularSystem(
        name=f"user:{file_name}",
        description=f"user system from {file_name}",
        pdb_text=pdb_text,
        forcefield_files=tuple(forcefield_files),
        solvent=solvent,
        zmatrix=rings.zmatrix,
        backbone_dihedrals=_backbone_dihedrals(topology),
        chiral_centres=_chiral_centres(bonds, heavy),
        ring_closures=rings.closures if rings.closures.any() else None,
        implied_ring_bonds=tuple(rings.implied),
        ring_sizes=tuple(rings.ring_sizes.values()),
    )


def _chiral_centres(bonds: list[tuple[int, int]], heavy: list[bool]) -> np.ndarray:
    """Atoms with four bonded neighbours of which at most one is hydrogen (two identical
    hydrogens make a centre achiral), as rows (centre, three heavy neighbours or H)."""
    neighbours: dict[int, list[int]] = {}
    for i, j in bonds:
        neighbours.setdefault(i, []).append(j)
        neighbours.setdefault(j, []).append(i)
    rows = []
    for centre, around in sorted(neighbours.items()):
        if len(around) == 4 and sum(not heavy[a] for a in around) <= 1:
            rows.append([centre, *sorted(around, key=lambda a: (not heavy[a], a))[:3]])
    return np.array(rows, dtype=np.int64).reshape(-1, 4)


def _backbone_dihedrals(topology: app.Topology) -> tuple:
    """(phi, psi) atom rows of every residue that has both (mdtraj's definitions), in chain
    order: for a capped peptide Ace-(X)n-Nme, the n inner residues."""
    import mdtraj

    md_topology = mdtraj.Topology.from_openmm(topology)
    dummy = mdtraj.Trajectory(np.zeros((1, md_topology.n_atoms, 3)), md_topology)
    phi_rows, _ = mdtraj.compute_phi(dummy)
    psi_rows, _ = mdtraj.compute_psi(dummy)
    # the residue of a dihedral is that of its C-alpha: atom 2 of phi (C N CA C), 1 of psi
    phi_by_residue = {md_topology.atom(int(row[2])).residue.index: row for row in phi_rows}
    psi_by_residue = {md_topology.atom(int(row[1])).residue.index: row for row in psi_rows}
    return tuple((tuple(int(i) for i in phi_by_residue[r]), tuple(int(i) for i in psi_by_residue[r]))
                 for r in sorted(phi_by_residue.keys() & psi_by_residue.keys()))

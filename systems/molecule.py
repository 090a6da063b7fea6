"""The description of a molecular system that every stage of trade-md shares."""

from dataclasses import dataclass
import io
from typing import Callable

import numpy as np
import openmm
from openmm import unit
import openmm.app as app

from trademd.errors import TradeMDError

__all__ = ["LARGEST_MEASURED_RING", "MolecularSystem", "SOLVENTS", "peptide_bond_dihedrals"]

#: Solvent models a system may use.
SOLVENTS = ("implicit-obc", "vacuum")

#: Largest ring (atoms) whose closure the flow has been measured to keep (indole's rings: 6).
LARGEST_MEASURED_RING = 6


@dataclass(frozen=True)
class MolecularSystem:
    """One molecule, its force field, and what the later stages need to know about it.

    Attributes:
        name: registry name (``ala2-implicit``) or ``user:<pdb file name>``.
        description: one line for ``trade-md systems``.
        pdb_text: topology and reference positions as PDB text.
        forcefield_files: OpenMM force-field XML files (names OpenMM resolves, or paths).
        solvent: one of :data:`SOLVENTS`.
        zmatrix: int64 [n_atoms, 4], placement order (see :mod:`trademd.systems.zmatrix`).
        backbone_dihedrals: per residue with both, its (phi, psi) as two rows of four atom
            indices, in chain order (empty for a molecule without a backbone).
        chiral_centres: int [m, 4] rows (centre, a, b, c): atoms whose handedness
            (sign of the signed volume of a, b, c around the centre) samples must keep.
        constraints: ``"HBonds"``: bonds to hydrogen are rigid in MD (2 fs steps) and held
            fixed at their constraint lengths by the internal coordinates downstream;
            ``"None"``: every bond is flexible (and a flow dimension).
        ring_closures: bool [n_atoms], True for the Z-matrix rows placed by two ring bonds
            (:func:`trademd.systems.zmatrix.close_rings`); None: no rings.
        implied_ring_bonds: ring-closing bonds (i, j) that no coordinate holds (the flow
            cannot keep them near their length; :func:`trademd.systems.zmatrix.close_rings`).
        ring_sizes: atoms of the smallest ring through each ring-closing bond.
        openmm_factory: builds the OpenMM system when it does not come from
            ``forcefield_files`` (e.g. an openmmtools test system); takes the hydrogen mass in
            amu (None: force-field masses). Its particles follow the PDB's atom order.
        force_field: one line naming the force field, for listings (default: the XML files).
    """

    name: str
    description: str
    pdb_text: str
    forcefield_files: tuple[str, ...]
    solvent: str
    zmatrix: np.ndarray
    backbone_dihedrals: tuple[tuple[tuple[int, int, int, int], tuple[int, int, int, int]], ...]
    chiral_centres: np.ndarray
    constraints: str = "HBonds"
    ring_closures: np.ndarray | None = None
    implied_ring_bonds: tuple[tuple[int, int], ...] = ()
    ring_sizes: tuple[int, ...] = ()
    openmm_factory: Callable[[float | None], openmm.System] | None = None
    force_field: str = ""

    @property
    def phi_atoms(self) -> tuple[int, int, int, int] | None:
        """The first residue's phi dihedral (four atom indices), or None."""
        return self.backbone_dihedrals[0][0] if self.backbone_dihedrals else None

    @property
    def psi_atoms(self) -> tuple[int, int, int, int] | None:
        """The first residue's psi dihedral (four atom indices), or None."""
        return self.backbone_dihedrals[0][1] if self.backbone_dihedrals else None

    def ring_warning(self) -> str | None:
        """One line on rings the flow cannot hold well, or None.

        Ring closures (:func:`trademd.systems.zmatrix.close_rings`) make each ring-closing bond
        a coordinate; the ring's angles still depend on all its torsions, which small rings
        keep few and stiff (prolines, aromatic rings: measured, docs/results.md). A ring bond no
        coordinate holds, or a ring of more than :data:`LARGEST_MEASURED_RING` atoms (a
        macrocycle, a cyclic peptide), is outside what has been measured to work."""
        problems = []
        if self.implied_ring_bonds:
            problems.append(f"{len(self.implied_ring_bonds)} ring-closing bond(s) "
                            f"{list(self.implied_ring_bonds)} held by no coordinate (an atom closing two rings)")
        large = [size for size in self.ring_sizes if size > LARGEST_MEASURED_RING]
        if large:
            problems.append(f"ring(s) of {', '.join(map(str, sorted(large)))} atoms (measured up to "
                            f"{LARGEST_MEASURED_RING})")
        if not problems:
            return None
        return ("; ".join(problems) + ": the flow keeps such rings closed only approximately, expect a far "
                "lower ESS than for alanine dipeptide and check the samples' ring bonds")

    @property
    def md_timestep_ps(self) -> float:
        """The MD time step ``trade-md run`` uses (ps): 4 fs with rigid bonds to hydrogen
        (and :attr:`md_hydrogen_mass_amu`), 2 fs with every bond flexible."""
        return 0.004 if self.constraints == "HBonds" else 0.002

    @property
    def md_hydrogen_mass_amu(self) -> float | None:
        """The hydrogen mass ``trade-md run`` repartitions to (amu; None: force-field masses)."""
        return 1.5 if self.constraints == "HBonds" else None

    @property
    def force_field_label(self) -> str:
        """The force field in one line: :attr:`force_field`, else the XML files joined by +."""
        return self.force_field or " + ".join(self.forcefield_files)

    def pdb(self) -> app.PDBFile:
        """The PDB, parsed by OpenMM."""
        return app.PDBFile(io.StringIO(self.pdb_text))

    @property
    def n_atoms(self) -> int:
        return int(self.zmatrix.shape[0])

    def positions_nm(self) -> np.ndarray:
        """Reference positions of the PDB, float64 [n_atoms, 3] in nm."""
        return np.asarray(self.pdb().getPositions(asNumpy=True).value_in_unit(unit.nanometer), dtype=np.float64)

    def create_openmm_system(self, hydrogen_mass_amu: float | None = None) -> openmm.System:
        """The single-molecule OpenMM system: NoCutoff, constraints as :attr:`constraints`;
        with ``hydrogen_mass_amu``, hydrogens bonded to heavy atoms get that mass, taken from
        their heavy atom (OpenMM's hydrogen mass repartitioning)."""
        if self.openmm_factory is not None:
            return self.openmm_factory(hydrogen_mass_amu)
        return build_openmm_system(self.pdb().topology, self.forcefield_files, self.constraints,
                                   hydrogen_mass_amu)

    @property
    def peptide_bonds(self) -> np.ndarray:
        """int [k, 4]: the omega dihedral of every peptide bond (:func:`peptide_bond_dihedrals`)."""
        return np.asarray(peptide_bond_dihedrals(self.pdb().topology), dtype=np.int64).reshape(-1, 4)

    def mdtraj_topology(self):
        """The topology as an ``mdtraj.Topology``."""
        import mdtraj

        return mdtraj.Topology.from_openmm(self.pdb().topology)


def peptide_bond_dihedrals(topology: app.Topology) -> list[tuple[int, int, int, int]]:
    """Omega of every peptide bond (atom indices): the carbon before the carbonyl carbon (CA,
    or an acetyl's CH3), the carbonyl C, the next residue's N, and the carbon after it (CA,
    or an N-methyl's C)."""
    residues = list(topology.residues())
    omegas = []
    for before, after in zip(residues, residues[1:]):
        names_before = {a.name: a.index for a in before.atoms()}
        names_after = {a.name: a.index for a in after.atoms()}
        first = names_before.get("CA", names_before.get("CH3"))
        last = names_after.get("CA", names_after.get("C"))
        if None not in (first, last) and "C" in names_before and "N" in names_after:
            omegas.append((first, names_before["C"], names_after["N"], last))
    return omegas


def build_openmm_system(topology: app.Topology, forcefield_files, constraints: str,
                        hydrogen_mass_amu: float | None = None) -> openmm.System:
    """Create an OpenMM system for an isolated molecule, turning force-field errors into
    one-line :class:`TradeMDError` messages."""
    try:
        forcefield = app.ForceField(*forcefield_files)
    except (ValueError, OSError, Exception) as error:  # OpenMM raises plain Exception too
        raise TradeMDError(
            f"cannot load force field {list(forcefield_files)}: {_first_line(error)}; give XML "
            "files OpenMM ships (e.g. amber99sbildn.xml amber96_obc.xml) or existing paths"
        ) from None
    constraint = {"HBonds": app.HBonds, "None": None}[constraints]
    try:
        return forcefield.createSystem(
            topology, nonbondedMethod=app.NoCutoff, constraints=constraint, rigidWater=True,
            hydrogenMass=None if hydrogen_mass_amu is None else hydrogen_mass_amu * unit.amu,
        )
    except (ValueError, Exception) as error:
        raise TradeMDError(
            f"the force field {list(forcefield_files)} does not match the topology: "
            f"{_first_line(error)}; add the XML files that define these residues"
        ) from None


def _first_line(error: Exception) -> str:
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0]

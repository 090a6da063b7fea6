"""Peptide-bond isomers: cis/trans of every omega against mdtraj, the flag on turned bonds,
and samples whose peptide bond flipped get zero weight."""

import math

import mdtraj
import numpy as np
import pytest
import torch

from trademd.analysis.isomers import cis_peptide_bonds, flipped_peptide_bond_mask
from trademd.systems import get_system


def _turn_omega(molecule, positions: np.ndarray, bond: int, degrees: float) -> np.ndarray:
    """Positions with the atoms after peptide bond ``bond`` (residues after its carbonyl)
    turned about the C-N axis by ``degrees``."""
    omega = molecule.peptide_bonds[bond]
    residue_of = np.array([a.residue.index for a in molecule.pdb().topology.atoms()])
    moving = residue_of > residue_of[omega[1]]
    origin = positions[omega[2]]
    axis = (positions[omega[2]] - positions[omega[1]]) / np.linalg.norm(positions[omega[2]] - positions[omega[1]])
    angle = math.radians(degrees)
    r = positions[moving] - origin
    turned = positions.copy()
    turned[moving] = (origin + r * math.cos(angle) + np.cross(axis, r) * math.sin(angle)
                      + np.outer(r @ axis, axis) * (1 - math.cos(angle)))
    return turned


@pytest.mark.parametrize("name, bonds", [("ala2-implicit", 2), ("ala4-implicit", 4), ("pro2-implicit", 2)])
def test_peptide_bonds_are_the_omegas_mdtraj_finds(name, bonds):
    """Every peptide bond, the caps' included (mdtraj's omega misses the acetyl's, whose carbon
    before C is CH3, not CA): the N-methyl's omega is one of mdtraj's."""
    molecule = get_system(name)
    omegas = molecule.peptide_bonds
    assert omegas.shape == (bonds, 4)
    trajectory = mdtraj.Trajectory(molecule.positions_nm()[None], molecule.mdtraj_topology())
    found, _ = mdtraj.compute_omega(trajectory)
    assert {tuple(row) for row in found.tolist()} <= {tuple(row) for row in omegas.tolist()}


def test_turned_peptide_bonds_are_flagged_and_others_are_not():
    """Turning a bond by 180 degrees makes it cis (flagged); by 30 degrees it stays trans; a
    rigid rotation and translation changes nothing."""
    molecule = get_system("ala4-implicit")
    reference = molecule.positions_nm()
    omegas = molecule.peptide_bonds
    rotation = torch.linalg.qr(torch.randn(3, 3, generator=torch.Generator().manual_seed(2), dtype=torch.float64))[0]
    x = np.stack([reference, _turn_omega(molecule, reference, 1, 180.0), _turn_omega(molecule, reference, 3, 30.0),
                  reference @ rotation.numpy().T + 1.0])
    cis = cis_peptide_bonds(x, omegas).numpy()
    assert not cis[0].any() and cis[1].tolist() == [False, True, False, False] and not cis[2].any()
    assert flipped_peptide_bond_mask(x, omegas, reference).tolist() == [False, True, False, False]
    # against a cis reference, the trans structure is the flipped one
    assert flipped_peptide_bond_mask(x[:2], omegas, x[1]).tolist() == [True, False]
    degrees = np.degrees(mdtraj.compute_dihedrals(mdtraj.Trajectory(x, molecule.mdtraj_topology()), omegas))
    assert np.array_equal(cis, np.abs(degrees) < 90.0)

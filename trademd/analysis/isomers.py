"""Peptide-bond isomers: whether each peptide bond of a configuration is cis or trans, compared
with a reference structure (the PDB).

A prolyl (or any) peptide bond turns between cis and trans over a barrier of ~80 kJ/mol:
seconds to minutes at 300 K and rarely within nanoseconds even at 600 K, so MD data hold one
isomer and the sampler's ensemble is that of the data, as it is for chirality
(:mod:`trademd.analysis.chirality`). A flow sample on the other side of such a barrier lies
where the data never went: its density there is a guess and its importance weight can be
arbitrarily large, so ``trade-md sample`` flags it (weight zero) like a mirrored chiral centre.
"""

import math

import numpy as np
import torch
from torch import Tensor

__all__ = ["cis_peptide_bonds", "flipped_peptide_bond_mask"]


def _dihedrals(x: Tensor, rows) -> Tensor:
    """[..., k] dihedral angles (radians) of rows (a, b, c, d) for positions x [..., n, 3]."""
    idx = torch.as_tensor(np.asarray(rows), dtype=torch.long, device=x.device)
    p0, p1, p2, p3 = (x[..., idx[:, i], :] for i in range(4))
    b0, b1, b2 = p0 - p1, p2 - p1, p3 - p2
    b1 = b1 / torch.linalg.vector_norm(b1, dim=-1, keepdim=True)
    v = b0 - (b0 * b1).sum(-1, keepdim=True) * b1
    w = b2 - (b2 * b1).sum(-1, keepdim=True) * b1
    return torch.atan2((torch.cross(b1, v, dim=-1) * w).sum(-1), (v * w).sum(-1))


def cis_peptide_bonds(x, omegas) -> Tensor:
    """bool [..., k]: True where omega (rows of ``omegas``, int [k, 4], a system's
    ``peptide_bonds``) is cis, |omega| < 90 degrees, for positions x [..., n_atoms, 3]."""
    return _dihedrals(torch.as_tensor(x), omegas).abs() < math.pi / 2


def flipped_peptide_bond_mask(x, omegas, reference) -> Tensor:
    """bool [...]: True where any peptide bond's isomer (cis or trans) differs from that of
    ``reference`` [n_atoms, 3] (e.g. the PDB positions)."""
    x = torch.as_tensor(x)
    reference_cis = cis_peptide_bonds(torch.as_tensor(reference, dtype=x.dtype, device=x.device), omegas)
    return (cis_peptide_bonds(x, omegas) != reference_cis).any(-1)

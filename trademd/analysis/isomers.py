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

from trademd.flow.coordinates import dihedral

__all__ = ["cis_peptide_bonds", "flipped_peptide_bond_mask"]


def cis_peptide_bonds(x, omegas) -> Tensor:
    """bool [..., k]: True where omega (rows of ``omegas``, int [k, 4], a system's
    ``peptide_bonds``) is cis, |omega| < 90 degrees, for positions x [..., n_atoms, 3]."""
    x = torch.as_tensor(x)
    idx = torch.as_tensor(np.asarray(omegas), dtype=torch.long, device=x.device)
    return dihedral(*(x[..., idx[:, i], :] for i in range(4))).abs() < math.pi / 2


def flipped_peptide_bond_mask(x, omegas, reference) -> Tensor:
    """bool [...]: True where any peptide bond's isomer (cis or trans) differs from that of
    ``reference`` [n_atoms, 3] (e.g. the PDB positions)."""
    x = torch.as_tensor(x)
    reference_cis = cis_peptide_bonds(torch.as_tensor(reference, dtype=x.dtype, device=x.device), omegas)
    return (cis_peptide_bonds(x, omegas) != reference_cis).any(-1)

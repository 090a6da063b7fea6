"""Chirality of molecular configurations: the handedness of every chiral centre, as the sign
of the signed volume of three of its neighbours, compared with a reference structure (the PDB).

Centres are rows (centre, a, b, d) of atom indices, as a
:class:`~trademd.systems.MolecularSystem` lists them in ``chiral_centres``. A mirror image
(x -> -x) flips every sign; the internal coordinates cannot tell the two apart, so samples are
checked here (flagged by ``trade-md sample``) and reverse-KL training is restrained.
"""

import numpy as np
import torch
from torch import Tensor

__all__ = ["chirality_signs", "signed_volumes", "wrong_chirality_mask", "chirality_restraint"]


def chirality_signs(x, centres) -> Tensor:
    """Sign of the signed volume ``(a - c) . ((b - c) x (d - c))`` per centre row (c, a, b, d).

    Args:
        x: [..., n_atoms, 3] (tensor or array).
        centres: int [m, 4]: (centre, a, b, d), a system's ``chiral_centres``.

    Returns:
        [..., m] in {-1, 0, +1} (0 only for an exactly planar centre). A mirror image
        (x -> -x) flips every sign.
    """
    return torch.sign(signed_volumes(torch.as_tensor(x), centres))


def signed_volumes(x: Tensor, centres) -> Tensor:
    """``(a - c) . ((b - c) x (d - c))`` per centre row (c, a, b, d) of ``centres`` (int
    [m, 4]) for positions x [..., n_atoms, 3]: [..., m] (nm^3)."""
    idx = torch.as_tensor(np.asarray(centres), dtype=torch.long, device=x.device)
    c, a, b, d = (x[..., idx[:, i], :] for i in range(4))
    return ((a - c) * torch.cross(b - c, d - c, dim=-1)).sum(-1)


def wrong_chirality_mask(x, centres, reference) -> Tensor:
    """bool [...]: True where any centre's sign differs from that of ``reference``
    [n_atoms, 3] (e.g. the PDB positions)."""
    x = torch.as_tensor(x)
    ref = chirality_signs(torch.as_tensor(reference, dtype=x.dtype, device=x.device), centres)
    return (chirality_signs(x, centres) != ref).any(-1)


def chirality_restraint(x: Tensor, centres, reference) -> Tensor:
    """Flat-bottom restraint that keeps every centre's handedness that of ``reference``:
    sum over centres of relu(-V / V_ref), V the signed volume of :func:`chirality_signs`.

    Zero for every configuration with the reference's chirality (so a target
    exp(-u - k * restraint) equals exp(-u) there), about 1 per mirrored centre, and
    differentiable in x: reverse-KL training uses it to keep a flow on the physical enantiomer.

    Args:
        x: [B, n_atoms, 3] (nm).
        centres: int [m, 4] rows (centre, a, b, d).
        reference: [n_atoms, 3] positions with the wanted chirality.

    Returns:
        [B], dimensionless.
    """
    reference_volume = signed_volumes(torch.as_tensor(reference, dtype=x.dtype, device=x.device), centres)
    return torch.relu(-signed_volumes(x, centres) / reference_volume).sum(-1)

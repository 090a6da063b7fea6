"""Internal coordinates: a bijective, differentiable map between Cartesian coordinates and the
features a normalizing flow models.

**Internal coordinates.** A Z-matrix (int [n_atoms, 4], rows (atom, bond partner, angle
partner, torsion partner) in placement order, see :mod:`trademd.systems.zmatrix`) defines,
per row k:

- bond ``b_k = |x_atom - x_bond|`` (nm) for rows k >= 1 (n_atoms - 1 bonds; rows 1 and 2 are
  the seeds' bonds s0-s1 and s1-s2),
- angle ``a_k = angle(x_atom, x_bond, x_angle)`` at the bond partner, in (0, pi) rad, for
  rows k >= 2 (n_atoms - 2 angles; row 2 is the seed angle s0-s1-s2),
- torsion ``t_k = dihedral(x_atom, x_bond, x_angle, x_torsion)`` (IUPAC sign, as
  ``mdtraj.compute_dihedrals``), in [-pi, pi) rad, for rows k >= 3 (n_atoms - 3 torsions).

That is 3 n_atoms - 6 numbers. For alanine dipeptide the row (4, 6, 8, 14) is phi and the row
(16, 14, 8, 6) is psi (a dihedral is the same read backwards).

**Canonical frame (the 6 external degrees of freedom).** The inverse map places the seed s1
at the origin, s0 on the +x axis at ``(b_1, 0, 0)`` and s2 in the xy-plane with y > 0 at
``b_2 (cos a_2, sin a_2, 0)``; every later atom by its bond, angle and torsion (NeRF). So
``inverse(forward(x))`` is x translated and rotated (a proper rotation, never a reflection)
into that frame.

**Jacobian convention.** ``log J(ic) = sum_{k>=1} 2 log b_k + sum_{k>=2} log sin a_k``, i.e.
per placed atom ``2 log b + log sin a`` plus the seeds' terms ``2 log b_1 + 2 log b_2 +
log sin a_2``. This is the volume factor of ``dx = d^3t dR J(ic) d(ic)``: Lebesgue measure on
R^{3n} in terms of a translation t, a rotation R (Haar measure, volume 8 pi^2, equal to
``d^3 omega`` at the identity in axis-angle coordinates omega) and the internal coordinates.
Equivalently it is ``log|det|`` of the square map (ic, omega, t) -> x at omega = 0 (tested
with autograd), or of the square map ic -> the 3n - 6 Cartesian coordinates free in the
canonical frame (s0.x, s2.x, s2.y and all of every later atom) plus the orbit factor
``2 log b_1 + log b_2 + log sin a_2`` of the rigid motions (tested too). The frame-only
determinant alone would not do: the Boltzmann density of x, marginalised over rigid motions,
carries that orbit factor.

**What the flow models.** :class:`InternalCoordinates` maps x to features z = (torsions,
bounded): torsions [B, n_torsions] on the circle [-pi, pi) (unchanged, log-det 0) and
``bounded`` [B, n_bonded_dims] = the unconstrained bonds (Z-matrix row order) then all angles,
each standardised with training mean and std and scaled into ``[-bound, bound]``:
``z = bound (v - mean) / (n_std std)``, so the interval holds ``mean +- n_std std``
(defaults bound = 1, n_std = 5; matches zuko's ``MonotonicRQSTransform(bound=bound)``).
The flow models a density ``q_Z`` on ``[-pi, pi)^{n_torsions} x [-bound, bound]^{n_bonded}``;
through this map it defines

    log q_X(x) = log q_Z(z(x)) + forward_log_det(x),
    forward_log_det = -log J(ic) - sum_d log(n_std std_d / bound),

a density of configurations modulo rigid motions, w.r.t. ``dx / (d^3t dR)``. The matching
target is ``p_X(x) = exp(-u(x)) / Z_int`` with ``Z_int = int exp(-u) dx / (V 8 pi^2)``, so
importance weights ``-u(x) - log q_X(x)`` are right up to one constant. ``inverse`` returns
``+log J + sum log(scale)``: forward and inverse log-dets add to 0 on a round trip.

**Constrained bonds** (HBonds; the MD data were made with them): a bond whose (atom, bond
partner) pair is constrained is held at the constraint length, is not a flow dimension, and
gets no normalisation term. Its ``2 log b`` in log J stays (a constant: the area element
``b^2 sin a da dt`` of the sphere the atom then lives on). The density is then one on the
constrained manifold, in its coordinates (the other internal coordinates), w.r.t.
``prod_free db prod b^2 sin a da dt``. Constrained MD samples ``exp(-u)`` times the Fixman
factor ``sqrt(det G)`` of the mass-weighted constraint metric relative to that measure; for
X-H bond constraints G is nearly constant (it varies only through H-X-H angles at CH3 / CH2
groups, by about 1e-3 in log) and is neglected here. ``forward`` ignores the data's values of
constrained bonds (the inverse uses the constraint lengths); :meth:`InternalCoordinates.fit`
checks that the training data obey the constraints.

**Ring closures.** A Z-matrix row may be a *closure row* (``closures[k]`` True): its angle
partner B is bonded to the row's atom c (not to the bond partner A), and the row's second
coordinate is the distance ``r2 = |x_c - x_B|`` (nm) instead of the angle c-A-B. Both bonds
of c into a ring are then coordinates, so errors in the ring's torsions no longer stretch the
ring-closing bond (a spanning-tree Z-matrix leaves it implied); they bend angles instead, which
are about 50x softer. The torsion is ``dihedral(c, A, B, D)``; c lies on the circle where the
spheres of radius r1 = |cA| about A and r2 about B meet, and the torsion is its position on
that circle. The inverse recovers the angle at A from r1, r2 and ``d = |x_A - x_B|``
(``cos a = (r1^2 + d^2 - r2^2) / (2 r1 d)``) and places c by NeRF; the volume element is
``r1 r2 / d dr1 dr2 dt`` (bipolar coordinates about the A-B axis), so a closure row
contributes ``log r1 + log r2 - log d`` to log J instead of ``2 log r1 + log sin a``. Where
the three lengths violate the triangle inequality (|r1 - r2| < d < r1 + r2), which a flow can
propose but no molecule has, c is placed on the A-B axis (the angle at A clamped to 0 or pi):
such a configuration bends a ring angle flat, its energy is far above kT and its importance
weight vanishes.

**Narrow torsions.** A torsion that barely moves in the training data (a methyl hydrogen's
offset from its sibling, an H on a ring, a peptide bond's omega) is a poor fit for a circular
spline, which must squeeze a uniform base into a peak a few hundredths of the circle wide.
Such a torsion (``narrow_torsions[k]`` True) is a bounded feature instead: centred on its
circular mean c (:attr:`InternalCoordinates.torsion_centre`), unwrapped onto
``c + [-pi, pi)`` and normalised like a bond (``bound (t - mean) / (n_std std)``), so the flow
sees a peak of width ~1/n_std like every bond and angle. The map is a shift and a scale (log-det
``-log(n_std std / bound)``); its support ``mean +- n_std std`` must lie inside one turn, and a
configuration outside it is out of range like a stretched bond. :meth:`InternalCoordinates.from_data`
picks them with ``narrow_torsion_rad``: circular spread below it and every training frame
inside the support (so a rare second mode in the data keeps its torsion circular).
Feature order: periodic torsions (Z-matrix row order, narrow ones left out), then bounded =
free bonds, angles, narrow torsions.

**Out-of-range values.** Bounded features outside ``[-bound, bound]`` (a configuration beyond
``n_std`` training standard deviations) are outside the flow's support. ``forward`` returns a
per-sample flag ``out_of_range`` and, by the ``out_of_range`` option, keeps the values
(``"flag"``, default: the map stays exact; give such samples log q = -inf), clamps them
(``"clamp"``: no longer invertible for flagged samples) or raises (``"raise"``).

**Chirality.** The internal coordinates cannot tell a chiral centre from its mirror image
through the torsions alone: a flow may place alanine's CB on the wrong side of CA (a D-amino
acid). Chosen option: report and filter (:mod:`trademd.analysis.chirality`); the sample stage
flags and drops such samples.

Example:

>>> import torch
>>> from trademd.systems import get_system
>>> system = get_system("ala2-vacuum")
>>> x = torch.as_tensor(system.positions_nm())[None].repeat(4, 1, 1)
>>> x = x + 0.005 * torch.randn_like(x, generator=torch.Generator().manual_seed(0))
>>> ic = InternalCoordinates.from_data(system.zmatrix, x)  # no constraints: 21 bonds, 20 angles
>>> (ic.n_torsions, ic.n_bonded_dims)
(19, 41)
>>> features, log_det = ic(x)
>>> x_back, log_det_back = ic.inverse(features.torsions, features.bounded)
>>> bool(torch.allclose(log_det + log_det_back, torch.zeros(4, dtype=x.dtype)))
True
"""

from __future__ import annotations

from collections.abc import Mapping
import math
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor, nn

from trademd.errors import TradeMDError
from trademd.systems.zmatrix import validate_zmatrix

__all__ = [
    "ICFeatures",
    "InternalCoordinates",
    "cartesian_to_internal",
    "constrained_bonds_from_openmm",
    "dihedral",
    "circular_mean",
    "circular_spread",
    "closure_axis_lengths",
    "internal_log_det",
    "internal_to_cartesian",
    "narrow_torsion_mask",
]


_OUT_OF_RANGE_MODES = ("flag", "clamp", "raise")


# ----------------------------------------------------------------------------------------------
# Geometry primitives (any leading batch shape, any float dtype / device)


def _angle(p_i: Tensor, p_j: Tensor, p_k: Tensor) -> Tensor:
    """Angle i-j-k at j in [0, pi] rad; atan2 form, accurate near 0 and pi. [..., 3] -> [...]."""
    u, v = p_i - p_j, p_k - p_j
    return torch.atan2(torch.linalg.vector_norm(torch.cross(u, v, dim=-1), dim=-1), (u * v).sum(-1))


def dihedral(p0: Tensor, p1: Tensor, p2: Tensor, p3: Tensor) -> Tensor:
    """IUPAC dihedral 0-1-2-3 in [-pi, pi) rad (mdtraj's sign). [..., 3] -> [...]."""
    b1, b2, b3 = p1 - p0, p2 - p1, p3 - p2
    n1, n2 = torch.cross(b1, b2, dim=-1), torch.cross(b2, b3, dim=-1)
    y = torch.linalg.vector_norm(b2, dim=-1) * (b1 * n2).sum(-1)
    t = torch.atan2(y, (n1 * n2).sum(-1))
    return torch.where(t >= math.pi, t - 2 * math.pi, t)


def _place(p_a: Tensor, p_b: Tensor, p_c: Tensor, r: Tensor, theta: Tensor, phi: Tensor) -> Tensor:
    """NeRF: the point d with |d - c| = r, angle(d, c, b) = theta, dihedral(a, b, c, d) = phi.

    Args: p_a, p_b, p_c [..., 3]; r, theta, phi [...]. Returns [..., 3]."""
    bc = p_c - p_b
    bc = bc / torch.linalg.vector_norm(bc, dim=-1, keepdim=True)
    n = torch.cross(p_b - p_a, bc, dim=-1)
    n = n / torch.linalg.vector_norm(n, dim=-1, keepdim=True)
    m = torch.cross(n, bc, dim=-1)
    sin_t = torch.sin(theta)
    d = torch.stack([-r * torch.cos(theta), r * sin_t * torch.cos(phi), r * sin_t * torch.sin(phi)], -1)
    return p_c + d[..., 0:1] * bc + d[..., 1:2] * m + d[..., 2:3] * n


def _wrap_near(torsions: Tensor, centre: Tensor) -> Tensor:
    """Torsions [..., n] (rad) moved by whole turns onto ``centre + [-pi, pi)`` (centre [n])."""
    return centre + torch.remainder(torsions - centre + math.pi, 2 * math.pi) - math.pi


def circular_mean(torsions: Tensor) -> Tensor:
    """Circular mean [n] in [-pi, pi] (rad) of torsions [N, n] (rad)."""
    return torch.atan2(torch.sin(torsions).sum(0), torch.cos(torsions).sum(0))


def circular_spread(torsions: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(circular mean [n] in [-pi, pi), std [n] of the torsions unwrapped about it, largest
    |deviation| [n]) of torsions [N, n] rad; all rad."""
    centre = circular_mean(torsions)
    deviation = _wrap_near(torsions, centre) - centre
    return centre, deviation.std(0), deviation.abs().amax(0)


def _zmatrix_tensor(zmatrix, device) -> Tensor:
    return torch.as_tensor(np.asarray(zmatrix), dtype=torch.long, device=device)


def _placement_levels(zmatrix: np.ndarray) -> list[np.ndarray]:
    """Rows >= 3 grouped so that every row's partners are placed in earlier groups."""
    level_of = {int(zmatrix[k, 0]): 0 for k in range(min(3, len(zmatrix)))}
    levels: dict[int, list[int]] = {}
    for k in range(3, len(zmatrix)):
        level = 1 + max(level_of[int(p)] for p in zmatrix[k, 1:])
        level_of[int(zmatrix[k, 0])] = level
        levels.setdefault(level, []).append(k)
    return [np.asarray(levels[key], dtype=np.int64) for key in sorted(levels)]


# ----------------------------------------------------------------------------------------------
# Functional transform


def cartesian_to_internal(x: Tensor, zmatrix, closures=None) -> tuple[Tensor, Tensor, Tensor]:
    """Bonds, angles and torsions of the Z-matrix rows.

    Args:
        x: Cartesian coordinates [..., n_atoms, 3], nm.
        zmatrix: int [n_atoms, 4] (array or tensor).
        closures: bool [n_atoms] (array or tensor), True for closure rows (module docstring);
            None: none.

    Returns:
        bonds [..., n_atoms - 1] nm (rows 1..), angles [..., n_atoms - 2] rad in [0, pi]
        (rows 2..; at closure rows the distance atom - angle partner, nm), torsions
        [..., n_atoms - 3] rad in [-pi, pi) (rows 3..).
    """
    z = zmatrix if isinstance(zmatrix, Tensor) else _zmatrix_tensor(zmatrix, x.device)
    atom, bond, angle, torsion = z.unbind(-1)
    bonds = torch.linalg.vector_norm(x[..., atom[1:], :] - x[..., bond[1:], :], dim=-1)
    angles = _angle(x[..., atom[2:], :], x[..., bond[2:], :], x[..., angle[2:], :])
    closing = _closure_mask(closures, z.shape[0], x.device)
    if closing is not None:
        ring_bonds = torch.linalg.vector_norm(x[..., atom[2:], :] - x[..., angle[2:], :], dim=-1)
        angles = torch.where(closing[2:], ring_bonds, angles)
    torsions = dihedral(
        x[..., atom[3:], :], x[..., bond[3:], :], x[..., angle[3:], :], x[..., torsion[3:], :]
    )
    return bonds, angles, torsions


def closure_axis_lengths(x: Tensor, zmatrix) -> Tensor:
    """Distances bond partner - angle partner of rows 2.. (nm), [..., n_atoms - 2]: the ``d``
    of a closure row's log-det (module docstring)."""
    z = zmatrix if isinstance(zmatrix, Tensor) else _zmatrix_tensor(zmatrix, x.device)
    return torch.linalg.vector_norm(x[..., z[2:, 1], :] - x[..., z[2:, 2], :], dim=-1)


def _closure_mask(closures, n_atoms: int, device) -> Tensor | None:
    """bool [n_atoms] tensor of closure rows, or None where there are none."""
    if closures is None:
        return None
    if isinstance(closures, Tensor):
        mask = closures.to(device=device, dtype=torch.bool)
    else:
        mask = torch.as_tensor(np.asarray(closures, dtype=bool), device=device)
    if mask.shape != (n_atoms,):
        raise TradeMDError(f"ring-closure flags must have shape ({n_atoms},), got {tuple(mask.shape)}")
    if bool(mask[:3].any()):
        raise TradeMDError("the three seed rows of a Z-matrix cannot be ring-closure rows")
    return mask if bool(mask.any()) else None


def _closure_angle(r1: Tensor, r2: Tensor, axis: Tensor) -> Tensor:
    """Angle at A (rad) of the triangle with sides r1 = |cA|, r2 = |cB|, axis = |AB|; clamped
    to 0 or pi where the sides violate the triangle inequality. [...] -> [...]."""
    along = (axis**2 + r1**2 - r2**2) / (2 * axis)
    height = (r1**2 - along**2).clamp_min(_MIN_CLOSURE_HEIGHT_NM2).sqrt()
    return torch.atan2(height, along)


#: Smallest squared height of a closure atom above its A-B axis (nm^2) the inverse uses:
#: keeps gradients finite for the infeasible triangles a flow may propose.
_MIN_CLOSURE_HEIGHT_NM2 = 1e-8


def internal_to_cartesian(
    bonds: Tensor, angles: Tensor, torsions: Tensor, zmatrix, levels: list[Tensor] | None = None,
    closures=None,
) -> Tensor:
    """Cartesian coordinates in the canonical frame (see module docstring).

    Args:
        bonds: [..., n_atoms - 1] nm; angles: [..., n_atoms - 2] rad (at closure rows the
            distance atom - angle partner, nm); torsions: [..., n_atoms - 3] rad (any real
            value; periodic).
        zmatrix: int [n_atoms, 4].
        levels: precomputed placement groups (row indices); computed if None.
        closures: bool [n_atoms], True for closure rows; None: none.

    Returns:
        x [..., n_atoms, 3] nm, s1 at the origin, s0 on +x, s2 in the xy-plane (y > 0).
    """
    z = zmatrix if isinstance(zmatrix, Tensor) else _zmatrix_tensor(zmatrix, bonds.device)
    if levels is None:
        levels = [torch.as_tensor(g, device=z.device) for g in _placement_levels(z.cpu().numpy())]
    n_atoms = z.shape[0]
    closing = _closure_mask(closures, n_atoms, bonds.device)
    closing_rows = set() if closing is None else set(np.flatnonzero(closing.cpu().numpy()).tolist())
    atom, bond, angle, torsion = z.unbind(-1)
    batch = bonds.shape[:-1]
    zero = torch.zeros(batch, dtype=bonds.dtype, device=bonds.device)
    b1, b2, a2 = bonds[..., 0], bonds[..., 1], angles[..., 0]
    seeds = torch.stack(
        [
            torch.stack([b1, zero, zero], -1),
            torch.stack([zero, zero, zero], -1),
            torch.stack([b2 * torch.cos(a2), b2 * torch.sin(a2), zero], -1),
        ],
        dim=-2,
    )
    x = torch.zeros(*batch, n_atoms, 3, dtype=bonds.dtype, device=bonds.device)
    x = x.index_copy(-2, atom[:3], seeds)
    for rows in levels:
        p_bond, p_angle = x[..., bond[rows], :], x[..., angle[rows], :]
        r1, theta = bonds[..., rows - 1], angles[..., rows - 2]
        if closing_rows and not closing_rows.isdisjoint(rows.tolist()):
            ring = closing[rows]
            axis = torch.linalg.vector_norm(p_bond - p_angle, dim=-1)
            theta = torch.where(ring, _closure_angle(r1, torch.where(ring, theta, r1), axis), theta)
        new = _place(x[..., torsion[rows], :], p_angle, p_bond, r1, theta, torsions[..., rows - 3])
        x = x.index_copy(-2, atom[rows], new)
    return x


def internal_log_det(bonds: Tensor, angles: Tensor, closures=None, axis_nm: Tensor | None = None) -> Tensor:
    """``log J = sum 2 log b + sum log sin a`` (module docstring): log|dx / (d^3t dR d(ic))|;
    a closure row contributes ``log r1 + log r2 - log d`` instead.

    Args: bonds [..., n_atoms - 1] nm, angles [..., n_atoms - 2] rad (closure rows: nm);
    closures bool [n_atoms] or None; axis_nm [..., n_atoms - 2] the distances bond partner -
    angle partner (:func:`closure_axis_lengths`), needed only with closures. Returns [...]."""
    closing = _closure_mask(closures, bonds.shape[-1] + 1, bonds.device)
    if closing is None:
        return 2 * torch.log(bonds).sum(-1) + torch.log(torch.sin(angles)).sum(-1)
    if axis_nm is None:
        raise TradeMDError("the log-det of ring-closure rows needs the axis lengths (closure_axis_lengths)")
    ring = closing[2:]
    r1 = bonds[..., 1:]
    standard = 2 * torch.log(r1) + torch.log(torch.sin(torch.where(ring, torch.ones_like(angles), angles)))
    closed = torch.log(r1) + torch.log(torch.where(ring, angles, r1)) - torch.log(axis_nm)
    return 2 * torch.log(bonds[..., 0]) + torch.where(ring, closed, standard).sum(-1)


# ----------------------------------------------------------------------------------------------
# Constraints


def constrained_bonds_from_openmm(system) -> dict[tuple[int, int], float]:
    """The distance constraints of an ``openmm.System``: ``{(i, j): length_nm}`` with i < j."""
    out: dict[tuple[int, int], float] = {}
    for k in range(system.getNumConstraints()):
        i, j, length = system.getConstraintParameters(k)
        if hasattr(length, "value_in_unit"):
            import openmm.unit as unit

            length = length.value_in_unit(unit.nanometer)
        out[(min(int(i), int(j)), max(int(i), int(j)))] = float(length)
    return out


def _as_constraint_dict(constraints) -> dict[tuple[int, int], float]:
    if constraints is None:
        return {}
    if hasattr(constraints, "getNumConstraints"):
        return constrained_bonds_from_openmm(constraints)
    return {(min(int(i), int(j)), max(int(i), int(j))): float(v) for (i, j), v in constraints.items()}


# ----------------------------------------------------------------------------------------------
# The module


def narrow_torsion_mask(x, zmatrix, max_spread_rad: float, n_std: float = 5.0, closures=None) -> np.ndarray:
    """Which torsions to model as bounded features (module docstring, "Narrow torsions").

    A torsion is narrow where its spread about its circular mean in the frames x is below
    ``max_spread_rad`` and ``n_std`` spreads stay inside half a turn, and every frame lies
    inside ``mean +- n_std spread`` (so a rare second mode keeps the torsion periodic).

    Args:
        x: [N, n_atoms, 3] nm (tensor or array), N >= 2.
        zmatrix: int [n_atoms, 4].
        max_spread_rad: the spread below which a torsion is narrow (rad).
        n_std: the normalisation's interval half width in spreads.
        closures: as :class:`InternalCoordinates`.

    Returns: bool [n_atoms - 3].
    """
    x = torch.as_tensor(np.asarray(x) if not isinstance(x, Tensor) else x, dtype=torch.float64)
    torsions = cartesian_to_internal(x, zmatrix, closures)[2]
    _, spread, largest = circular_spread(torsions)
    narrow = (spread < max_spread_rad) & (n_std * spread < math.pi) & (largest < n_std * spread)
    return narrow.cpu().numpy()


class ICFeatures(NamedTuple):
    """What :meth:`InternalCoordinates.forward` returns besides the log-det.

    Attributes:
        torsions: [B, n_torsions] rad in [-pi, pi) (the periodic torsions).
        bounded: [B, n_bonded_dims]: free bonds (Z-matrix row order), angles, then narrow
            torsions, each in ``[-bound, bound]`` unless flagged.
        out_of_range: bool [B], True where some bounded value lay outside ``[-bound, bound]``.
    """

    torsions: Tensor
    bounded: Tensor
    out_of_range: Tensor


class InternalCoordinates(nn.Module):
    """Bijection x (canonical frame) <-> (periodic torsions, normalised bonds, angles and narrow
    torsions), with log-dets.

    See the module docstring for the conventions. State: buffers (Z-matrix, constraints,
    narrow-torsion flags and centres, mean, std) plus ``bound``, ``n_std`` and ``fitted`` as
    extra state: the module moves with ``.to(device)`` / ``.double()``, saves with
    ``torch.save(ic.state_dict(), path)`` and
    :meth:`from_state_dict` rebuilds it.

    Args:
        zmatrix: int [n_atoms, 4] in placement order.
        constrained_bonds: ``{(i, j): length_nm}`` (e.g. :func:`constrained_bonds_from_openmm`)
            or an ``openmm.System``; every pair must be a Z-matrix bond (atom, bond partner).
        bound: the bounded features live in ``[-bound, bound]``.
        n_std: that interval holds ``mean +- n_std std`` of the training data.
        out_of_range: ``"flag"``, ``"clamp"`` or ``"raise"`` (module docstring).
        closures: bool [n_atoms], True for the Z-matrix rows placed by two ring bonds
            (module docstring); None: none.
        narrow_torsions: bool [n_atoms - 3], True for torsions (Z-matrix rows 3..) modelled as
            bounded features (module docstring); None: none.
    """

    def __init__(
        self,
        zmatrix,
        constrained_bonds=None,
        *,
        closures=None,
        narrow_torsions=None,
        bound: float = 1.0,
        n_std: float = 5.0,
        out_of_range: str = "flag",
    ) -> None:
        super().__init__()
        z = np.asarray(zmatrix.cpu() if isinstance(zmatrix, Tensor) else zmatrix, dtype=np.int64)
        if z.ndim != 2 or z.shape[1] != 4 or z.shape[0] < 4:
            raise TradeMDError("internal coordinates need a Z-matrix of shape (n_atoms >= 4, 4)")
        validate_zmatrix(z, z.shape[0])
        if out_of_range not in _OUT_OF_RANGE_MODES:
            raise TradeMDError(f"out_of_range must be one of {_OUT_OF_RANGE_MODES}, not {out_of_range!r}")
        if not (bound > 0 and n_std > 0):
            raise TradeMDError("bound and n_std must be positive")
        self.out_of_range = out_of_range
        n_atoms = z.shape[0]

        constraints = _as_constraint_dict(constrained_bonds)
        row_of_pair = {
            (int(min(z[k, 0], z[k, 1])), int(max(z[k, 0], z[k, 1]))): k for k in range(1, n_atoms)
        }
        fixed = np.zeros(n_atoms - 1, dtype=bool)
        lengths = np.zeros(n_atoms - 1, dtype=np.float64)
        for pair, length in constraints.items():
            if pair not in row_of_pair:
                raise TradeMDError(
                    f"the constrained pair {pair} is not a bond of the Z-matrix: internal "
                    "coordinates can hold only Z-matrix bonds fixed; use a Z-matrix that places "
                    "the constrained atom from its partner, or simulate without that constraint"
                )
            if not length > 0:
                raise TradeMDError(f"the constraint length of {pair} must be positive")
            fixed[row_of_pair[pair] - 1] = True
            lengths[row_of_pair[pair] - 1] = length
        n_free = int((~fixed).sum())
        narrow = np.zeros(n_atoms - 3, dtype=bool) if narrow_torsions is None else np.asarray(
            narrow_torsions.cpu() if isinstance(narrow_torsions, Tensor) else narrow_torsions, dtype=bool)
        if narrow.shape != (n_atoms - 3,):
            raise TradeMDError(f"narrow_torsions must hold one flag per torsion ({n_atoms - 3}), "
                               f"got shape {narrow.shape}")
        n_bonded = n_free + n_atoms - 2 + int(narrow.sum())

        self.register_buffer("zmatrix", torch.as_tensor(z))
        closing = _closure_mask(closures, n_atoms, torch.device("cpu"))
        self.register_buffer(
            "closures", torch.zeros(n_atoms, dtype=torch.bool) if closing is None else closing.clone())
        self.register_buffer("bond_fixed", torch.as_tensor(fixed))
        self.register_buffer("fixed_lengths", torch.as_tensor(lengths))
        self.register_buffer("narrow", torch.as_tensor(narrow))
        self.register_buffer("torsion_centre", torch.zeros(int(narrow.sum()), dtype=torch.float64))
        self.register_buffer("_periodic_index", torch.as_tensor(np.flatnonzero(~narrow)), persistent=False)
        self.register_buffer("_narrow_index", torch.as_tensor(np.flatnonzero(narrow)), persistent=False)
        self.bound = float(bound)
        self.n_std = float(n_std)
        self.fitted = False
        self.register_buffer("mean", torch.zeros(n_bonded, dtype=torch.float64))
        self.register_buffer("std", torch.ones(n_bonded, dtype=torch.float64))
        self.register_buffer(
            "_free_rows", torch.as_tensor(np.flatnonzero(~fixed), dtype=torch.long), persistent=False
        )
        self._n_levels = 0
        for i, rows in enumerate(_placement_levels(z)):
            self.register_buffer(f"_level_{i}", torch.as_tensor(rows), persistent=False)
            self._n_levels += 1

    # -- construction ---------------------------------------------------------------------

    @classmethod
    def from_data(cls, zmatrix, x_train, constraints=None, narrow_torsion_rad: float = 0.0,
                  **kwargs) -> "InternalCoordinates":
        """Build and :meth:`fit` in one call. ``x_train`` [N, n_atoms, 3] nm (tensor or array);
        ``constraints`` as ``constrained_bonds`` of the constructor; torsions whose circular
        spread in ``x_train`` is below ``narrow_torsion_rad`` (rad; 0: none) and whose every
        frame lies inside their support become narrow (:func:`narrow_torsion_mask`)."""
        if narrow_torsion_rad > 0:
            kwargs["narrow_torsions"] = narrow_torsion_mask(
                x_train, zmatrix, narrow_torsion_rad, kwargs.get("n_std", 5.0), kwargs.get("closures"))
        return cls(zmatrix, constraints, **kwargs).fit(x_train)

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Tensor], **kwargs) -> "InternalCoordinates":
        """Rebuild a module saved with ``torch.save(ic.state_dict(), path)``."""
        z = state["zmatrix"].cpu().numpy()
        fixed = state["bond_fixed"].cpu().numpy()
        lengths = state["fixed_lengths"].cpu().numpy()
        constraints = {
            (int(min(z[k + 1, 0], z[k + 1, 1])), int(max(z[k + 1, 0], z[k + 1, 1]))): float(lengths[k])
            for k in np.flatnonzero(fixed)
        }
        extra = state["_extra_state"]
        state = dict(state)
        # files written before ring closures / narrow torsions existed hold none
        state.setdefault("closures", torch.zeros(len(z), dtype=torch.bool))
        state.setdefault("narrow", torch.zeros(len(z) - 3, dtype=torch.bool))
        state.setdefault("torsion_centre", torch.zeros(0, dtype=torch.float64))
        module = cls(z, constraints, closures=state["closures"], narrow_torsions=state["narrow"],
                     bound=extra["bound"], n_std=extra["n_std"], **kwargs)
        module.load_state_dict(state)
        return module

    @torch.no_grad()
    def fit(self, x, chunk: int = 65536) -> "InternalCoordinates":
        """Set mean and std of the free bonds and angles from training data.

        Args:
            x: [N, n_atoms, 3] nm, N >= 2 (tensor or array; computed in float64).
            chunk: frames per pass (bounds memory for long trajectories).

        Raises:
            TradeMDError: on too few frames, a bond or angle that does not vary (a constraint
                not declared), or data that violate a declared constraint by > 1e-3 nm.
        """
        x = torch.as_tensor(np.asarray(x) if not isinstance(x, Tensor) else x)
        if x.ndim != 3 or x.shape[1:] != (self.n_atoms, 3):
            raise TradeMDError(f"training coordinates must have shape (N, {self.n_atoms}, 3)")
        if x.shape[0] < 2:
            raise TradeMDError("fitting the normalisation needs at least 2 training frames")
        device = self.mean.device
        if self.n_narrow_torsions:
            self.torsion_centre.copy_(self._circular_mean(x, chunk))
        shift = None
        total = torch.zeros_like(self.mean)
        total_sq = torch.zeros_like(self.mean)
        worst = torch.zeros((), dtype=torch.float64, device=device)
        for start in range(0, x.shape[0], chunk):
            part = x[start : start + chunk].to(device=device, dtype=torch.float64)
            bonds, angles, torsions = cartesian_to_internal(part, self.zmatrix, self._closures())
            v = self._bounded_values(bonds, angles, torsions)
            if shift is None:
                shift = v[0]
            total += (v - shift).sum(0)
            total_sq += ((v - shift) ** 2).sum(0)
            if bool(self.bond_fixed.any()):
                dev = (bonds[:, self.bond_fixed] - self.fixed_lengths[self.bond_fixed]).abs().max()
                worst = torch.maximum(worst, dev)
        n = x.shape[0]
        mean_shifted = total / n
        var = (total_sq / n - mean_shifted**2) * n / (n - 1)
        std = var.clamp_min(0).sqrt()
        if float(worst) > 1e-3:
            raise TradeMDError(
                f"the training data violate a declared bond constraint by {float(worst):.2g} nm: "
                "pass the constraints the data were simulated with"
            )
        if bool((std < 1e-6).any()):
            k = int(torch.nonzero(std < 1e-6)[0, 0])
            raise TradeMDError(
                f"bounded feature {k} ({self._feature_name(k)}) does not vary in the training "
                "data: if it is a constrained bond, pass the system's constraints"
            )
        if bool((std[self.n_bonds + self.n_angles:] * self.n_std >= math.pi).any()):
            raise TradeMDError(
                f"a narrow torsion spreads over more than a turn in {self.n_std:g} standard "
                "deviations: model it as periodic (a smaller narrow_torsion_rad)")
        self.mean.copy_(mean_shifted + shift)
        self.std.copy_(std)
        self.fitted = True
        return self

    def _circular_mean(self, x: Tensor, chunk: int) -> Tensor:
        """Circular mean [n_narrow] (rad) of the narrow torsions over frames x [N, n_atoms, 3]."""
        torsions = []
        for start in range(0, x.shape[0], chunk):
            part = x[start : start + chunk].to(device=self.mean.device, dtype=torch.float64)
            torsions.append(cartesian_to_internal(part, self.zmatrix, self._closures())[2][:, self._narrow_index])
        return circular_mean(torch.cat(torsions))

    @torch.no_grad()
    def fit_structure(self, x_reference, std: Tensor) -> "InternalCoordinates":
        """Set the normalisation without data: the mean is one structure's free bonds and
        angles (e.g. a minimised one), the std is given (e.g. the force field's thermal widths,
        :func:`trademd.energy.structure.harmonic_widths`).

        Args:
            x_reference: [n_atoms, 3] nm (tensor or array).
            std: [n_bonded_dims] in nm (bonds) and rad (angles), positive.
        """
        x = torch.as_tensor(np.asarray(x_reference) if not isinstance(x_reference, Tensor) else x_reference)
        if x.shape != (self.n_atoms, 3):
            raise TradeMDError(f"the reference structure must have shape ({self.n_atoms}, 3), got {tuple(x.shape)}")
        std = torch.as_tensor(std, dtype=torch.float64, device=self.mean.device)
        if std.shape != self.std.shape or not bool((std > 0).all()):
            raise TradeMDError(f"the widths must be {tuple(self.std.shape)} positive values")
        bonds, angles, torsions = cartesian_to_internal(x.to(self.mean.device, torch.float64)[None],
                                                        self.zmatrix, self._closures())
        self.torsion_centre.copy_(torsions[0, self._narrow_index])
        self.mean.copy_(self._bounded_values(bonds, angles, torsions)[0])
        self.std.copy_(std)
        self.fitted = True
        return self

    def get_extra_state(self) -> dict:
        """Saved in the state dict (plain floats, loads with ``weights_only=True``)."""
        return {"bound": self.bound, "n_std": self.n_std, "fitted": self.fitted}

    def set_extra_state(self, state: dict) -> None:
        if (state["bound"], state["n_std"]) != (self.bound, self.n_std):
            raise TradeMDError(
                f"the saved normalisation has bound={state['bound']}, n_std={state['n_std']}: "
                "build the module with those, or use InternalCoordinates.from_state_dict"
            )
        self.fitted = bool(state["fitted"])

    # -- sizes and indices ----------------------------------------------------------------

    @property
    def n_atoms(self) -> int:
        return int(self.zmatrix.shape[0])

    def _bounded_values(self, bonds: Tensor, angles: Tensor, torsions: Tensor) -> Tensor:
        """The bounded features before normalisation, [..., n_bonded_dims]: the free bonds
        (nm), every angle (rad), then the narrow torsions unwrapped about their centres (rad)."""
        narrow = _wrap_near(torsions[..., self._narrow_index], self.torsion_centre.to(torsions))
        return torch.cat([bonds[..., self._free_rows], angles, narrow], dim=-1)

    @property
    def free_bond_rows(self) -> np.ndarray:
        """Z-matrix rows whose bond is a flow feature (not constrained), in feature order."""
        return self._free_rows.cpu().numpy() + 1

    @property
    def n_torsions(self) -> int:
        """Periodic torsions the flow models: n_atoms - 3 less the narrow ones."""
        return self.n_atoms - 3 - self.n_narrow_torsions

    @property
    def n_narrow_torsions(self) -> int:
        """Torsions modelled as bounded features: the last ``n_narrow_torsions`` bounded ones."""
        return int(self._narrow_index.shape[0])

    @property
    def n_bonds(self) -> int:
        """Bonds the flow models (unconstrained ones): the first ``n_bonds`` bounded features."""
        return int(self._free_rows.shape[0])

    @property
    def n_angles(self) -> int:
        """Angles (n_atoms - 2; at ring-closure rows the second ring bond, nm): the last
        ``n_angles`` bounded features."""
        return self.n_atoms - 2

    @property
    def n_bonded_dims(self) -> int:
        """Bonds + angles + narrow torsions the flow models: the width of ``bounded``."""
        return self.n_bonds + self.n_angles + self.n_narrow_torsions

    def _feature_name(self, k: int) -> str:
        z = self.zmatrix.tolist()
        if k < self.n_bonds:
            row = z[int(self._free_rows[k]) + 1]
            return f"bond {row[0]}-{row[1]}"
        if k >= self.n_bonds + self.n_angles:
            row = z[int(self._narrow_index[k - self.n_bonds - self.n_angles]) + 3]
            return f"torsion {row[0]}-{row[1]}-{row[2]}-{row[3]}"
        row = z[k - self.n_bonds + 2]
        if bool(self.closures[k - self.n_bonds + 2]):
            return f"ring-closure bond {row[0]}-{row[2]}"
        return f"angle {row[0]}-{row[1]}-{row[2]}"

    def _closures(self) -> Tensor | None:
        """The closure-row flags, or None for a Z-matrix without ring closures."""
        return self.closures if bool(self.closures.any()) else None

    @property
    def n_ring_closures(self) -> int:
        """Z-matrix rows placed by two ring bonds."""
        return int(self.closures.sum())

    def _levels(self) -> list[Tensor]:
        return [getattr(self, f"_level_{i}") for i in range(self._n_levels)]

    def _scale(self, like: Tensor) -> Tensor:
        if not self.fitted:
            raise TradeMDError("the internal-coordinate normalisation is not fitted: call fit(x_train)")
        return (self.std * self.n_std / self.bound).to(like)

    # -- the transform --------------------------------------------------------------------

    def forward(self, x: Tensor) -> tuple[ICFeatures, Tensor]:
        """x [B, n_atoms, 3] nm -> (ICFeatures, log_det [B]).

        ``log_det = -log J(ic) - sum log scale``: ``log q_X(x) = log q_Z(z) + log_det``.
        """
        scale = self._scale(x)
        closures = self._closures()
        bonds, angles, torsions = cartesian_to_internal(x, self.zmatrix, closures)
        fixed_lengths = self.fixed_lengths.to(x)
        bonds_model = torch.where(self.bond_fixed, fixed_lengths, bonds)
        v = self._bounded_values(bonds, angles, torsions)
        bounded = (v - self.mean.to(x)) / scale
        axis = None if closures is None else closure_axis_lengths(x, self.zmatrix)
        log_det = -internal_log_det(bonds_model, angles, closures, axis) - torch.log(scale).sum()
        bound = self.bound
        out_of_range = (bounded.abs() > bound).any(-1)
        if self.out_of_range == "raise" and bool(out_of_range.any()):
            raise TradeMDError(
                f"{int(out_of_range.sum())} configurations have bonds or angles beyond "
                f"{self.n_std:g} training standard deviations (outside the flow's support)"
            )
        if self.out_of_range == "clamp":
            bounded = bounded.clamp(-bound, bound)
        return ICFeatures(torsions[..., self._periodic_index], bounded, out_of_range), log_det

    def inverse(self, torsions: Tensor, bounded: Tensor) -> tuple[Tensor, Tensor]:
        """(torsions [B, n_torsions], bounded [B, n_bonded_dims]) -> (x [B, n_atoms, 3] nm in
        the canonical frame, log_det [B] = log J(ic) + sum log scale)."""
        scale = self._scale(bounded)
        v = self.mean.to(bounded) + bounded * scale
        base = torch.where(self.bond_fixed, self.fixed_lengths, 0.0).to(bounded)
        bonds = base.expand(*bounded.shape[:-1], -1).index_copy(-1, self._free_rows, v[..., : self.n_bonds])
        angles = v[..., self.n_bonds : self.n_bonds + self.n_angles]
        if self.n_narrow_torsions:
            every = torsions.new_zeros(*torsions.shape[:-1], self.n_atoms - 3)
            every = every.index_copy(-1, self._periodic_index, torsions)
            torsions = every.index_copy(-1, self._narrow_index, v[..., self.n_bonds + self.n_angles :])
        closures = self._closures()
        x = internal_to_cartesian(bonds, angles, torsions, self.zmatrix, self._levels(), closures)
        axis = None if closures is None else closure_axis_lengths(x, self.zmatrix)
        log_det = internal_log_det(bonds, angles, closures, axis) + torch.log(scale).sum()
        return x, log_det

    def extra_repr(self) -> str:
        return (
            f"n_atoms={self.n_atoms}, n_torsions={self.n_torsions}, n_bonds={self.n_bonds}, "
            f"n_angles={self.n_angles}, narrow_torsions={self.n_narrow_torsions}, "
            f"ring_closures={self.n_ring_closures}, "
            f"constrained={int(self.bond_fixed.sum())}, "
            f"bound={self.bound:g}, n_std={self.n_std:g}, fitted={self.fitted}"
        )

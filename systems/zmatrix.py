"""Z-matrices: which atoms define each atom's bond, angle and torsion.

A Z-matrix here is an int array [n_atoms, 4]; row k = (atom, bond partner, angle partner,
torsion partner), in placement order: every partner is placed in an earlier row. The first
three rows are the seed atoms, with -1 where a partner does not exist:
(s0, -1, -1, -1), (s1, s0, -1, -1), (s2, s1, s0, -1). The remaining n_atoms - 3 rows define
3 (n_atoms - 3) internal coordinates; with the seeds' two bonds and one angle that is
3 n_atoms - 6, the internal degrees of freedom.

A Z-matrix built from a bond graph is a spanning tree: in a molecule with rings, each
ring-closing bond is not one of its bonds. :func:`close_rings` turns the row of the atom that
closes a ring into a *closure row* (atom, bond partner, ring partner, torsion partner), whose
second coordinate is the ring-closing bond (see :mod:`trademd.flow.coordinates`).
"""

from collections import deque
from typing import NamedTuple

import numpy as np

from trademd.errors import TradeMDError

__all__ = ["RingClosures", "close_rings", "order_zmatrix", "zmatrix_from_bonds", "validate_zmatrix"]


def order_zmatrix(seeds: tuple[int, int, int], rows: list[tuple[int, int, int, int]]) -> np.ndarray:
    """Arrange seed atoms and (atom, bond, angle, torsion) rows into placement order.

    Args:
        seeds: (s0, s1, s2) with bonds s0-s1 and s1-s2.
        rows: one row per non-seed atom, in any order.

    Returns:
        int64 [n_atoms, 4] Z-matrix (see module docstring).
    """
    s0, s1, s2 = seeds
    ordered = [(s0, -1, -1, -1), (s1, s0, -1, -1), (s2, s1, s0, -1)]
    placed = set(seeds)
    pending = list(rows)
    while pending:
        ready = [row for row in pending if all(p in placed for p in row[1:])]
        if not ready:
            raise TradeMDError(f"the Z-matrix rows {pending} reference atoms never placed")
        for row in ready:
            ordered.append(tuple(row))
            placed.add(row[0])
            pending.remove(row)
    zmatrix = np.asarray(ordered, dtype=np.int64)
    validate_zmatrix(zmatrix, len(zmatrix))
    return zmatrix


def validate_zmatrix(zmatrix: np.ndarray, n_atoms: int) -> None:
    """Raise :class:`TradeMDError` unless ``zmatrix`` places each of ``n_atoms`` atoms exactly
    once, from distinct atoms placed before it."""
    if zmatrix.shape != (n_atoms, 4):
        raise TradeMDError(f"a Z-matrix for {n_atoms} atoms must have shape ({n_atoms}, 4)")
    if sorted(zmatrix[:, 0].tolist()) != list(range(n_atoms)):
        raise TradeMDError("the Z-matrix must place every atom exactly once")
    placed: set[int] = set()
    for k, row in enumerate(zmatrix.tolist()):
        partners = row[1 : 1 + min(k, 3)]
        if -1 in partners or any(p not in placed for p in partners):
            raise TradeMDError(f"Z-matrix row {k} {row} uses atoms not yet placed")
        if len(set(row[: 1 + min(k, 3)])) != 1 + min(k, 3):
            raise TradeMDError(f"Z-matrix row {k} {row} repeats an atom")
        placed.add(row[0])


def zmatrix_from_bonds(n_atoms: int, bonds: list[tuple[int, int]], heavy: list[bool]) -> np.ndarray:
    """Derive a Z-matrix from a molecule's bond graph.

    The seed s1 is the most central heavy atom (smallest eccentricity), s0 and s2 two of its
    neighbours; every other atom is placed in breadth-first order from s1 with its bond
    partner the atom it was reached from, its angle partner that atom's parent (or a placed
    neighbour of it) and its torsion partner a placed sibling (another neighbour of the bond
    partner: an improper torsion, as the hand-made alanine dipeptide Z-matrix has for its
    methyl hydrogens) or else one bond further (or a placed neighbour of the angle partner).

    Args:
        n_atoms: number of atoms.
        bonds: pairs of bonded atom indices.
        heavy: per atom, True for non-hydrogen atoms.

    Returns:
        int64 [n_atoms, 4] Z-matrix.
    """
    if n_atoms < 4:
        raise TradeMDError("internal coordinates need a molecule of at least 4 atoms")
    neighbours: list[list[int]] = [[] for _ in range(n_atoms)]
    for i, j in bonds:
        neighbours[i].append(j)
        neighbours[j].append(i)
    distances = [_bfs_distances(neighbours, a) for a in range(n_atoms)]
    if any(d < 0 for d in distances[0]):
        raise TradeMDError(
            "the molecule's bond graph is not connected: give a PDB of one molecule with "
            "CONECT records or standard residues"
        )
    candidates = [a for a in range(n_atoms) if heavy[a] and len(neighbours[a]) >= 2]
    if not candidates:
        candidates = [a for a in range(n_atoms) if len(neighbours[a]) >= 2]
    if not candidates:
        raise TradeMDError("no atom of the molecule has two bonded neighbours to seed a Z-matrix")
    s1 = min(candidates, key=lambda a: (max(distances[a]), -len(neighbours[a]), a))
    first = sorted(neighbours[s1], key=lambda a: (not heavy[a], a))
    s0, s2 = first[0], first[1]

    parent = {s0: s1, s2: s1}
    queue = deque([s0, s2] + first[2:])
    for a in first[2:]:
        parent[a] = s1
    seen = {s1, s0, s2, *first[2:]}
    placed = {s0, s1, s2}
    rows = []
    while queue:
        atom = queue.popleft()
        if atom not in placed:
            rows.append(_row(atom, parent, neighbours, placed))
            placed.add(atom)
        for nb in sorted(neighbours[atom], key=lambda a: (not heavy[a], a)):
            if nb not in seen:
                seen.add(nb)
                parent[nb] = atom
                queue.append(nb)
    return order_zmatrix((s0, s1, s2), rows)


def _row(atom: int, parent: dict, neighbours: list[list[int]], placed: set[int]) -> tuple:
    """(atom, bond, angle, torsion): the torsion partner is a placed sibling (another
    neighbour of the bond partner) where there is one, else an atom one bond further."""
    bond = parent[atom]
    angle = parent.get(bond)
    if angle is None:  # bond partner is the central seed: use another placed neighbour
        angle = next(a for a in neighbours[bond] if a in placed and a != atom)
    used = {atom, bond, angle}
    # a sibling reference makes the torsion a near-constant offset (a methyl's second and
    # third hydrogens: +-120 degrees from the first), so a rotor or a branch point is one
    # multimodal torsion, not three that must move together
    options = neighbours[bond] + [parent.get(angle)] + neighbours[angle]
    torsion = next((a for a in options if a is not None and a in placed and a not in used), None)
    if torsion is None:
        torsion = next(a for a in sorted(placed) if a not in used)
    return (atom, bond, angle, torsion)


def _bfs_distances(neighbours, start: int, without: tuple[int, int] | None = None) -> list[int]:
    """Bonds on the shortest path from ``start`` to every atom (-1: unreachable), not using the
    bond ``without`` (e.g. a ring-closing bond, for the size of its ring)."""
    distance = [-1] * len(neighbours)
    distance[start] = 0
    queue = deque([start])
    while queue:
        atom = queue.popleft()
        for nb in neighbours[atom]:
            if distance[nb] < 0 and (without is None or {atom, nb} != set(without)):
                distance[nb] = distance[atom] + 1
                queue.append(nb)
    return distance


class RingClosures(NamedTuple):
    """What :func:`close_rings` returns.

    Attributes:
        zmatrix: int64 [n_atoms, 4], closure rows rewritten (same placement order).
        closures: bool [n_atoms], True for closure rows.
        implied: ring-closing bonds (i, j) that stay implied by the other coordinates (an atom
            that closes two rings holds one of them; a seed atom none).
        ring_sizes: per ring-closing bond (i, j), the atoms of the smallest ring through it.
    """

    zmatrix: np.ndarray
    closures: np.ndarray
    implied: list[tuple[int, int]]
    ring_sizes: dict[tuple[int, int], int]


def close_rings(zmatrix: np.ndarray, bonds: list[tuple[int, int]]) -> RingClosures:
    """Make every ring-closing bond a coordinate where the Z-matrix allows.

    A bond (i, j) that is no Z-matrix bond closes a ring. The row of whichever of i, j is
    placed later, c, becomes (c, A, B, D): A its bond partner as before, B the earlier atom of
    the ring-closing bond, D a placed atom bonded to A or B (the torsion is then the position
    of c on the circle about the A-B axis). Placement order is unchanged.

    Args:
        zmatrix: int [n_atoms, 4] in placement order (e.g. :func:`zmatrix_from_bonds`).
        bonds: pairs of bonded atom indices.

    Returns:
        :class:`RingClosures`.
    """
    z = np.array(zmatrix, dtype=np.int64)
    n_atoms = len(z)
    order = {int(z[k, 0]): k for k in range(n_atoms)}
    tree = {frozenset((int(z[k, 0]), int(z[k, 1]))) for k in range(1, n_atoms)}
    neighbours: list[set[int]] = [set() for _ in range(n_atoms)]
    for i, j in bonds:
        neighbours[i].add(j)
        neighbours[j].add(i)
    closures = np.zeros(n_atoms, dtype=bool)
    implied = []
    ring_sizes = {}
    for i, j in sorted({tuple(sorted(b)) for b in bonds if frozenset(b) not in tree}):
        ring_sizes[(i, j)] = _bfs_distances(neighbours, i, without=(i, j))[j] + 1
        early, late = sorted((i, j), key=order.__getitem__)
        k = order[late]
        if k < 3 or closures[k]:
            implied.append((i, j))
            continue
        bond_partner = int(z[k, 1])
        placed = {int(a) for a in z[:k, 0]}
        candidates = [int(z[k, 2]), int(z[k, 3])] + sorted(neighbours[bond_partner]) + sorted(neighbours[early])
        torsion = next(a for a in candidates if a in placed and a not in (late, bond_partner, early))
        z[k] = (late, bond_partner, early, torsion)
        closures[k] = True
    validate_zmatrix(z, n_atoms)
    return RingClosures(z, closures, implied, ring_sizes)


"""Where a sampler's importance weights go, for one run directory of ``trade-md run`` (or of
``benchmarks/ring_peptides.py``): data_600K.h5, samples.h5.

1. Per internal coordinate, the share of Var(log w) that 20 quantile bins of that coordinate
   explain (between-bin variance / total; log w clipped at max - 15 so that a few samples of
   huge energy do not set the variance), the top rows.
2. Per free torsion, its circular spread (std of the wrapped deviation from the circular mean)
   in the flow's unweighted samples over that in the MD, at the data's temperature; narrow
   torsions (MD spread < 0.35 rad: ring, sibling and peptide-bond torsions) apart.
3. Per peptide bond, the cis fraction in the MD, in the flow's samples and their weight share
   (flagged samples included, with the weight they would have had).
4. Per group of coordinates (kind: bond / angle / torsion; part: backbone / side chain / cap;
   residue; hydrogen torsions), the share of Var(log w) that an additive model of the group's
   binned coordinates explains (fitted by backfitting: each coordinate's bin means of the
   residual, in turn, until it settles), and that of all coordinates together; the rest is
   what no sum of one-coordinate terms explains (couplings between coordinates).

    python benchmarks/weight_diagnostics.py runs/demo --temperature 300 [--top 12] [--data FILE]
"""

import argparse
import math
from pathlib import Path

import numpy as np
import torch

from trademd.analysis.isomers import cis_peptide_bonds
from trademd.flow.coordinates import cartesian_to_internal
from trademd.io.samples_file import read_samples
from trademd.io.trajectory_file import read_trajectory
from trademd.systems import system_from_attrs

NARROW_RAD = 0.35
N_BINS = 20
CLIP = 15.0


def _circular_deviation(t: np.ndarray) -> np.ndarray:
    """[n, m] torsions minus their circular mean, wrapped to (-pi, pi]."""
    return np.angle(np.exp(1j * (t - np.angle(np.exp(1j * t).mean(0)))))


def _labelled_coordinates(molecule, x: np.ndarray) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Labels, values [n, m] (torsions as deviations from their circular mean) and a bool [m]
    torsion mask of every internal coordinate of positions x [n, atoms, 3]; each label starts
    with the coordinate's kind and names its placed atom first."""
    names = [f"{a.name}{a.residue.index}" for a in molecule.pdb().topology.atoms()]
    bonds, angles, torsions = (c.numpy() for c in cartesian_to_internal(
        torch.as_tensor(x, dtype=torch.float64), molecule.zmatrix, molecule.ring_closures))
    z, closures = molecule.zmatrix, molecule.ring_closures
    labels, columns, is_torsion = [], [], []
    for kind, values, first, width in (("bond", bonds, 1, 2), ("angle", angles, 2, 3), ("torsion", torsions, 3, 4)):
        if kind == "torsion":
            values = _circular_deviation(values)
        for c in range(values.shape[1]):
            row = z[c + first]
            label = f"{kind} " + "-".join(names[i] for i in row[:width])
            if kind == "angle" and closures is not None and closures[c + first]:
                label = "ring bond " + "-".join(names[i] for i in (row[0], row[2]))
            labels.append(label)
            columns.append(values[:, c])
            is_torsion.append(kind == "torsion")
    return labels, np.stack(columns, 1), np.array(is_torsion)


def variance_shares(values: np.ndarray, log_w: np.ndarray) -> np.ndarray:
    """[m] share of Var(log w) that N_BINS quantile bins of each column of values [n, m] explain."""
    shares = np.zeros(values.shape[1])
    total = log_w.var()
    for c in range(values.shape[1]):
        column = values[:, c]
        if column.std() < 1e-12:
            continue
        edges = np.quantile(column, np.linspace(0, 1, N_BINS + 1))
        bins = np.clip(np.searchsorted(edges, column) - 1, 0, N_BINS - 1)
        counts = np.bincount(bins, minlength=N_BINS)
        means = np.bincount(bins, weights=log_w, minlength=N_BINS) / np.maximum(counts, 1)
        shares[c] = (counts * (means - log_w.mean()) ** 2).sum() / counts.sum() / total
    return shares


BACKBONE_ATOMS = {"N", "H", "CA", "HA", "C", "O"}
CAPS = {"ACE", "NME", "NHE", "NH2"}


def coordinate_groups(molecule, labels: list[str]) -> dict[str, np.ndarray]:
    """Group name -> int indices into ``labels`` (one coordinate may sit in several groups):
    by kind, by part (backbone / side chain / cap, of the placed atom), by residue, and the
    torsions that place a hydrogen."""
    atoms = list(molecule.pdb().topology.atoms())
    placed = [atoms[int(row[0])] for row in molecule.zmatrix[1:]]
    # labels run over the Z-matrix rows: bonds from row 1, angles from row 2, torsions from row 3
    rows = [k + first for kind, first in (("bond", 1), ("angle", 2), ("torsion", 3))
            for k in range(len(molecule.zmatrix) - first)]
    groups: dict[str, list[int]] = {}
    for index, (label, row) in enumerate(zip(labels, rows)):
        atom = placed[row - 1]
        kind = "ring bond" if label.startswith("ring bond") else label.split()[0]
        part = ("cap" if atom.residue.name in CAPS else
                "backbone" if atom.name in BACKBONE_ATOMS else "side chain")
        names = [f"kind: {kind}", f"part: {part}", f"residue {atom.residue.index} {atom.residue.name}"]
        if kind == "torsion" and atom.element.symbol == "H":
            names.append("torsions placing a hydrogen")
        for name in names:
            groups.setdefault(name, []).append(index)
    return {name: np.asarray(members) for name, members in groups.items()}


def _bins(values: np.ndarray) -> np.ndarray:
    """[n, m] quantile-bin index (N_BINS) of every column."""
    bins = np.zeros(values.shape, dtype=np.int64)
    for c in range(values.shape[1]):
        edges = np.quantile(values[:, c], np.linspace(0, 1, N_BINS + 1))
        bins[:, c] = np.clip(np.searchsorted(edges, values[:, c]) - 1, 0, N_BINS - 1)
    return bins


def additive_share(bins: np.ndarray, log_w: np.ndarray, sweeps: int = 20) -> float:
    """Share of Var(log w) that a sum of one-coordinate step functions (the bins [n, m])
    explains, fitted by backfitting."""
    residual = log_w - log_w.mean()
    total = residual.var()
    for _ in range(sweeps):
        change = 0.0
        for c in range(bins.shape[1]):
            counts = np.maximum(np.bincount(bins[:, c], minlength=N_BINS), 1)
            step = (np.bincount(bins[:, c], weights=residual, minlength=N_BINS) / counts)[bins[:, c]]
            residual -= step
            change += step.var()
        if change < 1e-6 * total:
            break
    return 1.0 - residual.var() / total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--temperature", type=float, default=300.0)
    parser.add_argument("--top", type=int, default=12)
    parser.add_argument("--data", type=Path, default=None, help="MD file (default: RUN/data_600K.h5)")
    args = parser.parse_args()
    data = read_trajectory(args.data or args.run / "data_600K.h5")
    molecule = system_from_attrs(data.attrs, data.topology_pdb)
    samples = read_samples(args.run / "samples.h5")
    entry = samples.at(args.run / "samples.h5", args.temperature)
    finite = np.isfinite(entry.energy_kj_mol) & np.isfinite(entry.log_prob)
    x = entry.positions_nm[finite].astype(np.float64)
    log_w = -entry.energy_kj_mol[finite] / (0.0083144626181532395 * args.temperature) - entry.log_prob[finite]
    clipped = np.maximum(log_w, log_w.max() - CLIP)

    labels, values, is_torsion = _labelled_coordinates(molecule, x)
    shares = variance_shares(values, clipped)
    print(f"1. Var(log w) at {args.temperature:g} K (clipped at max - {CLIP:g}): {clipped.var():.2f}, "
          f"n = {len(x)}; share explained by {N_BINS} bins of one coordinate:")
    for k in np.argsort(-shares)[: args.top]:
        print(f"   {shares[k]:.3f}  {labels[k]}")

    # a random subset, not a stride: frames are stored save by save, replica by replica, so a
    # stride of 8 over 16 replicas would keep two replicas' frames only
    subset = np.sort(np.random.default_rng(0).choice(data.n_frames, min(data.n_frames, 20000), replace=False))
    md_x = data.positions_nm[subset].astype(np.float64)
    at_t0 = samples.at(args.run / "samples.h5", data.temperature_k) if data.temperature_k in samples.by_temperature else None
    if at_t0 is not None:
        _, md_values, _ = _labelled_coordinates(molecule, md_x)
        keep = ~at_t0.flagged
        _, flow_values, _ = _labelled_coordinates(molecule, at_t0.positions_nm[keep].astype(np.float64))
        md_spread, flow_spread = md_values.std(0)[is_torsion], flow_values.std(0)[is_torsion]
        ratio, narrow = flow_spread / md_spread, md_spread < NARROW_RAD
        print(f"2. Torsion spreads at {data.temperature_k:g} K, flow / MD: narrow (< {NARROW_RAD} rad, "
              f"{narrow.sum()} of {len(ratio)}) median {np.median(ratio[narrow]) if narrow.any() else math.nan:.3f}, "
              f"wide median {np.median(ratio[~narrow]) if (~narrow).any() else math.nan:.3f}; largest:")
        torsion_labels = np.array(labels)[is_torsion]
        for k in np.argsort(-ratio)[: min(args.top, 6)]:
            print(f"   {ratio[k]:.2f}  MD {md_spread[k]:.3f}  flow {flow_spread[k]:.3f}  {torsion_labels[k]}")

    omegas = molecule.peptide_bonds
    if len(omegas):
        weights = np.exp(log_w - log_w.max())
        weights /= weights.sum()
        md_cis = cis_peptide_bonds(md_x, omegas).numpy().mean(0)
        flow_cis = cis_peptide_bonds(x, omegas).numpy()
        print("3. Peptide bonds: cis fraction in MD | flow samples | their weight share (unflagged weights)")
        names = [a.name for a in molecule.pdb().topology.atoms()]
        for k, row in enumerate(omegas):
            print(f"   {'-'.join(names[i] for i in row)}: {md_cis[k]:.5f} | {flow_cis[:, k].mean():.5f} | "
                  f"{weights[flow_cis[:, k]].sum():.3f}")

    bins = _bins(values)
    print(f"4. Share of Var(log w) that a sum of one-coordinate terms explains: all "
          f"{len(labels)} coordinates {additive_share(bins, clipped):.3f}; by group:")
    for name, members in sorted(coordinate_groups(molecule, labels).items()):
        print(f"   {additive_share(bins[:, members], clipped):.3f}  {name} ({len(members)})")


if __name__ == "__main__":
    main()

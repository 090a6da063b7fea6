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

    python benchmarks/weight_diagnostics.py runs/demo --temperature 300 [--top 12]
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
    torsion mask of every internal coordinate of positions x [n, atoms, 3]."""
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--temperature", type=float, default=300.0)
    parser.add_argument("--top", type=int, default=12)
    args = parser.parse_args()
    data = read_trajectory(args.run / "data_600K.h5")
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

    md_x = data.positions_nm[:: max(1, data.n_frames // 20000)].astype(np.float64)
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


if __name__ == "__main__":
    main()

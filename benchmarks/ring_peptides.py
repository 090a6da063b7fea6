"""Peptides with rings (``pro2-implicit``, ``trp2-implicit``): the default `trade-md run` per
seed, ESS at 300 and 600 K, and the spread of every ring bond in MD, in the flow's samples and
in the reweighted samples; with ``--zmatrix tree`` the same run with the spanning-tree
Z-matrix (ring-closing bonds implied by the other coordinates, as before ring closures) for
the A/B on the same MD; with ``--zmatrix distal-torsions`` the torsion partners one bond further
instead of a placed sibling (the rule before 2026-12-07; any peptide, e.g. ala4-implicit).

    python benchmarks/ring_peptides.py --out runs/rings --system pro2-implicit --seeds 0 1 2
    python benchmarks/ring_peptides.py --out runs/rings-tree --system pro2-implicit --seeds 0 \
        --zmatrix tree --data-from runs/rings            # same MD as the closure run
    python benchmarks/ring_peptides.py --out runs/rings --simulation-ps 100 --steps 600 \
        --n 20000 --system trp2-implicit --seeds 0       # the issue's short screening budget
    python benchmarks/ring_peptides.py --out runs/rings --aggregate
    python benchmarks/ring_peptides.py --out runs/rings --ring-bonds-only --reference remd.h5

A ring bond's spread is its standard deviation (nm); for weighted samples the weighted one,
with the range over 5 batches and the standard error from them. The reference is a
replica-exchange file (``trade-md simulate --temperatures ...``) whose 300 K ensemble gives the
spread the reweighted samples should have (standard error from 10 blocks of consecutive
frames); at 600 K the MD data are the reference.
"""

import argparse
import importlib.util
import json
import math
from pathlib import Path
import shutil
import sys

import numpy as np

_HERE = Path(__file__).resolve().parent
_spec = importlib.util.spec_from_file_location("ala2_default_seeds", _HERE / "ala2_default_seeds.py")
default_seeds = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(default_seeds)

N_BATCHES = 5
#: blocks of the reference's 300 K frames for the standard error of a spread
REFERENCE_BLOCKS = 10


def use_spanning_tree_zmatrix() -> None:
    """Make every system built in this process keep the spanning-tree Z-matrix (ring-closing
    bonds implied), the A arm of the A/B."""
    from trademd.systems import registry
    from trademd.systems.zmatrix import RingClosures

    def tree_only(zmatrix, bonds):
        tree = {frozenset(row[:2]) for row in np.asarray(zmatrix)[1:].tolist()}
        implied = [tuple(b) for b in bonds if frozenset(b) not in tree]
        return RingClosures(np.asarray(zmatrix), np.zeros(len(zmatrix), dtype=bool), implied, {})

    registry.close_rings = tree_only


def use_distal_torsion_partners() -> None:
    """Make every Z-matrix built in this process take its torsion partners one bond further
    (the rule before sibling partners: a methyl's three hydrogens each a torsion about the
    same bond), the A arm of the sibling A/B."""
    from trademd.systems import zmatrix

    def distal_row(atom, parent, neighbours, placed):
        bond = parent[atom]
        angle = parent.get(bond)
        if angle is None:
            angle = next(a for a in neighbours[bond] if a in placed and a != atom)
        used = {atom, bond, angle}
        options = [parent.get(angle)] + neighbours[angle] + neighbours[bond]
        torsion = next((a for a in options if a is not None and a in placed and a not in used), None)
        if torsion is None:
            torsion = next(a for a in sorted(placed) if a not in used)
        return (atom, bond, angle, torsion)

    zmatrix._row = distal_row


def ring_bonds(molecule) -> list[tuple[int, int]]:
    """Bonds on a cycle of the bond graph (their removal leaves the ends connected)."""
    bonds = [(b[0].index, b[1].index) for b in molecule.pdb().topology.bonds()]
    neighbours: dict[int, set[int]] = {}
    for i, j in bonds:
        neighbours.setdefault(i, set()).add(j)
        neighbours.setdefault(j, set()).add(i)
    rings = []
    for i, j in bonds:
        reached, frontier = {i}, [i]
        while frontier:
            atom = frontier.pop()
            for other in neighbours[atom]:
                if (atom, other) not in ((i, j), (j, i)) and other not in reached:
                    reached.add(other)
                    frontier.append(other)
        if j in reached:
            rings.append((i, j))
    return rings


def _lengths(positions_nm: np.ndarray, bonds: list[tuple[int, int]]) -> np.ndarray:
    """[n, bonds] lengths (nm)."""
    pairs = np.asarray(bonds)
    return np.linalg.norm(positions_nm[:, pairs[:, 0]] - positions_nm[:, pairs[:, 1]], axis=-1)


def _weighted_std(values: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Per column std of [n, m] values under normalised-up-to-a-constant weights [n]."""
    w = weights / weights.sum()
    mean = (w[:, None] * values).sum(0)
    return np.sqrt((w[:, None] * (values - mean) ** 2).sum(0))


def _standard_error(per_block: np.ndarray) -> list[float]:
    """Standard error of a spread from its values in independent blocks [blocks, bonds]."""
    return (per_block.std(0, ddof=1) / math.sqrt(len(per_block))).tolist()


def _block_spreads(lengths: np.ndarray) -> np.ndarray:
    """[REFERENCE_BLOCKS, bonds] spreads of blocks of consecutive frames of lengths [n, bonds]."""
    return np.array([block.std(0) for block in np.array_split(lengths, REFERENCE_BLOCKS)])


def ring_bond_spreads(run_dir: Path, reference: Path | None) -> dict:
    """Spread (nm) of every ring bond: MD at T0, flow samples (unweighted) and reweighted
    samples at each sampled T (with the min-max over batches), the reference at 300 K."""
    from trademd.io.samples_file import read_samples
    from trademd.io.trajectory_file import read_trajectory
    from trademd.systems import system_from_attrs

    trajectory = read_trajectory(run_dir / "data_600K.h5")
    molecule = system_from_attrs(trajectory.attrs, trajectory.topology_pdb)
    bonds = ring_bonds(molecule)
    if not bonds:
        return {}
    atoms = list(molecule.pdb().topology.atoms())
    names = [f"{atoms[i].name}-{atoms[j].name}" for i, j in bonds]
    md_lengths = _lengths(trajectory.positions_nm, bonds)
    out = {"bonds": names, "md_t0": md_lengths.std(0).tolist(),
           "md_t0_se": _standard_error(_block_spreads(md_lengths))}
    samples = read_samples(run_dir / "samples.h5")
    for temperature_k, entry in sorted(samples.by_temperature.items()):
        lengths = _lengths(entry.positions_nm.astype(np.float64), bonds)
        keep = ~entry.flagged
        weights = np.where(keep, entry.weights, 0.0)
        batches = np.array_split(np.arange(entry.n), N_BATCHES)
        per_batch = np.array([_weighted_std(lengths[b], weights[b]) for b in batches if weights[b].sum() > 0])
        out[f"flow_{temperature_k:g}K"] = lengths[keep].std(0).tolist()
        out[f"reweighted_{temperature_k:g}K"] = _weighted_std(lengths, weights).tolist()
        out[f"reweighted_{temperature_k:g}K_batch_min"] = per_batch.min(0).tolist()
        out[f"reweighted_{temperature_k:g}K_batch_max"] = per_batch.max(0).tolist()
        out[f"reweighted_{temperature_k:g}K_se"] = _standard_error(per_batch)
    if reference is not None:
        remd = read_trajectory(reference, 300.0)
        lengths = _lengths(remd.positions_nm.astype(np.float64), bonds)
        halves = np.array_split(lengths, 2)
        out["reference_300K"] = lengths.std(0).tolist()
        out["reference_300K_half_min"] = np.minimum(halves[0].std(0), halves[1].std(0)).tolist()
        out["reference_300K_half_max"] = np.maximum(halves[0].std(0), halves[1].std(0)).tolist()
        # blocks of consecutive frames (both ladders' frames of a time lie side by side)
        out["reference_300K_se"] = _standard_error(_block_spreads(lengths))
        out["reference_300K_frames"] = len(lengths)
    return out


def run(args) -> None:
    if args.zmatrix == "tree":
        use_spanning_tree_zmatrix()
    elif args.zmatrix == "distal-torsions":
        use_distal_torsion_partners()
    overrides = {"system": args.system, "simulation_ps": args.simulation_ps, "steps": args.steps,
                 "n_samples": args.n}
    overrides = {k: v for k, v in overrides.items() if v is not None}
    for seed in args.seeds:
        run_dir = args.out / f"seed{seed}"
        if args.data_from is not None and not (run_dir / "data_600K.h5").exists():
            run_dir.mkdir(parents=True, exist_ok=True)
            shutil.copy(args.data_from / f"seed{seed}" / "data_600K.h5", run_dir / "data_600K.h5")
        train_overrides = {} if args.narrow_torsion_rad is None else {"narrow_torsion_rad": args.narrow_torsion_rad}
        if args.compile:
            train_overrides["compile_splines"] = True
        if args.refine_steps is not None:
            train_overrides["refine_steps"] = args.refine_steps
        if args.refine_rounds is not None:
            train_overrides["refine_rounds"] = args.refine_rounds
        train_overrides.update(json.loads(args.train_settings))
        result = default_seeds.run_seed(seed, args.out, args.platform, args.device, None, overrides,
                                        progress=not args.quiet, train_overrides=train_overrides)
        result["zmatrix"] = args.zmatrix
        result["ring_bonds"] = ring_bond_spreads(run_dir, args.reference)
        (run_dir / "result.json").write_text(json.dumps(result, indent=2))


def _se_text(spreads: dict, key: str, k: int) -> str:
    """The text " +- s.e." of bond k in nm x 1e3, or nothing for results written before errors were kept."""
    return f" +- {1e3 * spreads[key][k]:.2f}" if key in spreads else ""


def aggregate(out: Path) -> str:
    """ESS table (ala2_default_seeds' tables) and ring-bond spreads per seed."""
    text = default_seeds.aggregate(out)
    lines = ["", "Ring-bond spread (nm x 1e3): MD at 600 K | flow at 300 K | reweighted at 300 K "
             "[batch range] | replica exchange at 300 K [halves]", ""]
    for path in sorted(out.glob("seed*/result.json")):
        result = json.loads(path.read_text())
        spreads = result.get("ring_bonds")
        if not spreads:
            continue
        lines += [f"seed {result['seed']} ({result.get('zmatrix', 'closures')} Z-matrix, "
                  f"{result['system']}):", "", "| bond | MD 600 K +- s.e. | reweighted 600 K +- s.e. | flow 300 K | "
                  "reweighted 300 K [batch range] +- s.e. | reference 300 K [halves] +- s.e. | difference / s.e. |",
                  "| --- | --- | --- | --- | --- | --- | --- |"]
        for k, name in enumerate(spreads["bonds"]):
            reference = (f"{1e3 * spreads['reference_300K'][k]:.2f} [{1e3 * spreads['reference_300K_half_min'][k]:.2f}-"
                         f"{1e3 * spreads['reference_300K_half_max'][k]:.2f}]" if "reference_300K" in spreads else "n/a")
            z = "n/a"
            if "reference_300K_se" in spreads and "reweighted_300K_se" in spreads:
                reference += f" +- {1e3 * spreads['reference_300K_se'][k]:.2f}"
                z = (spreads["reweighted_300K"][k] - spreads["reference_300K"][k]) / math.hypot(
                    spreads["reweighted_300K_se"][k], spreads["reference_300K_se"][k])
                z = f"{z:+.1f}"
            lines.append(
                f"| {name} | {1e3 * spreads['md_t0'][k]:.2f}{_se_text(spreads, 'md_t0_se', k)} | "
                f"{1e3 * spreads['reweighted_600K'][k]:.2f}{_se_text(spreads, 'reweighted_600K_se', k)} | "
                f"{1e3 * spreads['flow_300K'][k]:.2f} | "
                f"{1e3 * spreads['reweighted_300K'][k]:.2f} [{1e3 * spreads['reweighted_300K_batch_min'][k]:.2f}-"
                f"{1e3 * spreads['reweighted_300K_batch_max'][k]:.2f}]{_se_text(spreads, 'reweighted_300K_se', k)} | "
                f"{reference} | {z} |")
        lines.append("")
    text += "\n".join(lines)
    (out / "results.md").write_text(text)
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--system", default="pro2-implicit")
    parser.add_argument("--seeds", type=int, nargs="*", default=[0, 1, 2])
    parser.add_argument("--zmatrix", choices=("closures", "tree", "distal-torsions"), default="closures",
                        help="tree: no ring closures; distal-torsions: torsion partners one bond "
                             "further instead of a sibling")
    parser.add_argument("--data-from", type=Path, default=None,
                        help="run directory whose seedN/data_600K.h5 to reuse")
    parser.add_argument("--simulation-ps", type=float, default=None, help="MD per replica (default: the run's)")
    parser.add_argument("--steps", type=int, default=None, help="training steps (default: the preset's)")
    parser.add_argument("--refine-steps", type=int, default=None,
                        help="steps per refinement round (default: the preset's)")
    parser.add_argument("--refine-rounds", type=int, default=None,
                        help="refinement rounds (default: the preset's; 0: none)")
    parser.add_argument("--n", type=int, default=None, help="samples per temperature (default: the run's)")
    parser.add_argument("--reference", type=Path, default=None, help="replica-exchange file (300 K rung)")
    parser.add_argument("--narrow-torsion-rad", type=float, default=None,
                        help="torsions spreading less than this (rad) as bounded features (default: the preset's)")
    parser.add_argument("--compile", action="store_true", help="train with compiled splines")
    parser.add_argument("--train-settings", default="{}",
                        help='further training settings as JSON, e.g. \'{"trade_ess_floor": 0.01}\'')
    parser.add_argument("--platform", default="CPU")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--quiet", action="store_true")
    parser.add_argument("--aggregate", action="store_true", help="only write the tables")
    parser.add_argument("--ring-bonds-only", action="store_true",
                        help="only recompute every seed's ring-bond spreads (e.g. against a longer --reference), "
                             "then write the tables")
    args = parser.parse_args()
    if args.ring_bonds_only:
        for path in sorted(args.out.glob("seed*/result.json")):
            result = json.loads(path.read_text())
            result["ring_bonds"] = ring_bond_spreads(path.parent, args.reference)
            path.write_text(json.dumps(result, indent=2))
    elif not args.aggregate:
        run(args)
    print(aggregate(args.out))


if __name__ == "__main__":
    sys.exit(main())

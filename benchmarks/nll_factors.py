"""One factor at a time: how far maximum likelihood at T0 alone gets on one MD data set.

For issue 27 part 1 (where the tetrapeptide's ESS goes): every variant trains the ``nll``
objective (no energies in the loss, no refinement rounds) on the same data file, then samples
``--n`` configurations at the data's temperature and records the pooled relative ESS, its
spread over batches, the Pareto k and the wall times. A variant is a name and its training
settings (flat or nested, as ``trade-md train --config`` takes them) over a common base.

    python benchmarks/nll_factors.py --data runs/screen-ala4-sib/seed0/data_600K.h5 \\
        --out runs/factors-ala4 --variants base width128 blocks3 steps6000
    python benchmarks/nll_factors.py --out runs/factors-ala4 --aggregate

Prints a markdown table (also ``table.md`` in ``--out``); each variant's numbers in
``<out>/<variant>/result.json`` (a finished variant is not rerun).
"""

import argparse
import json
from pathlib import Path
import sys
import time

BASE = {"objective": "nll", "steps": 1500, "refine_rounds": 0, "seed": 0}
#: name -> settings over BASE
VARIANTS: dict[str, dict] = {
    "base": {},
    "width128": {"flow": {"width": 128}},
    "width256": {"flow": {"width": 256}},
    "blocks3": {"flow": {"layers": ["torsions|torsions", "bounded|torsions", "bounded|bounded"] * 3}},
    "blocks4": {"flow": {"layers": ["torsions|torsions", "bounded|torsions", "bounded|bounded"] * 4}},
    # twice the torsion-torsion couplings per block (16 layers instead of 12)
    "torsions-x2": {"flow": {"layers": ["torsions|torsions", "torsions|torsions", "bounded|torsions",
                                        "bounded|bounded"] * 2}},
    "steps6000": {"steps": 6000},
    "steps20000": {"steps": 20000},
    "batch1024": {"batch_size": 1024},
    "no-shifts": {"flow": {"torsion_shifts": "none"}},
    "narrow": {"narrow_torsion_rad": 0.35},
    "bins16": {"flow": {"bins": 16}},
    "lr3e-3": {"learning_rate": 3e-3},
}
T_RANGE_K = (240.0, 660.0)


def residue_features(data: Path) -> list[int]:
    """The residue index of every flow feature of the data's molecule (the residue of the atom
    each feature places), in feature order: torsions, then free bonds, then angles."""
    from trademd.flow.coordinates import InternalCoordinates, constrained_bonds_from_openmm
    from trademd.io.trajectory_file import read_trajectory
    from trademd.systems import system_from_attrs

    trajectory = read_trajectory(data)
    molecule = system_from_attrs(trajectory.attrs, trajectory.topology_pdb)
    coordinates = InternalCoordinates(molecule.zmatrix, constrained_bonds_from_openmm(molecule.create_openmm_system()),
                                      closures=molecule.ring_closures)
    residue = [atom.residue.index for atom in molecule.pdb().topology.atoms()]
    z = molecule.zmatrix
    rows = (list(range(3, len(z))) + [int(r) for r in coordinates.free_bond_rows] + list(range(2, len(z))))
    return [residue[int(z[row][0])] for row in rows]


def residue_mask_settings(data: Path) -> dict:
    """Coupling layers that follow residues: per residue i, "r<i>|rest" (residue i's features
    given all others, and all others given residue i), twice, instead of the default blocks."""
    features = residue_features(data)
    groups = {f"r{i}": [k for k, r in enumerate(features) if r == i] for i in sorted(set(features))}
    return {"flow": {"groups": groups, "layers": [f"{name}|rest" for name in groups] * 2}}


#: variants whose settings depend on the molecule of the data file: name -> function(data path)
DATA_VARIANTS = {"residue-masks": residue_mask_settings}


def run_variant(name: str, data: Path, out: Path, n: int, temperature_k: float) -> dict:
    from trademd.sample import sample_run
    from trademd.train import train_run
    from trademd.training.config import merge_settings

    run_dir = out / name
    variant = DATA_VARIANTS[name](data) if name in DATA_VARIANTS else VARIANTS[name]
    settings = merge_settings(merge_settings({}, BASE), variant, name)
    start = time.perf_counter()
    model = run_dir / "train" / "model.pt"
    if not model.exists():
        train_run(run_dir / "train", *T_RANGE_K, data=data, overrides=settings, platform="CPU", device="cpu",
                  resume=(run_dir / "train" / "checkpoint.pt").exists(), show_progress=False)
    train_s = time.perf_counter() - start
    start = time.perf_counter()
    (summary,) = sample_run(model, [temperature_k], n, run_dir / "samples.h5", overwrite=True,
                            device="cpu", platform="CPU", show_progress=False)
    sample_s = time.perf_counter() - start
    result = {"variant": name, "settings": settings, "data": str(data), "train_s": train_s,
              "sample_s": sample_s, "temperature_k": temperature_k, "n": n,
              "relative_ess": summary["relative_ess"], "batches": summary["relative_ess_batches"],
              "pareto_k": summary.get("pareto_k"), "fraction_flagged": summary["fraction_flagged"],
              "selection": json.loads((run_dir / "train" / "selection.json").read_text())}
    (run_dir / "result.json").write_text(json.dumps(result, indent=2))
    return result


def aggregate(out: Path) -> str:
    results = [json.loads(p.read_text()) for p in sorted(out.glob("*/result.json"), key=lambda p: p.stat().st_mtime)]
    lines = ["| variant | settings over base | relative ESS at T0 (pooled) | batches min-max | Pareto k | "
             "selected step | train (s) |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in results:
        k = r["pareto_k"]
        lines.append(
            f"| {r['variant']} | `{json.dumps(VARIANTS.get(r['variant'], {}))}` | {100 * r['relative_ess']:.2f} % | "
            f"{100 * min(r['batches']):.2f}-{100 * max(r['batches']):.2f} % | "
            f"{'n/a' if k is None else f'{k:.2f}'} | {r['selection'].get('step')} | {r['train_s']:.0f} |")
    if results:
        lines += ["", f"Base: `{json.dumps(BASE)}`, quick preset otherwise; data {results[0]['data']}; "
                  f"{results[0]['n']} samples at {results[0]['temperature_k']:g} K."]
    text = "\n".join(lines)
    (out / "table.md").write_text(text + "\n")
    return text


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, help="trade-md simulate file (T0 = its temperature)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--variants", nargs="*", default=["base"], choices=sorted(VARIANTS) + sorted(DATA_VARIANTS))
    parser.add_argument("--n", type=int, default=100000, help="samples at T0")
    parser.add_argument("--temperature", type=float, default=600.0, help="the data's temperature (K)")
    parser.add_argument("--aggregate", action="store_true", help="only write the table")
    args = parser.parse_args()
    if not args.aggregate:
        if args.data is None:
            parser.error("--data is required unless --aggregate")
        for name in args.variants:
            result = run_variant(name, args.data, args.out, args.n, args.temperature)
            print(f"{name}: {100 * result['relative_ess']:.2f} % ({result['train_s']:.0f} s)", flush=True)
    print(aggregate(args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""How often to save MD frames: the same MD kept at several frame intervals, each fitted by
maximum likelihood at T0 with the quick preset (EMA and model selection on, no refinement),
then scored by the held-out NLL and the pooled ESS of 100,000 samples at T0.

    python benchmarks/frame_interval.py --data runs/bench-seeds/seed0/data_600K.h5 \
        --strides 1 10 --out runs/frame-interval

A stride of k keeps every k-th save of every replica (0.1 ps data: stride 10 is 1 ps).
Prints one table row per stride; writes OUT/results.json.
"""

import argparse
import json
from pathlib import Path
import time

import numpy as np


def subsample(source: Path, stride: int, out: Path) -> Path:
    """A copy of a plain trajectory file keeping every ``stride``-th save (all replicas)."""
    from trademd.io.schema import SCHEMA_ATTRS
    from trademd.io.trajectory_file import DynamicsFile

    with DynamicsFile.open(source) as src:
        replicas = int(src.attrs["n_replicas"])
        columns = src.ensembles[0].columns()
        keep = np.flatnonzero((np.arange(len(columns["energy_kj_mol"])) // replicas) % stride == 0)
        attrs = {k: v for k, v in src.attrs.items() if k not in SCHEMA_ATTRS}
        attrs["save_every_ps"] = float(src.attrs["save_every_ps"]) * stride
        with DynamicsFile.create(out, attrs, src.topology_pdb, src.ensembles[0].n_atoms,
                                 src.temperatures_k, overwrite=True) as dst:
            dst.ensembles[0].append(columns["positions_nm"][keep], columns["energy_kj_mol"][keep],
                                    columns["replica"][keep], columns["time_ps"][keep],
                                    columns["kinetic_temperature_k"][::stride])
    return out


def main() -> None:
    from trademd.io.trajectory_file import read_trajectory
    from trademd.sample import sample_run
    from trademd.train import train_run

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--strides", type=int, nargs="+", default=[1, 10])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--n", type=int, default=100000)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for stride in args.strides:
        data = subsample(args.data, stride, args.out / f"data_stride{stride}.h5")
        trajectory = read_trajectory(data)
        t0, frames = trajectory.temperature_k, trajectory.n_frames
        interval_ps = float(trajectory.attrs["save_every_ps"])
        start = time.perf_counter()
        model = train_run(args.out / f"train_stride{stride}", 0.8 * t0, 1.1 * t0, data=data,
                          overrides={"objective": "nll", "refine_rounds": 0}, show_progress=False)
        train_s = time.perf_counter() - start
        selection = json.loads((model.parent / "selection.json").read_text())
        with (model.parent / "metrics.csv").open() as handle:
            last = handle.read().splitlines()[-1].split(",")
        summary = sample_run(model, [t0], args.n, args.out / f"samples_stride{stride}.h5",
                             overwrite=True, show_progress=False)[0]
        row = {"stride": stride, "interval_ps": interval_ps, "frames": frames,
               "selected_step": selection["step"], "best_val_nll": -selection["score"],
               "train_s": train_s, "relative_ess": summary["relative_ess"],
               "batch_min": summary["relative_ess_batch_min"],
               "batch_max": summary["relative_ess_batch_max"], "pareto_k": summary["pareto_k"],
               "last_row": last}
        rows.append(row)
        print(f"| {interval_ps:g} ps | {frames} | {row['best_val_nll']:.2f} (step {row['selected_step']}) | "
              f"{100 * row['relative_ess']:.1f} % ({100 * row['batch_min']:.1f}-{100 * row['batch_max']:.1f}) | "
              f"{row['pareto_k']} |", flush=True)
    (args.out / "results.json").write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()

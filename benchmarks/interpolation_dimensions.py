"""The energy-interpolation objective on the double well in 1, 2, ... dimensions: how its
accuracy at a fixed number of steps falls with the dimension (same code, same settings).

Per dimension D: train `--objective interpolation` on U(x) = sum_i (x_i^4 - 4 x_i^2), x in
[-3.5, 3.5]^D, over T = 0.5-2 (velocity MLP width 64), then the forward KL to the exact
density (3,000 exact samples) and the Kish relative ESS of 3,000 CNF samples at T = 0.5, 1, 2.

    python benchmarks/interpolation_dimensions.py --dims 1 2 5 --steps 1000 --out runs/interp_dims.json
"""

import argparse
import json
from pathlib import Path
import tempfile
import time

import torch

from trademd.analysis.ess import kish_relative_ess
from trademd.systems.analytic import AnalyticSystem
from trademd.training.targets import AnalyticTarget
from trademd.training.config import TrainConfig
from trademd.training.sampling import importance_weights
from trademd.training.trainer import Trainer

SETTINGS = dict(t_min=0.5, t_max=2.0, batch_size=256, learning_rate=5e-3, refine_rounds=0,
                metrics_every=250, metrics_samples=3000, checkpoint_every=10000, flow={"width": 64})
TEMPERATURES = (0.5, 1.0, 2.0)
N_EVALUATION = 3000


def run(dim: int, steps: int, seed: int, run_dir: Path) -> dict:
    system = AnalyticSystem(f"double-well-{dim}d", dim=dim, half_width=3.5, potential="double-well")
    torch.manual_seed(seed)
    target = AnalyticTarget(system, n_data=100, seed=seed)  # the objective reads no data
    config = TrainConfig.from_settings({"objective": "interpolation", "steps": steps, "seed": seed, **SETTINGS})
    started = time.perf_counter()
    trainer = Trainer(target, config, run_dir)
    trainer.train(show_progress=False)
    row = {"dim": dim, "steps": steps, "seed": seed, "wall_s": time.perf_counter() - started,
           "energy_evaluations": trainer.energy_evaluations()}
    for temperature in TEMPERATURES:
        row[f"kl_{temperature:g}"] = system.forward_kl(trainer.model.log_prob, temperature, n=N_EVALUATION)
        _, _, _, log_w = importance_weights(trainer.model, target, N_EVALUATION, temperature)
        row[f"ess_{temperature:g}"] = kish_relative_ess(log_w.double().cpu().numpy())
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dims", type=int, nargs="*", default=[1, 2, 5])
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, required=True, help="JSON file of the rows")
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        for dim in args.dims:
            rows.append(run(dim, args.steps, args.seed, Path(scratch) / f"d{dim}"))
            args.out.write_text(json.dumps(rows, indent=1))
            print(json.dumps(rows[-1]), flush=True)
    print("| D | steps | " + " | ".join(f"KL T={t:g}" for t in TEMPERATURES) + " | "
          + " | ".join(f"ESS T={t:g} (%)" for t in TEMPERATURES) + " | energy evaluations |")
    print("| --- " * (3 + 2 * len(TEMPERATURES)) + "|")
    for r in rows:
        print(f"| {r['dim']} | {r['steps']} | " + " | ".join(f"{r[f'kl_{t:g}']:.3f}" for t in TEMPERATURES)
              + " | " + " | ".join(f"{100 * r[f'ess_{t:g}']:.1f}" for t in TEMPERATURES)
              + f" | {r['energy_evaluations']:.3g} |")


if __name__ == "__main__":
    main()

"""Transfer over temperature on the analytic systems, every objective side by side, several
seeds: TRADE with data at T0, data-free TRADE (a reverse-KL boundary at T0), the
energy-interpolation objective (a CNF on the continuity residual, no data), reverse KL over
the range, and NLL at T0 (temperature-scaled base) as the naive baseline.

Per run: forward KL to the exact density (nats, 20,000 exact samples), the Kish relative ESS
of 20,000 flow samples against the exact Boltzmann density, and (mixture-2d) the weight of
each mode in the flow's samples against the exact mode weights, at the lowest, the reference
and the highest temperature; the target energy evaluations the training used; wall time.
Prints a markdown table (mean +- s.e. over seeds) and writes the raw rows as JSON.

    python benchmarks/analytic_transfer.py --out runs/analytic.json --seeds 0 1 2 \\
        [--systems double-well-5d mixture-2d] [--steps 300]
"""

import argparse
import json
import math
from pathlib import Path
import time

import numpy as np
import torch

from trademd.analysis.ess import kish_relative_ess
from trademd.systems.analytic import get_analytic_system
from trademd.training.targets import AnalyticTarget
from trademd.training.config import TrainConfig
from trademd.training.sampling import importance_weights
from trademd.training.trainer import Trainer

OBJECTIVES = ("trade", "data-free", "interpolation", "reverse-kl", "nll")
#: The test suite's small settings (seconds per run on one core).
SETTINGS = dict(t_min=0.5, t_max=2.0, batch_size=256, learning_rate=5e-3, cache_every=50,
                refine_rounds=0, cache_samples=256, grid_size=7, trade_points=128,
                warmup_fraction=0.3, ramp_fraction=0.1, metrics_every=100, checkpoint_every=1000,
                flow={"width": 32})
N_EVALUATION = 20000
#: What an objective changes in SETTINGS: the interpolation CNF's velocity MLP gets its own
#: default width (64; the coupling flows' 32-wide conditioners have 3 layers of splines).
OBJECTIVE_SETTINGS = {"interpolation": {"flow": {"width": 64}}}


def run(system_name: str, objective: str, seed: int, steps: int, out_dir: Path) -> dict:
    system = get_analytic_system(system_name)
    torch.manual_seed(seed)
    target = AnalyticTarget(system, n_data=20000, seed=seed)
    points = "samples" if objective in ("data-free", "reverse-kl") else "both"
    settings = {**SETTINGS, **OBJECTIVE_SETTINGS.get(objective, {})}
    config = TrainConfig.from_settings({"objective": objective, "steps": steps, "seed": seed,
                                        "evaluation_points": points, **settings})
    started = time.perf_counter()
    trainer = Trainer(target, config, out_dir / f"{system_name}_{objective}_{seed}")
    trainer.train(show_progress=False)
    row = {"system": system_name, "objective": objective, "seed": seed, "steps": steps,
           "energy_evaluations": trainer.energy_evaluations(), "wall_s": time.perf_counter() - started}
    model = trainer.model
    for name, temperature in (("tmin", config.t_min), ("t0", system.reference_temperature), ("tmax", config.t_max)):
        row[f"kl_{name}"] = system.forward_kl(model.log_prob, temperature, n=N_EVALUATION)
        z, _, _, log_w = importance_weights(model, target, N_EVALUATION, temperature)
        row[f"ess_{name}"] = kish_relative_ess(log_w.double().cpu().numpy())
        if hasattr(system, "mode_weights"):
            modes = torch.bincount(system.nearest_mode(z.double()), minlength=len(system.centres))
            row[f"modes_{name}"] = (modes.double() / len(z)).tolist()
            row[f"modes_exact_{name}"] = system.mode_weights(temperature).tolist()
    return row


def _mean_se(values: list[float]) -> str:
    values = [v for v in values if math.isfinite(v)]
    mean = float(np.mean(values))
    if len(values) < 2:
        return f"{mean:.3g}"
    return f"{mean:.3g} +- {float(np.std(values, ddof=1) / math.sqrt(len(values))):.2g}"


def table(rows: list[dict]) -> str:
    lines = ["| system | objective | KL T_min | KL T0 | KL T_max | ESS T_min (%) | ESS T_max (%) | "
             "mode weights T_min (exact) | mode weights T_max (exact) | energy evaluations | wall (s) |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for system in dict.fromkeys(r["system"] for r in rows):
        for objective in OBJECTIVES:
            group = [r for r in rows if r["system"] == system and r["objective"] == objective]
            if not group:
                continue
            modes = []
            for name in ("tmin", "tmax"):
                if f"modes_{name}" in group[0]:
                    mean = np.mean([r[f"modes_{name}"] for r in group], axis=0)
                    exact = group[0][f"modes_exact_{name}"]
                    modes.append(" ".join(f"{m:.2f}" for m in mean) + " (" + " ".join(f"{e:.2f}" for e in exact) + ")")
                else:
                    modes.append("")
            lines.append(
                f"| {system} | {objective} | {_mean_se([r['kl_tmin'] for r in group])} | "
                f"{_mean_se([r['kl_t0'] for r in group])} | {_mean_se([r['kl_tmax'] for r in group])} | "
                f"{_mean_se([100 * r['ess_tmin'] for r in group])} | {_mean_se([100 * r['ess_tmax'] for r in group])} | "
                f"{modes[0]} | {modes[1]} | {np.mean([r['energy_evaluations'] for r in group]):.3g} | "
                f"{np.mean([r['wall_s'] for r in group]):.0f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="JSON file of the rows")
    parser.add_argument("--seeds", type=int, nargs="*", default=[0, 1, 2])
    parser.add_argument("--systems", nargs="*", default=["double-well-5d", "mixture-2d"])
    parser.add_argument("--objectives", nargs="*", default=list(OBJECTIVES))
    parser.add_argument("--steps", type=int, default=300)
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = json.loads(args.out.read_text()) if args.out.exists() else []
    done = {(r["system"], r["objective"], r["seed"]) for r in rows}
    for system in args.systems:
        for objective in args.objectives:
            for seed in args.seeds:
                if (system, objective, seed) in done:
                    continue
                rows.append(run(system, objective, seed, args.steps, args.out.parent / "analytic_runs"))
                args.out.write_text(json.dumps(rows, indent=1))
                print(json.dumps({k: v for k, v in rows[-1].items() if not k.startswith("modes")}), flush=True)
    print(table(rows))


if __name__ == "__main__":
    main()

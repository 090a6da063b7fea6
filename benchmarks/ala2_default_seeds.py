"""The default `trade-md run` on alanine dipeptide for several seeds, each with its own MD.

Per seed (stages timed separately): simulate at 600 K with the default settings, train with
the quick preset (focus temperature 300 K), draw 100,000 samples at 300 K and at 600 K, and
record the pooled relative ESS with its spread over 5 batches, the top-10 weight share, the
Pareto k, the positive-phi free energy at 300 K (against a replica-exchange reference file if
given, else against the recorded reference value), phi/psi JS and KL against the reference,
and the 10,000-sample ESS of the training metrics at the end of the main phase and after
refinement (what refinement adds, in the same run).

    python benchmarks/ala2_default_seeds.py --out runs/bench-seeds --seeds 0 1 2 \
        [--reference reference_remd.h5] [--platform CPU --device cpu]
    python benchmarks/ala2_default_seeds.py --out runs/bench-seeds --aggregate   # tables only
    python benchmarks/ala2_default_seeds.py --out runs/long --seeds 0 --steps 4500   # a longer budget
    python benchmarks/ala2_default_seeds.py --out runs/omt --seeds 0 --system ala2-openmmtools

Target energy evaluations are counted as the published samplers count them: every MD force
evaluation (steps x replicas, equilibration included) plus the per-frame energy of each saved
frame, every energy the training computed (model.pt's count), and one per drawn sample.

A seed's stages whose outputs exist are reused (e.g. copy another run's ``seedN/data_600K.h5``
to train a longer budget on the same MD).

Seeds can run as separate processes (e.g. pinned to 2 cores each with ``taskset``) into the
same ``--out``; ``--aggregate`` then writes ``results.md`` and ``results.json`` over all seeds
(mean +- standard error).
"""

import argparse
import csv
import json
import math
from pathlib import Path
import time

import numpy as np

#: Replica-exchange reference at 300 K of ala2-implicit (docs/results.md, 2 ladders x 6 ns,
#: 2026-11-24), printed for runs of that system.
RECORDED_REFERENCE_DF_300K = (3.31, 0.22)
TEMPERATURES_K = (300.0, 600.0)


def run_seed(seed: int, out: Path, platform: str, device: str, reference: Path | None,
             overrides: dict | None = None, progress: bool = True,
             train_overrides: dict | None = None) -> dict:
    from trademd.evaluate import evaluate_samples
    from trademd.io.trajectory_file import DynamicsFile, frame_count
    from trademd.pipeline import RunConfig
    from trademd.sample import sample_run
    from trademd.simulate import simulate
    from trademd.train import train_run

    config = RunConfig(temperatures_k=(300.0,), seed=seed, **(overrides or {}))
    run_dir = out / f"seed{seed}"
    run_dir.mkdir(parents=True, exist_ok=True)
    wall = {}
    data = run_dir / "data_600K.h5"
    start = time.perf_counter()
    settings = config.simulation(platform)
    if not data.exists() or frame_count(data) < settings.n_saves * settings.replicas:
        simulate(settings, data, resume=data.exists(), show_progress=progress)
    with DynamicsFile.open(data) as file:  # the file's own record: set-up and every resume included
        wall["simulate_s"] = float(file.attrs["wall_time_s"])
    data_check = _data_check(data)
    print(f"seed {seed}: simulate done in {wall['simulate_s']:.0f} s; {data_check}", flush=True)
    start = time.perf_counter()
    t_min, t_max = config.temperature_range_k
    model = run_dir / "train" / "model.pt"
    if not model.exists():
        train_run(run_dir / "train", t_min, t_max, data=data, preset=config.preset,
                  overrides={"seed": seed, "steps": config.steps,
                             "focus_temperatures": list(config.temperatures_k), **(train_overrides or {})},
                  device=device, platform=platform,
                  resume=(run_dir / "train" / "checkpoint.pt").exists(), show_progress=progress)
    wall["train_s"] = time.perf_counter() - start
    print(f"seed {seed}: train done in {wall['train_s']:.0f} s", flush=True)
    start = time.perf_counter()
    samples = run_dir / "samples.h5"
    summaries = sample_run(model, list(TEMPERATURES_K), config.n_samples, samples, overwrite=True,
                           device=device, platform=platform, show_progress=progress)
    wall["sample_s"] = time.perf_counter() - start
    print(f"seed {seed}: sample done in {wall['sample_s']:.0f} s", flush=True)
    result = {"seed": seed, "system": config.system, "overrides": {**(overrides or {}), **(train_overrides or {})},
              "wall_time": wall,
              "data": data_check, "samples": summaries,
              "energy_evaluations": _energy_evaluations(settings, model, summaries),
              "training": _training_ess(run_dir / "train" / "metrics.csv"),
              "selection": json.loads((run_dir / "train" / "selection.json").read_text())}
    if reference is not None:
        result["evaluation_300K"] = evaluate_samples(samples, reference, 300.0)
    (run_dir / "result.json").write_text(json.dumps(result, indent=2))
    return result


def _energy_evaluations(settings, model: Path, summaries: list[dict]) -> dict:
    """Target energy evaluations of each stage: MD (force evaluations of every step of every
    replica, equilibration included, and the stored energy of every frame), training (the
    model's own count) and sampling (one per sample)."""
    import torch

    steps = settings.equilibration_steps + settings.n_saves * settings.steps_per_save
    md = steps * settings.replicas + settings.n_saves * settings.replicas
    training = int(torch.load(model, weights_only=False).get("energy_evaluations", -1))
    sampling = sum(int(s["n"]) for s in summaries)
    return {"md": md, "training": training, "sampling": sampling, "total": md + max(training, 0) + sampling}


def _data_check(data: Path) -> dict:
    """The MD data's own ensemble: mean energy (s.e. over replicas, kJ/mol), the fraction of
    frames with phi > 0, and the integrator settings that made them (an ensemble check of
    e.g. hydrogen mass repartitioning against earlier data)."""
    from trademd.analysis.observables import phi_psi
    from trademd.io.trajectory_file import read_trajectory
    from trademd.systems import get_system

    trajectory = read_trajectory(data)
    energy = trajectory.energy_kj_mol.astype(np.float64)
    per_replica = np.array([energy[trajectory.replica == r].mean() for r in np.unique(trajectory.replica)])
    phi, _ = phi_psi(get_system(trajectory.attrs["system"]), trajectory.positions_nm)
    return {"frames": int(len(energy)), "mean_energy_kj_mol": float(energy.mean()),
            "mean_energy_se_kj_mol": float(per_replica.std(ddof=1) / math.sqrt(len(per_replica))),
            "fraction_positive_phi": float(np.mean(phi > 0)),
            "timestep_ps": float(trajectory.attrs["timestep_ps"]),
            "hydrogen_mass_amu": float(trajectory.attrs.get("hydrogen_mass_amu", 0.0))}


def _training_ess(metrics_csv: Path) -> dict:
    """ESS (10,000 samples, EMA flow) at the end of the main phase and at the last step."""
    with metrics_csv.open() as handle:
        rows = list(csv.DictReader(handle))
    main = [r for r in rows if r["phase"] == "main"][-1]
    last = rows[-1]
    keys = [k for k in rows[0] if k.startswith("ess_")]
    return {"main_end": {k: float(main[k]) for k in keys}, "final": {k: float(last[k]) for k in keys},
            "main_end_step": int(main["step"]), "final_step": int(last["step"])}


def _value(value: float | None) -> str:
    """A number to 2 decimals, "n/a" for None (e.g. dF of a basin the samples never visit)."""
    return "n/a" if value is None else f"{value:.2f}"


def _mean_se(values: list[float]) -> str:
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return "n/a"
    mean = float(np.mean(values))
    if len(values) < 2:
        return f"{mean:.3g}"
    return f"{mean:.3g} +- {float(np.std(values, ddof=1) / math.sqrt(len(values))):.2g}"


def aggregate(out: Path) -> str:
    results = [json.loads(p.read_text()) for p in sorted(out.glob("seed*/result.json"))]
    if not results:
        raise SystemExit(f"no seed*/result.json under {out}")
    lines = ["| seed | T | relative ESS (pooled, 100k) | batches min-max | top-10 share | Pareto k | dF(phi>0) / kT | flagged |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    per_t = {t: {"ess": [], "df": []} for t in TEMPERATURES_K}
    for r in results:
        for s in r["samples"]:
            t = s["temperature_k"]
            per_t[t]["ess"].append(100 * s["relative_ess"])
            per_t[t]["df"].append(s.get("delta_f_positive_phi_kt"))
            k = s.get("pareto_k")
            lines.append(
                f"| {r['seed']} | {t:g} K | {100 * s['relative_ess']:.1f} % | "
                f"{100 * s['relative_ess_batch_min']:.1f}-{100 * s['relative_ess_batch_max']:.1f} % | "
                f"{s['top10_weight_share']:.3f} | {'n/a' if k is None else f'{k:.2f}'} | "
                f"{_value(s.get('delta_f_positive_phi_kt'))} +- {_value(s.get('delta_f_positive_phi_kt_error'))} | "
                f"{100 * s['fraction_flagged']:.2f} % |")
    lines += ["", "| T | relative ESS, mean +- s.e. over seeds (%) | worst seed (%) | dF(phi>0) / kT, mean +- s.e. |",
              "| --- | --- | --- | --- |"]
    for t, values in per_t.items():
        lines.append(f"| {t:g} K | {_mean_se(values['ess'])} | {min(values['ess']):.1f} | {_mean_se(values['df'])} |")
    systems = {r.get("system") for r in results}
    if systems <= {"ala2-implicit", None}:  # the recorded reference is of that system only
        lines += ["", f"Reference dF(phi>0) at 300 K (replica exchange): {RECORDED_REFERENCE_DF_300K[0]} +- "
                  f"{RECORDED_REFERENCE_DF_300K[1]} kT (recorded, docs/results.md)."]
    lines += ["",
              "| seed | data: frames | mean U 600 K (kJ/mol) | phi > 0 |", "| --- | --- | --- | --- |"]
    for r in results:
        if "data" in r:
            d = r["data"]
            lines.append(f"| {r['seed']} | {d['frames']} | {d['mean_energy_kj_mol']:.2f} +- "
                         f"{d['mean_energy_se_kj_mol']:.2f} | {100 * d['fraction_positive_phi']:.2f} % |")
    lines += ["",
              "| seed | ESS 300 K main phase end (10k) | ESS 300 K after refinement (10k) | ESS T0 main end | ESS T0 after | selected step | simulate (s) | train (s) | sample 2 x 100k (s) |",
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in results:
        tr, wall = r["training"], r["wall_time"]
        lines.append(
            f"| {r['seed']} | {100 * tr['main_end'].get('ess_300', float('nan')):.1f} % | "
            f"{100 * tr['final'].get('ess_300', float('nan')):.1f} % | {100 * tr['main_end']['ess_t0']:.1f} % | "
            f"{100 * tr['final']['ess_t0']:.1f} % | {r['selection']['step']} | {wall['simulate_s']:.0f} | "
            f"{wall['train_s']:.0f} | {wall['sample_s']:.0f} |")
        if "evaluation_300K" in r:
            e = r["evaluation_300K"]
            lines.append(f"|   | evaluation at 300 K: {json.dumps({k: e[k] for k in e if 'js' in k or 'kl' in k})} | | | | | | | |")
    counted = [r for r in results if "energy_evaluations" in r]
    if counted:
        lines += ["", "| seed | energy evaluations: MD | training | sampling | in all |", "| --- | --- | --- | --- | --- |"]
        for r in counted:
            e = r["energy_evaluations"]
            lines.append(f"| {r['seed']} | {e['md']:.3g} | {e['training']:.3g} | {e['sampling']:.3g} | {e['total']:.3g} |")
    text = "\n".join(lines) + "\n"
    (out / "results.md").write_text(text)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seeds", type=int, nargs="*", default=[0, 1, 2])
    parser.add_argument("--platform", default="auto")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--reference", type=Path, default=None)
    parser.add_argument("--save-every-ps", type=float, default=None,
                        help="frame interval of the MD (default: the run default)")
    parser.add_argument("--steps", type=int, default=None,
                        help="training steps (default: the preset's; refinement scales with them)")
    parser.add_argument("--system", default=None, help="built-in system (default: the run default)")
    parser.add_argument("--aggregate", action="store_true", help="only write the tables")
    args = parser.parse_args()
    overrides = {k: v for k, v in (("save_every_ps", args.save_every_ps), ("steps", args.steps),
                                   ("system", args.system)) if v is not None}
    if not args.aggregate:
        for seed in args.seeds:
            run_seed(seed, args.out, args.platform, args.device, args.reference, overrides)
    print(aggregate(args.out))


if __name__ == "__main__":
    main()

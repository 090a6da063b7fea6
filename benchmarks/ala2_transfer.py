"""End-to-end benchmark on alanine dipeptide in implicit solvent: data at 600 K only, TRADE and
its baselines transferred to 300-600 K, evaluated against replica exchange.

    python benchmarks/ala2_transfer.py --scale quick --out runs/bench-quick   # CPU, about an hour
    python benchmarks/ala2_transfer.py --scale full --out runs/bench-full     # GPU, paper scale

Stages (each output reused when it exists, an interrupted simulation or training resumed):

    data_600K.h5                 plain MD at T0 = 600 K: the only training data
    reference_remd.h5            replica exchange 300-600 K: the reference ensembles
    md_300K.h5                   plain MD at 300 K: the classical baseline's cost
    train_<objective>/model.pt   trade, nll, reverse-kl, nll+reverse-kl (same flow and budget)
    samples_<objective>_<T>K.h5  samples at 300, 400, 500, 600 K with energies and weights
    metrics/<objective>_<T>K.json (+ .png: reference vs reweighted samples, Figure 3 layout)
    results.md, results.json, ess_vs_temperature.png

Wall-clock times: simulations from the files' ``wall_time_s`` (set-up included), training from
its metrics.csv (steps / steps per second), sampling measured here (energies included).
"""

import argparse
import json
from pathlib import Path
import shlex
import sys
import time

import numpy as np

from trademd.analysis.observables import phi_psi
from trademd.analysis.plots import ess_against_temperature
from trademd.analysis.statistics import (
    chains_by_replica,
    integrated_autocorrelation_time,
)
from trademd.errors import TradeMDError
from trademd.evaluate import evaluate_samples
from trademd.io.trajectory_file import DynamicsFile, ensemble_temperatures, frame_count, read_trajectory
from trademd.sample import sample_run
from trademd.simulate import ExchangeConfig, SimulationConfig, simulate
from trademd.systems import system_from_attrs
from trademd.train import train_run

OBJECTIVES = ("trade", "nll", "reverse-kl", "nll+reverse-kl")
EVALUATION_TEMPERATURES_K = (300.0, 400.0, 500.0, 600.0)
DATA_TEMPERATURE_K = 600.0
#: Trained range: 0.8 x 300 K to 1.1 x 600 K, as `trade-md run` and the TRADE paper.
T_MIN_K, T_MAX_K = 240.0, 660.0
LADDER_K = (300.0, 350.0, 400.0, 450.0, 500.0, 550.0, 600.0)

#: ``smoke`` checks the script in minutes (numbers meaningless), ``quick`` is the CPU scale,
#: ``full`` the TRADE paper's (500k frames at 600 K, 80k training steps; a GPU).
SCALES = {
    "smoke": dict(data_replicas=4, data_time_ps=25.0, remd_ladders=1, remd_time_ps=10.0,
                  md_replicas=2, md_time_ps=10.0, preset="quick", steps=20, n_samples=300),
    "quick": dict(data_replicas=16, data_time_ps=1000.0, remd_ladders=2, remd_time_ps=1000.0,
                  md_replicas=4, md_time_ps=1000.0, preset="quick", steps=None, n_samples=20000),
    "full": dict(data_replicas=100, data_time_ps=5000.0, remd_ladders=8, remd_time_ps=20000.0,
                 md_replicas=16, md_time_ps=20000.0, preset="paper", steps=None, n_samples=200000),
}

def log(message: str) -> None:
    print(f"[ala2_transfer] {message}", file=sys.stderr, flush=True)

def plain_md(path: Path, temperature_k: float, replicas: int, time_ps: float, platform: str) -> None:
    """Run, resume or reuse a plain MD file."""
    config = SimulationConfig(system_name="ala2-implicit", temperature_k=temperature_k,
                              time_ps=time_ps, replicas=replicas, equilibration_ps=20.0,
                              platform=platform)
    if path.exists() and frame_count(path) >= config.n_saves * replicas:
        log(f"reusing {path}")
        return
    log(f"MD at {temperature_k:g} K, {replicas} x {time_ps:g} ps -> {path}")
    simulate(config, path, resume=path.exists(), command=COMMAND)

def reference_remd(path: Path, ladders: int, time_ps: float, platform: str) -> None:
    """Run, resume or reuse the replica-exchange reference."""
    config = ExchangeConfig(system_name="ala2-implicit", temperatures_k=LADDER_K, time_ps=time_ps,
                            exchange_every_ps=1.0, ladders=ladders, equilibration_ps=20.0,
                            platform=platform)
    if path.exists() and frame_count(path, LADDER_K[0]) >= config.n_saves * ladders:
        log(f"reusing {path}")
        return
    log(f"replica exchange over {LADDER_K} K, {ladders} ladders x {time_ps:g} ps -> {path}")
    simulate(config, path, resume=path.exists(), command=COMMAND)

def training_seconds(run_dir: Path) -> float:
    """Training wall time from metrics.csv: sum over logging intervals of steps / (steps/s)."""
    rows = np.genfromtxt(run_dir / "metrics.csv", delimiter=",", names=True)
    steps = np.diff(np.concatenate([[0.0], np.atleast_1d(rows["step"])]))
    return float(np.sum(steps / np.atleast_1d(rows["steps_per_s"])))

def simulation_seconds(path: Path) -> float | None:
    with DynamicsFile.open(path) as file:
        value = file.attrs.get("wall_time_s")
    return None if value is None else float(value)

def phi_tau_frames(path: Path, temperature_k: float) -> dict:
    """Integrated autocorrelation time (frames) of phi and of the phi > 0 indicator, per
    replica chain, and the frames they come from."""
    trajectory = read_trajectory(path, temperature_k)
    phi, _ = phi_psi(system_from_attrs(trajectory.attrs, trajectory.topology_pdb), trajectory.positions_nm)
    result = {"frames": trajectory.n_frames}
    for name, values in (("phi", phi), ("positive_phi", (phi > 0).astype(np.float64))):
        chains = chains_by_replica(values, trajectory.replica, trajectory.time_ps)
        result[f"tau_{name}_frames"] = integrated_autocorrelation_time(chains)
        result["chain_length_frames"] = chains.shape[1]
    result["transitions_positive_phi"] = int(np.sum(np.abs(np.diff(
        chains_by_replica((phi > 0).astype(int), trajectory.replica, trajectory.time_ps), axis=1))))
    return result

def sample_and_evaluate(model: Path, objective: str, temperature_k: float, out: Path,
                        reference: Path, n_samples: int, device: str, platform: str) -> dict:
    """Sample (timed, energies included) and evaluate against the reference; a model whose
    samples are all flagged is recorded as failed with the reason."""
    samples = out / f"samples_{objective}_{temperature_k:g}K.h5"
    summary_path = samples.with_suffix(".json")
    if summary_path.exists():
        summary = json.loads(summary_path.read_text())
    else:
        samples.unlink(missing_ok=True)
        start = time.perf_counter()
        try:
            [summary] = sample_run(model, [temperature_k], n_samples, samples, device=device,
                                   platform=platform, command=COMMAND)
        except TradeMDError as error:
            summary = {"failed": str(error)}
        summary["sample_s"] = time.perf_counter() - start
        summary_path.write_text(json.dumps(summary, indent=2))
    if "failed" in summary:
        log(f"{objective} at {temperature_k:g} K failed: {summary['failed']}")
        return summary
    stem = out / "metrics" / f"{objective}_{temperature_k:g}K"
    metrics = evaluate_samples(samples, reference, temperature_k, model,
                               stem.with_suffix(".json"), stem.with_suffix(".png"))
    metrics["sample_s"] = summary["sample_s"]
    metrics["effective_samples_per_s"] = summary["ess"] / summary["sample_s"]
    return metrics

def run(scale: str, settings: dict, out: Path, platform: str, device: str) -> dict:
    """Every stage of the benchmark at ``scale`` with ``settings`` (a :data:`SCALES` entry)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics").mkdir(exist_ok=True)
    data, reference, md300 = out / "data_600K.h5", out / "reference_remd.h5", out / "md_300K.h5"
    plain_md(data, DATA_TEMPERATURE_K, settings["data_replicas"], settings["data_time_ps"], platform)
    reference_remd(reference, settings["remd_ladders"], settings["remd_time_ps"], platform)
    plain_md(md300, 300.0, settings["md_replicas"], settings["md_time_ps"], platform)

    results = {"scale": scale, "settings": settings, "command": COMMAND, "objectives": {},
               "stages_s": {"data_600K": simulation_seconds(data),
                            "reference_remd": simulation_seconds(reference),
                            "md_300K": simulation_seconds(md300)}}
    with DynamicsFile.open(reference) as file:
        exchange = file.read_exchange_statistics()
    results["remd"] = {"acceptance_rate": exchange["acceptance_rate"], "round_trips": exchange["round_trips"],
                       "ladder_k": ensemble_temperatures(reference)}
    for objective in OBJECTIVES:
        run_dir = out / f"train_{objective}"
        model = run_dir / "model.pt"
        if model.exists():
            log(f"reusing {model}")
        else:
            log(f"training {objective} -> {run_dir}")
            train_run(run_dir, T_MIN_K, T_MAX_K, data=data, preset=settings["preset"],
                      overrides={"objective": objective, "seed": 0, "steps": settings["steps"]}, device=device,
                      platform=platform, resume=(run_dir / "checkpoint.pt").exists())
        entry = {"train_s": training_seconds(run_dir), "temperatures": {}}
        for temperature_k in EVALUATION_TEMPERATURES_K:
            entry["temperatures"][f"{temperature_k:g}"] = sample_and_evaluate(
                model, objective, temperature_k, out, reference, settings["n_samples"], device, platform)
        results["objectives"][objective] = entry

    md_tau = phi_tau_frames(md300, 300.0)
    remd_tau = phi_tau_frames(reference, 300.0)
    results["time_to_solution_300K"] = {}
    for name, tau, wall_s in (("md", md_tau, results["stages_s"]["md_300K"]),
                              ("remd", remd_tau, results["stages_s"]["reference_remd"])):
        rate = None if wall_s is None else tau["frames"] / tau["tau_phi_frames"] / wall_s
        results["time_to_solution_300K"][name] = {**tau, "wall_s": wall_s, "effective_samples_per_s": rate}
    ess_against_temperature(out / "ess_vs_temperature.png", {
        objective: ([float(t) for t, m in entry["temperatures"].items() if "failed" not in m],
                    [m["relative_ess"] for m in entry["temperatures"].values() if "failed" not in m])
        for objective, entry in results["objectives"].items()
    })
    (out / "results.json").write_text(json.dumps(results, indent=2))
    (out / "results.md").write_text(markdown(results))
    return results

def _number(value, fmt: str) -> str:
    return "n/a" if value is None else format(value, fmt)

def _error(value) -> str:
    """A standard error; above 10 kT only its size matters."""
    return "n/a" if value is None else ("> 10" if value > 10 else format(value, ".2f"))

def markdown(results: dict) -> str:
    """The results as Markdown tables: one per temperature, then time to solution."""
    lines = [f"Command: `{results['command']}`", ""]
    stages = results["stages_s"]
    lines += ["| stage | wall clock |", "| --- | --- |"]
    for name, seconds in stages.items():
        lines.append(f"| {name} | {_number(seconds and seconds / 60, '.1f')} min |")
    for objective, entry in results["objectives"].items():
        lines.append(f"| train {objective} | {entry['train_s'] / 60:.1f} min |")
    remd = results["remd"]
    rates = ", ".join(_number(r, ".2f") for r in remd["acceptance_rate"])
    lines += ["", f"Replica exchange over {remd['ladder_k']} K: acceptance per neighbour pair "
              f"[{rates}], {remd['round_trips']} round trips.", ""]
    for temperature in (f"{t:g}" for t in EVALUATION_TEMPERATURES_K):
        first = next(m for entry in results["objectives"].values()
                     for t, m in entry["temperatures"].items() if t == temperature and "failed" not in m)
        reference_df = first["reference_delta_f_positive_phi_kt"]
        reference_err = first["reference_delta_f_positive_phi_kt_error"]
        lines += [f"### {temperature} K (reference: replica exchange, {first['n_reference_frames']} "
                  f"frames, dF(phi > 0) = {_number(reference_df, '.2f')} +- {_error(reference_err)} kT)", "",
                  "| objective | NLL of reference frames | KL phi/psi (weighted / unweighted) | "
                  "JS (weighted / unweighted) | energy W1 kJ/mol (weighted) | relative ESS | "
                  "dF(phi > 0) / kT | flagged | sampling s |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for objective, entry in results["objectives"].items():
            m = entry["temperatures"][temperature]
            if "failed" in m:
                lines.append(f"| {objective} | failed: {m['failed']} |" + " |" * 7)
                continue
            lines.append(
                f"| {objective} | {_number(m.get('reference_nll'), '.2f')} | "
                f"{m['kl_phi_psi_weighted']:.3f} / {m['kl_phi_psi_unweighted']:.3f} | "
                f"{m['js_phi_psi_weighted']:.3f} / {m['js_phi_psi_unweighted']:.3f} | "
                f"{m['energy_w1_weighted_kj_mol']:.2f} | {100 * m['relative_ess']:.2f} % | "
                f"{_number(m['delta_f_positive_phi_kt'], '.2f')} +- "
                f"{_error(m['delta_f_positive_phi_kt_error'])} | "
                f"{100 * m['fraction_flagged']:.2f} % | {m['sample_s']:.1f} |")
        lines.append("")
    tts = results["time_to_solution_300K"]
    lines += ["### Effective independent samples per second at 300 K", "",
              "| method | samples | tau(phi) frames | tau(phi > 0) frames | phi > 0 transitions | "
              "wall s | effective samples / s |",
              "| --- | --- | --- | --- | --- | --- | --- |"]
    for name in ("md", "remd"):
        t = tts[name]
        lines.append(f"| {name.upper()} 300 K frames | {t['frames']} | {t['tau_phi_frames']:.1f} | "
                     f"{t['tau_positive_phi_frames']:.1f} (chains of {t['chain_length_frames']}) | "
                     f"{t['transitions_positive_phi']} | {_number(t['wall_s'], '.0f')} | "
                     f"{_number(t['effective_samples_per_s'], '.3g')} |")
    for objective, entry in results["objectives"].items():
        m = entry["temperatures"]["300"]
        if "failed" in m:
            lines.append(f"| flow ({objective}) | failed: {m['failed']} |" + " |" * 5)
            continue
        ess = m["relative_ess"] * m["n_samples"]
        lines.append(f"| flow ({objective}), sampling only | {m['n_samples']} | | | | "
                     f"{m['sample_s']:.0f} | {m['effective_samples_per_s']:.3g} |")
        lines.append(f"| flow ({objective}), training + sampling | {m['n_samples']} | | | | "
                     f"{entry['train_s'] + m['sample_s']:.0f} | {ess / (entry['train_s'] + m['sample_s']):.3g} |")
    return "\n".join(lines) + "\n"

COMMAND = "python " + " ".join(shlex.quote(word) for word in sys.argv)

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", choices=sorted(SCALES), default="quick")
    parser.add_argument("--out", type=Path, default=Path("runs/bench-quick"))
    parser.add_argument("--platform", default="auto", help="OpenMM platform: auto, CPU, CUDA")
    parser.add_argument("--device", default="auto", help="torch device: auto, cpu, cuda")
    parser.add_argument("--reference-ps", type=float, default=None,
                        help="replica-exchange time per ladder (ps), overriding the scale's")
    args = parser.parse_args()
    start = time.perf_counter()
    settings = dict(SCALES[args.scale])
    if args.reference_ps is not None:
        settings["remd_time_ps"] = args.reference_ps
    run(args.scale, settings, args.out, args.platform, args.device)
    print((args.out / "results.md").read_text())
    log(f"done in {(time.perf_counter() - start) / 60:.1f} min; results in {args.out / 'results.md'}")

if __name__ == "__main__":
    main()

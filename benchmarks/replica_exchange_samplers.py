"""trade-md's replica exchange against OpenMM's own ``ReplicaExchangeSampler`` and openmmtools'
``ParallelTemperingSampler``: effective samples per second of the lowest rung.

All three sample ala2-implicit on the same ladder (7 rungs geometric 300-600 K by default), the
same dynamics (LangevinMiddle, 2 fs, friction 1/ps, the system's constraints, the CPU platform
with its default threads), the same exchange interval and the same simulated time per replica
after the same equilibration, one after another in this process. For the lowest rung's
configurations at every exchange the script computes the integrated autocorrelation time
(statistical inefficiency g, pymbar) of the positive-phi indicator and of the potential energy
(recomputed by one single-molecule Context for all three), effective samples n / g, and those
per wall-clock second; and the fraction of exchange rounds in which the lowest rung received
another configuration history.

    python benchmarks/replica_exchange_samplers.py [--time-ps 200] [--equilibration-ps 20]
        [--rungs 7] [--exchange-every-ps 1] [--out rx_samplers.json]

trade-md's engine runs the rungs as copies in one Context (``--ladders`` independent ladders of
them: 1 here, as the other two run one); OpenMM's runs them one after another in one Context
and attempts n^2 random pair swaps per round; openmmtools' is told to swap neighbours.
"""

import argparse
import contextlib
import io
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import openmm
import openmm.app as app
from openmm import unit

from trademd.analysis.observables import phi_psi
from trademd.energy.molecule import MoleculeEnergy
from trademd.io.trajectory_file import DynamicsFile, read_trajectory
from trademd.progress import quiet_loggers
from trademd.simulate import ExchangeConfig, simulate
from trademd.systems import get_system

SYSTEM = "ala2-implicit"
TIMESTEP_PS = 0.002
FRICTION_PER_PS = 1.0


def ladder_k(rungs: int, low_k: float = 300.0, high_k: float = 600.0) -> list[float]:
    """``rungs`` temperatures geometric from ``low_k`` to ``high_k`` (K)."""
    return [float(t) for t in np.geomspace(low_k, high_k, rungs)]


def _cpu() -> openmm.Platform:
    return openmm.Platform.getPlatformByName("CPU")


def run_trademd(molecule, ladder: list[float], args, work: Path) -> dict:
    config = ExchangeConfig(system_name=SYSTEM, temperatures_k=tuple(ladder), ladders=args.ladders,
                            exchange_every_ps=args.exchange_every_ps, time_ps=args.time_ps,
                            save_every_ps=args.exchange_every_ps, equilibration_ps=args.equilibration_ps,
                            timestep_ps=TIMESTEP_PS, friction_per_ps=FRICTION_PER_PS, platform="CPU",
                            seed=args.seed, chunk_saves=max(1, int(args.time_ps / args.exchange_every_ps) // 4))
    start = time.perf_counter()
    path = simulate(config, work / "trademd_rx.h5", show_progress=False)
    wall_s = time.perf_counter() - start
    frames = read_trajectory(path, ladder[0])
    with DynamicsFile.open(path) as file:
        statistics = file.read_exchange_statistics()
    walkers = statistics["walker_at_rung"][:, 0, 0]  # the first ladder's walker at the lowest rung
    first_ladder = frames.replica == 0
    return {"wall_s": wall_s, "positions_nm": frames.positions_nm[first_ladder],
            "walkers": walkers, "neighbour_acceptance": (statistics["accepted"] / statistics["attempts"]).tolist()}


def run_openmm(molecule, ladder: list[float], args, work: Path) -> dict:
    system = molecule.create_openmm_system()
    integrator = openmm.LangevinMiddleIntegrator(ladder[0], FRICTION_PER_PS, TIMESTEP_PS)
    integrator.setRandomNumberSeed(args.seed + 1)
    simulation = app.Simulation(molecule.pdb().topology, system, integrator, _cpu())
    simulation.context.setPositions(molecule.positions_nm())
    simulation.minimizeEnergy(maxIterations=1000)
    states = [{"temperature": t * unit.kelvin} for t in ladder]
    steps = int(round(args.exchange_every_ps / TIMESTEP_PS))
    start = time.perf_counter()
    sampler = app.ReplicaExchangeSampler(states, simulation, steps)
    sampler.simulate(int(round(args.equilibration_ps / args.exchange_every_ps)))
    positions, walkers = [], []

    def record(s):
        replica = s.replicaStateIndex.index(0)
        walkers.append(replica)
        positions.append(s.replicaConformation[replica].getPositions(asNumpy=True).value_in_unit(unit.nanometer))

    sampler.reporters.append(record)
    sampler.simulate(int(round(args.time_ps / args.exchange_every_ps)))
    return {"wall_s": time.perf_counter() - start, "positions_nm": np.array(positions),
            "walkers": np.array(walkers)}


def run_openmmtools(molecule, ladder: list[float], args, work: Path) -> dict:
    with quiet_loggers("openmmtools", "pymbar"):
        from openmmtools import cache, mcmc, multistate, states

        steps = int(round(args.exchange_every_ps / TIMESTEP_PS))
        move = mcmc.LangevinDynamicsMove(timestep=TIMESTEP_PS * unit.picosecond,
                                         collision_rate=FRICTION_PER_PS / unit.picosecond, n_steps=steps)
        iterations = int(round((args.equilibration_ps + args.time_ps) / args.exchange_every_ps))
        sampler = multistate.ParallelTemperingSampler(mcmc_moves=move, number_of_iterations=iterations,
                                                      replica_mixing_scheme="swap-neighbors")
        path = work / "openmmtools_pt.nc"
        reporter = multistate.MultiStateReporter(str(path), checkpoint_interval=1)
        thermodynamic = states.ThermodynamicState(molecule.create_openmm_system(), ladder[0] * unit.kelvin)
        start = time.perf_counter()
        sampler.create(thermodynamic_state=thermodynamic,
                       sampler_states=states.SamplerState(molecule.positions_nm() * unit.nanometer),
                       storage=reporter, min_temperature=ladder[0] * unit.kelvin,
                       max_temperature=ladder[-1] * unit.kelvin, n_temperatures=len(ladder))  # geometric, as ours
        sampler.energy_context_cache = cache.ContextCache(platform=_cpu())
        sampler.sampler_context_cache = cache.ContextCache(platform=_cpu())
        sampler.minimize(max_iterations=1000)
        with contextlib.redirect_stdout(io.StringIO()):  # its citation banner
            sampler.run()
        wall_s = time.perf_counter() - start
        replica_states = reporter.read_replica_thermodynamic_states()  # [iterations + 1, replicas]
        skip = 1 + int(round(args.equilibration_ps / args.exchange_every_ps))
        walkers, positions = [], []
        for iteration in range(skip, len(replica_states)):
            replica = int(np.flatnonzero(replica_states[iteration] == 0)[0])
            walkers.append(replica)
            sampler_states = reporter.read_sampler_states(iteration)
            positions.append(sampler_states[replica].positions.value_in_unit(unit.nanometer))
        reporter.close()
    return {"wall_s": wall_s, "positions_nm": np.array(positions), "walkers": np.array(walkers)}


def _inefficiency(series: np.ndarray) -> float:
    """Statistical inefficiency g = 1 + 2 tau (pymbar); NaN for a constant series (e.g. no
    visit to the positive-phi basin: its autocorrelation time is not measured)."""
    from pymbar import timeseries

    if np.ptp(series) == 0:
        return math.nan
    return float(timeseries.statistical_inefficiency(series.astype(np.float64)))


def summarise(name: str, result: dict, molecule, energy: MoleculeEnergy) -> dict:
    positions = result["positions_nm"]
    phi, _ = phi_psi(molecule, positions)
    positive = (phi > 0).astype(np.float64)
    energies, _ = energy(positions.astype(np.float64))
    n = len(positions)
    g_phi, g_energy = _inefficiency(positive), _inefficiency(energies)
    walkers = np.asarray(result["walkers"])
    return {"sampler": name, "frames": n, "wall_s": result["wall_s"],
            "positive_phi_fraction": float(positive.mean()), "mean_energy_kj_mol": float(energies.mean()),
            "g_positive_phi": g_phi, "g_energy": g_energy,
            "effective_per_s_positive_phi": n / g_phi / result["wall_s"],
            "effective_per_s_energy": n / g_energy / result["wall_s"],
            "lowest_rung_replaced_fraction": float(np.mean(walkers[1:] != walkers[:-1])) if len(walkers) > 1 else math.nan,
            **({"neighbour_acceptance": result["neighbour_acceptance"]} if "neighbour_acceptance" in result else {})}


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--time-ps", type=float, default=200.0, help="simulated time per replica after equilibration")
    parser.add_argument("--equilibration-ps", type=float, default=20.0)
    parser.add_argument("--rungs", type=int, default=7)
    parser.add_argument("--ladders", type=int, default=1, help="trade-md's independent ladders (copies)")
    parser.add_argument("--exchange-every-ps", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--samplers", nargs="+", default=["trade-md", "openmm", "openmmtools"])
    parser.add_argument("--out", type=Path, default=None, help="JSON of the results")
    args = parser.parse_args(argv)

    molecule = get_system(SYSTEM)
    ladder = ladder_k(args.rungs)
    energy = MoleculeEnergy(molecule.create_openmm_system(), "CPU")
    runners = {"trade-md": run_trademd, "openmm": run_openmm, "openmmtools": run_openmmtools}
    print(f"{SYSTEM}, ladder {[round(t, 1) for t in ladder]} K, {args.time_ps:g} ps per replica after "
          f"{args.equilibration_ps:g} ps, exchanges every {args.exchange_every_ps:g} ps")
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        for name in args.samplers:
            rows.append(summarise(name, runners[name](molecule, ladder, args, Path(scratch)), molecule, energy))
            row = rows[-1]
            print(f"{name:12s} wall {row['wall_s']:7.1f} s  frames {row['frames']}  p(phi>0) "
                  f"{row['positive_phi_fraction']:.3f}  <U> {row['mean_energy_kj_mol']:7.2f}  g(phi>0) "
                  f"{row['g_positive_phi']:6.1f}  g(U) {row['g_energy']:5.2f}  eff/s (phi>0) "
                  f"{row['effective_per_s_positive_phi']:6.3f}  eff/s (U) {row['effective_per_s_energy']:6.3f}  "
                  f"lowest rung replaced {row['lowest_rung_replaced_fraction']:.2f}", flush=True)
    base = rows[0]
    for row in rows[1:]:  # NaN where a sampler never left one basin in the window
        print(f"{base['sampler']} / {row['sampler']}: eff/s (phi>0) "
              f"{base['effective_per_s_positive_phi'] / row['effective_per_s_positive_phi']:.2f}x, eff/s (U) "
              f"{base['effective_per_s_energy'] / row['effective_per_s_energy']:.2f}x, wall "
              f"{row['wall_s'] / base['wall_s']:.2f}x")
    if args.out:
        args.out.write_text(json.dumps({"command": "benchmarks/replica_exchange_samplers.py "
                                        + " ".join(sys.argv[1:] if argv is None else argv),
                                        "date": time.strftime("%Y-%m-%d"), "rows": rows}, indent=1))
    return rows


if __name__ == "__main__":
    main()

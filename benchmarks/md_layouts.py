"""The MD stage of ``trade-md run`` on the CPU: where to put the copies (issue 25, part 2).

Runs the saves of the default run's MD (16 copies at 600 K, 4 fs with 1.5 amu hydrogens, a
frame every 0.1 ps: step, read positions and velocities, exact energies of the frames) for
about ``--seconds`` per round, alternating in one process:

- ``one Context``: all copies in one replicated Context with all CPU threads (before);
- ``Context per thread``: the copies split over one single-thread Context per CPU thread,
  stepped side by side in Python threads (:class:`trademd.md.copy_contexts.CopyContexts`, now);
- ``Context per molecule``: one plain Context per copy with the force field's own
  GBSAOBCForce (no replicated CustomGBForce), one thread each, the molecules shared between
  Python threads as evenly as possible.

Prints molecule-steps per second (median over rounds) and ratios to the first.

    python benchmarks/md_layouts.py [--system ala2-implicit] [--threads 2] [--seconds 5] [--rounds 3]
"""

import argparse
from concurrent.futures import ThreadPoolExecutor
import os
import time

import numpy as np
import openmm
from openmm import unit

from trademd.energy.molecule import MoleculeEnergy
from trademd.md.copy_contexts import CopyContexts
from trademd.md.settings import RUN_MD
from trademd.platforms import openmm_platform
from trademd.systems import get_system

TIMESTEP_PS, HYDROGEN_MASS_AMU = 0.004, 1.5


def _integrator() -> openmm.Integrator:
    return openmm.LangevinMiddleIntegrator(RUN_MD.temperature_k, 1.0, TIMESTEP_PS)


class PerMolecule:
    """One plain single-thread Context per copy, stepped by ``threads`` Python threads."""

    def __init__(self, system: openmm.System, positions_nm: np.ndarray, n_copies: int, threads: int):
        chosen, properties = openmm_platform("CPU", threads=1)
        self.contexts = []
        for copy in range(n_copies):
            integrator = _integrator()
            integrator.setRandomNumberSeed(copy + 1)
            context = openmm.Context(system, integrator, chosen, properties)
            context.setPositions(positions_nm)
            openmm.LocalEnergyMinimizer.minimize(context, 10.0, 200)
            context.setVelocitiesToTemperature(RUN_MD.temperature_k, copy + 1)
            self.contexts.append((context, integrator))
        self.groups = [self.contexts[t::threads] for t in range(threads)]
        self.pool = ThreadPoolExecutor(threads)

    def step(self, n_steps: int) -> None:
        def run(group):
            for _, integrator in group:
                integrator.step(n_steps)
        list(self.pool.map(run, self.groups))

    def offsets_nm(self) -> np.ndarray:
        return np.stack([c.getState(getPositions=True).getPositions(asNumpy=True).value_in_unit(unit.nanometer)
                         for c, _ in self.contexts])

    def velocities(self) -> np.ndarray:
        return np.stack([c.getState(getVelocities=True).getVelocities(asNumpy=True)
                         .value_in_unit(unit.nanometer / unit.picosecond) for c, _ in self.contexts])


def save_rate(copies, energy: MoleculeEnergy, steps_per_save: int, seconds: float) -> float:
    """Molecule-steps per second of whole saves (step, positions, velocities, energies)."""
    copies.step(steps_per_save)
    saves, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        copies.step(steps_per_save)
        frames = copies.offsets_nm().astype(np.float32)
        copies.velocities()
        energy(frames)
        saves += 1
    return saves * steps_per_save * len(frames) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--system", default=RUN_MD.system_name)
    parser.add_argument("--replicas", type=int, default=RUN_MD.replicas)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    molecule = get_system(args.system)
    system = molecule.create_openmm_system(HYDROGEN_MASS_AMU)
    steps_per_save = int(round(RUN_MD.save_every_ps / TIMESTEP_PS))

    def replicated(parallel: bool) -> CopyContexts:
        copies = CopyContexts(system, args.replicas, _integrator, "CPU", 0, args.threads, parallel=parallel)
        copies.place_minimised(molecule.positions_nm())
        copies.set_velocities_to_temperature(RUN_MD.temperature_k, 0)
        return copies

    layouts = {"one Context": replicated(False), "Context per thread": replicated(True),
               "Context per molecule": PerMolecule(system, molecule.positions_nm(), args.replicas, args.threads)}
    energy = MoleculeEnergy(system)
    rates = {name: [] for name in layouts}
    for _ in range(args.rounds):
        for name, copies in layouts.items():
            rates[name].append(save_rate(copies, energy, steps_per_save, args.seconds))
    base = float(np.median(rates["one Context"]))
    print(f"{args.system}, {args.replicas} copies, {args.threads} threads, a save every {steps_per_save} "
          f"steps; load average {os.getloadavg()[0]:.2f}")
    for name, values in rates.items():
        median = float(np.median(values))
        print(f"{name:22s} {median:10,.0f} molecule-steps/s  {median / base:5.2f}x  "
              f"(rounds: {', '.join(f'{v:,.0f}' for v in values)})")


if __name__ == "__main__":
    main()

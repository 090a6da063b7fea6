"""Molecular-dynamics throughput of the replicated engine against one plain OpenMM Context.

Prints molecule-steps per second for 1, 16, 64 and 256 replicas in one Context (the engine
``trade-md simulate`` uses) and for a plain single-molecule ``openmm.app.Simulation``, both
measured in this run, for vacuum and implicit solvent, and their ratios.

    python benchmarks/simulate_throughput.py [--replicas 1 16 64 256] [--platform CPU]
        [--seconds 3] [--threads N]
"""

import argparse
import time

import numpy as np
import openmm
import openmm.app as app

from trademd.energy.copies import replicate_system
from trademd.md.settings import COM_RESTRAINT_NM, MOLECULE_RADIUS_NM
from trademd.platforms import openmm_platform
from trademd.systems import get_system


def _rate(integrator, n_molecules: int, seconds: float) -> float:
    """Molecule-steps/s: repeat blocks of steps for about ``seconds``."""
    integrator.step(20)
    block, steps, start = 50, 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        integrator.step(block)
        steps += block
    return steps * n_molecules / (time.perf_counter() - start)


def plain_simulation_rate(name: str, platform: str, threads: int, seconds: float) -> float:
    molecule = get_system(name)
    chosen, properties = openmm_platform(platform, threads=threads)
    simulation = app.Simulation(
        molecule.pdb().topology, molecule.create_openmm_system(),
        openmm.LangevinMiddleIntegrator(300, 1, 0.002), chosen, properties,
    )
    simulation.context.setPositions(molecule.positions_nm())
    simulation.minimizeEnergy()
    return _rate(simulation.integrator, 1, seconds)


def replicated_rate(name: str, replicas: int, platform: str, threads: int, seconds: float) -> float:
    molecule = get_system(name)
    system, layout = replicate_system(
        molecule.create_openmm_system(), replicas, per_copy_energies=False,
        molecule_radius_nm=MOLECULE_RADIUS_NM, com_restraint_nm=COM_RESTRAINT_NM,
    )
    chosen, properties = openmm_platform(platform, threads=threads)
    integrator = openmm.LangevinMiddleIntegrator(300, 1, 0.002)
    context = openmm.Context(system, integrator, chosen, properties)
    context.setPositions(layout.place(np.repeat(molecule.positions_nm()[None], replicas, axis=0)))
    openmm.LocalEnergyMinimizer.minimize(context, 10.0, 200)
    context.setVelocitiesToTemperature(300)
    return _rate(integrator, replicas, seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--replicas", type=int, nargs="+", default=[1, 16, 64, 256])
    parser.add_argument("--platform", default="auto")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: all)")
    parser.add_argument("--seconds", type=float, default=3.0, help="timing per measurement")
    args = parser.parse_args()
    for name in ("ala2-vacuum", "ala2-implicit"):
        baseline = plain_simulation_rate(name, args.platform, 1, args.seconds)
        print(f"{name}: plain Simulation (1 thread): {baseline:,.0f} molecule-steps/s")
        for replicas in args.replicas:
            rate = replicated_rate(name, replicas, args.platform, args.threads, args.seconds)
            print(f"{name}: {replicas:4d} replicas in one Context: {rate:,.0f} molecule-steps/s "
                  f"= {rate / baseline:.1f}x plain")


if __name__ == "__main__":
    main()

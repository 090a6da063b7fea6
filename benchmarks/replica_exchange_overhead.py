"""Cost of replica exchange against plain replicated MD with the same number of copies.

Prints molecule-steps per second, measured in this run on one platform, of
  1. plain MD: the copies in one Context with OpenMM's LangevinMiddleIntegrator (the engine of
     ``trade-md simulate``, the baseline);
  2. the per-copy-temperature CustomIntegrator alone (no exchanges);
  3. full replica exchange: that integrator plus an exchange round every ``--exchange-every``
     steps (energies of every copy, Metropolis tests, swaps);
and the ratios of 2 and 3 to 1.

    python benchmarks/replica_exchange_overhead.py [--system ala2-implicit] [--ladders 2]
        [--temperatures 300 350 400 450 500 550 600] [--exchange-every 500] [--seconds 5]
"""

import argparse
import time

import numpy as np
import openmm

from trademd.energy.copies import replicate_system
from trademd.md.engines import LadderEngine
from trademd.md.settings import COM_RESTRAINT_NM, MOLECULE_RADIUS_NM, ExchangeConfig
from trademd.platforms import openmm_platform
from trademd.systems import get_system


def _rate(advance, n_molecules: int, block: int, seconds: float) -> float:
    """Molecule-steps/s of ``advance(block)`` repeated for about ``seconds``."""
    advance(block)
    steps, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        advance(block)
        steps += block
    return steps * n_molecules / (time.perf_counter() - start)


def plain_rate(name: str, n_copies: int, platform: str, block: int, seconds: float) -> float:
    molecule = get_system(name)
    system, layout = replicate_system(molecule.create_openmm_system(), n_copies, per_copy_energies=False,
                                      molecule_radius_nm=MOLECULE_RADIUS_NM, com_restraint_nm=COM_RESTRAINT_NM)
    chosen, properties = openmm_platform(platform)
    integrator = openmm.LangevinMiddleIntegrator(300, 1, 0.002)
    context = openmm.Context(system, integrator, chosen, properties)
    context.setPositions(layout.place(np.repeat(molecule.positions_nm()[None], n_copies, axis=0)))
    openmm.LocalEnergyMinimizer.minimize(context, 10.0, 200)
    context.setVelocitiesToTemperature(300)
    return _rate(integrator.step, n_copies, block, seconds)


def ladder_rates(name: str, temperatures, ladders: int, platform: str, block: int,
                 seconds: float) -> tuple[float, float]:
    """(integrator only, integrator + an exchange round per block) in molecule-steps/s."""
    molecule = get_system(name)
    config = ExchangeConfig(system_name=name, temperatures_k=tuple(temperatures), ladders=ladders,
                            time_ps=1.0, friction_per_ps=1.0, platform=platform, seed=0)
    engine = LadderEngine(molecule.create_openmm_system(), config)
    engine.prepare(molecule.positions_nm(), 0, seed=0)

    def with_exchange(steps: int) -> None:
        engine.copies.step(steps)
        engine.exchange()

    n_copies = engine.copies.n_copies
    return (_rate(engine.copies.step, n_copies, block, seconds),
            _rate(with_exchange, n_copies, block, seconds))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--system", default="ala2-implicit")
    parser.add_argument("--temperatures", type=float, nargs="+",
                        default=[300.0, 350.0, 400.0, 450.0, 500.0, 550.0, 600.0])
    parser.add_argument("--ladders", type=int, default=2)
    parser.add_argument("--exchange-every", type=int, default=500, help="steps between exchange rounds")
    parser.add_argument("--platform", default="auto")
    parser.add_argument("--seconds", type=float, default=5.0, help="timing per measurement")
    args = parser.parse_args()
    n_copies = args.ladders * len(args.temperatures)
    plain = plain_rate(args.system, n_copies, args.platform, args.exchange_every, args.seconds)
    integrator_only, exchanging = ladder_rates(args.system, args.temperatures, args.ladders,
                                               args.platform, args.exchange_every, args.seconds)
    print(f"{args.system}, {n_copies} copies ({args.ladders} ladders x {len(args.temperatures)} temperatures):")
    print(f"  plain replicated MD (LangevinMiddleIntegrator): {plain:,.0f} molecule-steps/s")
    print(f"  per-copy-temperature CustomIntegrator:          {integrator_only:,.0f} molecule-steps/s "
          f"= {integrator_only / plain:.2f}x plain")
    print(f"  replica exchange, a round every {args.exchange_every} steps:  {exchanging:,.0f} molecule-steps/s "
          f"= {exchanging / plain:.2f}x plain")


if __name__ == "__main__":
    main()

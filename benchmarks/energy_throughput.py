"""Throughput of the OpenMM energy bridge against a plain per-sample Context loop.

Prints energy+force evaluations per second of :class:`trademd.energy.bridge.EnergyBridge` at several
batch sizes, for vacuum and implicit-solvent alanine dipeptide, next to the plain loop over
one single-molecule Context (:class:`trademd.energy.molecule.MoleculeEnergy`, CPU platform,
one thread) measured in the same run, and their ratio.

    python benchmarks/energy_throughput.py                      # full run
    python benchmarks/energy_throughput.py --batches 64 256 --seconds 0.5

The bridge's worker processes are plain subprocesses that import only
:mod:`trademd.energy.pool`.
"""

import argparse
import os
import time


def _cpu_seconds(pids) -> float:
    """CPU time (s) used so far by this process and the processes ``pids`` (Linux /proc)."""
    total = time.process_time()
    tick = os.sysconf("SC_CLK_TCK")
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / tick
        except (FileNotFoundError, IndexError):
            pass
    return total


def _rate(evaluate, n_per_call: int, seconds: float, pids=lambda: []) -> tuple[float, float]:
    """(evaluations per wall-clock second, per CPU second of this process and ``pids()``) of
    ``evaluate()`` after one warm-up call, timed for at least ``seconds`` and two calls."""
    evaluate()
    calls, cpu_start, start = 0, _cpu_seconds(pids()), time.perf_counter()
    while calls < 2 or time.perf_counter() - start < seconds:
        evaluate()
        calls += 1
    wall_s = time.perf_counter() - start
    cpu_s = _cpu_seconds(pids()) - cpu_start
    return calls * n_per_call / wall_s, calls * n_per_call / max(cpu_s, 1e-9)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--systems", nargs="+", default=["ala2-vacuum", "ala2-implicit"])
    parser.add_argument("--batches", nargs="+", type=int, default=[64, 256, 1024, 4096])
    parser.add_argument("--seconds", type=float, default=2.0, help="time per measurement")
    parser.add_argument("--platform", default="auto", help="platform of the bridge")
    parser.add_argument("--workers", type=int, default=None, help="bridge worker processes")
    parser.add_argument("--kernel", default="auto", help="auto, single or replicated")
    args = parser.parse_args()

    import numpy as np
    import torch

    from trademd.energy.bridge import EnergyBridge
    from trademd.energy.molecule import MoleculeEnergy
    from trademd.systems import get_system

    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores; "
          "per CPU-s = evaluations per CPU second of all processes involved")
    print(f"{'system':14s} {'batch':>6s} {'bridge/s':>9s} {'loop/s':>8s} {'ratio':>6s} "
          f"{'bridge/CPU-s':>12s} {'loop/CPU-s':>10s}  bridge")
    for name in args.systems:
        molecule = get_system(name)
        rng = np.random.default_rng(0)
        largest = max(args.batches)
        positions = molecule.positions_nm()[None] + rng.normal(0.0, 0.005, (largest, molecule.n_atoms, 3))
        loop = MoleculeEnergy(molecule.create_openmm_system())
        loop_batch = positions[:256]
        loop_rate, loop_cpu_rate = _rate(lambda: loop(loop_batch), len(loop_batch), args.seconds)
        with EnergyBridge(molecule, platform=args.platform, workers=args.workers,
                          kernel=args.kernel) as bridge:
            for batch in args.batches:
                x = torch.tensor(positions[:batch], dtype=torch.float32)
                rate, cpu_rate = _rate(lambda: bridge.evaluate(x), batch, args.seconds,
                                       lambda: bridge.worker_pids)
                print(f"{name:14s} {batch:6d} {rate:9.0f} {loop_rate:8.0f} {rate / loop_rate:6.1f} "
                      f"{cpu_rate:12.0f} {loop_cpu_rate:10.0f}  {bridge!r}", flush=True)

if __name__ == "__main__":
    main()

"""Reading the storage of an openmmtools multistate simulation (``ParallelTemperingSampler`` or
``ReplicaExchangeSampler`` with a ``MultiStateReporter``) as one trajectory per temperature.

The storage is a NetCDF file (``energies`` [iterations, replicas, states]: the reduced
potential of every replica at every thermodynamic state; ``states`` [iterations, replicas]:
the state each replica sampled) and a checkpoint file beside it (``NAME_checkpoint.nc``) with
the positions of every replica at every ``checkpoint_interval``-th iteration. The frames at a
state are the positions of whichever replica sampled it at each checkpointed iteration
(iteration 0, the starting structure before any move, is left out); read through openmmtools'
own ``MultiStateReporter``, so they are exactly what ``read_sampler_states`` gives.
"""

from pathlib import Path

import numpy as np
from openmm import unit

from trademd.errors import TradeMDError
from trademd.io.trajectory_file import Trajectory
from trademd.progress import quiet_loggers
from trademd.units import BOLTZMANN_KJ_MOL_K

__all__ = ["OPENMMTOOLS_FORMAT", "is_openmmtools_storage", "read_openmmtools_storage"]

#: The ``format`` attribute of the trajectories read here.
OPENMMTOOLS_FORMAT = "openmmtools/multistate"

#: |U_k - U_l| (kJ/mol) above which two states' reduced potentials u_k kT_k and u_l kT_l of one
#: configuration are not one energy at two temperatures (plus this much relative to |U|).
_SAME_ENERGY_KJ_MOL, _SAME_ENERGY_RELATIVE = 1e-3, 1e-6


def is_openmmtools_storage(path: str | Path) -> bool:
    """Whether the NetCDF file ``path`` has the ``states`` and ``energies`` variables of a
    ``MultiStateReporter`` storage (an AMBER NetCDF trajectory has not); a file that is not
    NetCDF raises :class:`TradeMDError`."""
    import netCDF4

    try:
        with netCDF4.Dataset(str(path), "r") as storage:
            return {"states", "energies"} <= set(storage.variables)
    except OSError:
        raise TradeMDError(f"{str(path)!r} is not a NetCDF file: give the storage file an "
                           "openmmtools MultiStateReporter wrote") from None


def read_openmmtools_storage(path: str | Path) -> tuple[list[Trajectory], bool]:
    """The frames of every thermodynamic state of a multistate storage file.

    The states must form a temperature ladder: the same potential at different temperatures
    (checked on the stored reduced potentials: u_k kT_k is one energy for every state k).

    Args:
        path: the storage file; its checkpoint file must lie beside it.

    Returns:
        (one :class:`Trajectory` per state in ascending temperature, whether their
        ``energy_kj_mol`` are the stored potential energies). Each trajectory holds the
        checkpointed iterations after the first: positions [frames, atoms, 3] (nm, float32 as
        stored), ``energy_kj_mol`` [frames] = u kT (kJ/mol; NaN where the states have a
        pressure, whose pV term the reduced potential includes: recompute them), ``replica``
        0 (one ladder), ``time_ps`` the iteration times the move's time step and steps (the
        iteration number for moves without a time step), ``topology_pdb`` empty (the storage
        records no topology).
    """
    path = Path(path)
    if not path.is_file():
        raise TradeMDError(f"file {str(path)!r} not found: check the path")
    if not is_openmmtools_storage(path):
        raise TradeMDError(f"{str(path)!r} is a NetCDF file without the 'states' and 'energies' of "
                           "an openmmtools multistate storage: give the file its MultiStateReporter wrote")
    checkpoint = path.with_name(f"{path.stem}_checkpoint{path.suffix}")
    if not checkpoint.is_file():
        raise TradeMDError(f"the checkpoint file {str(checkpoint)!r} of {str(path)!r}, which holds the "
                           "positions, is missing: keep it beside the storage file")
    with quiet_loggers("openmmtools", "pymbar"):
        from openmmtools import multistate

        reporter = multistate.MultiStateReporter(str(path), open_mode="r")
        try:
            return _read(reporter, path)
        finally:
            reporter.close()


def _read(reporter, path: Path) -> tuple[list[Trajectory], bool]:
    """:func:`read_openmmtools_storage` from an open ``MultiStateReporter``."""
    states, _ = reporter.read_thermodynamic_states()
    temperatures = np.array([s.temperature.value_in_unit(unit.kelvin) for s in states])
    n_distinct = len(np.unique(np.round(temperatures, 6)))
    if n_distinct != len(temperatures):
        raise TradeMDError(
            f"{str(path)!r} holds {len(temperatures)} states at only {n_distinct} temperatures (an "
            "alchemical or Hamiltonian ladder): give a parallel-tempering storage, one state per temperature")
    reduced, computed, _ = reporter.read_energies()  # [iterations, replicas, states]
    kt = BOLTZMANN_KJ_MOL_K * temperatures
    energy_at = reduced * kt  # u_k kT_k: the same energy at every state of a temperature ladder
    evaluated = np.where(computed > 0, energy_at, np.nan)  # states a replica's energy was computed at
    spread = np.nanmax(evaluated, axis=2) - np.nanmin(evaluated, axis=2)
    scale = _SAME_ENERGY_KJ_MOL + _SAME_ENERGY_RELATIVE * np.abs(np.nanmax(evaluated, axis=2))
    if np.any(spread > scale):
        raise TradeMDError(
            f"the states of {str(path)!r} differ in more than temperature (a configuration's reduced "
            "potentials do not scale as 1/T): give a parallel-tempering storage")
    energies_stored = all(s.pressure is None for s in states)
    iterations = np.array([int(i) for i in reporter.read_checkpoint_iterations() if i > 0])
    if len(iterations) == 0:
        raise TradeMDError(f"{str(path)!r} holds no checkpointed iteration after the start: run the "
                           "sampler longer (or with a smaller checkpoint_interval)")
    state_of_replica = reporter.read_replica_thermodynamic_states()  # [iterations, replicas]
    positions = np.stack([
        np.stack([np.asarray(s.positions.value_in_unit(unit.nanometer)) for s in
                  reporter.read_sampler_states(int(iteration))])
        for iteration in iterations]).astype(np.float32)  # [iterations, replicas, atoms, 3]
    step_ps = _iteration_time_ps(reporter.read_mcmc_moves())
    trajectories = []
    for k in np.argsort(temperatures):
        at, replica = np.nonzero(state_of_replica[iterations] == k)  # (checkpoint, replica) pairs at k
        energy = energy_at[iterations[at], replica, k] if energies_stored else np.full(len(at), np.nan)
        trajectories.append(Trajectory(
            positions_nm=positions[at, replica],
            energy_kj_mol=np.asarray(energy, dtype=np.float64),
            replica=np.zeros(len(at), dtype=np.int32),
            time_ps=iterations[at].astype(np.float64) * step_ps,
            temperature_k=float(temperatures[k]),
            topology_pdb="",
            attrs={"format": OPENMMTOOLS_FORMAT, "state_index": int(k)},
        ))
    return trajectories, energies_stored


def _iteration_time_ps(moves) -> float:
    """Simulated time per iteration (ps) of the states' MCMC moves: time step x steps of a
    dynamics move, 1.0 (time in iterations) for any other move."""
    move = moves[0] if isinstance(moves, (list, tuple)) else moves
    try:
        return float(move.timestep.value_in_unit(unit.picosecond) * move.n_steps)
    except AttributeError:
        return 1.0

"""Reference ensembles from every file ``trade-md evaluate --reference`` reads, one module per
format, chosen by the file name (docs/formats.md):

- ``.h5``/``.hdf5``: a trade-md trajectory (one temperature) or replica-exchange file
  (:mod:`trademd.io.trajectory_file`);
- ``.nc`` with a multistate reporter's variables: an openmmtools storage file, a temperature
  ladder (:mod:`trademd.io.openmmtools_storage`);
- any other suffix mdtraj loads (``.dcd``, ``.xtc``, ``.pdb``, an AMBER ``.nc``, ...): one
  temperature given by the user, the atoms by ``--topology``
  (:mod:`trademd.io.mdtraj_reference`).
"""

from dataclasses import dataclass
from pathlib import Path

from trademd.errors import TradeMDError
from trademd.io.trajectory_file import Trajectory, ensemble_temperatures, read_trajectory

__all__ = ["ReferenceEnsembles", "read_reference"]

#: Temperatures closer than this (K) are the same.
_SAME_TEMPERATURE_K = 1e-6


@dataclass
class ReferenceEnsembles:
    """A reference file's frames at each temperature it holds.

    Attributes:
        path: the file.
        kind: ``trade-md`` (HDF5), ``openmmtools`` (multistate storage) or ``mdtraj`` (a
            trajectory mdtraj reads).
        ensembles: one :class:`Trajectory` per temperature, ascending; several for a
            replica-exchange or parallel-tempering reference (the rungs of its ladder).
        energies_stored: whether the ensembles' ``energy_kj_mol`` are the file's own potential
            energies (False: they are NaN, to recompute for the system compared with).
        records_system: whether the trajectories' ``attrs`` and ``topology_pdb`` record the
            system (trade-md files); otherwise the system is the samples'.
    """

    path: Path
    kind: str
    ensembles: list[Trajectory]
    energies_stored: bool
    records_system: bool

    @property
    def temperatures_k(self) -> list[float]:
        return [e.temperature_k for e in self.ensembles]

    def rung_index(self, temperature_k: float) -> int | None:
        """Index in :attr:`ensembles` of the one simulated at ``temperature_k`` (K), None if
        there is none."""
        return next((k for k, t in enumerate(self.temperatures_k)
                     if abs(t - temperature_k) < _SAME_TEMPERATURE_K), None)

    def target_temperature(self, temperature_k: float | None) -> float:
        """The temperature (K) to compare at: ``temperature_k``, or the only one of a
        single-temperature reference. A ladder can be reweighted to any temperature in its
        range (MBAR), a single ensemble only compared at its own."""
        listed = ", ".join(f"{t:g}" for t in self.temperatures_k)
        if len(self.ensembles) == 1:
            only = self.temperatures_k[0]
            if temperature_k is not None and abs(temperature_k - only) >= _SAME_TEMPERATURE_K:
                raise TradeMDError(
                    f"the reference was simulated at {only:g} K, not {temperature_k:g} K: compare "
                    "samples with a reference at the same temperature")
            return only
        if temperature_k is None:
            raise TradeMDError(f"{str(self.path)!r} holds ensembles at {listed} K and no temperature "
                               "was given: pick one with --temperature")
        low, high = min(self.temperatures_k), max(self.temperatures_k)
        if not low - _SAME_TEMPERATURE_K < temperature_k < high + _SAME_TEMPERATURE_K:
            raise TradeMDError(
                f"{temperature_k:g} K is outside the ladder of {str(self.path)!r} ({listed} K): MBAR "
                f"reweights within it; pick a --temperature from {low:g} to {high:g} K")
        return float(temperature_k)


def read_reference(path: str | Path, temperature_k: float | None = None,
                   topology_path: str | Path | None = None) -> ReferenceEnsembles:
    """Read every ensemble of a reference file in any accepted format (module docstring).

    Args:
        path: the reference.
        temperature_k: the temperature (K) of a trajectory mdtraj reads (required there: such
            files do not record it); ignored for the other formats, which record theirs.
        topology_path: the atoms of a trajectory mdtraj reads; refused for the other formats.
    """
    path = Path(path)
    if not path.is_file():
        raise TradeMDError(f"reference file {str(path)!r} not found: check the path given to --reference")
    name = path.name.lower()
    if name.endswith((".h5", ".hdf5")):
        _no_topology_for(path, topology_path)
        temperatures = ensemble_temperatures(path)
        ensembles = [read_trajectory(path, t if len(temperatures) > 1 else None) for t in temperatures]
        return ReferenceEnsembles(path, "trade-md", ensembles, energies_stored=True, records_system=True)
    from trademd.io.mdtraj_reference import mdtraj_suffixes, read_mdtraj_reference
    from trademd.io.openmmtools_storage import is_openmmtools_storage, read_openmmtools_storage

    if name.endswith(".nc") and is_openmmtools_storage(path):
        _no_topology_for(path, topology_path)
        ensembles, energies_stored = read_openmmtools_storage(path)
        return ReferenceEnsembles(path, "openmmtools", ensembles, energies_stored, records_system=False)
    if not name.endswith(tuple(mdtraj_suffixes())):
        raise TradeMDError(
            f"unknown reference format {path.suffix or path.name!r}: give a trade-md file (.h5), an "
            "openmmtools storage file (.nc) or a trajectory mdtraj reads (.dcd, .xtc, .pdb, ...) "
            "with --topology PDB and --temperature")
    if temperature_k is None:
        raise TradeMDError(f"{str(path)!r} does not record the temperature it was simulated at: give "
                           "it with --temperature")
    trajectory = read_mdtraj_reference(path, topology_path, temperature_k)
    return ReferenceEnsembles(path, "mdtraj", [trajectory], energies_stored=False, records_system=False)


def _no_topology_for(path: Path, topology_path) -> None:
    if topology_path is not None:
        raise TradeMDError(f"{str(path)!r} records its own atoms: leave out --topology (it is for "
                           "trajectories mdtraj reads, such as .dcd)")

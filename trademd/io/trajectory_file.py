"""The ``trade-md simulate`` files (docs/formats.md): a plain trajectory
(``trade-md/trajectory``, one ensemble) or a replica-exchange file
(``trade-md/replica-exchange``, one ensemble per temperature plus the exchange statistics),
with the checkpoint a resume needs. Written in the H5MD layout (format version 2); version-1
files are read, and continued by ``--resume``, in their own layout
(:mod:`trademd.io.trajectory_layout` says where each dataset lives in both).

:class:`DynamicsFile` owns the open file and every read and write of it; the functions
:func:`read_trajectory`, :func:`frame_count`, :func:`ensemble_temperatures` and
:func:`write_energies` open one for a single call.
"""

from dataclasses import dataclass
import json
import math
import os
from pathlib import Path

import h5py
import numpy as np

from trademd.errors import TradeMDError
from trademd.io.schema import (
    REPLICA_EXCHANGE_FORMAT,
    TRAJECTORY_FORMAT,
    attribute_text,
    create_file,
    file_attrs,
    metadata_group,
    open_checked,
)
from trademd.io.trajectory_layout import EnsembleDatasets, create_ensemble, ensemble_datasets

__all__ = [
    "DYNAMICS_FORMATS",
    "Trajectory",
    "EnsembleFrames",
    "DynamicsFile",
    "new_dynamics_file",
    "read_trajectory",
    "write_energies",
    "frame_count",
    "ensemble_temperatures",
]

#: The formats a simulate file may have.
DYNAMICS_FORMATS = (TRAJECTORY_FORMAT, REPLICA_EXCHANGE_FORMAT)
#: Temperatures closer than this (K) are the same ensemble.
_SAME_TEMPERATURE_K = 1e-6


@dataclass
class Trajectory:
    """A trajectory file's contents in memory.

    Attributes:
        positions_nm: float32 [frames, atoms, 3].
        energy_kj_mol: float64 [frames].
        replica: int32 [frames].
        time_ps: float64 [frames].
        temperature_k: the simulation temperature (K).
        topology_pdb: PDB text of the topology.
        attrs: all file attributes.
    """

    positions_nm: np.ndarray
    energy_kj_mol: np.ndarray
    replica: np.ndarray
    time_ps: np.ndarray
    temperature_k: float
    topology_pdb: str
    attrs: dict

    @property
    def n_frames(self) -> int:
        return int(self.positions_nm.shape[0])

    def to_mdtraj(self):
        """The frames as an ``mdtraj.Trajectory`` (time in ps)."""
        import io

        import mdtraj
        import openmm.app as app

        topology = mdtraj.Topology.from_openmm(app.PDBFile(io.StringIO(self.topology_pdb)).topology)
        return mdtraj.Trajectory(self.positions_nm, topology, time=self.time_ps)


def _check_new_path(path: Path, overwrite: bool) -> None:
    """Refuse to replace an existing file unless ``overwrite``; make its folder."""
    if path.exists() and not overwrite:
        raise TradeMDError(
            f"{str(path)!r} exists: pass --overwrite to replace it or --resume to continue it"
        )
    path.parent.mkdir(parents=True, exist_ok=True)


def new_dynamics_file(path: Path, file_format: str, attrs: dict, topology_pdb: str,
                      overwrite: bool) -> h5py.File:
    """A new simulate file (``file_format``: one of :data:`DYNAMICS_FORMATS`) with format,
    version, attributes, units and topology, and no ensembles yet."""
    _check_new_path(path, overwrite)
    units = {"position": "nm", "time": "ps", "potential_energy": "kJ mol-1",
             "kinetic_temperature_k": "K", "temperature_k": "K"}
    return create_file(path, file_format, attrs, units, topology_pdb)


class EnsembleFrames:
    """The frames of one ensemble in an open simulate file, in either layout: appended chunk
    by chunk, cut back to a checkpoint, read whole.

    Args:
        datasets: the ensemble's datasets (:func:`~trademd.io.trajectory_layout.ensemble_datasets`).
    """

    def __init__(self, datasets: EnsembleDatasets):
        self.datasets = datasets

    @property
    def n_frames(self) -> int:
        return int(self.datasets.columns["positions_nm"].shape[0])

    @property
    def n_atoms(self) -> int:
        return int(self.datasets.columns["positions_nm"].shape[1])

    def columns(self) -> dict[str, np.ndarray]:
        """Every stored column, unchecked: those of
        :data:`~trademd.io.trajectory_layout.FRAME_COLUMNS` [frames, ...] and
        ``kinetic_temperature_k`` [saves] (K)."""
        return {**{name: dataset[()] for name, dataset in self.datasets.columns.items()},
                "kinetic_temperature_k": self.datasets.kinetic_temperature_k[()]}

    def append(self, positions_nm: np.ndarray, energy_kj_mol: np.ndarray, replica: np.ndarray,
               time_ps: np.ndarray, kinetic_temperature_k: np.ndarray) -> None:
        """Append frames ([n, atoms, 3] nm, [n] kJ/mol, [n], [n] ps) and per-save kinetic
        temperatures [saves] (K); the caller flushes. Version 2 also numbers the frames
        (``step``)."""
        start = self.n_frames
        values = {"positions_nm": positions_nm, "energy_kj_mol": energy_kj_mol, "replica": replica,
                  "time_ps": time_ps}
        if self.datasets.step is not None:
            _extend(self.datasets.step, np.arange(start, start + len(energy_kj_mol)))
        for name, dataset in self.datasets.columns.items():
            _extend(dataset, values[name])
        _extend(self.datasets.kinetic_temperature_k, kinetic_temperature_k)

    def truncate(self, n_saves: int, frames_per_save: int) -> None:
        """Drop frames written after save ``n_saves`` (they follow the last checkpoint)."""
        keep = n_saves * frames_per_save
        datasets = [*self.datasets.columns.values()]
        datasets += [] if self.datasets.step is None else [self.datasets.step]
        for dataset in datasets:
            dataset.resize(keep, axis=0)
        self.datasets.kinetic_temperature_k.resize(n_saves, axis=0)


def _extend(dataset: h5py.Dataset, values: np.ndarray) -> None:
    """Append ``values`` [n, ...] along the first axis of ``dataset``."""
    start = dataset.shape[0]
    dataset.resize(start + len(values), axis=0)
    dataset[start:] = values


class DynamicsFile:
    """An open ``trade-md simulate`` file: a plain trajectory (one ensemble) or a
    replica-exchange file (one ensemble per temperature plus the exchange statistics), with
    the checkpoint a resume needs (docs/formats.md), in either layout (format version 2,
    H5MD, or 1). Every read and write of such a file goes through this class.

    Open one with :meth:`create` (a new file), :meth:`reopen` (to continue or edit it) or
    :meth:`open` (to read it); use it as a context manager. A file being written is valid
    after every :meth:`save_checkpoint`, and an interruption loses only the frames written
    after the last one.

    Args:
        h5: the open HDF5 file.
        path: its path as the user gave it (for messages).
    """

    def __init__(self, h5: h5py.File, path: str | Path):
        self.h5 = h5
        self.path = path
        self.metadata = metadata_group(h5)

    @classmethod
    def create(cls, path: str | Path, attrs: dict, topology_pdb: str, n_atoms: int,
               temperatures_k: list[float], overwrite: bool = False) -> "DynamicsFile":
        """A new file at ``path``: a trajectory file for one temperature (K), a
        replica-exchange file (attribute ``temperatures_k``, an empty ``exchange`` group) for
        several; an ensemble per temperature.

        The layout is written to ``<path>.partial`` and renamed into place when complete, so a
        run killed while creating the file leaves no half-made file at ``path``."""
        path = Path(path)
        _check_new_path(path, overwrite)
        partial = path.with_name(path.name + ".partial")
        if len(temperatures_k) == 1:
            h5 = new_dynamics_file(partial, TRAJECTORY_FORMAT, attrs, topology_pdb, overwrite=True)
        else:
            h5 = new_dynamics_file(partial, REPLICA_EXCHANGE_FORMAT,
                                   {**attrs, "temperatures_k": [float(t) for t in temperatures_k]},
                                   topology_pdb, overwrite=True)
            h5["parameters"].create_group("exchange")
        for temperature_k in temperatures_k:
            create_ensemble(h5, temperature_k, n_atoms)
        h5.close()
        os.replace(partial, path)
        return cls(h5py.File(path, "a"), path)

    @classmethod
    def reopen(cls, path: str | Path) -> "DynamicsFile":
        """Open an existing simulate file to continue or change it (``--resume``,
        ``trade-md energy --write``); a version-1 file is continued in its own layout."""
        return cls(open_checked(path, DYNAMICS_FORMATS, mode="a"), path)

    @classmethod
    def open(cls, path: str | Path) -> "DynamicsFile":
        """Open an existing simulate file for reading."""
        return cls(open_checked(path, DYNAMICS_FORMATS), path)

    @property
    def ensembles(self) -> list[EnsembleFrames]:
        """A writer of each ensemble, in ladder order."""
        return [EnsembleFrames(ensemble_datasets(self.h5, t, self.path)) for t in self.temperatures_k]

    @property
    def attrs(self) -> dict:
        """All the file's attributes (lists and dicts as JSON text): ``format``,
        ``format_version`` and the run's record."""
        return file_attrs(self.h5)

    @property
    def topology_pdb(self) -> str:
        return attribute_text(self.metadata["topology_pdb"][()])

    @property
    def temperatures_k(self) -> list[float]:
        """Temperatures (K) of the ensembles: one for a plain run, the ladder for replica
        exchange."""
        if self.h5.attrs["format"] == TRAJECTORY_FORMAT:
            return [float(self.metadata.attrs["temperature_k"])]
        return [float(t) for t in json.loads(self.metadata.attrs["temperatures_k"])]

    @property
    def has_checkpoint(self) -> bool:
        """Whether a chunk was finished (a run killed before that has nothing to resume)."""
        return "checkpoint" in self.metadata

    @property
    def checkpoint_saves(self) -> int | None:
        """Saves done at the last checkpoint (None: no checkpoint)."""
        return int(self.metadata["checkpoint"].attrs["n_saves"]) if self.has_checkpoint else None

    def _ensemble(self, temperature_k: float | None) -> EnsembleDatasets:
        """The datasets of the ensemble at ``temperature_k`` (None: the only one of a plain
        trajectory)."""
        path = self.path
        available = self.temperatures_k
        if self.h5.attrs["format"] == TRAJECTORY_FORMAT:
            if temperature_k is not None and abs(temperature_k - available[0]) > _SAME_TEMPERATURE_K:
                raise TradeMDError(
                    f"{str(path)!r} holds frames at {available[0]:g} K, not {temperature_k:g} K: give the "
                    "file simulated at that temperature"
                )
            return ensemble_datasets(self.h5, available[0], path)
        matching = [t for t in available
                    if temperature_k is not None and abs(t - temperature_k) < _SAME_TEMPERATURE_K]
        if not matching:
            asked = "no temperature was given" if temperature_k is None else f"{temperature_k:g} K is not one"
            raise TradeMDError(
                f"{str(path)!r} is a replica-exchange file with ensembles at "
                f"{', '.join(f'{t:g}' for t in available)} K and {asked}: pick one with --temperature"
            )
        return ensemble_datasets(self.h5, matching[0], path)

    def read(self, temperature_k: float | None = None,
             require_finite_energies: bool = True) -> "Trajectory":
        """The frames at one temperature (see :func:`read_trajectory`)."""
        ensemble = self._ensemble(temperature_k)
        data = {name: dataset[()] for name, dataset in ensemble.columns.items()}
        energy = data["energy_kj_mol"]
        if require_finite_energies and not np.all(np.isfinite(energy)):
            raise TradeMDError(
                f"{str(self.path)!r} holds {int(np.sum(~np.isfinite(energy)))} non-finite energies: "
                "recompute them with `trade-md energy FILE --write` or rerun the simulation"
            )
        return Trajectory(
            topology_pdb=self.topology_pdb,
            temperature_k=float(ensemble.attrs["temperature_k"]),
            attrs={**self.attrs, **ensemble.attrs},
            **data,
        )

    def frame_count(self, temperature_k: float | None = None) -> int:
        """Frames written so far at one temperature, read from the dataset shape (no frame
        is loaded)."""
        return int(self._ensemble(temperature_k).columns["energy_kj_mol"].shape[0])

    def write_energies(self, temperature_k: float, energy_kj_mol: np.ndarray) -> None:
        """Replace the stored energies [frames] (kJ/mol) of the ensemble at ``temperature_k``
        (K); the file must be open for writing (:meth:`reopen`)."""
        dataset = self._ensemble(temperature_k).columns["energy_kj_mol"]
        if dataset.shape != energy_kj_mol.shape:
            raise TradeMDError(f"{str(self.path)!r} holds {dataset.shape[0]} frames, not {len(energy_kj_mol)}: "
                               "the file changed while its energies were recomputed")
        dataset[...] = energy_kj_mol

    def truncate(self, n_saves: int, frames_per_save: int) -> None:
        """Drop everything written after save ``n_saves`` (it follows the last checkpoint)."""
        for ensemble in self.ensembles:
            ensemble.truncate(n_saves, frames_per_save)
        if "exchange/walker_at_rung" in self.metadata:
            self.metadata["exchange/walker_at_rung"].resize(n_saves, axis=0)

    def write_exchange_statistics(self, attempts: np.ndarray, accepted: np.ndarray,
                                  acceptance_rates: list[float], round_trips: int, rounds: int,
                                  walkers: np.ndarray) -> None:
        """Exchange statistics of a replica-exchange file: attempts and acceptances per
        neighbour pair (datasets), acceptance rates, round trips and rounds (attributes of
        ``exchange/``), and the walker at every rung of the new saves [saves, ladders, K]."""
        group = self.metadata["exchange"]
        for name, values in (("attempts", attempts), ("accepted", accepted)):
            if name in group:
                del group[name]
            group.create_dataset(name, data=values)
        if "walker_at_rung" not in group:
            dataset = group.create_dataset("walker_at_rung", shape=(0, *walkers.shape[1:]),
                                           maxshape=(None, *walkers.shape[1:]), dtype="int32")
            dataset.attrs["description"] = "walker (configuration history) at each rung [saves, ladders, K]"
        dataset = group["walker_at_rung"]
        start = dataset.shape[0]
        dataset.resize(start + len(walkers), axis=0)
        dataset[start:] = walkers
        group.attrs["acceptance_rate"] = json.dumps([None if math.isnan(r) else float(r)
                                                     for r in acceptance_rates])
        group.attrs["round_trips"] = round_trips
        group.attrs["exchange_rounds"] = rounds

    def read_exchange_statistics(self) -> dict:
        """What :meth:`write_exchange_statistics` stored: ``attempts`` and ``accepted`` [K - 1],
        ``acceptance_rate`` (list [K - 1], None for a pair never tried), ``walker_at_rung``
        [saves, ladders, K], ``round_trips`` and ``exchange_rounds``."""
        group = self.metadata["exchange"]
        return {"attempts": group["attempts"][()], "accepted": group["accepted"][()],
                "acceptance_rate": json.loads(group.attrs["acceptance_rate"]),
                "walker_at_rung": group["walker_at_rung"][()],
                "round_trips": int(group.attrs["round_trips"]),
                "exchange_rounds": int(group.attrs["exchange_rounds"])}

    def save_checkpoint(self, openmm_checkpoint: bytes, state_xml: str, n_saves: int,
                        platform: str, wall_time_s: float, engine_state: dict[str, str]) -> None:
        """Store what ``--resume`` needs after ``n_saves`` saves (the OpenMM checkpoint, the
        state as XML for another platform, the engine's own state as text attributes), add
        ``wall_time_s`` (seconds since the last checkpoint or the start of this run) to the
        file's ``wall_time_s`` attribute (the run's cost, set-up and resumes included), and
        flush."""
        self.metadata.attrs["wall_time_s"] = float(self.metadata.attrs.get("wall_time_s", 0.0)) + wall_time_s
        if "checkpoint" in self.metadata:
            del self.metadata["checkpoint"]
        group = self.metadata.create_group("checkpoint")
        group.create_dataset("openmm_checkpoint", data=np.void(openmm_checkpoint))
        group.create_dataset("state_xml", data=state_xml)
        group.attrs["n_saves"] = n_saves
        group.attrs["platform"] = platform
        for key, value in engine_state.items():
            group.attrs[key] = value
        self.h5.flush()

    def load_checkpoint(self) -> tuple[bytes, str, int, str, dict]:
        """(OpenMM checkpoint bytes, state XML, saves done, platform name, the engine's state)."""
        if "checkpoint" not in self.metadata:
            raise TradeMDError(
                f"{self.h5.filename!r} has no checkpoint to resume from: start it again with "
                "--overwrite"
            )
        group = self.metadata["checkpoint"]
        engine_state = {k: attribute_text(v) for k, v in group.attrs.items() if k not in ("n_saves", "platform")}
        return (
            group["openmm_checkpoint"][()].tobytes(),
            attribute_text(group["state_xml"][()]),
            int(group.attrs["n_saves"]),
            str(group.attrs["platform"]),
            engine_state,
        )

    def close(self) -> None:
        self.h5.close()

    def __enter__(self) -> "DynamicsFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_trajectory(path: str | Path, temperature_k: float | None = None,
                    require_finite_energies: bool = True) -> Trajectory:
    """Read the frames of a ``trade-md simulate`` file at one temperature.

    Args:
        temperature_k: which ensemble of a replica-exchange file (K; required there); for a
            plain trajectory file None or its temperature.
        require_finite_energies: refuse a file with NaN/inf energies (every consumer but
            ``trade-md energy``, which recomputes them, wants this).
    """
    with DynamicsFile.open(path) as file:
        return file.read(temperature_k, require_finite_energies)


def write_energies(path: str | Path, temperature_k: float, energy_kj_mol: np.ndarray) -> None:
    """Replace the stored energies [frames] (kJ/mol) of the ensemble at ``temperature_k`` (K)
    of a simulate file (what ``trade-md energy --write`` does)."""
    with DynamicsFile.reopen(path) as file:
        file.write_energies(temperature_k, energy_kj_mol)


def frame_count(path: str | Path, temperature_k: float | None = None) -> int:
    """Frames written so far at one temperature of a simulate file, read from the dataset
    shape (no frame is loaded): how ``run`` and the benchmarks tell a finished file."""
    with DynamicsFile.open(path) as file:
        return file.frame_count(temperature_k)


def ensemble_temperatures(path: str | Path) -> list[float]:
    """Temperatures (K) of the ensembles a simulate file holds: one for a plain run, the
    ladder for replica exchange."""
    with DynamicsFile.open(path) as file:
        return file.temperatures_k

"""The ``trade-md simulate`` files (docs/formats.md): a plain trajectory
(``trade-md/trajectory``, one ensemble at the root) or a replica-exchange file
(``trade-md/replica-exchange``, one ``T<temperature>`` group per ensemble plus ``exchange/``),
with the checkpoint a resume needs.

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
    group_name,
    open_checked,
)

__all__ = [
    "DYNAMICS_FORMATS",
    "TRAJECTORY_DATASETS",
    "Trajectory",
    "EnsembleFrames",
    "DynamicsFile",
    "create_frame_datasets",
    "new_dynamics_file",
    "read_trajectory",
    "write_energies",
    "frame_count",
    "ensemble_temperatures",
]

#: The formats a simulate file may have.
DYNAMICS_FORMATS = (TRAJECTORY_FORMAT, REPLICA_EXCHANGE_FORMAT)

#: Per-frame datasets of a trajectory file: name -> (dtype, unit, description).
TRAJECTORY_DATASETS = {
    "positions_nm": ("float32", "nm", "atom positions [frames, atoms, 3]"),
    "energy_kj_mol": ("float64", "kJ/mol", "potential energy of each frame [frames]"),
    "replica": ("int32", "", "index of the replica (copy) that made each frame [frames]"),
    "time_ps": ("float64", "ps", "simulation time of each frame after equilibration [frames]"),
}


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


def create_frame_datasets(group: h5py.Group, n_atoms: int) -> None:
    """The empty, extendable per-frame datasets of :data:`TRAJECTORY_DATASETS` and the
    per-save kinetic temperature in ``group``."""
    for name, (dtype, unit, description) in TRAJECTORY_DATASETS.items():
        shape = (0, n_atoms, 3) if name == "positions_nm" else (0,)
        chunks = (256, n_atoms, 3) if name == "positions_nm" else (4096,)
        dataset = group.create_dataset(
            name, shape=shape, maxshape=(None, *shape[1:]), dtype=dtype, chunks=chunks
        )
        dataset.attrs["unit"] = unit
        dataset.attrs["description"] = description
    kinetic = group.create_dataset(
        "kinetic_temperature_k", shape=(0,), maxshape=(None,), dtype="float64", chunks=(1024,)
    )
    kinetic.attrs["unit"] = "K"
    kinetic.attrs["description"] = "instantaneous kinetic temperature of the replicas [saves]"


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
    version, attributes, units and topology, and no frames yet."""
    _check_new_path(path, overwrite)
    units = {k: v[1] for k, v in TRAJECTORY_DATASETS.items() if v[1]}
    return create_file(path, file_format, attrs,
                       {**units, "kinetic_temperature_k": "K", "temperature_k": "K"}, topology_pdb)


class EnsembleFrames:
    """The frames of one ensemble in an open simulate file (the root of a trajectory file, or
    a ``T<temperature>`` group of a replica-exchange file): appended chunk by chunk, cut back
    to a checkpoint, read whole.

    Args:
        group: the root of a trajectory file, or an ensemble group.
    """

    def __init__(self, group: h5py.Group):
        self.h5 = group

    @property
    def n_frames(self) -> int:
        return int(self.h5["positions_nm"].shape[0])

    @property
    def n_atoms(self) -> int:
        return int(self.h5["positions_nm"].shape[1])

    def columns(self) -> dict[str, np.ndarray]:
        """Every stored column, unchecked: the datasets of :data:`TRAJECTORY_DATASETS`
        [frames, ...] and ``kinetic_temperature_k`` [saves] (K)."""
        return {name: self.h5[name][()] for name in (*TRAJECTORY_DATASETS, "kinetic_temperature_k")}

    def append(self, positions_nm: np.ndarray, energy_kj_mol: np.ndarray, replica: np.ndarray,
               time_ps: np.ndarray, kinetic_temperature_k: np.ndarray) -> None:
        """Append frames ([n, atoms, 3] nm, [n] kJ/mol, [n], [n] ps) and per-save kinetic
        temperatures [saves] (K); the caller flushes."""
        columns = {
            "positions_nm": positions_nm,
            "energy_kj_mol": energy_kj_mol,
            "replica": replica,
            "time_ps": time_ps,
            "kinetic_temperature_k": kinetic_temperature_k,
        }
        for name, values in columns.items():
            dataset = self.h5[name]
            start = dataset.shape[0]
            dataset.resize(start + len(values), axis=0)
            dataset[start:] = values

    def truncate(self, n_saves: int, frames_per_save: int) -> None:
        """Drop frames written after save ``n_saves`` (they follow the last checkpoint)."""
        keep = n_saves * frames_per_save
        for name in TRAJECTORY_DATASETS:
            self.h5[name].resize(keep, axis=0)
        self.h5["kinetic_temperature_k"].resize(n_saves, axis=0)


class DynamicsFile:
    """An open ``trade-md simulate`` file: a plain trajectory (one ensemble at the root) or a
    replica-exchange file (one ``T<temperature>`` group per ensemble plus ``exchange/``), with
    the checkpoint a resume needs (docs/formats.md). Every read and write of such a file goes
    through this class.

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

    @classmethod
    def create(cls, path: str | Path, attrs: dict, topology_pdb: str, n_atoms: int,
               temperatures_k: list[float], overwrite: bool = False) -> "DynamicsFile":
        """A new file at ``path``: a trajectory file for one temperature (K), a
        replica-exchange file (attribute ``temperatures_k``, an ensemble group per
        temperature, an empty ``exchange/`` group) for several.

        The layout is written to ``<path>.partial`` and renamed into place when complete, so a
        run killed while creating the file leaves no half-made file at ``path``."""
        path = Path(path)
        _check_new_path(path, overwrite)
        partial = path.with_name(path.name + ".partial")
        if len(temperatures_k) == 1:
            h5 = new_dynamics_file(partial, TRAJECTORY_FORMAT, attrs, topology_pdb, overwrite=True)
            create_frame_datasets(h5, n_atoms)
        else:
            h5 = new_dynamics_file(partial, REPLICA_EXCHANGE_FORMAT,
                                   {**attrs, "temperatures_k": [float(t) for t in temperatures_k]},
                                   topology_pdb, overwrite=True)
            for temperature_k in temperatures_k:
                group = h5.create_group(group_name(temperature_k))
                group.attrs["temperature_k"] = float(temperature_k)
                create_frame_datasets(group, n_atoms)
            h5.create_group("exchange")
        h5.close()
        os.replace(partial, path)
        return cls(h5py.File(path, "a"), path)

    @classmethod
    def reopen(cls, path: str | Path) -> "DynamicsFile":
        """Open an existing simulate file to continue or change it (``--resume``,
        ``trade-md energy --write``)."""
        return cls(open_checked(path, DYNAMICS_FORMATS, mode="a"), path)

    @classmethod
    def open(cls, path: str | Path) -> "DynamicsFile":
        """Open an existing simulate file for reading."""
        return cls(open_checked(path, DYNAMICS_FORMATS), path)

    @property
    def ensembles(self) -> list[EnsembleFrames]:
        """A writer of each ensemble, in ladder order."""
        if self.h5.attrs["format"] == TRAJECTORY_FORMAT:
            return [EnsembleFrames(self.h5)]
        return [EnsembleFrames(self.h5[group_name(t)]) for t in json.loads(self.h5.attrs["temperatures_k"])]

    @property
    def attrs(self) -> dict:
        """The root attributes (lists and dicts as JSON text)."""
        return dict(self.h5.attrs)

    @property
    def topology_pdb(self) -> str:
        return attribute_text(self.h5["topology_pdb"][()])

    @property
    def temperatures_k(self) -> list[float]:
        """Temperatures (K) of the ensembles: one for a plain run, the ladder for replica
        exchange."""
        if self.h5.attrs["format"] == TRAJECTORY_FORMAT:
            return [float(self.h5.attrs["temperature_k"])]
        return [float(t) for t in json.loads(self.h5.attrs["temperatures_k"])]

    @property
    def has_checkpoint(self) -> bool:
        """Whether a chunk was finished (a run killed before that has nothing to resume)."""
        return "checkpoint" in self.h5

    @property
    def checkpoint_saves(self) -> int | None:
        """Saves done at the last checkpoint (None: no checkpoint)."""
        return int(self.h5["checkpoint"].attrs["n_saves"]) if self.has_checkpoint else None

    def _ensemble_group(self, temperature_k: float | None) -> h5py.Group:
        """The group holding the frames at ``temperature_k``: the root of a plain trajectory,
        ``T<temperature>`` of a replica-exchange file."""
        path = self.path
        if self.h5.attrs["format"] == TRAJECTORY_FORMAT:
            stored = float(self.h5.attrs["temperature_k"])
            if temperature_k is not None and abs(temperature_k - stored) > 1e-6:
                raise TradeMDError(
                    f"{str(path)!r} holds frames at {stored:g} K, not {temperature_k:g} K: give the "
                    "file simulated at that temperature"
                )
            return self.h5
        available = self.temperatures_k
        if temperature_k is None or not any(abs(t - temperature_k) < 1e-6 for t in available):
            asked = "no temperature was given" if temperature_k is None else f"{temperature_k:g} K is not one"
            raise TradeMDError(
                f"{str(path)!r} is a replica-exchange file with ensembles at "
                f"{', '.join(f'{t:g}' for t in available)} K and {asked}: pick one with --temperature"
            )
        return self.h5[group_name(temperature_k)]

    def read(self, temperature_k: float | None = None,
             require_finite_energies: bool = True) -> "Trajectory":
        """The frames at one temperature (see :func:`read_trajectory`)."""
        path = self.path
        group = self._ensemble_group(temperature_k)
        missing = [name for name in TRAJECTORY_DATASETS if name not in group]
        missing += [] if "topology_pdb" in self.h5 else ["topology_pdb"]
        if missing:
            raise TradeMDError(f"{str(path)!r} lacks datasets {missing}: the file is damaged")
        data = {name: group[name][()] for name in TRAJECTORY_DATASETS}
        energy = data["energy_kj_mol"]
        if require_finite_energies and not np.all(np.isfinite(energy)):
            raise TradeMDError(
                f"{str(path)!r} holds {int(np.sum(~np.isfinite(energy)))} non-finite energies: "
                "recompute them with `trade-md energy FILE --write` or rerun the simulation"
            )
        return Trajectory(
            topology_pdb=attribute_text(self.h5["topology_pdb"][()]),
            temperature_k=float(group.attrs["temperature_k"]),
            attrs={**self.h5.attrs, **group.attrs},
            **data,
        )

    def frame_count(self, temperature_k: float | None = None) -> int:
        """Frames written so far at one temperature, read from the dataset shape (no frame
        is loaded)."""
        group = self._ensemble_group(temperature_k)
        if "energy_kj_mol" not in group:
            raise TradeMDError(f"{str(self.path)!r} lacks the energy_kj_mol dataset: the file is damaged")
        return int(group["energy_kj_mol"].shape[0])

    def write_energies(self, temperature_k: float, energy_kj_mol: np.ndarray) -> None:
        """Replace the stored energies [frames] (kJ/mol) of the ensemble at ``temperature_k``
        (K); the file must be open for writing (:meth:`reopen`)."""
        dataset = self._ensemble_group(temperature_k)["energy_kj_mol"]
        if dataset.shape != energy_kj_mol.shape:
            raise TradeMDError(f"{str(self.path)!r} holds {dataset.shape[0]} frames, not {len(energy_kj_mol)}: "
                               "the file changed while its energies were recomputed")
        dataset[...] = energy_kj_mol

    def truncate(self, n_saves: int, frames_per_save: int) -> None:
        """Drop everything written after save ``n_saves`` (it follows the last checkpoint)."""
        for ensemble in self.ensembles:
            ensemble.truncate(n_saves, frames_per_save)
        if "exchange/walker_at_rung" in self.h5:
            self.h5["exchange/walker_at_rung"].resize(n_saves, axis=0)

    def write_exchange_statistics(self, attempts: np.ndarray, accepted: np.ndarray,
                                  acceptance_rates: list[float], round_trips: int, rounds: int,
                                  walkers: np.ndarray) -> None:
        """Exchange statistics of a replica-exchange file: attempts and acceptances per
        neighbour pair (datasets), acceptance rates, round trips and rounds (attributes of
        ``exchange/``), and the walker at every rung of the new saves [saves, ladders, K]."""
        group = self.h5["exchange"]
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
        ``walker_at_rung`` [saves, ladders, K], ``round_trips`` and ``exchange_rounds``."""
        group = self.h5["exchange"]
        return {"attempts": group["attempts"][()], "accepted": group["accepted"][()],
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
        self.h5.attrs["wall_time_s"] = float(self.h5.attrs.get("wall_time_s", 0.0)) + wall_time_s
        if "checkpoint" in self.h5:
            del self.h5["checkpoint"]
        group = self.h5.create_group("checkpoint")
        group.create_dataset("openmm_checkpoint", data=np.void(openmm_checkpoint))
        group.create_dataset("state_xml", data=state_xml)
        group.attrs["n_saves"] = n_saves
        group.attrs["platform"] = platform
        for key, value in engine_state.items():
            group.attrs[key] = value
        self.h5.flush()

    def load_checkpoint(self) -> tuple[bytes, str, int, str, dict]:
        """(OpenMM checkpoint bytes, state XML, saves done, platform name, the engine's state)."""
        if "checkpoint" not in self.h5:
            raise TradeMDError(
                f"{self.h5.filename!r} has no checkpoint to resume from: start it again with "
                "--overwrite"
            )
        group = self.h5["checkpoint"]
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

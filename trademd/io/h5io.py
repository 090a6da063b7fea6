"""The HDF5 schema of every trade-md file: names, units, attributes, versions.

Every stage reads and writes through this module (documented in ``docs/formats.md``). Each
file carries ``format`` (e.g. ``trade-md/trajectory``), ``format_version``, the provenance
attributes of :func:`trademd.io.provenance.provenance`, and a ``unit`` attribute on every dataset
with a physical unit.
"""

from dataclasses import dataclass, field
import json
import math
import os
from pathlib import Path

import h5py
import numpy as np

from trademd.errors import TradeMDError

__all__ = [
    "open_hdf5",
    "file_format",
    "SAMPLES_FORMAT",
    "write_samples",
    "read_samples",
    "TemperatureSamples",
    "SamplesFile",
    "SAMPLE_DATASETS",
    "RESIDUE_DATASETS",
    "TRAJECTORY_FORMAT",
    "REPLICA_EXCHANGE_FORMAT",
    "DynamicsFile",
    "ensemble_temperatures",
    "frame_count",
    "write_energies",
    "Trajectory",
    "TrajectoryWriter",
    "read_trajectory",
    "new_file",
    "create_frame_datasets",
    "attribute_text",
    "open_checked",
    "describe",
]

TRAJECTORY_FORMAT = "trade-md/trajectory"
REPLICA_EXCHANGE_FORMAT = "trade-md/replica-exchange"
SAMPLES_FORMAT = "trade-md/samples"
FORMAT_VERSION = 1

#: Per-frame datasets of a trajectory file: name -> (dtype, unit, description).
TRAJECTORY_DATASETS = {
    "positions_nm": ("float32", "nm", "atom positions [frames, atoms, 3]"),
    "energy_kj_mol": ("float64", "kJ/mol", "potential energy of each frame [frames]"),
    "replica": ("int32", "", "index of the replica (copy) that made each frame [frames]"),
    "time_ps": ("float64", "ps", "simulation time of each frame after equilibration [frames]"),
}


def open_hdf5(path: str | Path) -> h5py.File:
    """Open an existing HDF5 file for reading, with one-line errors for a missing or non-HDF5 file."""
    path = Path(path)
    if not path.is_file():
        raise TradeMDError(f"file {str(path)!r} not found: check the path")
    try:
        return h5py.File(path, "r")
    except OSError:
        raise TradeMDError(f"{str(path)!r} is not an HDF5 file: give a file trade-md wrote") from None


def file_format(path: str | Path) -> str | None:
    """The ``format`` attribute of a trade-md file (None for other HDF5 files)."""
    with open_hdf5(path) as h5:
        found = h5.attrs.get("format")
    return None if found is None else str(found)


def open_checked(path: str | Path, expected_format: str | tuple[str, ...], mode: str = "r") -> h5py.File:
    """Open ``path`` (mode ``r`` or ``a``) and check that it is a trade-md file of
    ``expected_format`` (one format or a tuple of accepted ones)."""
    accepted = (expected_format,) if isinstance(expected_format, str) else tuple(expected_format)
    h5 = open_hdf5(path)
    found = h5.attrs.get("format")
    if found not in accepted:
        h5.close()
        what = f"a {found!r} file" if found else "not a trade-md file (no 'format' attribute)"
        maker = "sample" if accepted == (SAMPLES_FORMAT,) else "simulate"
        raise TradeMDError(
            f"{str(path)!r} is {what}, expected {' or '.join(map(repr, accepted))}: give the "
            f"file `trade-md {maker}` wrote"
        )
    version = int(h5.attrs.get("format_version", 0))
    if version > FORMAT_VERSION:
        h5.close()
        raise TradeMDError(
            f"{str(path)!r} has format version {version}, newer than this trade-md reads "
            f"({FORMAT_VERSION}): upgrade trade-md"
        )
    if mode != "r":
        h5.close()
        h5 = h5py.File(path, mode)
    return h5


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


def read_trajectory(path: str | Path, temperature_k: float | None = None,
                    require_finite_energies: bool = True) -> Trajectory:
    """Read the frames of a ``trade-md simulate`` file at one temperature.

    Args:
        temperature_k: which ensemble of a replica-exchange file (K; required there); for a
            plain trajectory file None or its temperature.
        require_finite_energies: refuse a file with NaN/inf energies (every consumer but
            ``trade-md energy``, which recomputes them, wants this).
    """
    with open_checked(path, (TRAJECTORY_FORMAT, REPLICA_EXCHANGE_FORMAT)) as h5:
        group = _ensemble_group(h5, path, temperature_k)
        missing = [name for name in TRAJECTORY_DATASETS if name not in group]
        missing += [] if "topology_pdb" in h5 else ["topology_pdb"]
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
            topology_pdb=attribute_text(h5["topology_pdb"][()]),
            temperature_k=float(group.attrs["temperature_k"]),
            attrs={**h5.attrs, **group.attrs},
            **data,
        )


def write_energies(path: str | Path, temperature_k: float, energy_kj_mol: np.ndarray) -> None:
    """Replace the stored energies [frames] (kJ/mol) of the ensemble at ``temperature_k`` (K)
    of a simulate file (what ``trade-md energy --write`` does)."""
    with open_checked(path, (TRAJECTORY_FORMAT, REPLICA_EXCHANGE_FORMAT), mode="a") as h5:
        dataset = _ensemble_group(h5, path, temperature_k)["energy_kj_mol"]
        if dataset.shape != energy_kj_mol.shape:
            raise TradeMDError(f"{str(path)!r} holds {dataset.shape[0]} frames, not {len(energy_kj_mol)}: "
                               "the file changed while its energies were recomputed")
        dataset[...] = energy_kj_mol


def frame_count(path: str | Path, temperature_k: float | None = None) -> int:
    """Frames written so far at one temperature of a simulate file, read from the dataset
    shape (no frame is loaded): how ``run`` and the benchmarks tell a finished file."""
    with open_checked(path, (TRAJECTORY_FORMAT, REPLICA_EXCHANGE_FORMAT)) as h5:
        group = _ensemble_group(h5, path, temperature_k)
        if "energy_kj_mol" not in group:
            raise TradeMDError(f"{str(path)!r} lacks the energy_kj_mol dataset: the file is damaged")
        return int(group["energy_kj_mol"].shape[0])


def ensemble_temperatures(path: str | Path) -> list[float]:
    """Temperatures (K) of the ensembles a simulate file holds: one for a plain run, the
    ladder for replica exchange."""
    with open_checked(path, (TRAJECTORY_FORMAT, REPLICA_EXCHANGE_FORMAT)) as h5:
        if h5.attrs["format"] == TRAJECTORY_FORMAT:
            return [float(h5.attrs["temperature_k"])]
        return [float(t) for t in json.loads(h5.attrs["temperatures_k"])]


def _ensemble_group(h5: h5py.File, path, temperature_k: float | None) -> h5py.Group:
    """The group holding the frames at ``temperature_k``: the root of a plain trajectory,
    ``T<temperature>`` of a replica-exchange file."""
    if h5.attrs["format"] == TRAJECTORY_FORMAT:
        stored = float(h5.attrs["temperature_k"])
        if temperature_k is not None and abs(temperature_k - stored) > 1e-6:
            raise TradeMDError(
                f"{str(path)!r} holds frames at {stored:g} K, not {temperature_k:g} K: give the "
                "file simulated at that temperature"
            )
        return h5
    available = [float(t) for t in json.loads(h5.attrs["temperatures_k"])]
    if temperature_k is None or not any(abs(t - temperature_k) < 1e-6 for t in available):
        asked = "no temperature was given" if temperature_k is None else f"{temperature_k:g} K is not one"
        raise TradeMDError(
            f"{str(path)!r} is a replica-exchange file with ensembles at "
            f"{', '.join(f'{t:g}' for t in available)} K and {asked}: pick one with --temperature"
        )
    return h5[group_name(temperature_k)]


def _write_attrs(node: h5py.Group, attrs: dict) -> None:
    """Store attributes; lists and dicts as JSON text."""
    for key, value in attrs.items():
        node.attrs[key] = json.dumps(value) if isinstance(value, (list, tuple, dict)) else value


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


def new_file(path: Path, file_format: str, attrs: dict, topology_pdb: str,
              overwrite: bool) -> h5py.File:
    """A new trade-md file with format, version, attributes, units and topology."""
    _check_new_path(path, overwrite)
    h5 = h5py.File(path, "w")
    h5.attrs["format"] = file_format
    h5.attrs["format_version"] = FORMAT_VERSION
    _write_attrs(h5, attrs)
    units = {k: v[1] for k, v in TRAJECTORY_DATASETS.items() if v[1]}
    h5.attrs["units"] = json.dumps({**units, "kinetic_temperature_k": "K", "temperature_k": "K"})
    h5.create_dataset("topology_pdb", data=topology_pdb)
    return h5


class TrajectoryWriter:
    """Appends frames to one ensemble (the root of a trajectory file, or a ``T<temperature>``
    group of a replica-exchange file), chunk by chunk.

    Args:
        group: the root of a trajectory file, or an ensemble group.
    """

    def __init__(self, group: h5py.Group):
        self.h5 = group

    @property
    def n_frames(self) -> int:
        return int(self.h5["positions_nm"].shape[0])

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
    """A ``trade-md simulate`` file being written: a plain trajectory (one ensemble at the
    root) or a replica-exchange file (one ``T<temperature>`` group per ensemble plus
    ``exchange/``), with the checkpoint a resume needs (docs/formats.md).

    Use as a context manager; the file is valid after every :meth:`save_checkpoint`, and an
    interruption loses only the frames written after the last one.
    """

    def __init__(self, h5: h5py.File):
        self.h5 = h5
        if h5.attrs["format"] == TRAJECTORY_FORMAT:
            self.ensembles = [TrajectoryWriter(h5)]
        else:
            self.ensembles = [TrajectoryWriter(h5[group_name(t)])
                              for t in json.loads(h5.attrs["temperatures_k"])]

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
            h5 = new_file(partial, TRAJECTORY_FORMAT, attrs, topology_pdb, overwrite=True)
            create_frame_datasets(h5, n_atoms)
        else:
            h5 = new_file(partial, REPLICA_EXCHANGE_FORMAT,
                          {**attrs, "temperatures_k": [float(t) for t in temperatures_k]},
                          topology_pdb, overwrite=True)
            for temperature_k in temperatures_k:
                group = h5.create_group(group_name(temperature_k))
                group.attrs["temperature_k"] = float(temperature_k)
                create_frame_datasets(group, n_atoms)
            h5.create_group("exchange")
        h5.close()
        os.replace(partial, path)
        return cls(h5py.File(path, "a"))

    @classmethod
    def reopen(cls, path: str | Path) -> "DynamicsFile":
        """Open an existing simulate file to continue it (``--resume``)."""
        return cls(open_checked(path, (TRAJECTORY_FORMAT, REPLICA_EXCHANGE_FORMAT), mode="a"))

    @property
    def attrs(self) -> dict:
        """The root attributes (lists and dicts as JSON text)."""
        return dict(self.h5.attrs)

    @property
    def topology_pdb(self) -> str:
        return attribute_text(self.h5["topology_pdb"][()])

    @property
    def has_checkpoint(self) -> bool:
        """Whether a chunk was finished (a run killed before that has nothing to resume)."""
        return "checkpoint" in self.h5

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


def describe(path: str | Path) -> str:
    """A human-readable summary of any trade-md HDF5 file: format, attributes, datasets."""
    h5 = open_hdf5(path)
    lines = [f"{path}"]
    with h5:
        fmt = h5.attrs.get("format", "(not a trade-md file)")
        lines.append(f"  format: {fmt} (version {h5.attrs.get('format_version', '?')})")
        for key in sorted(h5.attrs):
            if key not in ("format", "format_version"):
                lines.append(f"  {key}: {attribute_text(h5.attrs[key])}")

        def visit(name, obj):
            if isinstance(obj, h5py.Group) and obj.attrs:
                attrs = ", ".join(f"{k}={attribute_text(v)}" for k, v in sorted(obj.attrs.items()) if len(attribute_text(v)) < 200)
                lines.append(f"  /{name}/ ({attrs})")
            if isinstance(obj, h5py.Dataset):
                unit = obj.attrs.get("unit", "")
                lines.append(f"  /{name}: {obj.dtype} {obj.shape}" + (f" [{unit}]" if unit else ""))

        h5.visititems(visit)
    return "\n".join(lines)


def attribute_text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


#: Per-sample datasets of each temperature group of a samples file: name -> (unit, description).
SAMPLE_DATASETS = {
    "positions_nm": ("nm", "sample positions in the canonical frame [n, atoms, 3]"),
    "log_prob": ("", "log density of the model at the sample, log p(x|T) [n]"),
    "energy_kj_mol": ("kJ/mol", "OpenMM potential energy [n] (+inf: overflow)"),
    "log_weights": ("", "unnormalised log importance weights -U/kT - log p [n] (-inf: flagged)"),
    "weights": ("", "self-normalised importance weights, sum 1 [n]"),
    "wrong_chirality": ("", "flag: a chiral centre has the wrong handedness [n]"),
    "nonfinite_energy": ("", "flag: the energy is not finite [n]"),
    "phi": ("rad", "backbone phi dihedral of the first residue [n]"),
    "psi": ("rad", "backbone psi dihedral of the first residue [n]"),
}
#: Per-sample datasets only systems with several residues have: name -> (unit, description).
RESIDUE_DATASETS = {
    "phi_residues": ("rad", "phi of every residue with phi and psi, in chain order [n, residues]"),
    "psi_residues": ("rad", "psi of every residue with phi and psi, in chain order [n, residues]"),
}


def group_name(temperature_k: float) -> str:
    """HDF5 group of one temperature, e.g. ``T300`` or ``T312.5``."""
    return f"T{temperature_k:g}"


@dataclass
class TemperatureSamples:
    """Weighted samples at one temperature, as drawn and as stored in one ``T<temperature>``
    group of a samples file (arrays over n samples, datasets of :data:`SAMPLE_DATASETS`).

    Attributes:
        temperature_k: T (K).
        positions_nm: float32 [n, atoms, 3].
        log_prob: float64 [n], log p(x|T) of the model.
        energy_kj_mol: float64 [n], OpenMM potential energy (+inf where it overflowed).
        log_weights: float64 [n], unnormalised; -inf for flagged samples.
        weights: float64 [n], normalised to sum 1.
        wrong_chirality: bool [n].
        nonfinite_energy: bool [n].
        phi, psi: float64 [n] radians, the first residue's (empty if the system has none).
        phi_residues, psi_residues: float64 [n, residues] radians, every residue's, for
            systems with more than one (else empty, and not stored).
        summary: the group's attributes (ESS diagnostics, free energies: ``trade-md sample``'s
            summary).
        histograms: named arrays of the ``histograms/`` subgroup.
        ramachandran_png: the group's Ramachandran plot (PNG bytes; empty if none).
    """

    temperature_k: float
    positions_nm: np.ndarray
    log_prob: np.ndarray
    energy_kj_mol: np.ndarray
    log_weights: np.ndarray
    weights: np.ndarray
    wrong_chirality: np.ndarray
    nonfinite_energy: np.ndarray
    phi: np.ndarray
    psi: np.ndarray
    phi_residues: np.ndarray = field(default_factory=lambda: np.zeros((0, 0)))
    psi_residues: np.ndarray = field(default_factory=lambda: np.zeros((0, 0)))
    summary: dict = field(default_factory=dict)
    histograms: dict = field(default_factory=dict)
    ramachandran_png: bytes = b""

    @property
    def n(self) -> int:
        return int(len(self.log_prob))

    @property
    def ess(self) -> float:
        """Kish effective sample size (absolute): 1 / sum w^2 of the normalised weights."""
        return float(1.0 / np.sum(self.weights ** 2))

    @property
    def relative_ess(self) -> float:
        return self.ess / self.n

    @property
    def flagged(self) -> np.ndarray:
        """bool [n]: wrong chirality or a non-finite energy (zero weight)."""
        return self.wrong_chirality | self.nonfinite_energy

    @property
    def fraction_flagged(self) -> float:
        return float(np.mean(self.flagged))


@dataclass
class SamplesFile:
    """A samples file's contents: root attributes (model, provenance), the topology and the
    samples of every temperature (K)."""

    attrs: dict
    topology_pdb: str
    by_temperature: dict[float, TemperatureSamples]

    def at(self, path, temperature_k: float | None) -> TemperatureSamples:
        """The samples at ``temperature_k`` (None: the only temperature of the file)."""
        temperatures = sorted(self.by_temperature)
        if temperature_k is None:
            if len(temperatures) != 1:
                raise TradeMDError(f"{str(path)!r} holds samples at {temperatures} K: pick one with --temperature")
            temperature_k = temperatures[0]
        if temperature_k not in self.by_temperature:
            raise TradeMDError(f"{str(path)!r} has no samples at {temperature_k:g} K (it has {temperatures})")
        return self.by_temperature[temperature_k]


def write_samples(path: str | Path, samples: list[TemperatureSamples], attrs: dict,
                  topology_pdb: str, overwrite: bool = False) -> Path:
    """Write a samples file: one group per temperature, the root ``attrs`` (model,
    provenance) and the topology."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise TradeMDError(f"{str(path)!r} exists: pass --overwrite to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as h5:
        h5.attrs["format"] = SAMPLES_FORMAT
        h5.attrs["format_version"] = FORMAT_VERSION
        _write_attrs(h5, attrs)
        h5.attrs["units"] = json.dumps({k: v[0] for k, v in {**SAMPLE_DATASETS, **RESIDUE_DATASETS}.items() if v[0]})
        h5.create_dataset("topology_pdb", data=topology_pdb)
        for entry in samples:
            group = h5.create_group(group_name(entry.temperature_k))
            for key, value in entry.summary.items():
                group.attrs[key] = value
            group.attrs["temperature_k"] = entry.temperature_k
            stored = {**SAMPLE_DATASETS, **(RESIDUE_DATASETS if entry.phi_residues.size else {})}
            for name, (unit, description) in stored.items():
                dataset = group.create_dataset(name, data=getattr(entry, name), compression="gzip"
                                               if name == "positions_nm" else None)
                dataset.attrs["unit"] = unit
                dataset.attrs["description"] = description
            histograms = group.create_group("histograms")
            for name, value in entry.histograms.items():
                histograms.create_dataset(name, data=value)
            group.create_dataset("ramachandran_png", data=np.void(entry.ramachandran_png))
    return path


def read_samples(path: str | Path) -> SamplesFile:
    """Read a samples file written by :func:`write_samples`."""
    with open_checked(path, SAMPLES_FORMAT) as h5:
        by_temperature = {}
        for group in h5.values():
            if not isinstance(group, h5py.Group):
                continue
            arrays = {k: group[k][()] for k in (*SAMPLE_DATASETS, *RESIDUE_DATASETS) if k in group}
            summary = dict(group.attrs)
            temperature_k = float(summary["temperature_k"])
            by_temperature[temperature_k] = TemperatureSamples(
                temperature_k=temperature_k, summary=summary,
                histograms={k: v[()] for k, v in group["histograms"].items()},
                ramachandran_png=group["ramachandran_png"][()].tobytes(), **arrays)
        return SamplesFile(dict(h5.attrs), attribute_text(h5["topology_pdb"][()]), by_temperature)

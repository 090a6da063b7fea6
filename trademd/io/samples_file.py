"""The ``trade-md sample`` files (``trade-md/samples``, docs/formats.md): weighted samples
at each temperature, the model's record and the topology.

Written in the H5MD layout (format version 2): per temperature ``T<temperature>`` the
positions in ``particles/T<temperature>/position`` (``step`` = ``time`` = the sample index:
samples have no time), every per-sample quantity in ``observables/T<temperature>/<name>``,
and the summary, histograms and Ramachandran plot in ``parameters/T<temperature>``; the
model's record and the topology in ``parameters``. Version-1 files (one ``T<temperature>``
group of datasets per temperature at the root) are read too.

:class:`SamplesHDF5File` owns the open file and every read and write of it;
:func:`write_samples` and :func:`read_samples` open one for a single call.
"""

from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np

from trademd.errors import TradeMDError
from trademd.io.h5md import create_observable, create_particle_group
from trademd.io.schema import (
    SAMPLES_FORMAT,
    attribute_text,
    create_file,
    file_attrs,
    file_version,
    group_name,
    metadata_group,
    open_checked,
)
from trademd.weights import kish_ess_of_normalised

__all__ = [
    "SAMPLE_DATASETS",
    "RESIDUE_DATASETS",
    "LATER_DATASETS",
    "OBSERVABLE_NAMES",
    "TemperatureSamples",
    "SamplesFile",
    "SamplesHDF5File",
    "write_samples",
    "read_samples",
]

#: Per-sample quantities of each temperature: name -> (unit in H5MD notation, description).
#: ``positions_nm`` is ``particles/T<temperature>/position``, each other one an observable.
SAMPLE_DATASETS = {
    "positions_nm": ("nm", "sample positions in the canonical frame [n, atoms, 3]"),
    "log_prob": ("", "log density of the model at the sample, log p(x|T) [n]"),
    "energy_kj_mol": ("kJ mol-1", "OpenMM potential energy [n] (+inf: overflow)"),
    "log_weights": ("", "unnormalised log importance weights -U/kT - log p [n] (-inf: flagged)"),
    "weights": ("", "self-normalised importance weights, sum 1 [n]"),
    "wrong_chirality": ("", "flag: a chiral centre has the wrong handedness [n]"),
    "nonfinite_energy": ("", "flag: the energy is not finite [n]"),
    "phi": ("rad", "backbone phi dihedral of the first residue [n]"),
    "psi": ("rad", "backbone psi dihedral of the first residue [n]"),
}
#: Per-sample quantities only systems with several residues have: name -> (unit, description).
RESIDUE_DATASETS = {
    "phi_residues": ("rad", "phi of every residue with phi and psi, in chain order [n, residues]"),
    "psi_residues": ("rad", "psi of every residue with phi and psi, in chain order [n, residues]"),
}
#: Per-sample quantities added after files were first written: name -> (unit, description);
#: a file without one reads as all False.
LATER_DATASETS = {
    "flipped_peptide_bond": ("", "flag: a peptide bond is cis where the reference structure has "
                                 "it trans, or the reverse [n] (trademd.analysis.isomers)"),
}
#: Version 2: the observable name of each per-sample quantity whose name differs.
OBSERVABLE_NAMES = {"energy_kj_mol": "potential_energy"}
#: What the ``time`` of a samples file's positions is.
_SAMPLE_TIME = ("the sample index (equal to step): samples have no time; the unit is there "
                "because MDAnalysis wants one")


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
        flipped_peptide_bond: bool [n] (files written before it existed: all False).
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
    flipped_peptide_bond: np.ndarray | None = None
    summary: dict = field(default_factory=dict)
    histograms: dict = field(default_factory=dict)
    ramachandran_png: bytes = b""

    def __post_init__(self) -> None:
        if self.flipped_peptide_bond is None:
            self.flipped_peptide_bond = np.zeros(len(self.log_prob), dtype=bool)

    @property
    def n(self) -> int:
        return int(len(self.log_prob))

    @property
    def ess(self) -> float:
        """Kish effective sample size (absolute): 1 / sum w^2 of the normalised weights."""
        return kish_ess_of_normalised(self.weights)

    @property
    def relative_ess(self) -> float:
        return self.ess / self.n

    @property
    def flagged(self) -> np.ndarray:
        """bool [n]: wrong chirality, a flipped peptide bond or a non-finite energy (zero weight)."""
        return self.wrong_chirality | self.flipped_peptide_bond | self.nonfinite_energy

    @property
    def fraction_flagged(self) -> float:
        return float(np.mean(self.flagged))


@dataclass
class SamplesFile:
    """A samples file's contents: attributes (model, provenance), the topology and the
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


def _element_name(quantity: str) -> str:
    """The H5MD element of a per-sample quantity in version 2 (``position`` or an observable)."""
    return "position" if quantity == "positions_nm" else OBSERVABLE_NAMES.get(quantity, quantity)


class SamplesHDF5File:
    """An open samples file, in either layout (format version 2, H5MD, or 1); every read and
    write of one goes through this class.

    Open one with :meth:`create` (a new file, then :meth:`write` each temperature) or
    :meth:`open` (then :meth:`read`); use it as a context manager.

    Args:
        h5: the open HDF5 file.
    """

    def __init__(self, h5: h5py.File):
        self.h5 = h5

    @classmethod
    def create(cls, path: str | Path, attrs: dict, topology_pdb: str,
               overwrite: bool = False) -> "SamplesHDF5File":
        """A new samples file at ``path`` with the ``attrs`` (model, provenance) and the
        topology, and no samples yet."""
        path = Path(path)
        if path.exists() and not overwrite:
            raise TradeMDError(f"{str(path)!r} exists: pass --overwrite to replace it")
        path.parent.mkdir(parents=True, exist_ok=True)
        units = {_element_name(k): v[0] for k, v in {**SAMPLE_DATASETS, **RESIDUE_DATASETS}.items() if v[0]}
        return cls(create_file(path, SAMPLES_FORMAT, attrs, units, topology_pdb))

    @classmethod
    def open(cls, path: str | Path) -> "SamplesHDF5File":
        """Open a samples file for reading."""
        return cls(open_checked(path, SAMPLES_FORMAT))

    def write(self, entry: TemperatureSamples) -> None:
        """Store the samples of one temperature: its particle group, observables and
        ``parameters/T<temperature>`` group (summary attributes, histograms, plot)."""
        name = group_name(entry.temperature_k)
        index = np.arange(entry.n)
        position = create_particle_group(self.h5, name, entry.positions_nm, index, index.astype(np.float64),
                                         compression="gzip")
        position["value"].attrs["description"] = SAMPLE_DATASETS["positions_nm"][1]
        position["time"].attrs["description"] = _SAMPLE_TIME
        stored = {**SAMPLE_DATASETS, **LATER_DATASETS, **(RESIDUE_DATASETS if entry.phi_residues.size else {})}
        for quantity, (unit, description) in stored.items():
            if quantity != "positions_nm":
                create_observable(self.h5, name, _element_name(quantity),
                                  getattr(entry, quantity), unit, description)
        group = self.h5["parameters"].create_group(name)
        for key, value in entry.summary.items():
            group.attrs[key] = value
        group.attrs["temperature_k"] = entry.temperature_k
        histograms = group.create_group("histograms")
        for key, value in entry.histograms.items():
            histograms.create_dataset(key, data=value)
        group.create_dataset("ramachandran_png", data=np.void(entry.ramachandran_png))

    def read(self) -> SamplesFile:
        """The whole file: attributes, topology and the samples of every temperature."""
        metadata = metadata_group(self.h5)
        by_temperature = {}
        for group in metadata.values():
            if not isinstance(group, h5py.Group) or "temperature_k" not in group.attrs:
                continue
            arrays = self._arrays(group)
            summary = dict(group.attrs)
            temperature_k = float(summary["temperature_k"])
            by_temperature[temperature_k] = TemperatureSamples(
                temperature_k=temperature_k, summary=summary,
                histograms={k: v[()] for k, v in group["histograms"].items()},
                ramachandran_png=group["ramachandran_png"][()].tobytes(), **arrays)
        return SamplesFile(file_attrs(self.h5), attribute_text(metadata["topology_pdb"][()]), by_temperature)

    def _arrays(self, group: h5py.Group) -> dict[str, np.ndarray]:
        """The per-sample arrays of the temperature whose metadata is ``group`` (version 1:
        the group holds them; version 2: its particle group and observables)."""
        names = (*SAMPLE_DATASETS, *LATER_DATASETS, *RESIDUE_DATASETS)
        temperature = group.name.rsplit("/", 1)[-1]
        if file_version(self.h5) == 1:
            arrays = {k: group[k][()] for k in names if k in group}
        else:
            observables = self.h5.get(f"observables/{temperature}", {})
            arrays = {k: observables[f"{_element_name(k)}/value"][()] for k in names
                      if _element_name(k) in observables and k != "positions_nm"}
            position = self.h5.get(f"particles/{temperature}/position/value")
            arrays.update({} if position is None else {"positions_nm": position[()]})
        missing = [k for k in SAMPLE_DATASETS if k not in arrays]
        if missing:
            raise TradeMDError(f"{self.h5.filename!r} lacks the {', '.join(map(_element_name, missing))} "
                               f"of its {temperature} samples: the file is damaged")
        return arrays

    def close(self) -> None:
        self.h5.close()

    def __enter__(self) -> "SamplesHDF5File":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def write_samples(path: str | Path, samples: list[TemperatureSamples], attrs: dict,
                  topology_pdb: str, overwrite: bool = False) -> Path:
    """Write a samples file: the samples of each temperature, the ``attrs`` (model,
    provenance) and the topology."""
    with SamplesHDF5File.create(path, attrs, topology_pdb, overwrite) as file:
        for entry in samples:
            file.write(entry)
    return Path(path)


def read_samples(path: str | Path) -> SamplesFile:
    """Read a samples file written by :func:`write_samples`."""
    with SamplesHDF5File.open(path) as file:
        return file.read()

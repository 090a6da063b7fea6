"""The ``trade-md sample`` files (``trade-md/samples``, docs/formats.md): one
``T<temperature>`` group of weighted samples per temperature, the model's record in the root
attributes and the topology.

:class:`SamplesHDF5File` owns the open file and every read and write of it;
:func:`write_samples` and :func:`read_samples` open one for a single call.
"""

from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np

from trademd.errors import TradeMDError
from trademd.io.schema import SAMPLES_FORMAT, attribute_text, create_file, group_name, open_checked
from trademd.weights import kish_ess_of_normalised

__all__ = [
    "SAMPLE_DATASETS",
    "RESIDUE_DATASETS",
    "TemperatureSamples",
    "SamplesFile",
    "SamplesHDF5File",
    "write_samples",
    "read_samples",
]

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
        return kish_ess_of_normalised(self.weights)

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


class SamplesHDF5File:
    """An open samples file; every read and write of one goes through this class.

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
        """A new samples file at ``path`` with the root ``attrs`` (model, provenance) and the
        topology, and no samples yet."""
        path = Path(path)
        if path.exists() and not overwrite:
            raise TradeMDError(f"{str(path)!r} exists: pass --overwrite to replace it")
        path.parent.mkdir(parents=True, exist_ok=True)
        units = {k: v[0] for k, v in {**SAMPLE_DATASETS, **RESIDUE_DATASETS}.items() if v[0]}
        return cls(create_file(path, SAMPLES_FORMAT, attrs, units, topology_pdb))

    @classmethod
    def open(cls, path: str | Path) -> "SamplesHDF5File":
        """Open a samples file for reading."""
        return cls(open_checked(path, SAMPLES_FORMAT))

    def write(self, entry: TemperatureSamples) -> None:
        """Store the samples of one temperature as its ``T<temperature>`` group."""
        group = self.h5.create_group(group_name(entry.temperature_k))
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

    def read(self) -> SamplesFile:
        """The whole file: root attributes, topology and the samples of every temperature."""
        by_temperature = {}
        for group in self.h5.values():
            if not isinstance(group, h5py.Group):
                continue
            arrays = {k: group[k][()] for k in (*SAMPLE_DATASETS, *RESIDUE_DATASETS) if k in group}
            summary = dict(group.attrs)
            temperature_k = float(summary["temperature_k"])
            by_temperature[temperature_k] = TemperatureSamples(
                temperature_k=temperature_k, summary=summary,
                histograms={k: v[()] for k, v in group["histograms"].items()},
                ramachandran_png=group["ramachandran_png"][()].tobytes(), **arrays)
        return SamplesFile(dict(self.h5.attrs), attribute_text(self.h5["topology_pdb"][()]), by_temperature)

    def close(self) -> None:
        self.h5.close()

    def __enter__(self) -> "SamplesHDF5File":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def write_samples(path: str | Path, samples: list[TemperatureSamples], attrs: dict,
                  topology_pdb: str, overwrite: bool = False) -> Path:
    """Write a samples file: one group per temperature, the root ``attrs`` (model,
    provenance) and the topology."""
    with SamplesHDF5File.create(path, attrs, topology_pdb, overwrite) as file:
        for entry in samples:
            file.write(entry)
    return Path(path)


def read_samples(path: str | Path) -> SamplesFile:
    """Read a samples file written by :func:`write_samples`."""
    with SamplesHDF5File.open(path) as file:
        return file.read()

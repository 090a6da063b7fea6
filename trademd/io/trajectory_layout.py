"""Where the frames of each ensemble of a ``trade-md simulate`` file live, in both layouts
(docs/formats.md):

- version 2 (H5MD): ``particles/T<temperature>/position`` (``value`` positions, ``step`` frame
  index, ``time`` in ps), ``observables/T<temperature>/potential_energy`` and ``.../replica``
  (sharing that step and time), and ``parameters/T<temperature>`` (attribute
  ``temperature_k``, the per-save ``kinetic_temperature_k``);
- version 1: the datasets ``positions_nm``, ``energy_kj_mol``, ``replica``, ``time_ps`` and
  ``kinetic_temperature_k`` at the root of a trajectory file or in the ``T<temperature>``
  group of a replica-exchange file (still read, and continued by ``--resume`` in that layout).
"""

from dataclasses import dataclass

import h5py
import numpy as np

from trademd.errors import TradeMDError
from trademd.io.h5md import create_observable, create_particle_group, extendable_dataset
from trademd.io.schema import TRAJECTORY_FORMAT, file_version, group_name

__all__ = ["FRAME_COLUMNS", "OBSERVABLES", "EnsembleDatasets", "create_ensemble", "ensemble_datasets"]

#: Per-frame columns of an ensemble: name -> (dtype, unit in H5MD notation, description).
FRAME_COLUMNS = {
    "positions_nm": ("float32", "nm", "atom positions [frames, atoms, 3]"),
    "energy_kj_mol": ("float64", "kJ mol-1", "potential energy of each frame [frames]"),
    "replica": ("int32", "", "index of the replica (copy) that made each frame [frames]"),
    "time_ps": ("float64", "ps", "simulation time of each frame after equilibration [frames]"),
}
#: Version 2: the observable (``observables/T<temperature>/<name>``) of each scalar column.
OBSERVABLES = {"energy_kj_mol": "potential_energy", "replica": "replica"}


@dataclass
class EnsembleDatasets:
    """The datasets of one ensemble in an open simulate file, in either layout.

    Attributes:
        columns: each of :data:`FRAME_COLUMNS` -> its dataset [frames, ...].
        kinetic_temperature_k: the kinetic temperature at each save [saves] (K).
        step: version 2: the frame index of each frame [frames] (grows with the frames; the
            observables' ``step`` and ``time`` are links to it and to ``time_ps``); version
            1: None.
        attrs: the ensemble's attributes (``temperature_k``, K).
    """

    columns: dict[str, h5py.Dataset]
    kinetic_temperature_k: h5py.Dataset
    step: h5py.Dataset | None
    attrs: h5py.AttributeManager


def create_ensemble(h5: h5py.File, temperature_k: float, n_atoms: int) -> None:
    """The empty, extendable datasets of the ensemble at ``temperature_k`` (K) in a new
    version-2 file."""
    name = group_name(temperature_k)
    create_particle_group(h5, name, np.zeros((0, n_atoms, 3), np.float32), np.zeros(0, np.int64),
                          np.zeros(0, np.float64))
    h5[f"particles/{name}/position/value"].attrs["description"] = FRAME_COLUMNS["positions_nm"][2]
    for column, observable in OBSERVABLES.items():
        dtype, unit, description = FRAME_COLUMNS[column]
        create_observable(h5, name, observable, np.zeros(0, dtype), unit, description)
    parameters = h5["parameters"].create_group(name)
    parameters.attrs["temperature_k"] = float(temperature_k)
    kinetic = extendable_dataset(parameters, "kinetic_temperature_k", np.zeros(0, np.float64))
    kinetic.attrs["unit"] = "K"
    kinetic.attrs["description"] = "instantaneous kinetic temperature of the replicas [saves]"


def ensemble_datasets(h5: h5py.File, temperature_k: float, path) -> EnsembleDatasets:
    """The datasets of the ensemble at ``temperature_k`` (K, one the file holds) of an open
    simulate file of either layout; ``path`` names the file in messages."""
    try:
        if file_version(h5) == 1:
            return _version_1(h5, temperature_k)
        name = group_name(temperature_k)
        position = h5[f"particles/{name}/position"]
        columns = {"positions_nm": position["value"], "time_ps": position["time"]}
        columns.update({column: h5[f"observables/{name}/{observable}/value"]
                        for column, observable in OBSERVABLES.items()})
        parameters = h5[f"parameters/{name}"]
        return EnsembleDatasets(columns, parameters["kinetic_temperature_k"], position["step"],
                                parameters.attrs)
    except KeyError as missing:
        raise TradeMDError(f"{str(path)!r} lacks the datasets of its {temperature_k:g} K ensemble "
                           f"({missing}): the file is damaged") from None


def _version_1(h5: h5py.File, temperature_k: float) -> EnsembleDatasets:
    group = h5 if h5.attrs["format"] == TRAJECTORY_FORMAT else h5[group_name(temperature_k, version=1)]
    return EnsembleDatasets({name: group[name] for name in FRAME_COLUMNS},
                            group["kinetic_temperature_k"], None, group.attrs)

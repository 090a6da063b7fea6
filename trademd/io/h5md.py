"""H5MD 1.1 structures (https://www.nongnu.org/h5md/h5md.html) as trade-md writes them: the
``h5md`` metadata group, one particle group per temperature with an open box and a
time-dependent ``position``, and time-dependent observables that share their particle
group's ``step`` and ``time`` datasets (hard links, as the specification allows for elements
sampled at equal times).

Strings the specification wants fixed-length (author, creator, box boundary) are written so;
``unit`` attributes are variable-length strings, the kind MDAnalysis writes and reads (it
does not recognise fixed-length ones). Units follow the notation of H5MD's ``units`` module
(``nm``, ``ps``, ``kJ mol-1``).
"""

import os

import h5py
import numpy as np

__all__ = [
    "H5MD_VERSION",
    "UNITS_MODULE_VERSION",
    "AUTHOR_VARIABLE",
    "DEFAULT_AUTHOR",
    "fixed_string",
    "write_h5md_metadata",
    "ordered_group",
    "extendable_dataset",
    "create_particle_group",
    "create_observable",
]

#: The H5MD version the files conform to (major, minor).
H5MD_VERSION = (1, 1)
#: The version of H5MD's units module the ``unit`` attributes follow.
UNITS_MODULE_VERSION = (1, 0)
#: The environment variable whose value becomes ``h5md/author/name``.
AUTHOR_VARIABLE = "TRADEMD_AUTHOR"
#: ``h5md/author/name`` where that variable is unset (trade-md never reads the login name).
DEFAULT_AUTHOR = "trade-md user"
#: Rows per chunk of the extendable datasets (first axis).
_CHUNK_ROWS = 256


def fixed_string(text: str) -> np.bytes_:
    """``text`` as a fixed-length ASCII string (H5MD's type of author, creator, boundary)."""
    return np.bytes_(text.encode("ascii", errors="replace"))


def write_h5md_metadata(h5: h5py.File, creator_version: str) -> None:
    """The ``h5md`` group: version, author (``$TRADEMD_AUTHOR`` or ``trade-md user``),
    creator (trade-md and ``creator_version``) and the ``units`` module (SI notation)."""
    group = h5.create_group("h5md")
    group.attrs["version"] = np.array(H5MD_VERSION, dtype=np.int32)
    author = group.create_group("author")
    author.attrs["name"] = fixed_string(os.environ.get(AUTHOR_VARIABLE) or DEFAULT_AUTHOR)
    creator = group.create_group("creator")
    creator.attrs["name"] = fixed_string("trade-md")
    creator.attrs["version"] = fixed_string(creator_version)
    units = group.create_group("modules/units")
    units.attrs["version"] = np.array(UNITS_MODULE_VERSION, dtype=np.int32)
    units.attrs["system"] = fixed_string("SI")


def ordered_group(parent: h5py.Group, name: str) -> h5py.Group:
    """``parent[name]``, created if absent with its members listed in creation order (so that
    readers that take the first particle group, like MDAnalysis, get the first temperature
    written, not the first by name: ``T300`` before ``T1000``)."""
    return parent[name] if name in parent else parent.create_group(name, track_order=True)


def extendable_dataset(group: h5py.Group, name: str, data: np.ndarray,
                       compression: str | None = None) -> h5py.Dataset:
    """A dataset holding ``data`` [rows, ...] whose first axis can grow (H5MD's
    ``[variable]`` dimension): chunked, ``maxshape`` None along it."""
    data = np.asarray(data)
    return group.create_dataset(name, data=data, maxshape=(None, *data.shape[1:]),
                                chunks=(_CHUNK_ROWS, *data.shape[1:]), compression=compression)


def create_particle_group(h5: h5py.File, name: str, positions_nm: np.ndarray, step: np.ndarray,
                          time: np.ndarray, compression: str | None = None) -> h5py.Group:
    """``particles/<name>``: a box of 3 open dimensions (no periodic boundary) and the
    time-dependent ``position``.

    Args:
        positions_nm: float32 [frames, atoms, 3] (nm); zero frames for a file still to be
            filled.
        step: int64 [frames], increasing.
        time: float64 [frames] (ps), non-decreasing.

    Returns:
        The ``position`` group (``value``, ``step``, ``time``).
    """
    group = ordered_group(h5, "particles").create_group(name)
    box = group.create_group("box")
    box.attrs["dimension"] = np.int32(3)
    box.attrs["boundary"] = np.array([fixed_string("none")] * 3)
    position = group.create_group("position")
    extendable_dataset(position, "value", np.asarray(positions_nm, dtype=np.float32),
                       compression).attrs["unit"] = "nm"
    extendable_dataset(position, "step", np.asarray(step, dtype=np.int64))
    extendable_dataset(position, "time", np.asarray(time, dtype=np.float64)).attrs["unit"] = "ps"
    return position


def create_observable(h5: h5py.File, group_name: str, name: str, values: np.ndarray,
                      unit: str = "", description: str = "") -> h5py.Dataset:
    """``observables/<group_name>/<name>``: ``value`` = ``values`` [frames, ...], and ``step``
    and ``time`` hard links to those of ``particles/<group_name>/position`` (so they grow
    with it).

    Returns:
        The ``value`` dataset.
    """
    position = h5[f"particles/{group_name}/position"]
    element = ordered_group(ordered_group(h5, "observables"), group_name).create_group(name)
    value = extendable_dataset(element, "value", values)
    if unit:
        value.attrs["unit"] = unit
    if description:
        value.attrs["description"] = description
    element["step"] = position["step"]
    element["time"] = position["time"]
    return value

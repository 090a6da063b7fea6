"""The structural rules of H5MD 1.1 (https://www.nongnu.org/h5md/h5md.html) that a file can be
checked against: the ``h5md`` metadata, a box in every particle group, and time-dependent
elements whose ``value``, ``step`` and ``time`` agree. :func:`h5md_problems` lists what a file
breaks; ``trade-md info`` prints it, and the tests hold every file trade-md writes to it.

Checked (parts of the specification trade-md does not write, such as connectivity, are not):

- ``h5md``: attribute ``version`` = two integers with major version 1; ``author`` with a
  string ``name``; ``creator`` with string ``name`` and ``version``; every module in
  ``h5md/modules`` with a ``version`` of two integers, the ``units`` module with a ``system``.
- ``particles/<group>``: a ``box`` group with integer ``dimension`` and ``boundary`` (that many
  strings, each ``periodic`` or ``none``; ``edges`` required where one is periodic);
  ``position``, ``velocity``, ``force`` and ``image`` values of shape [frames, particles,
  dimension].
- every time-dependent element (a group with ``value``) in ``particles`` and (at any depth)
  ``observables``: ``value`` extendable along its first axis; ``step`` either an integer
  array with one entry per row of ``value``, non-decreasing, or an integer scalar (fixed
  increments); ``time``, where present, the same with a real or integer type.
- ``unit`` attributes, where present, are strings.
"""

import h5py
import numpy as np

__all__ = ["h5md_problems"]

#: Elements of a particle group whose value holds a vector per particle.
_VECTOR_ELEMENTS = ("position", "velocity", "force", "image")


def h5md_problems(h5: h5py.File) -> list[str]:
    """Every H5MD 1.1 rule of the module docstring that ``h5md`` breaks, one line each
    (empty: none)."""
    problems = _metadata_problems(h5)
    if "particles" in h5:
        for name, group in h5["particles"].items():
            problems += _particle_group_problems(f"particles/{name}", group)
    if "observables" in h5:
        problems += _observable_problems("observables", h5["observables"])
    return problems


def _is_string(value) -> bool:
    return isinstance(value, (str, bytes, np.bytes_, np.str_))


def _is_version(value) -> bool:
    array = np.asarray(value)
    return array.shape == (2,) and np.issubdtype(array.dtype, np.integer)


def _metadata_problems(h5: h5py.File) -> list[str]:
    if not isinstance(h5.get("h5md"), h5py.Group):
        return ["no h5md group"]
    group = h5["h5md"]
    problems = []
    version = group.attrs.get("version")
    if version is None or not _is_version(version) or int(np.asarray(version)[0]) != 1:
        problems.append(f"h5md/version is {version!r}, not two integers of major version 1")
    for subgroup, keys in (("author", ("name",)), ("creator", ("name", "version"))):
        if subgroup not in group:
            problems.append(f"no h5md/{subgroup} group")
            continue
        problems += [f"h5md/{subgroup} lacks the string attribute {key!r}" for key in keys
                     if not _is_string(group[subgroup].attrs.get(key))]
    for name, module in group.get("modules", {}).items():
        if not _is_version(module.attrs.get("version")):
            problems.append(f"h5md/modules/{name} has no version of two integers")
        if name == "units" and not _is_string(module.attrs.get("system")):
            problems.append("h5md/modules/units lacks the string attribute 'system'")
    return problems


def _particle_group_problems(path: str, group: h5py.Group) -> list[str]:
    if not isinstance(group.get("box"), h5py.Group):
        return [f"{path} has no box group"]
    box = group["box"]
    dimension = box.attrs.get("dimension")
    boundary = box.attrs.get("boundary")
    if dimension is None or not np.issubdtype(np.asarray(dimension).dtype, np.integer) or np.ndim(dimension):
        return [f"{path}/box lacks the integer attribute 'dimension'"]
    dimension = int(dimension)
    boundary = [] if boundary is None else [b.decode() if isinstance(b, bytes) else str(b)
                                            for b in np.atleast_1d(boundary)]
    problems = []
    if len(boundary) != dimension or not set(boundary) <= {"periodic", "none"}:
        problems.append(f"{path}/box/boundary is {boundary}, not {dimension} of 'periodic'/'none'")
    if "periodic" in boundary and "edges" not in box:
        problems.append(f"{path}/box is periodic but has no edges")
    for name, element in group.items():
        if name == "box" or not isinstance(element, h5py.Group):
            continue
        element_path = f"{path}/{name}"
        problems += _time_series_problems(element_path, element)
        value = element.get("value")
        if name in _VECTOR_ELEMENTS and isinstance(value, h5py.Dataset) and (
                value.ndim != 3 or value.shape[2] != dimension):
            problems.append(f"{element_path}/value has shape {value.shape}, not "
                            f"[frames, particles, {dimension}]")
    return problems


def _observable_problems(path: str, group: h5py.Group) -> list[str]:
    """Observables: time-independent datasets, time-dependent elements, or subgroups of them."""
    problems = []
    for name, item in group.items():
        if isinstance(item, h5py.Dataset):
            problems += _unit_problems(f"{path}/{name}", item)
        elif "value" in item:
            problems += _time_series_problems(f"{path}/{name}", item)
        else:
            problems += _observable_problems(f"{path}/{name}", item)
    return problems


def _unit_problems(path: str, dataset: h5py.Dataset) -> list[str]:
    unit = dataset.attrs.get("unit")
    return [] if unit is None or _is_string(unit) else [f"{path} has a unit that is not a string"]


def _time_series_problems(path: str, element: h5py.Group) -> list[str]:
    """A time-dependent element: ``value`` extendable, ``step`` (and ``time``) explicit with
    one entry per row, or fixed increments."""
    value = element.get("value")
    if not isinstance(value, h5py.Dataset) or value.ndim < 1:
        return [f"{path} has no value dataset with a frame axis"]
    problems = _unit_problems(f"{path}/value", value)
    if value.maxshape[0] is not None:
        problems.append(f"{path}/value cannot grow along its first axis (maxshape {value.maxshape})")
    for name, required, kinds in (("step", True, "iu"), ("time", False, "iuf")):
        dataset = element.get(name)
        if dataset is None:
            problems += [f"{path} has no step dataset"] if required else []
            continue
        if not isinstance(dataset, h5py.Dataset) or dataset.dtype.kind not in kinds:
            problems.append(f"{path}/{name} is not a dataset of kind {kinds!r}")
            continue
        problems += _unit_problems(f"{path}/{name}", dataset)
        if dataset.ndim == 0:  # fixed increments (offset as an attribute)
            continue
        if dataset.shape != (value.shape[0],):
            problems.append(f"{path}/{name} has shape {dataset.shape}, value has {value.shape[0]} rows")
        elif np.any(np.diff(dataset[()]) < 0):
            problems.append(f"{path}/{name} decreases")
    return problems

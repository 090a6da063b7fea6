"""What every trade-md HDF5 file shares (documented in ``docs/formats.md``): the root
attributes ``format`` and ``format_version``, the checks that open a file of an expected
format and layout, where a file's own metadata lives in each layout, group names of
temperatures, attributes as JSON text, and a readable summary of any file.

Two layouts are read: version 2, written today, is H5MD 1.1 (:mod:`trademd.io.h5md`): the
frames in ``particles`` and ``observables``, everything else of trade-md's in ``parameters``;
version 1, trade-md's own layout before it, keeps that at the root.

The formats themselves each have one module and one class that owns the open file:
:mod:`trademd.io.trajectory_file` (``trade-md simulate``) and :mod:`trademd.io.samples_file`
(``trade-md sample``).
"""

import json
from pathlib import Path

import h5py
import numpy as np

from trademd import __version__
from trademd.errors import TradeMDError
from trademd.io.h5md import ordered_group, write_h5md_metadata
from trademd.io.h5md_rules import h5md_problems

__all__ = [
    "TRAJECTORY_FORMAT",
    "REPLICA_EXCHANGE_FORMAT",
    "SAMPLES_FORMAT",
    "FORMAT_VERSION",
    "READ_VERSIONS",
    "SCHEMA_ATTRS",
    "open_hdf5",
    "file_format",
    "open_checked",
    "create_file",
    "file_version",
    "metadata_group",
    "file_attrs",
    "write_attrs",
    "group_name",
    "attribute_text",
    "describe",
]

TRAJECTORY_FORMAT = "trade-md/trajectory"
REPLICA_EXCHANGE_FORMAT = "trade-md/replica-exchange"
SAMPLES_FORMAT = "trade-md/samples"
#: The layout written: H5MD 1.1.
FORMAT_VERSION = 2
#: The layouts read: 1 (trade-md's own, before H5MD) and 2.
READ_VERSIONS = (1, 2)
#: Attributes the file layer writes itself (a copied file's attributes leave them out).
SCHEMA_ATTRS = ("format", "format_version", "units")
#: What each layout must hold besides its datasets of frames.
_LAYOUT_GROUPS = {1: ("topology_pdb",), 2: ("h5md", "parameters", "parameters/topology_pdb")}


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
    ``expected_format`` (one format or a tuple of accepted ones) in a layout this trade-md
    reads (:data:`READ_VERSIONS`)."""
    accepted = (expected_format,) if isinstance(expected_format, str) else tuple(expected_format)
    maker = "sample" if accepted == (SAMPLES_FORMAT,) else "simulate"
    h5 = open_hdf5(path)
    found = h5.attrs.get("format")
    if found not in accepted:
        if found:
            what = f"a {found!r} file"
        elif "h5md" in h5:
            what = "an H5MD file trade-md did not write (no 'format' attribute)"
        else:
            what = "not a trade-md file (no 'format' attribute)"
        h5.close()
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
    missing = [name for name in _LAYOUT_GROUPS.get(version, ()) if name not in h5]
    if version not in READ_VERSIONS or missing:
        h5.close()
        problem = f"lacks {', '.join(missing)}" if missing else "is no version trade-md wrote"
        raise TradeMDError(
            f"{str(path)!r} is in neither trade-md layout (format version {version} {problem}): "
            f"the file is damaged or was edited; write it again with `trade-md {maker}`"
        )
    if mode != "r":
        h5.close()
        h5 = h5py.File(path, mode)
    return h5


def file_version(h5: h5py.File) -> int:
    """The layout of an open trade-md file: 1 or 2 (:data:`READ_VERSIONS`)."""
    return int(h5.attrs["format_version"])


def metadata_group(h5: h5py.File) -> h5py.Group:
    """Where a file keeps its attributes, topology, checkpoint and other data that is not
    per frame: ``parameters`` (version 2), the root (version 1)."""
    return h5 if file_version(h5) == 1 else h5["parameters"]


def file_attrs(h5: h5py.File) -> dict:
    """All attributes of a file: the root's and (version 2) those of ``parameters``."""
    return {**h5.attrs, **metadata_group(h5).attrs}


def write_attrs(node: h5py.Group, attrs: dict) -> None:
    """Store attributes; lists and dicts as JSON text."""
    for key, value in attrs.items():
        node.attrs[key] = json.dumps(value) if isinstance(value, (list, tuple, dict)) else value


def create_file(path: Path, file_format: str, attrs: dict, units: dict[str, str],
                topology_pdb: str) -> h5py.File:
    """A new trade-md file at ``path`` (replacing any) in the layout of
    :data:`FORMAT_VERSION`, open for writing: ``format`` and ``format_version`` at the root,
    the ``h5md`` metadata, and in ``parameters`` the ``attrs``, the ``units`` of its
    quantities (name -> unit, as JSON) and the ``topology_pdb`` dataset."""
    h5 = h5py.File(path, "w", track_order=True)
    h5.attrs["format"] = file_format
    h5.attrs["format_version"] = FORMAT_VERSION
    write_h5md_metadata(h5, __version__)
    parameters = ordered_group(h5, "parameters")
    write_attrs(parameters, {k: v for k, v in attrs.items() if k not in SCHEMA_ATTRS})
    parameters.attrs["units"] = json.dumps(units)
    parameters.create_dataset("topology_pdb", data=topology_pdb)
    return h5


def group_name(temperature_k: float, version: int = FORMAT_VERSION) -> str:
    """The group of one temperature (K): ``T`` and the shortest decimal that reads back as
    the same float, without exponent or trailing ``.0`` (``T300``, ``T300.5``,
    ``T312.123456``); version 1 files used ``T{temperature_k:g}`` (6 significant digits)."""
    if version == 1:
        return f"T{temperature_k:g}"
    return "T" + np.format_float_positional(float(temperature_k), trim="-")


def attribute_text(value) -> str:
    """An attribute or string dataset as text (HDF5 may hand back bytes, or arrays of them)."""
    if isinstance(value, np.ndarray) and value.dtype.kind == "S":
        return json.dumps([v.decode() for v in value.tolist()])
    return value.decode() if isinstance(value, bytes) else str(value)


def describe(path: str | Path) -> str:
    """A human-readable summary of any trade-md HDF5 file: format, attributes, datasets and,
    for an H5MD file, whether it keeps the H5MD rules (:mod:`trademd.io.h5md_rules`)."""
    h5 = open_hdf5(path)
    lines = [f"{path}"]
    with h5:
        fmt = h5.attrs.get("format", "(not a trade-md file)")
        lines.append(f"  format: {fmt} (version {h5.attrs.get('format_version', '?')})")
        parameters = h5.get("parameters")
        attrs = {**h5.attrs, **(parameters.attrs if isinstance(parameters, h5py.Group) else {})}
        for key in sorted(attrs):
            if key not in ("format", "format_version"):
                lines.append(f"  {key}: {attribute_text(attrs[key])}")
        if "h5md" in h5:
            problems = h5md_problems(h5)
            lines.append("  H5MD 1.1: " + ("follows the rules" if not problems else "; ".join(problems))
                         + " (observables share the step and time of their particle group)")

        lines += _tree_lines(h5)
    return "\n".join(lines)


def _tree_lines(group: h5py.Group) -> list[str]:
    """One line per group with attributes and per dataset under ``group``, by path (each
    hard link of a dataset too), leaving out the attributes of ``parameters`` (listed with
    the root's) and the step and time links of observables."""
    lines = []
    for name, item in group.items():
        path = f"{group.name.rstrip('/')}/{name}"
        if isinstance(item, h5py.Dataset):
            if not (path.startswith("/observables/") and name in ("step", "time")):
                unit = item.attrs.get("unit", "")
                lines.append(f"  {path}: {item.dtype} {item.shape}" + (f" [{unit}]" if unit else ""))
            continue
        if item.attrs and path != "/parameters":
            attrs = ", ".join(f"{k}={attribute_text(v)}" for k, v in sorted(item.attrs.items())
                              if len(attribute_text(v)) < 200)
            lines.append(f"  {path}/ ({attrs})")
        lines += _tree_lines(item)
    return lines

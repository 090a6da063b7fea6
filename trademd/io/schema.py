"""What every trade-md HDF5 file shares (documented in ``docs/formats.md``): the ``format``
and ``format_version`` attributes, the checks that open a file of an expected format, group
names of temperatures, attributes as JSON text, and a readable summary of any file.

The formats themselves each have one module and one class that owns the open file:
:mod:`trademd.io.trajectory_file` (``trade-md simulate``) and :mod:`trademd.io.samples_file`
(``trade-md sample``).
"""

import json
from pathlib import Path

import h5py

from trademd.errors import TradeMDError

__all__ = [
    "TRAJECTORY_FORMAT",
    "REPLICA_EXCHANGE_FORMAT",
    "SAMPLES_FORMAT",
    "FORMAT_VERSION",
    "open_hdf5",
    "file_format",
    "open_checked",
    "create_file",
    "write_attrs",
    "group_name",
    "attribute_text",
    "describe",
]

TRAJECTORY_FORMAT = "trade-md/trajectory"
REPLICA_EXCHANGE_FORMAT = "trade-md/replica-exchange"
SAMPLES_FORMAT = "trade-md/samples"
FORMAT_VERSION = 1


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


def write_attrs(node: h5py.Group, attrs: dict) -> None:
    """Store attributes; lists and dicts as JSON text."""
    for key, value in attrs.items():
        node.attrs[key] = json.dumps(value) if isinstance(value, (list, tuple, dict)) else value


def create_file(path: Path, file_format: str, attrs: dict, units: dict[str, str],
                topology_pdb: str) -> h5py.File:
    """A new trade-md file at ``path`` (replacing any), open for writing: ``format``,
    ``format_version``, ``attrs``, the ``units`` of its quantities (name -> unit, as JSON) and
    the ``topology_pdb`` dataset."""
    h5 = h5py.File(path, "w")
    h5.attrs["format"] = file_format
    h5.attrs["format_version"] = FORMAT_VERSION
    write_attrs(h5, attrs)
    h5.attrs["units"] = json.dumps(units)
    h5.create_dataset("topology_pdb", data=topology_pdb)
    return h5


def group_name(temperature_k: float) -> str:
    """HDF5 group of one temperature, e.g. ``T300`` or ``T312.5``."""
    return f"T{temperature_k:g}"


def attribute_text(value) -> str:
    """An attribute or string dataset as text (HDF5 may hand back bytes)."""
    return value.decode() if isinstance(value, bytes) else str(value)


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

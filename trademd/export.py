"""Writing trade-md trajectories as standard trajectory files through mdtraj."""

from pathlib import Path

from .errors import TradeMDError
from .h5io import read_trajectory

__all__ = ["EXPORT_FORMATS", "export_trajectory"]

EXPORT_FORMATS = ("dcd", "xtc", "pdb")


def export_trajectory(path: str | Path, fmt: str, out: str | Path | None = None) -> Path:
    """Write the frames of trajectory file ``path`` as ``fmt`` (dcd, xtc or pdb).

    For dcd and xtc a ``<out>.pdb`` with the first frame is written too, as the topology
    other programs need. Returns the path written (default: ``path`` with the new suffix).
    """
    if fmt not in EXPORT_FORMATS:
        raise TradeMDError(f"unknown export format {fmt!r}: choose one of {list(EXPORT_FORMATS)}")
    trajectory = read_trajectory(path).to_mdtraj()
    out = Path(out) if out is not None else Path(path).with_suffix(f".{fmt}")
    out.parent.mkdir(parents=True, exist_ok=True)
    trajectory.save(str(out), force_overwrite=True)
    if fmt != "pdb":
        trajectory[0].save_pdb(str(out.with_suffix(".pdb")))
    return out

"""Reading any trajectory mdtraj loads (DCD, XTC, TRR, PDB, AMBER NetCDF, ...) as one
trajectory at a temperature the user names: such files record neither the temperature nor
the energies, which are recomputed downstream for the system the frames are compared with."""

from pathlib import Path

import numpy as np

from trademd.errors import TradeMDError
from trademd.io.trajectory_file import Trajectory

__all__ = ["MDTRAJ_FORMAT", "mdtraj_suffixes", "read_mdtraj_reference"]

#: The ``format`` attribute of the trajectories read here.
MDTRAJ_FORMAT = "mdtraj"

#: Suffixes of files that hold their own topology (mdtraj loads them without ``top``).
_WITH_TOPOLOGY = (".pdb", ".pdb.gz", ".pdbx", ".pdbx.gz", ".cif", ".cif.gz", ".mmcif", ".mmcif.gz", ".gro")


def mdtraj_suffixes() -> list[str]:
    """File suffixes mdtraj loads (``.dcd``, ``.xtc``, ``.pdb``, ``.pdb.gz``, ...)."""
    from mdtraj.formats.registry import FormatRegistry

    return sorted(FormatRegistry.loaders)


def read_mdtraj_reference(path: str | Path, topology_path: str | Path | None,
                          temperature_k: float) -> Trajectory:
    """The frames of a trajectory file mdtraj loads, as a :class:`Trajectory` at ``temperature_k``.

    Args:
        path: the trajectory.
        topology_path: a PDB (or any topology mdtraj reads) of the same atoms in the same order;
            None only for files that hold their own (PDB, PDBx/mmCIF, GRO).
        temperature_k: the temperature (K) the frames were simulated at.

    Returns:
        positions [frames, atoms, 3] (nm, float32), ``energy_kj_mol`` NaN [frames] (the file has
        none: recompute them), ``replica`` 0, ``time_ps`` the file's times (frame numbers where
        they do not increase), ``topology_pdb`` empty, and the atoms' element symbols in
        ``attrs["elements"]`` (to check against the system compared with).
    """
    import mdtraj

    path = Path(path)
    if not path.is_file():
        raise TradeMDError(f"file {str(path)!r} not found: check the path")
    name = path.name.lower()
    if topology_path is None and not name.endswith(_WITH_TOPOLOGY):
        raise TradeMDError(f"{str(path)!r} holds no topology: give the atoms with --topology PDB")
    if topology_path is not None and not Path(topology_path).is_file():
        raise TradeMDError(f"topology file {str(topology_path)!r} not found: check the path given to --topology")
    try:
        frames = mdtraj.load(str(path), top=None if topology_path is None else str(topology_path))
    except Exception as error:  # mdtraj raises anything from IOError to ValueError on a bad file
        raise TradeMDError(f"mdtraj cannot read {str(path)!r}: {str(error).strip() or type(error).__name__}; "
                           "check the file and that --topology has its atoms") from None
    n = frames.n_frames
    if n == 0:
        raise TradeMDError(f"{str(path)!r} holds no frames: give a trajectory with frames")
    time_ps = np.asarray(frames.time, dtype=np.float64)
    if len(time_ps) != n or (n > 1 and not np.all(np.diff(time_ps) > 0)):
        time_ps = np.arange(n, dtype=np.float64)
    elements = [atom.element.symbol if atom.element is not None else "" for atom in frames.topology.atoms]
    return Trajectory(
        positions_nm=np.asarray(frames.xyz, dtype=np.float32),
        energy_kj_mol=np.full(n, np.nan),
        replica=np.zeros(n, dtype=np.int32),
        time_ps=time_ps,
        temperature_k=float(temperature_k),
        topology_pdb="",
        attrs={"format": MDTRAJ_FORMAT, "elements": elements},
    )

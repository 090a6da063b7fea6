"""What made a file: software versions, the command line, the time."""

from datetime import datetime, timezone
import platform
import shlex
import sys

__all__ = ["provenance", "command_line"]


def command_line() -> str:
    """The command line of this process, shell-quoted."""
    return " ".join(shlex.quote(arg) for arg in sys.argv)


def provenance(command: str | None = None) -> dict[str, str]:
    """Attributes every trade-md output file carries (all strings)."""
    import h5py
    import numpy
    import openmm

    from trademd import __version__

    versions = {
        "trademd_version": __version__,
        "openmm_version": openmm.__version__,
        "numpy_version": numpy.__version__,
        "h5py_version": h5py.__version__,
        "python_version": platform.python_version(),
    }
    try:
        import torch

        versions["torch_version"] = str(torch.__version__)
    except ImportError:  # torch is a dependency, but provenance must not fail without it
        versions["torch_version"] = "absent"
    versions["command"] = command if command is not None else command_line()
    versions["created"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    return versions

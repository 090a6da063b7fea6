"""The import graph reads one way: the kernels (io, md, energy, flow, training, analysis) never
import a stage module, HDF5 files are opened only by the file layer, and the CLI imports only
stage modules and the file layer's reader of file summaries."""

import ast
from pathlib import Path

import trademd

PACKAGE = Path(trademd.__file__).resolve().parent
STAGES = {"simulate", "train", "sample", "evaluate", "pipeline", "recompute"}
KERNELS = ("io", "md", "energy", "flow", "training", "analysis")


def _imports(path: Path) -> set[str]:
    """Every module a file imports (absolute names)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return names


def _kernel_files() -> list[Path]:
    return [f for kernel in KERNELS for f in sorted((PACKAGE / kernel).glob("*.py"))]


def test_kernels_import_no_stage_module():
    stage_modules = {f"trademd.{stage}" for stage in STAGES}
    offenders = {f.relative_to(PACKAGE).as_posix(): sorted(_imports(f) & stage_modules)
                 for f in _kernel_files()}
    assert {k: v for k, v in offenders.items() if v} == {}
    assert len(offenders) >= 20  # the files were found


def test_only_the_file_layer_opens_hdf5_files():
    outside = [f.relative_to(PACKAGE).as_posix() for f in PACKAGE.rglob("*.py")
               if "h5py" in _imports(f) and f.parent.name != "io"]
    assert outside == []


def test_the_cli_calls_stage_modules():
    from trademd import cli

    allowed = {f"trademd.{stage}" for stage in STAGES} | {
        "trademd.errors", "trademd.units", "trademd.systems", "trademd.io.schema", "trademd.io.export"}
    used = {name for name in _imports(Path(cli.__file__).parent / "app.py") if name.startswith("trademd")}
    assert used - allowed == set()
    assert {"trademd.simulate", "trademd.train", "trademd.sample"} <= used

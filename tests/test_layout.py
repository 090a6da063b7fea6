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
        "trademd.errors", "trademd.units", "trademd.systems", "trademd.io.h5io", "trademd.io.export",
        "trademd.md.settings", "trademd.training.config"}  # the typed homes of the defaults
    used = {name for name in _imports(Path(cli.__file__).parent / "app.py") if name.startswith("trademd")}
    assert used - allowed == set()
    assert {"trademd.simulate", "trademd.train", "trademd.sample"} <= used


def test_the_trainer_names_no_objective():
    """The loop runs any objective: trainer.py names none (no objective's name, class or
    module), so that a new objective is a new module under training/objectives/ only."""
    import re

    from trademd.training.objectives import OBJECTIVES

    path = PACKAGE / "training" / "trainer.py"
    source = path.read_text()
    names = [*OBJECTIVES, *(kind.__name__ for kind in OBJECTIVES.values())]
    named = [name for name in names if re.search(rf"(?<![\w-]){re.escape(name)}(?![\w-])", source)]
    assert named == []
    modules = {f"trademd.training.objectives.{f.stem}" for f in (PACKAGE / "training" / "objectives").glob("*.py")}
    assert sorted(_imports(path) & modules) == []
    assert len(OBJECTIVES) >= 6 and len(modules) >= 7  # the objectives were found

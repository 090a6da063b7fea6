"""The import graph reads one way: no module of trademd imports itself back through others
(function-level imports included), the kernels (io, md, energy, flow, training, analysis)
never import a stage module, energy/ never imports md/, HDF5 files are opened only by the
file layer's format modules, and the CLI imports only stage modules and the file layer's
reader of file summaries."""

import ast
from pathlib import Path

#: The checkout these tests belong to: its source tree is what they read (an installed
#: package puts systems/ and cli/ inside trademd/, an editable one leaves them beside it).
REPOSITORY = Path(__file__).resolve().parent.parent
PACKAGE = REPOSITORY / "trademd"
STAGES = {"simulate", "train", "sample", "evaluate", "pipeline", "recompute"}
KERNELS = ("io", "md", "energy", "flow", "training", "analysis")
#: The modules of the file layer that touch HDF5 files (provenance only reads h5py's version).
HDF5_MODULES = {"trademd.io.schema", "trademd.io.trajectory_file", "trademd.io.samples_file",
                "trademd.io.trajectory_layout", "trademd.io.h5md", "trademd.io.h5md_rules",
                "trademd.io.provenance"}


#: Where each package of trademd lives (setup.cfg's package_dir: systems/ and cli/ sit
#: beside trademd/).
ROOTS = {"trademd": PACKAGE, "trademd.systems": REPOSITORY / "systems",
         "trademd.cli": REPOSITORY / "cli"}


def _module_name(path: Path) -> str:
    root, folder = max(((r, f) for r, f in ROOTS.items() if path.is_relative_to(f)),
                       key=lambda item: len(item[1].parts))
    parts = (*root.split("."), *path.relative_to(folder).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(f): f for folder in ROOTS.values() for f in sorted(folder.rglob("*.py"))}


def _imports(path: Path) -> set[str]:
    """Every module a file imports, anywhere in it (absolute names; ``from a import b``
    gives ``a.b`` where b is a module of trademd, else ``a``)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            for alias in node.names:
                submodule = f"{node.module}.{alias.name}"
                names.add(submodule if submodule in MODULES else node.module)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return names


def _graph() -> dict[str, set[str]]:
    """module -> the modules of trademd it imports (itself and its own package left out)."""
    return {name: {m for m in _imports(path) if m in MODULES and m != name and not name.startswith(m + ".")}
            for name, path in MODULES.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index, low, stack, on_stack, components = {}, {}, [], set(), []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph[node]):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return components


def _kernel_files() -> list[Path]:
    return [f for kernel in KERNELS for f in sorted((PACKAGE / kernel).glob("*.py"))]


def test_the_import_graph_has_no_cycle():
    graph = _graph()
    assert len(graph) >= 50 and graph["trademd.simulate"]  # the modules and their arrows were found
    assert _cycles(graph) == []


def test_the_cycle_check_can_fail():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_function_level_imports_are_arrows_too():
    graph = _graph()
    assert "trademd.systems" in graph["trademd.simulate"]  # imported inside simulate()
    assert "trademd.train" in graph["trademd.pipeline"]  # imported inside run_pipeline()


def test_kernels_import_no_stage_module():
    stage_modules = {f"trademd.{stage}" for stage in STAGES}
    graph = _graph()
    offenders = {f.relative_to(PACKAGE).as_posix(): sorted(graph[_module_name(f)] & stage_modules)
                 for f in _kernel_files()}
    assert {k: v for k, v in offenders.items() if v} == {}
    assert len(offenders) >= 20  # the files were found


def test_energy_never_imports_md():
    offenders = {name: sorted(m for m in targets if m.startswith("trademd.md"))
                 for name, targets in _graph().items() if name.startswith("trademd.energy.")}
    assert {k: v for k, v in offenders.items() if v} == {}
    assert len(offenders) >= 5


def test_flow_imports_no_stage_and_no_other_kernel():
    """The flows sit below training and sampling: they import only flow/, systems/ (the
    Z-matrix check of the coordinates) and the leaf modules."""
    allowed_prefixes = ("trademd.flow", "trademd.systems", "trademd.errors", "trademd.units")
    offenders = {name: sorted(m for m in targets if not m.startswith(allowed_prefixes))
                 for name, targets in _graph().items() if name.startswith("trademd.flow.")}
    assert {k: v for k, v in offenders.items() if v} == {}
    assert len(offenders) >= 6


def test_only_the_file_layer_opens_hdf5_files():
    outside = sorted(name for name, path in MODULES.items()
                     if "h5py" in _imports(path) and name not in HDF5_MODULES)
    assert "trademd.systems.registry" in MODULES and "trademd.cli.app" in MODULES
    assert outside == []


def test_the_cli_calls_stage_modules():
    allowed = {f"trademd.{stage}" for stage in STAGES} | {
        "trademd.errors", "trademd.units", "trademd.systems", "trademd.io.schema", "trademd.io.export",
        "trademd.md.settings", "trademd.training.config"}  # the typed homes of the defaults
    used = {name for name in _imports(MODULES["trademd.cli.app"]) if name.startswith("trademd")}
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


def test_setup_cfg_installs_every_package():
    """A subpackage missing from setup.cfg's explicit ``packages`` works in an editable install
    and is absent from a real one (``pip install .``, what CI and users run)."""
    import configparser

    setup = configparser.ConfigParser()
    setup.read(REPOSITORY / "setup.cfg")
    listed = set(setup["options"]["packages"].split())
    found = {".".join(("trademd", *init.parent.relative_to(PACKAGE).parts)).rstrip(".")
             for init in PACKAGE.rglob("__init__.py")}
    assert "trademd.training.objectives" in found
    assert found - listed == set()

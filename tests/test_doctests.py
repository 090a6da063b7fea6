"""The examples in the docstrings run and print what they show.

Run here, on the installed package, rather than with ``pytest --doctest-modules``: that would
import the source folder ``trademd/``, which lacks ``trademd.cli`` and ``trademd.systems``
(they are installed from ``cli/`` and ``systems/``).
"""

import doctest
import importlib
import pkgutil
from pathlib import Path

import pytest

import trademd
import trademd.cli
import trademd.systems


def _modules() -> list[str]:
    """Every module of the installed package, the packages themselves included."""
    names = set()
    for package in (trademd, trademd.cli, trademd.systems):
        names.add(package.__name__)
        names |= {m.name for m in pkgutil.walk_packages(package.__path__, package.__name__ + ".")}
    return sorted(names)


MODULES = _modules()


def test_every_stage_is_found():
    assert {"trademd.units", "trademd.flow.coordinates", "trademd.energy.bridge", "trademd.cli.app",
            "trademd.systems.molecule"} <= set(MODULES)


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    module = importlib.import_module(name)
    tests = doctest.DocTestFinder().find(module, name)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    report = []
    for test in tests:
        runner.run(test, out=report.append)
    result = runner.summarize(verbose=False)
    assert result.failed == 0, "".join(report)
    # an example the finder missed (e.g. in a function imported from elsewhere) would not run
    assert (result.attempted > 0) == (">>>" in Path(module.__file__).read_text()), name

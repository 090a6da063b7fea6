"""Shared fixtures: molecules and short trajectories, built once per test session."""

import numpy as np
import pytest
import torch

from trademd.systems import get_system


def pytest_collection_modifyitems(config, items):
    """Skip tests marked ``cuda`` on machines without a CUDA GPU."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session", params=["ala2-vacuum", "ala2-implicit", "ala2-openmmtools"])
def molecule(request):
    """Each built-in alanine-dipeptide system."""
    return get_system(request.param)


@pytest.fixture
def perturbed(molecule):
    """Six configurations near the PDB structure, float64 [6, 22, 3] nm."""
    rng = np.random.default_rng(7)
    return molecule.positions_nm()[None] + rng.normal(0.0, 0.01, size=(6, molecule.n_atoms, 3))


@pytest.fixture
def one_thread():
    """Torch on one thread for the test (small training runs are fastest so)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

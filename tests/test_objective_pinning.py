"""Pinning: a fixed-seed CPU training run of every objective (and one with refinement rounds)
gives the ``model.pt`` parameters and ``metrics.csv`` rows recorded from the code before the
training core was split into objective classes (issue 23): bit for bit on the recording machine,
to 1e-5 relative on another CPU. A refactor of the training core
must leave these numbers unchanged; a change of behaviour re-records them on purpose with
``TRADEMD_RECORD_PINNING=1 pytest tests/test_objective_pinning.py`` and says why in its commit.

Each run is small (a flow of width 8, tens of steps) and goes through :func:`trademd.train.train_run`
(presets, objective defaults and the trainer together), on one thread.
"""

import csv
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from trademd.train import train_run

REFERENCE = Path(__file__).parent / "data" / "objective_pinning"
#: metrics.csv columns that measure time, not numbers of the run
TIMING_COLUMNS = ("steps_per_s",)

COMMON = dict(batch_size=64, learning_rate=5e-3, metrics_every=10, metrics_samples=200,
              checkpoint_every=10, cache_samples=100, cache_every=10, grid_size=5, trade_points=32,
              reverse_kl_samples=64, refine_rounds=0, flow={"width": 8})
#: name -> (system, t_min, t_max, settings)
RUNS = {
    "nll": ("double-well-5d", 0.5, 2.0, dict(COMMON, objective="nll", steps=30)),
    "trade": ("double-well-5d", 0.5, 2.0, dict(COMMON, objective="trade", steps=40, warmup_fraction=0.2,
                                               ramp_fraction=0.2)),
    "trade-continuous": ("gaussian-2d", 0.5, 2.0, dict(COMMON, objective="trade", steps=20, trade_mode="continuous",
                                                       evaluation_points="samples", warmup_fraction=0.2)),
    "reverse-kl": ("gaussian-2d", 0.5, 2.0, dict(COMMON, objective="reverse-kl", steps=20)),
    "nll+reverse-kl": ("gaussian-2d", 0.5, 2.0, dict(COMMON, objective="nll+reverse-kl", steps=20)),
    "data-free": ("double-well-5d", 0.5, 2.0, dict(COMMON, objective="data-free", steps=40,
                                                   boundary_buffer_samples=500, boundary_buffer_every=15)),
    "interpolation": ("gaussian-2d", 0.5, 2.0, dict(COMMON, objective="interpolation", steps=20)),
    "refinement": ("double-well-5d", 0.5, 2.0, dict(COMMON, objective="trade", steps=20, warmup_fraction=0.2,
                                                    refine_rounds=2, refine_steps=10, refine_samples=200,
                                                    focus_temperatures=[0.7])),
    "data-free-molecule": ("ala2-vacuum", 300.0, 1200.0, dict(
        objective="data-free", steps=10, batch_size=16, trade_points=16, cache_samples=100,
        reverse_kl_samples=32, metrics_every=2, metrics_samples=100, checkpoint_every=5, grid_size=3,
        prior_samples=2000, boundary_buffer_samples=200, boundary_buffer_every=5, refine_rounds=0,
        flow={"width": 8})),
}


def _run(tmp_path: Path, name: str) -> tuple[dict[str, np.ndarray], dict]:
    """(parameters of model.pt by name, the rest of the record: metrics.csv rows without timing
    columns, the flow settings, the selection and the energy evaluations of model.pt) of one run."""
    system, t_min, t_max, settings = RUNS[name]
    model = train_run(tmp_path / name, t_min, t_max, system=system, overrides=settings, device="cpu",
                      platform="CPU", show_progress=False)
    saved = torch.load(model, map_location="cpu", weights_only=False)
    parameters = {key: value.detach().cpu().numpy() for key, value in saved["flow"]["state_dict"].items()}
    with (tmp_path / name / "metrics.csv").open() as handle:
        rows = [{k: v for k, v in row.items() if k not in TIMING_COLUMNS} for row in csv.DictReader(handle)]
    record = {"metrics": rows, "flow_config": saved["flow"]["config"], "selection": saved["selection"],
              "energy_evaluations": saved["energy_evaluations"], "objective": saved["objective"]}
    return parameters, json.loads(json.dumps(record))


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("name", list(RUNS))
def test_training_reproduces_the_recorded_run(tmp_path, name):
    parameters, record = _run(tmp_path, name)
    parameters_file, record_file = REFERENCE / f"{name}.npz", REFERENCE / f"{name}.json"
    if os.environ.get("TRADEMD_RECORD_PINNING") == "1":
        REFERENCE.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(parameters_file, **parameters)
        record_file.write_text(json.dumps(record, indent=1) + "\n")
    recorded = np.load(parameters_file)
    assert sorted(parameters) == sorted(recorded.files)
    for key, value in parameters.items():
        assert value.dtype == recorded[key].dtype and value.shape == recorded[key].shape, key
        assert np.allclose(value, recorded[key], rtol=RELATIVE, atol=1e-7), (key, np.abs(value - recorded[key]).max())
    assert _same(record, json.loads(record_file.read_text()))


#: Bit for bit on the machine that recorded the runs; another CPU (other SIMD paths in torch
#: and OpenMM) may differ in the last digits, far below what any change of behaviour moves.
RELATIVE = 1e-5


def _same(value, recorded) -> bool:
    """Equal records, numbers (also as metrics.csv's strings) to :data:`RELATIVE`."""
    if isinstance(value, dict) and isinstance(recorded, dict):
        return value.keys() == recorded.keys() and all(_same(value[k], recorded[k]) for k in value)
    if isinstance(value, list) and isinstance(recorded, list):
        return len(value) == len(recorded) and all(_same(a, b) for a, b in zip(value, recorded))
    try:
        number, expected = float(value), float(recorded)
    except (TypeError, ValueError):
        return value == recorded
    if isinstance(value, bool) or isinstance(recorded, bool) or np.isnan(expected):
        return value == recorded or (np.isnan(expected) and np.isnan(number))
    return number == pytest.approx(expected, rel=RELATIVE, abs=1e-9)


def test_the_comparison_sees_a_change():
    assert _same({"a": ["1.0", 2, "x"]}, {"a": ["1.000001", 2, "x"]})
    assert not _same({"a": ["1.0", 2, "x"]}, {"a": ["1.001", 2, "x"]})
    assert not _same({"a": ["1.0", 2, "x"]}, {"a": ["1.0", 3, "x"]})
    assert not _same({"a": ["1.0", 2, "x"]}, {"a": ["1.0", 2, "y"]})
    assert not _same({"a": ["1.0", 2]}, {"a": ["1.0", 2, "x"]})

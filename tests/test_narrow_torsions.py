"""Narrow torsions as bounded features (trademd.flow.coordinates, "Narrow torsions"): which are
picked, exact round trips and log-dets (autograd), the wrap about a centre near +-pi, saving."""

import io
import math

import numpy as np
import pytest
import torch

from trademd.errors import TradeMDError
from trademd.flow.coordinates import (
    InternalCoordinates,
    cartesian_to_internal,
    circular_spread,
    internal_to_cartesian,
    narrow_torsion_mask,
)
from trademd.systems.zmatrix import zmatrix_from_bonds

N_ATOMS = 9
#: Torsion k (Z-matrix row k + 3): (centre rad, spread rad, share of a second mode at +2 rad)
TORSIONS = [
    (math.pi - 0.02, 0.08, 0.0),  # narrow, straddling the seam at +-pi (like a trans omega)
    (0.5, None, 0.0),             # uniform: periodic
    (-1.0, 0.10, 0.01),           # narrow peak with a rare second mode: stays periodic
    (2.0, 0.50, 0.0),             # too wide
    (-2.5, 0.05, 0.0),            # narrow
    (1.0, 0.20, 0.0),             # narrow
]
NARROW = np.array([True, False, False, False, True, True])


def _chain() -> np.ndarray:
    bonds = [(i - 1, i) for i in range(1, N_ATOMS)]
    return zmatrix_from_bonds(N_ATOMS, bonds, [True] * N_ATOMS)


def _data(zmatrix, n: int, seed: int) -> torch.Tensor:
    """[n, N_ATOMS, 3] nm with the torsions of TORSIONS, bonds 0.15 +- 0.005 nm, angles 1.9 +- 0.05."""
    rng = np.random.default_rng(seed)
    torsions = np.empty((n, N_ATOMS - 3))
    for k, (centre, spread, second) in enumerate(TORSIONS):
        if spread is None:
            torsions[:, k] = rng.uniform(-math.pi, math.pi, n)
        else:
            torsions[:, k] = centre + spread * rng.standard_normal(n)
            torsions[rng.random(n) < second, k] = centre + 2.0
    bonds = torch.as_tensor(rng.normal(0.15, 0.005, (n, N_ATOMS - 1)))
    angles = torch.as_tensor(rng.normal(1.9, 0.05, (n, N_ATOMS - 2)))
    wrapped = torch.as_tensor(np.remainder(torsions + math.pi, 2 * math.pi) - math.pi)
    return internal_to_cartesian(bonds, angles, wrapped, zmatrix)


@pytest.fixture(scope="module")
def chain():
    zmatrix = _chain()
    x = _data(zmatrix, 4000, seed=0)
    return zmatrix, x, InternalCoordinates.from_data(zmatrix, x, narrow_torsion_rad=0.35)


def test_circular_spread_across_the_seam():
    rng = np.random.default_rng(1)
    t = torch.as_tensor(np.remainder(math.pi - 0.02 + 0.1 * rng.standard_normal((20000, 1)) + math.pi,
                                     2 * math.pi) - math.pi)
    centre, spread, largest = circular_spread(t)
    assert abs(abs(float(centre[0])) - (math.pi - 0.02)) < 0.01
    assert float(spread[0]) == pytest.approx(0.1, rel=0.03)
    assert 0.3 < float(largest[0]) < 0.6


def test_mask_picks_narrow_torsions_and_keeps_rare_modes_periodic(chain):
    zmatrix, x, ic = chain
    assert np.array_equal(narrow_torsion_mask(x, zmatrix, 0.35), NARROW)
    assert not narrow_torsion_mask(x, zmatrix, 0.35, n_std=2.0).any()  # data beyond 2 spreads
    assert np.array_equal(ic.narrow.numpy(), NARROW)
    assert (ic.n_torsions, ic.n_narrow_torsions) == (3, 3)
    assert ic.n_bonded_dims == (N_ATOMS - 1) + (N_ATOMS - 2) + 3
    assert ic._feature_name(ic.n_bonded_dims - 3) == "torsion " + "-".join(str(a) for a in zmatrix[3])


def test_narrow_features_are_centred_and_scaled(chain):
    """Unwrapped about the circular mean: the seam-straddling torsion has std 0.08, not ~pi."""
    zmatrix, x, ic = chain
    features, _ = ic(x)
    narrow = features.bounded[:, -3:]
    torch.testing.assert_close(narrow.mean(0), torch.zeros(3, dtype=x.dtype), atol=1e-12, rtol=0)
    torch.testing.assert_close(narrow.std(0), torch.full((3,), 0.2, dtype=x.dtype))
    assert float(ic.std[-3]) == pytest.approx(0.08, rel=0.05)
    assert not features.out_of_range.any()
    _, _, torsions = cartesian_to_internal(x, zmatrix)
    torch.testing.assert_close(features.torsions, torsions[:, ~torch.as_tensor(NARROW)])


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-10), (torch.float32, 2e-5)])
def test_round_trip_and_log_dets_cancel(chain, dtype, tol):
    zmatrix, x, ic = chain
    ic = InternalCoordinates.from_state_dict(ic.state_dict()).to(dtype)
    x = x[:64].to(dtype)
    features, log_det = ic(x)
    back, log_det_back = ic.inverse(features.torsions, features.bounded)
    # x is already in the canonical frame (built by internal_to_cartesian)
    assert (back - x).abs().max() < tol
    assert (log_det + log_det_back).abs().max() < 1e3 * tol


def test_log_det_is_the_plain_one_less_the_narrow_scales(chain):
    """The narrow map is a shift and a scale of the torsion: an exact identity."""
    zmatrix, x, ic = chain
    plain = InternalCoordinates.from_data(zmatrix, x)
    _, log_det = ic(x[:32])
    _, log_det_plain = plain(x[:32])
    narrow_scale = ic.std[-3:] * ic.n_std / ic.bound
    torch.testing.assert_close(log_det, log_det_plain - torch.log(narrow_scale).sum(), atol=1e-12, rtol=0)


def test_inverse_log_det_matches_autograd_jacobian(chain):
    """(periodic torsions, bounded, rotation, translation) -> x: square Jacobian, log|det| = the
    inverse's log-det (the orbit factor of rigid motions included, as for the plain module)."""
    zmatrix, x, ic = chain
    features, log_det = ic(x[:2])
    n_t, n_b = ic.n_torsions, ic.n_bonded_dims
    for k in range(2):
        inputs = torch.cat([features.torsions[k], features.bounded[k], torch.zeros(6, dtype=x.dtype)])

        def to_cartesian(v):
            y, _ = ic.inverse(v[None, :n_t], v[None, n_t : n_t + n_b])
            omega, shift = v[n_t + n_b : n_t + n_b + 3], v[n_t + n_b + 3 :]
            skew = torch.zeros(3, 3, dtype=v.dtype).index_put(
                (torch.tensor([2, 0, 1]), torch.tensor([1, 2, 0])), omega)
            rotation = torch.linalg.matrix_exp(skew - skew.T)
            return (y[0] @ rotation.T + shift).reshape(-1)

        jacobian = torch.autograd.functional.jacobian(to_cartesian, inputs)
        _, logabsdet = torch.linalg.slogdet(jacobian)
        assert abs(float(logabsdet + log_det[k])) < 1e-8


def test_out_of_support_torsion_is_flagged(chain):
    zmatrix, x, ic = chain
    bonds, angles, torsions = cartesian_to_internal(x[:4], zmatrix)
    torsions = torsions.clone()
    torsions[1, 4] += 1.0  # narrow torsion 4 (spread 0.05): 20 spreads away
    features, _ = ic(internal_to_cartesian(bonds, angles, torsions, zmatrix))
    assert features.out_of_range.tolist() == [False, True, False, False]


def test_save_load_and_old_files(chain):
    zmatrix, x, ic = chain
    buffer = io.BytesIO()
    torch.save(ic.state_dict(), buffer)
    buffer.seek(0)
    loaded = InternalCoordinates.from_state_dict(torch.load(buffer, weights_only=True))
    assert torch.equal(loaded.narrow, ic.narrow) and torch.equal(loaded.torsion_centre, ic.torsion_centre)
    (f1, l1), (f2, l2) = ic(x[:8]), loaded(x[:8])
    assert torch.equal(f1.bounded, f2.bounded) and torch.equal(f1.torsions, f2.torsions) and torch.equal(l1, l2)
    # a file written before narrow torsions existed: no such buffers, every torsion periodic
    plain = InternalCoordinates.from_data(zmatrix, x)
    old = {k: v for k, v in plain.state_dict().items() if k not in ("narrow", "torsion_centre")}
    restored = InternalCoordinates.from_state_dict(old)
    assert restored.n_narrow_torsions == 0 and restored.n_torsions == N_ATOMS - 3
    assert torch.equal(restored(x[:8])[1], plain(x[:8])[1])


def test_too_wide_a_narrow_torsion_is_refused():
    zmatrix = _chain()
    x = _data(zmatrix, 500, seed=2)
    wide = np.zeros(N_ATOMS - 3, dtype=bool)
    wide[1] = True  # the uniform torsion
    with pytest.raises(TradeMDError, match="narrow torsion spreads over more than a turn"):
        InternalCoordinates(zmatrix, narrow_torsions=wide).fit(x)
    with pytest.raises(TradeMDError, match="one flag per torsion"):
        InternalCoordinates(zmatrix, narrow_torsions=[True])


def test_train_and_sample_with_narrow_torsions(tmp_path):
    """`trade-md train` with narrow_torsion_rad: the model file's coordinates hold the narrow
    torsions the data picked, and `sample` reads them back (finite weights, exact positions)."""
    import json

    import h5py
    from typer.testing import CliRunner

    from trademd.cli.app import app
    from trademd.md.settings import SimulationConfig
    from trademd.simulate import simulate
    from trademd.systems import get_system

    config = SimulationConfig(system_name="ala2-vacuum", temperature_k=600.0, time_ps=4.0, replicas=2,
                              save_every_ps=0.05, equilibration_ps=0, platform="CPU", seed=3)
    data = simulate(config, tmp_path / "t.h5", show_progress=False)
    settings = tmp_path / "tiny.json"
    settings.write_text(json.dumps({"steps": 4, "batch_size": 8, "trade_points": 16, "cache_samples": 100,
                                    "metrics_every": 2, "metrics_samples": 100, "refine_rounds": 0,
                                    "coordinates": {"narrow_torsion_rad": 0.35}}))
    runner = CliRunner()
    result = runner.invoke(app, ["train", "--data", str(data), "--tmin", "300", "--tmax", "660", "--config",
                                 str(settings), "--device", "cpu", "--platform", "CPU", "--out",
                                 str(tmp_path / "run"), "--quiet"])
    assert result.exit_code == 0, result.output
    record = torch.load(tmp_path / "run" / "model.pt", weights_only=False)
    state = next(v for k, v in _walk(record) if k.endswith("narrow"))
    molecule = get_system("ala2-vacuum")
    from trademd.io.trajectory_file import read_trajectory

    train_frames = json.loads((tmp_path / "run" / "split.json").read_text())["train"]
    positions = torch.as_tensor(read_trajectory(data).positions_nm[train_frames], dtype=torch.float64)
    expected = narrow_torsion_mask(positions, molecule.zmatrix, 0.35)
    assert np.array_equal(state.numpy(), expected) and 0 < expected.sum() < len(expected)
    result = runner.invoke(app, ["sample", "--model", str(tmp_path / "run" / "model.pt"), "--temperature", "600",
                                 "--n", "64", "--batch-size", "32", "--device", "cpu", "--platform", "CPU",
                                 "--out", str(tmp_path / "s.h5"), "--quiet"])
    assert result.exit_code == 0, result.output
    with h5py.File(tmp_path / "s.h5") as file:
        log_weights = file["observables/T600/log_weights/value"][()]
    assert np.isfinite(log_weights).sum() > 0


def _walk(record, prefix=""):
    """(dotted key, value) of every leaf of nested dicts."""
    for key, value in record.items():
        if isinstance(value, dict):
            yield from _walk(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value

"""Sampling and evaluation: exact reweighting, divergences by hand, files that other tools read."""

import io
import json
import math

import mdtraj
import numpy as np
from PIL import Image
import pytest
import torch
from typer.testing import CliRunner

from trademd.analysis.isomers import flipped_peptide_bond_mask
from trademd.analysis.observables import basin_free_energy, phi_psi_histogram
from trademd.cli.app import app
from trademd.energy.molecule import MoleculeEnergy
from trademd.evaluate import js_divergence, kl_divergence, total_variation, wasserstein_1
from trademd.io.samples_file import read_samples
from trademd.io.trajectory_file import read_trajectory
from trademd.simulate import SimulationConfig, simulate
from trademd.systems import get_system
from trademd.systems.analytic import get_analytic_system
from trademd.training.model_file import load_model
from trademd.training.targets import AnalyticTarget
from trademd.training.sampling import importance_weights
from trademd.weights import kish_ess_torch

runner = CliRunner()


class ShiftedGaussianFlow:
    """A stand-in for a flow: exact samples of N(mu, T I) with their exact log density."""

    def __init__(self, mu: float):
        self.mu = mu

    def sample(self, n, temperature):
        x = self.mu + math.sqrt(temperature) * torch.randn(n, 2, dtype=torch.float64)
        log_p = -0.5 * ((x - self.mu) ** 2).sum(-1) / temperature - math.log(2 * math.pi * temperature)
        return x, log_p


def test_a_flow_equal_to_the_target_has_full_ess():
    target = AnalyticTarget(get_analytic_system("gaussian-2d"), n_data=10)
    torch.manual_seed(0)
    _, _, _, log_w = importance_weights(ShiftedGaussianFlow(0.0), target, 5000, 1.5)
    assert float(kish_ess_torch(log_w)) / 5000 == pytest.approx(1.0, abs=1e-9)


def test_a_shifted_flow_gets_the_analytic_weights():
    """For q = N(mu, T) and target N(0, T): w(x) proportional to exp(-(mu . x) / T)."""
    target = AnalyticTarget(get_analytic_system("gaussian-2d"), n_data=10)
    torch.manual_seed(1)
    temperature, mu = 1.5, 0.7
    x, _, _, log_w = importance_weights(ShiftedGaussianFlow(mu), target, 2000, temperature)
    analytic = -(mu * x).sum(-1) / temperature
    weights = torch.softmax(log_w, 0)
    assert torch.allclose(weights, torch.softmax(analytic, 0), rtol=1e-9, atol=1e-15)
    # Kish ESS of this family: n exp(-|mu|^2 d' / T) with d' = 2 dimensions, within MC error
    assert float(kish_ess_torch(log_w)) / 2000 == pytest.approx(math.exp(-2 * mu**2 / temperature), rel=0.15)


def test_divergences_by_hand():
    p = np.array([[0.5, 0.25], [0.25, 0.0]])
    q = np.array([[0.25, 0.25], [0.25, 0.25]])
    eps = 1e-6
    pr = (p.ravel() + eps) / (1 + 4 * eps)
    qr = (q.ravel() + eps) / (1 + 4 * eps)
    assert kl_divergence(p, q) == pytest.approx(np.sum(pr * np.log(pr / qr)), rel=1e-12)
    m = 0.5 * (pr + qr)
    expected_js = 0.5 * np.sum(pr * np.log(pr / m)) + 0.5 * np.sum(qr * np.log(qr / m))
    assert js_divergence(p, q) == pytest.approx(expected_js, rel=1e-12)
    assert js_divergence(p, q) == pytest.approx(js_divergence(q, p))
    assert kl_divergence(q, q) == pytest.approx(0.0, abs=1e-15)
    # TV: half the L1 distance, unregularised: |0.25| + 0 + 0 + |-0.25| over 2
    assert total_variation(p, q) == pytest.approx(0.25, abs=1e-15)
    assert total_variation(2 * p, q) == pytest.approx(0.25, abs=1e-15)  # normalised first
    assert total_variation(np.array([1.0, 0.0]), np.array([0.0, 1.0])) == 1.0


def test_wasserstein_1():
    rng = np.random.default_rng(0)
    x = rng.normal(size=5000)
    assert wasserstein_1(x, x + 3.0) == pytest.approx(3.0, abs=1e-9)
    # weights: a two-point distribution {0: 1/4, 1: 3/4} against {0: 3/4, 1: 1/4}
    assert wasserstein_1([0.0, 1.0], [0.0, 1.0], [1, 3], [3, 1]) == pytest.approx(0.5)


def test_histogram_and_basin_free_energy():
    phi = np.array([-2.0, -1.0, 1.0, 2.0])
    psi = np.array([0.0, 0.0, 0.0, 0.0])
    weights = np.array([0.3, 0.3, 0.3, 0.1])
    histogram, edges = phi_psi_histogram(phi, psi, weights, bins=4)
    assert histogram.sum() == pytest.approx(1.0) and len(edges) == 5
    assert histogram[:, 2].tolist() == pytest.approx([0.3, 0.3, 0.3, 0.1])
    delta_f, error = basin_free_energy(phi, weights)
    assert delta_f == pytest.approx(-math.log(0.4 / 0.6))
    ess = 1 / np.sum(weights**2)
    assert error == pytest.approx(math.sqrt(0.24 / ess) / 0.24)
    # a region with less than one effective sample (Ace-Pro-Nme's phi > 0) is no measurement
    phi = np.where(np.arange(1000) == 7, 1.0, -1.0)
    tiny = np.full(1000, 1.0).astype(float)
    tiny[7] = 1e-100
    delta_f, error = basin_free_energy(phi, tiny)
    assert delta_f == pytest.approx(-math.log(1e-100 / 999)) and error == math.inf
    assert basin_free_energy(-phi, tiny)[1] == math.inf
    tiny[7] = 2.0  # 2 / 1001 of the weight with ESS ~ 1000: about two effective samples
    assert math.isfinite(basin_free_energy(phi, tiny)[1])


@pytest.fixture(scope="module")
def md_data(tmp_path_factory):
    """A tiny ala2-vacuum trajectory file: 12 saves x 4 replicas at 600 K."""
    return simulate(SimulationConfig(system_name="ala2-vacuum", temperature_k=600.0, time_ps=6.0,
                                     replicas=4, save_every_ps=0.5, equilibration_ps=1.0,
                                     platform="CPU"), tmp_path_factory.mktemp("md") / "data.h5",
                    show_progress=False)


@pytest.fixture(scope="module")
def trained_model(tmp_path_factory, md_data):
    """A tiny model trained on ``md_data`` for 6 steps, and that file (20-26 s on the shared
    2-core machine: the tests that use it are marked slow)."""
    folder = tmp_path_factory.mktemp("model")
    data = md_data
    config = folder / "tiny.json"
    config.write_text(json.dumps({"cache_samples": 64, "grid_size": 3, "trade_points": 32,
                                  "batch_size": 32, "metrics_every": 3, "checkpoint_every": 3,
                                  "warmup_fraction": 0.0, "metrics_samples": 500,
                                  "refine_samples": 500, "flow": {"width": 16}}))
    result = runner.invoke(app, ["train", "--data", str(data), "--tmin", "300", "--tmax", "700",
                                 "--steps", "6", "--config", str(config), "--out",
                                 str(folder / "run"), "--platform", "CPU", "--quiet"])
    assert result.exit_code == 0, result.output
    return folder / "run" / "model.pt", data


@pytest.mark.slow
def test_sample_file_is_exact_and_self_describing(trained_model, tmp_path):
    model, _ = trained_model
    out = tmp_path / "s.h5"
    result = runner.invoke(app, ["sample", "--model", str(model), "--temperature", "300",
                                 "--temperature", "450", "--n", "64", "--out", str(out),
                                 "--platform", "CPU", "--json", "--quiet"])
    assert result.exit_code == 0, result.output
    summaries = [json.loads(line) for line in result.stdout.strip().splitlines()]
    assert [s["temperature_k"] for s in summaries] == [300.0, 450.0]
    samples_file = read_samples(out)
    assert samples_file.attrs["format"] == "trade-md/samples"
    for attribute in ("command", "openmm_version", "trademd_version", "model", "system"):
        assert attribute in samples_file.attrs
    energy = MoleculeEnergy(get_system("ala2-vacuum").create_openmm_system())
    for summary in summaries:
        group = samples_file.by_temperature[summary["temperature_k"]]
        weights, log_w = group.weights, group.log_weights
        assert weights.sum() == pytest.approx(1.0)
        # the stored flags are those of the stored positions
        molecule = get_system("ala2-vacuum")
        flipped = flipped_peptide_bond_mask(group.positions_nm.astype(np.float64), molecule.peptide_bonds,
                                            molecule.positions_nm()).numpy()
        assert np.array_equal(group.flipped_peptide_bond, flipped)
        flagged = group.wrong_chirality | group.flipped_peptide_bond | group.nonfinite_energy
        assert np.array_equal(flagged, group.flagged)
        assert np.all(weights[flagged] == 0) and np.all(np.isneginf(log_w[flagged]))
        assert summary["ess"] == pytest.approx(1 / np.sum(weights**2), rel=1e-9)
        kt = 0.0083144626181532395 * summary["temperature_k"]
        good = ~flagged
        assert np.allclose(log_w[good], -group.energy_kj_mol[good] / kt - group.log_prob[good])
        recomputed, _ = energy(group.positions_nm[good][:8])
        # OpenMM CPU is single precision: 1e-5 relative on clashing samples of 1e6 kJ/mol
        assert np.allclose(recomputed, group.energy_kj_mol[good][:8], rtol=1e-5, atol=1e-2)
        phi = mdtraj.compute_phi(mdtraj.Trajectory(group.positions_nm, get_system("ala2-vacuum").mdtraj_topology()))[1][:, 0]
        assert np.allclose(phi, group.phi, atol=1e-5)
        png = Image.open(io.BytesIO(group.ramachandran_png))
        assert png.size[0] > 100
        assert group.histograms["phi_psi_weighted"].sum() == pytest.approx(1.0)
    assert (tmp_path / "s_T300_ramachandran.png").is_file()

    exported = runner.invoke(app, ["export", str(out), "--format", "dcd", "--temperature", "300",
                                   "--resample", "20"])
    assert exported.exit_code == 0, exported.output
    frames = mdtraj.load(str(tmp_path / "s.dcd"), top=str(tmp_path / "s.pdb"))
    assert frames.n_frames == 20 and frames.n_atoms == 22


@pytest.mark.slow
def test_sample_refuses_temperatures_outside_the_range(trained_model, tmp_path):
    model, _ = trained_model
    result = runner.invoke(app, ["sample", "--model", str(model), "--temperature", "900",
                                 "--n", "8", "--out", str(tmp_path / "x.h5"), "--quiet"])
    assert result.exit_code == 1 and "--extrapolate" in result.output
    allowed = runner.invoke(app, ["sample", "--model", str(model), "--temperature", "900",
                                  "--n", "8", "--out", str(tmp_path / "x.h5"), "--extrapolate",
                                  "--platform", "CPU", "--quiet"])
    assert allowed.exit_code == 0, allowed.output


@pytest.mark.slow
def test_evaluate_against_a_reference(trained_model, tmp_path):
    model, data = trained_model
    samples = tmp_path / "s.h5"
    assert runner.invoke(app, ["sample", "--model", str(model), "--temperature", "600", "--n", "64",
                               "--out", str(samples), "--platform", "CPU", "--quiet"]).exit_code == 0
    result = runner.invoke(app, ["evaluate", "--samples", str(samples), "--reference", str(data),
                                 "--model", str(model), "--json"])
    assert result.exit_code == 0, result.output
    metrics = json.loads(result.stdout)
    for key in ("kl_phi_psi_weighted", "js_phi_psi_unweighted", "energy_w1_weighted_kj_mol",
                "relative_ess", "reference_nll", "fraction_flagged"):
        assert key in metrics
    assert 0 <= metrics["js_phi_psi_weighted"] <= math.log(2)
    assert (tmp_path / "s_metrics.png").is_file() and (tmp_path / "s_metrics.json").is_file()


def _samples_from_frames(path, trajectory, phi_shift_rad=0.0):
    """A samples file holding a trajectory's own frames with equal weights (phi shifted)."""
    from trademd.analysis.observables import phi_psi
    from trademd.io.samples_file import TemperatureSamples, write_samples
    from trademd.systems import system_from_attrs

    n = trajectory.n_frames
    molecule = system_from_attrs(trajectory.attrs, trajectory.topology_pdb)
    phi, psi = phi_psi(molecule, trajectory.positions_nm)
    phi = np.remainder(phi + phi_shift_rad + math.pi, 2 * math.pi) - math.pi
    samples = TemperatureSamples(
        temperature_k=trajectory.temperature_k, positions_nm=trajectory.positions_nm,
        log_prob=np.zeros(n), energy_kj_mol=trajectory.energy_kj_mol, log_weights=np.zeros(n),
        weights=np.full(n, 1.0 / n), wrong_chirality=np.zeros(n, dtype=bool),
        nonfinite_energy=np.zeros(n, dtype=bool), phi=phi, psi=psi, ramachandran_png=b"png")
    write_samples(path, [samples], {"system": "ala2-vacuum"}, molecule.pdb_text)
    return path


def test_evaluate_scores_a_file_against_itself_as_equal_and_a_shifted_one_as_different(
        md_data, tmp_path):
    from trademd.evaluate import evaluate_samples
    from trademd.io.trajectory_file import read_trajectory

    data = md_data
    trajectory = read_trajectory(data)
    same = evaluate_samples(_samples_from_frames(tmp_path / "same.h5", trajectory), data)
    assert same["js_phi_psi_weighted"] == pytest.approx(0.0, abs=1e-12)
    assert same["kl_phi_psi_weighted"] == pytest.approx(0.0, abs=1e-6)
    assert same["energy_w1_weighted_kj_mol"] == pytest.approx(0.0, abs=1e-9)
    assert same["delta_f_positive_phi_kt"] == pytest.approx(same["reference_delta_f_positive_phi_kt"])
    shifted = evaluate_samples(_samples_from_frames(tmp_path / "shifted.h5", trajectory, math.pi), data)
    assert shifted["js_phi_psi_weighted"] > 0.3
    assert shifted["kl_phi_psi_weighted"] > 1.0


@pytest.mark.slow
def test_reverse_kl_energy_restrains_the_mirror_image(trained_model):
    """The chirality restraint adds about 100 kT per mirrored centre and nothing otherwise."""
    model_path, data = trained_model
    model = load_model(model_path, device="cpu", platform="CPU")
    try:
        target = model.target
        frames = torch.as_tensor(read_trajectory(data).positions_nm[:8], dtype=torch.float64)
        z = target.features(frames).double()
        mirrored = z.clone()
        mirrored[:, : target.n_torsions] = -mirrored[:, : target.n_torsions]  # x -> mirror image
        temperature = torch.full((len(z),), 600.0, dtype=torch.float64)
        for features, expected_min in ((z, 0.0), (mirrored, 50.0)):
            plain, _ = target.reduced_energy(features, temperature)
            restrained, _ = target.reduced_energy(features, temperature, chirality_restraint_kt=100.0)
            extra = restrained - plain
            assert (extra >= expected_min).all() and (extra <= 100.0 * len(target.molecule.chiral_centres) * 3).all()
            if expected_min == 0.0:
                assert torch.equal(extra, torch.zeros_like(extra))
    finally:
        model.close()


@pytest.mark.slow
def test_model_file_records_its_format_and_newer_versions_are_refused(trained_model, tmp_path):
    from trademd.errors import TradeMDError
    from trademd.training.model_file import load_model

    model, _ = trained_model
    saved = torch.load(model, weights_only=False)
    assert saved["format"] == "trade-md/model" and saved["format_version"] == 1
    newer = tmp_path / "newer.pt"
    torch.save({**saved, "format_version": 99}, newer)
    with pytest.raises(TradeMDError, match="upgrade trade-md"):
        load_model(newer)
    other = tmp_path / "other.pt"
    torch.save({**saved, "format": "something/else"}, other)
    with pytest.raises(TradeMDError, match="not a trade-md model"):
        load_model(other)

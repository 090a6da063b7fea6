"""Data-free training of molecules: the feature normalisation from a minimised structure and
the force field's thermal widths, and `train --data-free --t0` end to end."""

import csv
import json
import math

import numpy as np
import pytest
import torch

from trademd.analysis.chirality import chirality_restraint
from trademd.energy.molecule import MoleculeEnergy
from trademd.energy.structure import harmonic_widths, minimised_positions
from trademd.errors import TradeMDError
from trademd.sample import sample_run
from trademd.systems import get_system
from trademd.train import train_run
from trademd.training.config import TrainConfig, setting_names
from trademd.training.objectives.data_free import DataFree
from trademd.training.structure_prior import StructurePrior
from trademd.training.targets import MoleculeTarget
from trademd.units import BOLTZMANN_KJ_MOL_K

T0_K = 1200.0
#: Training settings small enough for seconds (no refinement; few metrics samples).
SMALL = {"steps": 4, "batch_size": 16, "trade_points": 16, "cache_samples": 100, "reverse_kl_samples": 32,
         "metrics_every": 2, "metrics_samples": 100, "refine_rounds": 0}


@pytest.fixture(scope="module")
def target():
    made = MoleculeTarget.from_structure(get_system("ala2-implicit"), T0_K, platform="CPU", workers=0)
    yield made
    made.close()


def test_minimisation_lowers_the_energy_to_a_stationary_point():
    molecule = get_system("ala2-implicit")
    system = molecule.create_openmm_system()
    energy = MoleculeEnergy(system)
    before, _ = energy(molecule.positions_nm()[None])
    minimised = minimised_positions(system, molecule.positions_nm())
    after, _ = energy(minimised[None])
    again, _ = energy(minimised_positions(system, minimised)[None])
    assert after[0] < before[0] - 1.0
    # a local minimum: minimising again gains almost nothing (forces along the rigid X-H bonds
    # are constraint forces, so the forces themselves need not vanish)
    assert abs(again[0] - after[0]) < 0.5


def test_features_are_centred_on_the_minimised_structure(target):
    molecule = get_system("ala2-implicit")
    reference = minimised_positions(molecule.create_openmm_system(), molecule.positions_nm())
    features, _ = target.coordinates(torch.as_tensor(reference[None]))
    assert features.bounded.abs().max() < 1e-6
    assert target.data_features is None and target.reference_temperature == T0_K
    assert target.n_bounded == 29 and target.n_torsions == 19  # bonds to H rigid (HBonds)


def test_bond_widths_are_the_thermal_widths_of_the_energy_curvature(target):
    """Independent of the force-field parameters: the curvature d2U/db2 of the OpenMM energy
    along each free bond (by finite differences through the internal coordinates, everything
    else fixed) gives k_B T0 / width^2 within 10 % (the bond term dominates the curvature)."""
    molecule = get_system("ala2-implicit")
    energy = MoleculeEnergy(molecule.create_openmm_system())
    coordinates = target.coordinates
    reference = minimised_positions(molecule.create_openmm_system(), molecule.positions_nm())
    features, _ = coordinates(torch.as_tensor(reference[None]))
    n_free = len(coordinates.free_bond_rows)
    step = 0.05  # in feature units: 0.05 x 5 widths / bound 1 = a quarter width
    for j in range(n_free):
        values = []
        for h in (-step, 0.0, step):
            bounded = features.bounded.clone()
            bounded[0, j] += h
            x, _ = coordinates.inverse(features.torsions, bounded)
            values.append(energy(x.numpy())[0][0])
        width_nm = float(coordinates.std[j])
        feature_to_nm = coordinates.n_std * width_nm / coordinates.bound
        curvature = (values[0] - 2 * values[1] + values[2]) / (step * feature_to_nm) ** 2
        assert BOLTZMANN_KJ_MOL_K * T0_K / width_nm**2 == pytest.approx(curvature, rel=0.1)


def test_harmonic_widths_scale_with_the_square_root_of_temperature(target):
    molecule = get_system("ala2-implicit")
    system = molecule.create_openmm_system()
    rows = target.coordinates.free_bond_rows
    hot = harmonic_widths(system, molecule.zmatrix, rows, 1200.0)
    cold = harmonic_widths(system, molecule.zmatrix, rows, 300.0)
    assert torch.allclose(hot / cold, torch.full_like(hot, 2.0))
    assert torch.allclose(hot, target.coordinates.std)
    angles = hot[len(rows):]
    # amber angle constants 290-670 kJ/mol/rad^2: widths at 1200 K 0.12-0.19 rad
    assert float(angles.min()) > 0.1 and float(angles.max()) < 0.2


@pytest.mark.slow
def test_data_free_training_of_a_molecule_runs_and_samples(tmp_path):
    model_path = train_run(tmp_path / "train", 300.0, T0_K, system="ala2-implicit",
                           overrides={"objective": "data-free", **SMALL}, device="cpu",
                           platform="CPU", show_progress=False)
    saved = torch.load(model_path, weights_only=False)
    assert saved["reference_temperature"] == T0_K and saved["objective"] == "data-free"
    assert saved["energy_evaluations"] > 0
    # the data-free defaults, as a config file or option could not have set them here
    config = json.loads((tmp_path / "train" / "config.json").read_text())
    written, sections = TrainConfig.from_settings(config), setting_names()
    assert {k: getattr(getattr(written, sections[k]), k) for k in DataFree.defaults} == DataFree.defaults
    (summary,) = sample_run(model_path, [300.0], 256, tmp_path / "samples.h5", device="cpu",
                            platform="CPU", show_progress=False)
    assert summary["n"] == 256 and math.isfinite(summary["relative_ess"])


def test_boundary_temperature_only_for_data_free_molecules(tmp_path):
    with pytest.raises(TradeMDError, match="--t0 sets the boundary temperature"):
        train_run(tmp_path / "a", 0.5, 2.0, system="double-well-5d", boundary_temperature_k=1.5,
                  overrides={"objective": "data-free", **SMALL}, device="cpu", show_progress=False)
    with pytest.raises(TradeMDError, match="--t0 sets the boundary temperature"):
        train_run(tmp_path / "b", 300.0, 1200.0, system="ala2-implicit", boundary_temperature_k=900.0,
                  overrides={"objective": "trade", **SMALL}, device="cpu", show_progress=False)


@pytest.mark.slow
def test_reverse_kl_baseline_of_a_molecule_needs_no_data(tmp_path):
    """Reverse KL over the range uses the energy alone: with --t0 the features are those of
    the minimised structure at that temperature, as for data-free TRADE."""
    model_path = train_run(tmp_path / "rkl", 300.0, T0_K, system="ala2-implicit", boundary_temperature_k=900.0,
                           overrides={"objective": "reverse-kl", **SMALL}, device="cpu", platform="CPU",
                           show_progress=False)
    saved = torch.load(model_path, weights_only=False)
    assert saved["objective"] == "reverse-kl" and saved["reference_temperature"] == 900.0


# -- the structure prior -----------------------------------------------------------------------

@pytest.fixture(scope="module")
def prior(target):
    return StructurePrior.from_target(target, target.structure_features(), T0_K, n_grid=180,
                                      chirality_restraint_kt=100.0)


def test_structure_prior_torsions_are_the_conditional_boltzmann_densities(target, prior):
    """Exact identity: between any two bins of a torsion the log-density differs by the
    reduced-energy difference of the minimised structure with that torsion set to the bins'
    centres (computed here afresh), and every row integrates to one."""
    assert torch.allclose((prior.torsion_log_prob.exp() * prior.bin_width).sum(1),
                          torch.ones(target.n_torsions, dtype=torch.float64))
    centres = -math.pi + (torch.tensor([10, 95]) + 0.5) * prior.bin_width
    for k in (0, 3, 5):  # phi, psi, the C-beta branch
        z = target.structure_features().double().expand(2, -1).clone()
        z[:, k] = centres
        u, _ = target.reduced_energy(z, torch.full((2,), T0_K), 100.0)
        expected = -(float(u[1]) - float(u[0]))
        got = float(prior.torsion_log_prob[k, 95] - prior.torsion_log_prob[k, 10])
        assert got == pytest.approx(expected, abs=1e-3 * max(1.0, abs(expected)))


def test_structure_prior_samples_follow_its_density_and_keep_the_chirality(target, prior):
    z = prior.sample(20000, torch.Generator().manual_seed(0))
    assert z.shape == (20000, target.n_torsions + target.n_bounded)
    # torsion marginals: histogram against the tabulated density (psi: broad, many bins)
    counts = torch.bincount(((z[:, 3].double() + math.pi) / prior.bin_width).long().clamp(0, 179), minlength=180)
    expected = prior.torsion_log_prob[3].exp() * prior.bin_width * 20000
    busy = expected > 50
    assert float(((counts[busy] - expected[busy]) / expected[busy].sqrt()).abs().max()) < 5.0
    # bounded features: the thermal widths, bound / n_std in feature units
    assert float(z[:, target.n_torsions:].std()) == pytest.approx(1.0 / 5.0, rel=0.05)
    # log_prob is the density sampled from: its mean is minus the entropy, finite everywhere
    assert bool(torch.isfinite(prior.log_prob(z)).all())
    # no sample is a D-alanine, while a uniform torsion start gives about half of them
    x, _ = target.positions(z[:2000])
    molecule = get_system("ala2-implicit")
    mirrored = chirality_restraint(x, molecule.chiral_centres, molecule.positions_nm())
    assert float((mirrored > 0).float().mean()) == 0.0
    uniform = z[:2000].clone()
    uniform[:, :target.n_torsions] = (torch.rand(2000, target.n_torsions, generator=torch.Generator().manual_seed(1))
                                      * 2 - 1) * math.pi
    x_uniform, _ = target.positions(uniform)
    assert float((chirality_restraint(x_uniform, molecule.chiral_centres, molecule.positions_nm()) > 0)
                 .float().mean()) > 0.3


@pytest.mark.slow
def test_data_free_training_fits_the_prior_first_and_counts_its_energies(tmp_path):
    overrides = {**SMALL, "objective": "data-free", "steps": 10, "warmup_fraction": 0.6, "prior_fraction": 0.4,
                 "metrics_every": 1, "prior_samples": 1000}
    model_path = train_run(tmp_path / "train", 300.0, T0_K, system="ala2-implicit", overrides=overrides,
                           device="cpu", platform="CPU", show_progress=False)
    with (tmp_path / "train" / "metrics.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    prior_steps = [int(r["step"]) for r in rows if r["prior_nll"]]
    reverse_steps = [int(r["step"]) for r in rows if r["reverse_kl"]]
    assert prior_steps == [1, 2, 3, 4] and reverse_steps == list(range(5, 11))
    # the profiles (19 torsions x 360 bins) are in the count besides the metrics samples
    metrics_only = sum(3 * SMALL["metrics_samples"] for _ in rows)
    assert torch.load(model_path, weights_only=False)["energy_evaluations"] >= 19 * 360 + metrics_only


def test_prior_must_come_before_the_boundary(tmp_path):
    with pytest.raises(TradeMDError, match="prior_fraction must lie in"):
        train_run(tmp_path / "a", 300.0, T0_K, system="ala2-implicit",
                  overrides={**SMALL, "objective": "data-free", "warmup_fraction": 0.1, "prior_fraction": 0.2},
                  device="cpu", platform="CPU", show_progress=False)


def test_structure_prior_density_integrates_to_one_with_an_off_centre_structure():
    """Quadrature over one torsion x one bounded feature whose structure value is off the
    interval's centre (as for a target normalised on MD data); samples match its moments."""
    n_grid = 90
    angle = -math.pi + (torch.arange(n_grid, dtype=torch.float64) + 0.5) * (2 * math.pi / n_grid)
    log_weight = 2.0 * torch.cos(angle - 1.0)
    table = (log_weight - torch.logsumexp(log_weight, 0) - math.log(2 * math.pi / n_grid))[None]
    prior = StructurePrior(table, torch.tensor([0.6]), bounded_std=0.3, bound=1.0)
    t = torch.linspace(-math.pi, math.pi, 721, dtype=torch.float64)[:-1] + math.pi / 720
    b = torch.linspace(-1.0, 1.0, 2001, dtype=torch.float64)
    grid_t, grid_b = torch.meshgrid(t, b, indexing="ij")
    density = prior.log_prob(torch.stack([grid_t.flatten(), grid_b.flatten()], 1)).exp().reshape(grid_t.shape)
    total = torch.trapezoid(density.sum(0) * (2 * math.pi / 720), b)
    assert float(total) == pytest.approx(1.0, abs=2e-3)
    assert float(prior.log_prob(torch.tensor([[0.0, 1.01]]))) == -math.inf
    z = prior.sample(200000, torch.Generator().manual_seed(3)).double()
    mean_b = float(torch.trapezoid((density.sum(0) * (2 * math.pi / 720)) * b, b))
    assert float(z[:, 1].mean()) == pytest.approx(mean_b, abs=3e-3)
    assert float(z[:, 1].abs().max()) <= 1.0
    circular_mean = torch.atan2(torch.sin(z[:, 0]).mean(), torch.cos(z[:, 0]).mean())
    assert float(circular_mean) == pytest.approx(1.0, abs=0.02)


@pytest.mark.slow
def test_reverse_kl_baseline_on_md_data_starts_from_the_structure_prior(tmp_path):
    """With an MD file the features are normalised on the frames; the reverse-KL baseline fits
    the structure prior (centred on the minimised PDB structure in that normalisation) first."""
    from trademd.pipeline import RunConfig
    from trademd.simulate import simulate

    settings = RunConfig(system="ala2-implicit", temperatures_k=(400.0,), simulation_ps=4.0,
                         replicas=4).simulation("CPU")
    data = simulate(settings, tmp_path / "data.h5", show_progress=False)
    overrides = {**SMALL, "objective": "reverse-kl", "steps": 6, "prior_fraction": 0.5, "metrics_every": 1,
                 "prior_samples": 1000}
    train_run(tmp_path / "rkl", 300.0, 660.0, data=data, overrides=overrides, device="cpu", platform="CPU",
              show_progress=False)
    with (tmp_path / "rkl" / "metrics.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [r["step"] for r in rows if r["prior_nll"]] == ["1", "2", "3"]
    assert [r["step"] for r in rows if r["reverse_kl"]] == ["4", "5", "6"]
    target = MoleculeTarget.from_trajectory(data, platform="CPU", workers=0)
    try:
        structure = target.structure_features()
        assert structure.shape == (target.n_torsions + target.n_bounded,)
        assert float(structure[target.n_torsions:].abs().max()) < 1.0  # inside the data's range
    finally:
        target.close()


def test_reduced_energy_of_a_non_finite_sample_is_infinite_and_leaves_the_others_alone(target):
    """A flow sample with NaN features (a diverging training's) gets u = +inf instead of
    stopping the training in the energy bridge; the other rows keep their values and gradients,
    and only they count as energy evaluations."""
    z = target.structure_features().double().expand(3, -1).clone()
    z[1, 0] += 0.3
    temperature = torch.full((3,), T0_K, dtype=torch.float64)
    clean = z.clone().requires_grad_(True)
    u_clean, _ = target.reduced_energy(clean, temperature, 100.0)
    u_clean.sum().backward()
    broken = z.clone()
    broken[2, 4] = math.nan
    broken.requires_grad_(True)
    count = target.energy_evaluations
    u, _ = target.reduced_energy(broken, temperature, 100.0)
    assert target.energy_evaluations - count == 2
    assert torch.isinf(u[2]) and u[2] > 0
    assert torch.equal(u[:2], u_clean[:2])
    u[:2].sum().backward()
    assert torch.allclose(broken.grad[:2], clean.grad[:2])

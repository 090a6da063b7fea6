"""Replica exchange: the Metropolis rule, the bookkeeping, the per-copy-temperature engine
against exact distributions of a harmonic chain, and the file written by
``trade-md simulate --temperatures``."""

import json

import h5py
import numpy as np
import openmm
import pytest
import torch
from typer.testing import CliRunner

from trademd.cli.app import app, expand_multi_value_options
from trademd.errors import TradeMDError
from trademd.io.trajectory_file import DynamicsFile, ensemble_temperatures, read_trajectory
from trademd.energy.copies import com_restraint_energies, replicate_system
from trademd.md.engines import LadderEngine
from trademd.md.exchange import ExchangeState, log_acceptance
from trademd.md.settings import COM_RESTRAINT_NM
from trademd.simulate import ExchangeConfig, simulate
from trademd.systems import get_system
from trademd.units import BOLTZMANN_KJ_MOL_K

runner = CliRunner()


def test_log_acceptance_is_the_metropolis_ratio():
    beta_300 = 1 / (BOLTZMANN_KJ_MOL_K * 300.0)
    beta_400 = 1 / (BOLTZMANN_KJ_MOL_K * 400.0)
    assert log_acceptance(300.0, 400.0, -10.0, -4.0) == pytest.approx((beta_300 - beta_400) * -6.0)
    # the product weight exp(-b_a U_b - b_b U_a) / exp(-b_a U_a - b_b U_b) after the swap
    log_ratio = (-beta_300 * -4.0 - beta_400 * -10.0) - (-beta_300 * -10.0 - beta_400 * -4.0)
    assert log_acceptance(300.0, 400.0, -10.0, -4.0) == pytest.approx(log_ratio)


@pytest.mark.parametrize("energy_gap_kj_mol", [-3.0, -1.0, 0.5])
def test_swap_frequency_matches_min_one_exp(energy_gap_kj_mol):
    ladders = 40000
    state = ExchangeState.start([300.0, 450.0], ladders)
    energies = np.tile([0.0, -energy_gap_kj_mol], (ladders, 1))  # U_low - U_high = gap
    source = state.exchange_round(energies, np.random.default_rng(3))
    expected = min(1.0, np.exp(log_acceptance(300.0, 450.0, 0.0, -energy_gap_kj_mol)))
    swapped = source[:, 0] == 1
    assert state.attempts[0] == ladders and state.accepted[0] == swapped.sum()
    assert swapped.mean() == pytest.approx(expected, abs=4 * np.sqrt(expected * (1 - expected) / ladders) + 1e-12)
    assert np.array_equal(state.walker_at[swapped, 0], 2 * np.flatnonzero(swapped) + 1)


def test_even_odd_rounds_and_round_trips():
    """With every swap accepted, walker 0 climbs one rung per round of its parity, reaches the
    top of a 3-rung ladder and comes back: one round trip, counted once."""
    state = ExchangeState.start([300.0, 400.0, 500.0], ladders=1)
    always = np.array([[2.0, 1.0, 0.0]])  # higher energy at lower T: log ratio > 0
    rng = np.random.default_rng(0)
    positions = []
    for _ in range(6):
        state.exchange_round(always, rng)
        positions.append(int(np.flatnonzero(state.walker_at[0] == 0)[0]))
    assert positions == [1, 2, 2, 1, 0, 0]
    assert state.attempts.tolist() == [3, 3] and state.accepted.tolist() == [3, 3]
    assert state.round_trips == 1
    restored = ExchangeState.from_json(state.to_json(), [300.0, 400.0, 500.0])
    assert np.array_equal(restored.walker_at, state.walker_at) and restored.round_trips == 1
    assert np.array_equal(restored.phase, state.phase) and restored.n_rounds == 6


def test_restraint_energies_match_openmm():
    single = get_system("ala2-vacuum").create_openmm_system()
    replicated, layout = replicate_system(single, 3, per_copy_energies=False,
                                          molecule_radius_nm=1.5, com_restraint_nm=COM_RESTRAINT_NM)
    restraint = next(f for f in replicated.getForces() if isinstance(f, openmm.CustomCentroidBondForce))
    restraint.setForceGroup(1)
    context = openmm.Context(replicated, openmm.VerletIntegrator(0.001), openmm.Platform.getPlatformByName("Reference"))
    molecule = get_system("ala2-vacuum").positions_nm()
    offsets = np.stack([molecule - molecule.mean(0) + shift for shift in
                        ([0.1, 0.0, 0.0], [0.7, 0.2, 0.0], [0.0, -0.9, 0.4])])
    context.setPositions((offsets + layout.lattice_nm()[:, None]).reshape(-1, 3))
    expected = context.getState(getEnergy=True, groups={1}).getPotentialEnergy().value_in_unit(
        openmm.unit.kilojoule_per_mole)
    masses = np.array([single.getParticleMass(i).value_in_unit(openmm.unit.dalton)
                       for i in range(single.getNumParticles())])
    energies = com_restraint_energies(offsets, masses, COM_RESTRAINT_NM)
    assert energies[0] == 0.0 and energies[1] > 1.0 and energies[2] > 10.0
    assert energies.sum() == pytest.approx(expected, rel=1e-9)


K_BOND_KJ_MOL_NM2, R0_NM, MASS_AMU = 1000.0, 0.3, 12.0


def _harmonic_chain(n_atoms: int = 4):
    """Atoms joined by harmonic bonds and nothing else: bond lengths are independent with
    density r^2 exp(-k (r - r0)^2 / (2 kT)), known by quadrature at every T."""
    system = openmm.System()
    bonds = openmm.HarmonicBondForce()
    for i in range(n_atoms):
        system.addParticle(MASS_AMU)
        if i:
            bonds.addBond(i - 1, i, R0_NM, K_BOND_KJ_MOL_NM2)
    system.addForce(bonds)
    positions = np.zeros((n_atoms, 3))
    positions[:, 0] = R0_NM * np.arange(n_atoms)
    positions[1::2, 1] = 0.05
    return system, positions


def _sample_by_quadrature(grid, density, n, rng):
    cdf = np.cumsum(density)
    return np.interp(rng.random(n), cdf / cdf[-1], grid)


@pytest.mark.slow
def test_two_temperature_harmonic_chain_has_exact_variances_and_acceptance():
    temperatures, ladders, n_bonds = (300.0, 600.0), 8, 3
    system, positions = _harmonic_chain(n_bonds + 1)
    config = ExchangeConfig(system_name="harmonic-chain", temperatures_k=temperatures, ladders=ladders,
                            time_ps=75.0, exchange_every_ps=0.05, friction_per_ps=10.0,
                            platform="CPU", seed=1)
    engine = LadderEngine(system, config)
    engine.prepare(positions, 2000, seed=1)
    state = engine.exchange_state
    bonds, kinetic = [], []
    for _ in range(1500):
        engine.advance(25)  # ends with an exchange round
        offsets = engine.offsets_nm().reshape(ladders, 2, n_bonds + 1, 3)
        bonds.append(np.linalg.norm(np.diff(offsets, axis=2), axis=-1))  # [ladders, 2, bonds]
        kinetic.append(engine.kinetic_temperatures_k())
    bonds = np.stack(bonds).transpose(2, 0, 1, 3).reshape(2, -1)

    r = np.linspace(1e-4, 1.0, 200001)
    d = np.linspace(0.0, 1.5, 150001)
    exact_rng, n = np.random.default_rng(0), 200000
    total_energy = []
    for k, temperature in enumerate(temperatures):
        beta = 1.0 / (BOLTZMANN_KJ_MOL_K * temperature)
        density = r ** 2 * np.exp(-0.5 * beta * K_BOND_KJ_MOL_NM2 * (r - R0_NM) ** 2)
        mean = np.trapezoid(r * density, r) / np.trapezoid(density, r)
        variance = np.trapezoid((r - mean) ** 2 * density, r) / np.trapezoid(density, r)
        assert bonds[k].mean() == pytest.approx(mean, abs=2e-3)
        assert bonds[k].var() == pytest.approx(variance, rel=0.05)
        assert np.mean(kinetic, axis=0)[k] == pytest.approx(temperature, rel=0.02)
        # each copy's energy: independent bonds plus the flat-bottom restraint of its centre of mass
        lengths = _sample_by_quadrature(r, density, n_bonds * n, exact_rng).reshape(n_bonds, n)
        com = _sample_by_quadrature(d, d ** 2 * np.exp(-beta * 500.0 * np.maximum(0, d - COM_RESTRAINT_NM) ** 2),
                                    n, exact_rng)
        total_energy.append((0.5 * K_BOND_KJ_MOL_NM2 * (lengths - R0_NM) ** 2).sum(0)
                            + 500.0 * np.maximum(0, com - COM_RESTRAINT_NM) ** 2)
    expected = np.minimum(1.0, np.exp(log_acceptance(*temperatures, total_energy[0], total_energy[1]))).mean()
    assert state.acceptance_rates[0] == pytest.approx(expected, abs=0.04)
    assert state.round_trips > 100


def _config(**changes) -> ExchangeConfig:
    settings = dict(system_name="ala2-vacuum", temperatures_k=(300.0, 400.0, 550.0), time_ps=2.0,
                    exchange_every_ps=0.2, ladders=2, save_every_ps=0.5, equilibration_ps=0.2,
                    platform="CPU", chunk_saves=2, seed=5)
    settings.update(changes)
    return ExchangeConfig(**settings)


def test_file_holds_one_ensemble_per_temperature(tmp_path):
    path = simulate(_config(), tmp_path / "rx.h5", command="test", show_progress=False)
    assert ensemble_temperatures(path) == [300.0, 400.0, 550.0]
    single = get_system("ala2-vacuum").create_openmm_system()
    from trademd.energy.molecule import MoleculeEnergy

    energy = MoleculeEnergy(single, "Reference")
    for temperature in (300.0, 400.0, 550.0):
        trajectory = read_trajectory(path, temperature)
        assert trajectory.temperature_k == temperature and trajectory.n_frames == 4 * 2
        assert trajectory.time_ps.max() == pytest.approx(2.0)
        assert np.allclose(energy(trajectory.positions_nm)[0], trajectory.energy_kj_mol, atol=1e-2)
        assert trajectory.attrs["system"] == "ala2-vacuum" and trajectory.attrs["command"] == "test"
    with h5py.File(path, "r") as h5:
        exchange = h5["parameters/exchange"]
        assert exchange["attempts"][()].sum() == 10 * 2  # 10 rounds, one pair each, 2 ladders
        assert exchange["walker_at_rung"].shape == (4, 2, 3)
        rates = json.loads(exchange.attrs["acceptance_rate"])
        assert len(rates) == 2 and all(0 <= r <= 1 for r in rates)
        assert h5["parameters"].attrs["n_replicas"] == 2 and h5["parameters"].attrs["wall_time_s"] > 0
    with pytest.raises(TradeMDError, match="pick one with --temperature"):
        read_trajectory(path)
    with pytest.raises(TradeMDError, match="450 K is not one"):
        read_trajectory(path, 450.0)


def test_a_training_target_from_one_rung(tmp_path):
    """``trade-md train --data RX.h5 --temperature T``: the target holds that ensemble, T0 = T."""
    from trademd.training.targets import MoleculeTarget

    path = simulate(_config(temperatures_k=(300.0, 400.0), time_ps=5.0), tmp_path / "rx.h5",
                            show_progress=False)  # 10 saves x 2 ladders per temperature
    with pytest.raises(TradeMDError, match="pick one with --temperature"):
        MoleculeTarget.from_trajectory(path, platform="CPU", workers=0)
    target = MoleculeTarget.from_trajectory(path, platform="CPU", workers=0, temperature_k=400.0)
    try:
        assert target.reference_temperature == 400.0
        assert len(target.split.train) == 8 * 2 and len(target.split.test) == 1 * 2
        frames = torch.as_tensor(read_trajectory(path, 400.0).positions_nm[target.split.train])
        assert torch.equal(target.data_features, target.features(frames))
    finally:
        target.close()


def test_resume_continues_exactly(tmp_path):
    straight = simulate(_config(), tmp_path / "a.h5", show_progress=False)
    resumed = simulate(_config(time_ps=1.0), tmp_path / "b.h5", show_progress=False)
    simulate(_config(time_ps=2.0), resumed, resume=True, show_progress=False)
    for temperature in (300.0, 400.0, 550.0):
        a, b = read_trajectory(straight, temperature), read_trajectory(resumed, temperature)
        assert np.array_equal(a.positions_nm, b.positions_nm)
        assert np.array_equal(a.energy_kj_mol, b.energy_kj_mol)
    with DynamicsFile.open(straight) as ha, DynamicsFile.open(resumed) as hb:
        a, b = ha.read_exchange_statistics(), hb.read_exchange_statistics()
        for name in ("attempts", "accepted", "walker_at_rung"):
            assert np.array_equal(a[name], b[name])


@pytest.mark.parametrize("changes, message", [
    (dict(temperatures_k=(300.0,)), "at least two"),
    (dict(temperatures_k=(400.0, 300.0)), "increasing order"),
    (dict(temperatures_k=(300.0, -5.0)), "positive"),
    (dict(exchange_every_ps=0.0001), "--exchange-every"),
    (dict(ladders=0), "at least 1"),
])
def test_bad_settings_are_refused(tmp_path, changes, message):
    with pytest.raises(TradeMDError, match=message):
        simulate(_config(**changes), tmp_path / "rx.h5", show_progress=False)


def test_cli_replica_exchange_and_reference_selection(tmp_path):
    out = tmp_path / "rx.h5"
    words = ["simulate", "--system", "ala2-vacuum", "--temperatures", "300", "450", "--time", "1ps",
             "--exchange-every", "0.2ps", "--replicas", "2", "--save-every", "0.5ps",
             "--equilibration", "0", "--platform", "CPU", "--out", str(out), "--quiet"]
    result = runner.invoke(app, words)  # the app spells out the list itself
    assert result.exit_code == 0, result.output
    with h5py.File(out, "r") as h5:
        assert "--temperatures 300.0 --temperatures 450.0" in h5["parameters"].attrs["command"]
    result = runner.invoke(app, ["export", str(out), "--format", "npz", "--temperature", "450",
                                 "--out", str(tmp_path / "f.npz")])
    assert result.exit_code == 0, result.output
    assert np.load(tmp_path / "f.npz")["positions_nm"].shape == (4, 22, 3)
    result = runner.invoke(app, ["export", str(out), "--format", "npz"])
    assert result.exit_code == 1 and "pick one with --temperature" in result.output
    result = runner.invoke(app, ["energy", str(out), "--temperature", "300", "--platform", "Reference"])
    assert result.exit_code == 0 and "frames: 4" in result.output
    result = runner.invoke(app, ["simulate", "--out", str(out), "--resume", "--time", "2ps", "--quiet"])
    assert result.exit_code == 0, result.output
    assert read_trajectory(out, 450.0).n_frames == 8  # 4 saves more of both ladders
    result = runner.invoke(app, words[:4] + ["450", "300"] + words[6:])
    assert result.exit_code == 1 and "increasing order" in result.output


def test_expand_multi_value_options():
    assert expand_multi_value_options(["sample", "--temperature", "300", "400", "--n", "5"]) == [
        "sample", "--temperature", "300", "--temperature", "400", "--n", "5"]
    assert expand_multi_value_options(["export", "f.h5", "--temperature", "300"]) == [
        "export", "f.h5", "--temperature", "300"]

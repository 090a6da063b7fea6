"""Molecular dynamics: the right temperature, exact stored energies, chunked resumable files."""

import json

import h5py
import numpy as np
from openmm import unit
import pytest

from trademd.energy.molecule import MoleculeEnergy
from trademd.errors import TradeMDError
from trademd.io.h5io import frame_count, read_trajectory
from trademd.simulate import SimulationConfig, simulate
from trademd.systems import get_system


def _config(**overrides) -> SimulationConfig:
    settings = dict(system_name="ala2-vacuum", temperature_k=300.0, time_ps=4.0, replicas=4,
                    save_every_ps=0.5, equilibration_ps=1.0, chunk_saves=2, platform="CPU", seed=11)
    settings.update(overrides)
    return SimulationConfig(**settings)


@pytest.mark.slow
@pytest.mark.parametrize("timestep_ps, hydrogen_mass_amu", [(0.002, None), (0.004, 1.5)])
def test_kinetic_temperature_matches_target(tmp_path, timestep_ps, hydrogen_mass_amu):
    """Mean kinetic temperature over 16 replicas x 20 ps equals the target within 4 standard
    errors (block averages over 2 ps blocks, longer than the 1/friction = 1 ps memory), also
    with hydrogen mass repartitioning at 4 fs (kinetic energy from the repartitioned masses)."""
    config = _config(temperature_k=400.0, time_ps=20.0, replicas=16, save_every_ps=0.1,
                     equilibration_ps=2.0, chunk_saves=50, timestep_ps=timestep_ps,
                     hydrogen_mass_amu=hydrogen_mass_amu)
    path = simulate(config, tmp_path / "t.h5", show_progress=False)
    with h5py.File(path) as h5:
        kinetic = h5["kinetic_temperature_k"][()]
    blocks = kinetic.reshape(10, -1).mean(axis=1)
    standard_error = blocks.std(ddof=1) / np.sqrt(len(blocks))
    assert abs(kinetic.mean() - 400.0) < 4 * standard_error + 2.0


def test_stored_energies_equal_a_fresh_context(tmp_path):
    for name in ("ala2-vacuum", "ala2-implicit"):
        path = simulate(_config(system_name=name), tmp_path / f"{name}.h5", show_progress=False)
        trajectory = read_trajectory(path)
        assert trajectory.n_frames == 8 * 4
        recomputed, _ = MoleculeEnergy(get_system(name).create_openmm_system())(trajectory.positions_nm)
        assert np.abs(recomputed - trajectory.energy_kj_mol).max() < 1e-3


def test_file_layout_and_attributes(tmp_path):
    path = simulate(_config(), tmp_path / "t.h5", command="trade-md simulate --test",
                    show_progress=False)
    trajectory = read_trajectory(path)
    assert trajectory.positions_nm.dtype == np.float32
    assert trajectory.positions_nm.shape == (32, 22, 3)
    assert trajectory.replica.tolist() == [0, 1, 2, 3] * 8
    assert np.allclose(np.unique(trajectory.time_ps), np.arange(1, 9) * 0.5)
    attrs = trajectory.attrs
    assert attrs["temperature_k"] == 300.0 and attrs["system"] == "ala2-vacuum"
    assert attrs["command"] == "trade-md simulate --test"
    for key in ("openmm_version", "trademd_version", "integrator", "timestep_ps",
                "friction_per_ps", "seed", "forcefield_files", "units"):
        assert key in attrs
    with h5py.File(path) as h5:
        assert h5["positions_nm"].attrs["unit"] == "nm"
        assert h5["energy_kj_mol"].attrs["unit"] == "kJ/mol"
    # frames stay whole molecules: bond lengths of the constrained C-H bonds are exact
    bond = np.linalg.norm(trajectory.positions_nm[:, 0] - trajectory.positions_nm[:, 1], axis=-1)
    assert np.allclose(bond, bond[0], atol=1e-4)


def test_interrupted_run_resumes_losing_at_most_one_chunk(tmp_path, monkeypatch):
    """Ctrl-C during the second chunk leaves a valid file with the first chunk; --resume
    continues it to the same frames an uninterrupted run writes."""
    config = _config(time_ps=3.0)
    uninterrupted = read_trajectory(simulate(config, tmp_path / "whole.h5", show_progress=False))

    calls = {"n": 0}
    original = MoleculeEnergy.__call__

    def interrupt_second_chunk(self, positions):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return original(self, positions)

    monkeypatch.setattr(MoleculeEnergy, "__call__", interrupt_second_chunk)
    with pytest.raises(KeyboardInterrupt):
        simulate(config, tmp_path / "cut.h5", show_progress=False)
    partial = read_trajectory(tmp_path / "cut.h5")
    assert partial.n_frames == 2 * 4  # the first chunk: 2 saves x 4 replicas
    assert frame_count(tmp_path / "cut.h5") == 2 * 4  # from the shape, as `run` reads it
    monkeypatch.setattr(MoleculeEnergy, "__call__", original)

    simulate(_config(time_ps=3.0), tmp_path / "cut.h5", resume=True, show_progress=False)
    resumed = read_trajectory(tmp_path / "cut.h5")
    assert resumed.n_frames == uninterrupted.n_frames == 6 * 4
    assert np.allclose(resumed.time_ps, uninterrupted.time_ps)
    assert np.allclose(resumed.positions_nm, uninterrupted.positions_nm, atol=1e-4)


def test_resume_extends_a_finished_run(tmp_path):
    path = simulate(_config(time_ps=1.0), tmp_path / "t.h5", show_progress=False)
    simulate(_config(time_ps=2.0), path, resume=True, show_progress=False)
    trajectory = read_trajectory(path)
    assert trajectory.n_frames == 4 * 4
    assert trajectory.time_ps.max() == pytest.approx(2.0)


def test_a_run_stopped_before_its_first_chunk_starts_again_on_resume(tmp_path, monkeypatch):
    """Killed during set-up or the first chunk, a file holds no checkpoint: --resume (and
    `run`, which resumes unfinished files) starts it again instead of failing."""
    config = _config(time_ps=1.0)
    uninterrupted = read_trajectory(simulate(config, tmp_path / "whole.h5", show_progress=False))

    def interrupt(self, positions):
        raise KeyboardInterrupt

    original = MoleculeEnergy.__call__
    monkeypatch.setattr(MoleculeEnergy, "__call__", interrupt)
    with pytest.raises(KeyboardInterrupt):
        simulate(config, tmp_path / "cut.h5", show_progress=False)
    assert frame_count(tmp_path / "cut.h5") == 0
    monkeypatch.setattr(MoleculeEnergy, "__call__", original)
    simulate(config, tmp_path / "cut.h5", resume=True, show_progress=False)
    resumed = read_trajectory(tmp_path / "cut.h5")
    assert resumed.n_frames == uninterrupted.n_frames == 2 * 4
    assert np.allclose(resumed.positions_nm, uninterrupted.positions_nm, atol=1e-4)


@pytest.mark.parametrize("name", ["ala2-vacuum", "ala2-implicit"])
def test_hydrogen_mass_repartitioning_keeps_total_mass_and_energies(name):
    """Every hydrogen gets the asked mass, its heavy atom loses what it gained (total mass
    unchanged), and the potential energy of any configuration is unchanged."""
    molecule = get_system(name)
    plain, heavy = molecule.create_openmm_system(), molecule.create_openmm_system(hydrogen_mass_amu=1.5)
    masses = lambda system: np.array([system.getParticleMass(i).value_in_unit(unit.amu)
                                      for i in range(system.getNumParticles())])
    before, after = masses(plain), masses(heavy)
    hydrogen = np.array([atom.element.symbol == "H" for atom in molecule.pdb().topology.atoms()])
    assert np.allclose(after[hydrogen], 1.5)
    assert np.all(after[~hydrogen] <= before[~hydrogen]) and after[~hydrogen].min() > 8.0
    assert after.sum() == pytest.approx(before.sum(), rel=1e-12)
    lost = np.zeros_like(before)  # each heavy atom loses what its hydrogens gained
    for bond in molecule.pdb().topology.bonds():
        h, other = (bond[0].index, bond[1].index) if hydrogen[bond[0].index] else (bond[1].index, bond[0].index)
        if hydrogen[h] and not hydrogen[other]:
            lost[other] += after[h] - before[h]
    assert np.allclose(before[~hydrogen] - after[~hydrogen], lost[~hydrogen])
    positions = molecule.positions_nm()[None] + np.random.default_rng(3).normal(0, 0.01, (5, molecule.n_atoms, 3))
    u_plain, _ = MoleculeEnergy(plain)(positions)
    u_heavy, _ = MoleculeEnergy(heavy)(positions)
    assert np.allclose(u_plain, u_heavy, atol=1e-6)


def test_hydrogen_mass_is_recorded_and_kept_on_resume(tmp_path):
    config = _config(system_name="ala2-implicit", timestep_ps=0.004, hydrogen_mass_amu=1.5, time_ps=2.0)
    path = simulate(config, tmp_path / "h.h5", show_progress=False)
    trajectory = read_trajectory(path)
    assert trajectory.attrs["hydrogen_mass_amu"] == 1.5 and trajectory.attrs["timestep_ps"] == 0.004
    assert np.all(np.isfinite(trajectory.energy_kj_mol))
    simulate(_config(time_ps=4.0), path, resume=True, show_progress=False)  # the file's settings win
    resumed = read_trajectory(path)
    assert resumed.n_frames == 8 * 4
    assert json.loads(resumed.attrs["simulation_config"])["hydrogen_mass_amu"] == 1.5


@pytest.mark.parametrize("mass", [0.5, 4.5])
def test_impossible_hydrogen_mass_is_refused(tmp_path, mass):
    with pytest.raises(TradeMDError, match="--hydrogen-mass must lie between 1 and 4 amu"):
        simulate(_config(hydrogen_mass_amu=mass), tmp_path / "x.h5", show_progress=False)

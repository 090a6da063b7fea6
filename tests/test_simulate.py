"""Molecular dynamics: the right temperature, exact stored energies, chunked resumable files."""

import json

import h5py
import numpy as np
from openmm import unit
import pytest

from trademd.energy.molecule import MoleculeEnergy
from trademd.errors import TradeMDError
from trademd.io.trajectory_file import DynamicsFile, frame_count, read_trajectory
from trademd.simulate import SimulationConfig, merge, simulate, simulate_shards
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
    with DynamicsFile.open(path) as file:
        kinetic = file.ensembles[0].columns()["kinetic_temperature_k"]
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
        assert h5["particles/T300/position/value"].attrs["unit"] == "nm"
        assert h5["observables/T300/potential_energy/value"].attrs["unit"] == "kJ mol-1"
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


def test_seed_zero_is_repeatable(tmp_path):
    """OpenMM takes seed 0 as "choose at random": the engine must not pass it on."""
    config = _config(seed=0, time_ps=1.0, replicas=2, platform="Reference")
    first = read_trajectory(simulate(config, tmp_path / "a.h5", show_progress=False))
    second = read_trajectory(simulate(config, tmp_path / "b.h5", show_progress=False))
    assert np.array_equal(first.positions_nm, second.positions_nm)


def _shards(tmp_path, count: int = 2, **overrides) -> list:
    config = _config(time_ps=2.0, replicas=2, **overrides)
    return [simulate_shards(config, tmp_path / "data.h5", shard=(i, count), show_progress=False)
            for i in range(count)]


def test_merge_interleaves_the_shards_frames_save_by_save(tmp_path):
    paths = _shards(tmp_path)
    assert [p.name for p in paths] == ["data.shard0of2.h5", "data.shard1of2.h5"]
    merged = read_trajectory(merge(paths, tmp_path / "data.h5", command="trade-md merge test"))
    parts = [read_trajectory(p) for p in paths]
    assert merged.n_frames == sum(p.n_frames for p in parts) and merged.attrs["n_replicas"] == 4
    assert merged.replica[:4].tolist() == [0, 1, 2, 3]  # save-major order, replicas offset
    for offset, part in zip((0, 2), parts):
        mine = (merged.replica >= offset) & (merged.replica < offset + 2)
        assert np.array_equal(merged.positions_nm[mine], part.positions_nm)
        assert np.array_equal(merged.energy_kj_mol[mine], part.energy_kj_mol)
        assert np.array_equal(merged.time_ps[mine], part.time_ps)
    with DynamicsFile.open(tmp_path / "data.h5") as h5, DynamicsFile.open(paths[0]) as a, \
            DynamicsFile.open(paths[1]) as b:
        kinetic = [f.ensembles[0].columns()["kinetic_temperature_k"] for f in (h5, a, b)]
        assert np.allclose(kinetic[0], 0.5 * (kinetic[1] + kinetic[2]))
        sources = json.loads(h5.attrs["merged_from"])
        assert [s["seed"] for s in sources] == [11, 12] and h5.attrs["command"] == "trade-md merge test"
    with pytest.raises(TradeMDError, match="cannot be resumed"):
        simulate(_config(time_ps=4.0), tmp_path / "data.h5", resume=True, show_progress=False)


def test_merge_refuses_files_that_are_not_shards_of_one_run(tmp_path):
    paths = _shards(tmp_path)
    other = simulate(_config(time_ps=2.0, replicas=2, temperature_k=350.0, seed=5), tmp_path / "hot.h5",
                     show_progress=False)
    with pytest.raises(TradeMDError, match="other settings.*temperature_k"):
        merge([paths[0], other], tmp_path / "m.h5")
    with pytest.raises(TradeMDError, match="same seed"):
        merge([paths[0], paths[0]], tmp_path / "m.h5")
    with pytest.raises(TradeMDError, match="two or more"):
        merge([paths[0]], tmp_path / "m.h5")
    with pytest.raises(TradeMDError, match="is one of the files"):
        merge(paths, paths[0])
    implicit = simulate(_config(time_ps=2.0, replicas=2, system_name="ala2-implicit", seed=9),
                      tmp_path / "implicit.h5", show_progress=False)
    with pytest.raises(TradeMDError, match="another system"):
        merge([paths[0], implicit], tmp_path / "m.h5")


def test_merge_of_replica_exchange_shards(tmp_path):
    from trademd.simulate import ExchangeConfig

    config = ExchangeConfig(system_name="ala2-vacuum", temperatures_k=(300.0, 400.0), time_ps=2.0,
                            save_every_ps=0.5, exchange_every_ps=0.1, ladders=1, equilibration_ps=0.5,
                            chunk_saves=2, platform="CPU", seed=3)
    paths = [simulate_shards(config, tmp_path / "re.h5", shard=(i, 2), show_progress=False) for i in range(2)]
    merged = merge(paths, tmp_path / "re.h5")
    for temperature_k in (300.0, 400.0):
        whole = read_trajectory(merged, temperature_k)
        parts = [read_trajectory(p, temperature_k) for p in paths]
        assert whole.n_frames == 8 and sorted(set(whole.replica.tolist())) == [0, 1]
        assert np.array_equal(whole.positions_nm[whole.replica == 1], parts[1].positions_nm)
    with DynamicsFile.open(merged) as h5, DynamicsFile.open(paths[0]) as a, DynamicsFile.open(paths[1]) as b:
        whole, first, second = (f.read_exchange_statistics() for f in (h5, a, b))
        assert np.array_equal(whole["attempts"], first["attempts"] + second["attempts"])
        walkers = whole["walker_at_rung"]
        assert walkers.shape[1:] == (2, 2) and set(np.unique(walkers[:, 1])) <= {2, 3}
        assert whole["round_trips"] == first["round_trips"] + second["round_trips"]


def test_a_file_interrupted_while_created_never_appears_half_made(tmp_path, monkeypatch):
    """The layout is written to <out>.partial and renamed into place when complete: a failure
    (or a kill) while creating it leaves nothing at the output path, so --resume or a new run
    never meets a half-made HDF5 file."""
    from trademd.io import schema, trajectory_file

    out = tmp_path / "data.h5"
    made = trajectory_file.DynamicsFile.create(out, {"system": "x"}, "PDB", 3, [300.0])
    made.close()
    assert out.is_file() and not (tmp_path / "data.h5.partial").exists()
    assert schema.file_format(out) == schema.TRAJECTORY_FORMAT

    def broken(h5, temperature_k, n_atoms):
        raise OSError("disk full")

    monkeypatch.setattr(trajectory_file, "create_ensemble", broken)
    other = tmp_path / "other.h5"
    with pytest.raises(OSError):
        trajectory_file.DynamicsFile.create(other, {"system": "x"}, "PDB", 3, [300.0, 400.0])
    assert not other.exists()

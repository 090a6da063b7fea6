"""Copies in several OpenMM Contexts stepped side by side (trademd.md.copy_contexts): the split,
exact identity with one Context, checkpoints that load into any split, and resumed runs."""

import numpy as np
import openmm
import pytest

from trademd.io.trajectory_file import read_trajectory
from trademd.md.copy_contexts import CopyContexts, openmm_seed, part_sizes
from trademd.simulate import simulate, simulation_config
from trademd.systems import get_system


def test_part_sizes():
    assert part_sizes(16, "CPU", 2) == [8, 8]
    assert part_sizes(5, "CPU", 2) == [3, 2]
    assert part_sizes(3, "CPU", 8) == [1, 1, 1]
    assert part_sizes(1, "CPU", 2) == [1]
    assert part_sizes(16, "CPU", 2, parallel=False) == [16]
    assert part_sizes(16, "CUDA", 2) == part_sizes(16, "OpenCL", 4) == [16]


def test_seeds_of_parts_differ_and_part_zero_keeps_the_old_seed():
    assert openmm_seed(7) == openmm_seed(7, 0) == 8
    seeds = {openmm_seed(s, p) for s in range(20) for p in range(4)}
    assert len(seeds) == 80 and 0 not in seeds


def _contexts(n_copies: int, threads: int, seed: int = 11) -> CopyContexts:
    molecule = get_system("ala2-implicit")
    copies = CopyContexts(molecule.create_openmm_system(1.5), n_copies,
                          lambda: openmm.LangevinMiddleIntegrator(600.0, 1.0, 0.004), "CPU", seed, threads)
    copies.place_minimised(molecule.positions_nm())
    copies.set_velocities_to_temperature(600.0, seed)
    return copies


def test_a_part_stepped_beside_another_is_exactly_a_lone_context():
    """Copies 0-3 of two parts stepped in two threads = the same 4 copies alone in one
    Context (same seed): the threads change nothing but the wall time."""
    split, lone = _contexts(8, threads=2), _contexts(4, threads=1)
    assert split.sizes == [4, 4] and lone.sizes == [4]
    split.step(50)
    lone.step(50)
    assert np.array_equal(split.offsets_nm()[:4], lone.offsets_nm())
    assert np.array_equal(split.velocities()[:4], lone.velocities())
    # the second part has its own random stream: same start, different paths
    assert not np.allclose(split.offsets_nm()[4:], split.offsets_nm()[:4], atol=1e-3)


def test_positions_velocities_and_per_copy_variables_in_copy_order():
    copies = _contexts(5, threads=2)
    rng = np.random.default_rng(0)
    offsets = copies.offsets_nm() + rng.normal(0, 0.01, size=(5, copies.n_atoms, 3))
    velocities = rng.normal(size=(5, copies.n_atoms, 3))
    copies.set_offsets(offsets)
    copies.set_velocities(velocities)
    np.testing.assert_allclose(copies.offsets_nm(), offsets, atol=1e-12)
    np.testing.assert_allclose(copies.velocities(), velocities, atol=1e-12)

    integrator = openmm.CustomIntegrator(0.001)
    integrator.addPerDofVariable("kT", 0.0)
    molecule = get_system("ala2-vacuum")
    custom = CopyContexts(molecule.create_openmm_system(), 3, lambda: _copy(integrator), "CPU", 0, 2)
    custom.set_copy_variable("kT", np.array([1.0, 2.0, 3.0]))
    per_part = [np.array(i.getPerDofVariableByName("kT"))[:, 0] for i in custom.integrators]
    assert custom.sizes == [2, 1]
    assert np.array_equal(np.concatenate(per_part), np.repeat([1.0, 2.0, 3.0], molecule.n_atoms))


def _copy(integrator: openmm.CustomIntegrator) -> openmm.CustomIntegrator:
    return openmm.XmlSerializer.deserialize(openmm.XmlSerializer.serialize(integrator))


@pytest.mark.parametrize("threads_after", [2, 1, 3])
def test_a_checkpoint_loads_into_any_split(threads_after):
    """Same split and platform: OpenMM's checkpoints, bit for bit (random streams included);
    another split or another platform: every copy's positions and velocities from the States."""
    before = _contexts(6, threads=2)
    before.step(20)
    checkpoint, state_xml = before.checkpoint()
    saved_offsets, saved_velocities = before.offsets_nm(), before.velocities()
    for same_platform in (True, False):
        after = _contexts(6, threads=threads_after, seed=99)
        after.restore(checkpoint, state_xml, same_platform=same_platform)
        np.testing.assert_allclose(after.offsets_nm(), saved_offsets, atol=1e-12)
        np.testing.assert_allclose(after.velocities(), saved_velocities, atol=1e-12)
    after = _contexts(6, threads=2, seed=99)
    after.restore(checkpoint, state_xml, same_platform=True)
    before.step(20)
    after.step(20)
    assert np.array_equal(after.offsets_nm(), before.offsets_nm())


def _config(**changes):
    settings = dict(system="ala2-implicit", temperature_k=600.0, replicas=4, time_ps=2.0, save_every_ps=0.5,
                    equilibration_ps=0.2, platform="CPU", chunk_saves=2, seed=3, cpu_threads=2,
                    hydrogen_mass_amu=1.5, timestep_ps=0.004)
    settings.update(changes)
    return simulation_config(**settings)


def test_a_split_run_resumes_exactly(tmp_path):
    straight = simulate(_config(), tmp_path / "a.h5", show_progress=False)
    resumed = simulate(_config(time_ps=1.0), tmp_path / "b.h5", show_progress=False)
    simulate(_config(time_ps=2.0), resumed, resume=True, show_progress=False)
    a, b = read_trajectory(straight), read_trajectory(resumed)
    assert np.array_equal(a.positions_nm, b.positions_nm)
    assert np.array_equal(a.energy_kj_mol, b.energy_kj_mol)


def test_a_split_run_resumes_on_one_thread(tmp_path):
    """Resumed with --threads 1 (one Context): the frames before the checkpoint are kept and
    the run goes on from every copy's last positions."""
    short = dict(save_every_ps=0.02, equilibration_ps=2.0)
    path = simulate(_config(time_ps=0.2, **short), tmp_path / "b.h5", show_progress=False)
    before = read_trajectory(path)
    simulate(_config(time_ps=0.4, cpu_threads=1, **short), path, resume=True, show_progress=False)
    after = read_trajectory(path)
    n = len(before.positions_nm)
    assert len(after.positions_nm) == 2 * n
    assert np.array_equal(after.positions_nm[:n], before.positions_nm)
    last, first_new = before.positions_nm[-4:], after.positions_nm[n:n + 4]
    # 20 fs later each copy is nearest to where it was, not to another copy
    distance = np.abs(first_new[:, None] - last[None]).max(axis=(2, 3))
    assert np.array_equal(distance.argmin(axis=1), np.arange(4))

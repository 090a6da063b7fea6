"""References users already have, and honest reference error bars: MBAR over the rungs of a
temperature ladder against exact answers, openmmtools storage files and trajectories mdtraj
reads as references, and the errors for bad ones."""

import json
import math
import shutil
import subprocess

import h5py
import numpy as np
import openmm
import pytest
from scipy.special import erfc
from typer.testing import CliRunner

from trademd.analysis.mbar import (block_bootstrap, mbar_weights, region_free_energy, reweight_ladder,
                                   time_blocks)
from trademd.analysis.observables import phi_psi
from trademd.cli.app import app
from trademd.energy.molecule import MoleculeEnergy
from trademd.errors import TradeMDError
from trademd.evaluate import evaluate_samples, load_reference
from trademd.io.samples_file import TemperatureSamples, read_samples, write_samples
from trademd.io.schema import group_name
from trademd.io.trajectory_file import read_trajectory
from trademd.io.openmmtools_storage import read_openmmtools_storage
from trademd.io.references import read_reference
from trademd.simulate import ExchangeConfig, SimulationConfig, simulate
from trademd.systems import get_system
from trademd.units import BOLTZMANN_KJ_MOL_K

runner = CliRunner()

# --- MBAR against exact answers: a harmonic oscillator U = k x^2 / 2 on a temperature ladder ---

SPRING_KJ_MOL_NM2, THRESHOLD_NM = 100.0, 0.25
LADDER_K = (300.0, 400.0, 530.0, 700.0)


def _exact_free_energy(temperature_k: float) -> float:
    """-ln P(x > a) / P(x < a) of x ~ N(0, kT / k)."""
    sigma = math.sqrt(BOLTZMANN_KJ_MOL_K * temperature_k / SPRING_KJ_MOL_NM2)
    p = 0.5 * erfc(THRESHOLD_NM / (math.sqrt(2.0) * sigma))
    return -math.log(p / (1.0 - p))


def _harmonic_ladder(seed: int, n: int = 400):
    """Independent exact samples at every rung: (x [K n] nm, energy [K n] kJ/mol, rung [K n],
    time [K n], the same save index at every rung)."""
    rng = np.random.default_rng(seed)
    x = np.concatenate([rng.normal(0.0, math.sqrt(BOLTZMANN_KJ_MOL_K * t / SPRING_KJ_MOL_NM2), n)
                        for t in LADDER_K])
    return (x, 0.5 * SPRING_KJ_MOL_NM2 * x ** 2, np.repeat(np.arange(len(LADDER_K)), n),
            np.tile(np.arange(n, dtype=np.float64), len(LADDER_K)))


@pytest.mark.parametrize("temperature_k", [350.0, 400.0], ids=["between-rungs", "a-rung"])
def test_mbar_over_a_harmonic_ladder_gives_the_exact_free_energy_with_a_sensible_error(temperature_k):
    exact = _exact_free_energy(temperature_k)
    # the spread of the point estimate over independent ladders
    estimates = []
    for seed in range(30):
        x, energy, rung, _ = _harmonic_ladder(seed)
        weights, _ = mbar_weights(energy, rung, LADDER_K, temperature_k)
        assert weights.sum() == pytest.approx(1.0) and np.all(weights >= 0)
        estimates.append(region_free_energy(x > THRESHOLD_NM, weights))
    spread = float(np.std(estimates, ddof=1))
    assert np.mean(estimates) == pytest.approx(exact, abs=3 * spread / math.sqrt(len(estimates)))
    errors = []
    for seed in range(100, 104):
        x, energy, rung, time = _harmonic_ladder(seed)
        estimate = reweight_ladder(energy, rung, time, LADDER_K, temperature_k, x > THRESHOLD_NM, seed=seed)
        assert abs(estimate.delta_f_kt - exact) < 4 * estimate.delta_f_kt_error
        assert estimate.n_blocks == 20 and len(estimate.resampled_delta_f_kt) == 100
        errors.append(estimate.delta_f_kt_error)
    assert 0.5 < np.mean(errors) / spread < 2.0


def test_mbar_at_a_rung_of_one_temperature_weights_its_frames_equally():
    """A ladder of one rung: the MBAR weights at its temperature are 1/N (no reweighting)."""
    _, energy, _, _ = _harmonic_ladder(0, n=50)
    weights, free_energies = mbar_weights(energy[:50], np.zeros(50, dtype=int), [300.0], 300.0)
    assert np.allclose(weights, 1 / 50, rtol=1e-10) and free_energies.tolist() == [0.0]


def test_bootstrap_blocks_hold_every_rung_at_their_saves():
    time = np.tile(np.repeat(np.arange(10.0), 2), 3)  # 3 rungs x 10 saves x 2 ladders
    blocks = time_blocks(time, 5)
    assert blocks.max() == 4
    assert all(len(np.unique(blocks[time == t])) == 1 for t in np.unique(time))
    assert np.array_equal(blocks[:20], np.repeat(np.arange(5), 4))
    for frames in block_bootstrap(blocks, 3, seed=1):
        assert len(frames) == len(time)
        _, counts = np.unique(time[frames], return_counts=True)
        assert np.all(counts % 6 == 0)  # whole saves: both ladders of all 3 rungs, once or more
    assert time_blocks(np.arange(3.0), 20).tolist() == [0, 1, 2]


# --- reference files: a replica-exchange ladder, an openmmtools storage, a DCD ---------------


def _mirror_odd_saves(path, n_ladders: int) -> None:
    """Reflect the frames of every other save, in every rung: alanine's force field does not
    tell mirror images apart (equal energies, checked), so the ladder still samples its
    Boltzmann distribution, now with phi > 0 populated."""
    energy = MoleculeEnergy(get_system("ala2-vacuum").create_openmm_system(), "Reference")
    with h5py.File(path, "a") as h5:
        for temperature in json.loads(h5["parameters"].attrs["temperatures_k"]):
            name = group_name(temperature)
            value = h5[f"particles/{name}/position/value"]
            positions = value[()]
            odd = (np.arange(len(positions)) // n_ladders) % 2 == 1
            positions[odd, :, 0] *= -1
            value[...] = positions
            stored = h5[f"observables/{name}/potential_energy/value"][()]
            assert np.allclose(energy(positions[odd][:3])[0], stored[odd][:3], atol=1e-2)


@pytest.fixture(scope="module")
def ladder(tmp_path_factory):
    """An ala2-vacuum replica-exchange file at 300, 400, 550 K: 20 saves x 2 ladders per rung."""
    path = simulate(ExchangeConfig(system_name="ala2-vacuum", temperatures_k=(300.0, 400.0, 550.0),
                                   time_ps=10.0, exchange_every_ps=0.2, ladders=2, save_every_ps=0.5,
                                   equilibration_ps=0.2, platform="CPU", chunk_saves=10, seed=5),
                    tmp_path_factory.mktemp("ladder") / "rx.h5", show_progress=False)
    _mirror_odd_saves(path, 2)
    return path


@pytest.fixture(scope="module")
def storage(tmp_path_factory):
    """An openmmtools ParallelTemperingSampler run of ala2-vacuum, 300-500 K in 3 states, 8
    iterations checkpointed every 2nd: (storage path, its temperatures)."""
    from openmm import unit

    from trademd.progress import quiet_loggers

    with quiet_loggers("openmmtools", "pymbar"):
        from openmmtools import cache, mcmc, multistate, states

        molecule = get_system("ala2-vacuum")
        path = tmp_path_factory.mktemp("storage") / "pt.nc"
        sampler = multistate.ParallelTemperingSampler(
            mcmc_moves=mcmc.LangevinDynamicsMove(timestep=1.0 * unit.femtosecond, n_steps=50),
            number_of_iterations=8)
        reporter = multistate.MultiStateReporter(str(path), checkpoint_interval=2)
        sampler.create(thermodynamic_state=states.ThermodynamicState(molecule.create_openmm_system(),
                                                                     300 * unit.kelvin),
                       sampler_states=states.SamplerState(molecule.positions_nm() * unit.nanometer),
                       storage=reporter, min_temperature=300 * unit.kelvin,
                       max_temperature=500 * unit.kelvin, n_temperatures=3)
        # name the platform: openmmtools otherwise takes the fastest, OpenCL where pocl is
        # installed (and the minimiser kernels crash there)
        cpu = openmm.Platform.getPlatformByName("CPU")
        sampler.energy_context_cache = cache.ContextCache(platform=cpu)
        sampler.sampler_context_cache = cache.ContextCache(platform=cpu)
        sampler.run()
        reporter.close()
    return path


def _samples_from_frames(path, trajectory, temperature_k=None, system="ala2-vacuum"):
    """A samples file of ``system`` holding a reference's own frames with equal weights."""
    molecule = get_system(system)
    n = trajectory.n_frames
    phi, psi = phi_psi(molecule, trajectory.positions_nm)
    samples = TemperatureSamples(
        temperature_k=temperature_k or trajectory.temperature_k, positions_nm=trajectory.positions_nm,
        log_prob=np.zeros(n), energy_kj_mol=trajectory.energy_kj_mol, log_weights=np.zeros(n),
        weights=np.full(n, 1.0 / n), wrong_chirality=np.zeros(n, dtype=bool),
        nonfinite_energy=np.zeros(n, dtype=bool), phi=phi, psi=psi, ramachandran_png=b"png")
    write_samples(path, [samples], {"system": molecule.name, "forcefield_files": list(molecule.forcefield_files)},
                  molecule.pdb_text, overwrite=True)
    return path


def test_a_ladder_reference_is_pooled_by_mbar_with_a_bootstrap_error(ladder, tmp_path):
    samples = _samples_from_frames(tmp_path / "s.h5", read_trajectory(ladder, 400.0))
    metrics = evaluate_samples(samples, ladder, 400.0, bootstrap_resamples=30)
    # the rung's own numbers, as before
    assert metrics["n_reference_frames"] == 40 and metrics["js_phi_psi_weighted"] == pytest.approx(0, abs=1e-12)
    assert metrics["delta_f_positive_phi_kt"] == pytest.approx(metrics["reference_delta_f_positive_phi_kt"])
    # the pooled ones: all 120 frames, a finite error from the resamples
    assert metrics["reference_mbar_rungs"] == [300.0, 400.0, 550.0] and metrics["reference_mbar_frames"] == 120
    assert metrics["reference_mbar_bootstrap_resamples"] == 30 and metrics["reference_mbar_bootstrap_blocks"] == 20
    assert 0 < metrics["reference_mbar_delta_f_positive_phi_kt_error"] < 2
    assert 40 < metrics["reference_mbar_effective_frames"] <= 120
    assert 0 <= metrics["js_phi_psi_weighted_mbar"] <= math.log(2)
    # the bootstrap is seeded
    key = "reference_mbar_delta_f_positive_phi_kt_error"
    assert evaluate_samples(samples, ladder, 400.0, bootstrap_resamples=30)[key] == metrics[key]
    assert evaluate_samples(samples, ladder, 400.0, bootstrap_resamples=30, seed=1)[key] != metrics[key]
    # between rungs only MBAR compares
    between = evaluate_samples(_samples_from_frames(tmp_path / "s350.h5", read_trajectory(ladder, 400.0), 350.0),
                               ladder, 350.0, bootstrap_resamples=10)
    assert "kl_phi_psi_weighted" not in between and "reference_delta_f_positive_phi_kt" not in between
    assert between["reference_mbar_delta_f_positive_phi_kt_error"] > 0


def test_openmmtools_storage_frames_are_the_reporters_own(storage):
    from openmm import unit

    from trademd.progress import quiet_loggers

    trajectories, energies_stored = read_openmmtools_storage(storage)
    with quiet_loggers("openmmtools"):
        from openmmtools import multistate

        reporter = multistate.MultiStateReporter(str(storage), open_mode="r")
        try:
            thermodynamic_states, _ = reporter.read_thermodynamic_states()
            state_of_replica = reporter.read_replica_thermodynamic_states()
            reduced, _, _ = reporter.read_energies()
            expected = {}
            for iteration in (2, 4, 6, 8):
                for replica, sampler_state in enumerate(reporter.read_sampler_states(iteration)):
                    state = int(state_of_replica[iteration, replica])
                    kt = BOLTZMANN_KJ_MOL_K * thermodynamic_states[state].temperature.value_in_unit(unit.kelvin)
                    positions = sampler_state.positions.value_in_unit(unit.nanometer)
                    expected.setdefault(state, []).append((positions, reduced[iteration, replica, state] * kt))
        finally:
            reporter.close()
    temperatures = [t.temperature_k for t in trajectories]
    assert energies_stored and temperatures == sorted(temperatures) and len(temperatures) == 3
    assert temperatures[0] == pytest.approx(300.0) and temperatures[-1] == pytest.approx(500.0)
    for state, trajectory in enumerate(trajectories):  # the sampler's states ascend in temperature
        positions = np.stack([p for p, _ in expected[state]])
        assert np.array_equal(trajectory.positions_nm.astype(np.float64), positions)
        assert np.array_equal(trajectory.energy_kj_mol, [e for _, e in expected[state]])
        assert trajectory.time_ps.tolist() == pytest.approx([0.1, 0.2, 0.3, 0.4])  # iterations x 50 fs
    # the stored energies are ala2-vacuum's
    energy = MoleculeEnergy(get_system("ala2-vacuum").create_openmm_system(), "Reference")
    assert np.allclose(energy(trajectories[1].positions_nm)[0], trajectories[1].energy_kj_mol, atol=1e-2)
    # picked by temperature, between the states by MBAR
    reference = read_reference(storage)
    assert reference.kind == "openmmtools" and reference.rung_index(500.0) == 2
    assert reference.rung_index(450.0) is None and reference.target_temperature(450.0) == 450.0


def test_evaluate_against_an_openmmtools_storage(storage, tmp_path):
    trajectories, _ = read_openmmtools_storage(storage)
    samples = _samples_from_frames(tmp_path / "s.h5", trajectories[0], 300.0)
    metrics = evaluate_samples(samples, storage, 300.0, bootstrap_resamples=10)
    assert metrics["reference_format"] == "openmmtools" and metrics["reference_energies"] == "stored"
    assert metrics["n_reference_frames"] == 4 and metrics["energy_w1_weighted_kj_mol"] == pytest.approx(0, abs=1e-9)
    assert metrics["reference_mbar_frames"] == 12 and len(metrics["reference_mbar_rungs"]) == 3


def test_a_dcd_with_a_topology_reads_like_its_hdf5_file(tmp_path):
    path = simulate(SimulationConfig(system_name="ala2-vacuum", temperature_k=600.0, time_ps=3.0, replicas=2,
                                     save_every_ps=0.5, equilibration_ps=0.5, platform="CPU"),
                    tmp_path / "md.h5", show_progress=False)
    trajectory = read_trajectory(path)
    frames = trajectory.to_mdtraj()
    frames.save_dcd(str(tmp_path / "md.dcd"))
    frames[0].save_pdb(str(tmp_path / "md.pdb"))
    samples = _samples_from_frames(tmp_path / "s.h5", trajectory)
    from_hdf5, molecule = load_reference(path, read_samples(samples), platform="Reference")
    from_dcd, _ = load_reference(tmp_path / "md.dcd", read_samples(samples), 600.0, tmp_path / "md.pdb",
                                 platform="Reference")
    assert from_dcd.kind == "mdtraj" and not from_dcd.energies_stored and from_dcd.temperatures_k == [600.0]
    hdf5, dcd = from_hdf5.ensembles[0], from_dcd.ensembles[0]
    assert np.allclose(dcd.positions_nm, hdf5.positions_nm, atol=1e-5)
    for angle_dcd, angle_hdf5 in zip(phi_psi(molecule, dcd.positions_nm), phi_psi(molecule, hdf5.positions_nm)):
        assert np.allclose(angle_dcd, angle_hdf5, atol=1e-4)
    assert np.allclose(dcd.energy_kj_mol, hdf5.energy_kj_mol, atol=2e-2)  # OpenMM against the stored energies
    via_dcd = evaluate_samples(samples, tmp_path / "md.dcd", 600.0, topology_path=tmp_path / "md.pdb")
    via_hdf5 = evaluate_samples(samples, path)
    assert via_dcd["reference_energies"] == "recomputed" and via_hdf5["reference_energies"] == "stored"
    for key in ("kl_phi_psi_weighted", "js_phi_psi_unweighted", "n_reference_frames"):
        assert via_dcd[key] == pytest.approx(via_hdf5[key], abs=1e-9)
    assert via_dcd["energy_w1_weighted_kj_mol"] == pytest.approx(via_hdf5["energy_w1_weighted_kj_mol"], abs=2e-2)


# --- the command line ---------------------------------------------------------------------------


def _one_line_error(result, *words):
    assert result.exit_code == 1 and "Traceback" not in result.output
    lines = [line for line in result.output.strip().splitlines() if line.startswith("error:")]
    assert len(lines) == 1, result.output
    for word in words:
        assert word in lines[0], lines[0]


def test_bad_references_get_one_line_errors(ladder, storage, tmp_path):
    samples = _samples_from_frames(tmp_path / "s.h5", read_trajectory(ladder, 300.0))
    (tmp_path / "ref.foo").write_text("x")
    (tmp_path / "text.nc").write_text("not netcdf")
    (tmp_path / "alone").mkdir()
    shutil.copy(storage, tmp_path / "alone" / "pt.nc")  # without its checkpoint file
    frames = read_trajectory(ladder, 300.0).to_mdtraj()
    frames.save_dcd(str(tmp_path / "r.dcd"))
    frames.atom_slice(range(10))[0].save_pdb(str(tmp_path / "ten_atoms.pdb"))
    frames[0].save_pdb(str(tmp_path / "r.pdb"))
    cases = [
        (["--reference", str(tmp_path / "ref.foo")], ["unknown reference format '.foo'", "--topology"]),
        (["--reference", str(tmp_path / "missing.dcd")], ["not found"]),
        (["--reference", str(tmp_path / "r.dcd"), "--temperature", "300"], ["holds no topology", "--topology PDB"]),
        (["--reference", str(tmp_path / "r.dcd"), "--topology", str(tmp_path / "r.pdb")], ["--temperature"]),
        (["--reference", str(tmp_path / "r.dcd"), "--topology", str(tmp_path / "nothing.pdb"),
          "--temperature", "300"], ["topology file", "not found"]),
        (["--reference", str(tmp_path / "r.dcd"), "--topology", str(tmp_path / "ten_atoms.pdb"),
          "--temperature", "300"], ["mdtraj cannot read"]),
        (["--reference", str(ladder), "--topology", str(tmp_path / "r.pdb"), "--temperature", "300"],
         ["leave out --topology"]),
        (["--reference", str(ladder)], ["pick one with --temperature"]),
        (["--reference", str(ladder), "--temperature", "600"], ["600 K is outside the ladder", "300 to 550 K"]),
        (["--reference", str(storage), "--temperature", "250"], ["250 K is outside the ladder"]),
        (["--reference", str(tmp_path / "alone" / "pt.nc"), "--temperature", "300"], ["checkpoint file", "beside"]),
        (["--reference", str(tmp_path / "text.nc"), "--temperature", "300"], ["not a NetCDF file"]),
    ]
    for words, message in cases:
        _one_line_error(runner.invoke(app, ["evaluate", "--samples", str(samples), *words]), *message)
    # the storage's energies are ala2-vacuum's, not those of the samples' implicit-solvent system
    implicit = _samples_from_frames(tmp_path / "implicit.h5", read_trajectory(ladder, 300.0), system="ala2-implicit")
    _one_line_error(runner.invoke(app, ["evaluate", "--samples", str(implicit), "--reference", str(storage),
                                        "--temperature", "300"]),
                    "differ from those of the samples' system 'ala2-implicit'", "another system")
    with pytest.raises(TradeMDError, match="at least 2 resamples"):
        reweight_ladder(np.zeros(4), np.zeros(4, dtype=int), np.arange(4.0), [300.0], 300.0,
                        np.arange(4) > 1, n_resamples=1)


def test_the_command_prints_the_reference_error_next_to_the_samples(ladder, tmp_path):
    samples = _samples_from_frames(tmp_path / "s.h5", read_trajectory(ladder, 400.0))
    result = runner.invoke(app, ["evaluate", "--samples", str(samples), "--reference", str(ladder),
                                 "--temperature", "400", "--bootstrap", "20"])
    assert result.exit_code == 0, result.output
    free_energies = next(line for line in result.stdout.splitlines() if line.startswith("dF(phi>0 vs phi<0)"))
    parts = free_energies.split(": ", 1)[1].split("; ")
    assert parts[0].startswith("samples ") and " +- " in parts[0]
    assert parts[1].startswith("reference ") and " +- " in parts[1]
    assert parts[2].startswith("reference MBAR ") and " +- " in parts[2] and "20 blocks x 20" in parts[2]
    metrics = json.loads((tmp_path / "s_T400_metrics.json").read_text())
    assert f"{metrics['reference_mbar_delta_f_positive_phi_kt_error']:.3f}" in parts[2]
    assert (tmp_path / "s_T400_metrics.png").is_file()
    result = runner.invoke(app, ["evaluate", "--samples", str(samples), "--reference", str(ladder),
                                 "--temperature", "400", "--bootstrap", "20", "--json"])
    assert json.loads(result.stdout) == metrics


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["replica-exchange", "openmmtools"])
def test_the_console_script_prints_no_library_banner(kind, request, tmp_path):
    """pymbar logs "JAX NOT FOUND" on import and openmmtools an "experimental API" warning
    when a storage is opened: neither reaches the terminal."""
    if kind == "openmmtools":
        reference = request.getfixturevalue("storage")
        frames = read_openmmtools_storage(reference)[0][0]
    else:
        reference = request.getfixturevalue("ladder")
        frames = read_trajectory(reference, 300.0)
    samples = _samples_from_frames(tmp_path / "s.h5", frames, 300.0)
    completed = subprocess.run(["trade-md", "evaluate", "--samples", str(samples), "--reference", str(reference),
                                "--temperature", "300", "--bootstrap", "5"],
                               capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr
    assert completed.stderr == "" and "JAX" not in completed.stdout and "experimental" not in completed.stdout
    assert "reference MBAR" in completed.stdout

"""The OpenMM energy bridge equals a plain single-molecule Context, in every path it takes."""

import multiprocessing
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import h5py
import numpy as np
import openmm
import pytest
import torch
from typer.testing import CliRunner

from trademd.cli.app import app
from trademd.energy.bridge import EnergyBridge, potential_energy
from trademd.energy.molecule import MoleculeEnergy
from trademd.energy.pool import ReplicatedKernel
from trademd.errors import TradeMDError
from trademd.units import BOLTZMANN_KJ_MOL_K


def _configurations(molecule, n_random: int = 36, seed: int = 0) -> np.ndarray:
    """Random perturbations of the PDB structure (0.002-0.02 nm), a translated one, and badly
    clashing ones (two atoms 0.01 nm apart), float64 [n_random + 4, atoms, 3] nm."""
    rng = np.random.default_rng(seed)
    reference = molecule.positions_nm()
    scale = rng.uniform(0.002, 0.02, size=(n_random, 1, 1))
    configurations = list(reference[None] + scale * rng.normal(size=(n_random, molecule.n_atoms, 3)))
    configurations.append(reference + np.array([40.0, -25.0, 13.0]))
    for i, j in ((0, 21), (5, 17), (9, 12)):
        clash = reference.copy()
        clash[j] = clash[i] + np.array([0.01, 0.0, 0.0])
        configurations.append(clash)
    return np.stack(configurations)


def _assert_exact(energy, forces, reference_energy, reference_forces, relative=1e-6, force_relative=1e-6):
    """|dU| <= 1e-3 kJ/mol or `relative`; |dF| <= 1e-2 kJ/mol/nm + `force_relative` max|F|."""
    energy, forces = np.asarray(energy, dtype=np.float64), np.asarray(forces, dtype=np.float64)
    energy_tolerance = np.maximum(1e-3, relative * np.abs(reference_energy))
    assert np.all(np.abs(energy - reference_energy) <= energy_tolerance)
    force_tolerance = 1e-2 + force_relative * np.abs(reference_forces).max(axis=(1, 2))
    assert np.all(np.abs(forces - reference_forces).max(axis=(1, 2)) <= force_tolerance)


def _stat(pid: int) -> tuple[str, int] | None:
    """(state letter, parent pid) of process ``pid`` from /proc, or None if there is none."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            state, parent = stat.read().rsplit(")", 1)[1].split()[:2]
    except (FileNotFoundError, ProcessLookupError):
        return None
    return state, int(parent)


def _running(pid: int) -> bool:
    """Whether process ``pid`` exists and is not a zombie."""
    stat = _stat(pid)
    return stat is not None and stat[0] != "Z"


def _reaped(pid: int) -> bool:
    """Whether ``pid`` is gone from this process's children: neither running nor a zombie
    left unreaped (a zombie child of ours still has /proc/pid with our pid as parent)."""
    stat = _stat(pid)
    return stat is None or stat[1] != os.getpid()


def _children() -> list[int]:
    """Process ids whose parent is this process (running or zombie), from /proc."""
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            stat = _stat(int(entry))
            if stat is not None and stat[1] == os.getpid():
                pids.append(int(entry))
    return pids


@pytest.fixture(scope="module")
def pooled(molecule):
    """A bridge with two worker processes that uses them for batches of 8 or more."""
    with EnergyBridge(molecule, platform="Reference", workers=2, min_pool_batch=8) as bridge:
        yield bridge


@pytest.fixture(scope="module")
def references(molecule):
    """Plain single-molecule Contexts: (CPU platform, Reference platform)."""
    system = molecule.create_openmm_system()
    return MoleculeEnergy(system, "CPU"), MoleculeEnergy(system, "Reference")


def test_pool_equals_single_molecule_context(molecule, pooled, references):
    x = _configurations(molecule)
    energy, forces = pooled.evaluate(torch.tensor(x))
    assert len(pooled.worker_pids) == 2
    assert energy.dtype == forces.dtype == torch.float64
    assert energy.shape == (len(x),) and forces.shape == x.shape
    cpu, reference = references
    # Same platform (double precision): exact, clashes (energies ~1e16 kJ/mol) included.
    _assert_exact(energy, forces, *reference(x), relative=1e-9, force_relative=1e-9)
    # The CPU platform works in single precision: it loses digits at 40 nm from the origin
    # (left out here), and its clash energies are only good to ~1e-4 relative (r = 0.01 nm
    # is a difference of two ~1 nm float32 coordinates, and U ~ r^-12).
    e_cpu, f_cpu = cpu(x[:-4])
    _assert_exact(energy[:-4], forces[:-4], e_cpu, f_cpu)
    e_cpu, f_cpu = cpu(x[-3:])
    _assert_exact(energy[-3:], forces[-3:], e_cpu, f_cpu, relative=1e-4, force_relative=1e-4)
    assert pooled.n_overflow == 0


def test_auto_bridge_equals_single_molecule_context(molecule, references):
    x = _configurations(molecule, n_random=10)[:-4]
    with EnergyBridge(molecule, workers=0) as bridge:
        assert bridge.platform in ("Reference", "CPU") and bridge.kernel == "single"
        energy, forces = bridge.evaluate(torch.tensor(x))
    _assert_exact(energy, forces, *references[0](x))


def test_replicated_kernel_is_exact(molecule, references):
    """Per-copy replicated Contexts (CPU and double-precision Reference), with a partly filled
    last chunk; an over-extended configuration is routed to the single-molecule Context."""
    x = _configurations(molecule, n_random=6)
    stretched = molecule.positions_nm()
    stretched[0] += np.array([1.6, 0.0, 0.0])  # 1.5 nm or more from the centroid
    x = np.concatenate([x, stretched[None]])
    system = molecule.create_openmm_system()
    kernel = ReplicatedKernel(system, 4, "Reference", molecule_radius_nm=1.0)
    assert list(kernel.fits(x)) == [True] * (len(x) - 1) + [False]
    _assert_exact(*kernel(x), *references[1](x), relative=1e-9, force_relative=1e-9)
    with EnergyBridge(molecule, platform="CPU", kernel="replicated", copies=4, workers=0) as bridge:
        energy, forces = bridge.evaluate(torch.tensor(x))
    e_cpu, f_cpu = references[0](x)
    _assert_exact(energy, forces, e_cpu, f_cpu, relative=1e-4, force_relative=1e-4)


def test_replicated_kernel_in_workers(molecule, references):
    x = _configurations(molecule, n_random=12)[:-3]
    with EnergyBridge(molecule, platform="Reference", kernel="replicated", copies=4, workers=1,
                      min_pool_batch=1) as bridge:
        energy, forces = bridge.evaluate(torch.tensor(x))
        assert len(bridge.worker_pids) == 1
    _assert_exact(energy, forces, *references[1](x), relative=1e-9, force_relative=1e-9)


def test_pool_scheduling_covers_every_configuration_once():
    """Any batch size, chunk sizes, with or without this process working along."""
    from trademd.energy.pool import SingleKernel, WorkerPool
    from trademd.systems import get_system

    molecule = get_system("ala2-vacuum")
    system = molecule.create_openmm_system()
    spec = {"kind": "single", "system_xml": openmm.XmlSerializer.serialize(system),
            "platform": "Reference", "properties": {}}
    kernel = SingleKernel(system, "Reference")
    x = _configurations(molecule, n_random=300)[:300]
    pool = WorkerPool(spec, 2)
    pids = pool.pids
    try:
        for n, max_chunk, local, min_chunk in ((1, 1, None, 8), (7, 3, kernel, 8), (50, 64, None, 8),
                                               (300, 40, kernel, 8), (300, 2, kernel, 1)):
            energy, forces = pool.evaluate(x[:n], max_chunk, local=local, local_chunk=5,
                                           min_chunk=min_chunk)
            expected_energy, expected_forces = kernel(x[:n])
            assert np.array_equal(energy, expected_energy) and np.array_equal(forces, expected_forces)
        assert all(_running(p) for p in pids)
    finally:
        pool.close()
    assert len(pids) == 2 and all(_reaped(p) for p in pids)


def test_float32_input_gives_float32_output_and_no_value_caching(molecule, pooled, references):
    x = torch.tensor(_configurations(molecule, n_random=4)[:4], dtype=torch.float32)
    energy, forces = pooled.evaluate(x)
    assert energy.dtype == forces.dtype == torch.float32
    _assert_exact(energy, forces, *references[1](x.double().numpy()))
    x[0, 3] += 0.05  # in place: the next call must see the new positions
    energy_after, _ = pooled.evaluate(x)
    assert energy_after[0] != energy[0]
    assert energy_after[0].item() == pytest.approx(references[1](x[:1].double().numpy())[0][0], abs=1e-3)


def test_gradient_is_minus_forces_and_matches_finite_differences(molecule):
    rng = np.random.default_rng(3)
    start = molecule.positions_nm()[None] + rng.normal(0.0, 0.005, size=(2, molecule.n_atoms, 3))
    with EnergyBridge(molecule, platform="Reference", workers=0) as bridge:
        x = torch.tensor(start, requires_grad=True)
        potential_energy(x, bridge).sum().backward()
        _, forces = bridge.evaluate(x)
        assert torch.equal(x.grad, -forces)
        direction = torch.tensor(rng.normal(size=start.shape))
        step = 1e-5
        with torch.no_grad():
            difference = (bridge.potential_energy(x + step * direction)
                          - bridge.potential_energy(x - step * direction)) / (2 * step)
        directional = (x.grad * direction).sum(dim=(1, 2))
        assert torch.allclose(difference, directional, rtol=1e-6, atol=1e-4)
        assert torch.autograd.gradcheck(
            lambda y: potential_energy(y, bridge), (x.detach()[:1].requires_grad_(),),
            eps=1e-6, atol=1e-3, rtol=1e-5,
        )


def test_reduced_energy_per_sample_temperature(molecule, pooled):
    x = torch.tensor(_configurations(molecule, n_random=3)[:3], requires_grad=True)
    temperature_k = torch.tensor([300.0, 450.0, 600.0], dtype=torch.float64, requires_grad=True)
    u = pooled.reduced_energy(x, temperature_k)
    energy, forces = pooled.evaluate(x)
    assert torch.allclose(u, energy / (BOLTZMANN_KJ_MOL_K * temperature_k), rtol=1e-12)
    u.sum().backward()
    kt = BOLTZMANN_KJ_MOL_K * temperature_k.detach()
    assert torch.allclose(x.grad, -forces / kt[:, None, None], rtol=1e-12)
    assert torch.allclose(temperature_k.grad, -energy / (kt * temperature_k.detach()), rtol=1e-12)
    assert torch.allclose(pooled.reduced_energy(x, 300.0), energy / (BOLTZMANN_KJ_MOL_K * 300.0))
    for bad in (torch.tensor([300.0, -1.0, 300.0]), torch.tensor([300.0, 300.0]), float("nan")):
        with pytest.raises(TradeMDError, match="temperature"):
            pooled.reduced_energy(x, bad)


def test_invalid_positions_are_refused(molecule, pooled):
    good = torch.tensor(molecule.positions_nm()[None].repeat(3, axis=0))
    for value, word in ((float("nan"), "NaN"), (float("inf"), "infinite")):
        bad = good.clone()
        bad[1, 4, 2] = value
        with pytest.raises(TradeMDError, match=word) as error:
            pooled.evaluate(bad)
        assert "\n" not in str(error.value)
    with pytest.raises(TradeMDError, match="shape"):
        pooled.evaluate(good[:, :5])
    with pytest.raises(TradeMDError, match="float32 or float64"):
        pooled.evaluate(good.to(torch.float16))
    assert pooled.evaluate(good[:0])[0].shape == (0,)


def test_overlapping_atoms_give_infinite_energy_and_zero_force(molecule, references):
    """Atoms on top of each other, and an energy beyond float32 (two atoms 1e-4 nm apart):
    +inf and zero force, counted; the other configurations of the batch stay exact."""
    reference = molecule.positions_nm()
    on_top, very_close = reference.copy(), reference.copy()
    on_top[21] = on_top[0]
    very_close[21] = very_close[0] + np.array([1e-4, 0.0, 0.0])
    x = np.stack([reference, on_top, very_close, reference])
    with EnergyBridge(molecule, platform="Reference", workers=0) as bridge:
        energy, forces = bridge.evaluate(torch.tensor(x))
        assert energy[1] == float("inf") and torch.all(forces[1] == 0)
        assert 3.4e38 < energy[2] < float("inf")  # finite and right in float64
        assert bridge.n_overflow == 1
        x32 = torch.tensor(x, dtype=torch.float32, requires_grad=True)
        energy32 = bridge.potential_energy(x32)
        assert torch.isinf(energy32[1:3]).all() and bridge.n_overflow == 3
        energy32[[0, 3]].sum().backward()
        assert torch.all(x32.grad[1:3] == 0) and torch.isfinite(x32.grad).all()
    _assert_exact(energy[[0, 3]], forces[[0, 3]], *references[1](x[[0, 3]]))


def test_threads_share_a_bridge(molecule, pooled, references):
    batches = [_configurations(molecule, n_random=12, seed=s)[:12] for s in range(4)]
    expected = [references[1](b)[0] for b in batches]
    failures = []

    def run(index):
        for _ in range(3):
            energy, _ = pooled.evaluate(torch.tensor(batches[index]))
            if not np.allclose(energy.numpy(), expected[index], rtol=1e-9, atol=1e-6):
                failures.append(index)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(batches))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert failures == []


def test_forked_child_does_not_use_the_parent_workers(molecule, pooled, references):
    """A forked child evaluates small batches in-process, starts its own workers for large
    ones (children of its own, not the parent's), stops only those when it closes, and leaves
    the parent's workers running and usable."""
    x = _configurations(molecule, n_random=8)[:8]
    pooled.evaluate(torch.tensor(x))
    parent_workers = pooled.worker_pids
    assert len(parent_workers) == 2 and set(parent_workers) <= set(_children())
    assert all(_running(p) for p in parent_workers)
    expected = references[1](x)[0]
    pid = os.fork()
    if pid == 0:  # the child: leave with os._exit as OpenMM needs
        status = 1
        try:
            energy, _ = pooled.evaluate_numpy(x[:2])  # below min_pool_batch: in-process
            if pooled.worker_pids != [] or _children() or not np.allclose(energy, expected[:2], rtol=1e-9):
                status = 2
            else:
                energy, _ = pooled.evaluate_numpy(x)  # pooled: the child's own workers
                own = pooled.worker_pids
                if (len(own) != 2 or set(own) & set(parent_workers) or set(own) != set(_children())
                        or not np.allclose(energy, expected, rtol=1e-9)):
                    status = 3
                else:
                    pooled.close()
                    stopped = all(_reaped(p) for p in own) and not _children()
                    status = 0 if stopped and all(_running(p) for p in parent_workers) else 4
        finally:
            os._exit(status)
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
    assert pooled.worker_pids == parent_workers and all(_running(p) for p in parent_workers)
    energy, _ = pooled.evaluate(torch.tensor(x))
    assert np.allclose(energy.numpy(), expected, rtol=1e-9)


def _evaluate_in_daemon(bridge, positions_nm, queue):
    energy, _ = bridge.evaluate_numpy(positions_nm)
    queue.put((energy, bridge.worker_pids, _children()))


def test_daemonic_forked_child_evaluates_in_process(molecule, pooled, references):
    """A DataLoader-style worker (forked, daemonic, may not have children) still gets exact
    energies, in-process, and its exit leaves the parent's workers running."""
    x = _configurations(molecule, n_random=8)[:8]
    pooled.evaluate(torch.tensor(x))
    parent_workers = pooled.worker_pids
    context = multiprocessing.get_context("fork")
    queue = context.SimpleQueue()
    child = context.Process(target=_evaluate_in_daemon, args=(pooled, x, queue), daemon=True)
    child.start()
    energy, child_workers, child_children = queue.get()
    child.join(30)
    assert child.exitcode == 0 and child_workers == [] and child_children == []
    assert np.allclose(energy, references[1](x)[0], rtol=1e-9)
    assert pooled.worker_pids == parent_workers and all(_running(p) for p in parent_workers)


def test_close_and_exceptions_leave_no_child_processes():
    from trademd.systems import get_system

    molecule = get_system("ala2-vacuum")
    x = torch.tensor(_configurations(molecule, n_random=4)[:4])
    bridge = EnergyBridge(molecule, workers=1, min_pool_batch=1)
    bridge.evaluate(x)
    pids = bridge.worker_pids
    assert len(pids) == 1 and _running(pids[0])
    assert set(pids) <= set(_children())
    bridge.close()
    bridge.close()
    assert bridge.worker_pids == [] and all(_reaped(p) for p in pids)
    with pytest.raises(TradeMDError, match="closed"):
        bridge.evaluate(x)

    with pytest.raises(RuntimeError, match="inside"):
        with EnergyBridge(molecule, workers=1, min_pool_batch=1) as bridge:
            bridge.evaluate(x)
            pids = bridge.worker_pids
            assert len(pids) == 1 and _running(pids[0])
            raise RuntimeError("inside the with block")
    assert all(_reaped(p) for p in pids)


def test_a_killed_worker_is_an_error_then_the_pool_restarts(molecule, references):
    x = _configurations(molecule, n_random=16)[:16]
    with EnergyBridge(molecule, platform="Reference", workers=1, min_pool_batch=1) as bridge:
        bridge.evaluate_numpy(x)
        (pid,) = bridge.worker_pids
        os.kill(pid, signal.SIGKILL)
        with pytest.raises(TradeMDError, match="died"):
            bridge.evaluate_numpy(x)
        assert _reaped(pid)
        energy, _ = bridge.evaluate_numpy(x)
        (restarted,) = bridge.worker_pids
        assert restarted != pid and _running(restarted)
    assert _reaped(restarted)
    assert np.allclose(energy, references[1](x)[0], rtol=1e-9)


def test_workers_exit_when_the_parent_dies(tmp_path):
    script = textwrap.dedent("""
        import os, signal, numpy as np
        from trademd.energy.bridge import EnergyBridge
        from trademd.systems import get_system
        molecule = get_system("ala2-vacuum")
        bridge = EnergyBridge(molecule, platform="Reference", workers=2, min_pool_batch=1)
        bridge.evaluate_numpy(molecule.positions_nm()[None].repeat(4, axis=0))
        for pid in bridge.worker_pids:
            os.kill(pid, 0)  # running (raises ProcessLookupError if not)
        print(*bridge.worker_pids, flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60,
                            cwd=tmp_path)  # not the repository root: use the installed package
    assert result.returncode == -signal.SIGKILL, result.stderr
    pids = [int(p) for p in result.stdout.split()]
    assert len(pids) == 2
    deadline = time.monotonic() + 10.0
    while any(_running(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(_running(p) for p in pids)


def test_bad_arguments_are_one_line_errors(molecule):
    for kwargs, word in (({"platform": "GPU"}, "platform"), ({"kernel": "fast"}, "kernel"),
                         ({"workers": -1}, "workers")):
        with pytest.raises(TradeMDError, match=word):
            EnergyBridge(molecule, **kwargs)
    with pytest.raises(TradeMDError, match="MolecularSystem"):
        EnergyBridge("ala2-vacuum")
    if not torch.cuda.is_available():
        from trademd.platforms import available_openmm_platforms

        if "CUDA" not in available_openmm_platforms():
            with pytest.raises(TradeMDError, match="not available"):
                EnergyBridge(molecule, platform="CUDA")


@pytest.mark.cuda
def test_cuda_bridge_equals_single_molecule_context(molecule, references):
    """What a GPU user gets from platform CUDA: replicated per-copy Contexts on the GPU, for
    vacuum and implicit solvent alike, equal to a double-precision single-molecule Context."""
    x = _configurations(molecule)[:-3]
    with EnergyBridge(molecule, platform="CUDA") as bridge:
        energy, forces = bridge.evaluate(torch.tensor(x, device="cuda"))
        assert bridge.kernel == "replicated" and bridge.n_workers == 0
    assert energy.device.type == "cuda"
    _assert_exact(energy.cpu(), forces.cpu(), *references[1](x), relative=1e-5, force_relative=1e-5)


#: The energies and positions of a 300 K trajectory file (H5MD layout).
ENERGY = "observables/T300/potential_energy/value"
POSITIONS = "particles/T300/position/value"


@pytest.fixture(scope="module")
def trajectory(tmp_path_factory):
    """A tiny ala2-vacuum trajectory: 2 replicas, 2 saves, 4 frames."""
    from trademd.simulate import SimulationConfig, simulate

    path = tmp_path_factory.mktemp("energy") / "t.h5"
    config = SimulationConfig(system_name="ala2-vacuum", temperature_k=300, time_ps=2, replicas=2,
                              save_every_ps=1, equilibration_ps=0)
    return simulate(config, path, show_progress=False)


def test_energy_command_recomputes_and_writes(trajectory):
    runner = CliRunner()
    result = runner.invoke(app, ["energy", str(trajectory)])
    assert result.exit_code == 0, result.output
    lines = dict(line.split(": ", 1) for line in result.output.strip().splitlines())
    assert lines["frames"] == "4"
    assert float(lines["max |recomputed - stored|"].split()[0]) < 1e-3
    with h5py.File(trajectory, "r") as h5:
        stored = h5[ENERGY][()]
        positions = h5[POSITIONS][()]
    assert float(lines["mean energy"].split()[0]) == pytest.approx(stored.mean(), abs=1e-3)

    with h5py.File(trajectory, "a") as h5:  # spoil one stored energy
        h5[ENERGY][1] += 5.0
    result = runner.invoke(app, ["energy", str(trajectory), "--write", "--platform", "Reference"])
    assert result.exit_code == 0, result.output
    lines = dict(line.split(": ", 1) for line in result.output.strip().splitlines() if ": " in line)
    assert float(lines["max |recomputed - stored|"].split()[0]) == pytest.approx(5.0, abs=1e-2)
    assert "wrote" in result.output
    from trademd.systems import get_system

    expected, _ = MoleculeEnergy(get_system("ala2-vacuum").create_openmm_system(), "Reference")(positions)
    with h5py.File(trajectory, "r") as h5:
        assert np.allclose(h5[ENERGY][()], expected, rtol=1e-12, atol=1e-9)


def test_energy_command_bad_input(tmp_path):
    runner = CliRunner()
    result = runner.invoke(app, ["energy", str(tmp_path / "missing.h5")])
    assert result.exit_code == 1 and "not found" in result.output
    assert len(result.output.strip().splitlines()) == 1
    other = tmp_path / "other.h5"
    with h5py.File(other, "w") as h5:
        h5.attrs["format"] = "trade-md/samples"
    result = runner.invoke(app, ["energy", str(other)])
    assert result.exit_code == 1 and "expected 'trade-md/trajectory'" in result.output


def test_energy_command_repairs_non_finite_stored_energies(tmp_path):
    """A file with a NaN energy is refused by readers but repaired by `trade-md energy --write`."""
    import h5py
    from typer.testing import CliRunner

    from trademd.cli.app import app
    from trademd.io.trajectory_file import read_trajectory
    from trademd.simulate import SimulationConfig, simulate

    path = simulate(SimulationConfig(system_name="ala2-vacuum", temperature_k=300, time_ps=2,
                                     replicas=2, save_every_ps=1, equilibration_ps=0,
                                     platform="CPU"), tmp_path / "t.h5", show_progress=False)
    with h5py.File(path, "a") as h5:
        h5[ENERGY][0] = float("nan")
    with pytest.raises(TradeMDError, match="--write"):
        read_trajectory(path)
    result = CliRunner().invoke(app, ["energy", str(path), "--write", "--platform", "CPU"])
    assert result.exit_code == 0, result.output
    assert np.all(np.isfinite(read_trajectory(path).energy_kj_mol))

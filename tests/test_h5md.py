"""Files in H5MD 1.1 (format version 2) that MDAnalysis opens without an export step, and the
version-1 files of tests/data/format_v1/ (written before H5MD) still read, continued and
used by every command."""

import json
from pathlib import Path
import shutil

import h5py
import numpy as np
import pytest
from typer.testing import CliRunner

from trademd import __version__
from trademd.cli.app import app
from trademd.errors import TradeMDError
from trademd.io.h5md import AUTHOR_VARIABLE, DEFAULT_AUTHOR
from trademd.io.h5md_rules import h5md_problems
from trademd.io.samples_file import TemperatureSamples, read_samples, write_samples
from trademd.io.schema import group_name
from trademd.io.trajectory_file import DynamicsFile, ensemble_temperatures, read_trajectory
from trademd.simulate import ExchangeConfig, SimulationConfig, simulate

runner = CliRunner()
#: Files written by trade-md before the H5MD layout (see the README there).
VERSION_1 = Path(__file__).parent / "data" / "format_v1"
#: The settings of VERSION_1 / "trajectory.h5" (its README), another seed.
VERSION_1_SETTINGS = ["--system", "ala2-vacuum", "--temperature", "600", "--time", "10ps", "--replicas", "2",
                      "--save-every", "1ps", "--equilibration", "1ps", "--platform", "CPU", "--quiet"]


def _one_line_error(result, *words: str) -> None:
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    assert len(result.output.strip().splitlines()) == 1, result.output
    assert all(word in result.output for word in words), result.output


def _topology(tmp_path: Path, topology_pdb: str) -> Path:
    path = tmp_path / "topology.pdb"
    path.write_text(topology_pdb)
    return path


@pytest.fixture(scope="module")
def ladder(tmp_path_factory) -> Path:
    """A replica-exchange file at 300 and 450 K: 2 ladders x 4 saves per temperature."""
    config = ExchangeConfig(system_name="ala2-vacuum", temperatures_k=(300.0, 450.0), time_ps=1.0,
                            save_every_ps=0.25, exchange_every_ps=0.25, ladders=2, equilibration_ps=0,
                            chunk_saves=2, platform="CPU", seed=4)
    return simulate(config, tmp_path_factory.mktemp("ladder") / "rx.h5", show_progress=False)


@pytest.fixture(scope="module")
def trajectory(tmp_path_factory) -> Path:
    """A plain 600 K trajectory: 2 replicas x 4 saves."""
    config = SimulationConfig(system_name="ala2-vacuum", temperature_k=600.0, time_ps=1.0, replicas=2,
                              save_every_ps=0.25, equilibration_ps=0, chunk_saves=2, platform="CPU", seed=5)
    return simulate(config, tmp_path_factory.mktemp("plain") / "t.h5", show_progress=False)


@pytest.fixture(scope="module")
def samples(tmp_path_factory) -> Path:
    """`trade-md sample` at 300 and 600 K from a 4-step model trained on the version-1
    trajectory (so `train` reads a version-1 file)."""
    folder = tmp_path_factory.mktemp("samples")
    settings = folder / "tiny.json"
    settings.write_text(json.dumps({"steps": 4, "batch_size": 4, "trade_points": 16, "cache_samples": 100,
                                    "metrics_every": 2, "metrics_samples": 100, "refine_rounds": 0}))
    result = runner.invoke(app, ["train", "--data", str(VERSION_1 / "trajectory.h5"), "--tmin", "300",
                                 "--tmax", "660", "--config", str(settings), "--device", "cpu",
                                 "--platform", "CPU", "--out", str(folder / "run"), "--quiet"])
    assert result.exit_code == 0, result.output
    out = folder / "s.h5"
    result = runner.invoke(app, ["sample", "--model", str(folder / "run" / "model.pt"), "--temperature", "300",
                                 "--temperature", "600", "--n", "32", "--batch-size", "16", "--device", "cpu",
                                 "--platform", "CPU", "--out", str(out), "--quiet"])
    assert result.exit_code == 0, result.output
    return out


def _synthetic_samples(temperature_k: float, n: int, seed: int) -> TemperatureSamples:
    """Samples of 3 atoms with arbitrary values (for the layout, not the physics)."""
    rng = np.random.default_rng(seed)
    weights = rng.random(n)
    return TemperatureSamples(
        temperature_k=temperature_k, positions_nm=rng.normal(size=(n, 3, 3)).astype(np.float32),
        log_prob=rng.normal(size=n), energy_kj_mol=rng.normal(size=n), log_weights=np.log(weights),
        weights=weights / weights.sum(), wrong_chirality=np.zeros(n, bool), nonfinite_energy=np.zeros(n, bool),
        phi=rng.uniform(-np.pi, np.pi, n), psi=rng.uniform(-np.pi, np.pi, n), summary={"n": n},
        histograms={"bin_edges_rad": np.linspace(-np.pi, np.pi, 5)}, ramachandran_png=b"\x89PNG")


# --- the layout written ------------------------------------------------------------------------


def test_written_files_follow_the_h5md_rules(ladder, trajectory, samples):
    for path, temperatures in ((ladder, (300.0, 450.0)), (trajectory, (600.0,)), (samples, (300.0, 600.0))):
        with h5py.File(path) as h5:
            assert h5md_problems(h5) == []
            assert h5.attrs["format_version"] == 2
            assert h5["h5md"].attrs["version"].tolist() == [1, 1]
            assert h5["h5md/creator"].attrs["name"] == b"trade-md"
            assert h5["h5md/creator"].attrs["version"] == __version__.encode()
            assert list(h5["particles"]) == [group_name(t) for t in temperatures]
            for name in h5["particles"]:
                box = h5[f"particles/{name}/box"]
                assert box.attrs["dimension"] == 3 and box.attrs["boundary"].tolist() == [b"none"] * 3
                position = h5[f"particles/{name}/position"]
                n = position["value"].shape[0]
                assert position["value"].shape == (n, 22, 3) and position["value"].dtype == np.float32
                assert position["value"].attrs["unit"] == "nm" and position["time"].attrs["unit"] == "ps"
                assert np.array_equal(position["step"][()], np.arange(n))
                for observable in h5[f"observables/{name}"].values():
                    assert observable["value"].shape[0] == n
                    assert observable["step"] == position["step"] and observable["time"] == position["time"]
                assert h5[f"observables/{name}/potential_energy/value"].attrs["unit"] == "kJ mol-1"
                assert h5[f"parameters/{name}"].attrs["temperature_k"] in temperatures


def test_frames_of_a_resumed_file_stay_numbered(ladder, tmp_path):
    """--resume cuts the frames back to the checkpoint and appends: step stays 0, 1, 2, ..."""
    path = shutil.copy(ladder, tmp_path / "rx.h5")
    result = runner.invoke(app, ["simulate", "--out", str(path), "--resume", "--time", "1.5ps",
                                 "--platform", "CPU", "--quiet"])
    assert result.exit_code == 0, result.output
    with h5py.File(path) as h5:
        assert h5md_problems(h5) == []
        assert np.array_equal(h5["particles/T450/position/step"][()], np.arange(12))
    assert np.allclose(read_trajectory(path, 450.0).time_ps, np.repeat(np.arange(1, 7) * 0.25, 2))


def test_the_author_is_a_setting_never_the_login_name(tmp_path, monkeypatch):
    monkeypatch.delenv(AUTHOR_VARIABLE, raising=False)
    write_samples(tmp_path / "a.h5", [_synthetic_samples(300.0, 4, 0)], {}, "PDB")
    monkeypatch.setenv(AUTHOR_VARIABLE, "Ada Lovelace")
    write_samples(tmp_path / "b.h5", [_synthetic_samples(300.0, 4, 0)], {}, "PDB")
    with h5py.File(tmp_path / "a.h5") as a, h5py.File(tmp_path / "b.h5") as b:
        assert a["h5md/author"].attrs["name"] == DEFAULT_AUTHOR.encode() == b"trade-md user"
        assert b["h5md/author"].attrs["name"] == b"Ada Lovelace"


def test_temperature_groups_have_exact_names():
    assert [group_name(t) for t in (300.0, 300.5, 312.25, 312.123456)] == ["T300", "T300.5", "T312.25", "T312.123456"]
    assert group_name(312.123456, version=1) == "T312.123"  # version-1 files: 6 significant digits


def test_the_rules_find_what_a_file_breaks(tmp_path):
    """Each rule fires on a file that breaks it (so the empty lists above mean something)."""
    write_samples(tmp_path / "good.h5", [_synthetic_samples(300.0, 6, 0)], {}, "PDB")
    breakages = {
        "h5md/version": lambda h5: h5["h5md"].attrs.__setitem__("version", np.array([2, 0])),
        "h5md/author": lambda h5: h5["h5md/author"].attrs.__delitem__("name"),
        "box/boundary": lambda h5: h5["particles/T300/box"].attrs.__setitem__("boundary", np.array([b"none"] * 2)),
        "has no box": lambda h5: h5.__delitem__("particles/T300/box"),
        "weights/step has shape": lambda h5: h5["observables/T300/weights"].__delitem__("step")
        or h5["observables/T300/weights"].create_dataset("step", data=np.arange(5)),
        "log_prob/step decreases": lambda h5: h5["observables/T300/log_prob"].__delitem__("step")
        or h5["observables/T300/log_prob"].create_dataset("step", data=np.arange(6)[::-1]),
        "phi/value cannot grow": lambda h5: h5["observables/T300/phi"].__delitem__("value")
        or h5["observables/T300/phi"].create_dataset("value", data=np.zeros(6)),
        "psi has no step": lambda h5: h5["observables/T300/psi"].__delitem__("step"),
        "position/value has shape": lambda h5: h5["particles/T300/position"].__delitem__("value")
        or h5["particles/T300/position"].create_dataset("value", data=np.zeros((6, 3, 2)), maxshape=(None, 3, 2)),
    }
    for words, breakage in breakages.items():
        path = shutil.copy(tmp_path / "good.h5", tmp_path / "bad.h5")
        with h5py.File(path, "a") as h5:
            assert h5md_problems(h5) == []
            breakage(h5)
            problems = h5md_problems(h5)
        assert len(problems) == 1 and words in problems[0], (words, problems)


# --- MDAnalysis and h5py -----------------------------------------------------------------------


#: MDAnalysis on trade-md's topology PDB, which has no element column.
NO_ELEMENTS = pytest.mark.filterwarnings("ignore:Element information is missing:UserWarning")


@NO_ELEMENTS
def test_mdanalysis_opens_a_samples_file(samples, tmp_path):
    import MDAnalysis

    stored = read_samples(samples)
    first = stored.by_temperature[300.0]
    universe = MDAnalysis.Universe(str(_topology(tmp_path, stored.topology_pdb)), str(samples), format="H5MD")
    assert universe.trajectory.n_frames == first.n
    for k, frame in enumerate(universe.trajectory):  # Angstrom; the first particle group: T300
        assert np.allclose(universe.atoms.positions / 10.0, first.positions_nm[k], atol=1e-6)
        assert frame.data["T300/weights"] == first.weights[k] and frame.data["step"] == k
        assert frame.data["T600/weights"] == stored.by_temperature[600.0].weights[k]
    with h5py.File(samples) as h5:  # the weights are one dataset away
        assert np.array_equal(h5["observables/T300/weights/value"][()], first.weights)
        assert np.array_equal(h5["observables/T600/potential_energy/value"][()],
                              stored.by_temperature[600.0].energy_kj_mol)


@NO_ELEMENTS
def test_mdanalysis_opens_a_replica_exchange_file_at_its_first_temperature(ladder, tmp_path):
    import MDAnalysis

    lowest, other = read_trajectory(ladder, 300.0), read_trajectory(ladder, 450.0)
    universe = MDAnalysis.Universe(str(_topology(tmp_path, lowest.topology_pdb)), str(ladder), format="H5MD")
    positions = np.array([universe.atoms.positions / 10.0 for _ in universe.trajectory])
    assert np.allclose(positions, lowest.positions_nm, atol=1e-6)  # only the first group, T300
    assert not np.allclose(positions, other.positions_nm, atol=1e-3)
    assert [frame.time for frame in universe.trajectory] == pytest.approx(lowest.time_ps.tolist())
    assert [frame.data["T450/replica"] for frame in universe.trajectory] == other.replica.tolist()
    assert np.allclose(other.to_mdtraj().xyz, other.positions_nm)  # another rung: trade-md's reader


def test_mdanalysis_reads_the_first_temperature_written_not_the_first_by_name(tmp_path):
    """Groups list in creation order: T300 before T1000 (by name T1000 would come first)."""
    import MDAnalysis

    entries = [_synthetic_samples(300.0, 5, 1), _synthetic_samples(1000.0, 5, 2)]
    path = write_samples(tmp_path / "s.h5", entries, {}, "PDB")
    universe = MDAnalysis.Universe.empty(3, trajectory=False)
    universe.load_new(str(path), format="H5MD")
    assert np.allclose(universe.trajectory[2].positions / 10.0, entries[0].positions_nm[2], atol=1e-6)


# --- version-1 files ---------------------------------------------------------------------------


def test_version_1_files_are_read():
    trajectory = read_trajectory(VERSION_1 / "trajectory.h5")
    assert trajectory.attrs["format_version"] == 1 and trajectory.temperature_k == 600.0
    assert trajectory.positions_nm.shape == (20, 22, 3) and trajectory.replica.tolist() == [0, 1] * 10
    assert ensemble_temperatures(VERSION_1 / "replica_exchange.h5") == [300.0, 450.0]
    for temperature_k in (300.0, 450.0):
        assert read_trajectory(VERSION_1 / "replica_exchange.h5", temperature_k).n_frames == 8
    with DynamicsFile.open(VERSION_1 / "replica_exchange.h5") as file:
        assert file.checkpoint_saves == 4 and file.read_exchange_statistics()["walker_at_rung"].shape == (4, 2, 2)
        assert file.ensembles[0].columns()["kinetic_temperature_k"].shape == (4,)
    samples = read_samples(VERSION_1 / "samples.h5")
    assert samples.attrs["format_version"] == 1 and "ALA" in samples.topology_pdb
    entry = samples.at(VERSION_1 / "samples.h5", None)
    assert entry.n == 32 and entry.weights.sum() == pytest.approx(1.0)
    assert entry.summary["ess"] == pytest.approx(entry.ess) and entry.ramachandran_png.startswith(b"\x89PNG")
    assert entry.histograms["phi_psi_weighted"].shape == (60, 60)
    assert entry.flipped_peptide_bond.shape == (32,) and not entry.flipped_peptide_bond.any()


def test_flipped_peptide_bond_flags_are_stored_and_zero_the_weight(tmp_path):
    """The flag of a later format addition: written, read back, part of ``flagged``."""
    entry = _synthetic_samples(300.0, 6, seed=4)
    entry.flipped_peptide_bond = np.array([False, True, False, False, True, False])
    assert entry.flagged.tolist() == entry.flipped_peptide_bond.tolist()
    path = write_samples(tmp_path / "s.h5", [entry], {"system": "test"}, "")
    with h5py.File(path) as h5:
        assert h5["observables/T300/flipped_peptide_bond/value"][()].tolist() == entry.flipped_peptide_bond.tolist()
    back = read_samples(path).at(path, 300.0)
    assert back.flipped_peptide_bond.tolist() == entry.flipped_peptide_bond.tolist()
    assert back.fraction_flagged == pytest.approx(2 / 6)


def test_commands_take_version_1_files(tmp_path):
    result = runner.invoke(app, ["export", str(VERSION_1 / "samples.h5"), "--format", "npz", "--resample", "8",
                                 "--out", str(tmp_path / "s.npz")])
    assert result.exit_code == 0, result.output
    assert np.load(tmp_path / "s.npz")["positions_nm"].shape == (8, 22, 3)
    result = runner.invoke(app, ["export", str(VERSION_1 / "replica_exchange.h5"), "--format", "dcd",
                                 "--temperature", "450", "--out", str(tmp_path / "r.dcd")])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["energy", str(VERSION_1 / "trajectory.h5"), "--platform", "CPU"])
    assert result.exit_code == 0 and "frames: 20" in result.output, result.output
    result = runner.invoke(app, ["info", str(VERSION_1 / "trajectory.h5")])
    assert result.exit_code == 0 and "(version 1)" in result.output and "/positions_nm" in result.output
    metrics = tmp_path / "m.json"
    result = runner.invoke(app, ["evaluate", "--samples", str(VERSION_1 / "samples.h5"), "--reference",
                                 str(VERSION_1 / "replica_exchange.h5"), "--temperature", "300",
                                 "--platform", "CPU", "--out", str(metrics)])
    assert result.exit_code == 0, result.output
    assert json.loads(metrics.read_text())["n_reference_frames"] == 8


def test_resume_continues_a_version_1_file_in_its_layout(tmp_path):
    path = shutil.copy(VERSION_1 / "trajectory.h5", tmp_path / "t.h5")
    before = read_trajectory(path)
    # Reference: another platform than the checkpoint's, so the portable state is restored
    result = runner.invoke(app, ["simulate", "--out", str(path), "--resume", "--time", "12ps",
                                 "--platform", "Reference", "--quiet"])
    assert result.exit_code == 0, result.output
    after = read_trajectory(path)
    assert after.attrs["format_version"] == 1 and after.n_frames == 24
    assert np.array_equal(after.positions_nm[:20], before.positions_nm)
    assert np.allclose(after.time_ps[20:], [11, 11, 12, 12])
    with h5py.File(path) as h5:
        assert "h5md" not in h5 and h5["kinetic_temperature_k"].shape == (12,)


def test_merge_takes_shards_of_both_layouts(tmp_path):
    other = tmp_path / "v2.h5"
    result = runner.invoke(app, ["simulate", *VERSION_1_SETTINGS, "--seed", "2", "--out", str(other)])
    assert result.exit_code == 0, result.output
    merged = tmp_path / "merged.h5"
    result = runner.invoke(app, ["merge", str(VERSION_1 / "trajectory.h5"), str(other), "--out", str(merged)])
    assert result.exit_code == 0, result.output
    whole, old = read_trajectory(merged), read_trajectory(VERSION_1 / "trajectory.h5")
    assert whole.attrs["format_version"] == 2 and whole.n_frames == 40
    assert np.array_equal(whole.positions_nm[whole.replica < 2], old.positions_nm)
    with h5py.File(merged) as h5:
        assert h5md_problems(h5) == []


# --- files in neither layout -------------------------------------------------------------------


def _h5md_of_another_program(h5: h5py.File) -> None:
    h5.create_group("h5md").attrs["version"] = np.array([1, 1])
    h5.create_group("particles/trajectory/position").create_dataset("value", data=np.zeros((2, 3, 3)))


@pytest.mark.parametrize("make, words", [
    (_h5md_of_another_program, ["an H5MD file trade-md did not write", "`trade-md simulate`"]),
    (lambda h5: h5.attrs.update({"format": "trade-md/trajectory", "format_version": 2}),
     ["neither trade-md layout", "lacks h5md, parameters", "the file is damaged"]),
    (lambda h5: h5.attrs.update({"format": "trade-md/trajectory"}),
     ["neither trade-md layout", "format version 0 is no version trade-md wrote"]),
    (lambda h5: h5.attrs.update({"format": "trade-md/trajectory", "format_version": 3}),
     ["format version 3, newer than this trade-md reads (2): upgrade trade-md"]),
])
def test_files_in_neither_layout_get_one_line_errors(tmp_path, make, words):
    path = tmp_path / "x.h5"
    with h5py.File(path, "w") as h5:
        make(h5)
    _one_line_error(runner.invoke(app, ["export", str(path), "--format", "npz"]), *words)
    with pytest.raises(TradeMDError):
        read_samples(path)


def test_a_file_that_lost_a_dataset_is_refused_in_one_line(trajectory, tmp_path):
    samples = write_samples(tmp_path / "s.h5", [_synthetic_samples(300.0, 4, 0)], {}, "PDB")
    plain = shutil.copy(trajectory, tmp_path / "t.h5")
    with h5py.File(samples, "a") as h5, h5py.File(plain, "a") as t:
        del h5["observables/T300/weights"]
        del t["observables/T600/replica"]
    _one_line_error(runner.invoke(app, ["export", str(samples), "--format", "npz"]),
                    "lacks the weights of its T300 samples: the file is damaged")
    _one_line_error(runner.invoke(app, ["export", str(plain), "--format", "npz"]),
                    "lacks the datasets of its 600 K ensemble", "the file is damaged")

"""The command line: commands work, bad input gives one clear line and a non-zero exit."""

import subprocess

import mdtraj
import numpy as np
import pytest
from typer.testing import CliRunner

from trademd.cli.app import app
from trademd.io.trajectory_file import read_trajectory
from trademd.systems import get_system

runner = CliRunner()

QUICK = ["--system", "ala2-vacuum", "--temperature", "300", "--time", "2ps", "--replicas", "2",
         "--save-every", "1ps", "--equilibration", "0", "--platform", "CPU", "--quiet"]


def _quick(*changes):
    """QUICK with the options in ``changes`` (``--option value`` pairs) set to new values (an
    option given twice is refused)."""
    arguments = list(QUICK)
    for option, value in zip(changes[::2], changes[1::2]):
        if option in arguments:
            arguments[arguments.index(option) + 1] = value
        else:
            arguments += [option, value]
    return arguments


def _extra_value(option, value):
    """QUICK with a second value right after ``option``'s."""
    at = QUICK.index(option) + 2
    return [*QUICK[:at], value, *QUICK[at:]]


def _one_line_error(result, *words):
    assert result.exit_code != 0
    assert "Traceback" not in result.output
    lines = [line for line in result.output.strip().splitlines() if line.startswith("error:")]
    assert len(lines) == 1, result.output
    for word in words:
        assert word in lines[0]


def test_console_script_help():
    completed = subprocess.run(["trade-md", "--help"], capture_output=True, text=True, check=True)
    for command in ("simulate", "systems", "info", "export"):
        assert command in completed.stdout


def test_systems_lists_builtins():
    result = runner.invoke(app, ["systems"])
    assert result.exit_code == 0
    assert "ala2-implicit" in result.output and "ala2-vacuum" in result.output
    assert "amber96_obc.xml" in result.output


def test_simulate_with_hydrogen_mass_repartitioning(tmp_path):
    out = tmp_path / "hmr.h5"
    result = runner.invoke(app, ["simulate", *QUICK, "--timestep", "4fs", "--hydrogen-mass", "1.5",
                                 "--out", str(out)])
    assert result.exit_code == 0, result.output
    attrs = read_trajectory(out).attrs
    assert attrs["timestep_ps"] == 0.004 and attrs["hydrogen_mass_amu"] == 1.5


def test_simulate_info_export(tmp_path):
    out = tmp_path / "run.h5"
    result = runner.invoke(app, ["simulate", *QUICK, "--out", str(out)])
    assert result.exit_code == 0, result.output
    trajectory = read_trajectory(out)
    assert trajectory.n_frames == 4
    assert "simulate" in trajectory.attrs["command"]
    assert trajectory.attrs["timestep_ps"] == 0.002 and trajectory.attrs["hydrogen_mass_amu"] == 0.0

    info = runner.invoke(app, ["info", str(out)])
    assert info.exit_code == 0
    assert "trade-md/trajectory (version 2)" in info.output and "H5MD 1.1: follows the rules" in info.output
    assert "/particles/T300/position/value: float32 (4, 22, 3) [nm]" in info.output

    for fmt in ("dcd", "xtc", "pdb"):
        exported = runner.invoke(app, ["export", str(out), "--format", fmt])
        assert exported.exit_code == 0, exported.output
        path = out.with_suffix(f".{fmt}")
        loaded = mdtraj.load(str(path), top=str(out.with_suffix(".pdb")) if fmt != "pdb" else None)
        assert loaded.n_frames == 4 and loaded.n_atoms == 22
        assert np.allclose(loaded.xyz, trajectory.positions_nm, atol=2e-3)


@pytest.mark.parametrize(
    "arguments, words",
    [
        (["--system", "ala9"], ["unknown system", "trade-md systems"]),
        (["--temperature", "-5"], ["temperature must be positive"]),
        (["--temperature", "0"], ["temperature must be positive"]),
        (["--time", "20 years"], ["cannot read the duration"]),
        (["--platform", "CUDA"], ["CUDA", "--platform"]),
        (["--pdb", "missing.pdb", "--forcefield", "amber99sbildn.xml"], ["not found"]),
        (["--hydrogen-mass", "0.5"], ["--hydrogen-mass", "between 1 and 4"]),
        (["--shard", "2/2"], ["cannot read --shard", "i/N"]),
    ],
)
def test_simulate_bad_input(tmp_path, arguments, words):
    if "CUDA" in arguments:
        import openmm

        names = [openmm.Platform.getPlatform(i).getName() for i in range(openmm.Platform.getNumPlatforms())]
        if "CUDA" in names:
            pytest.skip("this machine has CUDA")
    result = runner.invoke(app, ["simulate", *_quick(*arguments), "--out", str(tmp_path / "x.h5")])
    _one_line_error(result, *words)


def test_simulate_refuses_to_overwrite(tmp_path):
    out = tmp_path / "run.h5"
    out.write_text("precious")
    result = runner.invoke(app, ["simulate", *QUICK, "--out", str(out)])
    _one_line_error(result, "--overwrite")
    assert out.read_text() == "precious"


def test_force_field_mismatch_is_one_line(tmp_path):
    pdb = tmp_path / "ala2.pdb"
    pdb.write_text(get_system("ala2-vacuum").pdb_text)
    result = runner.invoke(app, ["simulate", *QUICK, "--pdb", str(pdb), "--forcefield", "tip3p.xml",
                                 "--out", str(tmp_path / "x.h5")])
    _one_line_error(result, "does not match the topology")


def test_user_pdb_simulation(tmp_path):
    pdb = tmp_path / "ala2.pdb"
    pdb.write_text(get_system("ala2-vacuum").pdb_text)
    out = tmp_path / "user.h5"
    result = runner.invoke(app, ["simulate", *QUICK, "--pdb", str(pdb), "--forcefield",
                                 "amber99sbildn.xml", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert read_trajectory(out).attrs["system"] == "user:ala2.pdb"
    resumed = runner.invoke(app, ["simulate", *_quick("--time", "3ps"), "--resume", "--out", str(out)])
    assert resumed.exit_code == 0, resumed.output
    assert read_trajectory(out).n_frames == 6


@pytest.mark.parametrize("content", [None, "not hdf5", "h5-without-format"])
def test_info_and_export_of_bad_files(tmp_path, content):
    path = tmp_path / "bad.h5"
    if content == "not hdf5":
        path.write_text(content)
    elif content == "h5-without-format":
        import h5py

        with h5py.File(path, "w") as h5:
            h5["x"] = [1, 2]
    result = runner.invoke(app, ["export", str(path)])
    _one_line_error(result)
    if content == "h5-without-format":
        assert runner.invoke(app, ["info", str(path)]).exit_code == 0
    else:
        _one_line_error(runner.invoke(app, ["info", str(path)]))


@pytest.mark.parametrize(
    "arguments, words",
    [
        (["simulate", *_extra_value("--temperature", "400"), "--out", "x.h5"],
         ["--temperature takes one value (got 300 400)", "--temperatures"]),
        (["simulate", *QUICK, "--out", "x.h5", "--temperature", "400"],
         ["--temperature is given 2 times (300, 400)"]),
        (["simulate", *_extra_value("--time", "3ps"), "--out", "x.h5"], ["--time takes one value (got 2ps 3ps)"]),
        (["export", "f.h5", "--temperature", "300", "400"], ["--temperature takes one value (got 300 400)"]),
        (["energy", "f.h5", "--temperature", "300", "400"], ["--temperature takes one value"]),
        (["evaluate", "--samples", "s.h5", "--reference", "r.h5", "--temperature", "300", "400"],
         ["--temperature takes one value"]),
    ],
)
def test_a_single_value_option_given_several_values_is_refused(tmp_path, monkeypatch, arguments, words):
    """Once, all values after a single-value option but the last were dropped silently."""
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, arguments)
    _one_line_error(result, *words)
    assert not list(tmp_path.iterdir())  # nothing ran


def test_the_console_script_refuses_several_values_too(tmp_path):
    completed = subprocess.run(["trade-md", "simulate", *_extra_value("--temperature", "400"), "--out",
                                str(tmp_path / "x.h5")], capture_output=True, text=True, timeout=300)
    assert completed.returncode != 0 and "Traceback" not in completed.stderr
    assert completed.stderr.strip() == ("error: --temperature takes one value (got 300 400): give "
                                        "one value, or several with --temperatures")


def test_list_options_take_several_values_and_single_ones_a_positional_after_them():
    from trademd.cli.app import expand_multi_value_options

    assert expand_multi_value_options(["simulate", "--forcefield", "a.xml", "b.xml", "--temperatures",
                                       "300", "400"]) == [
        "simulate", "--forcefield", "a.xml", "--forcefield", "b.xml", "--temperatures", "300",
        "--temperatures", "400"]
    assert expand_multi_value_options(["export", "--temperature", "300", "f.h5"]) == [
        "export", "--temperature", "300", "f.h5"]


@pytest.mark.parametrize("exchange", [[], ["--temperatures", "300", "400"]])
def test_zero_replicas_is_an_error(tmp_path, exchange):
    """``--replicas 0`` once meant the default (64 copies, 4 ladders)."""
    base = [a for a in QUICK if a not in ("--replicas", "2")]
    result = runner.invoke(app, ["simulate", *base, *exchange, "--replicas", "0",
                                 "--out", str(tmp_path / "x.h5")])
    _one_line_error(result, "--replicas", "at least 1")


@pytest.mark.parametrize(
    "command, out",
    [
        (["simulate", *QUICK], "file.h5/x.h5"),  # FileExistsError when creating the folder
        (["simulate", *QUICK], "file.h5/sub/x.h5"),  # NotADirectoryError
        (["run", "--system", "ala2-vacuum"], "file.h5/run"),
    ],
)
def test_an_output_below_a_regular_file_is_one_line(tmp_path, command, out):
    (tmp_path / "file.h5").write_text("precious")
    result = runner.invoke(app, [*command, "--out", str(tmp_path / out)])
    _one_line_error(result, f"{str(tmp_path / 'file.h5')!r} is a file, not a folder")
    assert (tmp_path / "file.h5").read_text() == "precious"


@pytest.mark.parametrize(
    "function, arguments, message",
    [
        ("trademd.simulate.simulate", ["simulate", *QUICK, "--out", "x.h5"],
         "interrupted: the work up to the last checkpoint is saved; continue with --resume"),
        ("trademd.train.train_run", ["train", "--system", "gaussian-2d", "--tmin", "0.5",
                                            "--tmax", "2", "--out", "r"],
         "interrupted: the work up to the last checkpoint is saved; continue with --resume"),
        ("trademd.pipeline.run_pipeline", ["run", "--out", "r"],
         "interrupted: finished stages are kept; rerun the same command to continue"),
        ("trademd.sample.sample_run", ["sample", "--model", "m.pt", "--temperature", "300",
                                             "--out", "s.h5"], "interrupted"),
        ("trademd.io.schema.describe", ["info", "x.h5"], "interrupted"),
    ],
)
def test_ctrl_c_names_the_way_to_continue(tmp_path, monkeypatch, function, arguments, message):
    """Only commands with --resume are told to use it."""

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(function, interrupt)
    result = runner.invoke(app, arguments)
    assert result.exit_code == 130
    assert result.output.strip() == message


def test_sample_refuses_a_batch_size_below_one_in_one_line(tmp_path):
    """``--batch-size 0`` ended in ZeroDivisionError and ``-3`` in a NumPy ValueError."""
    for value in ("0", "-3"):
        result = CliRunner().invoke(app, ["sample", "--model", str(tmp_path / "model.pt"), "--temperature", "300",
                                          "--out", str(tmp_path / "s.h5"), "--batch-size", value])
        assert result.exit_code == 1
        assert result.output.strip() == f"error: --batch-size must be at least 1, got {value}"


def test_run_warns_before_it_starts_when_the_transfer_is_beyond_what_was_measured(tmp_path, monkeypatch, capsys):
    from trademd.pipeline import RunConfig, run_pipeline
    import trademd.simulate

    assert RunConfig(temperatures_k=(300.0,)).range_warning() is None
    far = RunConfig(temperatures_k=(100.0,)).range_warning()
    assert "100 K is 6.0x below the data's 600 K" in far and "300 K here" in far
    assert "above the data's 600 K" in RunConfig(temperatures_k=(300.0, 700.0)).range_warning()

    def stop(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(trademd.simulate, "simulate", stop)
    with pytest.raises(KeyboardInterrupt):
        run_pipeline(RunConfig(temperatures_k=(100.0,)), tmp_path / "run", show_progress=False)
    first = capsys.readouterr().err.splitlines()[0]
    assert first.startswith("[trade-md run] warning: 100 K is 6.0x below")

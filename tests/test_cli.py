"""The command line: commands work, bad input gives one clear line and a non-zero exit."""

import subprocess

import mdtraj
import numpy as np
import pytest
from typer.testing import CliRunner

from trademd.cli.app import app
from trademd.h5io import read_trajectory
from trademd.systems import get_system

runner = CliRunner()

QUICK = ["--system", "ala2-vacuum", "--temperature", "300", "--time", "2ps", "--replicas", "2",
         "--save-every", "1ps", "--equilibration", "0", "--platform", "CPU", "--quiet"]


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


def test_simulate_info_export(tmp_path):
    out = tmp_path / "run.h5"
    result = runner.invoke(app, ["simulate", *QUICK, "--out", str(out)])
    assert result.exit_code == 0, result.output
    trajectory = read_trajectory(out)
    assert trajectory.n_frames == 4
    assert "simulate" in trajectory.attrs["command"]

    info = runner.invoke(app, ["info", str(out)])
    assert info.exit_code == 0
    assert "trade-md/trajectory" in info.output and "/positions_nm" in info.output

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
    ],
)
def test_simulate_bad_input(tmp_path, arguments, words):
    if "CUDA" in arguments:
        import openmm

        names = [openmm.Platform.getPlatform(i).getName() for i in range(openmm.Platform.getNumPlatforms())]
        if "CUDA" in names:
            pytest.skip("this machine has CUDA")
    base = [a for a in QUICK]
    result = runner.invoke(app, ["simulate", *base, *arguments, "--out", str(tmp_path / "x.h5")])
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
    resumed = runner.invoke(app, ["simulate", *QUICK, "--time", "3ps", "--resume", "--out", str(out)])
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

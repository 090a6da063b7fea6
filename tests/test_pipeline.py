"""`trade-md run`: every stage once, then every stage reused."""

import json

from typer.testing import CliRunner

from trademd.cli.app import app

runner = CliRunner()


def test_run_pipeline_then_reuse(tmp_path):
    out = tmp_path / "demo"
    arguments = ["run", "--system", "ala2-vacuum", "--temperature", "400", "--time", "12ps",
                 "--replicas", "4", "--steps", "4", "--n", "32", "--platform", "CPU",
                 "--out", str(out), "--quiet"]
    first = runner.invoke(app, arguments)
    assert first.exit_code == 0, first.output
    summary = json.loads(first.stdout.strip().splitlines()[-1])
    assert summary["temperature_k"] == 400.0 and summary["n"] == 32
    for name in ("data_600K.h5", "train/model.pt", "samples.h5", "samples_ramachandran.png",
                 "summary.json"):
        assert (out / name).is_file(), name
    stamps = {name: (out / name).stat().st_mtime_ns for name in ("data_600K.h5", "train/model.pt", "samples.h5")}

    again = runner.invoke(app, arguments)
    assert again.exit_code == 0, again.output
    assert again.output.count("reusing") == 3
    assert stamps == {name: (out / name).stat().st_mtime_ns for name in stamps}
    assert json.loads(again.stdout.strip().splitlines()[-1]) == summary

    # interrupted between the samples file and its summary: the rerun samples again
    (out / "summary.json").unlink()
    third = runner.invoke(app, arguments)
    assert third.exit_code == 0, third.output
    assert third.output.count("reusing") == 2 and "sampling" in third.output
    assert (out / "summary.json").is_file()
    assert json.loads(third.stdout.strip().splitlines()[-1])["n"] == 32

"""The prepared GPU script runs: its dry run (tiny sizes, on the CPU through OpenCL where pocl
is installed, else the CPU platform) fills every section without an error."""

import importlib.util
import json
from pathlib import Path

import pytest

from trademd.platforms import available_openmm_platforms

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "gpu_check.py"


@pytest.mark.slow
def test_gpu_check_dry_run(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    gpu_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_check)
    platform = "OpenCL" if "OpenCL" in available_openmm_platforms() else "CPU"
    out = tmp_path / "check.json"
    results = gpu_check.main(["--dry-run", "--platform", platform, "--device", "cpu", "--out", str(out),
                              "--work", str(tmp_path / "work")])
    assert json.loads(out.read_text())["platform"] == platform
    errors = {name: section["error"] for name, section in results.items()
              if isinstance(section, dict) and "error" in section}
    assert errors == {}
    bridge = results["bridge"]["rows"]
    assert {row["system"] for row in bridge} == {"ala2-implicit", "ala4-implicit"}
    assert all(row["evals_per_s"] > 0 and row["max_error_kj_mol"] < 2e-3 for row in bridge if "double" in row["what"]
               or "bridge" in row["what"])
    assert all(row["finite"] and row["ns_per_day"] > 0 for row in results["md"]["rows"])
    assert [row["preset"] for row in results["training"]["rows"]] == ["quick", "paper"]
    assert all(row["steps_per_s"] > 0 for row in results["training"]["rows"])
    assert set(results["paper_run"]["ess"]) == {"300K", "600K"}
    assert all(0 < ess <= 1 for ess in results["paper_run"]["ess"].values())
    table = capsys.readouterr().out
    assert "| bridge |" in table and "| paper run |" in table

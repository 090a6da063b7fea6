"""Killed with SIGKILL (no chance to clean up), `simulate` and `train` leave files that
`--resume` continues: the MD file holds whole chunks and finishes with the frames an
uninterrupted run writes; training resumed from its last checkpoint ends with exactly the
parameters of an uninterrupted run."""

import json
import shutil
import signal
import subprocess
import time

import numpy as np
import pytest
import torch

from trademd.io.trajectory_file import frame_count, read_trajectory

TRADE_MD = shutil.which("trade-md")
pytestmark = [pytest.mark.skipif(TRADE_MD is None, reason="needs the installed trade-md command"),
              pytest.mark.slow]  # 50-65 s each (2026-12-07, shared 2-core machine)


def _kill_when(process: subprocess.Popen, ready, timeout_s: float = 120.0) -> bool:
    """SIGKILL ``process`` once ``ready()`` holds; False if it finished first."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            return False
        if ready():
            process.send_signal(signal.SIGKILL)
            process.wait()
            return True
        time.sleep(0.05)
    process.kill()
    raise AssertionError("the command never reached the point to kill it at")


def _run(*arguments: str) -> None:
    result = subprocess.run([TRADE_MD, *arguments], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]


def test_simulate_killed_mid_run_resumes_to_the_uninterrupted_frames(tmp_path):
    settings = ["simulate", "--system", "ala2-vacuum", "--temperature", "300", "--time", "100ps",
                "--replicas", "4", "--save-every", "0.1ps", "--equilibration", "0ps",
                "--platform", "CPU", "--seed", "3", "--quiet"]
    _run(*settings, "--out", str(tmp_path / "whole.h5"))
    cut = tmp_path / "cut.h5"
    process = subprocess.Popen([TRADE_MD, *settings, "--out", str(cut)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    started = time.monotonic()
    killed = _kill_when(process, lambda: cut.exists() and time.monotonic() - started > 4.0)
    assert killed, "the run finished before it could be killed: lengthen it"
    # the file a SIGKILL left behind opens and holds whole chunks (10 saves x 4 replicas)
    assert frame_count(cut) % (10 * 4) == 0 and frame_count(cut) < 1000 * 4
    _run(*settings, "--out", str(cut), "--resume")
    whole, resumed = read_trajectory(tmp_path / "whole.h5"), read_trajectory(cut)
    assert resumed.n_frames == whole.n_frames == 1000 * 4
    assert np.allclose(resumed.time_ps, whole.time_ps)
    assert np.array_equal(resumed.replica, whole.replica)
    assert np.all(np.isfinite(resumed.energy_kj_mol))


def test_train_killed_mid_run_resumes_to_the_uninterrupted_parameters(tmp_path):
    config = tmp_path / "settings.json"
    config.write_text(json.dumps({"checkpoint_every": 25, "metrics_every": 25, "metrics_samples": 500,
                                  "refine_rounds": 1, "refine_steps": 25, "refine_samples": 500,
                                  "flow": {"width": 16}}))
    settings = ["train", "--system", "double-well-5d", "--tmin", "0.5", "--tmax", "2",
                "--steps", "300", "--config", str(config), "--device", "cpu", "--quiet"]
    _run(*settings, "--out", str(tmp_path / "whole"))
    cut = tmp_path / "cut"
    process = subprocess.Popen([TRADE_MD, *settings, "--out", str(cut)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    checkpoint = cut / "checkpoint.pt"
    killed = _kill_when(process, lambda: checkpoint.exists()
                        and torch.load(checkpoint, weights_only=False)["step"] >= 100)
    assert killed, "the run finished before it could be killed: lengthen it"
    assert not (cut / "model.pt").exists()
    _run(*settings, "--out", str(cut), "--resume")
    whole = torch.load(tmp_path / "whole" / "model.pt", weights_only=False)
    resumed = torch.load(cut / "model.pt", weights_only=False)
    assert whole["selection"]["step"] == resumed["selection"]["step"]
    for name, value in whole["flow"]["state_dict"].items():
        assert torch.allclose(value, resumed["flow"]["state_dict"][name], atol=1e-6), name

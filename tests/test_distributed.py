"""Data-parallel runs under torchrun on CPU (gloo): 2 ranks at batch B take exactly the steps
of 1 process at batch 2B, a resume may change the number of ranks, pooled estimates equal
single-process ones, and a 2-rank TRADE run on alanine dipeptide writes a usable model."""

import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch

from trademd import distributed
from trademd.io.samples_file import read_samples
from trademd.weights import kish_ess_torch, snis_mean_torch
from trademd.training.trainer import Trainer
from trademd.train import train_run

NLL_SETTINGS = {"objective": "nll", "steps": 8, "refine_rounds": 0, "metrics_every": 4,
                "metrics_samples": 200, "checkpoint_every": 4, "flow": {"width": 16}}
DOUBLE_WELL = ["--system", "double-well-5d", "--tmin", "0.5", "--tmax", "2", "--device", "cpu", "--quiet"]


def _torchrun(cwd, *arguments: str, ranks: int = 2) -> None:
    """``torchrun --standalone --nproc_per_node ranks -m trademd ARGUMENTS`` (outside the
    source tree, so that the installed package is what runs)."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc_per_node={ranks}", "-m", "trademd", *arguments]
    result = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]


def _flow_parameters(run_dir) -> dict:
    return torch.load(run_dir / "checkpoint.pt", weights_only=False)["flow"]


def _max_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


def test_pooled_estimates_equal_the_single_process_ones():
    generator = torch.Generator().manual_seed(0)
    log_w = torch.randn(1000, generator=generator, dtype=torch.float64) * 3
    log_w[::97] = -math.inf
    values = torch.randn(1000, generator=generator, dtype=torch.float64)
    assert distributed.pooled_snis_mean(values, log_w) == pytest.approx(float(snis_mean_torch(values, log_w)), rel=1e-12)
    ess, n = distributed.pooled_kish_ess(log_w)
    assert n == 1000 and ess == pytest.approx(float(kish_ess_torch(log_w)), rel=1e-12)
    assert math.isnan(distributed.pooled_snis_mean(values[:3], torch.full((3,), -math.inf)))


def test_shard_sizes_cover_every_item_once():
    assert distributed.shard_sizes(10, 3) == [4, 3, 3]
    assert distributed.shard_sizes(2, 4) == [1, 1, 0, 0]
    assert sum(distributed.shard_sizes(100001, 7)) == 100001


@pytest.mark.slow
def test_two_ranks_at_batch_b_take_the_steps_of_one_process_at_batch_2b(tmp_path):
    (tmp_path / "nll.json").write_text(json.dumps(NLL_SETTINGS))
    _torchrun(tmp_path, "train", *DOUBLE_WELL, "--config", "nll.json", "--batch-size", "32", "--out", "two")
    train_run(tmp_path / "one", 0.5, 2.0, system="double-well-5d", device="cpu",
              overrides={**NLL_SETTINGS, "batch_size": 64}, show_progress=False)
    assert _max_difference(_flow_parameters(tmp_path / "two"), _flow_parameters(tmp_path / "one")) < 1e-6
    # rank 0 alone wrote the run directory: one metrics header, a model, both ranks' RNG states
    lines = (tmp_path / "two" / "metrics.csv").read_text().splitlines()
    assert sum(line.startswith("step,") for line in lines) == 1 and len(lines) == 1 + 2
    assert (tmp_path / "two" / "model.pt").is_file()
    assert len(torch.load(tmp_path / "two" / "checkpoint.pt", weights_only=False)["rank_rngs"]) == 2
    assert json.loads((tmp_path / "two" / "target.json").read_text())["world_size"] == 2


@pytest.mark.slow
def test_a_one_process_checkpoint_resumes_on_two_ranks(tmp_path, monkeypatch):
    """Stopped right after its step-4 checkpoint on one process (batch 64), continued on 2
    ranks (batch 32 each): the same parameters as 8 uninterrupted steps on one process."""
    overrides = {**NLL_SETTINGS, "batch_size": 64}
    train_run(tmp_path / "whole", 0.5, 2.0, system="double-well-5d", device="cpu",
              overrides=overrides, show_progress=False)
    save = Trainer.save_checkpoint

    def stop_after_first_checkpoint(self):
        path = save(self)
        if self.step == 4:
            raise KeyboardInterrupt
        return path

    monkeypatch.setattr(Trainer, "save_checkpoint", stop_after_first_checkpoint)
    with pytest.raises(KeyboardInterrupt):
        train_run(tmp_path / "cut", 0.5, 2.0, system="double-well-5d", device="cpu",
                  overrides=overrides, show_progress=False)
    assert torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=False)["step"] == 4
    (tmp_path / "nll.json").write_text(json.dumps(NLL_SETTINGS))
    _torchrun(tmp_path, "train", *DOUBLE_WELL, "--config", "nll.json", "--batch-size", "32",
              "--out", "cut", "--resume")
    assert _max_difference(_flow_parameters(tmp_path / "cut"), _flow_parameters(tmp_path / "whole")) < 1e-6


@pytest.mark.slow
def test_two_rank_trade_run_on_alanine_dipeptide_writes_a_usable_model(tmp_path):
    from trademd.sample import draw_samples
    from trademd.simulate import SimulationConfig, simulate
    from trademd.training.model_file import load_model

    data = simulate(SimulationConfig(system_name="ala2-vacuum", temperature_k=400.0, time_ps=10.0,
                                     replicas=4, save_every_ps=0.1, equilibration_ps=1.0, platform="CPU"),
                    tmp_path / "data.h5", show_progress=False)
    settings = {"steps": 12, "refine_rounds": 1, "refine_steps": 2, "refine_samples": 400,
                "metrics_every": 6, "metrics_samples": 200, "cache_samples": 64, "trade_points": 32,
                "batch_size": 32, "flow": {"width": 16}}
    (tmp_path / "quick.json").write_text(json.dumps(settings))
    _torchrun(tmp_path, "train", "--data", str(data), "--tmin", "250", "--tmax", "450",
              "--config", "quick.json", "--device", "cpu", "--platform", "CPU", "--quiet", "--out", "ala2")
    rows = (tmp_path / "ala2" / "metrics.csv").read_text().splitlines()
    assert len(rows) == 1 + 3  # steps 6, 12 and the refinement round, written once
    model = load_model(tmp_path / "ala2" / "model.pt", platform="CPU")
    try:
        samples = draw_samples(model, 300.0, 1000, batch_size=128, seed=3, show_progress=False)
    finally:
        model.close()
    assert samples.positions_nm.shape == (1000, 22, 3)
    assert abs(samples.weights.sum() - 1.0) < 1e-9 and samples.relative_ess > 0

    # sampled by 2 ranks (8 batches, 4 each): the one-process samples, weights and ESS
    _torchrun(tmp_path, "sample", "--model", "ala2/model.pt", "--temperature", "300", "--samples", "1000",
              "--batch-size", "128", "--seed", "3", "--device", "cpu", "--platform", "CPU", "--quiet",
              "--out", "two.h5")
    shared = read_samples(tmp_path / "two.h5").by_temperature[300.0]
    assert np.allclose(shared.positions_nm, samples.positions_nm, atol=1e-5)
    assert np.allclose(shared.log_weights, samples.log_weights, atol=1e-4, equal_nan=True)
    assert shared.summary["relative_ess"] == pytest.approx(samples.relative_ess, rel=1e-4)


@pytest.mark.slow
def test_simulate_on_two_ranks_equals_its_shards_merged(tmp_path):
    """torchrun simulate: rank r runs shard r (seed + r), rank 0 merges; the same file as the
    two shards run one after the other and `trade-md merge` (Reference platform: exact)."""
    from trademd.cli.app import app
    from trademd.io.trajectory_file import read_trajectory
    from typer.testing import CliRunner

    settings = ["simulate", "--system", "ala2-vacuum", "--temperature", "300", "--time", "2ps",
                "--replicas", "2", "--save-every", "0.5ps", "--equilibration", "0",
                "--platform", "Reference", "--seed", "4", "--quiet"]
    _torchrun(tmp_path, *settings, "--out", "ranks.h5")
    runner = CliRunner()
    for shard in ("0/2", "1/2"):
        result = runner.invoke(app, [*settings, "--shard", shard, "--out", str(tmp_path / "jobs.h5")])
        assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["merge", str(tmp_path / "jobs.shard0of2.h5"), str(tmp_path / "jobs.shard1of2.h5"),
                                 "--out", str(tmp_path / "jobs.h5")])
    assert result.exit_code == 0, result.output
    ranks, jobs = read_trajectory(tmp_path / "ranks.h5"), read_trajectory(tmp_path / "jobs.h5")
    assert ranks.n_frames == jobs.n_frames == 16
    assert np.array_equal(ranks.positions_nm, jobs.positions_nm)
    assert np.array_equal(ranks.replica, jobs.replica)

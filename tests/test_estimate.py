"""The run's time estimate: its counting against real runs' own counters, its assembly, its
line in `trade-md run`, and that measuring changes nothing the run uses (no timed assertions)."""

import json

import pytest
import torch
from typer.testing import CliRunner

from trademd.cli.app import app
from trademd.errors import TradeMDError
from trademd.estimate import MDCosts, RunEstimate, TrainingCosts, estimate_run, md_work, training_work
from trademd.pipeline import RunConfig
from trademd.train import training_config

runner = CliRunner()

#: A tiny run: alanine dipeptide in vacuum, 2 replicas x 4 ps, 4 training steps, 32 samples.
TINY = RunConfig(system="ala2-vacuum", temperatures_k=(400.0,), simulation_ps=4.0, replicas=2,
                 steps=4, n_samples=32)


@pytest.fixture(scope="module")
def trajectory(tmp_path_factory):
    """2 replicas x 4 ps of ala2-vacuum at 600 K, 80 saves each."""
    from trademd.md.settings import SimulationConfig
    from trademd.simulate import simulate

    config = SimulationConfig(system_name="ala2-vacuum", temperature_k=600.0, time_ps=4.0, replicas=2,
                              save_every_ps=0.05, equilibration_ps=0, platform="CPU", seed=3)
    return simulate(config, tmp_path_factory.mktemp("estimate") / "t.h5", show_progress=False)


@pytest.mark.parametrize("settings", [
    # grid mode: E_T[u] at the first TRADE step and every 3rd; metrics rows at multiples of 5,
    # at the end of the main phase (12) and of each refinement round (15, 18)
    {"steps": 12, "cache_every": 3, "refine_rounds": 2, "refine_steps": 3},
    # continuous mode, data points only: flow samples and data frames every TRADE step, no cache
    {"steps": 10, "trade_mode": "continuous", "evaluation_points": "data", "refine_rounds": 1,
     "refine_steps": 4},
], ids=["grid", "continuous"])
def test_counted_energy_evaluations_are_what_training_counts(tmp_path, trajectory, settings):
    """The estimate's count of energy evaluations equals the trainer's own count in model.pt."""
    config_file = tmp_path / "tiny.json"
    config_file.write_text(json.dumps({"batch_size": 8, "trade_points": 16, "cache_samples": 20,
                                       "metrics_every": 5, "metrics_samples": 100,
                                       "refine_samples": 200, **settings}))
    result = runner.invoke(app, ["train", "--data", str(trajectory), "--tmin", "300", "--tmax", "660",
                                 "--config", str(config_file), "--device", "cpu", "--platform", "CPU",
                                 "--out", str(tmp_path / "run"), "--quiet"])
    assert result.exit_code == 0, result.output
    recorded = torch.load(tmp_path / "run" / "model.pt", weights_only=False)["energy_evaluations"]
    work = training_work(training_config(300.0, 660.0, config_file=config_file), 600.0)
    assert work.energy_evaluations == recorded > 0
    assert work.nll_steps + work.trade_steps == settings["steps"]
    assert work.refine_steps == settings["refine_rounds"] * settings["refine_steps"]


def test_training_work_counts_the_quick_preset_and_a_resume():
    """The default run's training: 4000 main steps (TRADE from step 1201 on: the weight rises
    after 30 %), 7 rounds of 400 refinement steps, 51 metrics rows, 28 E_T[u] estimates of 11
    grid temperatures (9 and T0 and 300 K); a resume counts only the steps left. The count of
    energy evaluations is the one a real run of these settings wrote into its model.pt
    (3,190,516: docs/results.md, 2026-12-07)."""
    config = training_config(*RunConfig().temperature_range_k, overrides=RunConfig().training_overrides())
    work = training_work(config, 600.0, validation_frames=16000)
    assert (work.nll_steps, work.trade_steps, work.refine_steps) == (1201, 2799, 2800)
    assert (work.cache_refreshes, work.cache_energies) == (28, 11 * 500)
    assert (work.metric_rows, work.metric_energies) == (51, 4 * 10000)
    assert (work.refine_buffers, work.refine_energies) == (7, 11 * (40000 // 11))
    assert work.energy_evaluations == 2799 * 256 + 28 * 5500 + 51 * 40000 + 7 * 39996 == 3190516
    resumed = training_work(config, 600.0, validation_frames=16000, steps_done=4100)
    assert (resumed.nll_steps, resumed.trade_steps, resumed.refine_steps) == (0, 0, 2700)
    assert (resumed.cache_refreshes, resumed.metric_rows, resumed.refine_buffers) == (0, 23, 6)
    with pytest.raises(TradeMDError, match="trade objective"):
        training_work(training_config(240.0, 660.0, overrides={"objective": "nll"}), 600.0)


def test_md_work_counts_saves_frames_and_a_resume():
    md = RunConfig().simulation("CPU")  # 16 replicas x 1 ns, 0.1 ps saves, 4 fs steps, 20 ps equilibration
    work = md_work(md)
    assert (work.equilibration_steps, work.saves, work.steps_per_save, work.frames, work.chunks) == (
        5000, 10000, 25, 160000, 1000)
    resumed = md_work(md, saves_done=9995)
    assert (resumed.equilibration_steps, resumed.saves, resumed.frames, resumed.chunks) == (0, 5, 80, 1)


def test_the_estimate_scales_with_the_simulated_time_and_the_samples(monkeypatch):
    """MD time grows linearly with --time (plus a fixed set-up and equilibration), sampling
    time with --n and the temperatures, each at the measured costs (here fixed ones)."""
    import trademd.estimate

    monkeypatch.setattr(trademd.estimate, "measure_md", lambda config: MDCosts(0.5, 0.04, 1e-4, 0.01))
    monkeypatch.setattr(trademd.estimate, "measure_training",
                        lambda *args: TrainingCosts(0.3, 4e-5, 0.04, 0.14, 0.06, 1e-4, 4e-5))

    def estimate(**settings) -> RunEstimate:
        return estimate_run(RunConfig(**settings), "CPU", "cpu")

    one, two, three = (estimate(simulation_ps=1000.0 * k, n_samples=100000 * k) for k in (1, 2, 3))
    assert two.md_s - one.md_s == pytest.approx(three.md_s - two.md_s) == pytest.approx(10000 * (0.04 + 16e-4 + 1e-3))
    assert two.sampling_s - one.sampling_s == pytest.approx(three.sampling_s - two.sampling_s) == pytest.approx(10.0)
    assert estimate(temperatures_k=(300.0, 400.0)).sampling_s - 0.3 == pytest.approx(2 * (one.sampling_s - 0.3))
    assert two.training_s > one.training_s  # more frames to featurise and validate
    only_sampling = estimate_run(RunConfig(), "CPU", "cpu", md_saves_done=None, training_steps_done=None)
    assert only_sampling.md_s is only_sampling.training_s is None
    assert only_sampling.line().startswith("expected on this machine: sampling ~1 min (about 1 min")


def test_estimate_line_reads_in_minutes_and_hours():
    estimate = RunEstimate(md_s=690.0, training_s=1020.0, sampling_s=20.0, measured_s=4.2)
    assert estimate.line() == ("expected on this machine: MD ~12 min, training ~17 min, sampling ~1 min "
                               "(about 29 min; measured in 4 s)")
    assert RunEstimate(None, 4 * 3600.0, None, 9.0).line() == (
        "expected on this machine: training ~4.0 h (about 4.0 h; measured in 9 s)")


def test_measuring_changes_nothing_the_run_uses():
    """A real measurement (tiny run): torch's random state and thread count are as before,
    every stage gets a positive time, and the training's count matches its work."""
    torch.manual_seed(7)
    state, threads = torch.get_rng_state(), torch.get_num_threads()
    estimate = estimate_run(TINY, "CPU", "cpu")
    assert torch.equal(torch.get_rng_state(), state) and torch.get_num_threads() == threads
    assert estimate.md_s > 0 and estimate.training_s > 0 and estimate.sampling_s > 0
    assert estimate.measured_s > 0 and estimate.energy_evaluations > 0


def test_trade_md_run_says_the_estimate_first(monkeypatch, tmp_path):
    """`trade-md run` logs the estimate before the MD starts; --no-estimate leaves it out."""
    import trademd.simulate

    def stop(*args, **kwargs):
        raise TradeMDError("stopped before the MD")

    monkeypatch.setattr(trademd.simulate, "simulate", stop)
    arguments = ["run", "--system", "ala2-vacuum", "--temperature", "400", "--time", "4ps", "--replicas", "2",
                 "--steps", "4", "--n", "32", "--platform", "CPU", "--device", "cpu", "--quiet",
                 "--out", str(tmp_path / "run")]
    result = runner.invoke(app, arguments)
    assert result.exit_code != 0 and "stopped before the MD" in result.output
    line = next(line for line in result.output.splitlines() if "expected on this machine" in line)
    assert line.startswith("[trade-md run] expected on this machine: MD ~")
    assert "training ~" in line and "sampling ~" in line and "measured in" in line
    assert result.output.index("expected on this machine") < result.output.index("simulating")
    quiet = runner.invoke(app, arguments + ["--no-estimate"])
    assert "stopped before the MD" in quiet.output and "expected on this machine" not in quiet.output

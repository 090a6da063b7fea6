"""Training: TRADE transfers the analytic densities, baselines do not; resume is exact; bad
input and bad batches give clear errors."""

import csv
import json
import math

import pytest
import torch
from typer.testing import CliRunner

from trademd.cli.app import app
from trademd.errors import TradeMDError
from trademd.systems.analytic import get_analytic_system
from trademd.training.targets import AnalyticTarget
from trademd.training.config import TrainConfig
from trademd.training.trainer import Trainer

runner = CliRunner()

#: Small, fast settings used by these tests (seconds per run on 2 cores).
FAST = dict(t_min=0.5, t_max=2.0, batch_size=256, learning_rate=5e-3, cache_every=50,
            evaluation_points="samples", refine_rounds=0,
            cache_samples=256, grid_size=7, trade_points=128, warmup_fraction=0.1,
            ramp_fraction=0.1, metrics_every=100, checkpoint_every=100, flow={"width": 32})


pytestmark = pytest.mark.usefixtures("one_thread")


def _train(tmp_path, objective, steps=300, system="double-well-5d", **overrides):
    target = AnalyticTarget(get_analytic_system(system), n_data=20000)
    config = TrainConfig.from_settings({"objective": objective, "steps": steps, **FAST, **overrides})
    trainer = Trainer(target, config, tmp_path / objective)
    trainer.train(show_progress=False)
    return trainer


@pytest.mark.slow
def test_trade_transfers_the_double_well_and_nll_does_not(tmp_path):
    """Data at T0 = 1 only. Measured (300 steps): TRADE KL 0.03 at T=0.5 and 0.14 at T=2;
    NLL with a temperature-scaled base 1.18 and 0.92."""
    system = get_analytic_system("double-well-5d")
    trade = _train(tmp_path, "trade")
    nll = _train(tmp_path, "nll")
    for temperature, bound in ((0.5, 0.15), (2.0, 0.4)):
        kl_trade = system.forward_kl(trade.flow.log_prob, temperature)
        kl_nll = system.forward_kl(nll.flow.log_prob, temperature)
        assert kl_trade < bound, (temperature, kl_trade)
        assert kl_trade < 0.5 * kl_nll, (temperature, kl_trade, kl_nll)
    assert system.forward_kl(trade.flow.log_prob, 1.0) < 0.1


@pytest.mark.slow
def test_continuous_trade_mode_transfers_the_double_well(tmp_path):
    """The paper's other mode: one temperature per step, E[u] by SNIS from that step's samples."""
    system = get_analytic_system("double-well-5d")
    trade = _train(tmp_path, "trade", trade_mode="continuous", trade_points=256)
    for temperature, bound in ((0.5, 0.15), (2.0, 0.4)):
        assert system.forward_kl(trade.flow.log_prob, temperature) < bound


@pytest.mark.slow
@pytest.mark.parametrize("expectation", ["snis", "model"])
def test_trade_transfers_the_gaussian(tmp_path, expectation):
    system = get_analytic_system("gaussian-2d")
    trade = _train(tmp_path, "trade", steps=200, system="gaussian-2d", expectation=expectation)
    for temperature in (0.5, 2.0):
        assert system.forward_kl(trade.flow.log_prob, temperature) < 0.1


@pytest.mark.slow
def test_resume_continues_exactly(tmp_path, monkeypatch):
    settings = dict(steps=12, checkpoint_every=4, cache_every=3)
    whole = _train(tmp_path / "whole", "trade", **settings)

    target = AnalyticTarget(get_analytic_system("double-well-5d"), n_data=20000)
    config = TrainConfig.from_settings({"objective": "trade", **FAST, **settings})
    trainer = Trainer(target, config, tmp_path / "cut")
    original = trainer.loss

    def interrupt_at_step_7():
        if trainer.step == 7:
            raise KeyboardInterrupt
        return original()

    monkeypatch.setattr(trainer, "loss", interrupt_at_step_7)
    with pytest.raises(KeyboardInterrupt):
        trainer.train(show_progress=False)

    resumed = Trainer(AnalyticTarget(get_analytic_system("double-well-5d"), n_data=20000),
                      TrainConfig.from_settings({"objective": "trade", **FAST, **settings}), tmp_path / "cut")
    resumed.resume()
    assert resumed.step == 4
    resumed.train(show_progress=False)
    for a, b in zip(whole.flow.parameters(), resumed.flow.parameters()):
        assert torch.allclose(a, b, atol=1e-6)
    assert torch.equal(whole.objective.trade.cache.expected_u, resumed.objective.trade.cache.expected_u)
    # energy evaluations of the steps lost to the interruption are not counted twice
    assert resumed.energy_evaluations() == whole.energy_evaluations() > 0


def test_energy_evaluations_are_counted(tmp_path):
    """NLL training evaluates energies only for its ESS metrics: each metrics row adds
    metrics_samples per selection temperature; the model file keeps the total."""
    trainer = _train(tmp_path, "nll", steps=20, metrics_every=5, metrics_samples=300)
    rows = list(csv.DictReader((tmp_path / "nll" / "metrics.csv").open()))
    per_row = 300 * len(trainer.selection_temperatures())
    assert [int(r["energy_evaluations"]) for r in rows] == [per_row * (k + 1) for k in range(len(rows))]
    model = torch.load(tmp_path / "nll" / "model.pt", weights_only=False)
    assert model["energy_evaluations"] == trainer.energy_evaluations() == per_row * len(rows)


def test_linear_log_cut_against_autograd():
    """u below the cut, cut + log(1 + u - cut) above: continuous at the cut, derivative 1
    below and 1 / (1 + u - cut) above, +inf kept."""
    from trademd.training.sampling import linear_log_cut

    u = torch.tensor([-5.0, 0.0, 10.0, 10.5, 1e9], dtype=torch.float64, requires_grad=True)
    cut = linear_log_cut(u, 10.0)
    assert cut.tolist() == pytest.approx([-5.0, 0.0, 10.0, 10.0 + math.log(1.5), 10.0 + math.log1p(1e9 - 10.0)])
    (gradient,) = torch.autograd.grad(cut.sum(), u)
    assert gradient.tolist() == pytest.approx([1.0, 1.0, 1.0, 1 / 1.5, 1 / (1 + 1e9 - 10.0)])
    assert linear_log_cut(torch.tensor([math.inf]), 10.0).item() == math.inf


@pytest.mark.slow
def test_data_free_trade_transfers_the_double_well(tmp_path):
    """No data: a boundary by reverse KL at T0 = 1 and TRADE over [0.5, 2]. Measured (300
    steps): forward KL 0.12 / 0.04 / 0.11 at T = 0.5 / 1 / 2 (TRADE with data: 0.09 / 0.04 /
    0.07); no data frame is ever read."""
    system = get_analytic_system("double-well-5d")
    target = AnalyticTarget(system, n_data=20000)
    target.data_features = target.data_features.fill_(float("nan"))  # any use would show
    config = TrainConfig.from_settings({"objective": "data-free", "steps": 300, **FAST, "warmup_fraction": 0.3})
    trainer = Trainer(target, config, tmp_path / "data-free")
    trainer.train(show_progress=False)
    for temperature, bound in ((0.5, 0.25), (1.0, 0.1), (2.0, 0.25)):
        assert system.forward_kl(trainer.model.log_prob, temperature) < bound
    rows = list(csv.DictReader((tmp_path / "data-free" / "metrics.csv").open()))
    assert all(r["nll_t0"] == "" for r in rows) and rows[-1]["reverse_kl"] != ""
    # the boundary's stand-in for data: weighted flow samples at T0, redrawn every 150 steps
    assert rows[-1]["boundary_nll"] != "" and 0.0 < float(rows[-1]["buffer_ess"]) <= 1.0
    assert int(rows[-1]["energy_evaluations"]) > 0


@pytest.mark.slow
def test_data_free_cli_refuses_data_and_other_objectives(tmp_path):
    base = ["train", "--tmin", "0.5", "--tmax", "2", "--out", str(tmp_path / "r"), "--quiet", "--data-free"]
    result = runner.invoke(app, [*base, "--data", str(tmp_path / "data.h5")])
    assert result.exit_code == 1 and "data-free training uses no data" in result.output
    result = runner.invoke(app, [*base, "--system", "gaussian-2d", "--objective", "nll"])
    assert result.exit_code == 1 and "--data-free is the objective data-free" in result.output
    result = runner.invoke(app, [*base, "--system", "gaussian-2d", "--steps", "4"])
    assert result.exit_code == 0, result.output
    config = json.loads((tmp_path / "r" / "config.json").read_text())
    assert config["objective"] == "data-free" and config["trade"]["evaluation_points"] == "samples"


def test_non_finite_batches_are_skipped_then_stop(tmp_path):
    target = AnalyticTarget(get_analytic_system("gaussian-2d"), n_data=100)
    config = TrainConfig.from_settings({"objective": "nll", "steps": 10, "max_bad_batches": 3, **FAST})
    trainer = Trainer(target, config, tmp_path)
    trainer.data[:] = float("nan")  # every NLL batch is non-finite
    with pytest.raises(TradeMDError, match="3 batches gave a non-finite loss"):
        trainer.train(show_progress=False)
    assert trainer.bad_batches == 3 and trainer.step == 0


@pytest.mark.parametrize("objective", ["reverse-kl", pytest.param("nll+reverse-kl", marks=pytest.mark.slow)])
def test_reverse_kl_objectives_lower_their_loss(tmp_path, objective):
    _train(tmp_path, objective, steps=40, system="gaussian-2d", metrics_every=10)
    rows = (tmp_path / objective / "metrics.csv").read_text().splitlines()
    header = rows[0].split(",")
    column = header.index("reverse_kl")
    first, last = float(rows[1].split(",")[column]), float(rows[-1].split(",")[column])
    assert last < first


@pytest.mark.slow
def test_train_cli_on_an_analytic_system(tmp_path):
    out = tmp_path / "run"
    result = runner.invoke(app, ["train", "--system", "gaussian-2d", "--tmin", "0.5", "--tmax", "2",
                                 "--steps", "20", "--out", str(out), "--quiet"])
    assert result.exit_code == 0, result.output
    for name in ("model.pt", "checkpoint.pt", "metrics.csv", "loss.png", "config.json"):
        assert (out / name).is_file()
    model = torch.load(out / "model.pt", weights_only=False)
    assert model["temperature_range"] == [0.5, 2.0] and model["reference_temperature"] == 1.0
    assert json.loads((out / "config.json").read_text())["steps"] == 20
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(
    "arguments, words",
    [
        (["--system", "gaussian-2d", "--tmin", "1.5", "--tmax", "2"], ["outside", "--tmin"]),
        (["--system", "gaussian-2d", "--tmin", "-1", "--tmax", "2"], ["0 < tmin < tmax"]),
        (["--tmin", "1", "--tmax", "2"], ["--data"]),
        (["--system", "gaussian-2d", "--tmin", "0.5", "--tmax", "2", "--objective", "magic"], ["unknown objective"]),
        (["--system", "gaussian-2d", "--tmin", "0.5", "--tmax", "2", "--preset", "huge"], ["unknown preset"]),
        (["--system", "gaussian-2d", "--tmin", "0.5", "--tmax", "2", "--steps", "3"], ["--steps must be at least 4"]),
    ],
)
def test_train_bad_input(tmp_path, arguments, words):
    result = runner.invoke(app, ["train", *arguments, "--out", str(tmp_path / "r"), "--quiet"])
    assert result.exit_code != 0 and "Traceback" not in result.output
    assert all(word in result.output for word in words), result.output


def test_train_refuses_a_wrong_schema_file(tmp_path):
    import h5py

    path = tmp_path / "samples.h5"
    with h5py.File(path, "w") as h5:
        h5.attrs["format"] = "something-else"
    result = runner.invoke(app, ["train", "--data", str(path), "--tmin", "300", "--tmax", "700",
                                 "--out", str(tmp_path / "r"), "--quiet"])
    assert result.exit_code == 1 and "expected 'trade-md/trajectory'" in result.output


@pytest.mark.slow
def test_resume_with_another_system_is_refused(tmp_path):
    out = tmp_path / "run"
    base = ["--tmin", "0.5", "--tmax", "2", "--steps", "4", "--out", str(out), "--quiet"]
    assert runner.invoke(app, ["train", "--system", "gaussian-2d", *base]).exit_code == 0
    result = runner.invoke(app, ["train", "--system", "double-well-5d", *base, "--resume"])
    assert result.exit_code == 1 and "trained on 'gaussian-2d'" in result.output


def test_train_temperature_picks_a_replica_exchange_ensemble(tmp_path, monkeypatch):
    """``--temperature`` (the option the replica-exchange error message names) reaches the
    library as ``temperature_k``."""
    import trademd.train

    calls = []
    monkeypatch.setattr(trademd.train, "train_run",
                        lambda *args, **kwargs: calls.append(kwargs) or tmp_path / "model.pt")
    base = ["train", "--data", str(tmp_path / "rx.h5"), "--tmin", "300", "--tmax", "700",
            "--out", str(tmp_path / "r"), "--quiet"]
    result = runner.invoke(app, [*base, "--temperature", "450"])
    assert result.exit_code == 0, result.output
    assert calls[-1]["temperature_k"] == 450.0 and calls[-1]["data"] == tmp_path / "rx.h5"
    assert runner.invoke(app, base).exit_code == 0 and calls[-1]["temperature_k"] is None


def test_resume_on_another_ensemble_of_the_same_file_is_refused(tmp_path):
    """A run trained at one T0 resumes at that T0 only: here the run's target.json records
    T0 = 1.5 (as a replica-exchange file's other ensemble would), the system's is 1."""
    from trademd.train import train_run

    out = tmp_path / "run"
    settings = dict(system="gaussian-2d", overrides={"steps": 4}, device="cpu", show_progress=False)
    train_run(out, 0.5, 2.0, **settings)
    (out / "model.pt").unlink()  # as if interrupted before the end
    recorded = json.loads((out / "target.json").read_text())
    assert recorded["temperature_k"] == 1.0
    (out / "target.json").write_text(json.dumps({**recorded, "temperature_k": 1.5}))
    with pytest.raises(TradeMDError, match="at 1.5, not 'gaussian-2d' at 1: resume with the same data"):
        train_run(out, 0.5, 2.0, resume=True, **settings)
    (out / "target.json").write_text(json.dumps(recorded))
    train_run(out, 0.5, 2.0, resume=True, **settings)  # the same ensemble resumes


def test_trade_points_come_only_from_trusted_temperatures(tmp_path):
    """A data-free double well with a floor: every TRADE temperature of a step is one whose
    cached estimate had at least that ESS."""
    target = AnalyticTarget(get_analytic_system("double-well-5d"), n_data=1000)
    config = TrainConfig.from_settings(dict(
        t_min=0.5, t_max=2.0, objective="data-free", steps=8, batch_size=64, warmup_fraction=0.0,
        ramp_fraction=0.1, cache_samples=200, trade_points=32, evaluation_points="samples", refine_rounds=0,
        metrics_every=100, trade_ess_floor=0.5, boundary_buffer_samples=0, flow={"width": 8}))
    trainer = Trainer(target, config, tmp_path / "gate")
    trade = trainer.objective.trade  # the TRADE term and its E_T[u] cache
    trade.refresh(trainer)
    # a floor between the grid's ESS values, so that some temperatures pass and some do not
    trainer.config.trade.trade_ess_floor = float(trade.cache.relative_ess.median()) + 1e-9
    trusted = set(trade.cache.trusted(trainer.config.trade.trade_ess_floor).tolist())
    seen = []
    original = trainer.target.reduced_energy

    def spy(z, temperature, *args):
        seen.append(temperature.detach().clone())
        return original(z, temperature, *args)

    trainer.target.reduced_energy = spy
    trade.loss(trainer)
    allowed = trade.cache.temperatures[sorted(trusted)].float()
    assert len(seen) == 1 and bool(torch.isin(seen[0], allowed).all())
    assert 0 < len(trusted) < len(trade.cache.temperatures)  # the gate is doing something



@pytest.mark.slow
def test_resume_before_the_first_checkpoint_starts_again_as_simulate_does(tmp_path):
    """A run killed before its first checkpoint holds nothing to keep: ``--resume`` starts it
    again and says so (simulate does the same with a file stopped before its first chunk); a
    run directory that does not exist is a one-line error."""
    out = tmp_path / "run"
    base = ["train", "--system", "gaussian-2d", "--tmin", "0.5", "--tmax", "2", "--steps", "4",
            "--out", str(out), "--quiet"]
    result = runner.invoke(app, [*base[:-3], "--out", str(tmp_path / "missing"), "--quiet", "--resume"])
    assert result.exit_code == 1 and "nothing to resume" in result.output and "drop --resume" in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert runner.invoke(app, base).exit_code == 0
    first = (out / "metrics.csv").read_text()
    for name in ("checkpoint.pt", "model.pt"):  # as if killed before the first checkpoint
        (out / name).unlink()
    result = runner.invoke(app, [*base, "--resume"])
    assert result.exit_code == 0, result.output
    assert "holds no checkpoint yet" in result.output and "starting from the beginning" in result.output
    assert (out / "model.pt").is_file() and (out / "metrics.csv").read_text().count("\n") == first.count("\n")

"""Weight averaging, model selection and energy refinement: the selected model is the one the
metrics scored best, refinement's weights estimate the target, refinement lowers the KL to
the exact density, and a refinement run interrupted mid-round resumes exactly."""

import csv
import json
import math

import pytest
import torch

from trademd.flow.factory import load_flow
from trademd.systems.analytic import get_analytic_system
from trademd.training.refine import RefinementBuffer, resampling_probabilities
from trademd.training.targets import AnalyticTarget
from trademd.training.config import TrainConfig
from trademd.training.trainer import Trainer

FAST = dict(t_min=0.5, t_max=2.0, batch_size=256, learning_rate=5e-3, cache_every=50,
            evaluation_points="samples", refine_rounds=0,
            cache_samples=256, grid_size=7, trade_points=128, warmup_fraction=0.1,
            ramp_fraction=0.1, metrics_every=20, metrics_samples=2000, checkpoint_every=20,
            flow={"width": 32})


pytestmark = pytest.mark.usefixtures("one_thread")


def _trainer(tmp_path, system="double-well-5d", validation=False, **settings):
    target = AnalyticTarget(get_analytic_system(system), n_data=20000)
    held_out = None
    if validation:
        held_out = target.system.sample(2000, target.reference_temperature,
                                        torch.Generator().manual_seed(11)).float()
    return Trainer(target, TrainConfig.from_settings({**FAST, **settings}), tmp_path, validation_features=held_out)


# ------------------------------------------------------------------------------------------
# the weights


def test_resampling_probabilities_share_equally_between_temperatures_and_clip():
    log_w = torch.tensor([0.0, 0.0, 0.0, 5.0, 1.0, 2.0, -math.inf, float("nan")])
    group = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    p = resampling_probabilities(log_w, group, clip_fraction=0.0)
    assert float(p[:4].sum()) == pytest.approx(0.5) and float(p[4:].sum()) == pytest.approx(0.5)
    assert float(p[6]) == 0.0 and float(p[7]) == 0.0
    assert float(p[3] / p[0]) == pytest.approx(math.exp(5.0))
    # clip_fraction 0.5 of 4 finite weights: the top 2 are lowered to the 2nd largest (0)
    clipped = resampling_probabilities(log_w, group, clip_fraction=0.5)
    assert torch.allclose(clipped[:4], torch.full((4,), 0.125, dtype=torch.float64))
    # a temperature whose weights are all zero leaves its share to the others
    none = resampling_probabilities(torch.tensor([0.0, -math.inf]), torch.tensor([0, 1]), 0.0)
    assert torch.equal(none, torch.tensor([1.0, 0.0], dtype=torch.float64))


def test_resampled_buffer_reproduces_target_expectations():
    """Proposal N(0, 1), target N(mu, 1) at two 'temperatures' (mu = 0.5 and -0.8): the
    resampled batch means converge to mu (clipping 1e-4 of 40,000 barely biases)."""
    generator = torch.Generator().manual_seed(0)
    n = 40000
    z = torch.randn(2 * n, 1, generator=generator, dtype=torch.float64)
    temperatures = torch.cat([torch.full((n,), 1.0), torch.full((n,), 2.0)]).double()
    mu = torch.where(temperatures == 1.0, 0.5, -0.8)
    log_w = -0.5 * (z[:, 0] - mu) ** 2 + 0.5 * z[:, 0] ** 2  # log N(mu, 1) - log N(0, 1)
    buffer = RefinementBuffer.from_samples(0, z, temperatures, log_w, clip_fraction=1e-4)
    torch.manual_seed(1)
    batch, t = buffer.batch(200000)
    for temperature, expected in ((1.0, 0.5), (2.0, -0.8)):
        mine = batch[t == temperature, 0]
        assert abs(len(mine) / len(batch) - 0.5) < 0.01  # equal shares
        assert float(mine.mean()) == pytest.approx(expected, abs=0.02)
    # Kish ESS of N(mu, 1) from N(0, 1) is exp(-mu^2): mean over both temperatures
    assert buffer.relative_ess == pytest.approx(0.5 * (math.exp(-0.25) + math.exp(-0.64)), rel=0.05)


# ------------------------------------------------------------------------------------------
# selection


@pytest.mark.slow
def test_model_is_the_selected_ema_step_by_validation_nll(tmp_path):
    trainer = _trainer(tmp_path, system="gaussian-2d", validation=True, objective="nll", steps=100)
    trainer.train(show_progress=False)
    with (tmp_path / "metrics.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    best = min(rows, key=lambda row: float(row["val_nll_t0"]))
    assert [row["step"] for row in rows if row["selected"] == "1"][-1] == best["step"]
    selection = json.loads((tmp_path / "selection.json").read_text())
    assert selection["step"] == int(best["step"]) and "validation NLL" in selection["criterion"]
    # the model file holds exactly the parameters that scored that validation NLL
    model = torch.load(tmp_path / "model.pt", weights_only=False)
    flow = load_flow(model["flow"])
    with torch.no_grad():
        val_nll = -flow.log_prob(trainer.validation, trainer.target.reference_temperature).mean()
    assert float(val_nll) == pytest.approx(float(best["val_nll_t0"]), abs=1e-5)
    assert model["selection"]["step"] == int(best["step"])


@pytest.mark.slow
def test_trade_is_selected_by_ess_only_after_its_ramp(tmp_path):
    trainer = _trainer(tmp_path, objective="trade", steps=100, warmup_fraction=0.3, ramp_fraction=0.2,
                       focus_temperatures=[0.7])
    trainer.train(show_progress=False)
    with (tmp_path / "metrics.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert "ess_0.7" in rows[0]
    eligible = [row for row in rows if int(row["step"]) >= 50]

    def score(row):
        names = ("ess_tmin", "ess_t0", "ess_tmax", "ess_0.7")
        return sum(math.log(max(float(row[k]), 1 / 2000)) for k in names) / 4

    best = max(eligible, key=score)
    # steps before the ramp ends are kept only as placeholders until an eligible one comes
    assert [row for row in rows if row["selected"] == "1"][-1]["step"] == best["step"]
    assert trainer.best["step"] == int(best["step"])
    assert trainer.best["score"] == pytest.approx(score(best), abs=1e-9)
    # T0 and the focus temperature are TRADE grid points
    grid = trainer.objective.trade.cache.temperatures.tolist()  # the TRADE grid
    assert any(abs(t - 0.7) < 1e-9 for t in grid)
    assert any(abs(t - 1.0) < 1e-9 for t in grid)


# ------------------------------------------------------------------------------------------
# refinement


@pytest.mark.slow
def test_refinement_lowers_the_kl_at_the_ends_of_the_range(tmp_path):
    """NLL at T0 with a temperature-scaled base transfers badly (KL ~ 1 at T = 0.5 and 2);
    importance-weighted forward KL over the range repairs it with no further data."""
    system = get_analytic_system("double-well-5d")
    plain = _trainer(tmp_path / "plain", objective="nll", steps=300, metrics_every=100)
    plain.train(show_progress=False)
    refined = _trainer(tmp_path / "refined", objective="nll", steps=300, metrics_every=100,
                       refine_rounds=3, refine_steps=150, refine_samples=14000,
                       refine_learning_rate=2e-3)
    refined.train(show_progress=False)
    for temperature in (0.5, 2.0):
        before = system.forward_kl(plain.flow.log_prob, temperature)
        after = system.forward_kl(refined.flow.log_prob, temperature)
        assert after < 0.5 * before, (temperature, before, after)


@pytest.mark.slow
def test_refinement_resumes_exactly_mid_round(tmp_path, monkeypatch):
    settings = dict(objective="trade", steps=12, checkpoint_every=4, cache_every=3, metrics_every=4,
                    metrics_samples=500, refine_rounds=2, refine_steps=6, refine_samples=700)
    whole = _trainer(tmp_path / "whole", **settings)
    whole.train(show_progress=False)

    cut = _trainer(tmp_path / "cut", **settings)
    original = cut.loss

    def interrupt_at_step_21():
        if cut.step == 21:
            raise KeyboardInterrupt
        return original()

    monkeypatch.setattr(cut, "loss", interrupt_at_step_21)
    with pytest.raises(KeyboardInterrupt):
        cut.train(show_progress=False)
    resumed = _trainer(tmp_path / "cut", **settings)
    resumed.resume()
    assert resumed.step == 20 and resumed.refinement.buffer.round_index == 1
    resumed.train(show_progress=False)
    for a, b in zip(whole.flow.parameters(), resumed.flow.parameters()):
        assert torch.allclose(a, b, atol=1e-6)
    assert whole.best["step"] == resumed.best["step"]


@pytest.mark.slow
def test_a_presets_refinement_scales_with_the_steps(tmp_path):
    from trademd.train import preset_settings, train_run

    train_run(tmp_path / "short", 0.5, 2.0, system="gaussian-2d", overrides={"steps": 30},
              show_progress=False)
    config = json.loads((tmp_path / "short" / "config.json").read_text())
    quick = preset_settings("quick")
    refinement, quick_refinement = config["refinement"], quick["refinement"]
    assert refinement["refine_steps"] == round(quick_refinement["refine_steps"] * 30 / quick["steps"]) == 3
    assert refinement["refine_rounds"] == quick_refinement["refine_rounds"]
    train_run(tmp_path / "fixed", 0.5, 2.0, system="gaussian-2d",
              overrides={"steps": 30, "refine_steps": 5}, show_progress=False)
    assert json.loads((tmp_path / "fixed" / "config.json").read_text())["refinement"]["refine_steps"] == 5

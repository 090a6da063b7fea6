"""The divergence guard: a main phase whose held-out NLL at T0 jumps (of the weight-averaged or
of the trained flow) is rolled back to its last healthy metrics row with a lower learning rate
and TRADE weight; healthy runs and a guard set to 0 are untouched."""

import csv

import pytest
import torch

from trademd.errors import TradeMDError
from trademd.systems.analytic import get_analytic_system
from trademd.training.config import TrainConfig
from trademd.training.targets import AnalyticTarget
from trademd.training.trainer import Trainer

pytestmark = pytest.mark.usefixtures("one_thread")

#: NLL on the 2-d Gaussian, a metrics row every 10 steps, no weight averaging (the EMA flow
#: that metrics score is the trained one).
SETTINGS = dict(objective="nll", steps=40, t_min=0.5, t_max=2.0, batch_size=128, learning_rate=5e-3,
                ema_decay=0.0, metrics_every=10, metrics_samples=200, checkpoint_every=100,
                refine_rounds=0, flow={"width": 16})


class StateRecorder:
    """A reporter, after the metrics reporter: the flow's parameters at every metrics row."""

    def __init__(self):
        self.states: dict[int, dict] = {}

    def start(self, trainer) -> None:
        pass

    def due(self, trainer) -> bool:
        return trainer.step % trainer.config.reporting.metrics_every == 0

    def report(self, trainer, step) -> None:
        self.states[trainer.step] = {k: v.clone() for k, v in trainer.flow.state_dict().items()}


def _sabotaged_run(tmp_path, undo_at: int | None = None, **overrides) -> tuple[Trainer, StateRecorder]:
    """Train with every parameter knocked by unit noise right after step 15 (a divergence),
    undone right after step ``undo_at`` if given (a transient)."""
    system = get_analytic_system("gaussian-2d")
    target = AnalyticTarget(system, n_data=4000)
    validation = system.sample(2000, system.reference_temperature, torch.Generator().manual_seed(1)).float()
    config = TrainConfig.from_settings({**SETTINGS, **overrides})
    trainer = Trainer(target, config, tmp_path, validation_features=validation)
    recorder = StateRecorder()
    trainer.reporters.insert(1, recorder)  # right after the metrics reporter, where the guard acts
    original = trainer.take_step

    knocks = []

    def take_step_then_knock():
        report = original()
        with torch.no_grad():
            if trainer.step == 15:
                knocks.extend(torch.randn_like(p) for p in trainer.flow.parameters())
                for parameter, knock in zip(trainer.flow.parameters(), knocks):
                    parameter.add_(knock)
            if trainer.step == undo_at:
                for parameter, knock in zip(trainer.flow.parameters(), knocks):
                    parameter.sub_(knock)
        return report

    trainer.take_step = take_step_then_knock
    trainer.train(show_progress=False)
    return trainer, recorder


def _rows(path) -> list[dict]:
    return list(csv.DictReader((path / "metrics.csv").open()))


def test_a_diverged_row_rolls_back_to_the_last_healthy_one(tmp_path, capsys):
    trainer, recorder = _sabotaged_run(tmp_path)
    rows = {int(r["step"]): r for r in _rows(tmp_path)}
    # the knock shows at step 20: far above the lowest held-out NLL (steps 10)
    assert float(rows[20]["val_nll_t0"]) > float(rows[10]["val_nll_t0"]) + 5.0
    assert rows[20]["rollbacks"] == "1" and rows[20]["selected"] == "0"
    assert rows[10]["rollbacks"] == "0" and rows[40]["rollbacks"] == "1"
    # after the rollback the parameters are those of step 10, exactly
    for name, value in recorder.states[10].items():
        assert torch.equal(recorder.states[20][name], value), name
    # the schedule goes on at half the rate, and the run ends where it should
    group = trainer.optimizer.param_groups[0]
    assert group["max_lr"] == pytest.approx(0.5 * SETTINGS["learning_rate"])
    assert trainer.step == SETTINGS["steps"]
    assert float(rows[30]["val_nll_t0"]) < float(rows[10]["val_nll_t0"]) + 1.0
    assert "held-out NLL at T0" in capsys.readouterr().err


def test_a_divergence_the_weight_average_hides_is_caught(tmp_path):
    """With a slow weight average the knock barely shows in ``val_nll_t0``; the trained flow's
    own held-out NLL shows it at steps 20 and 30, and the run goes back to step 10 (not to the
    damaged state of step 20)."""
    trainer, recorder = _sabotaged_run(tmp_path, ema_decay=0.99)
    rows = {int(r["step"]): r for r in _rows(tmp_path)}
    assert float(rows[20]["val_nll_t0"]) < float(rows[10]["val_nll_t0"]) + 3.0  # the average hides it
    assert float(rows[20]["val_nll_t0_trained"]) > float(rows[10]["val_nll_t0_trained"]) + 3.0
    assert [rows[s]["rollbacks"] for s in (10, 20, 30)] == ["0", "0", "1"]
    for name, value in recorder.states[10].items():
        assert torch.equal(recorder.states[30][name], value), name


def test_one_row_of_the_trained_flow_alone_rolls_nothing_back(tmp_path):
    """A transient: the knock after step 15 is undone after step 25; at step 20 only the
    trained flow is off, at step 30 both are fine again."""
    trainer, recorder = _sabotaged_run(tmp_path, ema_decay=0.99, undo_at=25)
    rows = {int(r["step"]): r for r in _rows(tmp_path)}
    assert float(rows[20]["val_nll_t0_trained"]) > float(rows[10]["val_nll_t0_trained"]) + 3.0
    assert trainer.guard.rollbacks == 0 and all(r["rollbacks"] == "0" for r in rows.values())


def test_a_rollback_halves_the_trade_weight_and_a_checkpoint_keeps_it(tmp_path):
    trainer, _ = _sabotaged_run(tmp_path, objective="trade", warmup_fraction=0.1, ramp_fraction=0.1,
                                trade_points=32, cache_samples=100, cache_every=10, grid_size=3,
                                evaluation_points="samples")
    rows = {int(r["step"]): r for r in _rows(tmp_path)}
    assert rows[20]["rollbacks"] == "1"
    assert trainer.objective.trade.weight_scale == 0.5
    assert float(rows[30]["trade_weight"]) == pytest.approx(0.5)  # fully ramped in, halved
    saved = torch.load(tmp_path / "checkpoint.pt", weights_only=False)
    assert saved["trade_weight_scale"] == 0.5 and saved["rollbacks"] == 1


def test_a_guard_of_zero_lets_the_run_diverge(tmp_path):
    trainer, recorder = _sabotaged_run(tmp_path, divergence_nats=0.0)
    rows = {int(r["step"]): r for r in _rows(tmp_path)}
    assert all(r["rollbacks"] == "0" for r in rows.values())
    assert not all(torch.equal(recorder.states[20][k], v) for k, v in recorder.states[10].items())
    assert trainer.optimizer.param_groups[0]["max_lr"] == pytest.approx(SETTINGS["learning_rate"])


def test_a_healthy_run_is_not_touched(tmp_path):
    system = get_analytic_system("gaussian-2d")
    validation = system.sample(2000, system.reference_temperature, torch.Generator().manual_seed(1)).float()
    trainer = Trainer(AnalyticTarget(system, n_data=4000), TrainConfig.from_settings(SETTINGS), tmp_path,
                      validation_features=validation)
    trainer.train(show_progress=False)
    assert trainer.guard.rollbacks == 0
    assert all(r["rollbacks"] == "0" for r in _rows(tmp_path))


@pytest.mark.parametrize("setting", [{"divergence_nats": -1.0}, {"divergence_lr_factor": 0.0},
                                     {"divergence_lr_factor": 1.5}, {"divergence_trade_factor": 0.0}])
def test_impossible_guard_settings_are_refused(tmp_path, setting):
    target = AnalyticTarget(get_analytic_system("gaussian-2d"), n_data=100)
    with pytest.raises(TradeMDError, match="divergence"):
        Trainer(target, TrainConfig.from_settings({**SETTINGS, **setting}), tmp_path)

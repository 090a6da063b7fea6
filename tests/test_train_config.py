"""Training settings: one typed, nested home for every default; presets and objectives are
overrides of it; config files are checked when loaded."""

import json

import pytest
from typer.testing import CliRunner

from trademd.cli.app import app
from trademd.errors import TradeMDError
from trademd.train import load_config_file, preset_settings
from trademd.training.config import PRESETS, TrainConfig, setting_names
from trademd.training.objectives import OBJECTIVES

runner = CliRunner()


def _write(tmp_path, settings, name="settings.json"):
    path = tmp_path / name
    path.write_text(json.dumps(settings))
    return path


def test_nested_and_flat_settings_give_the_same_config():
    nested = TrainConfig.from_settings({"t_min": 0.5, "t_max": 2.0, "trade": {"trade_points": 64},
                                        "optimiser": {"learning_rate": 5e-3}, "flow": {"width": 8}})
    flat = TrainConfig.from_settings({"t_min": 0.5, "t_max": 2.0, "trade_points": 64, "learning_rate": 5e-3,
                                      "flow": {"width": 8}})
    assert nested == flat
    assert nested.trade.trade_points == 64 and nested.optimiser.learning_rate == 5e-3
    assert nested.flow.chosen() == {"width": 8, "depth": 2, "bins": 8}
    assert nested.trade.grid_size == TrainConfig(t_min=0.5, t_max=2.0).trade.grid_size  # the default


def test_every_setting_has_one_home():
    """A flat name says its section: no name is in two sections (or at the top and in one)."""
    from dataclasses import fields

    config = TrainConfig(t_min=0.5, t_max=2.0)
    sections = [f.name for f in fields(config) if hasattr(getattr(config, f.name), "__dataclass_fields__")]
    everything = [f.name for f in fields(config) if f.name not in sections] + [
        f.name for section in sections if section != "flow" for f in fields(getattr(config, section))]
    assert len(everything) == len(set(everything)) == len(setting_names())
    assert set(setting_names().values()) == {None, *sections} - {"flow"}


@pytest.mark.parametrize("settings, words", [
    ({"trade": {"points": 64}}, ["unknown setting trade.points", "trade_points"]),
    ({"trade_pionts": 64}, ["unknown setting 'trade_pionts'", "did you mean 'trade_points'?"]),
    ({"trade": {"trade_points": "64"}}, ["trade.trade_points must be int", "'64'"]),
    ({"optimiser": 0.1}, ["'optimiser' must be a mapping"]),
    ({"flow": {"widht": 8}}, ["unknown setting flow.widht"]),
    ({"steps": 1.5}, ["steps must be int"]),
])
def test_a_config_file_is_checked_when_loaded(tmp_path, settings, words):
    path = _write(tmp_path, settings)
    with pytest.raises(TradeMDError) as caught:
        load_config_file(path)
    message = str(caught.value)
    assert "\n" not in message and str(path) in message
    assert all(word in message for word in words), message


def test_the_cli_reports_a_bad_config_file_in_one_line(tmp_path):
    path = _write(tmp_path, {"refinement": {"refine_round": 2}}, "bad.yaml")
    path.write_text("refinement:\n  refine_round: 2\n")
    result = runner.invoke(app, ["train", "--system", "gaussian-2d", "--tmin", "0.5", "--tmax", "2",
                                 "--config", str(path), "--out", str(tmp_path / "r"), "--quiet"])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert result.output.strip().count("\n") == 0
    assert "unknown setting refinement.refine_round" in result.output and "refine_rounds" in result.output


def test_presets_are_overrides_of_the_defaults():
    quick, paper = preset_settings("quick"), preset_settings("paper")
    assert PRESETS["quick"] == {} and quick["steps"] == TrainConfig(t_min=1, t_max=2).steps
    assert paper["steps"] == 80000 and paper["flow"]["width"] == 256 and quick["flow"]["width"] == 64
    assert paper["flow"]["layers"] == ["torsions|torsions", "bounded|torsions", "bounded|bounded"] * 3
    # what paper does not change is quick's
    assert paper["trade"]["residual_loss"] == quick["trade"]["residual_loss"]
    assert paper["reverse_kl"] == quick["reverse_kl"]


def test_objective_defaults_are_settings():
    """Each objective's defaults name real settings (nested or flat)."""
    for objective in OBJECTIVES.values():
        TrainConfig.from_settings({"t_min": 0.5, "t_max": 2.0, **objective.defaults})
    assert OBJECTIVES["data-free"].defaults["evaluation_points"] == "samples"
    assert OBJECTIVES["interpolation"].defaults == {"refine_rounds": 0}

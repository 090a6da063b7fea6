"""``trade-md train`` as a library call: target, presets, config file, resume, outputs."""

from dataclasses import asdict
import json
from pathlib import Path
import sys

import torch

from trademd import distributed
from trademd.analysis.plots import plot_losses
from trademd.errors import TradeMDError
from trademd.platforms import torch_device
from trademd.systems.analytic import ANALYTIC_SYSTEMS, get_analytic_system
from trademd.training.config import DEFAULT_PRESET, PRESETS, TrainConfig, merge_settings, setting_names
from trademd.training.objectives import Objective, objective_class
from trademd.training.targets import AnalyticTarget, MoleculeTarget, Target
from trademd.training.trainer import Trainer

__all__ = ["preset_settings", "training_config", "train_run", "load_config_file"]


def preset_settings(preset: str) -> dict:
    """Every :class:`TrainConfig` setting (but the temperature range) of a preset, nested by
    section (:data:`trademd.training.config.PRESETS` holds what each preset changes)."""
    if preset not in PRESETS:
        raise TradeMDError(f"unknown preset {preset!r}: choose one of {sorted(PRESETS)}")
    defaults = asdict(TrainConfig(t_min=0.0, t_max=0.0))
    del defaults["t_min"], defaults["t_max"]
    return merge_settings(defaults, PRESETS[preset], f"preset {preset!r}")


def load_config_file(path: str | Path) -> dict:
    """Settings from a JSON or YAML file: nested by section, or flat (any setting's name);
    every key and type checked (:meth:`TrainConfig.from_settings`)."""
    path = Path(path)
    if not path.is_file():
        raise TradeMDError(f"config file {str(path)!r} not found")
    text = path.read_text()
    try:
        if path.suffix in (".yaml", ".yml"):
            import yaml

            settings = yaml.safe_load(text) or {}
        else:
            settings = json.loads(text)
    except Exception as error:
        raise TradeMDError(f"cannot parse config file {str(path)!r}: {error}") from None
    if not isinstance(settings, dict):
        raise TradeMDError(f"config file {str(path)!r} must hold a mapping of settings, got {type(settings).__name__}")
    source = f"config file {str(path)!r}"
    checked = merge_settings({}, settings, source)
    TrainConfig.from_settings(merge_settings(preset_settings(DEFAULT_PRESET), {"t_min": 1.0, "t_max": 2.0, **checked}),
                              source)  # types
    return checked


def _chosen_names(settings: dict) -> set[str]:
    """Flat names of the settings in nested ``settings``."""
    sections = set(settings) - set(setting_names())
    return (set(settings) - sections) | {name for section in sections for name in settings[section]}


def _objective_defaults(objective: type[Objective], chosen: set[str]) -> dict:
    """The objective's defaults that the user did not choose (nested)."""
    defaults = merge_settings({}, objective.defaults, f"defaults of {objective.name!r}")
    kept = {k: v for k, v in defaults.items() if not isinstance(v, dict) and k not in chosen}
    for section, values in defaults.items():
        if isinstance(values, dict):
            kept[section] = {k: v for k, v in values.items() if k not in chosen}
    return kept


def _target(data: str | Path | None, system: str | None, platform: str,
            temperature_k: float | None, objective: type[Objective],
            boundary_temperature_k: float | None = None, narrow_torsion_rad: float = 0.0) -> Target:
    if objective.analytic_only and (data is not None or system not in ANALYTIC_SYSTEMS):
        raise TradeMDError(
            f"the {objective.name} objective trains a continuous flow on an analytic system, without "
            f"data: give --system with one of {sorted(ANALYTIC_SYSTEMS)} and no --data")
    if data is None:
        if system is not None and system not in ANALYTIC_SYSTEMS and objective.energy_only:
            from trademd.systems import get_system

            return MoleculeTarget.from_structure(get_system(system), boundary_temperature_k, platform)
        if system is None or system not in ANALYTIC_SYSTEMS:
            raise TradeMDError(
                "give --data FILE.h5 (from `trade-md simulate`) or --system with an analytic "
                f"system {sorted(ANALYTIC_SYSTEMS)} that needs no data"
            )
        return AnalyticTarget(get_analytic_system(system))
    return MoleculeTarget.from_trajectory(data, platform=platform, temperature_k=temperature_k,
                                          narrow_torsion_rad=narrow_torsion_rad)


def training_config(t_min: float, t_max: float, preset: str = DEFAULT_PRESET,
                    config_file: str | Path | None = None, overrides: dict | None = None) -> TrainConfig:
    """The settings :func:`train_run` trains with: the preset, then the config file, then
    ``overrides`` (CLI options; None values are left out), each overriding the one before;
    where only the steps change, the preset's refinement steps scale with them; the
    objective's own defaults (``Objective.defaults``, e.g. data-free's) replace the preset's
    where the user set nothing."""
    base = preset_settings(preset)
    chosen = load_config_file(config_file) if config_file is not None else {}
    chosen = merge_settings(chosen, {k: v for k, v in (overrides or {}).items() if v is not None}, "options")
    names = _chosen_names(chosen)
    settings = merge_settings(base, chosen)
    if "steps" in names and "refine_steps" not in names:
        # the preset's refinement keeps its share of the training when only --steps changes
        settings["refinement"]["refine_steps"] = max(
            1, round(base["refinement"]["refine_steps"] * settings["steps"] / base["steps"]))
    objective = objective_class(settings["objective"])
    settings = merge_settings(settings, _objective_defaults(objective, names))
    return TrainConfig.from_settings({**settings, "t_min": t_min, "t_max": t_max})


def train_run(out: str | Path, t_min: float, t_max: float, data: str | Path | None = None,
              temperature_k: float | None = None, boundary_temperature_k: float | None = None,
              system: str | None = None, preset: str = DEFAULT_PRESET, config_file: str | Path | None = None,
              overrides: dict | None = None, device: str = "auto", platform: str = "auto",
              resume: bool = False, show_progress: bool = True) -> Path:
    """Train a flow as ``trade-md train`` does; returns the path of ``model.pt``.

    Runs without data of a molecular ``system`` (objective data-free, or reverse-kl) take
    their features from the minimised structure and the force field's thermal widths at
    ``boundary_temperature_k`` (default ``t_max``; :meth:`MoleculeTarget.from_structure`); the
    data-free objective fits its boundary by reverse KL there. Analytic systems keep their own T0.

    Settings: :func:`training_config`.

    Under ``torchrun`` (``torchrun --nproc_per_node N -m trademd train ...``) the ranks train
    one model data-parallel (:mod:`trademd.training.trainer`): ``batch_size`` is per rank, each
    rank evaluates its own energies (on CPU with its share of the cores), rank 0 writes ``out``.
    """
    config = training_config(t_min, t_max, preset, config_file, overrides)
    objective = objective_class(config.objective)
    if objective.data_refusal and data is not None:
        raise TradeMDError(objective.data_refusal)
    out = Path(out)
    if resume and not out.is_dir():
        raise TradeMDError(f"nothing to resume: {str(out)!r} does not exist (drop --resume)")
    if resume and not (out / "checkpoint.pt").is_file():
        # stopped before its first checkpoint: nothing to keep, start again (as simulate does)
        print(f"trade-md train: {str(out)!r} holds no checkpoint yet (stopped before the first): "
              "starting from the beginning", file=sys.stderr, flush=True)
        resume = False
    if not resume and (out / "model.pt").exists():
        raise TradeMDError(f"{str(out)!r} already holds a trained model: choose another --out or --resume")
    device = torch_device(device)
    ranks = distributed.start(device)
    if device.type == "cpu":
        # small per-step tensors: one thread is fastest, and leaves the other cores to the
        # OpenMM energy workers (docs/performance.md; ranks side by side share the cores)
        torch.set_num_threads(1)
    if boundary_temperature_k is not None and (not objective.energy_only
                                               or system in ANALYTIC_SYSTEMS or data is not None):
        raise TradeMDError("--t0 sets the boundary temperature of data-free training of molecules: "
                           "drop it (data fix T0; analytic systems have their own)")
    boundary = t_max if boundary_temperature_k is None else float(boundary_temperature_k)
    target = _target(data, system, platform, temperature_k, objective, boundary,
                     config.coordinates.narrow_torsion_rad)
    molecule = getattr(target, "molecule", None)
    if molecule is not None and (warning := molecule.ring_warning()):
        print(f"trade-md train: warning: {molecule.name}: {warning}", file=sys.stderr, flush=True)
    try:
        trainer = Trainer(target, config, out, device=device,
                          validation_features=target.validation_features, ranks=ranks)
        if resume:
            _check_same_target(out, target.record()["system"], target.reference_temperature)
            trainer.resume()
        if ranks.is_main:
            if target.split is not None:
                (out / "split.json").write_text(target.split.to_json())
            (out / "target.json").write_text(json.dumps({"system": target.record()["system"],
                                                         "temperature_k": target.reference_temperature,
                                                         "data": str(data) if data else None,
                                                         "world_size": ranks.world_size}))
        model = trainer.train(show_progress=show_progress)
    finally:
        target.close()
    if ranks.is_main:
        plot_losses(out / "metrics.csv", out / "loss.png")
    return model


def _check_same_target(out: Path, system: str, temperature_k: float) -> None:
    """Refuse to resume the run in ``out`` on another system, or on another ensemble (T0, K)
    of the same file (its ``target.json`` says what it was trained on)."""
    path = out / "target.json"
    recorded = json.loads(path.read_text()) if path.exists() else {}
    recorded_system = recorded.get("system", system)
    recorded_t = recorded.get("temperature_k", temperature_k)
    if recorded_system != system or abs(recorded_t - temperature_k) > 1e-6:
        raise TradeMDError(
            f"the checkpoint in {str(out)!r} was trained on {recorded_system!r} at "
            f"{recorded_t:g}, not {system!r} at {temperature_k:g}: resume with the same data "
            "(and --temperature), or train into a new --out"
        )

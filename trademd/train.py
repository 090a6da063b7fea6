"""``trade-md train`` as a library call: target, presets, config file, resume, outputs."""

from dataclasses import MISSING, fields
import json
from pathlib import Path

import torch

from trademd import distributed
from trademd.analysis.plots import plot_losses
from trademd.errors import TradeMDError
from trademd.platforms import torch_device
from trademd.systems.analytic import ANALYTIC_SYSTEMS, get_analytic_system
from trademd.training.targets import AnalyticTarget, MoleculeTarget, Target
from trademd.training.trainer import TrainConfig, Trainer

__all__ = ["PRESETS", "ENERGY_ONLY_OBJECTIVES", "preset_settings", "train_run", "load_config_file"]

#: Objectives that use the energy alone: molecules train on them without a data file.
ENERGY_ONLY_OBJECTIVES = ("data-free", "reverse-kl")
#: What data-free training changes in every preset (unless set): TRADE evaluated at flow samples
#: (there are no data), a longer phase (structure prior, then reverse KL) before it, the reverse
#: KL over the whole range, and TRADE only at temperatures whose E[u] came from samples of >= 1 %
#: relative ESS (alanine dipeptide from 1200 K, docs/results.md, 2026-12-06: without the gate
#: TRADE collapsed the boundary; with reverse KL at T0 only, 300 K kept 1e-5 ESS, over the range 6 %).
DATA_FREE_DEFAULTS = {"evaluation_points": "samples", "warmup_fraction": 0.6, "trade_ess_floor": 0.01,
                      "reverse_kl_temperatures": "range"}

#: Training presets: what each changes from the :class:`TrainConfig` defaults, which are the
#: ``quick`` preset (minutes on a laptop CPU); ``paper`` is the TRADE paper's alanine-dipeptide
#: scale, for a GPU.
PRESETS = {
    "quick": {},
    "paper": dict(
        steps=80000, batch_size=290, learning_rate=1e-4, grid_size=25, cache_samples=5000,
        cache_every=1000, cache_momentum=0.9, trade_points=512, evaluation_points="samples",
        ramp_fraction=0.1, metrics_every=2000, metrics_samples=20000, checkpoint_every=2000,
        ema_decay=0.999, refine_steps=2000, refine_samples=100000, refine_learning_rate=5e-5,
        flow={"width": 256, "layers": ["torsions|torsions", "bounded|torsions", "bounded|bounded"] * 3},
    ),
}


def preset_settings(preset: str) -> dict:
    """Every :class:`TrainConfig` setting (but the temperature range) of a preset."""
    if preset not in PRESETS:
        raise TradeMDError(f"unknown preset {preset!r}: choose one of {sorted(PRESETS)}")
    defaults = {f.name: f.default_factory() if f.default_factory is not MISSING else f.default
                for f in fields(TrainConfig) if f.name not in ("t_min", "t_max")}
    changes = PRESETS[preset]
    return {**defaults, **changes, "flow": {**defaults["flow"], **changes.get("flow", {})}}


def load_config_file(path: str | Path) -> dict:
    """Settings from a JSON or YAML file (keys: any :class:`TrainConfig` field)."""
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
    known = {f.name for f in fields(TrainConfig)}
    unknown = sorted(set(settings) - known)
    if unknown:
        raise TradeMDError(f"config file {str(path)!r} has unknown keys {unknown}: use {sorted(known)}")
    return settings


def _target(data: str | Path | None, system: str | None, platform: str,
            temperature_k: float | None = None, objective: str = "trade",
            boundary_temperature_k: float | None = None) -> Target:
    if objective == "interpolation" and (data is not None or system not in ANALYTIC_SYSTEMS):
        raise TradeMDError(
            "the interpolation objective trains a continuous flow on an analytic system, without "
            f"data: give --system with one of {sorted(ANALYTIC_SYSTEMS)} and no --data")
    if data is None:
        if system is not None and system not in ANALYTIC_SYSTEMS and objective in ENERGY_ONLY_OBJECTIVES:
            from trademd.systems import get_system

            return MoleculeTarget.from_structure(get_system(system), boundary_temperature_k, platform)
        if system is None or system not in ANALYTIC_SYSTEMS:
            raise TradeMDError(
                "give --data FILE.h5 (from `trade-md simulate`) or --system with an analytic "
                f"system {sorted(ANALYTIC_SYSTEMS)} that needs no data"
            )
        return AnalyticTarget(get_analytic_system(system))
    return MoleculeTarget.from_trajectory(data, platform=platform, temperature_k=temperature_k)


def train_run(out: str | Path, t_min: float, t_max: float, data: str | Path | None = None,
              temperature_k: float | None = None, boundary_temperature_k: float | None = None,
              system: str | None = None, preset: str = "quick", config_file: str | Path | None = None,
              overrides: dict | None = None, device: str = "auto", platform: str = "auto",
              resume: bool = False, show_progress: bool = True) -> Path:
    """Train a flow as ``trade-md train`` does; returns the path of ``model.pt``.

    Runs without data of a molecular ``system`` (objective data-free, or reverse-kl) take
    their features from the minimised structure and the force field's thermal widths at
    ``boundary_temperature_k`` (default ``t_max``; :meth:`MoleculeTarget.from_structure`); the
    data-free objective fits its boundary by reverse KL there. Analytic systems keep their own T0.

    Settings: the preset, then the config file, then ``overrides`` (CLI options), each
    overriding the one before; where only the steps change, the preset's refinement steps
    scale with them.

    Under ``torchrun`` (``torchrun --nproc_per_node N -m trademd train ...``) the ranks train
    one model data-parallel (:mod:`trademd.training.trainer`): ``batch_size`` is per rank, each
    rank evaluates its own energies (on CPU with its share of the cores), rank 0 writes ``out``.
    """
    base = preset_settings(preset)
    chosen = load_config_file(config_file) if config_file is not None else {}
    chosen.update({k: v for k, v in (overrides or {}).items() if v is not None})
    settings = {**base, **chosen, "flow": {**base["flow"], **chosen.get("flow", {})}}
    if "steps" in chosen and "refine_steps" not in chosen:
        # the preset's refinement keeps its share of the training when only --steps changes
        settings["refine_steps"] = max(1, round(base["refine_steps"] * settings["steps"] / base["steps"]))
    if settings.get("objective") == "data-free":
        settings.update({k: v for k, v in DATA_FREE_DEFAULTS.items() if k not in chosen})
    if settings.get("objective") == "interpolation" and "refine_rounds" not in chosen:
        settings["refine_rounds"] = 0  # the CNF is trained by its continuity residual only
    config = TrainConfig(t_min=t_min, t_max=t_max, **settings)
    if config.objective == "data-free" and data is not None:
        raise TradeMDError("data-free training uses no data: drop --data (or --data-free)")
    out = Path(out)
    if resume and not (out / "checkpoint.pt").is_file():
        raise TradeMDError(f"nothing to resume: {str(out / 'checkpoint.pt')!r} does not exist")
    if not resume and (out / "model.pt").exists():
        raise TradeMDError(f"{str(out)!r} already holds a trained model: choose another --out or --resume")
    device = torch_device(device)
    ranks = distributed.start(device)
    if device.type == "cpu":
        # small per-step tensors: one thread is fastest, and leaves the other cores to the
        # OpenMM energy workers (docs/performance.md; ranks side by side share the cores)
        torch.set_num_threads(1)
    if boundary_temperature_k is not None and (config.objective not in ENERGY_ONLY_OBJECTIVES
                                               or system in ANALYTIC_SYSTEMS or data is not None):
        raise TradeMDError("--t0 sets the boundary temperature of data-free training of molecules: "
                           "drop it (data fix T0; analytic systems have their own)")
    boundary = t_max if boundary_temperature_k is None else float(boundary_temperature_k)
    target = _target(data, system, platform, temperature_k, config.objective, boundary)
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
    """Refuse to resume a run on another system, or on another ensemble (T0) of the same file."""
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

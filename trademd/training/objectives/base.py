"""What an objective is: its loss terms, its defaults, its flow, its model selection and its
refusals, behind one interface the training loop calls without knowing which objective runs.

An objective reads the run it trains through :class:`TrainingRun` (the trainer): the flow,
its weight average, the target, the settings, the step, and minibatches of the data.
"""

import math
from typing import ClassVar, Protocol

import torch
from torch import Tensor

from trademd.distributed import Ranks
from trademd.errors import TradeMDError
from trademd.flow.conditional import TemperatureFlow
from trademd.training.config import TrainConfig, default_layers

__all__ = ["TrainingRun", "Objective", "data_nll", "ess_selection_score"]


class TrainingRun(Protocol):
    """What objectives and phases read of the run they train (the trainer provides it).

    Attributes:
        config: the settings.
        target: the system (:mod:`trademd.training.targets`).
        device: torch device of the flow.
        ranks: this process's place in a torchrun launch.
        flow: the trained flow.
        model: its exponential moving average (what metrics score and selection keeps).
        step: steps done so far.
    """

    config: TrainConfig
    target: object
    device: torch.device
    ranks: Ranks
    flow: TemperatureFlow
    model: TemperatureFlow
    step: int

    def data_batch(self, size: int, source: Tensor | None = None) -> Tensor:
        """This rank's ``size`` rows [size, D] of a global minibatch of the data (or ``source``)."""

    def share(self, n: int) -> int:
        """This rank's part of ``n`` samples drawn over all ranks."""

    def selection_temperatures(self) -> list[tuple[str, float]]:
        """(name, T) of the ESS metrics and model selection."""

    def restart_from_best(self, learning_rate: float) -> None:
        """Load the selected parameters, restart the weight average and the optimiser (Adam at
        ``learning_rate``, no schedule)."""


class Objective:
    """One training objective: subclasses set the class attributes and the loss.

    Attributes:
        name: its name in settings files and on the CLI.
        defaults: settings it changes from the presets' unless the user sets them (nested
            or flat, as :meth:`TrainConfig.from_settings` takes them).
        fits_data: whether it reads data at T0 (the NLL of the data); without, a molecule
            trains from its structure alone.
        energy_only: whether a molecule trains on it without a data file.
        scaled_base: whether the flow's bounded base is temperature-scaled (the only way T
            enters a flow fitted at T0 alone).
        analytic_only: whether it trains only on analytic systems, without data.
        data_refusal: the error message where it refuses a data file (None: takes one).
    """

    name: ClassVar[str]
    defaults: ClassVar[dict] = {}
    fits_data: ClassVar[bool] = True
    energy_only: ClassVar[bool] = False
    scaled_base: ClassVar[bool] = False
    analytic_only: ClassVar[bool] = False
    data_refusal: ClassVar[str | None] = None

    def __init__(self, config: TrainConfig):
        self.config = config

    def check(self, config: TrainConfig) -> None:
        """Raise :class:`TradeMDError` for settings this objective refuses."""

    def prepare(self, run: TrainingRun) -> None:
        """Set up what the flow's settings depend on (before the flow is built)."""

    def flow_config(self, run: TrainingRun) -> dict:
        """Settings of the flow: a coupling flow whose base width comes from the data at T0
        (or :meth:`flow_data`), the user's flow settings over them, the target's shape."""
        config = run.config
        target = run.target
        low, high = target.bounded_interval
        sigma = 0.5  # of the base, relative to the interval's half width; from the data if any
        data = self.flow_data(run)
        bounded = data[:, target.n_torsions:] if data is not None else torch.empty(0)
        if bounded.numel():
            sigma = float((bounded.std(dim=0) / (0.5 * (high - low))).mean())
        flow = {
            "layers": default_layers(target.n_torsions),
            "bounded_base": "scaled_truncated_normal" if self.scaled_base else "truncated_normal",
            "torsion_base": "uniform",
            "base_sigma": min(max(sigma, 0.02), 1.0),
        }
        flow.update(config.flow.chosen())
        flow.update({
            "n_torsions": target.n_torsions, "n_bounded": target.n_bounded,
            "temperature_range_k": [config.t_min, config.t_max],
            "bounded_interval": list(target.bounded_interval),
            "reference_temperature_k": target.reference_temperature,
        })
        return flow

    def flow_data(self, run: TrainingRun) -> Tensor | None:
        """Features [N, D] the flow's base width is fitted to (None: a fixed width)."""
        return run.target.data_features if self.fits_data else None

    def start(self, run: TrainingRun) -> None:
        """Called when the loop starts (or continues after a resume)."""

    def loss(self, run: TrainingRun) -> tuple[Tensor, dict]:
        """(loss of this step, its parts as floats by metrics.csv column)."""
        raise NotImplementedError

    def selection_score(self, values: dict, run: TrainingRun) -> tuple[float | None, str]:
        """(score, criterion) of a metrics row, higher is better; None where this step may
        not be selected. Default: the mean log relative ESS over the selection temperatures."""
        return ess_selection_score(values, run)

    def soften(self, factor: float) -> None:
        """Multiply the weight of the terms that pull the flow away from the data at T0 by
        ``factor`` (:mod:`trademd.training.guard`, after a divergence). Default: none."""

    def state_dict(self) -> dict:
        """What a checkpoint keeps of this objective (merged into the checkpoint)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict` from a checkpoint's contents."""


def data_nll(run: TrainingRun, size: int) -> Tensor:
    """NLL at T0 of a minibatch of ``size`` data frames."""
    batch = run.data_batch(size)
    return -run.flow.log_prob(batch, run.target.reference_temperature).mean()


def ess_selection_score(values: dict, run: TrainingRun) -> tuple[float, str]:
    """Mean over the selection temperatures of log relative ESS (floored at one sample)."""
    floor = 1.0 / run.config.reporting.metrics_samples
    temperatures = run.selection_temperatures()
    logs = [math.log(max(values[f"ess_{name}"], floor)) for name, _ in temperatures]
    names = ", ".join(f"{t:g}" for _, t in temperatures)
    return sum(logs) / len(logs), f"mean log relative ESS at {names}"


def unknown_objective(name: str, known: list[str]) -> TradeMDError:
    """The error for an objective name that is none of ``known``."""
    return TradeMDError(f"unknown objective {name!r}: choose one of {known}")

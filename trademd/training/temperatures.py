"""Which temperatures training works at: the TRADE grid, the selection temperatures, and
log-uniform draws over the range (K, or reduced units for analytic systems)."""

import math

import torch
from torch import Tensor

from trademd.training.config import TrainConfig
from trademd.training.trade import log_spaced_grid

__all__ = ["grid_temperatures", "selection_temperatures", "log_uniform_temperatures"]


def grid_temperatures(config: TrainConfig, reference_temperature: float) -> Tensor:
    """float64 [G]: ``grid_size`` log-spaced over [t_min, t_max], plus T0 and the focus
    temperatures, sorted without repeats (the TRADE grid and the refinement buffers')."""
    extra = torch.tensor([reference_temperature, *config.focus_temperatures], dtype=torch.float64)
    grid = torch.cat([log_spaced_grid(config.t_min, config.t_max, config.trade.grid_size), extra])
    return torch.unique(grid)


def selection_temperatures(config: TrainConfig, reference_temperature: float) -> list[tuple[str, float]]:
    """(name, T) at which ESS is measured and model selection scores: T_min, T0, T_max and
    every focus temperature."""
    named = [("tmin", config.t_min), ("t0", reference_temperature), ("tmax", config.t_max)]
    return named + [(f"{t:g}", float(t)) for t in config.focus_temperatures]


def log_uniform_temperatures(n: int, t_min: float, t_max: float, device: torch.device) -> Tensor:
    """[n] temperatures drawn log-uniformly over [t_min, t_max] (the global torch generator)."""
    log_t = torch.empty(n, device=device).uniform_(math.log(t_min), math.log(t_max))
    return torch.exp(log_t)

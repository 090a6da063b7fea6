"""``interpolation``: a continuous flow (:mod:`trademd.flow.cnf`) whose vector field is trained
on the continuity residual along the temperature path (:mod:`trademd.training.interpolation`);
no data, analytic systems only, no refinement rounds."""

import torch
from torch import Tensor

from trademd.errors import TradeMDError
from trademd.training.config import TrainConfig
from trademd.training.interpolation import continuity_residual, initialise_normaliser_rate, residual_points
from trademd.training.objectives.base import Objective, TrainingRun
from trademd.training.trade import residual_loss

__all__ = ["Interpolation"]

#: The user's flow settings the continuous flow takes.
CNF_SETTINGS = ("width", "depth", "base_sigma", "atol", "rtol")


class Interpolation(Objective):
    """The continuity residual of a CNF along the temperature path."""

    name = "interpolation"
    fits_data = False
    #: trains on an analytic system's energy alone
    analytic_only = True
    #: the CNF is trained by its continuity residual only
    defaults = {"refine_rounds": 0}

    def check(self, config: TrainConfig) -> None:
        if config.refinement.refine_rounds:
            raise TradeMDError("the interpolation objective has no refinement rounds: set refine_rounds to 0")

    def flow_config(self, run: TrainingRun) -> dict:
        """A base a third of the box wide (it covers every mode of the analytic systems), the
        user's width/depth."""
        target, config = run.target, run.config
        low, high = target.bounded_interval
        flow = {"kind": "cnf", "n_bounded": target.n_bounded,
                "temperature_range_k": [config.t_min, config.t_max],
                "base_sigma": (high - low) / 6, "bounded_interval": [low, high],
                "reference_temperature_k": target.reference_temperature}
        flow.update({k: v for k, v in config.flow.chosen().items() if k in CNF_SETTINGS})
        return flow

    def start(self, run: TrainingRun) -> None:
        if run.step == 0:
            initialise_normaliser_rate(run.flow, lambda z, t: run.target.reduced_energy(z, t)[0])

    def loss(self, run: TrainingRun) -> tuple[Tensor, dict]:
        c = run.config
        x, lam = residual_points(run.flow, c.batch_size)
        energy = lambda z, t: run.target.reduced_energy(z, t)[0]
        residual, excess = continuity_residual(run.flow, energy, x, lam)
        # as for TRADE: points whose energy change is far from its mean (high-energy points of
        # the broad base) carry no weight, only noise
        residual = residual[torch.isfinite(residual) & (excess <= c.trade.residual_cutoff)]
        continuity = residual_loss(residual, c.trade.residual_loss, c.trade.huber_delta)
        return torch.zeros((), device=run.device) + continuity, {
            "continuity": float(continuity.detach()),
            "continuity_residual_rms": float(residual.detach().pow(2).mean().sqrt())}

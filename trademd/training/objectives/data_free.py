"""``data-free``: TRADE without data. Reverse KL at T0 (or over the range:
``reverse_kl_temperatures``) fits the boundary from the energy alone, TRADE from flow samples
transfers it over the range, and an importance-weighted NLL at T0 on a buffer of the flow's own
samples (redrawn every ``boundary_buffer_every`` steps) stands in for the data. A molecule
first fits its structure prior (:mod:`trademd.training.objectives.prior_fit`)."""

import torch
from torch import Tensor

from trademd.errors import TradeMDError
from trademd.training.config import TrainConfig
from trademd.training.objectives.base import Objective, TrainingRun
from trademd.training.objectives.prior_fit import StructurePriorFit
from trademd.training.objectives.reverse_kl import reverse_kl_loss
from trademd.training.objectives.trade import TradeTerm
from trademd.training.refine import RefinementBuffer
from trademd.training.sampling import weighted_buffer

__all__ = ["DataFree", "BoundaryBuffer"]


class BoundaryBuffer:
    """Weighted samples of the EMA flow at T0, redrawn every ``boundary_buffer_every`` steps:
    the data-free stand-in for the data that anchors the boundary while TRADE reshapes the
    other temperatures.

    Attributes:
        buffer: the current draw (None before the first).
    """

    def __init__(self, config: TrainConfig):
        self.config = config
        self.buffer: RefinementBuffer | None = None

    def nll(self, run: TrainingRun) -> Tensor:
        """Importance-weighted NLL at T0 of a minibatch of the buffer (redrawn when due)."""
        c = self.config
        draw = run.step // c.data_free.boundary_buffer_every
        if self.buffer is None or self.buffer.round_index != draw:
            t0 = float(run.target.reference_temperature)
            temperatures = torch.full((run.share(c.data_free.boundary_buffer_samples),), t0, device=run.device)
            self.buffer = weighted_buffer(run.model, run.target, draw, temperatures,
                                          c.reverse_kl.chirality_restraint_kt, c.refinement.refine_clip_fraction)
        z, t = self.buffer.batch(c.batch_size)
        return -run.flow.log_prob(z, t).mean()


class DataFree(Objective):
    """Data-free TRADE: a reverse-KL boundary, TRADE from flow samples, a weighted buffer at T0."""

    name = "data-free"
    fits_data = False
    energy_only = True
    data_refusal = "data-free training uses no data: drop --data (or --data-free)"
    #: TRADE evaluated at flow samples (there are no data), a longer phase (structure prior,
    #: then reverse KL) before it, the reverse KL over the whole range, and TRADE only at
    #: temperatures whose E[u] came from samples of >= 1 % relative ESS (alanine dipeptide
    #: from 1200 K, docs/results.md, 2026-12-06: without the gate TRADE collapsed the
    #: boundary; with reverse KL at T0 only, 300 K kept 1e-5 ESS, over the range 6 %).
    defaults = {"evaluation_points": "samples", "warmup_fraction": 0.6, "trade_ess_floor": 0.01,
                "reverse_kl_temperatures": "range"}

    def check(self, config: TrainConfig) -> None:
        if config.trade.evaluation_points != "samples":
            raise TradeMDError("data-free training has no data to evaluate TRADE at: set "
                               "evaluation_points to samples")

    def prepare(self, run: TrainingRun) -> None:
        c = run.config
        if c.data_free.prior_fraction and hasattr(run.target, "structure_features") \
                and c.data_free.prior_fraction > c.trade.warmup_fraction:
            raise TradeMDError(f"prior_fraction must lie in [0, warmup_fraction]: the structure prior "
                               f"is fitted before the reverse-KL boundary, got {c.data_free.prior_fraction} > "
                               f"{c.trade.warmup_fraction}")
        self.prior = StructurePriorFit.for_run(run)
        self.trade = TradeTerm(c, run.target.reference_temperature, run.device)
        self.boundary = BoundaryBuffer(c)

    def flow_data(self, run: TrainingRun) -> Tensor | None:
        return None if self.prior is None else self.prior.samples

    def loss(self, run: TrainingRun) -> tuple[Tensor, dict]:
        c = run.config
        if self.prior is not None and self.prior.active(run.step):
            return self.prior.loss(run)
        parts: dict = {}
        loss = self.trade.add_to(torch.zeros((), device=run.device), parts, run)
        kl = reverse_kl_loss(run, at_reference=c.reverse_kl.reverse_kl_temperatures == "t0")
        loss = loss + kl
        parts["reverse_kl"] = float(kl.detach())
        if c.data_free.boundary_buffer_samples:
            nll = self.boundary.nll(run)
            loss = loss + nll
            parts.update(boundary_nll=float(nll.detach()), buffer_ess=self.boundary.buffer.relative_ess)
        return loss, parts

    def selection_score(self, values: dict, run: TrainingRun) -> tuple[float | None, str]:
        return self.trade.selection_score(values, run)

    def state_dict(self) -> dict:
        buffer = self.boundary.buffer
        return {**self.trade.state_dict(), "boundary_buffer": None if buffer is None else buffer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.trade.load_state_dict(state)
        if state.get("boundary_buffer") is not None:
            self.boundary.buffer = RefinementBuffer.from_state_dict(state["boundary_buffer"])

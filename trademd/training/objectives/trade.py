"""``trade``: the NLL of the data at T0 plus the TRADE residual loss over [t_min, t_max]
(:mod:`trademd.training.trade`), its weight ramped in after a warm-up. :class:`TradeTerm` is
the TRADE loss with its E_T[u] cache, which the data-free objective uses too."""

import torch
from torch import Tensor

from trademd import distributed
from trademd.training.config import TrainConfig
from trademd.training.objectives.base import Objective, TrainingRun, data_nll, ess_selection_score
from trademd.training.sampling import importance_weights
from trademd.training.temperatures import grid_temperatures, log_uniform_temperatures
from trademd.training.trade import (
    ExpectationCache,
    dlogp_dlogt,
    log_importance_weights,
    model_mean_log_weights,
    residual_loss,
    trade_residual,
)
from trademd.weights import snis_mean_torch

__all__ = ["TradeTerm", "Trade"]


class TradeTerm:
    """The TRADE residual loss of a run, weighted by its warm-up ramp.

    Args:
        config: the settings (``config.trade``).
        reference_temperature: T0.
        device: where the E_T[u] cache lives.

    Attributes:
        cache: E_T[u] at the grid temperatures (:func:`grid_temperatures`).
        weight_scale: factor on ``trade_weight`` (1; lowered by the divergence guard).
    """

    def __init__(self, config: TrainConfig, reference_temperature: float, device: torch.device):
        self.config = config
        self.weight_scale = 1.0
        self.cache = ExpectationCache(grid_temperatures(config, reference_temperature).to(device),
                                      momentum=config.trade.cache_momentum)

    def weight(self, step: int) -> float:
        """0 during the warm-up, rising linearly to ``trade_weight`` (times ``weight_scale``)
        over the ramp."""
        c, t = self.config, self.config.trade
        start = t.warmup_fraction * c.steps
        ramp = max(t.ramp_fraction * c.steps, 1.0)
        return self.weight_scale * t.trade_weight * min(max((step - start) / ramp, 0.0), 1.0)

    def ramping(self, step: int) -> bool:
        """Whether the weight is not fully on yet at ``step`` (no model is selected then)."""
        t = self.config.trade
        return step < (t.warmup_fraction + t.ramp_fraction) * self.config.steps

    def selection_score(self, values: dict, run: TrainingRun) -> tuple[float | None, str]:
        """The score of an objective with this term: ESS, once the TRADE weight is fully on."""
        if self.ramping(run.step):
            return None, "TRADE weight still ramping up"
        return ess_selection_score(values, run)

    def refresh(self, run: TrainingRun) -> None:
        """Re-estimate E_T[u] at every grid temperature from flow samples."""
        for index, temperature in enumerate(self.cache.temperatures.tolist()):
            _, _, u, log_w = importance_weights(run.flow, run.target,
                                                run.share(self.config.trade.cache_samples), temperature)
            ess, n = distributed.pooled_kish_ess(log_w)
            self.cache.update(index, distributed.pooled_snis_mean(u, self.mean_log_weights(u, log_w)),
                              ess / max(n, 1))

    def mean_log_weights(self, u: Tensor, log_w: Tensor) -> Tensor:
        """The log weights of E_T[u] over flow samples with reduced energies u [B] and
        importance log weights log_w [B]: those (``expectation`` snis) or the model's own."""
        t = self.config.trade
        return log_w if t.expectation == "snis" else model_mean_log_weights(u, t.residual_cutoff)

    def add_to(self, loss: Tensor, parts: dict, run: TrainingRun) -> Tensor:
        """``loss`` plus the weighted TRADE loss of this step (nothing during the warm-up);
        its parts go into ``parts``."""
        t = self.config.trade
        weight = self.weight(run.step)
        if weight <= 0:
            return loss
        if t.trade_mode == "grid" and (not self.cache.ready or run.step % t.cache_every == 0):
            self.refresh(run)
        trade, extra = self.loss(run)
        parts.update(trade=float(trade.detach()), trade_weight=weight, **extra)
        return loss + weight * trade

    def loss(self, run: TrainingRun) -> tuple[Tensor, dict]:
        """The unweighted TRADE loss of one step and its parts: the residual at
        ``trade_points`` temperatures (grid: trusted grid temperatures; continuous: one drawn
        log-uniformly), evaluated at flow samples and/or data frames."""
        t = self.config.trade
        n = t.trade_points
        if t.trade_mode == "grid":
            # only temperatures whose E[u] came from samples of some weight (trade_ess_floor):
            # where the flow has no effective samples yet, its SNIS estimate is one sample's u
            trusted = self.cache.trusted(t.trade_ess_floor)
            if not len(trusted):
                return torch.zeros((), device=run.device), {"trade_points_kept": 0.0}
            index = trusted[torch.randint(len(trusted), (n,), device=run.device)]
            temperature = self.cache.temperatures[index].float()
            expected_u = self.cache.lookup(index).float()
        else:
            temperature = log_uniform_temperatures(1, self.config.t_min, self.config.t_max, run.device).expand(n)
        use_samples = t.evaluation_points in ("samples", "both")
        points = []  # (features z, reduced energies u) of the evaluation points
        if use_samples or t.trade_mode == "continuous":
            z_s, log_p_s = run.flow.sample(n, temperature)
            with torch.no_grad():
                u_s, log_det_s = run.target.reduced_energy(z_s, temperature)
            if t.trade_mode == "continuous":
                log_w = log_importance_weights(u_s, log_p_s) + log_det_s
                expected_u = snis_mean_torch(u_s, self.mean_log_weights(u_s, log_w)).expand(n)
            if use_samples:
                points.append((z_s, u_s))
        if t.evaluation_points in ("data", "both"):
            z_d = run.data_batch(n)
            with torch.no_grad():
                u_d, _ = run.target.reduced_energy(z_d, temperature)
            points.append((z_d, u_d))
        z = torch.cat([p[0] for p in points])
        u = torch.cat([p[1] for p in points])
        temperatures = temperature.repeat(len(points))
        expected = expected_u.repeat(len(points))
        # points whose Boltzmann weight at T is negligible (u more than residual_cutoff above
        # its mean: a relative weight below exp(-cutoff)), e.g. clashing samples of an early
        # flow, carry no information about the density there and only add noise
        keep = (torch.isfinite(u) & torch.isfinite(expected)
                & ((u - expected).abs() <= t.residual_cutoff))
        if not bool(keep.any()):
            return torch.zeros((), device=run.device), {"trade_points_kept": 0.0}
        derivative = dlogp_dlogt(run.flow, z[keep], temperatures[keep])
        residual = trade_residual(derivative, u[keep], expected[keep])
        loss = residual_loss(residual, t.residual_loss, t.huber_delta)
        return loss, {"trade_residual_rms": float(residual.detach().pow(2).mean().sqrt()),
                      "trade_points_kept": float(keep.float().mean())}

    def state_dict(self) -> dict:
        return {"cache": self.cache.state_dict(), "trade_weight_scale": self.weight_scale}

    def load_state_dict(self, state: dict) -> None:
        # checkpoints from before the ESS was kept have none, nor from before the guard a scale
        self.cache.load_state_dict({"relative_ess": torch.full_like(self.cache.relative_ess, float("nan")),
                                    **state["cache"]})
        self.weight_scale = float(state.get("trade_weight_scale", 1.0))


class Trade(Objective):
    """TRADE from data at T0: NLL at T0 plus the TRADE loss over the range."""

    name = "trade"

    def prepare(self, run: TrainingRun) -> None:
        self.trade = TradeTerm(run.config, run.target.reference_temperature, run.device)

    def loss(self, run: TrainingRun) -> tuple[Tensor, dict]:
        nll = data_nll(run, run.config.batch_size)
        parts = {"nll_t0": float(nll.detach())}
        loss = self.trade.add_to(torch.zeros((), device=run.device) + nll, parts, run)
        return loss, parts

    def selection_score(self, values: dict, run: TrainingRun) -> tuple[float | None, str]:
        return self.trade.selection_score(values, run)

    def soften(self, factor: float) -> None:
        self.trade.weight_scale *= factor

    def state_dict(self) -> dict:
        return self.trade.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.trade.load_state_dict(state)

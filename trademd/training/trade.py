"""The TRADE objective (Wahl et al., AISTATS 2025): all of its mathematics, in one place.

For a Boltzmann family q(x|T) = exp(-U(x) / (k T)) / Z(T),

    d/dT log q(x|T) = U(x) / (k T^2) - E_{q(.|T)}[U / (k T^2)].

TRADE fits a conditional model p(x|T) at a boundary temperature T0 (by maximum likelihood)
and propagates it to other T by pushing the residual

    d/dT log p(x|T) - [U(x) / (k T^2) - E_{p(.|T)}[U / (k T^2)]]

to zero. Temperature enters every public function as T (kelvin for molecules, reduced units
for the analytic systems, where k = 1). Internally the derivative is taken with respect to
log T, in exactly one place (:func:`dlogp_dlogt`): multiplying the identity by T gives

    d/dlogT log p(x|T) = u(x, T) - E_{p(.|T)}[u],    u = U / (k T)  (reduced energy),

a dimensionless residual of order one at every temperature, which is what the loss uses.
Expectations under p(.|T) are estimated by self-normalised importance sampling from model
samples (:func:`trademd.weights.snis_mean_torch`) and, in grid mode, cached per grid temperature with an
exponential moving average (:class:`ExpectationCache`).

The expectation may instead be the model's own, the plain mean of u over its samples
(:func:`model_mean_log_weights`). Both give the same solution: a flow with
d/dlogT log p = u - E_p[u] at every T is p(x|T) ∝ p(x|T0) exp(-U/kT + U/kT0), the Boltzmann
family once p(.|T0) is. The model's mean is the only one the flow can meet at every T before
it is there: E_p[d/dlogT log p] = 0 for any normalised p, so with the importance-sampled mean
the residual of the flow's own samples averages E_p[u] - E_q[u], which no flow can remove;
where the flow's ESS is ~0 (early training, ~100 dimensions) that offset is large and the
SNIS mean is one sample's u.
"""

import math

import torch
from torch import Tensor, nn

from trademd.errors import TradeMDError

__all__ = [
    "dlogp_dlogt",
    "trade_target",
    "trade_residual",
    "residual_loss",
    "log_importance_weights",
    "model_mean_log_weights",
    "ExpectationCache",
    "log_spaced_grid",
]


def dlogp_dlogt(model, x: Tensor, temperature: Tensor) -> Tensor:
    """T d/dT log p(x|T) = d/dlogT log p(x|T) at fixed x, by forward-mode differentiation.

    Args:
        model: a flow with ``log_prob_dlogt(x, temperature) -> (log p, d log p / dlogT)``
            (:meth:`~trademd.flow.conditional.TemperatureFlow.log_prob_dlogt`: the tangent
            carried through the layers by hand); else its ``log_prob(x, temperature)``, or
            ``model`` itself as that function, differentiated by ``torch.func.jvp``.
        x: evaluation points [B, ...] (treated as constants).
        temperature: [B], positive.

    Returns:
        [B], differentiable w.r.t. the model's parameters. Forward mode costs about one extra
        forward pass where reverse mode (``autograd.grad(..., create_graph=True)``) costs a
        backward pass and, in training, a backward pass through it (docs/performance.md).
    """
    x, temperature = x.detach(), temperature.detach()
    if hasattr(model, "log_prob_dlogt"):
        return model.log_prob_dlogt(x, temperature)[1]
    log_prob = getattr(model, "log_prob", model)
    return torch.func.jvp(lambda t: log_prob(x, t), (temperature,), (temperature,))[1]


def trade_target(reduced_energy: Tensor, expected_reduced_energy: Tensor) -> Tensor:
    """The TRADE target for d/dlogT log p(x|T): u(x, T) - E_{p(.|T)}[u]. Shapes broadcast."""
    return reduced_energy - expected_reduced_energy


def trade_residual(dlogp_dlogt_value: Tensor, reduced_energy: Tensor,
                   expected_reduced_energy: Tensor) -> Tensor:
    """d/dlogT log p(x|T) - (u - E[u]) [B]: zero for the exact Boltzmann family."""
    return dlogp_dlogt_value - trade_target(reduced_energy, expected_reduced_energy)


def residual_loss(residual: Tensor, kind: str = "huber", delta: float = 1.0) -> Tensor:
    """Mean Huber (``delta`` in units of the residual) or squared loss of a residual [B]."""
    if kind == "mse":
        return (residual**2).mean()
    if kind == "huber":
        return nn.functional.huber_loss(residual, torch.zeros_like(residual), delta=delta)
    raise TradeMDError(f"unknown residual loss {kind!r}: choose huber or mse")


def log_importance_weights(reduced_energy: Tensor, model_log_prob: Tensor) -> Tensor:
    """Unnormalised log weights of model samples for the Boltzmann target: -u - log p [B]."""
    return -reduced_energy - model_log_prob


def model_mean_log_weights(reduced_energy: Tensor, cutoff: float) -> Tensor:
    """Log weights [B] that make a self-normalised mean the plain mean over the model's samples
    (u [B]): 0 within ``cutoff`` above the samples' median u, -inf above (clashing samples,
    whose u would set the mean; the TRADE loss leaves the same points out)."""
    finite = torch.isfinite(reduced_energy)
    if not bool(finite.any()):
        return torch.full_like(reduced_energy, -math.inf)
    median = reduced_energy[finite].median()
    keep = finite & (reduced_energy <= median + cutoff)
    return torch.where(keep, torch.zeros_like(reduced_energy), torch.full_like(reduced_energy, -math.inf))


def log_spaced_grid(t_min: float, t_max: float, n: int) -> Tensor:
    """``n`` temperatures log-spaced from ``t_min`` to ``t_max`` (float64 [n])."""
    if not 0 < t_min < t_max:
        raise TradeMDError(f"need 0 < tmin < tmax, got {t_min} and {t_max}")
    return torch.exp(torch.linspace(math.log(t_min), math.log(t_max), n, dtype=torch.float64))


class ExpectationCache(nn.Module):
    """E_{p(.|T)}[u] on a temperature grid, refreshed with an exponential moving average.

    Args:
        temperatures: grid [G] (K or reduced units).
        momentum: weight of the old value in an update (0 replaces it).

    The cache is a module buffer, so it is saved and restored with the training state.
    """

    def __init__(self, temperatures: Tensor, momentum: float = 0.9):
        super().__init__()
        self.register_buffer("temperatures", temperatures.to(torch.float64))
        self.register_buffer("expected_u", torch.full_like(self.temperatures, math.nan))
        #: relative Kish ESS of the samples of each grid point's latest estimate (NaN: none yet)
        self.register_buffer("relative_ess", torch.full_like(self.temperatures, math.nan))
        self.momentum = float(momentum)

    def update(self, index: int, estimate: float, relative_ess: float = math.nan) -> None:
        """Blend a new estimate into grid point ``index`` (the first estimate is taken as is);
        ``relative_ess`` is that of the samples it came from."""
        self.relative_ess[index] = relative_ess
        if not math.isfinite(estimate):
            return
        old = float(self.expected_u[index])
        new = estimate if math.isnan(old) else self.momentum * old + (1 - self.momentum) * estimate
        self.expected_u[index] = new

    def trusted(self, ess_floor: float) -> Tensor:
        """Indices [G'] of the grid points whose latest estimate came from samples with a
        relative ESS of at least ``ess_floor`` (every point for a floor of 0)."""
        if ess_floor <= 0:
            return torch.arange(len(self.temperatures), device=self.temperatures.device)
        return torch.nonzero(self.relative_ess >= ess_floor).flatten()

    def lookup(self, index: Tensor) -> Tensor:
        """Cached E[u] at grid indices [B] -> [B]."""
        return self.expected_u[index]

    @property
    def ready(self) -> bool:
        return bool(torch.isfinite(self.expected_u).all())

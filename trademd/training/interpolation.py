"""The energy-interpolation objective (Máté and Fleuret, TMLR 2023): its mathematics in one place.

A density path p_lam = exp(-f_lam) / Z_lam is transported by a vector field V(x, lam) exactly
when the continuity equation d p / d lam + div(p V) = 0 holds. Divided by p it reads

    R(x, lam) = d f / d lam - c(lam) - div V(x, lam) + V(x, lam) . grad f_lam(x) = 0,

with c(lam) = -d log Z_lam / d lam = E_{p_lam}[d f / d lam] (learnt beside V). R vanishes at
every x for the exact pair, so the loss, a mean of rho(R) over points anywhere in the
support, needs no samples of p: here the points are the model's own, at random path times.

On the temperature part of :class:`trademd.flow.cnf.TemperaturePath`, d f / d lam =
u log(T_max / T_min) and c = log(T_max / T_min) E_T[u], the TRADE identity of
:mod:`trademd.training.trade` written for the density of a CNF instead of a coupling flow.
"""

from collections.abc import Callable
import math

import torch
from torch import Tensor

from trademd.flow.cnf import PATH_END, TemperatureCNF

__all__ = ["divergence", "continuity_residual", "residual_points", "initialise_normaliser_rate"]


def divergence(velocity: Tensor, x: Tensor, create_graph: bool = True) -> Tensor:
    """Exact div V = sum_i dV_i / dx_i [B] of velocity [B, D] computed from x [B, D] (one
    backward pass per dimension: for the few dimensions of the analytic systems)."""
    total = torch.zeros_like(velocity[:, 0])
    for i in range(velocity.shape[1]):
        (grad,) = torch.autograd.grad(velocity[:, i].sum(), x, create_graph=create_graph,
                                      retain_graph=True)
        total = total + grad[:, i]
    return total


def continuity_residual(model: TemperatureCNF, reduced_energy: Callable[[Tensor, Tensor], Tensor],
                        x: Tensor, lam: Tensor, create_graph: bool = True) -> tuple[Tensor, Tensor]:
    """R(x, lam) [B] of the model's velocity field and normaliser rate along its path, and
    |d f / d lam - c(lam)| [B] (detached): how far from typical a point's energy change is;
    a point far above its mean carries negligible weight (the analogue of TRADE's cut).

    Args:
        model: supplies ``velocity``, ``normaliser_rate`` and ``path``.
        reduced_energy: (x [B, D], temperature [B]) -> u [B], differentiable in x.
        x: points [B, D] (constants).
        lam: path times [B] in [0, 2].
        create_graph: keep the graph so the residual can be trained on.
    """
    x = x.detach().clone().requires_grad_(True)
    path = model.path
    u = reduced_energy(x, path.temperature(lam))
    f, df_dlam = path.energy(x, u, lam)
    (grad_f,) = torch.autograd.grad(f.sum(), x, retain_graph=True)
    velocity = model.velocity(x, lam)
    div = divergence(velocity, x, create_graph=create_graph)
    excess = df_dlam.detach() - model.normaliser_rate(lam)
    return excess - div + (velocity * grad_f.detach()).sum(-1), excess.detach().abs()


def residual_points(model: TemperatureCNF, n: int, base_fraction: float = 0.5) -> tuple[Tensor, Tensor]:
    """(x [n, D], lam [n]) at path times uniform on [0, 2]: the model's own samples there, and
    a ``base_fraction`` of points drawn from the (broad) base, so that the field is also
    trained where the model has no mass yet (else modes it misses stay missed, and the density
    of points there is arbitrary)."""
    n_base = int(round(base_fraction * n))
    from_base = model.sample_base(n_base)
    lam = PATH_END * torch.rand(n, dtype=from_base.dtype, device=from_base.device)
    return torch.cat([from_base, model.sample_path(n - n_base, lam[n_base:])]), lam


def initialise_normaliser_rate(model: TemperatureCNF, reduced_energy: Callable[[Tensor, Tensor], Tensor],
                               n_per_node: int = 512) -> None:
    """A first estimate of c(lam) = E_{p_lam}[d f / d lam] at the normaliser table's nodes:
    self-normalised importance sampling of ``n_per_node`` base samples per node, weighted by
    exp(-f_lam) / base density (exact, no ODE; noisy where p_lam is narrow, which training
    then corrects). Costs 2 x nodes x ``n_per_node`` energy evaluations."""
    path = model.path
    lam_nodes = model.normaliser_rate.node_times
    lam = lam_nodes.reshape(-1).repeat_interleave(n_per_node)
    with torch.no_grad():
        x = model.sample_base(len(lam)).to(lam.dtype)
        f, df_dlam = path.energy(x, reduced_energy(x, path.temperature(lam)), lam)
        log_w = (-f - path.base_log_prob(x)).reshape(-1, n_per_node)
        log_w = torch.where(torch.isfinite(log_w), log_w, torch.full_like(log_w, -math.inf))
        df_dlam = torch.where(torch.isfinite(df_dlam), df_dlam, torch.zeros_like(df_dlam))
        estimate = (torch.softmax(log_w, dim=1) * df_dlam.reshape(-1, n_per_node)).sum(dim=1)
    model.normaliser_rate.initialise(estimate.reshape(lam_nodes.shape))

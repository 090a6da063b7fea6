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

import torch
from torch import Tensor

from trademd.flow.cnf import PATH_END, TemperatureCNF

__all__ = ["divergence", "continuity_residual", "residual_points"]


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
                        x: Tensor, lam: Tensor, create_graph: bool = True) -> Tensor:
    """R(x, lam) [B] of the model's velocity field and normaliser rate along its path.

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
    return df_dlam.detach() - model.normaliser_rate(lam) - div + (velocity * grad_f.detach()).sum(-1)


def residual_points(model: TemperatureCNF, n: int) -> tuple[Tensor, Tensor]:
    """(x [n, D], lam [n]): the model's own samples at path times uniform on [0, 2]."""
    lam = PATH_END * torch.rand(n, dtype=model._anchor.dtype, device=model._anchor.device)
    return model.sample_path(n, lam), lam

"""Temperature-dependent base distributions of the flow, on normalised coordinates.

The flow (:mod:`trademd.flow.conditional`) works on normalised features ``w`` in ``[-1, 1]``: a torsion
``phi`` in ``[-pi, pi)`` is ``w = phi / pi`` (periodic), a bounded feature in ``[low, high]``
is ``w = (x - centre) / half_width``. This module owns the base density over ``w`` and
sampling from it. Sampling and density use the *same* distribution at every temperature
(the TRADE reference code sampled at the reference temperature but evaluated a
temperature-scaled density; ``tests/test_flows.py`` pins the agreement by quadrature).

Options (``T0`` is the reference temperature, ``T`` the requested one):

- torsions: ``"uniform"`` on the circle; ``"von_mises"`` centred at 0 with concentration
  ``kappa``; ``"scaled_von_mises"`` with concentration ``kappa * T0 / T`` (the circular
  analogue of a variance proportional to ``T``).
- bounded: ``"uniform"`` on ``[-1, 1]``; ``"truncated_normal"`` centred at 0 with scale
  ``sigma`` (in units of the half-width), truncated to ``[-1, 1]``; ``"scaled_truncated_normal"``
  with scale ``sigma * sqrt(T / T0)``, i.e. the untruncated variance is proportional to ``T``.

Bounded densities are exactly supported on ``[-1, 1]``: outside, the log-density is ``-inf``.
"""

import math

import torch
from torch import Tensor, nn

from trademd.errors import TradeMDError

__all__ = ["BOUNDED_BASES", "TORSION_BASES", "TemperatureBase"]

TORSION_BASES = ("uniform", "von_mises", "scaled_von_mises")
BOUNDED_BASES = ("uniform", "truncated_normal", "scaled_truncated_normal")

_LOG2 = math.log(2.0)
_HALF_LOG_2PI = 0.5 * math.log(2.0 * math.pi)


class TemperatureBase(nn.Module):
    """Product base density p(w | T) over normalised torsions and bounded features.

    Args:
        n_torsions: number of periodic features (first columns of ``w``).
        n_bounded: number of bounded features (last columns of ``w``).
        torsion_base: one of :data:`TORSION_BASES`.
        bounded_base: one of :data:`BOUNDED_BASES`.
        sigma: scale of the truncated normal at ``T0``, in units of the half-width.
        kappa: von Mises concentration at ``T0``.
        reference_temperature_k: ``T0`` in kelvin.

    >>> base = TemperatureBase(1, 2, "uniform", "scaled_truncated_normal", 0.5, 1.0, 300.0)
    >>> w = base.sample(4, torch.full((4,), 600.0))
    >>> base.log_prob(w, torch.full((4,), 600.0)).shape
    torch.Size([4])
    """

    def __init__(self, n_torsions: int, n_bounded: int, torsion_base: str = "uniform",
                 bounded_base: str = "uniform", sigma: float = 0.5, kappa: float = 1.0,
                 reference_temperature_k: float = 300.0):
        super().__init__()
        if torsion_base not in TORSION_BASES:
            raise TradeMDError(f"unknown torsion base {torsion_base!r}: use one of {TORSION_BASES}")
        if bounded_base not in BOUNDED_BASES:
            raise TradeMDError(f"unknown bounded base {bounded_base!r}: use one of {BOUNDED_BASES}")
        if not sigma > 0 or not kappa > 0 or not reference_temperature_k > 0:
            raise TradeMDError(
                "base_sigma, base_kappa and reference_temperature_k must be positive")
        self.n_torsions = int(n_torsions)
        self.n_bounded = int(n_bounded)
        self.torsion_base = torsion_base
        self.bounded_base = bounded_base
        self.sigma = float(sigma)
        self.kappa = float(kappa)
        self.reference_temperature_k = float(reference_temperature_k)

    def extra_repr(self) -> str:
        return (f"torsions={self.n_torsions} ({self.torsion_base}), bounded={self.n_bounded} "
                f"({self.bounded_base}), T0={self.reference_temperature_k} K")

    # -- temperature-dependent parameters (the only place T enters the base) -----------------

    def _kappa(self, temperature_k: Tensor) -> Tensor:
        """Von Mises concentration [B, 1]."""
        kappa = torch.full_like(temperature_k, self.kappa)
        if self.torsion_base == "scaled_von_mises":
            kappa = kappa * (self.reference_temperature_k / temperature_k)
        return kappa[:, None]

    def _sigma(self, temperature_k: Tensor) -> Tensor:
        """Truncated-normal scale [B, 1]."""
        sigma = torch.full_like(temperature_k, self.sigma)
        if self.bounded_base == "scaled_truncated_normal":
            sigma = sigma * torch.sqrt(temperature_k / self.reference_temperature_k)
        return sigma[:, None]

    # -- density and sampling --------------------------------------------------------------

    def log_prob(self, w: Tensor, temperature_k: Tensor) -> Tensor:
        """log p(w | T) for ``w`` [B, n_torsions + n_bounded] and ``temperature_k`` [B] -> [B]."""
        w_t, w_b = w[:, :self.n_torsions], w[:, self.n_torsions:]
        logp = w.new_zeros(w.shape[0])
        if self.n_torsions:
            if self.torsion_base == "uniform":
                logp = logp - self.n_torsions * _LOG2
            else:
                kappa = self._kappa(temperature_k)
                # log[exp(k cos(pi w)) / (2 I0(k))], with I0(k) = i0e(k) exp(k)
                per_dim = kappa * (torch.cos(math.pi * w_t) - 1.0) - _LOG2 - torch.log(
                    torch.special.i0e(kappa))
                logp = logp + per_dim.sum(dim=1)
        if self.n_bounded:
            if self.bounded_base == "uniform":
                logp = logp - self.n_bounded * _LOG2
            else:
                sigma = self._sigma(temperature_k)
                log_norm = torch.log(torch.erf(1.0 / (sigma * math.sqrt(2.0))))
                per_dim = -0.5 * (w_b / sigma) ** 2 - torch.log(sigma) - _HALF_LOG_2PI - log_norm
                logp = logp + per_dim.sum(dim=1)
            inside = (w_b.abs() <= 1.0).all(dim=1)
            logp = torch.where(inside, logp, torch.full_like(logp, -math.inf))
        return logp

    def log_prob_dlogt(self, w: Tensor, w_dot: Tensor, temperature_k: Tensor) -> tuple[Tensor, Tensor]:
        """(log p(w | T), d/dlogT log p(w(log T) | T)) [B], [B] for ``w`` [B, D] moving with
        ``w_dot`` = dw/dlogT [B, D] and ``temperature_k`` [B]: the tangent of :meth:`log_prob`
        along (w_dot, d log T = 1), written out (0 where the density is 0)."""
        logp = self.log_prob(w, temperature_k)
        w_t, w_b = w[:, :self.n_torsions], w[:, self.n_torsions:]
        dot_t, dot_b = w_dot[:, :self.n_torsions], w_dot[:, self.n_torsions:]
        tangent = w.new_zeros(w.shape[0])
        if self.n_torsions and self.torsion_base != "uniform":
            kappa = self._kappa(temperature_k)
            per_dim = -math.pi * kappa * torch.sin(math.pi * w_t) * dot_t
            if self.torsion_base == "scaled_von_mises":
                # d kappa / dlogT = -kappa; d/dkappa [kappa cos - log I0(kappa)] = cos - I1/I0
                ratio = torch.special.i1e(kappa) / torch.special.i0e(kappa)
                per_dim = per_dim - kappa * (torch.cos(math.pi * w_t) - ratio)
            tangent = tangent + per_dim.sum(dim=1)
        if self.n_bounded and self.bounded_base != "uniform":
            sigma = self._sigma(temperature_k)
            per_dim = -(w_b / sigma**2) * dot_b
            if self.bounded_base == "scaled_truncated_normal":
                # d sigma / dlogT = sigma / 2; u = 1 / (sigma sqrt 2) is the truncation point
                u = 1.0 / (sigma * math.sqrt(2.0))
                mass = 2.0 / math.sqrt(math.pi) * u * torch.exp(-u**2) / torch.erf(u)
                per_dim = per_dim + 0.5 * ((w_b / sigma) ** 2 - 1.0 + mass)
            tangent = tangent + per_dim.sum(dim=1)
        return logp, torch.where(torch.isfinite(logp), tangent, torch.zeros_like(tangent))

    @torch.no_grad()
    def sample(self, n: int, temperature_k: Tensor, dtype: torch.dtype | None = None,
               device: torch.device | str | None = None) -> Tensor:
        """``n`` samples w [n, n_torsions + n_bounded] at temperatures ``temperature_k`` [n]."""
        dtype = dtype or temperature_k.dtype
        device = device or temperature_k.device
        temperature_k = temperature_k.to(dtype=torch.float64, device=device)
        parts = []
        if self.n_torsions:
            shape = (n, self.n_torsions)
            if self.torsion_base == "uniform":
                w_t = 2.0 * torch.rand(shape, dtype=torch.float64, device=device) - 1.0
            else:
                kappa = self._kappa(temperature_k).expand(shape)
                angle = torch.distributions.VonMises(torch.zeros_like(kappa), kappa).sample()
                w_t = angle / math.pi
            parts.append(torch.remainder(w_t + 1.0, 2.0) - 1.0)
        if self.n_bounded:
            shape = (n, self.n_bounded)
            u = torch.rand(shape, dtype=torch.float64, device=device)
            if self.bounded_base == "uniform":
                w_b = 2.0 * u - 1.0
            else:
                # symmetric inverse CDF of the normal truncated to [-1, 1]
                sigma = self._sigma(temperature_k)
                mass = torch.erf(1.0 / (sigma * math.sqrt(2.0)))
                w_b = sigma * math.sqrt(2.0) * torch.erfinv((2.0 * u - 1.0) * mass)
            parts.append(w_b.clamp(-1.0, 1.0))
        if not parts:
            return torch.zeros((n, 0), dtype=dtype, device=device)
        return torch.cat(parts, dim=1).to(dtype)

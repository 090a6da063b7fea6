"""Weighted flow samples: importance weights for exp(-u), the buffers built from them, and the
linear-logarithmic energy cut of the reverse KL."""

import math

import torch
from torch import Tensor

from trademd.flow.conditional import TemperatureFlow
from trademd.training.refine import RefinementBuffer
from trademd.training.trade import log_importance_weights

__all__ = ["importance_weights", "weighted_buffer", "linear_log_cut"]


def linear_log_cut(u: Tensor, cut: float) -> Tensor:
    """u below ``cut``, cut + log(1 + u - cut) above: continuous, with derivative 1 below and
    1 / (1 + u - cut) above, so very high energies weigh little in a gradient (bgflow's
    linear-log energy regularisation). +inf stays +inf."""
    excess = (u - cut).clamp_min(0.0)
    return torch.where(u > cut, cut + torch.log1p(excess), u)


def importance_weights(flow: TemperatureFlow, target, n: int, temperature,
                       chunk: int = 4096, chirality_restraint_kt: float = 0.0,
                       ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Draw n flow samples at T and weigh them for exp(-u).

    Args:
        temperature: a float, or a tensor [n] of per-sample temperatures.
        chirality_restraint_kt: kT added per mirrored chiral centre (molecules), so that
            samples of the wrong enantiomer carry (essentially) zero weight, as in sampling.

    Returns:
        (z [n, D], log p_flow [n], u [n], log w [n]) with log w = -u + log|dx/dz| - log p,
        unnormalised; non-finite u gives log w = -inf.
    """
    per_sample = isinstance(temperature, Tensor)
    parts = []
    for start in range(0, n, chunk):
        m = min(chunk, n - start)
        t_chunk = temperature[start:start + m] if per_sample else float(temperature)
        z, log_p = flow.sample(m, t_chunk)
        t = torch.as_tensor(t_chunk, dtype=z.dtype, device=z.device).expand(m)
        with torch.no_grad():
            u, log_det = target.reduced_energy(z, t, chirality_restraint_kt)
        log_w = log_importance_weights(u, log_p) + log_det
        log_w = torch.where(torch.isfinite(log_w), log_w, torch.full_like(log_w, -math.inf))
        parts.append((z, log_p, u, log_w))
    return tuple(torch.cat(p) for p in zip(*parts))


def weighted_buffer(flow: TemperatureFlow, target, round_index: int, temperatures: Tensor,
                    chirality_restraint_kt: float, clip_fraction: float) -> RefinementBuffer:
    """Samples of ``flow`` at ``temperatures`` [n], weighed for exp(-u) and clipped
    (:class:`RefinementBuffer`): the refinement rounds' buffers and the data-free boundary's."""
    z, _, _, log_w = importance_weights(flow, target, len(temperatures), temperatures,
                                        chirality_restraint_kt=chirality_restraint_kt)
    return RefinementBuffer.from_samples(round_index, z, temperatures.to(z.device), log_w, clip_fraction)

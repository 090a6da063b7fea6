"""The condition of every flow: temperatures as one tensor entry per sample."""

import torch
from torch import Tensor

from trademd.errors import TradeMDError

__all__ = ["per_sample_temperatures"]


def per_sample_temperatures(temperature, n: int, like: Tensor) -> Tensor:
    """A float or tensor (scalar or [n]) of temperatures -> tensor [n] with the dtype and device
    of ``like`` (gradients kept)."""
    t = torch.as_tensor(temperature, dtype=like.dtype, device=like.device)
    if t.dim() == 0:
        return t.expand(n)
    t = t.reshape(-1)
    if t.shape[0] != n:
        raise TradeMDError(f"got {t.shape[0]} temperatures for {n} samples")
    return t

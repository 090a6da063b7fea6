"""Minibatches of the data (or of any feature set) drawn the same way on every rank."""

import torch
from torch import Tensor

from trademd.distributed import Ranks

__all__ = ["MinibatchSource"]


class MinibatchSource:
    """Draws global minibatches with replacement from a generator all ranks share, each rank
    taking its slice, so that W ranks at batch B draw what one process at batch W x B does.

    Args:
        data: features [N, D] (None: a run without data).
        seed: seed of the shared generator.
        ranks: this process's place in a torchrun launch.
        device: where the batches go.

    Attributes:
        data: the features.
        generator: the shared generator (its state goes into checkpoints).
    """

    def __init__(self, data: Tensor | None, seed: int, ranks: Ranks, device: torch.device):
        self.data = None if data is None else data.to(device)
        self.generator = torch.Generator().manual_seed(seed)
        self.ranks, self.device = ranks, device

    def batch(self, size: int, source: Tensor | None = None) -> Tensor:
        """This rank's ``size`` rows [size, D] of a global minibatch of ``size x world_size``
        rows drawn from the data (or ``source``, e.g. the structure prior's samples)."""
        source = self.data if source is None else source
        r, w = self.ranks.rank, self.ranks.world_size
        index = torch.randint(len(source), (size * w,), generator=self.generator)
        return source[index[r * size:(r + 1) * size].to(self.device)]

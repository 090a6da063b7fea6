"""Scores of a flow at a metrics step: the validation NLL at T0 and the Kish relative ESS at
every selection temperature, pooled over ranks."""

import torch
from torch import Tensor

from trademd import distributed
from trademd.distributed import Ranks
from trademd.training.sampling import importance_weights

__all__ = ["validation_nll", "relative_ess"]


@torch.no_grad()
def validation_nll(model, features: Tensor, reference_temperature: float, ranks: Ranks) -> float:
    """Mean NLL at T0 of held-out ``features`` [M, D], each rank scoring its slice."""
    mine = features[ranks.rank::ranks.world_size]
    log_p = model.log_prob(mine, reference_temperature).double()
    sums = distributed.all_reduce(torch.stack([log_p.sum(), torch.tensor(
        float(len(mine)), dtype=torch.float64, device=log_p.device)]))
    return float(-sums[0] / sums[1])


@torch.no_grad()
def relative_ess(model, target, n: int, temperature: float, chirality_restraint_kt: float) -> float:
    """Kish relative ESS of ``n`` samples of ``model`` (this rank's share) at ``temperature``,
    pooled over ranks."""
    _, _, _, log_w = importance_weights(model, target, n, temperature,
                                        chirality_restraint_kt=chirality_restraint_kt)
    ess, total = distributed.pooled_kish_ess(log_w)
    return ess / total

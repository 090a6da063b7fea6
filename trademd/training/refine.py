"""Energy refinement: importance-weighted forward KL on a buffer of flow samples.

For flow samples z_i ~ p_old(. | T_i) with log importance weights
log w_i = -u(z_i, T_i) + log|dx/dz|(z_i) - log p_old(z_i | T_i), the self-normalised weights
make sum_i w_i f(z_i) an estimate of E_{q(.|T_i)}[f], so maximising sum_i w_i log p(z_i | T_i)
minimises the forward KL(q || p) at every buffer temperature, with no data and one energy
evaluation per buffer sample (the annealing step of temperature-annealed Boltzmann
generators, Schopmans and Friederich, 2025). Weights are normalised per temperature, so every
temperature gets the same share of the minibatches; the largest weights of each temperature are
clipped (a few huge weights would otherwise make every minibatch the same sample), and
minibatches are drawn with replacement in proportion to the clipped weights.
"""

from dataclasses import dataclass
import math

import torch
from torch import Tensor

from trademd.errors import TradeMDError
from trademd.weights import kish_ess_torch

__all__ = ["RefinementBuffer", "resampling_probabilities"]


def resampling_probabilities(log_weights: Tensor, group: Tensor, clip_fraction: float) -> Tensor:
    """Clipped, per-group self-normalised weights, each group summing to 1 / (number of groups).

    Args:
        log_weights: [N] unnormalised log weights; -inf (or NaN) means zero weight.
        group: [N] integer label of each sample's temperature.
        clip_fraction: within each group, weights above the ceil(clip_fraction x size)-th
            largest are lowered to it (0 clips nothing).

    Returns:
        float64 [N] probabilities summing to 1 (groups whose weights are all zero get none,
        and the others share their mass).
    """
    log_weights = torch.nan_to_num(log_weights.double(), nan=-math.inf, posinf=-math.inf,
                                  neginf=-math.inf)
    probabilities = torch.zeros_like(log_weights)
    labels = torch.unique(group)
    for label in labels:
        mine = group == label
        values = log_weights[mine]
        finite = torch.isfinite(values)
        if not finite.any():
            continue
        k = max(1, math.ceil(clip_fraction * int(finite.sum())))
        ceiling = torch.topk(values[finite], k).values[-1]
        probabilities[mine] = torch.softmax(torch.minimum(values, ceiling), dim=0)
    total = probabilities.sum()
    if not total > 0:
        raise TradeMDError("every refinement sample has zero weight: the flow is unusable here; "
                           "train the main phase longer before refining")
    return probabilities / total


@dataclass
class RefinementBuffer:
    """Flow samples of one refinement round and their resampling probabilities.

    Attributes:
        round_index: the refinement round that drew them (0-based).
        features: [N, D] flow features z.
        temperatures: [N] their temperatures (K or reduced units).
        probabilities: float64 [N], summing to 1.
        relative_ess: mean over temperatures of the Kish relative ESS of the unclipped weights.
    """

    round_index: int
    features: Tensor
    temperatures: Tensor
    probabilities: Tensor
    relative_ess: float

    @classmethod
    def from_samples(cls, round_index: int, features: Tensor, temperatures: Tensor,
                     log_weights: Tensor, clip_fraction: float) -> "RefinementBuffer":
        """Weigh samples drawn at a set of temperatures (labels: equal temperatures)."""
        _, group = torch.unique(temperatures, return_inverse=True)
        ess = [float(kish_ess_torch(log_weights[group == g].double())) / int((group == g).sum())
               for g in range(int(group.max()) + 1)]
        probabilities = resampling_probabilities(log_weights, group, clip_fraction)
        return cls(round_index, features.detach(), temperatures.detach(), probabilities,
                   sum(ess) / len(ess))

    def batch(self, size: int) -> tuple[Tensor, Tensor]:
        """(z [size, D], T [size]) drawn with replacement in proportion to the probabilities."""
        index = torch.multinomial(self.probabilities, size, replacement=True)
        index = index.to(self.features.device)
        return self.features[index], self.temperatures[index]

    def state_dict(self) -> dict:
        return {"round_index": self.round_index, "features": self.features,
                "temperatures": self.temperatures, "probabilities": self.probabilities,
                "relative_ess": self.relative_ess}

    @classmethod
    def from_state_dict(cls, state: dict) -> "RefinementBuffer":
        return cls(**state)

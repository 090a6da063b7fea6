"""A starting density for data-free training of a molecule, from one minimised structure.

A flow that starts as the identity on its base draws every torsion uniformly: for alanine
dipeptide 14 of its 19 Z-matrix torsions are stiff (peptide planes, the branches that fix the
handedness of C-alpha, the offsets of methyl hydrogens), so such a start puts half of its samples
on the wrong enantiomer and nearly all of them in clashes, and reverse KL from there does not
find the molecule (docs/results.md, 2026-12-06). This module builds a product density over the
flow features that already knows the force field's local structure, at no cost in training
steps: the data-free boundary phase first fits the flow to it by maximum likelihood.

- **Torsions**: the exact conditional Boltzmann density of each torsion alone, every other
  internal coordinate held at the minimised structure, tabulated on a grid of ``n_grid`` bins
  over the circle (one energy evaluation per bin and torsion, counted by the target) and
  piecewise constant within a bin. Stiff torsions come out narrow around their minimised
  value (and a mirrored chiral centre, many kT up, gets no weight); rotors and the backbone
  come out broad with all their minima.
- **Bonds and angles**: normal around the structure's values with the normalisation's width,
  ``bound / n_std`` in feature units, truncated to the interval: the harmonic thermal widths
  for a data-free target (:meth:`MoleculeTarget.from_structure`), the data's spread for one
  fitted on MD frames.

Densities are with respect to the flow features z (radians for torsions, feature units for
bonded values), as :meth:`TemperatureFlow.log_prob` is.
"""

import math

import torch
from torch import Tensor

__all__ = ["StructurePrior"]


class StructurePrior:
    """Product density over flow features z = (torsions, bounded).

    Args:
        torsion_log_prob: [n_torsions, n_grid] log-density (per radian) of each torsion on the
            bins of width 2 pi / n_grid starting at -pi; each row integrates to one.
        bounded_centre: [n_bounded] the structure's bounded features (feature units).
        bounded_std: standard deviation of every bounded feature (feature units).
        bound: bounded features live in ``[-bound, bound]``.
    """

    def __init__(self, torsion_log_prob: Tensor, bounded_centre: Tensor, bounded_std: float, bound: float):
        self.torsion_log_prob = torsion_log_prob.double()
        self.n_torsions, self.n_grid = torsion_log_prob.shape
        self.bounded_centre = bounded_centre.double()
        self.n_bounded = len(bounded_centre)
        self.bounded_std = float(bounded_std)
        self.bound = float(bound)
        self.bin_width = 2 * math.pi / self.n_grid

    @classmethod
    @torch.no_grad()
    def from_target(cls, target, structure_features: Tensor, temperature: float, n_grid: int = 360,
                    chirality_restraint_kt: float = 0.0) -> "StructurePrior":
        """Tabulate every torsion's conditional density at ``temperature`` around a structure.

        Args:
            target: a :class:`~trademd.training.targets.MoleculeTarget` (its
                ``reduced_energy`` counts the ``n_torsions x n_grid`` evaluations).
            structure_features: [D] features of the structure (bounded part 0 when the
                coordinates are centred on it).
            temperature: K.
            n_grid: bins over the circle (360: one degree, fine enough for torsions whose
                thermal width is a few degrees).
            chirality_restraint_kt: as in training, so a mirrored centre carries no weight.
        """
        n_torsions = target.n_torsions
        centres = -math.pi + (torch.arange(n_grid, dtype=torch.float64) + 0.5) * (2 * math.pi / n_grid)
        rows = []
        for k in range(n_torsions):
            z = structure_features.double().expand(n_grid, -1).clone()
            z[:, k] = centres
            u, _ = target.reduced_energy(z, torch.full((n_grid,), float(temperature), dtype=torch.float64),
                                         chirality_restraint_kt)
            log_weight = torch.where(torch.isfinite(u), -u.double(), torch.full_like(centres, -math.inf))
            rows.append(log_weight - torch.logsumexp(log_weight, 0) - math.log(2 * math.pi / n_grid))
        bound = float(target.coordinates.bound)
        return cls(torch.stack(rows), structure_features[n_torsions:].cpu(), bound / float(target.coordinates.n_std),
                   bound)

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """n features [n, n_torsions + n_bounded] (float32)."""
        probabilities = torch.exp(self.torsion_log_prob) * self.bin_width  # [n_torsions, n_grid]
        bins = torch.multinomial(probabilities, n, replacement=True, generator=generator).T  # [n, n_torsions]
        jitter = torch.rand(n, self.n_torsions, dtype=torch.float64, generator=generator)
        torsions = -math.pi + (bins + jitter) * self.bin_width
        bounded = self._truncated_normal(n, generator)
        return torch.cat([torsions, bounded], dim=1).float()

    def _truncated_normal(self, n: int, generator: torch.Generator | None) -> Tensor:
        """N(centre, std^2) truncated to [-bound, bound] by the inverse CDF, [n, n_bounded]."""
        low, high = self._cdf(-self.bound), self._cdf(self.bound)
        u = low + (high - low) * torch.rand(n, self.n_bounded, dtype=torch.float64, generator=generator)
        values = self.bounded_centre + self.bounded_std * math.sqrt(2.0) * torch.erfinv(2.0 * u - 1.0)
        return values.clamp(-self.bound, self.bound)

    def _cdf(self, value: float) -> Tensor:
        """Normal CDF of every bounded feature at ``value``, [n_bounded]."""
        return 0.5 * (1.0 + torch.erf((value - self.bounded_centre) / (self.bounded_std * math.sqrt(2.0))))

    def log_prob(self, z: Tensor) -> Tensor:
        """log density [B] of features z [B, D] (-inf outside the bounded interval)."""
        z = z.double()
        torsions = torch.remainder(z[:, :self.n_torsions] + math.pi, 2 * math.pi)
        bins = (torsions / self.bin_width).long().clamp(0, self.n_grid - 1)
        logp = self.torsion_log_prob.gather(1, bins.T).T.sum(1)
        bounded = z[:, self.n_torsions:]
        mass = self._cdf(self.bound) - self._cdf(-self.bound)
        per_dim = (-0.5 * ((bounded - self.bounded_centre) / self.bounded_std) ** 2 - math.log(self.bounded_std)
                   - 0.5 * math.log(2 * math.pi) - torch.log(mass))
        logp = logp + per_dim.sum(1)
        inside = (bounded.abs() <= self.bound).all(1)
        return torch.where(inside, logp, torch.full_like(logp, -math.inf))

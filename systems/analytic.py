"""Analytic systems whose p(x|T) is known exactly at every temperature (no OpenMM).

They prove the TRADE mathematics and let users see the method work in a minute. Energies are
in reduced units with k_B = 1, so the temperature is dimensionless (T0 = 1 by default).

- ``gaussian-2d``: U(x) = |x|^2 / 2 in 2 dimensions, p(x|T) = N(0, T I).
- ``double-well-5d``: U(x) = sum_i (x_i^4 - 4 x_i^2) in 5 dimensions; the dimensions are
  independent, each normalised by 1-D quadrature.
- ``mixture-2d``: U(x) = -log of a mixture of four well separated 2-D Gaussians of unequal
  weight (a mode-hunting target: at T0 = 1 the modes are 8 apart with sd 0.5, so no path of
  a sampler or flow between them carries mass); p(x|T) is normalised, sampled and split into
  modes by 2-D quadrature on a grid.

All live on the box [-L, L]^d (``half_width``); the mass outside is below 1e-8 for
T <= 2.5, and sampling and densities are those of the truncated distribution.
"""

from dataclasses import dataclass
import math

import torch
from torch import Tensor

from trademd.errors import TradeMDError

__all__ = ["AnalyticSystem", "GaussianMixtureSystem", "ANALYTIC_SYSTEMS", "get_analytic_system"]

_GRID_POINTS = 20001
#: Points per axis of the 2-D quadrature grid of the mixture.
_GRID_POINTS_2D = 1201


@dataclass(frozen=True)
class AnalyticSystem:
    """A separable Boltzmann density exp(-sum_i U1(x_i) / T) on [-L, L]^d.

    Attributes:
        name: registry name.
        dim: number of dimensions d.
        half_width: L, the box is [-L, L]^d.
        potential: name of the 1-D potential U1 (``harmonic`` or ``double-well``).
        reference_temperature: T0, where training data is drawn.
        boltzmann_k: 1 (reduced units).
    """

    name: str
    dim: int
    half_width: float
    potential: str
    reference_temperature: float = 1.0
    boltzmann_k: float = 1.0

    def energy_1d(self, x: Tensor) -> Tensor:
        """U1 elementwise."""
        if self.potential == "harmonic":
            return 0.5 * x**2
        return x**4 - 4.0 * x**2

    def energy(self, x: Tensor) -> Tensor:
        """U(x) for x [B, d] -> [B]."""
        return self.energy_1d(x).sum(dim=-1)

    def _grid(self, temperature: float) -> tuple[Tensor, Tensor, Tensor]:
        """Grid [G], 1-D density on it [G] and its CDF [G] at ``temperature`` (float64)."""
        grid = torch.linspace(-self.half_width, self.half_width, _GRID_POINTS, dtype=torch.float64)
        log_q = -self.energy_1d(grid) / temperature
        density = torch.exp(log_q - log_q.max())
        spacing = grid[1] - grid[0]
        cdf = torch.cat([torch.zeros(1, dtype=torch.float64),
                         torch.cumsum(0.5 * (density[1:] + density[:-1]) * spacing, 0)])
        return grid, density / cdf[-1], cdf / cdf[-1]

    def log_normaliser_1d(self, temperature: float) -> float:
        """log of the integral of exp(-U1/T) over [-L, L] (trapezoid on 20001 points)."""
        grid = torch.linspace(-self.half_width, self.half_width, _GRID_POINTS, dtype=torch.float64)
        log_q = -self.energy_1d(grid) / temperature
        shift = log_q.max()
        integral = torch.trapezoid(torch.exp(log_q - shift), grid)
        return float(torch.log(integral) + shift)

    def log_prob(self, x: Tensor, temperature: float) -> Tensor:
        """Exact log p(x|T) for x [B, d] -> [B] (-inf outside the box)."""
        log_p = -self.energy(x) / temperature - self.dim * self.log_normaliser_1d(temperature)
        inside = (x.abs() <= self.half_width).all(dim=-1)
        return torch.where(inside, log_p, torch.full_like(log_p, -math.inf))

    def sample(self, n: int, temperature: float, generator: torch.Generator | None = None) -> Tensor:
        """n exact samples [n, d] (float64) by inverse-CDF interpolation on a fine grid."""
        if not temperature > 0:
            raise TradeMDError(f"temperature must be positive, got {temperature}")
        grid, _, cdf = self._grid(temperature)
        u = torch.rand((n, self.dim), dtype=torch.float64, generator=generator)
        index = torch.searchsorted(cdf, u.clamp(1e-15, 1 - 1e-15)).clamp(1, len(grid) - 1)
        lo, hi = cdf[index - 1], cdf[index]
        fraction = (u - lo) / (hi - lo).clamp_min(1e-300)
        return grid[index - 1] + fraction * (grid[index] - grid[index - 1])

    def forward_kl(self, model_log_prob, temperature: float, n: int = 20000, seed: int = 5) -> float:
        """KL(p(.|T) || model) in nats, estimated from ``n`` exact samples.

        Args:
            model_log_prob: (x float32 [n, d], temperature) -> log density [n] of the model.
        """
        x = self.sample(n, temperature, torch.Generator().manual_seed(seed))
        with torch.no_grad():
            log_model = model_log_prob(x.float(), temperature).double()
        return float((self.log_prob(x, temperature) - log_model).mean())

    def mean_energy(self, temperature: float) -> float:
        """E_{p(.|T)}[U] by quadrature."""
        grid, density, _ = self._grid(temperature)
        return self.dim * float(torch.trapezoid(density * self.energy_1d(grid), grid))


@dataclass(frozen=True)
class GaussianMixtureSystem:
    """The Boltzmann family of a 2-D Gaussian mixture: U(x) = -log sum_i w_i N(x; mu_i,
    sd^2 I), p(x|T) proportional to exp(-U(x) / T) on [-L, L]^2 (the mixture itself at T = 1;
    at other T not a mixture, so normalised, sampled and split into modes by quadrature on a
    grid of ``_GRID_POINTS_2D``^2 points).

    Attributes:
        name: registry name.
        centres: [(x, y)] of the modes.
        mode_weights_t0: their weights at T = 1 (sum 1).
        sd: standard deviation of every component.
        half_width: L, the box is [-L, L]^2.
        dim: 2.
        reference_temperature: T0 = 1, where training data is drawn.
        boltzmann_k: 1 (reduced units).
    """

    name: str
    centres: tuple[tuple[float, float], ...]
    mode_weights_t0: tuple[float, ...]
    sd: float
    half_width: float
    dim: int = 2
    reference_temperature: float = 1.0
    boltzmann_k: float = 1.0

    def energy(self, x: Tensor) -> Tensor:
        """U(x) for x [B, 2] -> [B] (float64 inside; the dtype of x out)."""
        centres = torch.tensor(self.centres, dtype=torch.float64, device=x.device)
        log_w = torch.log(torch.tensor(self.mode_weights_t0, dtype=torch.float64, device=x.device))
        squared = ((x.double()[:, None, :] - centres[None]) ** 2).sum(-1)
        log_components = log_w - squared / (2 * self.sd**2) - math.log(2 * math.pi * self.sd**2)
        return (-torch.logsumexp(log_components, dim=1)).to(x.dtype)

    def _grid(self) -> Tensor:
        """The 1-D grid of each axis [G] (float64)."""
        return torch.linspace(-self.half_width, self.half_width, _GRID_POINTS_2D, dtype=torch.float64)

    def _grid_points(self) -> Tensor:
        """Every grid point [G * G, 2], first axis slowest."""
        grid = self._grid()
        return torch.cartesian_prod(grid, grid)

    def _grid_log_q(self, temperature: float) -> Tensor:
        """-U / T on the grid [G, G]."""
        g = len(self._grid())
        return (-self.energy(self._grid_points()) / temperature).reshape(g, g)

    def log_normaliser(self, temperature: float) -> float:
        """log of the integral of exp(-U/T) over the box (2-D trapezoid)."""
        grid, log_q = self._grid(), self._grid_log_q(temperature)
        shift = log_q.max()
        inner = torch.trapezoid(torch.exp(log_q - shift), grid, dim=1)
        return float(torch.log(torch.trapezoid(inner, grid)) + shift)

    def log_prob(self, x: Tensor, temperature: float) -> Tensor:
        """Exact log p(x|T) for x [B, 2] -> [B] (-inf outside the box)."""
        log_p = -self.energy(x.double()) / temperature - self.log_normaliser(temperature)
        inside = (x.abs() <= self.half_width).all(dim=-1)
        return torch.where(inside, log_p, torch.full_like(log_p, -math.inf))

    def sample(self, n: int, temperature: float, generator: torch.Generator | None = None) -> Tensor:
        """n samples [n, 2] (float64): a grid cell drawn by its probability (density at the
        cell centre times its area), then a uniform point inside it (exact to the cell size,
        L / 600)."""
        if not temperature > 0:
            raise TradeMDError(f"temperature must be positive, got {temperature}")
        grid = self._grid()
        spacing = float(grid[1] - grid[0])
        centres_1d = grid[:-1] + 0.5 * spacing
        cells = torch.cartesian_prod(centres_1d, centres_1d)
        log_q = -self.energy(cells) / temperature
        probabilities = torch.exp(log_q - log_q.max())
        index = torch.multinomial(probabilities, n, replacement=True, generator=generator)
        jitter = torch.rand((n, 2), dtype=torch.float64, generator=generator) - 0.5
        return cells[index] + jitter * spacing

    def nearest_mode(self, x: Tensor) -> Tensor:
        """Index [B] of the mode centre nearest to each point x [B, 2]."""
        centres = torch.tensor(self.centres, dtype=torch.float64, device=x.device)
        return ((x.double()[:, None, :] - centres[None]) ** 2).sum(-1).argmin(dim=1)

    def mode_weights(self, temperature: float) -> Tensor:
        """Exact probability [modes] of each mode's region (the points nearest its centre) at
        ``temperature``, by quadrature."""
        grid = self._grid()
        weights_1d = torch.full_like(grid, float(grid[1] - grid[0]))
        weights_1d[[0, -1]] *= 0.5  # trapezoid weights
        cell = torch.outer(weights_1d, weights_1d).ravel()
        log_q = self._grid_log_q(temperature).ravel()
        mass = torch.exp(log_q - log_q.max()) * cell
        modes = self.nearest_mode(self._grid_points())
        per_mode = torch.zeros(len(self.centres), dtype=torch.float64).index_add_(0, modes, mass)
        return per_mode / per_mode.sum()

    def forward_kl(self, model_log_prob, temperature: float, n: int = 20000, seed: int = 5) -> float:
        """KL(p(.|T) || model) in nats, estimated from ``n`` samples of p(.|T).

        Args:
            model_log_prob: (x float32 [n, 2], temperature) -> log density [n] of the model.
        """
        x = self.sample(n, temperature, torch.Generator().manual_seed(seed))
        with torch.no_grad():
            log_model = model_log_prob(x.float(), temperature).double()
        return float((self.log_prob(x, temperature) - log_model).mean())

    def mean_energy(self, temperature: float) -> float:
        """E_{p(.|T)}[U] by quadrature."""
        grid, log_q = self._grid(), self._grid_log_q(temperature)
        density = torch.exp(log_q - log_q.max())
        energy = -log_q * temperature
        integrate = lambda f: torch.trapezoid(torch.trapezoid(f, grid, dim=1), grid)
        return float(integrate(density * energy) / integrate(density))


ANALYTIC_SYSTEMS = {
    "gaussian-2d": AnalyticSystem("gaussian-2d", dim=2, half_width=9.0, potential="harmonic"),
    "double-well-5d": AnalyticSystem("double-well-5d", dim=5, half_width=3.5, potential="double-well"),
    "mixture-2d": GaussianMixtureSystem(
        "mixture-2d", centres=((-4.0, -4.0), (-4.0, 4.0), (4.0, -4.0), (4.0, 4.0)),
        mode_weights_t0=(0.1, 0.2, 0.3, 0.4), sd=0.5, half_width=9.0),
}


def get_analytic_system(name: str) -> AnalyticSystem:
    """An analytic system by name."""
    if name not in ANALYTIC_SYSTEMS:
        raise TradeMDError(f"unknown analytic system {name!r}: choose one of {sorted(ANALYTIC_SYSTEMS)}")
    return ANALYTIC_SYSTEMS[name]

"""A temperature-conditional continuous normalizing flow along a prescribed energy path: the
model of the energy-interpolation objective (Máté and Fleuret, "Learning Interpolations between
Boltzmann Densities", TMLR 2023), with the temperature family itself as the interpolation.

The path has a time lam in [0, 2] and an energy f_lam(x) (reduced units, p_lam ~ exp(-f_lam)):

- lam in [0, 1]: from the base N(0, sigma^2 I) to the Boltzmann density at T_max,
  f_lam(x) = (1 - lam) |x|^2 / (2 sigma^2) + lam u(x, T_max);
- lam in [1, 2]: the temperature family, log T falling linearly from log T_max to log T_min,
  f_lam(x) = u(x, T(lam)),  so  d f / d lam = u log(T_max / T_min), TRADE's d/dlogT identity.

p(x | T) is the base pushed by the learnt vector field V(x, lam) from lam = 0 to lam(T). The
ODE is solved by zuko (:class:`zuko.transforms.FreeFormJacobianTransform`, adaptive
Dormand-Prince, exact trace) in two smooth segments split at lam = 1, where the field may jump;
every sample carries its own end time through the substitution lam = s a (base part) and
lam = 1 + s b (temperature part), s in [0, 1].
"""

from dataclasses import dataclass
import math

import torch
from torch import Tensor, nn
from zuko.transforms import FreeFormJacobianTransform
from zuko.utils import odeint

from trademd.errors import TradeMDError
from trademd.flow.temperatures import per_sample_temperatures

__all__ = ["TemperaturePath", "VelocityField", "NormaliserRate", "TemperatureCNF", "PATH_END"]

#: lam at T_min: the end of the path.
PATH_END = 2.0


@dataclass(frozen=True)
class TemperaturePath:
    """The prescribed interpolation: base -> Boltzmann at T_max -> down the temperatures.

    Attributes:
        t_min, t_max: temperature range (reduced units or K).
        base_sigma: standard deviation of the Gaussian base (units of x).
    """

    t_min: float
    t_max: float
    base_sigma: float

    @property
    def log_ratio(self) -> float:
        """log(T_max / T_min): d f / d lam = u times this on the temperature part."""
        return math.log(self.t_max / self.t_min)

    def time(self, temperature: Tensor) -> Tensor:
        """lam(T) [B] of temperatures [B]: 1 at T_max, 2 at T_min."""
        return 1.0 + torch.log(self.t_max / temperature) / self.log_ratio

    def temperature(self, lam: Tensor) -> Tensor:
        """The temperature whose energy the path uses at lam [B]: T_max on [0, 1], then
        T_max (T_min / T_max)^(lam - 1)."""
        return self.t_max * torch.exp(-(lam - 1.0).clamp_min(0.0) * self.log_ratio)

    def base_energy(self, x: Tensor) -> Tensor:
        """|x|^2 / (2 sigma^2) [B] of x [B, D]."""
        return 0.5 * (x / self.base_sigma).pow(2).sum(dim=-1)

    def base_log_prob(self, x: Tensor) -> Tensor:
        """log N(x; 0, sigma^2 I) [B]."""
        d = x.shape[-1]
        return -self.base_energy(x) - 0.5 * d * math.log(2 * math.pi * self.base_sigma**2)

    def energy(self, x: Tensor, reduced_energy: Tensor, lam: Tensor) -> tuple[Tensor, Tensor]:
        """(f_lam(x) [B], d f_lam(x) / d lam [B]) given u(x, temperature(lam)) [B]."""
        on_base_part = lam < 1.0
        base = self.base_energy(x)
        f = torch.where(on_base_part, (1.0 - lam) * base + lam * reduced_energy, reduced_energy)
        df = torch.where(on_base_part, reduced_energy - base, reduced_energy * self.log_ratio)
        return f, df


#: Number of time features of the velocity field and the normaliser rate.
_TIME_FEATURES = 4


def _time_features(lam: Tensor, on_temperature_part: Tensor | None = None) -> Tensor:
    """[B] -> [B, 4]: lam centred on the path's middle, one period of sin/cos over it, and a
    step at lam = 1, where d f / d lam jumps (base part -> temperature part), so the field can
    jump there too. ``on_temperature_part`` (bool [B]) overrides lam >= 1: the ODE's base-part
    segment ends at lam = 1 on the base part's side of the jump."""
    phase = math.pi * lam
    step = (lam >= 1.0) if on_temperature_part is None else on_temperature_part
    return torch.stack([lam - 1.0, torch.sin(phase), torch.cos(phase), step.to(lam.dtype)], dim=-1)


class VelocityField(nn.Module):
    """V(x, lam) [B, D]: an MLP of (x / sigma, time features) with smooth activations (the
    loss differentiates it by x); the last layer starts at zero, so training starts from the
    base at every lam.

    Args:
        dim: D.
        scale: sigma, the natural length of x.
        width, depth: hidden width and number of hidden layers.
    """

    def __init__(self, dim: int, scale: float, width: int = 64, depth: int = 3):
        super().__init__()
        layers: list[nn.Module] = []
        n_in = dim + _TIME_FEATURES
        for _ in range(depth):
            layers += [nn.Linear(n_in, width), nn.SiLU()]
            n_in = width
        last = nn.Linear(n_in, dim)
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)
        self.net = nn.Sequential(*layers, last)
        self.scale = float(scale)

    def forward(self, x: Tensor, lam: Tensor, on_temperature_part: Tensor | None = None) -> Tensor:
        features = _time_features(lam, on_temperature_part)
        return self.scale * self.net(torch.cat([x / self.scale, features], dim=-1))


class NormaliserRate(nn.Module):
    """c(lam) = -d log Z_lam / d lam = E_{p_lam}[d f / d lam] [B], learnt with the field.

    Piecewise linear in lam on ``nodes`` points over the base part [0, 1) and ``nodes`` over the
    temperature part [1, 2] (c jumps at lam = 1 with d f / d lam). Values are ``scale`` times
    the parameters, so that Adam moves them ``scale`` times faster than the field's weights: c
    is of the order of the energies (tens of kT), which a network's output reaches only slowly;
    :meth:`initialise` sets a first estimate.

    Args:
        nodes: table points per part.
        scale: value per unit of parameter.
    """

    def __init__(self, nodes: int = 21, scale: float = 10.0):
        super().__init__()
        self.table = nn.Parameter(torch.zeros(2, nodes))
        self.scale = float(scale)

    @property
    def node_times(self) -> Tensor:
        """lam of every table value [2, nodes]: [0, 1) and [1, 2] (the base part's last node
        just below 1: the left limit of the jump)."""
        nodes = self.table.shape[1]
        grid = torch.linspace(0.0, 1.0, nodes, dtype=self.table.dtype, device=self.table.device)
        return torch.stack([grid.clamp(max=1.0 - 1e-6), 1.0 + grid])

    def initialise(self, values: Tensor) -> None:
        """Set c at :attr:`node_times` to ``values`` [2, nodes]."""
        with torch.no_grad():
            self.table.copy_(values.to(self.table) / self.scale)

    def forward(self, lam: Tensor) -> Tensor:
        nodes = self.table.shape[1]
        part = (lam >= 1.0).long()
        position = (lam - part.to(lam.dtype)).clamp(0.0, 1.0) * (nodes - 1)
        left = position.floor().long().clamp(max=nodes - 2)
        fraction = position - left.to(lam.dtype)
        values = self.scale * self.table
        return (1 - fraction) * values[part, left] + fraction * values[part, left + 1]


class TemperatureCNF(nn.Module):
    """p(x | T) for T in [T_min, T_max]: the base transported along :class:`TemperaturePath`.

    A :class:`trademd.flow.factory.ConditionalFlow`, as
    :class:`trademd.flow.conditional.TemperatureFlow` is.

    Args:
        n_bounded: D, the number of (unbounded, real) features; analytic systems only.
        temperature_range_k: (T_min, T_max).
        base_sigma: standard deviation of the Gaussian base.
        width, depth: of the velocity MLP.
        atol, rtol: ODE tolerances.
        n_torsions, bounded_interval, reference_temperature_k: recorded for the trainer's
            flow settings (must be 0 torsions; the box is not enforced).
    """

    def __init__(self, n_bounded: int, temperature_range_k, base_sigma: float = 1.0,
                 width: int = 64, depth: int = 3, atol: float = 1e-5, rtol: float = 1e-5,
                 n_torsions: int = 0, bounded_interval=(-1.0, 1.0),
                 reference_temperature_k: float | None = None):
        super().__init__()
        if n_torsions:
            raise TradeMDError("the interpolation CNF models real features only (analytic systems), "
                               f"not {n_torsions} torsions")
        t_min, t_max = (float(t) for t in temperature_range_k)
        if not 0 < t_min < t_max:
            raise TradeMDError(f"temperature range {temperature_range_k} must be 0 < T_min < T_max")
        self.config = {"kind": "cnf", "n_bounded": int(n_bounded), "temperature_range_k": [t_min, t_max],
                       "base_sigma": float(base_sigma), "width": int(width), "depth": int(depth),
                       "atol": float(atol), "rtol": float(rtol), "n_torsions": 0,
                       "bounded_interval": [float(b) for b in bounded_interval],
                       "reference_temperature_k": reference_temperature_k}
        self.path = TemperaturePath(t_min, t_max, float(base_sigma))
        self.velocity = VelocityField(n_bounded, base_sigma, width, depth)
        self.normaliser_rate = NormaliserRate()
        self.atol, self.rtol = float(atol), float(rtol)
        self.register_buffer("_anchor", torch.zeros(0), persistent=False)

    @property
    def n_features(self) -> int:
        return self.config["n_bounded"]

    def _times(self, temperature, n: int) -> Tensor:
        """lam(T) [n] of a float or tensor (scalar or [n]) of temperatures."""
        return self.path.time(per_sample_temperatures(temperature, n, self._anchor))

    def _segments(self, lam_end: Tensor) -> list:
        """The ODE in two smooth segments, split at the field's jump at lam = 1: per sample
        lam = s a on the base part (a = min(lam_end, 1)) and lam = 1 + s b on the temperature
        part (b = max(lam_end - 1, 0)), s in [0, 1] for both; dx/ds = a V or b V."""
        a, b = lam_end.clamp(max=1.0), (lam_end - 1.0).clamp(min=0.0)
        base_part = torch.zeros_like(lam_end, dtype=torch.bool)
        return [lambda s, x: a[:, None] * self.velocity(x, s * a, base_part),
                lambda s, x: b[:, None] * self.velocity(x, 1.0 + s * b, ~base_part)]

    def transport(self, x: Tensor, lam_end: Tensor, reverse: bool = False) -> tuple[Tensor, Tensor]:
        """Move x [B, D] from lam = 0 to lam_end [B] (``reverse``: from lam_end back to 0).

        Returns:
            (the moved points [B, D], log|det d out / d in| [B]).
        """
        steps = [FreeFormJacobianTransform(field, 0.0, 1.0, atol=self.atol, rtol=self.rtol, exact=True)
                 for field in self._segments(lam_end)]
        if reverse:
            steps = [step.inv for step in reversed(steps)]
        total = torch.zeros_like(lam_end)
        for step in steps:
            x, ladj = step.call_and_ladj(x)
            total = total + ladj
        return x, total

    def sample_base(self, n: int) -> Tensor:
        """n points [n, D] of the Gaussian base (the model's dtype and device)."""
        return self.path.base_sigma * torch.randn(n, self.n_features, dtype=self._anchor.dtype,
                                                  device=self._anchor.device)

    def sample_path(self, n: int, lam: Tensor) -> Tensor:
        """n points [n, D] of the model's p_lam at path times lam [n] (no log-det, no gradient)."""
        with torch.no_grad():
            x = self.sample_base(n)
            for field in self._segments(lam):
                x = odeint(field, x, 0.0, 1.0, (), self.atol, self.rtol)
            return x

    def log_prob(self, x: Tensor, temperature) -> Tensor:
        """log p(x | T) [B] for x [B, D]; T a float or a tensor [B]."""
        x0, ladj = self.transport(x, self._times(temperature, len(x)), reverse=True)
        return self.path.base_log_prob(x0) + ladj

    def sample(self, n: int, temperature) -> tuple[Tensor, Tensor]:
        """n samples x [n, D] at T and their log p(x | T) [n], without gradients."""
        with torch.no_grad():
            x0 = self.sample_base(n)
            x, ladj = self.transport(x0, self._times(temperature, n))
            return x, self.path.base_log_prob(x0) - ladj

    def rsample(self, n: int, temperature) -> tuple[Tensor, Tensor]:
        raise TradeMDError("the interpolation CNF is trained by its continuity residual, not by "
                           "reparameterised samples: use the objective interpolation")

    def checkpoint(self) -> dict:
        """{"config": ..., "state_dict": ...}: what :func:`trademd.flow.factory.load_flow` reads."""
        return {"config": dict(self.config), "state_dict": self.state_dict()}

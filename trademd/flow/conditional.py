"""Temperature-conditional normalizing flow p(z | T) over torsions and bounded features.

References:
    | TRADE: Transfer of Distributions between External Conditions with Normalizing Flows
    | (Wahl et al., AISTATS 2025)
    | Neural Spline Flows (Durkan et al., 2019), https://arxiv.org/abs/1906.04032
    | Normalizing Flows on Tori and Spheres (Rezende et al., 2020), https://arxiv.org/abs/2002.02428

Features ``z`` [B, n_torsions + n_bounded]: torsions first (radians, periodic on
``[-pi, pi)``), then bounded features in ``bounded_interval = (low, high)``. Internally every
feature is normalised to ``w`` in ``[-1, 1]`` (torsion / pi, (x - centre) / half-width); the
normalisation's Jacobian cancels between entry and exit, so it appears in the density only as
the constant of the base (see :meth:`TemperatureFlow.base_log_prob`).

Each coupling layer transforms a set X of features with rational-quadratic splines
(:class:`~trademd.flow.spline.RationalQuadraticSpline`, Durkan et al. 2019): circular
splines on torsions (end knots fixed at -pi and pi, one learned slope shared by both ends, so
the map is a C1 diffeomorphism of the circle) and splines on the whole interval for bounded
features (end knots at the interval ends, learned end slopes: the density is exactly supported
on the interval). The conditioner sees cos/sin of torsions in the conditioning set Y (never the
raw angle), the bounded features of Y, and the temperature feature
``(log T - mid) / half_width`` of :meth:`TemperatureFlow.temperature_feature` (-1 at T_min,
+1 at T_max, computed there and nowhere else). The last conditioner layer is zero-initialised,
so a new flow is exactly the identity map.

Layer pattern: a list of strings ``"X|Y"`` ("transform X conditioned on Y"); each gives the
layer and its reverse ("Y|X"). Names: ``torsions``, ``bounded`` (alias ``bonded``), names
declared in ``groups`` (feature indices into ``z``), and on the right ``all``/``rest`` (every
feature not in X) or ``none`` (only the temperature). ``"X|X"`` splits X in two halves by a
bit mask of the position that changes with each occurrence (even/odd, pairs, quads, ...).
"""

from collections import defaultdict
from collections.abc import Sequence
import math

import torch
from torch import Tensor, nn

from trademd.errors import TradeMDError
from trademd.flow.base import TemperatureBase
from trademd.flow.conditioner import ACTIVATIONS, conditioner_network, network_output, network_output_jvp
from trademd.flow import spline as splines
from trademd.flow.temperatures import per_sample_temperatures

__all__ = ["SplineCoupling", "TemperatureFlow", "parse_layers"]

#: Seam placements of the circular splines (see :class:`TemperatureFlow`).
TORSION_SHIFTS = ("golden", "none")
_GOLDEN = 0.5 * (math.sqrt(5.0) - 1.0)


# ---------------------------------------------------------------------------------------------
# layer pattern


def parse_layers(layers: Sequence[str], n_torsions: int, n_bounded: int,
                 groups: dict | None = None) -> list[tuple[list[int], list[int]]]:
    """Turn a layer pattern into (transformed indices, conditioning indices) pairs.

    Every ``"X|Y"`` yields ``(X, Y)`` and its reverse ``(Y, X)``; pairs that transform nothing
    are dropped. Indices refer to columns of ``z``.

    >>> parse_layers(["torsions|torsions", "bounded|torsions"], 3, 2)
    [([0, 2], [1]), ([1], [0, 2]), ([3, 4], [0, 1, 2]), ([0, 1, 2], [3, 4])]
    """
    n = n_torsions + n_bounded
    named = {"torsions": list(range(n_torsions)), "bounded": list(range(n_torsions, n)),
             "bonded": list(range(n_torsions, n))}
    for name, indices in (groups or {}).items():
        indices = sorted(int(i) for i in indices)
        if name in named or name in ("all", "rest", "none"):
            raise TradeMDError(f"group name {name!r} is reserved: choose another")
        if len(set(indices)) != len(indices) or any(not 0 <= i < n for i in indices):
            raise TradeMDError(f"group {name!r} must list distinct feature indices in [0, {n})")
        named[name] = indices

    pairs, occurrences = [], defaultdict(int)
    for spec in layers:
        left, sep, right = (part.strip() for part in str(spec).partition("|"))
        if not sep or left not in named:
            raise TradeMDError(f"cannot read layer {spec!r}: write 'X|Y' with X one of "
                               f"{sorted(named)} and Y one of those, 'all' or 'none'")
        x = named[left]
        if right == left:
            bit = occurrences[left] % max(1, (len(x) - 1).bit_length())
            occurrences[left] += 1
            first = [i for pos, i in enumerate(x) if not (pos >> bit) & 1]
            second = [i for pos, i in enumerate(x) if (pos >> bit) & 1]
            candidates = [(first, second), (second, first)]
        else:
            if right in ("all", "rest"):
                y = [i for i in range(n) if i not in x]
            elif right == "none":
                y = []
            elif right in named:
                y = named[right]
                if set(x) & set(y):
                    raise TradeMDError(f"layer {spec!r}: {left} and {right} share features")
            else:
                raise TradeMDError(f"cannot read layer {spec!r}: unknown group {right!r}")
            candidates = [(x, y), (y, x)]
        pairs.extend((list(a), list(b)) for a, b in candidates if a)
    return pairs


# ---------------------------------------------------------------------------------------------
# coupling layer


def _output_rows(n_periodic: int, n_transformed: int, bins: int) -> Tensor:
    """Rows of a conditioner's output in the layout the splines read
    (:class:`~trademd.flow.spline.RationalQuadraticSpline`): bin logits [K, 2, n] (bin, width
    or height, feature), then slope logits [K + 1, n].

    The output holds 3 K logits per torsion (K widths, K heights, the slopes at the first K
    knots) followed by 3 K + 1 per bounded feature; a circular spline's last slope is its
    first (one slope shared by both ends, so the circle map is C1 at the seam): that row
    repeats.
    """
    starts = [3 * bins * f + max(0, f - n_periodic) for f in range(n_transformed)]
    bin_rows = [start + axis * bins + j for j in range(bins) for axis in (0, 1) for start in starts]
    slope_rows = [start + 2 * bins + (0 if j == bins and f < n_periodic else j)
                  for j in range(bins + 1) for f, start in enumerate(starts)]
    return torch.tensor(bin_rows + slope_rows, dtype=torch.long)


def _by_kind(x: Tensor, n_periodic: int, periodic, bounded) -> Tensor:
    """x [B, n] with the function ``periodic`` applied to its first ``n_periodic`` columns and
    ``bounded`` to the others (no copy where one kind is absent, as in the default layers)."""
    if n_periodic == x.shape[1]:
        return periodic(x)
    if n_periodic == 0:
        return bounded(x)
    return torch.cat([periodic(x[:, :n_periodic]), bounded(x[:, n_periodic:])], dim=1)


def _seam_shift(kind: str, layer_index: int) -> float:
    """Torsion rotation of layer ``layer_index`` in normalised units ([0, 2): a full turn)."""
    return 2.0 * ((layer_index * _GOLDEN) % 1.0) if kind == "golden" else 0.0


class SplineCoupling(nn.Module):
    """One coupling layer on normalised features w in [-1, 1]: spline(X | Y, T).

    Args:
        transformed: indices X of the transformed features (columns of w).
        conditioning: indices Y the conditioner sees (disjoint from X; may be empty).
        n_torsions: the first ``n_torsions`` columns are periodic.
        bins: spline bins K.
        width, depth, conditioner, activation: the conditioner network.
        min_slope: lower bound of every spline slope (upper bound 1 / min_slope).
        seam_shift: rotation of the transformed torsions (normalised units, half-turn = 1)
            that puts this layer's seam at -seam_shift instead of at +-1 (+-pi).
    """

    def __init__(self, transformed: Sequence[int], conditioning: Sequence[int], n_torsions: int,
                 bins: int = 8, width: int = 256, depth: int = 2, conditioner: str = "residual",
                 activation: str = "silu", min_slope: float = 1e-3, seam_shift: float = 0.0):
        super().__init__()
        transformed, conditioning = sorted(transformed), sorted(conditioning)
        self.bins, self.min_slope, self.seam_shift = bins, min_slope, float(seam_shift)
        self.n_periodic = sum(i < n_torsions for i in transformed)
        self.n_cond_periodic = sum(i < n_torsions for i in conditioning)
        self.register_buffer("transformed", torch.tensor(transformed, dtype=torch.long),
                             persistent=False)
        self.register_buffer("conditioning", torch.tensor(conditioning, dtype=torch.long),
                             persistent=False)
        n_in = 2 * self.n_cond_periodic + (len(conditioning) - self.n_cond_periodic) + 1
        n_out = self.n_periodic * 3 * bins + (len(transformed) - self.n_periodic) * (3 * bins + 1)
        self.net = conditioner_network(conditioner, n_in, n_out, width, depth, activation)
        self.register_buffer("output_rows", _output_rows(self.n_periodic, len(transformed), bins),
                             persistent=False)

    def extra_repr(self) -> str:
        return (f"transformed={self.transformed.tolist()}, "
                f"conditioning={self.conditioning.tolist()}, seam_shift={self.seam_shift:.3f}")

    def _network_input(self, w: Tensor, t: Tensor) -> Tensor:
        """The conditioner's input [B, n_in]: cos and sin of the torsions of Y, the bounded
        features of Y (read from w [B, D]), the T feature t [B, 1]."""
        y = w.index_select(1, self.conditioning)
        angle = math.pi * y[:, :self.n_cond_periodic]
        return torch.cat([torch.cos(angle), torch.sin(angle), y[:, self.n_cond_periodic:], t], dim=1)

    def _spline_logits(self, params: Tensor) -> tuple[Tensor, Tensor]:
        """Network output in the order of :attr:`output_rows` [B, rows] -> (bin logits
        [B, K, 2, |X|], slope logits [B, K + 1, |X|])."""
        k, b, n = self.bins, params.shape[0], len(self.transformed)
        # torch.split, not slicing: the backward of a slice zero-fills a tensor of the full size
        bins, slopes = params.split([n * 2 * k, n * (k + 1)], dim=1)
        return bins.view(b, k, 2, n), slopes.view(b, k + 1, n)

    def _spline_logits_at(self, w: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """The spline logits of this layer (bin logits [B, K, 2, |X|], slope logits
        [B, K + 1, |X|]) given w [B, D] (only Y is read) and the T feature t [B, 1]."""
        return self._spline_logits(network_output(self.net, self._network_input(w, t), self.output_rows))

    def _spline_logits_jvp(self, w: Tensor, w_dot: Tensor, t: Tensor, t_dot: Tensor) -> tuple[Tensor, ...]:
        """The spline logits of :meth:`_spline_logits_at` and their tangents (bin logits, slope logits,
        tangent of each), for tangents w_dot [B, D] and t_dot [B, 1] of w and t."""
        h = self._network_input(w, t)
        y_dot = w_dot.index_select(1, self.conditioning)
        p = self.n_cond_periodic
        angle_dot = math.pi * y_dot[:, :p]
        sin, cos = h[:, p:2 * p], h[:, :p]
        h_dot = torch.cat([-sin * angle_dot, cos * angle_dot, y_dot[:, p:], t_dot], dim=1)
        params, params_dot = network_output_jvp(self.net, h, h_dot, self.output_rows)
        return (*self._spline_logits(params), *self._spline_logits(params_dot))

    def _finish(self, w: Tensor, x_new: Tensor) -> Tensor:
        """w [B, D] with the transformed features X replaced by x_new [B, |X|]: torsions
        wrapped onto [-1, 1), bounded features kept in [-1, 1] despite rounding."""
        x_new = _by_kind(x_new, self.n_periodic, lambda x: torch.remainder(x + 1.0, 2.0) - 1.0,
                         lambda x: x.clamp(-1.0, 1.0))
        return w.index_copy(1, self.transformed, x_new)

    def _rotate(self, x: Tensor, shift: float) -> Tensor:
        """Rotate the transformed torsions [B, |X|] by ``shift`` (normalised units) onto
        [-1, 1); bounded columns untouched. A rotation has unit Jacobian."""
        if not self.seam_shift or not self.n_periodic:
            return x
        return _by_kind(x, self.n_periodic, lambda x: torch.remainder(x + shift + 1.0, 2.0) - 1.0,
                        lambda x: x)

    def forward(self, w: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """Data -> base direction: (w', log|det dw'/dw|) with shapes [B, D], [B].

        Torsions are rotated by ``seam_shift`` before the circular spline and back after it,
        so this layer's seam (the fixed point of the spline) lies at -seam_shift."""
        x = self._rotate(w.index_select(1, self.transformed), self.seam_shift)
        x_new, ladj = splines.spline_call(*self._spline_logits_at(w, t), x, self.min_slope)
        return self._finish(w, self._rotate(x_new, -self.seam_shift)), ladj.sum(dim=1)

    def forward_jvp(self, w: Tensor, w_dot: Tensor, t: Tensor,
                    t_dot: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """:meth:`forward` and its directional derivative: (w', log|det dw'/dw|, their
        tangents) with shapes [B, D], [B], [B, D], [B], for w and its tangent w_dot [B, D], the
        T feature t and its tangent t_dot [B, 1]."""
        x_new, ladj, x_new_dot, ladj_dot = splines.spline_call_jvp(
            *self._spline_logits_jvp(w, w_dot, t, t_dot),
            self._rotate(w.index_select(1, self.transformed), self.seam_shift),
            w_dot.index_select(1, self.transformed), self.min_slope)
        return (self._finish(w, self._rotate(x_new, -self.seam_shift)), ladj.sum(dim=1),
                w_dot.index_copy(1, self.transformed, x_new_dot), ladj_dot.sum(dim=1))

    def inverse(self, w: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """Base -> data direction: (w, log|det dw'/dw| of the forward map at the result)."""
        x, ladj = splines.spline_inverse(*self._spline_logits_at(w, t),
                                         self._rotate(w.index_select(1, self.transformed), self.seam_shift),
                                         self.min_slope)
        return self._finish(w, self._rotate(x, -self.seam_shift)), ladj.sum(dim=1)


# ---------------------------------------------------------------------------------------------
# the flow


class TemperatureFlow(nn.Module):
    """Temperature-conditional coupling flow p(z | T) (TRADE, Wahl et al. 2025).

    Args:
        n_torsions: number of torsions (first columns of z, radians on [-pi, pi)).
        n_bounded: number of bounded features (last columns of z, in ``bounded_interval``).
        temperature_range_k: training range (T_min, T_max) in kelvin; defines the temperature
            feature (log T - mid) / half_width, -1 at T_min and +1 at T_max.
        bounded_interval: (low, high), the exact support of every bounded feature.
        layers: layer pattern, see the module docstring; the default is close to the TRADE
            alanine-dipeptide setting: 9 blocks, each also reversed (18 layers).
        bins: spline bins K.
        width, depth: conditioner width and number of hidden layers (mlp) or residual blocks.
        conditioner: ``"residual"`` or ``"mlp"``.
        activation: ``"silu"`` (smooth: TRADE differentiates d log p / dT by parameters),
            ``"relu"``, ``"elu"``, ``"gelu"``, ``"tanh"``.
        torsion_base, bounded_base, base_sigma, base_kappa: see :mod:`trademd.flow.base`.
        reference_temperature_k: T0 of a temperature-scaled base; default sqrt(T_min T_max).
        groups: extra feature groups for the layer pattern, {name: [column indices of z]}.
        min_slope: smallest spline slope.
        torsion_shifts: where each layer's circular splines have their seam: ``"golden"``
            rotates the torsions of layer l by (l x golden ratio mod 1) half-turns x 2, so
            seams are spread over the circle and no torsion mode sits on a seam in every
            layer; ``"none"`` keeps every seam at +-pi (models written before shifts existed).

    >>> flow = TemperatureFlow(2, 3, (250.0, 650.0), width=8, layers=["bounded|torsions"])
    >>> z, logp = flow.sample(5, 300.0)
    >>> torch.allclose(flow.log_prob(z, 300.0), logp, atol=1e-5)
    True
    """

    def __init__(self, n_torsions: int, n_bounded: int,
                 temperature_range_k: Sequence[float],
                 bounded_interval: Sequence[float] = (-1.0, 1.0),
                 layers: Sequence[str] = ("torsions|torsions", "bounded|torsions",
                                          "bounded|bounded") * 3, bins: int = 8, width: int = 256,
                 depth: int = 2, conditioner: str = "residual", activation: str = "silu",
                 torsion_base: str = "uniform", bounded_base: str = "uniform",
                 base_sigma: float = 0.5, base_kappa: float = 1.0,
                 reference_temperature_k: float | None = None, groups: dict | None = None,
                 min_slope: float = 1e-3, torsion_shifts: str = "golden"):
        super().__init__()
        t_min, t_max = (float(t) for t in temperature_range_k)
        low, high = (float(b) for b in bounded_interval)
        if not 0 < t_min < t_max:
            raise TradeMDError(f"temperature range {temperature_range_k} must be 0 < T_min < T_max")
        if not low < high:
            raise TradeMDError(f"bounded interval {bounded_interval} must have low < high")
        if bins < 2 or width < 1 or depth < 0 or n_torsions < 0 or n_bounded < 0:
            raise TradeMDError("bins >= 2, width >= 1, depth >= 0 and feature counts >= 0, please")
        if torsion_shifts not in TORSION_SHIFTS:
            raise TradeMDError(
                f"unknown torsion_shifts {torsion_shifts!r}: use one of {list(TORSION_SHIFTS)}")
        if activation not in ACTIVATIONS:
            raise TradeMDError(
                f"unknown activation {activation!r}: use one of {sorted(ACTIVATIONS)}")
        if reference_temperature_k is None:
            reference_temperature_k = math.sqrt(t_min * t_max)
        groups = {str(k): sorted(int(i) for i in v) for k, v in (groups or {}).items()}
        self.config = {
            "n_torsions": int(n_torsions), "n_bounded": int(n_bounded),
            "temperature_range_k": [t_min, t_max], "bounded_interval": [low, high],
            "layers": [str(s) for s in layers], "bins": int(bins), "width": int(width),
            "depth": int(depth), "conditioner": conditioner, "activation": activation,
            "torsion_base": torsion_base, "bounded_base": bounded_base,
            "base_sigma": float(base_sigma), "base_kappa": float(base_kappa),
            "reference_temperature_k": float(reference_temperature_k), "groups": groups,
            "min_slope": float(min_slope), "torsion_shifts": torsion_shifts,
        }
        self.n_torsions, self.n_bounded = int(n_torsions), int(n_bounded)
        self._log_t_mid = 0.5 * (math.log(t_min) + math.log(t_max))
        self._log_t_half = 0.5 * (math.log(t_max) - math.log(t_min))

        self.base = TemperatureBase(n_torsions, n_bounded, torsion_base, bounded_base,
                                    base_sigma, base_kappa, reference_temperature_k)
        self.layers = nn.ModuleList(
            SplineCoupling(x, y, n_torsions, bins, width, depth, conditioner, activation,
                           min_slope, _seam_shift(torsion_shifts, index))
            for index, (x, y) in enumerate(parse_layers(layers, n_torsions, n_bounded, groups)))
        # normalisation z -> w as Python floats (a float32 buffer would round pi, and .double()
        # would then give torsions a period that is not 2 pi)
        self._centre, self._half = 0.5 * (low + high), 0.5 * (high - low)
        # log-volume of the normalisation, the one constant in the density
        self._log_half_sum = n_torsions * math.log(math.pi) + n_bounded * math.log(self._half)
        # carries the dtype and device of the flow, also for a flow without layers
        self.register_buffer("_anchor", torch.zeros(0), persistent=False)

    # -- conventions -------------------------------------------------------------------------

    @property
    def n_features(self) -> int:
        return self.n_torsions + self.n_bounded

    def temperature_feature(self, temperature_k: Tensor) -> Tensor:
        """The conditioner's temperature input: (log T - mid) / half_width, [B] -> [B, 1]."""
        return ((torch.log(temperature_k) - self._log_t_mid) / self._log_t_half)[:, None]

    def split(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """z [B, D] -> (torsions [B, n_torsions], bounded [B, n_bounded])."""
        return z[:, :self.n_torsions], z[:, self.n_torsions:]

    def join(self, torsions: Tensor, bounded: Tensor) -> Tensor:
        """(torsions, bounded) -> z [B, D]."""
        return torch.cat([torsions, bounded], dim=1)

    def _temperatures(self, temperature_k, n: int) -> Tensor:
        """A float or tensor (scalar or [n]) of kelvin -> tensor [n] (gradients kept)."""
        return per_sample_temperatures(temperature_k, n, self._anchor)

    def _wrap(self, w: Tensor) -> Tensor:
        """Normalised torsions onto [-1, 1); bounded columns untouched."""
        p = self.n_torsions
        return torch.cat([torch.remainder(w[:, :p] + 1.0, 2.0) - 1.0, w[:, p:]], dim=1)

    def _normalise(self, z: Tensor) -> Tensor:
        p = self.n_torsions
        w_t = torch.remainder(z[:, :p] / math.pi + 1.0, 2.0) - 1.0
        return torch.cat([w_t, (z[:, p:] - self._centre) / self._half], dim=1)

    def _denormalise(self, w: Tensor) -> Tensor:
        p = self.n_torsions
        return torch.cat([math.pi * w[:, :p], self._centre + self._half * w[:, p:]], dim=1)

    # -- transforms --------------------------------------------------------------------------

    def _forward_w(self, w: Tensor, temperature_k: Tensor) -> tuple[Tensor, Tensor]:
        t = self.temperature_feature(temperature_k)
        ladj = w.new_zeros(w.shape[0])
        for layer in self.layers:
            w, l = layer(w, t)
            ladj = ladj + l
        return w, ladj

    def _inverse_w(self, w: Tensor, temperature_k: Tensor) -> tuple[Tensor, Tensor]:
        t = self.temperature_feature(temperature_k)
        ladj = w.new_zeros(w.shape[0])
        for layer in reversed(self.layers):
            w, l = layer.inverse(w, t)
            ladj = ladj - l
        return w, ladj

    def forward(self, z: Tensor, temperature_k) -> tuple[Tensor, Tensor]:
        """Data -> base: (u [B, D], log|det du/dz| [B]); u lives in the same units as z."""
        w, ladj = self._forward_w(self._normalise(z), self._temperatures(temperature_k, len(z)))
        return self._denormalise(w), ladj

    def inverse(self, u: Tensor, temperature_k) -> tuple[Tensor, Tensor]:
        """Base -> data: (z [B, D], log|det dz/du| [B])."""
        w, ladj = self._inverse_w(self._normalise(u), self._temperatures(temperature_k, len(u)))
        return self._denormalise(w), ladj

    # -- densities and samples ---------------------------------------------------------------

    def base_log_prob(self, u: Tensor, temperature_k) -> Tensor:
        """log density of the base at u (same units as z) -> [B]."""
        temperature_k = self._temperatures(temperature_k, u.shape[0])
        return self.base.log_prob(self._normalise(u), temperature_k) - self._log_half_sum

    def sample_base(self, n: int, temperature_k) -> Tensor:
        """n base samples u [n, D] (same units as z)."""
        temperature_k = self._temperatures(temperature_k, n)
        w = self.base.sample(n, temperature_k.detach(), self._anchor.dtype, self._anchor.device)
        return self._denormalise(w)

    def log_prob(self, z: Tensor, temperature_k) -> Tensor:
        """log p(z | T) [B] for z [B, D]; temperature_k in kelvin, a float or a tensor [B].

        -inf where a bounded feature lies outside ``bounded_interval``.
        """
        temperature_k = self._temperatures(temperature_k, z.shape[0])
        w = self._normalise(z)
        inside = (w[:, self.n_torsions:].abs() <= 1.0).all(dim=1)
        w, ladj = self._forward_w(w, temperature_k)
        logp = self.base.log_prob(w, temperature_k) - self._log_half_sum + ladj
        return torch.where(inside, logp, torch.full_like(logp, -math.inf))

    def log_prob_dlogt(self, z: Tensor, temperature_k) -> tuple[Tensor, Tensor]:
        """(log p(z | T), d/dlogT log p(z | T) at fixed z), each [B], for z [B, D] and
        temperature_k in kelvin (a float or a tensor [B]).

        The derivative is forward mode: every layer carries the tangent of its output along
        d log T = 1 beside the output (:meth:`SplineCoupling.forward_jvp`), about one extra
        forward pass of plain arithmetic, differentiable in the parameters (TRADE trains on
        it). Where log p is -inf the derivative is 0.
        """
        temperature_k = self._temperatures(temperature_k, z.shape[0])
        w = self._normalise(z)
        inside = (w[:, self.n_torsions:].abs() <= 1.0).all(dim=1)
        t = self.temperature_feature(temperature_k)
        t_dot = torch.full_like(t, 1.0 / self._log_t_half)
        w_dot = torch.zeros_like(w)
        ladj = ladj_dot = w.new_zeros(w.shape[0])
        for layer in self.layers:
            w, l, w_dot, l_dot = layer.forward_jvp(w, w_dot, t, t_dot)
            ladj, ladj_dot = ladj + l, ladj_dot + l_dot
        logp_base, dot_base = self.base.log_prob_dlogt(w, w_dot, temperature_k)
        logp = logp_base - self._log_half_sum + ladj
        return (torch.where(inside, logp, torch.full_like(logp, -math.inf)),
                torch.where(inside, dot_base + ladj_dot, torch.zeros_like(ladj_dot)))

    def rsample(self, n: int, temperature_k) -> tuple[Tensor, Tensor]:
        """n samples and their log p(z | T), differentiable w.r.t. the parameters (reverse KL)."""
        temperature_k = self._temperatures(temperature_k, n)
        w = self.base.sample(n, temperature_k.detach(), self._anchor.dtype, self._anchor.device)
        w = self._wrap(w)  # a float32 cast can round a torsion up to 1
        logp_base = self.base.log_prob(w, temperature_k) - self._log_half_sum
        w, ladj = self._inverse_w(w, temperature_k)
        return self._denormalise(w), logp_base - ladj

    def sample(self, n: int, temperature_k) -> tuple[Tensor, Tensor]:
        """n samples z [n, D] and their log p(z | T) [n], without gradients."""
        with torch.no_grad():
            return self.rsample(n, temperature_k)

    def checkpoint(self) -> dict:
        """{"config": ..., "state_dict": ...}: what :func:`trademd.flow.factory.load_flow` reads back."""
        return {"config": dict(self.config), "state_dict": self.state_dict()}


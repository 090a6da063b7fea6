"""Monotonic rational-quadratic splines of [-1, 1] onto itself (Durkan et al. 2019), evaluated
bin by bin, with their forward-mode derivative.

Reference:
    | Neural Spline Flows (Durkan et al., 2019), https://arxiv.org/abs/1906.04032

A spline of K bins is given by unnormalised parameters, as a conditioner network puts them
out: width and height logits [..., 2, K] and slope logits [..., K + 1]. Bin widths and heights
are a softmax of the squashed logits, the knots their cumulative sums (end knots exactly at -1
and 1), slopes the exponential of the squashed slope logits, bounded to
``[min_slope, 1 / min_slope]``; all-zero parameters give the identity. The spline's arithmetic
follows zuko 1.6's ``MonotonicRQSTransform``.

Speed (docs/performance.md): the bin of a point is searched without gradients, and only the
two knots of that bin enter the differentiated arithmetic: the slopes are squashed after they
are gathered, so no [..., K + 1] tensor is zero-filled or squashed in the backward pass.

Forward mode: given the tangents of the parameters (``tangents``) and of the points, the
``*_jvp`` methods also return the tangents of the outputs (directional derivatives, written
out by hand: one extra pass of plain tensor arithmetic, which reverse-mode autograd then
differentiates like any other; this is how TRADE takes d log p / dT).
"""

import math

import torch
from torch import Tensor, nn

__all__ = ["RationalQuadraticSpline"]


class RationalQuadraticSpline:
    """The splines of a batch of points, one spline per point.

    Args:
        bin_logits: [..., 2, K] width (index 0) and height (index 1) logits of the K bins.
        slope_logits: [..., K + 1] logits of the slopes at the K + 1 knots.
        min_slope: smallest slope, in (0, 1).
        tangents: (tangent of ``bin_logits``, tangent of ``slope_logits``), same shapes, for
            :meth:`call_and_ladj_jvp`; None where no derivative is taken.

    Points are tensors [...] (the parameters' shape without the last axes). A point on or
    outside the first knot, or past the last one, is left unchanged with log|det| 0.

    >>> spline = RationalQuadraticSpline(torch.zeros(3, 2, 8), torch.zeros(3, 9), 1e-3)
    >>> y, ladj = spline.call_and_ladj(torch.tensor([-0.5, 0.0, 0.7]))
    >>> torch.allclose(y, torch.tensor([-0.5, 0.0, 0.7])), torch.allclose(ladj, torch.zeros(3))
    (True, True)
    """

    def __init__(self, bin_logits: Tensor, slope_logits: Tensor, min_slope: float,
                 tangents: tuple[Tensor, Tensor] | None = None):
        self.bins = bin_logits.shape[-1]
        self.log_slope = -math.log(min_slope)
        # squash (zuko's): logits / (1 + |logits| / bound), |result| < bound = log_slope / 2 < 8,
        # so the softmax needs no shift by the maximum
        scale = 1.0 + torch.abs(bin_logits) / (0.5 * self.log_slope)
        weights = torch.exp(bin_logits / scale)
        #: unnormalised cumulative bin widths (index 0) and heights (1) [..., 2, K + 1], from 0:
        #: knot j lies at 2 sums[j] / sums[K] - 1 (exactly -1 and 1 at the ends)
        self.sums = torch.cumsum(nn.functional.pad(weights, (1, 0)), dim=-1)
        self.slope_logits = slope_logits
        self.sums_dot = self.slope_logits_dot = None
        if tangents is not None:
            bin_logits_dot, self.slope_logits_dot = tangents
            weights_dot = weights * bin_logits_dot / scale**2
            self.sums_dot = torch.cumsum(nn.functional.pad(weights_dot, (1, 0)), dim=-1)

    def knots(self) -> tuple[Tensor, Tensor, Tensor]:
        """(horizontal, vertical, slopes), each [..., K + 1]: the knots from -1 to 1 and the
        slopes there."""
        positions = 2.0 * self.sums / self.sums[..., -1:] - 1.0
        scale = 1.0 + torch.abs(self.slope_logits) / self.log_slope
        return positions[..., 0, :], positions[..., 1, :], torch.exp(self.slope_logits / scale)

    # -- the bin of each point ---------------------------------------------------------------

    def _locate(self, axis: int, value: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Where ``value`` [...] lies among the knots of ``axis`` (0: horizontal, 1: vertical),
        without gradients: (inside [...], knots [..., 2], columns [..., 8]). ``inside`` is
        False where ``value`` lies in no bin (the rest then describes a valid bin); ``knots``
        are the indices j, j + 1 of the bin's knots; ``columns`` index :attr:`sums` flattened
        over its last two axes: the two ends of the bin on both axes, then the totals (each
        twice, so every later operation sees tensors of one shape: broadcasting over a short
        last axis is slow on CPUs)."""
        with torch.no_grad():
            sums = self.sums[..., axis, :].contiguous()  # [..., K + 1], from 0 to the total
            # knot j < value  <=>  sums[j] < (value + 1) total / 2; knot 0 is below every value
            # inside, so the bin is the number of knots below, less one
            threshold = (0.5 * (value + 1.0) * sums[..., -1])[..., None]
            k = (torch.searchsorted(sums, threshold).squeeze(-1) - 1).clamp(0, self.bins - 1)
            inside = torch.logical_and(value > -1.0, value <= 1.0)
            knots = torch.stack([k, k + 1], dim=-1)
            width = self.bins + 1
            totals = torch.tensor([width - 1, width - 1, 2 * width - 1, 2 * width - 1], device=k.device)
            columns = torch.cat([knots, knots + width, totals.expand(*k.shape, 4)], dim=-1)
        return inside, knots, columns

    def _bin(self, located: tuple[Tensor, ...]) -> tuple[Tensor, Tensor, Tensor]:
        """(ends [..., 4]: x0, x1, y0, y1 of the located bins; their slopes [..., 2]; the
        totals [..., 4] the ends were divided by)."""
        _, knots, columns = located
        sums, totals = self.sums.flatten(-2).gather(-1, columns).split(4, dim=-1)
        logits = self.slope_logits.gather(-1, knots)
        slopes = torch.exp(logits / (1.0 + torch.abs(logits) / self.log_slope))
        return 2.0 * sums / totals - 1.0, slopes, totals

    def _bin_dot(self, located: tuple[Tensor, ...], bin_values: tuple[Tensor, ...]) -> tuple[Tensor, Tensor]:
        """Tangents of the ends and slopes of :meth:`_bin` (its result ``bin_values``)."""
        _, knots, columns = located
        ends, slopes, totals = bin_values
        sums_dot, totals_dot = self.sums_dot.flatten(-2).gather(-1, columns).split(4, dim=-1)
        ends_dot = 2.0 * (sums_dot - 0.5 * (ends + 1.0) * totals_dot) / totals
        logits = self.slope_logits.gather(-1, knots)
        scale = 1.0 + torch.abs(logits) / self.log_slope
        slopes_dot = slopes * self.slope_logits_dot.gather(-1, knots) / scale**2
        return ends_dot, slopes_dot

    # -- evaluation --------------------------------------------------------------------------

    def call_and_ladj(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(y, log|dy/dx|), both [...], for x [...]."""
        located = self._locate(0, x)
        ends, slopes, _ = self._bin(located)
        y, ladj, _ = _rational_quadratic(x, ends, slopes, located[0])
        return y, ladj

    def call_and_ladj_jvp(self, x: Tensor, x_dot: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(y, log|dy/dx|, tangent of y, tangent of log|dy/dx|), each [...], for x and its
        tangent [...]; needs ``tangents``."""
        located = self._locate(0, x)
        inside = located[0]
        bin_values = self._bin(located)
        ends, slopes = bin_values[:2]
        ends_dot, slopes_dot = self._bin_dot(located, bin_values)
        y, ladj, (s, z, zz, ratio, denominator, m) = _rational_quadratic(x, ends, slopes, inside)
        x0, x1, y0, y1 = ends.unbind(-1)
        x0_dot, x1_dot, y0_dot, y1_dot = ends_dot.unbind(-1)
        d0, d1 = slopes.unbind(-1)
        d0_dot, d1_dot = slopes_dot.unbind(-1)
        width, height = x1 - x0, y1 - y0
        width_dot, height_dot = x1_dot - x0_dot, y1_dot - y0_dot
        s_dot = (height_dot - s * width_dot) / width
        z_dot = inside * (x_dot - x0_dot - z * width_dot) / width
        one_minus_z = 1 - z
        zz_dot = (one_minus_z - z) * z_dot
        denominator_dot = s_dot + (d0_dot + d1_dot - 2 * s_dot) * zz + (d0 + d1 - 2 * s) * zz_dot
        numerator_dot = s_dot * z**2 + 2 * s * z * z_dot + d0_dot * zz + d0 * zz_dot
        ratio_dot = (numerator_dot - ratio * denominator_dot) / denominator
        y_dot = y0_dot + height_dot * ratio + height * ratio_dot
        m_dot = (2 * (s_dot * zz + s * zz_dot) + d0_dot * one_minus_z**2 + d1_dot * z**2
                 + 2 * (d1 * z - d0 * one_minus_z) * z_dot)
        ladj_dot = 2 * s_dot / s + m_dot / m - 2 * denominator_dot / denominator
        return y, ladj, torch.where(inside, y_dot, x_dot), inside * ladj_dot

    def inverse_and_ladj(self, y: Tensor) -> tuple[Tensor, Tensor]:
        """(x with spline(x) = y, log|dy/dx| at that x), both [...], for y [...]: the root of a
        quadratic in the bin of y, whose knots and slopes also give the log-determinant."""
        located = self._locate(1, y)
        inside = located[0]
        ends, slopes, _ = self._bin(located)
        x0, x1, y0, y1 = ends.unbind(-1)
        d0, d1 = slopes.unbind(-1)
        height = y1 - y0
        s = height / (x1 - x0)
        y_ = inside * (y - y0)
        a = height * (s - d0) + y_ * (d0 + d1 - 2 * s)
        b = height * d0 - y_ * (d0 + d1 - 2 * s)
        c = -s * y_
        z = 2 * c / (-b - (b**2 - 4 * a * c).sqrt())
        zz = z * (1 - z)
        denominator = s + (d0 + d1 - 2 * s) * zz
        m = 2 * s * zz + d0 * (1 - z) ** 2 + d1 * z**2
        ladj = torch.log(s**2 * m / denominator**2)
        return torch.where(inside, x0 + z * (x1 - x0), y), inside * ladj


def _rational_quadratic(x: Tensor, ends: Tensor, slopes: Tensor,
                        inside: Tensor) -> tuple[Tensor, Tensor, tuple[Tensor, ...]]:
    """(y, log|dy/dx|, intermediates) of the bins ``ends`` [..., 4] (x0, x1, y0, y1) with end ``slopes``
    [..., 2] at x [...]; points not ``inside`` are returned unchanged with log|det| 0. The
    intermediates (s, z, z(1 - z), ratio, denominator, m) serve the forward-mode derivative."""
    x0, x1, y0, y1 = ends.unbind(-1)
    d0, d1 = slopes.unbind(-1)
    width, height = x1 - x0, y1 - y0
    s = height / width
    z = inside * (x - x0) / width
    zz = z * (1 - z)
    denominator = s + (d0 + d1 - 2 * s) * zz
    ratio = (s * z**2 + d0 * zz) / denominator
    y = y0 + height * ratio
    m = 2 * s * zz + d0 * (1 - z) ** 2 + d1 * z**2
    ladj = torch.log(s**2 * m / denominator**2)
    return torch.where(inside, y, x), inside * ladj, (s, z, zz, ratio, denominator, m)

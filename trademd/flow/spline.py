"""Monotonic rational-quadratic splines of [-1, 1] onto itself (Durkan et al. 2019), evaluated
bin by bin, with their forward-mode derivative.

Reference:
    | Neural Spline Flows (Durkan et al., 2019), https://arxiv.org/abs/1906.04032

A spline of K bins is given by unnormalised parameters, as a conditioner network puts them
out: width and height logits and slope logits. Bin widths and heights are a softmax of the
squashed logits, the knots their cumulative sums (end knots exactly at -1 and 1), slopes the
exponential of the squashed slope logits, bounded to ``[min_slope, 1 / min_slope]``; all-zero
parameters give the identity. The spline's arithmetic follows zuko 1.6's
``MonotonicRQSTransform``.

Speed (docs/performance.md): the bin of a point is searched without gradients, and only the
two knots of that bin enter the differentiated arithmetic (the slopes are squashed after they
are gathered). The bin axis comes second, [B, K, ...], not last: sums, cumulative sums, flips
and gathers along it then run over contiguous blocks of the trailing axes, where along a short
last axis a CPU runs them 3-7 times slower.

Forward mode: given the tangents of the parameters (``tangents``) and of the points,
:meth:`RationalQuadraticSpline.call_and_ladj_jvp` also returns the tangents of the outputs
(directional derivatives written out by hand: one extra pass of plain tensor arithmetic, which
reverse-mode autograd differentiates like any other; this is how TRADE takes d log p / dT).

The arithmetic of the forward map and of its derivative is written once,
:func:`~trademd.flow.spline_fused.spline_values` and
:func:`~trademd.flow.spline_fused_jvp.spline_values_jvp`: recorded by autograd here (and where
compiled), run unrecorded with hand-written backwards in training (tests compare the two).
"""

import math
import warnings

import torch
from torch import Tensor

from trademd.flow.spline_fused import fused_call, locate, prefix_sums, spline_values
from trademd.flow.spline_fused_jvp import fused_call_jvp, spline_values_jvp

__all__ = ["RationalQuadraticSpline", "spline_call", "spline_call_jvp", "spline_inverse", "compile_splines"]


class RationalQuadraticSpline:
    """The splines of a batch of points, one spline per point.

    Args:
        bin_logits: [B, K, 2, ...] width (index 0 of the third axis) and height (1) logits of
            the K bins.
        slope_logits: [B, K + 1, ...] logits of the slopes at the K + 1 knots.
        min_slope: smallest slope, in (0, 1).
        tangents: (tangent of ``bin_logits``, tangent of ``slope_logits``), same shapes, for
            :meth:`call_and_ladj_jvp`; None where no derivative is taken.

    Points are tensors [B, ...]. A point on or outside the first knot, or past the last one,
    is left unchanged with log|det| 0.

    >>> spline = RationalQuadraticSpline(torch.zeros(1, 8, 2, 3), torch.zeros(1, 9, 3), 1e-3)
    >>> y, ladj = spline.call_and_ladj(torch.tensor([[-0.5, 0.0, 0.7]]))
    >>> torch.allclose(y, torch.tensor([[-0.5, 0.0, 0.7]])), torch.allclose(ladj, torch.zeros(1, 3))
    (True, True)
    """

    def __init__(self, bin_logits: Tensor, slope_logits: Tensor, min_slope: float,
                 tangents: tuple[Tensor, Tensor] | None = None):
        self.bin_logits, self.slope_logits, self.min_slope, self.tangents = bin_logits, slope_logits, min_slope, tangents
        self.bins = bin_logits.shape[1]
        self.log_slope = -math.log(min_slope)
        # squash (zuko's): logits / (1 + |logits| / bound), |result| < bound = log(1 / min_slope)
        # / 2 (3.5 by default), so the softmax needs no shift by the maximum
        scale = 1.0 + torch.abs(bin_logits) / (0.5 * self.log_slope)
        #: unnormalised cumulative bin widths and heights [B, K + 1, 2, ...], from 0: knot j
        #: lies at 2 sums[:, j] / sums[:, K] - 1 (exactly -1 and 1 at the ends)
        self.sums = prefix_sums(torch.exp(bin_logits / scale))

    def knots(self) -> tuple[Tensor, Tensor, Tensor]:
        """(horizontal, vertical, slopes), each [B, K + 1, ...]: the knots from -1 to 1 and
        the slopes there."""
        positions = 2.0 * self.sums / self.sums[:, -1:] - 1.0
        scale = 1.0 + torch.abs(self.slope_logits) / self.log_slope
        return positions[:, :, 0], positions[:, :, 1], torch.exp(self.slope_logits / scale)

    # -- the bin of each point ---------------------------------------------------------------

    def _locate(self, axis: int, value: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Where ``value`` [B, ...] lies among the knots of ``axis`` (0: horizontal, 1:
        vertical), without gradients: (inside [B, ...], knots [B, 2, ...], columns
        [B, 3, 2, ...]). ``inside`` is False where ``value`` lies in no bin (the rest then
        describes a valid bin); ``knots`` are the indices j, j + 1 of the bin's knots,
        ``columns`` the indices j, j + 1 and K of :attr:`sums` (the bin's ends and the total)
        on both axes."""
        inside, knots = locate(self.sums[:, :, axis], value)
        total = torch.full_like(knots[:, :1], self.bins)
        columns = torch.cat([knots, total], dim=1)[:, :, None].expand(-1, -1, 2, *knots.shape[2:]).contiguous()
        return inside, knots, columns

    def _bin(self, located: tuple[Tensor, ...]) -> tuple[Tensor, Tensor, Tensor]:
        """(ends [B, 2 (lower, upper), 2 (x, y), ...] of the located bins, their slopes
        [B, 2, ...], the totals [B, 1, 2, ...] the ends were divided by)."""
        _, knots, columns = located
        sums, totals = self.sums.gather(1, columns).split([2, 1], dim=1)
        logits = self.slope_logits.gather(1, knots)
        slopes = torch.exp(logits / (1.0 + torch.abs(logits) / self.log_slope))
        return 2.0 * sums / totals - 1.0, slopes, totals

    # -- evaluation --------------------------------------------------------------------------

    def call_and_ladj(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(y, log|dy/dx|), both [B, ...], for x [B, ...]
        (:func:`~trademd.flow.spline_fused.spline_values`, recorded by autograd)."""
        return spline_values(self.bin_logits, self.slope_logits, x, self.min_slope)[:2]

    def call_and_ladj_jvp(self, x: Tensor, x_dot: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(y, log|dy/dx|, tangent of y, tangent of log|dy/dx|), each [B, ...], for x and its
        tangent [B, ...]; needs ``tangents``
        (:func:`~trademd.flow.spline_fused_jvp.spline_values_jvp`, recorded by autograd)."""
        return spline_values_jvp(self.bin_logits, self.slope_logits, *self.tangents, x, x_dot, self.min_slope)[:4]

    def inverse_and_ladj(self, y: Tensor) -> tuple[Tensor, Tensor]:
        """(x with spline(x) = y, log|dy/dx| at that x), both [B, ...], for y [B, ...]: the
        root of a quadratic in the bin of y, whose knots and slopes also give the
        log-determinant."""
        located = self._locate(1, y)
        inside = located[0]
        ends, slopes, _ = self._bin(located)
        (x0, y0), (x1, y1) = (end.unbind(1) for end in ends.unbind(1))
        d0, d1 = slopes.unbind(1)
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


def _call(bin_logits: Tensor, slope_logits: Tensor, x: Tensor, min_slope: float) -> tuple[Tensor, Tensor]:
    """:meth:`RationalQuadraticSpline.call_and_ladj` of the spline with these logits."""
    return spline_values(bin_logits, slope_logits, x, min_slope)[:2]


def _call_jvp(bin_logits: Tensor, slope_logits: Tensor, bin_logits_dot: Tensor, slope_logits_dot: Tensor,
              x: Tensor, x_dot: Tensor, min_slope: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """:meth:`RationalQuadraticSpline.call_and_ladj_jvp` of the spline with these logits and tangents."""
    return spline_values_jvp(bin_logits, slope_logits, bin_logits_dot, slope_logits_dot, x, x_dot, min_slope)[:4]


def _inverse(bin_logits: Tensor, slope_logits: Tensor, y: Tensor, min_slope: float) -> tuple[Tensor, Tensor]:
    """:meth:`RationalQuadraticSpline.inverse_and_ladj` of the spline with these logits."""
    return RationalQuadraticSpline(bin_logits, slope_logits, min_slope).inverse_and_ladj(y)


class _CompiledOrEager:
    """``function`` through ``torch.compile`` (shapes dynamic); where compiling fails (no C++
    compiler, an unsupported platform) a one-line warning and ``eager`` (the same function
    without compiling; default ``function`` itself) from then on."""

    def __init__(self, function, eager=None):
        self.function, self.compiled = eager or function, torch.compile(function, dynamic=True)

    def __call__(self, *args):
        if self.compiled is not None:
            try:
                return self.compiled(*args)
            except Exception as error:  # noqa: BLE001 - any failure of the compiler
                warnings.warn(f"torch.compile of the flow's splines failed ({type(error).__name__}: "
                              f"{str(error).splitlines()[0][:200] if str(error) else ''}); "
                              "evaluating them without it", RuntimeWarning, stacklevel=2)
                self.compiled = None
        return self.function(*args)


#: what the coupling layers call (:func:`compile_splines` switches them); eagerly, the forward
#: spline and its forward-mode derivative have hand-written backwards
#: (:mod:`trademd.flow.spline_fused`, :mod:`trademd.flow.spline_fused_jvp`)
spline_call, spline_call_jvp, spline_inverse = fused_call, fused_call_jvp, _inverse


def compile_splines(enabled: bool = True) -> None:
    """Evaluate every spline of this process through ``torch.compile`` (``enabled``) or
    eagerly. Same numbers to float rounding (tests/test_spline_compile.py); 1.13-1.26x per
    training step of the quick preset on a CPU against the eager code before the hand-written
    backwards, after 30-60 s of compiling on first use (cached on disk by torch for later
    runs): docs/performance.md."""
    global spline_call, spline_call_jvp, spline_inverse
    functions = (fused_call, fused_call_jvp, _inverse)
    if enabled:
        # the recorded arithmetic compiles (inductor derives its backward); eager falls back
        # to the hand-written backwards
        functions = (_CompiledOrEager(_call, fused_call), _CompiledOrEager(_call_jvp, fused_call_jvp),
                     _CompiledOrEager(_inverse))
    spline_call, spline_call_jvp, spline_inverse = functions

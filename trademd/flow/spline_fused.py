"""The forward rational-quadratic spline (data -> base direction): its arithmetic, once, and a
hand-written backward for it.

:func:`spline_values` is the arithmetic (``RationalQuadraticSpline.call_and_ladj`` and the
compiled path record it by autograd). What a training step spends on a spline is mostly the
fixed cost of small operations: recorded, about 60 per coupling layer forward and about 100 in
the backward. :func:`fused_call` runs the same arithmetic without recording (the same numbers
to the last bit) with the chain rule written out as its backward: about 45 elementwise
operations on the [B, n] bin quantities, one ``scatter_add`` for the slope logits, and the
gradient of the bin logits in closed form (d sums[j] / d weights[i] = [i < j], so the gradient
of bin i's weight is g_total + g_upper [i <= k] + g_lower [i < k] for a point in bin k: no
cumulative sum).

The backward of the backward (``create_graph=True``, as a test of d log p / dT by reverse mode
does) is taken through the recorded arithmetic, recomputed from the saved inputs: exact, and
as slow as before. Tests (tests/test_spline_fused.py): values bit for bit, gradients against
autograd of the recorded arithmetic, gradcheck and gradgradcheck in float64.
"""

import math

import torch
from torch import Tensor, nn

__all__ = ["fused_call", "spline_values", "prefix_sums", "locate", "bin_weight_gradient", "recorded_gradients"]


def fused_call(bin_logits: Tensor, slope_logits: Tensor, x: Tensor, min_slope: float) -> tuple[Tensor, Tensor]:
    """(y, log|dy/dx|), both [B, ...], of the splines with ``bin_logits`` [B, K, 2, ...] and
    ``slope_logits`` [B, K + 1, ...] at x [B, ...]: the values and gradients of
    :meth:`~trademd.flow.spline.RationalQuadraticSpline.call_and_ladj`."""
    return _FusedSpline.apply(bin_logits, slope_logits, x, min_slope)


def prefix_sums(weights: Tensor) -> Tensor:
    """[B, K, ...] -> [B, K + 1, ...]: 0 and the cumulative sums along the bin axis."""
    return torch.cumsum(nn.functional.pad(weights, (0, 0) * (weights.dim() - 2) + (1, 0)), dim=1)


def locate(sums: Tensor, value: Tensor) -> tuple[Tensor, Tensor]:
    """Where ``value`` [B, ...] lies among the knots of one axis, given that axis's prefix sums
    [B, K + 1, ...] (:func:`prefix_sums`), without gradients: (inside [B, ...], False where it
    lies in no bin; knots [B, 2, ...], the indices j, j + 1 of its bin's knots). Knot j lies
    below the value where sums[j] < (value + 1) total / 2; the bin of a value inside is the
    number of inner knots (j = 1 ... K - 1) below it."""
    with torch.no_grad():
        threshold = 0.5 * (value + 1.0) * sums[:, -1]
        k = torch.sum(sums[:, 1:-1] < threshold[:, None], dim=1)
        inside = torch.logical_and(value > -1.0, value <= 1.0)
        return inside, torch.stack([k, k + 1], dim=1)


def spline_values(bin_logits: Tensor, slope_logits: Tensor, x: Tensor, min_slope: float) -> tuple[Tensor, ...]:
    """(y, log|dy/dx|, what the backward needs): the arithmetic of
    :meth:`~trademd.flow.spline.RationalQuadraticSpline.call_and_ladj`, operation for
    operation (the same numbers to the last bit), recorded by autograd where grad mode is on."""
    log_slope = -math.log(min_slope)
    bin_scale = 1.0 + torch.abs(bin_logits) / (0.5 * log_slope)
    weights = torch.exp(bin_logits / bin_scale)
    sums = prefix_sums(weights)  # [B, K + 1, 2, ...]
    totals = sums[:, -1]  # [B, 2, ...]
    inside, knots = locate(sums[:, :, 0], x)  # knots [B, 2, ...]
    ends = 2.0 * sums.gather(1, knots[:, :, None].expand(-1, -1, 2, *knots.shape[2:])) / totals[:, None] - 1.0
    logits = slope_logits.gather(1, knots)  # [B, 2, ...]
    slope_scale = 1.0 + torch.abs(logits) / log_slope
    slopes = torch.exp(logits / slope_scale)
    x0, y0 = ends[:, 0].unbind(1)
    width, height = (ends[:, 1] - ends[:, 0]).unbind(1)
    d0, d1 = slopes.unbind(1)
    s = height / width
    z = inside * (x - x0) / width
    zz = z * (1.0 - z)
    denominator = s + (d0 + d1 - 2.0 * s) * zz
    ratio = (s * z**2 + d0 * zz) / denominator
    m = 2.0 * s * zz + d0 * (1.0 - z) ** 2 + d1 * z**2
    y = torch.where(inside, y0 + height * ratio, x)
    ladj = inside * torch.log(s**2 * m / denominator**2)
    # d weights / d logits = weights / (1 + |logits| / c)^2, and the same for the slopes
    saved = (weights / bin_scale**2, totals, knots, inside, ends, slopes, slope_scale**2, z, s, denominator, ratio, m)
    return y, ladj, saved


class _FusedSpline(torch.autograd.Function):
    """call_and_ladj with the chain rule written out (module docstring)."""

    @staticmethod
    def forward(ctx, bin_logits: Tensor, slope_logits: Tensor, x: Tensor, min_slope: float):
        y, ladj, saved = spline_values(bin_logits, slope_logits, x, min_slope)
        ctx.min_slope = min_slope
        ctx.save_for_backward(bin_logits, slope_logits, x, *saved)
        return y, ladj

    @staticmethod
    def backward(ctx, grad_y: Tensor, grad_ladj: Tensor):
        (bin_logits, slope_logits, x, weights_dot, totals, knots, inside, ends, slopes, slope_scale_squared,
         z, s, denominator, ratio, m) = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph: differentiate the recorded version
            return (*recorded_gradients(spline_values, (bin_logits, slope_logits, x), ctx.min_slope,
                                        (grad_y, grad_ladj), ctx.needs_input_grad[:3]), None)
        if grad_y is None:
            grad_y = torch.zeros_like(x)
        if grad_ladj is None:
            grad_ladj = torch.zeros_like(x)
        width, height = (ends[:, 1] - ends[:, 0]).unbind(1)
        d0, d1 = slopes.unbind(1)
        grad_y_in = torch.where(inside, grad_y, 0.0)
        grad_ladj_in = torch.where(inside, grad_ladj, 0.0)
        one_minus_z = 1.0 - z
        one_minus_2z = one_minus_z - z
        zz = z * one_minus_z
        # y = y0 + height num / den, ladj = 2 log s + log m - 2 log den
        grad_numerator = (grad_y_in * height).div_(denominator)
        grad_denominator = torch.addcmul((grad_ladj_in * -2.0).div_(denominator), grad_numerator, ratio, value=-1.0)
        grad_m = grad_ladj_in / m
        two_zz = 2.0 * zz
        grad_s = (grad_numerator * z * z).addcmul_(grad_denominator, 1.0 - two_zz).addcmul_(grad_m, two_zz)
        grad_s.add_(grad_ladj_in.div(s).mul_(2.0))
        grad_z = (grad_numerator * torch.addcmul(d0 * one_minus_2z, s, z, value=2.0))
        grad_z.addcmul_(grad_denominator, (d0 + d1).sub_(s, alpha=2.0).mul_(one_minus_2z))
        grad_z.addcmul_(grad_m, torch.addcmul(d1 * z, d0, one_minus_z, value=-1.0).addcmul_(s, one_minus_2z).mul_(2.0))
        grad_d0 = (grad_numerator + grad_denominator).mul_(zz).addcmul_(grad_m, one_minus_z * one_minus_z)
        grad_d1 = (grad_denominator * zz).addcmul_(grad_m, z * z)
        # s = height / width, z = (x - x0) / width
        grad_height = torch.addcmul(grad_s / width, grad_y_in, ratio)
        grad_width = torch.addcmul(grad_s * s, grad_z, z).div_(width).neg_()
        grad_z_over_width = grad_z / width
        grad_x = torch.where(inside, grad_z_over_width, grad_y)
        grad_ends = torch.stack([torch.stack([grad_z_over_width.neg_().sub_(grad_width), grad_y_in - grad_height], dim=1),
                                 torch.stack([grad_width, grad_height], dim=1)], dim=1)  # [B, 2, 2, ...]
        grad_slope_logits = torch.zeros_like(slope_logits).scatter_add_(
            1, knots, torch.stack([grad_d0, grad_d1], dim=1).mul_(slopes).div_(slope_scale_squared))
        # ends = 2 sums / total - 1 -> the sums at the knots k, k + 1 and the total
        grad_total = (grad_ends * (ends + 1.0)).sum(dim=1).div_(totals).neg_()
        grad_sums = grad_ends.mul_(2.0).div_(totals[:, None])
        return bin_weight_gradient(grad_total, grad_sums, knots, bin_logits.shape[1]).mul_(weights_dot), grad_slope_logits, grad_x, None


def bin_weight_gradient(grad_total: Tensor, grad_sums: Tensor, knots: Tensor, bins: int) -> Tensor:
    """The gradient [B, K, 2, ...] of the K bin weights (widths and heights) given those of
    their total, ``grad_total`` [B, 2, ...], and of their prefix sums at each point's knots k
    and k + 1 (``knots`` [B, 2, ...]), ``grad_sums`` [B, 2, 2, ...]: the sum at knot j holds
    the bins i < j, so bin i gets g_total + g_upper [i <= k] + g_lower [i < k]."""
    bin_index = torch.arange(bins, device=knots.device).view(1, -1, *([1] * (knots.dim() - 2)))
    k = knots[:, :1]
    lower = (bin_index < k).unsqueeze(2).to(grad_total.dtype)  # [B, K, 1, ...]
    upper = (bin_index <= k).unsqueeze(2).to(grad_total.dtype)
    return torch.addcmul(torch.addcmul(grad_total[:, None], grad_sums[:, 1:2], upper), grad_sums[:, 0:1], lower)


def recorded_gradients(values, inputs: tuple[Tensor, ...], min_slope: float, grads: tuple[Tensor | None, ...],
                       needs_input_grad: tuple[bool, ...]) -> tuple[Tensor | None, ...]:
    """The gradients of ``inputs`` by the autograd graph of ``values(*inputs, min_slope)`` (whose
    leading results are the outputs that ``grads`` belong to), themselves differentiable: the
    backward of a backward (``create_graph=True``)."""
    inputs = [t if t.requires_grad else t.detach().requires_grad_(True) for t in inputs]
    outputs = values(*inputs, min_slope)
    pairs = [(out, grad) for out, grad in zip(outputs, grads) if grad is not None]
    result = torch.autograd.grad([o for o, _ in pairs], inputs, [g for _, g in pairs], create_graph=True,
                                 allow_unused=True)
    return tuple(g if needed else None for g, needed in zip(result, needs_input_grad))

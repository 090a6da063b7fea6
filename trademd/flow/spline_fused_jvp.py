"""The forward spline and its forward-mode derivative (TRADE's d log p / dlogT): their
arithmetic, once, and a hand-written backward for them.

:func:`spline_values_jvp` returns y, log|dy/dx| and their tangents along given tangents of the
logits and of x (``RationalQuadraticSpline.call_and_ladj_jvp`` and the compiled path record
it); a TRADE step differentiates all four by reverse mode, through about 150 recorded
operations per coupling layer. :func:`fused_call_jvp` runs the same arithmetic without
recording (the same numbers to the last bit), with the reverse sweep written out, node by node,
over the per-point quantities (bin ends and slopes and their tangents), then the closed-form
gradients of the prefix sums (:func:`~trademd.flow.spline_fused.bin_weight_gradient`) and of the
squashed logits. Where a backward itself is differentiated (``create_graph=True``), the
recorded arithmetic is differentiated instead (exact, as slow as before).

Tested against autograd of the recorded arithmetic (tests/test_spline_fused.py: gradcheck and
gradgradcheck in float64 over all six inputs and four outputs).
"""

import math

import torch
from torch import Tensor

from trademd.flow.spline_fused import bin_weight_gradient, locate, prefix_sums, recorded_gradients

__all__ = ["fused_call_jvp", "spline_values_jvp"]


def fused_call_jvp(bin_logits: Tensor, slope_logits: Tensor, bin_logits_dot: Tensor, slope_logits_dot: Tensor,
                   x: Tensor, x_dot: Tensor, min_slope: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(y, log|dy/dx|, tangent of y, tangent of log|dy/dx|), each [B, ...], of the splines with
    ``bin_logits`` [B, K, 2, ...] and ``slope_logits`` [B, K + 1, ...] (tangents of the same
    shapes) at x [B, ...] with tangent ``x_dot``: the values and gradients of
    :meth:`~trademd.flow.spline.RationalQuadraticSpline.call_and_ladj_jvp`."""
    return _FusedSplineJvp.apply(bin_logits, slope_logits, bin_logits_dot, slope_logits_dot, x, x_dot, min_slope)


def spline_values_jvp(bin_logits: Tensor, slope_logits: Tensor, bin_logits_dot: Tensor, slope_logits_dot: Tensor,
                       x: Tensor, x_dot: Tensor, min_slope: float) -> tuple[Tensor, ...]:
    """(y, ladj, y_dot, ladj_dot, what the backward needs): the arithmetic of
    ``call_and_ladj_jvp`` operation for operation, recorded by autograd where grad mode is on."""
    log_slope = -math.log(min_slope)
    bin_scale = 1.0 + torch.abs(bin_logits) / (0.5 * log_slope)
    weights = torch.exp(bin_logits / bin_scale)
    sums = prefix_sums(weights)
    weights_dot = weights * bin_logits_dot / bin_scale**2
    sums_dot = prefix_sums(weights_dot)
    totals, totals_dot = sums[:, -1], sums_dot[:, -1]  # [B, 2, ...]
    inside, knots = locate(sums[:, :, 0], x)  # knots [B, 2, ...]
    columns = knots[:, :, None].expand(-1, -1, 2, *knots.shape[2:])
    ends = 2.0 * sums.gather(1, columns) / totals[:, None] - 1.0  # [B, 2 (lower, upper), 2 (x, y), ...]
    ends_dot = 2.0 * (sums_dot.gather(1, columns) - 0.5 * (ends + 1.0) * totals_dot[:, None]) / totals[:, None]
    logits = slope_logits.gather(1, knots)
    slope_scale = 1.0 + torch.abs(logits) / log_slope
    slopes = torch.exp(logits / slope_scale)
    logits_dot = slope_logits_dot.gather(1, knots)
    slopes_dot = slopes * logits_dot / slope_scale**2
    (x0, y0), (x1, y1) = (end.unbind(1) for end in ends.unbind(1))
    (x0_dot, y0_dot), (x1_dot, y1_dot) = (end.unbind(1) for end in ends_dot.unbind(1))
    d0, d1 = slopes.unbind(1)
    d0_dot, d1_dot = slopes_dot.unbind(1)
    width, height = x1 - x0, y1 - y0
    s = height / width
    z = inside * (x - x0) / width
    zz = z * (1 - z)
    denominator = s + (d0 + d1 - 2 * s) * zz
    ratio = (s * z**2 + d0 * zz) / denominator
    y = torch.where(inside, y0 + height * ratio, x)
    m = 2 * s * zz + d0 * (1 - z) ** 2 + d1 * z**2
    ladj = inside * torch.log(s**2 * m / denominator**2)
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
    saved = (weights, bin_scale, totals, totals_dot, knots, inside, ends, ends_dot, slopes, slopes_dot, logits,
             logits_dot, slope_scale, z, z_dot, s, s_dot, denominator, denominator_dot, ratio, ratio_dot, m, m_dot)
    return y, ladj, torch.where(inside, y_dot, x_dot), inside * ladj_dot, saved


class _FusedSplineJvp(torch.autograd.Function):
    """call_and_ladj_jvp with the reverse sweep written out (module docstring)."""

    @staticmethod
    def forward(ctx, bin_logits, slope_logits, bin_logits_dot, slope_logits_dot, x, x_dot, min_slope):
        *outputs, saved = spline_values_jvp(bin_logits, slope_logits, bin_logits_dot, slope_logits_dot, x, x_dot,
                                            min_slope)
        ctx.min_slope = min_slope
        ctx.save_for_backward(bin_logits, slope_logits, bin_logits_dot, slope_logits_dot, x, x_dot, *saved)
        return tuple(outputs)

    @staticmethod
    def backward(ctx, grad_y, grad_ladj, grad_y_dot, grad_ladj_dot):
        inputs, saved = ctx.saved_tensors[:6], ctx.saved_tensors[6:]
        grads = (grad_y, grad_ladj, grad_y_dot, grad_ladj_dot)
        if torch.is_grad_enabled():  # create_graph: differentiate the recorded version
            return (*recorded_gradients(spline_values_jvp, inputs, ctx.min_slope, grads, ctx.needs_input_grad[:6]),
                    None)
        grads = [torch.zeros_like(inputs[4]) if g is None else g for g in grads]
        return (*_reverse_sweep(inputs, saved, ctx.min_slope, *grads), None)


def _reverse_sweep(inputs, saved, min_slope, grad_y, grad_ladj, grad_y_dot, grad_ladj_dot):
    """The gradients of the six inputs of :func:`spline_values_jvp` given those of its four
    outputs: the forward's per-point steps in reverse order, each line the chain rule of one."""
    bin_logits, slope_logits, bin_logits_dot, slope_logits_dot, x, x_dot = inputs
    (weights, bin_scale, totals, totals_dot, knots, inside, ends, ends_dot, slopes, slopes_dot, logits, logits_dot,
     slope_scale, z, z_dot, s, s_dot, den, den_dot, ratio, ratio_dot, m, m_dot) = saved
    log_slope = -math.log(min_slope)
    (x0, y0), (x1, y1) = (end.unbind(1) for end in ends.unbind(1))
    (x0_dot, y0_dot), (x1_dot, y1_dot) = (end.unbind(1) for end in ends_dot.unbind(1))
    d0, d1 = slopes.unbind(1)
    d0_dot, d1_dot = slopes_dot.unbind(1)
    width, height = x1 - x0, y1 - y0
    width_dot, height_dot = x1_dot - x0_dot, y1_dot - y0_dot
    inv_width, inv_den, inv_m = width.reciprocal(), den.reciprocal(), m.reciprocal()
    one_minus_z = 1 - z
    zz = z * one_minus_z
    one_minus_2z = one_minus_z - z
    zz_dot = one_minus_2z * z_dot
    a = (d0 + d1).sub_(s, alpha=2)
    a_dot = (d0_dot + d1_dot).sub_(s_dot, alpha=2)
    # cotangents of the outputs, inside the spline's interval (outside: y = x, y_dot = x_dot)
    g_y, g_ladj = grad_y * inside, grad_ladj * inside
    g_y_dot, g_ladj_dot = grad_y_dot * inside, grad_ladj_dot * inside
    # ladj_dot = 2 s_dot / s + m_dot / m - 2 den_dot / den; ladj = 2 log s + log m - 2 log den
    g_s_dot = 2 * g_ladj_dot / s
    g_s = (2 * g_ladj).sub_(g_s_dot * s_dot).div_(s)
    g_m_dot = g_ladj_dot * inv_m
    g_m = (g_ladj - g_m_dot * m_dot).mul_(inv_m)
    g_den_dot = -2 * g_ladj_dot * inv_den
    g_den = (g_den_dot * den_dot).add_(2 * g_ladj).mul_(-inv_den)
    # m_dot = 2 (s_dot zz + s zz_dot) + d0_dot (1 - z)^2 + d1_dot z^2 + 2 (d1 z - d0 (1 - z)) z_dot
    g_s_dot.addcmul_(g_m_dot, zz, value=2)
    g_zz = 2 * g_m_dot * s_dot
    g_s.addcmul_(g_m_dot, zz_dot, value=2)
    g_zz_dot = 2 * g_m_dot * s
    g_d0_dot = g_m_dot * one_minus_z**2
    g_d1_dot = g_m_dot * z**2
    slope_mix = (d1 * z).sub_(d0 * one_minus_z)
    g_z = g_m_dot * (d1_dot * z).sub_(d0_dot * one_minus_z).add_((d1 + d0).mul_(z_dot)).mul_(2)
    g_d1 = 2 * g_m_dot * z * z_dot
    g_d0 = -2 * g_m_dot * one_minus_z * z_dot
    g_z_dot = 2 * g_m_dot * slope_mix
    # y_dot = y0_dot + height_dot ratio + height ratio_dot; ratio_dot = (num_dot - ratio den_dot) / den
    g_height_dot = g_y_dot * ratio
    g_ratio = g_y_dot * height_dot
    g_height = g_y_dot * ratio_dot
    g_num_dot = g_y_dot * height * inv_den
    g_ratio.sub_(g_num_dot * den_dot)
    g_den_dot.sub_(g_num_dot * ratio)
    g_den.sub_(g_num_dot * ratio_dot)
    # num_dot = s_dot z^2 + 2 s z z_dot + d0_dot zz + d0 zz_dot
    g_s_dot.addcmul_(g_num_dot, z * z)
    g_z.addcmul_(g_num_dot, (s_dot * z).addcmul_(s, z_dot), value=2)
    g_s.addcmul_(g_num_dot, z * z_dot, value=2)
    g_z_dot.addcmul_(g_num_dot, s * z, value=2)
    g_d0_dot.addcmul_(g_num_dot, zz)
    g_zz.addcmul_(g_num_dot, d0_dot)
    g_d0.addcmul_(g_num_dot, zz_dot)
    g_zz_dot.addcmul_(g_num_dot, d0)
    # den_dot = s_dot + a_dot zz + a zz_dot, a_dot = d0_dot + d1_dot - 2 s_dot, a = d0 + d1 - 2 s
    g_a_dot = g_den_dot * zz
    g_s_dot.add_(g_den_dot).sub_(g_a_dot, alpha=2)
    g_zz.addcmul_(g_den_dot, a_dot)
    g_a = g_den_dot * zz_dot
    g_zz_dot.addcmul_(g_den_dot, a)
    g_d0_dot.add_(g_a_dot)
    g_d1_dot.add_(g_a_dot)
    # zz_dot = (1 - 2 z) z_dot
    g_z.addcmul_(g_zz_dot, z_dot, value=-2)
    g_z_dot.addcmul_(g_zz_dot, one_minus_2z)
    # z_dot = inside (x_dot - x0_dot - z width_dot) / width
    g_x_dot = g_z_dot.mul_(inside).mul_(inv_width)  # g_z_dot / width from here on
    g_x0_dot = -g_x_dot
    g_z.sub_(g_x_dot * width_dot)
    g_width_dot = -g_x_dot * z
    g_width = -g_x_dot * z_dot
    # s_dot = (height_dot - s width_dot) / width
    g_s_dot.mul_(inv_width)  # g_s_dot / width from here on
    g_height_dot.add_(g_s_dot)
    g_s.sub_(g_s_dot * width_dot)
    g_width_dot.sub_(g_s_dot * s)
    g_width.sub_(g_s_dot * s_dot)
    # m = 2 s zz + d0 (1 - z)^2 + d1 z^2
    g_s.addcmul_(g_m, zz, value=2)
    g_zz.addcmul_(g_m, s, value=2)
    g_d0.addcmul_(g_m, one_minus_z**2)
    g_d1.addcmul_(g_m, z**2)
    g_z.addcmul_(g_m, (d1 * z).sub_(d0 * one_minus_z), value=2)
    # y = y0 + height ratio, ratio = num / den, num = s z^2 + d0 zz
    g_height.addcmul_(g_y, ratio)
    g_ratio.addcmul_(g_y, height)
    g_num = g_ratio * inv_den
    g_den.sub_(g_num * ratio)
    g_s.addcmul_(g_num, z * z)
    g_z.addcmul_(g_num, s * z, value=2)
    g_d0.addcmul_(g_num, zz)
    g_zz.addcmul_(g_num, d0)
    # den = s + a zz
    g_s.add_(g_den)
    g_a.addcmul_(g_den, zz)
    g_zz.addcmul_(g_den, a)
    g_d0.add_(g_a)
    g_d1.add_(g_a)
    g_s.sub_(g_a, alpha=2)
    # zz = z (1 - z); z = inside (x - x0) / width; s = height / width
    g_x = g_z.addcmul_(g_zz, one_minus_2z).mul_(inside).mul_(inv_width)  # g_z / width
    g_x0 = -g_x
    g_width.sub_(g_x * z)
    g_s.mul_(inv_width)  # g_s / width
    g_height.add_(g_s)
    g_width.sub_(g_s * s)
    g_y0, g_y0_dot = g_y, g_y_dot
    # width = x1 - x0, height = y1 - y0 and their tangents
    g_ends = torch.stack([torch.stack([g_x0 - g_width, g_y0 - g_height], dim=1),
                          torch.stack([g_width, g_height], dim=1)], dim=1)
    g_ends_dot = torch.stack([torch.stack([g_x0_dot - g_width_dot, g_y0_dot - g_height_dot], dim=1),
                              torch.stack([g_width_dot, g_height_dot], dim=1)], dim=1)
    # slopes = exp(l / c(l)), slopes_dot = slopes l_dot / c(l)^2, c(l) = 1 + |l| / log_slope
    g_slopes = torch.stack([g_d0, g_d1], dim=1)
    g_slopes_dot = torch.stack([g_d0_dot, g_d1_dot], dim=1)
    g_logits_dot = g_slopes_dot * slopes / slope_scale**2
    g_logits = ((g_slopes + g_slopes_dot * logits_dot / slope_scale**2) * slopes / slope_scale**2
                - 2 * g_slopes_dot * slopes_dot / slope_scale * torch.sign(logits) / log_slope)
    grad_slope_logits = torch.zeros_like(slope_logits).scatter_add_(1, knots, g_logits)
    grad_slope_logits_dot = torch.zeros_like(slope_logits_dot).scatter_add_(1, knots, g_logits_dot)
    # ends_dot = 2 (sums_dot - (ends + 1) totals_dot / 2) / totals, ends = 2 sums / totals - 1
    totals_, totals_dot_ = totals[:, None], totals_dot[:, None]
    g_sums_dot = 2 * g_ends_dot / totals_
    g_totals_dot = -(g_ends_dot * (ends + 1)).sum(dim=1) / totals
    g_ends = g_ends - g_ends_dot * totals_dot_ / totals_
    g_totals = -(g_ends_dot * ends_dot).sum(dim=1) / totals
    g_sums = 2 * g_ends / totals_
    g_totals = g_totals - (g_ends * (ends + 1)).sum(dim=1) / totals
    g_weights = bin_weight_gradient(g_totals, g_sums, knots, bin_logits.shape[1])
    g_weights_dot = bin_weight_gradient(g_totals_dot, g_sums_dot, knots, bin_logits.shape[1])
    # weights = exp(b / c(b)), weights_dot = weights b_dot / c(b)^2, c(b) = 1 + |b| / (log_slope / 2)
    # with c' = sign(b) / (log_slope / 2): d weights / db = weights / c^2 and d weights_dot / db =
    # (weights / c^2) (b_dot / c^2) (1 - 2 c c'), so with t = g_weights_dot weights b_dot / c^2:
    weights_over = weights / bin_scale.square()
    grad_bin_logits_dot = g_weights_dot.mul_(weights_over)
    t = grad_bin_logits_dot * bin_logits_dot
    factor = torch.sign(bin_logits).mul_(bin_scale).mul_(-4.0 / log_slope).add_(1.0).div_(bin_scale.square())
    grad_bin_logits = g_weights.mul_(weights_over).addcmul_(t, factor)
    grad_x = torch.where(inside, g_x, grad_y)
    grad_x_dot = torch.where(inside, g_x_dot, grad_y_dot)
    return grad_bin_logits, grad_slope_logits, grad_bin_logits_dot, grad_slope_logits_dot, grad_x, grad_x_dot

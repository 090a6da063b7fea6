"""The splines with hand-written backwards (trademd.flow.spline_fused, spline_fused_jvp) against the
autograd graphs of RationalQuadraticSpline.call_and_ladj and call_and_ladj_jvp: values, gradients,
finite differences and the backward of the backward."""

import pytest
import torch

from trademd.flow import spline as splines
from trademd.flow.conditional import TemperatureFlow
from trademd.flow.spline import RationalQuadraticSpline
from trademd.flow.spline_fused import fused_call
from trademd.flow.spline_fused_jvp import fused_call_jvp

MIN_SLOPE = 1e-3


def _inputs(batch: int = 48, bins: int = 8, features: int = 5, dtype=torch.float64, seed: int = 0):
    """Logits as a conditioner puts them out (some large, so the squash matters) and points
    inside, outside and exactly on the ends of [-1, 1]."""
    generator = torch.Generator().manual_seed(seed)
    bin_logits = 2.0 * torch.randn(batch, bins, 2, features, generator=generator, dtype=dtype)
    slope_logits = 2.0 * torch.randn(batch, bins + 1, features, generator=generator, dtype=dtype)
    x = 2.4 * torch.rand(batch, features, generator=generator, dtype=dtype) - 1.2
    x[0, 0], x[1, 0], x[2, 0] = -1.0, 1.0, 0.0
    return [t.requires_grad_(True) for t in (bin_logits, slope_logits, x)]


def _autograd(bin_logits, slope_logits, x):
    return RationalQuadraticSpline(bin_logits, slope_logits, MIN_SLOPE).call_and_ladj(x)


@pytest.mark.parametrize("dtype, tolerance", [(torch.float64, 1e-12), (torch.float32, 2e-5)])
def test_values_and_gradients_equal_the_autograd_version(dtype, tolerance):
    inputs = _inputs(dtype=dtype)
    expected, fused = _autograd(*inputs), fused_call(*inputs, MIN_SLOPE)
    generator = torch.Generator().manual_seed(1)
    cotangents = [torch.randn(out.shape, generator=generator, dtype=dtype) for out in expected]
    for a, b in zip(expected, fused):  # the same operations in the same order: bit for bit
        assert torch.equal(b, a)
    grads_expected = torch.autograd.grad(expected, inputs, cotangents)
    grads_fused = torch.autograd.grad(fused, inputs, cotangents)
    for a, b in zip(grads_expected, grads_fused):
        scale = float(a.abs().max())
        assert float((a - b).abs().max()) <= tolerance * scale
    # outside [-1, 1] the point passes unchanged: gradient 1 in y, 0 in log|det|
    x = inputs[2]
    outside = (x <= -1.0) | (x > 1.0)
    assert outside.any()
    assert torch.equal(fused[0][outside], x[outside]) and torch.all(fused[1][outside] == 0)


def test_gradients_equal_finite_differences():
    # rows 0-2 hold the points on -1 and 1, where the map is not differentiable
    inputs = [t.detach()[3:9].requires_grad_(True) for t in _inputs()]
    assert torch.autograd.gradcheck(lambda *a: fused_call(*a, MIN_SLOPE), inputs)


def test_only_one_output_used():
    inputs = _inputs()
    for index in (0, 1):
        expected = torch.autograd.grad(_autograd(*inputs)[index].sum(), inputs)
        fused = torch.autograd.grad(fused_call(*inputs, MIN_SLOPE)[index].sum(), inputs)
        for a, b in zip(expected, fused):
            torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-12)


def test_the_backward_of_the_backward_is_the_recorded_one():
    """create_graph=True (a reverse-mode d log p / dT, trained on) differentiates the recorded
    version: second derivatives exact (gradgradcheck) and equal to the autograd version's."""
    inputs = [t.detach()[3:7].requires_grad_(True) for t in _inputs()]
    assert torch.autograd.gradgradcheck(lambda *a: fused_call(*a, MIN_SLOPE), inputs)
    second = []
    for function in (_autograd, lambda *a: fused_call(*a, MIN_SLOPE)):
        y, ladj = function(*inputs)
        (grad_x,) = torch.autograd.grad(ladj.sum() + y.pow(2).sum(), inputs[2], create_graph=True)
        second.append(torch.autograd.grad(grad_x.pow(2).sum(), inputs[:2]))
    for a, b in zip(*second):
        torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-12)


def test_the_flow_trains_the_same_with_either_backward(monkeypatch):
    """A flow's NLL and its parameter gradients through the coupling layers, fused backward
    against the autograd graph (spline_call switched), float64."""
    assert splines.spline_call is fused_call  # what the coupling layers call without compiling
    torch.manual_seed(0)
    flow = TemperatureFlow(3, 4, (300.0, 600.0), width=16).double()
    with torch.no_grad():
        for parameter in flow.parameters():
            parameter.add_(0.1 * torch.randn_like(parameter))
    z = flow.sample(64, 450.0)[0].detach()
    results = []
    for call in (splines._call, fused_call):
        monkeypatch.setattr(splines, "spline_call", call)
        flow.zero_grad()
        loss = -flow.log_prob(z, 450.0).mean()
        loss.backward()
        results.append((loss.detach(), torch.cat([p.grad.ravel() for p in flow.parameters()])))
    (loss_a, grad_a), (loss_b, grad_b) = results
    torch.testing.assert_close(loss_b, loss_a, rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(grad_b, grad_a, rtol=1e-11, atol=1e-11)


# -- the forward-mode derivative (trademd.flow.spline_fused_jvp) -------------------------------


def _jvp_inputs(batch: int = 40, bins: int = 8, features: int = 5, dtype=torch.float64):
    """(bin logits, slope logits, their tangents, x, its tangent), x with points outside
    [-1, 1] and on its ends (rows 0-2)."""
    bin_logits, slope_logits, x = (t.detach() for t in _inputs(batch, bins, features, dtype))
    generator = torch.Generator().manual_seed(2)
    tangents = [torch.randn(t.shape, generator=generator, dtype=dtype) for t in (bin_logits, slope_logits, x)]
    inputs = (bin_logits, slope_logits, tangents[0], tangents[1], x, tangents[2])
    return [t.requires_grad_(True) for t in inputs]


def _autograd_jvp(bin_logits, slope_logits, bin_logits_dot, slope_logits_dot, x, x_dot):
    spline = RationalQuadraticSpline(bin_logits, slope_logits, MIN_SLOPE, tangents=(bin_logits_dot, slope_logits_dot))
    return spline.call_and_ladj_jvp(x, x_dot)


@pytest.mark.parametrize("dtype, tolerance", [(torch.float64, 1e-12), (torch.float32, 2e-5)])
def test_jvp_values_and_gradients_equal_the_autograd_version(dtype, tolerance):
    inputs = _jvp_inputs(dtype=dtype)
    expected, fused = _autograd_jvp(*inputs), fused_call_jvp(*inputs, MIN_SLOPE)
    for a, b in zip(expected, fused):  # the same operations in the same order: bit for bit
        assert torch.equal(b, a)
    generator = torch.Generator().manual_seed(3)
    cotangents = [torch.randn(out.shape, generator=generator, dtype=dtype) for out in expected]
    grads_expected = torch.autograd.grad(expected, inputs, cotangents)
    grads_fused = torch.autograd.grad(fused, inputs, cotangents)
    for a, b in zip(grads_expected, grads_fused):
        assert float((a - b).abs().max()) <= tolerance * float(a.abs().max())
    # each output alone (the others' gradients None)
    for index in range(4):
        expected_one = torch.autograd.grad(_autograd_jvp(*inputs)[index].sum(), inputs, allow_unused=True)
        fused_one = torch.autograd.grad(fused_call_jvp(*inputs, MIN_SLOPE)[index].sum(), inputs, allow_unused=True)
        for a, b in zip(expected_one, fused_one):
            a = torch.zeros_like(b) if a is None else a
            assert float((a - b).abs().max()) <= tolerance * max(1.0, float(a.abs().max()))


def test_jvp_gradients_equal_finite_differences_and_second_derivatives_are_exact():
    inputs = [t.detach()[3:9].requires_grad_(True) for t in _jvp_inputs()]
    assert torch.autograd.gradcheck(lambda *a: fused_call_jvp(*a, MIN_SLOPE), inputs)
    assert torch.autograd.gradgradcheck(lambda *a: fused_call_jvp(*a, MIN_SLOPE), [t[:3] for t in inputs])


def test_the_trade_derivative_trains_the_same_with_either_backward(monkeypatch):
    """log p and d log p / dlogT of a flow (layers mixing torsions and bounded features) and
    the parameter gradient of a TRADE-like loss of both: fused backward against the recorded
    arithmetic, float64."""
    assert splines.spline_call_jvp is fused_call_jvp
    torch.manual_seed(0)
    flow = TemperatureFlow(3, 4, (300.0, 600.0), width=16, layers=["torsions|torsions", "bounded|all"]).double()
    with torch.no_grad():
        for parameter in flow.parameters():
            parameter.add_(0.1 * torch.randn_like(parameter))
    z = flow.sample(64, 450.0)[0].detach()
    temperature = torch.linspace(300.0, 600.0, 64, dtype=torch.float64)
    results = []
    for call in (splines._call_jvp, fused_call_jvp):
        monkeypatch.setattr(splines, "spline_call_jvp", call)
        flow.zero_grad()
        log_p, derivative = flow.log_prob_dlogt(z, temperature)
        (derivative.pow(2).mean() - log_p.mean()).backward()
        results.append((log_p.detach(), derivative.detach(), torch.cat([p.grad.ravel() for p in flow.parameters()])))
    for a, b in zip(*results):
        torch.testing.assert_close(b, a, rtol=1e-11, atol=1e-11)

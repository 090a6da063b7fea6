"""Splines through torch.compile (trademd.flow.spline.compile_splines): the same numbers as
eager evaluation, and a silent-but-warned fall back where compiling fails."""

import pytest
import torch

from trademd.flow import spline as splines
from trademd.flow.conditional import TemperatureFlow
from trademd.training.config import TrainConfig


@pytest.fixture
def eager_afterwards():
    yield
    splines.compile_splines(False)


def _flow() -> TemperatureFlow:
    torch.manual_seed(0)
    flow = TemperatureFlow(3, 4, (300.0, 600.0)).double()
    with torch.no_grad():  # away from the identity, not so far that rounding crosses knots
        for parameter in flow.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    return flow


def _evaluate(flow: TemperatureFlow, z: torch.Tensor) -> list[torch.Tensor]:
    """log p, d log p / dlogT, samples and their log p, and the parameter gradient of them all."""
    flow.zero_grad()
    log_p = flow.log_prob(z, 450.0)
    log_p_again, dlogt = flow.log_prob_dlogt(z, torch.full((len(z),), 450.0, dtype=z.dtype))
    torch.manual_seed(1)
    x, log_q = flow.rsample(16, 500.0)
    (log_p.sum() + dlogt.sum() + log_q.sum() + x.sum()).backward()
    gradient = torch.cat([p.grad.ravel() for p in flow.parameters()])
    return [log_p, log_p_again, dlogt, x, log_q, gradient]


@pytest.mark.slow
def test_compiled_splines_give_the_eager_numbers(eager_afterwards):
    flow = _flow()
    torch.manual_seed(2)
    z = flow.rsample(32, 400.0)[0].detach()
    eager = _evaluate(flow, z)
    splines.compile_splines(True)
    compiled = _evaluate(flow, z)
    for a, b in zip(eager, compiled):
        # float64, a flow near the identity: with steep splines (perturbations of 0.3) fused
        # arithmetic's different rounding moved a point across a knot, where a spline's
        # derivative jumps, and a few gradient entries differed at O(0.1)
        torch.testing.assert_close(b, a, rtol=1e-9, atol=1e-9)


def test_a_failing_compiler_warns_once_and_evaluates_eagerly(monkeypatch, eager_afterwards):
    calls = []

    def broken_compile(function, **options):
        def run(*args):
            calls.append(1)
            raise RuntimeError("no C++ compiler found\nmore detail")
        return run

    monkeypatch.setattr(torch, "compile", broken_compile)
    flow = _flow()
    z = torch.rand(8, 7, dtype=torch.float64) * 2 - 1
    expected = flow.log_prob(z, 450.0)
    splines.compile_splines(True)
    with pytest.warns(RuntimeWarning, match="torch.compile of the flow's splines failed .RuntimeError: no C"):
        got = flow.log_prob(z, 450.0)
    assert torch.equal(got, expected)
    n_calls = len(calls)
    assert torch.equal(flow.log_prob(z, 450.0), expected) and len(calls) == n_calls  # not tried again


def test_the_setting():
    assert TrainConfig(t_min=1.0, t_max=2.0).compile_splines is False
    assert TrainConfig.from_settings({"t_min": 1.0, "t_max": 2.0, "compile_splines": True}).compile_splines

"""The TRADE mathematics against densities known in closed form."""

import math

import pytest
import torch

from trademd.flow.conditional import TemperatureFlow
from trademd.systems.analytic import get_analytic_system
from trademd.training.trade import (
    ExpectationCache,
    dlogp_dlogt,
    log_importance_weights,
    log_spaced_grid,
    model_mean_log_weights,
    residual_loss,
    trade_residual,
    trade_target,
)
from trademd.weights import kish_ess_torch as kish_ess, snis_mean_torch as snis_mean


@pytest.fixture(autouse=True)
def float64_default():
    """These identities are checked in float64; other test modules keep float32."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


def _gaussian_log_prob(x, temperature):
    """Exact log N(x; 0, T I) with differentiable T [B]."""
    d = x.shape[-1]
    return -0.5 * (x**2).sum(-1) / temperature - 0.5 * d * torch.log(2 * math.pi * temperature)


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_target_equals_finite_difference_of_exact_log_density(temperature):
    """u - E[u] equals T d/dT log p(x|T), the latter by central finite differences."""
    system = get_analytic_system("double-well-5d")
    x = system.sample(64, temperature, torch.Generator().manual_seed(0))
    step = 1e-5
    fd = (system.log_prob(x, temperature + step) - system.log_prob(x, temperature - step)) / (2 * step)
    u = system.energy(x) / (system.boltzmann_k * temperature)
    expected_u = system.mean_energy(temperature) / temperature
    assert torch.allclose(temperature * fd, trade_target(u, expected_u), atol=1e-6)


def test_autograd_log_t_derivative_matches_closed_form():
    x = torch.randn(32, 2)
    temperature = torch.rand(32) + 0.5
    derivative = dlogp_dlogt(_gaussian_log_prob, x, temperature)
    closed = 0.5 * (x**2).sum(-1) / temperature - 1.0  # T d/dT log N(x; 0, T I), d = 2
    assert torch.allclose(derivative, closed, atol=1e-12)
    # a model with a log_prob but no log_prob_dlogt of its own (torch.func.jvp of its log_prob)
    model = type("Gaussian", (), {"log_prob": staticmethod(_gaussian_log_prob)})()
    assert torch.allclose(dlogp_dlogt(model, x, temperature), closed, atol=1e-12)


def test_forward_mode_derivative_and_trade_gradient_equal_the_double_backward():
    """The flow's d log p / dlogT by forward mode against reverse mode (autograd.grad with
    create_graph, the double backward used before), on a fixed batch in float64: the
    derivative, the Huber TRADE loss and its gradient w.r.t. every flow parameter."""
    torch.manual_seed(0)
    flow = TemperatureFlow(4, 6, (240.0, 660.0), width=16, bounded_base="truncated_normal",
                           base_sigma=0.3, layers=["torsions|torsions", "bounded|torsions", "bounded|bounded"])
    with torch.no_grad():
        for parameter in flow.parameters():
            parameter.normal_(0.0, 0.1)
    z, _ = flow.sample(128, 450.0)
    temperature = torch.exp(torch.empty(128).uniform_(math.log(240.0), math.log(660.0)))
    u, expected_u = 2.0 * torch.randn(128), torch.zeros(128)

    def loss_and_gradient(derivative):
        loss = residual_loss(trade_residual(derivative, u, expected_u), "huber", 1.0)
        return loss, torch.autograd.grad(loss, list(flow.parameters()))

    reverse_t = temperature.clone().requires_grad_(True)
    (reverse,) = torch.autograd.grad(flow.log_prob(z, reverse_t).sum(), reverse_t, create_graph=True)
    reverse = reverse * temperature
    forward = dlogp_dlogt(flow, z, temperature)
    assert torch.allclose(forward, reverse, rtol=1e-12, atol=1e-12)
    (loss_f, grad_f), (loss_r, grad_r) = loss_and_gradient(forward), loss_and_gradient(reverse)
    assert float(loss_f) == pytest.approx(float(loss_r), rel=1e-12)
    for f, r in zip(grad_f, grad_r):
        assert torch.allclose(f, r, rtol=1e-10, atol=1e-12)


def test_residual_vanishes_for_the_exact_family_with_snis_expectation():
    """Exact model + SNIS expectation from a mismatched proposal: residual ~ 0 within MC error."""
    generator = torch.Generator().manual_seed(1)
    temperature = 2.0
    proposal_scale = 1.3  # samples from N(0, 1.3^2 T): weights are not uniform
    x = torch.randn(200_000, 2, generator=generator) * math.sqrt(temperature) * proposal_scale
    log_proposal = _gaussian_log_prob(x / proposal_scale, torch.tensor(temperature)) - 2 * math.log(proposal_scale)
    u = 0.5 * (x**2).sum(-1) / temperature
    expected_u = snis_mean(u, log_importance_weights(u, log_proposal))
    assert float(expected_u) == pytest.approx(1.0, abs=0.02)  # E[u] = d/2 exactly
    points = torch.randn(16, 2, generator=generator)
    derivative = dlogp_dlogt(_gaussian_log_prob, points, torch.full((16,), temperature))
    residual = trade_residual(derivative, 0.5 * (points**2).sum(-1) / temperature, expected_u)
    assert residual.abs().max() < 0.02


def test_model_mean_leaves_out_clashes_and_nothing_else():
    u = torch.tensor([1.0, 2.0, 3.0, 4.0, 1e6, math.inf, math.nan])
    log_w = model_mean_log_weights(u, cutoff=50.0)
    assert torch.equal(torch.isfinite(log_w), torch.tensor([True] * 4 + [False] * 3))
    assert float(snis_mean(u, log_w)) == pytest.approx(2.5)
    assert not torch.isfinite(model_mean_log_weights(torch.full((3,), math.inf), 50.0)).any()


@pytest.mark.parametrize("expectation", ["model", "snis"])
def test_only_the_model_mean_gives_a_residual_the_flow_can_meet(expectation):
    """A model that is not the target (N(0, 1.3^2 T) for the target N(0, T)): over its own
    samples its d/dlogT log p averages 0 (it is normalised at every T), and so does u - E_p[u]
    with the model's mean, so their residual averages 0; with the SNIS (target) mean the residual
    averages E_q[u] - E_p[u] = -d/2 (1.3^2 - 1) = -0.69, which no normalised model can remove."""
    generator = torch.Generator().manual_seed(2)
    temperature, scale, n = 2.0, 1.3, 200_000
    x = torch.randn(n, 2, generator=generator) * math.sqrt(temperature) * scale

    def model_log_prob(points, t):
        return _gaussian_log_prob(points / scale, t) - 2 * math.log(scale)

    u = 0.5 * (x**2).sum(-1) / temperature
    log_w = log_importance_weights(u, model_log_prob(x, torch.tensor(temperature)))
    mean_log_w = model_mean_log_weights(u, cutoff=50.0) if expectation == "model" else log_w
    derivative = dlogp_dlogt(model_log_prob, x, torch.full((n,), temperature))
    residual = trade_residual(derivative, u, snis_mean(u, mean_log_w))
    standard_error = float(residual.std()) / math.sqrt(n)
    offset = 0.0 if expectation == "model" else -0.5 * 2 * (scale**2 - 1)
    assert float(residual.mean()) == pytest.approx(offset, abs=4 * standard_error + 1e-3)


def test_snis_and_ess_by_hand():
    values = torch.tensor([1.0, 2.0, 3.0, 10.0])
    log_w = torch.log(torch.tensor([1.0, 1.0, 2.0, 0.0]))
    assert float(snis_mean(values, log_w)) == pytest.approx((1 + 2 + 6) / 4)
    assert float(kish_ess(log_w)) == pytest.approx(16 / 6)
    assert float(kish_ess(torch.zeros(10))) == pytest.approx(10)
    with_inf = torch.tensor([0.0, math.inf, math.nan, 0.0])
    assert float(kish_ess(with_inf)) == pytest.approx(2)  # non-finite weights count as zero


def test_residual_loss_kinds():
    residual = torch.tensor([0.5, -3.0])
    assert float(residual_loss(residual, "mse")) == pytest.approx((0.25 + 9) / 2)
    assert float(residual_loss(residual, "huber", 1.0)) == pytest.approx((0.125 + 2.5) / 2)


def test_expectation_cache_ema_and_grid():
    grid = log_spaced_grid(0.5, 2.0, 5)
    assert torch.allclose(grid[[0, 2, 4]], torch.tensor([0.5, 1.0, 2.0]))
    cache = ExpectationCache(grid, momentum=0.75)
    assert not cache.ready
    for k in range(5):
        cache.update(k, 4.0)
    cache.update(1, 8.0)
    cache.update(2, float("nan"))  # ignored
    assert cache.ready
    assert cache.lookup(torch.tensor([0, 1, 2])).tolist() == [4.0, 5.0, 4.0]
    restored = ExpectationCache(grid)
    restored.load_state_dict(cache.state_dict())
    assert torch.equal(restored.expected_u, cache.expected_u)


def test_expectation_cache_trusts_only_estimates_with_effective_samples():
    """The data-free gate: TRADE uses a grid temperature only once its E[u] came from samples
    with a relative ESS above the floor; the latest estimate's ESS counts, NaN never passes."""
    cache = ExpectationCache(log_spaced_grid(0.5, 2.0, 5))
    assert cache.trusted(0.0).tolist() == [0, 1, 2, 3, 4]
    assert cache.trusted(0.01).tolist() == []
    for k, ess in enumerate([0.0, 0.005, 0.02, 0.3, 0.9]):
        cache.update(k, 1.0, ess)
    assert cache.trusted(0.01).tolist() == [2, 3, 4]
    cache.update(2, 1.0, 0.001)  # the flow got worse there
    cache.update(0, float("nan"), 0.5)  # no finite estimate: ESS kept, E[u] not changed
    assert cache.trusted(0.01).tolist() == [0, 3, 4]
    restored = ExpectationCache(cache.temperatures)
    restored.load_state_dict(cache.state_dict())
    assert torch.equal(restored.relative_ess, cache.relative_ess)


def test_analytic_samplers_are_exact():
    """Sample means of U and of x^2 match quadrature and closed forms."""
    generator = torch.Generator().manual_seed(3)
    gaussian = get_analytic_system("gaussian-2d")
    x = gaussian.sample(100_000, 2.0, generator)
    assert float((x**2).mean()) == pytest.approx(2.0, rel=0.02)
    assert gaussian.mean_energy(2.0) == pytest.approx(2.0, rel=1e-6)  # d T / 2
    well = get_analytic_system("double-well-5d")
    y = well.sample(100_000, 1.0, generator)
    assert float(well.energy(y).mean()) == pytest.approx(well.mean_energy(1.0), abs=0.05)
    grid = torch.linspace(-3.5, 3.5, 4001)
    density_1d = torch.exp(-well.energy_1d(grid) / 0.7 - well.log_normaliser_1d(0.7))
    assert float(torch.trapezoid(density_1d, grid)) == pytest.approx(1.0, abs=1e-6)
    outside = torch.full((1, 5), 3.6)
    assert float(well.log_prob(outside, 1.0)) == -math.inf


@pytest.mark.slow
def test_mixture_against_its_closed_forms():
    """Separated modes: (w_i N_i)^(1/T) integrates to w_i^(1/T) (2 pi s^2)^(1 - 1/T) T, so
    mode weights are w_i^(1/T) / sum_j w_j^(1/T) and log Z(T) = log sum_i w_i^(1/T) +
    (1 - 1/T) log(2 pi s^2) + log T, up to the overlap of the tempered modes (4e-7 at T = 2.5,
    where the density between two modes is e^-12.8 of the peak); the sampler draws the modes
    in those proportions with each mode's variance s^2 T."""
    mixture = get_analytic_system("mixture-2d")
    w = torch.tensor(mixture.mode_weights_t0, dtype=torch.float64)
    variance = mixture.sd ** 2
    for temperature in (0.5, 1.0, 2.5):
        expected = w ** (1 / temperature) / (w ** (1 / temperature)).sum()
        assert torch.allclose(mixture.mode_weights(temperature), expected, atol=1e-9)
        log_z = (math.log(float((w ** (1 / temperature)).sum())) + (1 - 1 / temperature)
                 * math.log(2 * math.pi * variance) + math.log(temperature))
        assert mixture.log_normaliser(temperature) == pytest.approx(log_z, abs=1e-6)
    x = mixture.sample(200_000, 2.5, torch.Generator().manual_seed(4))
    counts = torch.bincount(mixture.nearest_mode(x), minlength=4).double() / len(x)
    assert torch.allclose(counts, mixture.mode_weights(2.5), atol=0.005)
    top_right = x[mixture.nearest_mode(x) == 3]
    assert top_right.mean(0).tolist() == pytest.approx([4.0, 4.0], abs=0.01)
    assert top_right.var(0).tolist() == pytest.approx([variance * 2.5] * 2, rel=0.02)
    assert abs(mixture.forward_kl(mixture.log_prob, 1.0)) < 1e-6
    assert float(mixture.log_prob(torch.full((1, 2), 9.5), 1.0)) == -math.inf


def test_durations():
    from trademd.errors import TradeMDError
    from trademd.units import parse_time_ps

    assert parse_time_ps("20ns") == 20000.0
    assert parse_time_ps("500 fs") == pytest.approx(0.5)
    assert parse_time_ps("1.5e1ps") == 15.0
    assert parse_time_ps("0", allow_zero=True) == parse_time_ps("0ps", allow_zero=True) == 0.0
    for bad in ("0ps", "20", "ten ns", "-1ps"):
        with pytest.raises(TradeMDError):
            parse_time_ps(bad)


def test_forward_kl_of_the_analytic_systems_matches_the_gaussian_closed_form():
    """gaussian-2d is N(0, T I): KL(N(0, 1) || N(0, 2)) = 2 x 0.5 (1/2 - 1 + ln 2) per the
    closed form, and the exact density has KL 0 to itself."""
    system = get_analytic_system("gaussian-2d")
    assert abs(system.forward_kl(system.log_prob, 1.0)) < 1e-5
    exact = 2 * 0.5 * (0.5 - 1.0 + math.log(2.0))
    assert system.forward_kl(lambda x, t: system.log_prob(x.double(), 2.0), 1.0) == pytest.approx(exact, abs=0.01)

"""The temperature-conditional flow: exact identities of densities, samples and derivatives."""

import json
import math

import pytest
import torch

from trademd.errors import TradeMDError
from trademd.flow.base import TemperatureBase
from trademd.flow.conditional import TemperatureFlow, parse_layers
from trademd.flow.factory import ConditionalFlow, build_flow, load_flow
from trademd.flow.spline import RationalQuadraticSpline

T_RANGE = (250.0, 650.0)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny networks: one thread is faster, and the machine is shared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_flow(n_torsions, n_bounded, seed=0, scale=0.1, dtype=torch.float64, **kwargs):
    """A tiny flow whose weights are all perturbed away from the identity initialisation."""
    torch.manual_seed(seed)
    kwargs = {"width": 16, "depth": 1, **kwargs}
    flow = TemperatureFlow(n_torsions, n_bounded, T_RANGE, **kwargs).to(dtype)
    with torch.no_grad():
        for p in flow.parameters():
            p.add_(scale * torch.randn_like(p))
    return flow


def random_z(flow, n, seed=1):
    """Uniform points of the domain: torsions in [-pi, pi), bounded in the interval."""
    g = torch.Generator().manual_seed(seed)
    low, high = flow.config["bounded_interval"]
    t = (2 * torch.rand(n, flow.n_torsions, generator=g, dtype=torch.float64) - 1) * math.pi
    b = low + (high - low) * torch.rand(n, flow.n_bounded, generator=g, dtype=torch.float64)
    return torch.cat([t, b], dim=1).to(next(flow.parameters()).dtype)


def grid_1d(low, high, n):
    """Midpoints and cell width of n cells on [low, high]."""
    h = (high - low) / n
    return low + h * (torch.arange(n, dtype=torch.float64) + 0.5), h


def domain(flow):
    """[(low, high)] per feature."""
    interval = tuple(flow.config["bounded_interval"])
    return [(-math.pi, math.pi)] * flow.n_torsions + [interval] * flow.n_bounded


def cell_probabilities(flow, temperature_k, cells, sub):
    """Probability of each cell of a regular grid (``cells`` per axis) by midpoint quadrature
    with ``sub`` points per cell and axis; 1-D or 2-D flows."""
    axes = []
    for low, high in domain(flow):
        x, h = grid_1d(low, high, cells * sub)
        axes.append((x, h))
    points = torch.cartesian_prod(*[x for x, _ in axes]).reshape(-1, len(axes))
    volume = math.prod(h for _, h in axes)
    with torch.no_grad():
        p = torch.exp(flow.log_prob(points, temperature_k)) * volume
    p = p.reshape(*[cells, sub] * len(axes))
    return p.sum(dim=tuple(range(1, 2 * len(axes), 2)))


# ------------------------------------------------------------------------------------------
# conventions and construction


def test_temperature_feature_is_minus_one_to_one_over_the_training_range():
    flow = TemperatureFlow(2, 2, T_RANGE, width=4)
    t = flow.temperature_feature(torch.tensor([250.0, math.sqrt(250.0 * 650.0), 650.0]))
    assert torch.allclose(t.squeeze(1), torch.tensor([-1.0, 0.0, 1.0]), atol=1e-6)


def test_layer_pattern_pairs_each_layer_with_its_reverse():
    pairs = parse_layers(["torsions|torsions", "bounded|torsions", "torsions|torsions",
                          "bonds|all"], 4, 3, groups={"bonds": [4, 5]})
    assert pairs == [([0, 2], [1, 3]), ([1, 3], [0, 2]),       # even/odd positions
                     ([4, 5, 6], [0, 1, 2, 3]), ([0, 1, 2, 3], [4, 5, 6]),
                     ([0, 1], [2, 3]), ([2, 3], [0, 1]),       # second occurrence: halves
                     ([4, 5], [0, 1, 2, 3, 6]), ([0, 1, 2, 3, 6], [4, 5])]
    flow = TemperatureFlow(19, 29, T_RANGE, width=4)
    assert len(flow.layers) == 18
    for spec in ["torsions", "torsions|nothing", "torsions|all|x"]:
        with pytest.raises(TradeMDError):
            parse_layers([spec], 4, 3)
    with pytest.raises(TradeMDError):
        parse_layers(["bonds|bounded"], 4, 3, groups={"bonds": [4]})


def test_identity_at_initialisation():
    torch.manual_seed(0)
    flow = TemperatureFlow(3, 4, T_RANGE, width=8, bounded_interval=(-2.0, 3.0),
                           torsion_base="scaled_von_mises", bounded_base="scaled_truncated_normal",
                           reference_temperature_k=300.0).double()
    z = random_z(flow, 64)
    u, ladj = flow(z, 400.0)
    assert torch.allclose(u, z, rtol=0, atol=1e-13) and ladj.abs().max() < 1e-13
    assert torch.allclose(flow.log_prob(z, 400.0), flow.base_log_prob(z, 400.0), rtol=0, atol=1e-13)
    torch.manual_seed(5)
    samples, logp = flow.sample(256, 400.0)
    torch.manual_seed(5)
    base = flow.sample_base(256, 400.0)
    assert torch.allclose(samples, base, rtol=0, atol=1e-13)
    assert torch.allclose(logp, flow.base_log_prob(base, 400.0), rtol=0, atol=1e-13)


# ------------------------------------------------------------------------------------------
# densities: normalisation and sampling agree at every temperature


@pytest.mark.parametrize("n_torsions, n_bounded, torsion_base, bounded_base", [
    (0, 1, "uniform", "scaled_truncated_normal"),
    (1, 0, "scaled_von_mises", "uniform"),
    (1, 1, "scaled_von_mises", "scaled_truncated_normal"),
    (1, 1, "uniform", "truncated_normal"),
])
def test_density_integrates_to_one_at_several_temperatures(n_torsions, n_bounded, torsion_base,
                                                            bounded_base):
    flow = make_flow(n_torsions, n_bounded, torsion_base=torsion_base, bounded_base=bounded_base,
                     bounded_interval=(0.5, 2.0), reference_temperature_k=300.0)
    cells = 250 if n_torsions + n_bounded == 2 else 4000
    for temperature_k in [250.0, 300.0, 450.0, 900.0]:
        total = cell_probabilities(flow, temperature_k, cells, 1).sum().item()
        assert total == pytest.approx(1.0, abs=2e-3), temperature_k


def chi_square(flow, temperature_k, n=50_000, cells=10, seed=3):
    """Chi-square statistic and degrees of freedom of a sample histogram against quadrature
    cell probabilities; cells expected to hold fewer than 5 samples are pooled into one."""
    expected = n * cell_probabilities(flow, temperature_k, cells, 32).reshape(-1)
    assert expected.sum().item() == pytest.approx(n, rel=1e-3)
    torch.manual_seed(seed)
    z, _ = flow.sample(n, temperature_k)
    index = torch.zeros(n, dtype=torch.long)
    for d, (low, high) in enumerate(domain(flow)):
        k = ((z[:, d] - low) / (high - low) * cells).floor().long().clamp(0, cells - 1)
        index = index * cells + k
    observed = torch.bincount(index, minlength=cells ** flow.n_features).double()
    small = expected < 5
    if small.any():
        expected = torch.cat([expected[~small], expected[small].sum()[None]])
        observed = torch.cat([observed[~small], observed[small].sum()[None]])
    return ((observed - expected) ** 2 / expected).sum().item(), len(expected) - 1


@pytest.mark.slow
def test_samples_follow_the_density_away_from_the_reference_temperature(monkeypatch):
    flow = make_flow(1, 1, torsion_base="scaled_von_mises", bounded_base="scaled_truncated_normal",
                     bounded_interval=(-1.0, 2.0), reference_temperature_k=300.0, base_sigma=0.4,
                     base_kappa=2.0)
    for temperature_k in [600.0, 200.0]:
        chi2, dof = chi_square(flow, temperature_k)
        assert chi2 < dof + 5 * math.sqrt(2 * dof), temperature_k
    # the test has teeth: sampling the base at T0 (the reference code's bug) is caught
    sample = TemperatureBase.sample
    monkeypatch.setattr(TemperatureBase, "sample",
                        lambda self, n, t, *a: sample(self, n, torch.full_like(t, 300.0), *a))
    chi2, dof = chi_square(flow, 600.0)
    assert chi2 > 10 * dof


def test_support_is_exactly_the_interval_and_torsions_are_periodic():
    flow = make_flow(2, 2, bounded_interval=(0.0, 1.0), bounded_base="scaled_truncated_normal")
    z, logp = flow.sample(2000, 500.0)
    torsions, bounded = flow.split(z)
    assert torsions.min() >= -math.pi and torsions.max() < math.pi
    assert bounded.min() >= 0.0 and bounded.max() <= 1.0 and torch.isfinite(logp).all()
    outside = z.clone()
    outside[:10, 2] = 1.0 + 1e-9
    outside[10:20, 3] = -1e-9
    assert torch.isneginf(flow.log_prob(outside[:20], 500.0)).all()
    shifted = z + torch.tensor([2 * math.pi, -4 * math.pi, 0.0, 0.0], dtype=z.dtype)
    assert torch.allclose(flow.log_prob(shifted, 500.0), logp, atol=1e-9)


def test_density_is_continuous_across_the_torsion_seam():
    """Needs circular splines with equal end slopes and cos/sin conditioning on torsions."""
    flow = make_flow(3, 2)
    z = random_z(flow, 50)
    eps = 1e-7
    for d in range(3):
        below, above = z.clone(), z.clone()
        below[:, d], above[:, d] = math.pi - eps, -math.pi + eps
        diff = flow.log_prob(below, 400.0) - flow.log_prob(above, 400.0)
        assert diff.abs().max() < 1e-4, d


# ------------------------------------------------------------------------------------------
# transforms and derivatives


def test_sample_log_prob_matches_log_prob_of_the_sample_float32():
    flow = make_flow(5, 6, dtype=torch.float32, groups={"angles": [5, 6, 7, 8]},
                     layers=["torsions|torsions", "angles|torsions", "angles|all",
                             "bounded|bounded"],
                     bounded_base="scaled_truncated_normal", bounded_interval=(-1.5, 1.5))
    temperatures = torch.linspace(250.0, 650.0, 512)
    z, logp = flow.sample(512, temperatures)
    assert z.dtype == torch.float32
    # float32 carries ~1e-7 relative error per operation: |log p| reaches ~20 here
    assert torch.allclose(flow.log_prob(z, temperatures), logp, atol=1e-5, rtol=2e-6)
    u, _ = flow(z, temperatures)
    back, _ = flow.inverse(u, temperatures)
    assert torch.allclose(back, z, atol=1e-5)


def test_spline_interpolates_its_knots_and_its_log_det_is_the_autograd_derivative():
    """The rational-quadratic spline alone: through every knot with the knot's slope, log|det|
    = log dy/dx by autograd, inverse the inverse, identity outside the bins."""
    g = torch.Generator().manual_seed(3)
    bin_logits = 2.0 * torch.randn(6, 7, 2, 2, generator=g, dtype=torch.float64)  # 7 bins
    slope_logits = 2.0 * torch.randn(6, 8, 2, generator=g, dtype=torch.float64)

    def spline_for(n):  # the same 12 splines (6 x 2), each for n points: points [6, 2, n]
        return RationalQuadraticSpline(bin_logits[..., None].expand(6, 7, 2, 2, n),
                                       slope_logits[..., None].expand(6, 8, 2, n), min_slope=1e-3)

    # each [6, 2, 8]: the knots of the 12 splines
    horizontal, vertical, slopes = (k[..., 0].transpose(1, 2) for k in spline_for(1).knots())
    assert torch.all(horizontal[..., 0] == -1.0) and torch.all(horizontal[..., -1] == 1.0)
    assert torch.all(vertical[..., 0] == -1.0) and torch.all(vertical[..., -1] == 1.0)
    x = (2.0 * torch.rand(6, 2, 500, generator=g, dtype=torch.float64) - 1.0).requires_grad_(True)
    y, ladj = spline_for(500).call_and_ladj(x)
    (slope,) = torch.autograd.grad(y.sum(), x)
    assert torch.all(slope > 0) and torch.all(y.abs() <= 1.0)
    assert torch.allclose(ladj, slope.log(), rtol=0, atol=1e-12)
    back, back_ladj = spline_for(500).inverse_and_ladj(y.detach())
    assert torch.allclose(back, x.detach(), rtol=0, atol=1e-12)
    assert torch.allclose(back_ladj, ladj.detach(), rtol=0, atol=1e-10)
    # every knot but the first (a point on it lies in no bin: left as it is) and its slope
    knot_x = horizontal[..., None, 1:].clone().requires_grad_(True)
    knot_y, knot_ladj = spline_for(7).call_and_ladj(knot_x[..., 0, :])
    (knot_slope,) = torch.autograd.grad(knot_y.sum(), knot_x)
    assert torch.allclose(knot_y, vertical[..., 1:], rtol=0, atol=1e-14)
    assert torch.allclose(knot_slope[..., 0, :], slopes[..., 1:], rtol=1e-12, atol=0)
    assert torch.allclose(knot_ladj, slopes[..., 1:].log(), rtol=0, atol=1e-12)
    assert torch.allclose(spline_for(7).inverse_and_ladj(vertical[..., 1:])[0], horizontal[..., 1:],
                          rtol=0, atol=1e-14)
    outside = torch.tensor([-1.5, -1.0, 1.25], dtype=torch.float64).expand(6, 2, 3)
    y_out, ladj_out = spline_for(3).call_and_ladj(outside)
    assert torch.equal(y_out, outside) and torch.equal(ladj_out, torch.zeros_like(outside))
    x_out, ladj_out = spline_for(3).inverse_and_ladj(outside)
    assert torch.equal(x_out, outside) and torch.equal(ladj_out, torch.zeros_like(outside))


@pytest.mark.parametrize("conditioner", ["residual", "mlp"])
def test_log_det_matches_the_autograd_jacobian(conditioner):
    flow = make_flow(3, 3, conditioner=conditioner, depth=2, bounded_interval=(-0.5, 2.5))
    for z in random_z(flow, 4):
        z = z[None]
        _, ladj = flow(z, 333.0)
        jacobian = torch.autograd.functional.jacobian(lambda x: flow(x, 333.0)[0], z)
        _, logdet = torch.linalg.slogdet(jacobian.reshape(6, 6))
        assert abs(logdet.item() - ladj.item()) < 1e-8
        # and the inverse map inverts the forward map, with the opposite log-determinant
        u, _ = flow(z, 333.0)
        back, ladj_inverse = flow.inverse(u, 333.0)
        assert torch.allclose(back, z, atol=1e-10)
        assert abs(ladj_inverse.item() + ladj.item()) < 1e-8


def _dlogp_dT(flow, z, temperature_k, create_graph=True):
    """(log p(z | T) [B], d log p / dT [B] in 1/K) by autograd through the public log_prob."""
    temperature_k = temperature_k.detach().clone().requires_grad_(True)
    logp = flow.log_prob(z, temperature_k)
    (grad,) = torch.autograd.grad(logp.sum(), temperature_k, create_graph=create_graph)
    return logp, grad


def test_dlogp_dT_matches_central_finite_differences():
    flow = make_flow(2, 3, torsion_base="scaled_von_mises", bounded_base="scaled_truncated_normal",
                     reference_temperature_k=400.0)
    z = random_z(flow, 32)
    temperatures = torch.linspace(260.0, 640.0, 32, dtype=torch.float64)
    logp, grad = _dlogp_dT(flow, z, temperatures)
    h = 1e-3
    with torch.no_grad():
        fd = (flow.log_prob(z, temperatures + h) - flow.log_prob(z, temperatures - h)) / (2 * h)
    assert torch.allclose(grad, fd, rtol=1e-6, atol=1e-9)
    assert torch.allclose(logp, flow.log_prob(z, temperatures))
    # create_graph: the derivative can be trained
    grad.pow(2).sum().backward()
    assert all(p.grad is not None for p in flow.parameters())
    assert sum(p.grad.abs().sum() for p in flow.parameters()) > 0
    # a scalar temperature tensor is every sample's: its derivative is the sum of theirs
    scalar = torch.tensor(300.0, dtype=torch.float64)
    logp_scalar, grad_scalar = _dlogp_dT(flow, z[:3], scalar, create_graph=False)
    logp_each, grad_each = _dlogp_dT(flow, z[:3], torch.full((3,), 300.0, dtype=torch.float64))
    assert torch.equal(logp_scalar, logp_each) and torch.equal(logp_scalar, flow.log_prob(z[:3], 300.0))
    assert torch.allclose(grad_scalar, grad_each.sum())


@pytest.mark.parametrize("activation, conditioner, torsion_base, bounded_base", [
    ("silu", "residual", "uniform", "truncated_normal"),
    ("relu", "mlp", "scaled_von_mises", "scaled_truncated_normal"),
    ("elu", "residual", "von_mises", "uniform"),
    ("gelu", "mlp", "uniform", "scaled_truncated_normal"),
    ("tanh", "residual", "scaled_von_mises", "truncated_normal"),
])
def test_log_prob_dlogt_is_the_autograd_derivative(activation, conditioner, torsion_base, bounded_base):
    """Forward mode by hand (every activation, conditioner and base; layers that mix torsions
    and bounded features) against reverse-mode autograd: log p, d log p / dlogT and the
    parameter gradient of a loss of both; the derivative is 0 outside the support."""
    flow = make_flow(3, 4, scale=0.2, activation=activation, conditioner=conditioner, depth=2,
                     torsion_base=torsion_base, bounded_base=bounded_base, bounded_interval=(-1.5, 2.0),
                     layers=["torsions|torsions", "bounded|torsions", "bounded|all", "torsions|all"])
    z = random_z(flow, 64)
    z[0, 4] = 5.0  # outside the interval
    temperatures = torch.linspace(250.0, 650.0, 64, dtype=torch.float64)
    logp, grad = _dlogp_dT(flow, z, temperatures)
    logp_forward, derivative = flow.log_prob_dlogt(z, temperatures)
    assert torch.equal(torch.isfinite(logp), torch.isfinite(logp_forward)) and logp[0] == -math.inf
    inside = torch.isfinite(logp)
    assert torch.allclose(logp_forward[inside], logp[inside], rtol=1e-13, atol=1e-12)
    assert torch.allclose(derivative, grad * temperatures, rtol=1e-12, atol=1e-12) and derivative[0] == 0

    def parameter_gradient(logp, derivative):
        loss = derivative.pow(2).mean() - logp[inside].mean()
        return torch.autograd.grad(loss, list(flow.parameters()))

    for a, b in zip(parameter_gradient(logp_forward, derivative), parameter_gradient(logp, grad * temperatures)):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-12)


def test_rsample_is_differentiable_in_the_parameters():
    flow = make_flow(2, 2)
    z, logp = flow.rsample(64, 400.0)
    (z.sum() + logp.sum()).backward()
    grads = [p.grad for p in flow.parameters()]
    assert all(g is not None for g in grads) and sum(g.abs().sum() for g in grads) > 0


# ------------------------------------------------------------------------------------------
# save/load and devices


def test_checkpoint_round_trip(tmp_path):
    flow = make_flow(3, 2, dtype=torch.float32, bounded_interval=(0.0, 3.0), layers=["bounded|all"],
                     groups={"pair": [0, 1]}, bounded_base="truncated_normal")
    path = tmp_path / "model.pt"
    torch.save(flow.checkpoint(), path)
    checkpoint = torch.load(path, weights_only=True)
    assert json.loads(json.dumps(checkpoint["config"])) == flow.config
    again = load_flow(checkpoint)
    z = random_z(flow, 16)
    assert torch.equal(again.log_prob(z, 321.0), flow.log_prob(z, 321.0))
    assert build_flow(flow.config).config == flow.config
    assert isinstance(again, ConditionalFlow)
    with pytest.raises(TradeMDError):
        build_flow({**flow.config, "hidden": 3})
    double = load_flow(flow.double().checkpoint())
    assert all(p.dtype == torch.float64 for p in double.parameters())
    samples, logp = double.sample(4, 321.0)  # sampled in the flow's dtype
    assert samples.dtype == logp.dtype == torch.float64
    assert torch.equal(double.log_prob(z.double(), 321.0), flow.log_prob(z.double(), 321.0))


@pytest.mark.cuda
def test_cuda_matches_cpu():
    flow = make_flow(3, 2, dtype=torch.float32)
    z = random_z(flow, 16)
    on_gpu = load_flow(flow.checkpoint(), map_location="cuda")
    assert torch.allclose(on_gpu.log_prob(z.cuda(), 400.0).cpu(), flow.log_prob(z, 400.0),
                          atol=1e-5)
    samples, logp = on_gpu.sample(128, torch.full((128,), 400.0, device="cuda"))
    assert samples.is_cuda and torch.allclose(on_gpu.log_prob(samples, 400.0), logp, atol=1e-4)


def test_torsion_seams_are_spread_over_the_circle_and_the_density_stays_continuous():
    flow = make_flow(3, 2, torsion_shifts="golden")
    shifts = [layer.seam_shift for layer in flow.layers]
    assert len(set(round(s, 6) for s in shifts)) == len(shifts)  # no two layers share a seam
    assert all(0.0 <= s < 2.0 for s in shifts)
    # continuity where a layer's seam now lies (-shift, in radians -pi * shift)
    z = random_z(flow, 20)
    eps = 1e-7
    for shift in shifts[1:4]:
        seam = math.remainder(-math.pi * shift, 2 * math.pi)
        for d in range(3):
            below, above = z.clone(), z.clone()
            below[:, d], above[:, d] = seam - eps, seam + eps
            diff = flow.log_prob(below, 400.0) - flow.log_prob(above, 400.0)
            assert diff.abs().max() < 1e-4, (shift, d)
    # "none" is the old behaviour, and model files without the key load as "none"
    plain = make_flow(3, 2, torsion_shifts="none")
    assert all(layer.seam_shift == 0.0 for layer in plain.layers)
    old = plain.checkpoint()
    del old["config"]["torsion_shifts"]
    again = load_flow(old)
    assert torch.equal(again.log_prob(z, 321.0), plain.log_prob(z, 321.0))
    shifted = make_flow(3, 2, torsion_shifts="golden")  # same weights, other seams
    assert not torch.allclose(shifted.log_prob(z, 321.0), plain.log_prob(z, 321.0))
    with pytest.raises(TradeMDError):
        make_flow(3, 2, torsion_shifts="random")

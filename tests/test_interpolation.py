"""The energy-interpolation objective: the continuity residual against an exact pair, the CNF's
density against the exact Gaussian family, and training end to end."""

import csv
import json
import math

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from trademd.cli.app import app
from trademd.errors import TradeMDError
from trademd.flow.cnf import TemperatureCNF, TemperaturePath
from trademd.flow.factory import ConditionalFlow, build_flow, load_flow
from trademd.systems.analytic import get_analytic_system
from trademd.training.interpolation import continuity_residual, divergence, initialise_normaliser_rate
from trademd.training.targets import AnalyticTarget
from trademd.training.config import TrainConfig
from trademd.training.trainer import Trainer

T_MIN, T_MAX, SIGMA, DIM = 0.5, 2.0, 3.0, 2


def harmonic(x, temperature):
    """u = |x|^2 / (2 T): the gaussian-2d system, p(x | T) = N(0, T I)."""
    return 0.5 * x.pow(2).sum(-1) / temperature


def log_scale_rate(path: TemperaturePath, lam, on_temperature_part=None):
    """d log s / d lam of the exact path of the harmonic system, whose p_lam is N(0, s^2 I)
    (at lam = 1 the temperature part's, unless ``on_temperature_part`` says otherwise)."""
    inverse_variance_rate = 1.0 / path.t_max - 1.0 / path.base_sigma**2
    variance_on_base_part = 1.0 / ((1 - lam) / path.base_sigma**2 + lam / path.t_max)
    temperature_part = lam >= 1 if on_temperature_part is None else on_temperature_part
    return torch.where(temperature_part, torch.full_like(lam, -0.5 * path.log_ratio),
                       -0.5 * variance_on_base_part * inverse_variance_rate)


class ExactVelocity(nn.Module):
    """V = (d log s / d lam) x: transports N(0, s(lam)^2 I) exactly."""

    def __init__(self, path: TemperaturePath, factor: float = 1.0):
        super().__init__()
        self.path, self.factor = path, factor

    def forward(self, x, lam, on_temperature_part=None):
        return self.factor * log_scale_rate(self.path, lam, on_temperature_part)[:, None] * x


class ExactRate(nn.Module):
    """c = -d log Z / d lam = -D d log s / d lam."""

    def __init__(self, path: TemperaturePath):
        super().__init__()
        self.path = path

    def forward(self, lam):
        return -DIM * log_scale_rate(self.path, lam)


def exact_cnf(factor: float = 1.0) -> TemperatureCNF:
    model = TemperatureCNF(DIM, (T_MIN, T_MAX), base_sigma=SIGMA, atol=1e-8, rtol=1e-8).double()
    model.velocity = ExactVelocity(model.path, factor)
    model.normaliser_rate = ExactRate(model.path)
    return model


def test_path_ends_and_temperature_part_is_the_boltzmann_family():
    path = TemperaturePath(T_MIN, T_MAX, SIGMA)
    t = torch.tensor([T_MIN, 1.0, T_MAX], dtype=torch.float64)
    lam = path.time(t)
    assert torch.allclose(lam, torch.tensor([2.0, 1.0 + math.log(2) / math.log(4), 1.0], dtype=torch.float64))
    assert torch.allclose(path.temperature(lam), t)
    x = torch.randn(4, DIM, dtype=torch.float64)
    # lam = 0: the base energy; lam = 1: u at T_max; lam in (1, 2]: u at T(lam), and
    # d f / d lam = u log(T_max / T_min) (TRADE's d/dlogT log q = u - E[u], up to the sign of time)
    for value, expected in ((0.0, path.base_energy(x)), (1.0, harmonic(x, T_MAX))):
        lam = torch.full((4,), value, dtype=torch.float64)
        f, _ = path.energy(x, harmonic(x, path.temperature(lam)), lam)
        assert torch.allclose(f, expected)
    lam = torch.full((4,), 1.7, dtype=torch.float64)
    u = harmonic(x, path.temperature(lam))
    f, df = path.energy(x, u, lam)
    eps = 1e-6
    f_plus, _ = path.energy(x, harmonic(x, path.temperature(lam + eps)), lam + eps)
    assert torch.allclose(df, (f_plus - f) / eps, rtol=1e-4)


def test_divergence_matches_the_jacobian_trace():
    x = torch.randn(6, 3, dtype=torch.float64, requires_grad=True)
    matrix = torch.randn(3, 3, dtype=torch.float64)
    velocity = torch.tanh(x @ matrix)
    jacobian = torch.autograd.functional.jacobian(lambda y: torch.tanh(y @ matrix).sum(0), x)
    trace = torch.einsum("ibi->b", jacobian)
    assert torch.allclose(divergence(velocity, x, create_graph=False), trace)


def test_continuity_residual_vanishes_for_the_exact_pair_and_not_otherwise():
    model = exact_cnf()
    generator = torch.Generator().manual_seed(0)
    lam = 2.0 * torch.rand(512, generator=generator, dtype=torch.float64)
    x = 4.0 * torch.randn(512, DIM, generator=generator, dtype=torch.float64)
    residual, _ = continuity_residual(model, harmonic, x, lam, create_graph=False)
    assert residual.abs().max() < 1e-10
    wrong, _ = continuity_residual(exact_cnf(factor=1.1), harmonic, x, lam, create_graph=False)
    assert wrong.abs().mean() > 1e-2


def test_exact_field_gives_the_exact_density_at_every_temperature():
    model = exact_cnf()
    torch.manual_seed(1)
    for temperature in (T_MIN, 0.8, T_MAX):
        x = math.sqrt(temperature) * torch.randn(200, DIM, dtype=torch.float64)
        exact = -0.5 * x.pow(2).sum(-1) / temperature - 0.5 * DIM * math.log(2 * math.pi * temperature)
        assert torch.allclose(model.log_prob(x, temperature), exact, atol=1e-6)
        samples, log_p = model.sample(4000, temperature)
        assert abs(float(samples.var()) / temperature - 1.0) < 0.05
        exact_at_samples = (-0.5 * samples.pow(2).sum(-1) / temperature
                            - 0.5 * DIM * math.log(2 * math.pi * temperature))
        assert torch.allclose(log_p, exact_at_samples, atol=1e-6)


def test_cnf_log_prob_inverts_sample_and_round_trips_through_its_config():
    torch.manual_seed(2)
    model = TemperatureCNF(3, (T_MIN, T_MAX), base_sigma=2.0, width=16, depth=2, atol=1e-9,
                           rtol=1e-9).double()
    for parameter in model.velocity.parameters():  # a field that is not zero
        nn.init.normal_(parameter, std=0.3)
    temperatures = torch.tensor([0.5, 1.0, 2.0, 1.3], dtype=torch.float64)
    x, log_p = model.sample(4, temperatures)
    assert torch.allclose(model.log_prob(x, temperatures), log_p, atol=1e-6)
    copy = load_flow(model.checkpoint())
    assert isinstance(copy, TemperatureCNF) and copy.config == model.config
    assert copy.velocity.net[0].weight.dtype == torch.float64
    assert torch.allclose(copy.log_prob(x, temperatures), log_p, atol=1e-6)
    assert isinstance(build_flow(model.config), TemperatureCNF)
    assert isinstance(model, ConditionalFlow)
    with pytest.raises(TradeMDError, match="reparameterised"):
        model.rsample(2, 1.0)


@pytest.mark.slow
def test_interpolation_objective_learns_the_gaussian_family_without_data(tmp_path, one_thread):
    """No data frame is read; the continuity residual falls and the learnt CNF matches N(0, T I)
    over [0.5, 2]. Measured (300 steps, seed 0): forward KL 0.09 / 0.06 / 0.02 at T = 0.5 / 1 / 2,
    relative ESS 86-96 %; the untrained CNF (the base, sd 3) has KL 0.7-3."""
    system = get_analytic_system("gaussian-2d")
    target = AnalyticTarget(system, n_data=100)
    target.data_features = target.data_features.fill_(float("nan"))  # any use would show
    config = TrainConfig.from_settings(dict(
        objective="interpolation", steps=300, t_min=0.5, t_max=2.0, batch_size=256, learning_rate=5e-3,
        refine_rounds=0, metrics_every=100, metrics_samples=2000, checkpoint_every=100, flow={"width": 32}))
    trainer = Trainer(target, config, tmp_path / "run")
    untrained = [system.forward_kl(trainer.model.log_prob, t, n=2000) for t in (0.5, 2.0)]
    trainer.train(show_progress=False)
    for temperature in (0.5, 1.0, 2.0):
        assert system.forward_kl(trainer.model.log_prob, temperature, n=2000) < 0.2
    assert min(untrained) > 0.5
    rows = list(csv.DictReader((tmp_path / "run" / "metrics.csv").open()))
    assert float(rows[-1]["continuity_residual_rms"]) < 0.5 * float(rows[0]["continuity_residual_rms"]) \
        or float(rows[-1]["continuity_residual_rms"]) < 0.3
    assert all(r["nll_t0"] == "" for r in rows) and int(rows[-1]["energy_evaluations"]) > 0
    saved = torch.load(tmp_path / "run" / "model.pt", weights_only=False)
    assert saved["objective"] == "interpolation" and saved["flow"]["config"]["kind"] == "cnf"


def test_interpolation_cli_runs_on_analytic_systems_and_refuses_molecules(tmp_path):
    runner = CliRunner()
    base = ["train", "--tmin", "0.5", "--tmax", "2", "--quiet", "--objective", "interpolation"]
    result = runner.invoke(app, [*base, "--out", str(tmp_path / "m"), "--system", "ala2-implicit"])
    assert result.exit_code == 1 and "analytic system" in result.output
    result = runner.invoke(app, [*base, "--out", str(tmp_path / "r"), "--system", "double-well-5d",
                                 "--steps", "4"])
    assert result.exit_code == 0, result.output
    config = json.loads((tmp_path / "r" / "config.json").read_text())
    assert config["objective"] == "interpolation" and config["refinement"]["refine_rounds"] == 0
    assert (tmp_path / "r" / "model.pt").exists() and (tmp_path / "r" / "loss.png").exists()


def test_normaliser_rate_starts_from_the_importance_sampled_exact_values():
    """The first estimate of c(lam) = E_{p_lam}[d f / d lam] at the table's nodes, by
    importance sampling of base samples, matches the exact Gaussian values; between nodes the
    table interpolates linearly, with the jump at lam = 1 kept."""
    torch.manual_seed(3)
    model = TemperatureCNF(DIM, (T_MIN, T_MAX), base_sigma=SIGMA).double()
    initialise_normaliser_rate(model, harmonic, n_per_node=20000)
    exact = ExactRate(model.path)
    nodes = model.normaliser_rate.node_times.reshape(-1)
    learnt = model.normaliser_rate(nodes).detach()
    assert torch.allclose(learnt, exact(nodes), atol=0.05, rtol=0.05)
    below, above = torch.tensor([1 - 1e-9], dtype=torch.float64), torch.tensor([1.0], dtype=torch.float64)
    assert abs(float(model.normaliser_rate(below).detach() - exact(below))) < 0.05 * abs(float(exact(below))) + 0.05
    assert abs(float(model.normaliser_rate(above).detach() - exact(above))) < 0.05 * abs(float(exact(above))) + 0.05
    middle = 0.5 * (nodes[3] + nodes[4])
    assert torch.allclose(model.normaliser_rate(middle[None]), 0.5 * (learnt[3] + learnt[4]))

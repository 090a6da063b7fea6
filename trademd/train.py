"""Training a temperature-conditional flow: TRADE and its baselines, with checkpoints.

Objectives (same flow, same loop, selected by ``TrainConfig.objective``):

- ``trade``: NLL of data at T0 plus the TRADE residual loss over [t_min, t_max]
  (:mod:`trademd.trade`), its weight ramped in after a warm-up.
- ``nll``: NLL at T0 only; the flow's base is temperature-scaled, the only way T enters.
- ``reverse-kl``: reverse KL divergence to exp(-u) at temperatures drawn over the range.
- ``nll+reverse-kl``: both.

A run directory holds ``config.json``, ``metrics.csv``, ``checkpoint.pt`` (everything
``resume`` needs: parameters, optimiser, scheduler, expectation cache, RNG state) and, at the
end, ``model.pt`` (what sampling needs) and ``loss.png``.
"""

from dataclasses import asdict, dataclass, field
import csv
import json
import math
from pathlib import Path
import time

import torch
from torch import Tensor

from .errors import TradeMDError
from .flows import TemperatureFlow, build_flow
from .progress import Progress
from .trade import (
    ExpectationCache, kish_ess, log_importance_weights, log_spaced_grid, residual_loss,
    snis_mean, trade_residual,
)

__all__ = ["OBJECTIVES", "TrainConfig", "Trainer", "importance_weights"]

OBJECTIVES = ("trade", "nll", "reverse-kl", "nll+reverse-kl")

#: Columns of metrics.csv (a term that an objective lacks stays empty).
METRICS_COLUMNS = ("step", "loss", "nll_t0", "val_nll_t0", "trade", "trade_weight",
                   "trade_residual_rms", "trade_points_kept", "reverse_kl", "ess_tmin", "ess_t0",
                   "ess_tmax", "bad_batches", "steps_per_s")


@dataclass
class TrainConfig:
    """Settings of a training run. Temperatures in K (reduced units for analytic systems)."""

    t_min: float
    t_max: float
    objective: str = "trade"
    steps: int = 2000
    batch_size: int = 256
    learning_rate: float = 1e-3
    clip_norm: float = 3.0
    trade_mode: str = "grid"
    trade_weight: float = 1.0
    trade_points: int = 256
    evaluation_points: str = "samples"
    warmup_fraction: float = 0.2
    ramp_fraction: float = 0.2
    residual_loss: str = "huber"
    huber_delta: float = 1.0
    residual_cutoff: float = 50.0
    grid_size: int = 25
    cache_samples: int = 2000
    cache_every: int = 200
    cache_momentum: float = 0.5
    reverse_kl_samples: int = 256
    chirality_restraint_kt: float = 100.0
    max_bad_batches: int = 50
    metrics_every: int = 100
    checkpoint_every: int = 500
    seed: int = 0
    flow: dict = field(default_factory=dict)

    def validate(self, reference_temperature: float) -> None:
        """Raise :class:`TradeMDError` for impossible settings."""
        if self.objective not in OBJECTIVES:
            raise TradeMDError(f"unknown objective {self.objective!r}: choose one of {list(OBJECTIVES)}")
        if not 0 < self.t_min < self.t_max:
            raise TradeMDError(f"need 0 < tmin < tmax, got tmin={self.t_min}, tmax={self.t_max}")
        if not self.t_min <= reference_temperature <= self.t_max:
            raise TradeMDError(
                f"the data temperature T0={reference_temperature:g} lies outside "
                f"[{self.t_min:g}, {self.t_max:g}]: choose --tmin/--tmax around it"
            )
        if self.trade_mode not in ("grid", "continuous"):
            raise TradeMDError("trade mode must be grid or continuous")
        if self.evaluation_points not in ("samples", "data", "both"):
            raise TradeMDError("evaluation points must be samples, data or both")
        if self.steps < 2 or self.batch_size < 2:
            raise TradeMDError("--steps and --batch-size must be at least 2")


def importance_weights(flow: TemperatureFlow, target, n: int, temperature: float,
                       chunk: int = 4096) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Draw n flow samples at T and weigh them for exp(-u).

    Returns:
        (z [n, D], log p_flow [n], u [n], log w [n]) with log w = -u + log|dx/dz| - log p,
        unnormalised; non-finite u gives log w = -inf.
    """
    parts = []
    for start in range(0, n, chunk):
        m = min(chunk, n - start)
        z, log_p = flow.sample(m, temperature)
        t = torch.full((m,), float(temperature), dtype=z.dtype, device=z.device)
        with torch.no_grad():
            u, log_det = target.reduced_energy(z, t)
        log_w = log_importance_weights(u, log_p) + log_det
        log_w = torch.where(torch.isfinite(log_w), log_w, torch.full_like(log_w, -math.inf))
        parts.append((z, log_p, u, log_w))
    return tuple(torch.cat(p) for p in zip(*parts))


class Trainer:
    """Runs one training configuration on one target, writing into ``run_dir``.

    Args:
        target: e.g. :class:`trademd.targets.AnalyticTarget` or ``MoleculeTarget``.
        config: the settings.
        run_dir: output folder.
        device: torch device.
        validation_features: held-out features at T0 for the validation NLL (optional).
    """

    def __init__(self, target, config: TrainConfig, run_dir: str | Path,
                 device: torch.device | str = "cpu", validation_features: Tensor | None = None):
        config.validate(target.reference_temperature)
        self.target, self.config, self.device = target, config, torch.device(device)
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(config.seed)
        self.data = target.data_features.to(self.device)
        self.validation = None if validation_features is None else validation_features.to(self.device)
        self.flow = build_flow(self._flow_config()).to(self.device)
        self.optimizer = torch.optim.Adam(self.flow.parameters(), lr=config.learning_rate)
        self.scheduler = torch.optim.lr_scheduler.OneCycleLR(
            self.optimizer, max_lr=config.learning_rate, total_steps=config.steps,
            pct_start=min(0.5, max(0.05, 2.0 / config.steps)),
        )
        grid = log_spaced_grid(config.t_min, config.t_max, config.grid_size)
        self.cache = ExpectationCache(grid.to(self.device), momentum=config.cache_momentum)
        self.step = 0
        self.bad_batches = 0
        self.last_metrics: dict = {}

    # -- configuration -------------------------------------------------------------------

    def _flow_config(self) -> dict:
        """Flow settings: the user's, completed from the target (dims, interval, T range)."""
        scaled = self.config.objective == "nll"
        data = self.target.data_features
        low, high = self.target.bounded_interval
        bounded = data[:, self.target.n_torsions:]
        sigma = float((bounded.std(dim=0) / (0.5 * (high - low))).mean()) if bounded.numel() else 0.5
        config = {
            "width": 64, "depth": 2, "bins": 8,
            "layers": ["bounded|bounded"] * 3 if self.target.n_torsions == 0 else
            ["torsions|torsions", "bounded|torsions", "bounded|bounded"] * 2,
            "bounded_base": "scaled_truncated_normal" if scaled else "truncated_normal",
            "torsion_base": "uniform",
            "base_sigma": min(max(sigma, 0.02), 1.0),
        }
        config.update(self.config.flow)
        config.update({
            "n_torsions": self.target.n_torsions, "n_bounded": self.target.n_bounded,
            "temperature_range_k": [self.config.t_min, self.config.t_max],
            "bounded_interval": list(self.target.bounded_interval),
            "reference_temperature_k": self.target.reference_temperature,
        })
        return config

    # -- loss terms ------------------------------------------------------------------------

    def _trade_weight(self) -> float:
        c = self.config
        start = c.warmup_fraction * c.steps
        ramp = max(c.ramp_fraction * c.steps, 1.0)
        return c.trade_weight * min(max((self.step - start) / ramp, 0.0), 1.0)

    def _temperatures(self, n: int) -> Tensor:
        c = self.config
        log_t = torch.empty(n, device=self.device).uniform_(math.log(c.t_min), math.log(c.t_max))
        return torch.exp(log_t)

    def refresh_cache(self) -> None:
        """Re-estimate E_T[u] at every grid temperature by SNIS from flow samples."""
        for index, temperature in enumerate(self.cache.temperatures.tolist()):
            _, _, u, log_w = importance_weights(self.flow, self.target, self.config.cache_samples, temperature)
            self.cache.update(index, float(snis_mean(u.double(), log_w.double())))

    def _trade_loss(self) -> tuple[Tensor, dict]:
        c = self.config
        n = c.trade_points
        if c.trade_mode == "grid":
            index = torch.randint(len(self.cache.temperatures), (n,), device=self.device)
            temperature = self.cache.temperatures[index].float()
            expected_u = self.cache.lookup(index).float()
        else:
            temperature = self._temperatures(1).expand(n)
        use_samples = c.evaluation_points in ("samples", "both")
        points = []  # (features z, reduced energies u) of the evaluation points
        if use_samples or c.trade_mode == "continuous":
            z_s, log_p_s = self.flow.sample(n, temperature)
            with torch.no_grad():
                u_s, log_det_s = self.target.reduced_energy(z_s, temperature)
            if c.trade_mode == "continuous":
                log_w = log_importance_weights(u_s, log_p_s) + log_det_s
                expected_u = snis_mean(u_s, log_w).expand(n)
            if use_samples:
                points.append((z_s, u_s))
        if c.evaluation_points in ("data", "both"):
            z_d = self.data[torch.randint(len(self.data), (n,), device=self.device)]
            with torch.no_grad():
                u_d, _ = self.target.reduced_energy(z_d, temperature)
            points.append((z_d, u_d))
        z = torch.cat([p[0] for p in points])
        u = torch.cat([p[1] for p in points])
        t = temperature.repeat(len(points))
        expected = expected_u.repeat(len(points))
        # points whose Boltzmann weight at T is negligible (u more than residual_cutoff above
        # its mean: a relative weight below exp(-cutoff)), e.g. clashing samples of an early
        # flow, carry no information about the density there and only add noise
        keep = (torch.isfinite(u) & torch.isfinite(expected)
                & ((u - expected).abs() <= c.residual_cutoff))
        if not bool(keep.any()):
            return torch.zeros((), device=self.device), {"trade_points_kept": 0.0}
        derivative = t[keep] * self.flow.dlogp_dT(z[keep], t[keep], create_graph=True)
        residual = trade_residual(derivative, u[keep], expected[keep])
        loss = residual_loss(residual, c.residual_loss, c.huber_delta)
        return loss, {"trade_residual_rms": float(residual.detach().pow(2).mean().sqrt()),
                      "trade_points_kept": float(keep.float().mean())}

    def _reverse_kl(self) -> Tensor:
        n = self.config.reverse_kl_samples
        temperature = self._temperatures(n)
        z, log_p = self.flow.rsample(n, temperature)
        u, log_det = self.target.reduced_energy(z, temperature, self.config.chirality_restraint_kt)
        return (log_p + u - log_det).mean()

    def loss(self) -> tuple[Tensor, dict]:
        """The objective of this step and its parts (floats)."""
        c = self.config
        parts: dict = {}
        loss = torch.zeros((), device=self.device)
        if "nll" in c.objective or c.objective == "trade":
            batch = self.data[torch.randint(len(self.data), (c.batch_size,), device=self.device)]
            nll = -self.flow.log_prob(batch, self.target.reference_temperature).mean()
            loss = loss + nll
            parts["nll_t0"] = float(nll.detach())
        if c.objective == "trade":
            weight = self._trade_weight()
            if weight > 0:
                if c.trade_mode == "grid" and (not self.cache.ready or self.step % c.cache_every == 0):
                    self.refresh_cache()
                trade, extra = self._trade_loss()
                loss = loss + weight * trade
                parts.update(trade=float(trade.detach()), trade_weight=weight, **extra)
        if "reverse-kl" in c.objective:
            kl = self._reverse_kl()
            loss = loss + kl
            parts["reverse_kl"] = float(kl.detach())
        return loss, parts

    # -- the loop ----------------------------------------------------------------------------

    def train(self, show_progress: bool = True) -> Path:
        """Run until ``config.steps``; checkpoint and write metrics as configured.

        Returns:
            The path of ``model.pt``.
        """
        c = self.config
        (self.run_dir / "config.json").write_text(json.dumps(asdict(c), indent=2))
        if self.step == 0:  # a fresh run: no metrics of an earlier one
            (self.run_dir / "metrics.csv").unlink(missing_ok=True)
        progress = Progress(c.steps, "steps", enabled=show_progress)
        started, start_step = time.perf_counter(), self.step
        while self.step < c.steps:
            self.optimizer.zero_grad(set_to_none=True)
            loss, parts = self.loss()
            if not torch.isfinite(loss):
                self._bad_batch()
                continue
            loss.backward()
            norm = torch.nn.utils.clip_grad_norm_(self.flow.parameters(), c.clip_norm)
            if not torch.isfinite(norm):
                self._bad_batch()
                continue
            self.optimizer.step()
            self.scheduler.step()
            self.step += 1
            if self.step % c.metrics_every == 0 or self.step == c.steps:
                rate = (self.step - start_step) / (time.perf_counter() - started)
                self._write_metrics({"loss": float(loss.detach()), **parts, "steps_per_s": rate})
                terms = {k: f"{parts[k]:.3f}" for k in ("nll_t0", "trade", "reverse_kl") if k in parts}
                progress.update(self.step, loss=f"{float(loss.detach()):.3f}", **terms,
                                ess_tmin=f"{self.last_metrics['ess_tmin']:.3f}")
            if self.step % c.checkpoint_every == 0 or self.step == c.steps:
                self.save_checkpoint()
        return self.save_model()

    def _bad_batch(self) -> None:
        self.bad_batches += 1
        self.optimizer.zero_grad(set_to_none=True)
        if self.bad_batches >= self.config.max_bad_batches:
            raise TradeMDError(
                f"training stopped: {self.bad_batches} batches gave a non-finite loss or gradient "
                f"(last at step {self.step}); lower the learning rate or check the data energies"
            )

    @torch.no_grad()
    def metrics(self) -> dict:
        """Validation NLL at T0 and relative ESS at T_min, T0 and T_max (1000 samples each)."""
        values = {"step": self.step, "bad_batches": self.bad_batches}
        if self.validation is not None:
            values["val_nll_t0"] = float(
                -self.flow.log_prob(self.validation, self.target.reference_temperature).mean())
        for name, temperature in (("tmin", self.config.t_min), ("t0", self.target.reference_temperature),
                                  ("tmax", self.config.t_max)):
            _, _, _, log_w = importance_weights(self.flow, self.target, 1000, temperature)
            values[f"ess_{name}"] = float(kish_ess(log_w.double())) / 1000
        return values

    def _write_metrics(self, parts: dict) -> None:
        row = {**self.metrics(), **parts}
        self.last_metrics = row
        path = self.run_dir / "metrics.csv"
        new_file = not path.exists()
        with path.open("a", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=METRICS_COLUMNS)
            if new_file:
                writer.writeheader()
            writer.writerow(row)

    # -- persistence -------------------------------------------------------------------------

    def save_checkpoint(self) -> Path:
        """Write ``checkpoint.pt``: all state needed to continue exactly."""
        path = self.run_dir / "checkpoint.pt"
        state = {
            "step": self.step, "bad_batches": self.bad_batches,
            "flow": self.flow.state_dict(), "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(), "cache": self.cache.state_dict(),
            "torch_rng": torch.get_rng_state(), "config": asdict(self.config),
        }
        if self.device.type == "cuda":
            state["cuda_rng"] = torch.cuda.get_rng_state(self.device)
        torch.save(state, path.with_suffix(".tmp"))
        path.with_suffix(".tmp").replace(path)
        return path

    def resume(self) -> None:
        """Continue from ``checkpoint.pt`` in ``run_dir``."""
        path = self.run_dir / "checkpoint.pt"
        if not path.is_file():
            raise TradeMDError(f"no checkpoint to resume in {str(self.run_dir)!r}: drop --resume")
        state = torch.load(path, map_location=self.device, weights_only=False)
        self.flow.load_state_dict(state["flow"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.cache.load_state_dict(state["cache"])
        torch.set_rng_state(state["torch_rng"])
        if "cuda_rng" in state and self.device.type == "cuda":
            torch.cuda.set_rng_state(state["cuda_rng"], self.device)
        self.step, self.bad_batches = state["step"], state["bad_batches"]

    def save_model(self) -> Path:
        """Write ``model.pt``: flow, target record, temperature range, T0."""
        path = self.run_dir / "model.pt"
        torch.save({
            "flow": self.flow.checkpoint(),
            "target": self.target.record(),
            "reference_temperature": self.target.reference_temperature,
            "temperature_range": [self.config.t_min, self.config.t_max],
            "objective": self.config.objective,
        }, path)
        return path

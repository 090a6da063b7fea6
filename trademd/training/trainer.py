"""Training a temperature-conditional flow: TRADE and its baselines, with checkpoints.

Objectives (same flow, same loop, selected by ``TrainConfig.objective``):

- ``trade``: NLL of data at T0 plus the TRADE residual loss over [t_min, t_max]
  (:mod:`trademd.training.trade`), its weight ramped in after a warm-up.
- ``nll``: NLL at T0 only; the flow's base is temperature-scaled, the only way T enters.
- ``reverse-kl``: reverse KL divergence to exp(-u) at temperatures drawn over the range.
- ``nll+reverse-kl``: both.
- ``data-free``: reverse KL at T0 (or over the range: ``reverse_kl_temperatures``, the
  default of ``trade-md train``) as the boundary, TRADE from flow samples over the range.
  A molecule (here and with ``reverse-kl`` without data) first fits its structure prior
  (:mod:`trademd.training.structure_prior`, no energies in the loss) for ``prior_fraction``
  of the steps, then reverse KL takes over; an importance-weighted NLL at T0 on the flow's own
  samples (a buffer redrawn every ``boundary_buffer_every`` steps) stands in for data.
- ``interpolation``: a continuous flow (:mod:`trademd.flow.cnf`) whose vector field is
  trained on the continuity residual along the temperature path
  (:mod:`trademd.training.interpolation`); no data, analytic systems.

Weight averaging and model selection: an exponential moving average (EMA) of the parameters
is kept beside the trained ones; at every metrics step the EMA flow is scored on held-out
criteria (validation NLL at T0 for ``nll``; the mean log relative ESS over the selection
temperatures, pooled over ``metrics_samples`` flow samples each, for the energy-aware
objectives once their full weight is on), and ``model.pt`` holds the best-scoring EMA
parameters. ``metrics.csv`` marks the chosen step, ``selection.json`` says why.

Refinement (optional, ``refine_rounds`` > 0): after the main phase, importance-weighted
forward KL on buffers of flow samples drawn over the temperature range (the annealing step of
temperature-annealed Boltzmann generators, Schopmans and Friederich 2025), started from the
selected parameters; each round is scored and selected like the main phase
(:mod:`trademd.training.refine`).

Data parallel (``torchrun``, :mod:`trademd.distributed`): every rank holds the data and draws
its slice of one global minibatch (``batch_size`` per rank) from a generator all ranks share,
so W ranks at batch B take the same steps as one process at batch W x B; each rank draws its
own flow samples and evaluates their energies; gradients are averaged over ranks before
clipping, and E_T[u], the ESS metrics and the validation NLL are pooled over ranks, so every
rank selects the same step. Rank 0 writes every file.

A run directory holds ``config.json``, ``metrics.csv``, ``checkpoint.pt`` (everything
``resume`` needs: parameters, EMA, best parameters, optimiser, scheduler, expectation cache,
refinement buffer, RNG state) and, at the end, ``model.pt`` (what sampling needs),
``selection.json`` and ``loss.png``.
"""

import csv
from dataclasses import asdict, dataclass, field
from enum import Enum
import json
import math
from pathlib import Path
import time

import torch
from torch import Tensor
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from trademd import distributed
from trademd.distributed import Ranks
from trademd.errors import TradeMDError
from trademd.flow.conditional import TemperatureFlow, build_flow
from trademd.progress import Progress
from trademd.training.model_file import MODEL_FORMAT, MODEL_FORMAT_VERSION
from trademd.training.interpolation import (
    continuity_residual,
    initialise_normaliser_rate,
    residual_points,
)
from trademd.training.refine import RefinementBuffer
from trademd.training.structure_prior import StructurePrior
from trademd.training.trade import (
    ExpectationCache,
    dlogp_dlogt,
    log_importance_weights,
    log_spaced_grid,
    residual_loss,
    snis_mean,
    trade_residual,
)

__all__ = ["OBJECTIVES", "Objective", "TrainConfig", "Trainer", "importance_weights", "linear_log_cut"]

class Objective(str, Enum):
    """What a run trains on; the value is the name in settings files and on the CLI."""

    TRADE = "trade"
    NLL = "nll"
    REVERSE_KL = "reverse-kl"
    NLL_REVERSE_KL = "nll+reverse-kl"
    DATA_FREE = "data-free"
    INTERPOLATION = "interpolation"

    @property
    def fits_data(self) -> bool:
        """Has the NLL of the data at T0."""
        return self not in (Objective.REVERSE_KL, Objective.DATA_FREE, Objective.INTERPOLATION)

    @property
    def uses_reverse_kl(self) -> bool:
        return self in (Objective.REVERSE_KL, Objective.NLL_REVERSE_KL, Objective.DATA_FREE)

    @property
    def uses_trade(self) -> bool:
        """Transfers with the TRADE loss: from data at T0, or (data-free) from a boundary
        fitted at T0 by reverse KL on the energy alone."""
        return self in (Objective.TRADE, Objective.DATA_FREE)


OBJECTIVES = tuple(objective.value for objective in Objective)

#: Columns of metrics.csv (a term that an objective lacks stays empty).
METRICS_COLUMNS = ("step", "phase", "loss", "nll_t0", "val_nll_t0", "trade", "trade_weight",
                   "trade_residual_rms", "trade_points_kept", "reverse_kl", "continuity",
                   "continuity_residual_rms", "prior_nll", "boundary_nll", "refine_nll",
                   "buffer_ess", "ess_tmin", "ess_t0", "ess_tmax", "selection_score", "selected",
                   "bad_batches", "energy_evaluations", "steps_per_s")


@dataclass
class TrainConfig:
    """Settings of a training run. Temperatures in K (reduced units for analytic systems).

    The defaults are the ``quick`` preset (minutes on a laptop CPU for alanine dipeptide), the
    one place they are set; :data:`trademd.train.PRESETS` holds what other presets change.
    """

    t_min: float
    t_max: float
    objective: str = "trade"
    steps: int = 1500
    batch_size: int = 256
    learning_rate: float = 1e-3
    clip_norm: float = 3.0
    trade_mode: str = "grid"
    trade_weight: float = 1.0
    trade_points: int = 128
    evaluation_points: str = "both"
    warmup_fraction: float = 0.3
    ramp_fraction: float = 0.2
    residual_loss: str = "huber"
    huber_delta: float = 1.0
    residual_cutoff: float = 50.0
    grid_size: int = 9
    trade_ess_floor: float = 0.0
    cache_samples: int = 500
    cache_every: int = 100
    cache_momentum: float = 0.5
    prior_fraction: float = 0.2
    prior_samples: int = 50000
    boundary_buffer_samples: int = 20000
    boundary_buffer_every: int = 150
    reverse_kl_samples: int = 256
    reverse_kl_temperatures: str = "t0"
    reverse_kl_energy_cut: float = 1000.0
    chirality_restraint_kt: float = 100.0
    max_bad_batches: int = 50
    metrics_every: int = 150
    metrics_samples: int = 10000
    checkpoint_every: int = 250
    ema_decay: float = 0.99
    focus_temperatures: list = field(default_factory=list)
    refine_rounds: int = 7
    refine_steps: int = 150
    refine_samples: int = 40000
    refine_learning_rate: float = 2e-4
    refine_clip_fraction: float = 1e-3
    seed: int = 0
    flow: dict = field(default_factory=lambda: {"width": 64, "depth": 2, "bins": 8})

    @property
    def total_steps(self) -> int:
        """Main phase plus refinement rounds."""
        return self.steps + self.refine_rounds * self.refine_steps

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
        if not 0.0 <= self.trade_ess_floor < 1.0 or (self.trade_ess_floor and self.trade_mode != "grid"):
            raise TradeMDError(f"trade_ess_floor must lie in [0, 1) and needs trade_mode grid, got "
                               f"{self.trade_ess_floor} with {self.trade_mode}")
        if self.evaluation_points not in ("samples", "data", "both"):
            raise TradeMDError("evaluation points must be samples, data or both")
        if self.reverse_kl_temperatures not in ("t0", "range"):
            raise TradeMDError(f"reverse_kl_temperatures must be t0 or range, got {self.reverse_kl_temperatures!r}")
        if self.kind is Objective.DATA_FREE and self.evaluation_points != "samples":
            raise TradeMDError("data-free training has no data to evaluate TRADE at: set "
                               "evaluation_points to samples")
        if not 0.0 <= self.prior_fraction < 1.0:
            raise TradeMDError(f"prior_fraction must lie in [0, 1), got {self.prior_fraction}")
        if self.kind is Objective.INTERPOLATION and self.refine_rounds:
            raise TradeMDError("the interpolation objective has no refinement rounds: set refine_rounds to 0")
        if self.steps < 4 or self.batch_size < 2:
            # the one-cycle schedule needs a few steps to rise and fall
            raise TradeMDError("--steps must be at least 4 and --batch-size at least 2")
        if not 0.0 <= self.ema_decay < 1.0:
            raise TradeMDError(f"ema_decay must lie in [0, 1), got {self.ema_decay}")
        if self.metrics_samples < 100:
            raise TradeMDError("metrics_samples must be at least 100 (ESS from fewer is noise)")
        if self.refine_rounds < 0 or (self.refine_rounds and (self.refine_steps < 1 or self.refine_samples < 100)):
            raise TradeMDError("refinement needs refine_rounds >= 0, refine_steps >= 1 and refine_samples >= 100")
        outside = [t for t in self.focus_temperatures if not self.t_min <= t <= self.t_max]
        if outside:
            raise TradeMDError(f"focus temperatures {outside} lie outside [{self.t_min:g}, {self.t_max:g}]: widen --tmin/--tmax")

    @property
    def selects_by_ess(self) -> bool:
        """Energy-aware objectives are selected by ESS, ``nll`` by validation NLL."""
        return self.kind is not Objective.NLL

    @property
    def kind(self) -> Objective:
        """The objective as an :class:`Objective` (``objective`` stays the plain name)."""
        return Objective(self.objective)


def linear_log_cut(u: Tensor, cut: float) -> Tensor:
    """u below ``cut``, cut + log(1 + u - cut) above: continuous, with derivative 1 below and
    1 / (1 + u - cut) above, so very high energies weigh little in a gradient (bgflow's
    linear-log energy regularisation). +inf stays +inf."""
    excess = (u - cut).clamp_min(0.0)
    return torch.where(u > cut, cut + torch.log1p(excess), u)


def importance_weights(flow: TemperatureFlow, target, n: int, temperature,
                       chunk: int = 4096, chirality_restraint_kt: float = 0.0,
                       ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Draw n flow samples at T and weigh them for exp(-u).

    Args:
        temperature: a float, or a tensor [n] of per-sample temperatures.
        chirality_restraint_kt: kT added per mirrored chiral centre (molecules), so that
            samples of the wrong enantiomer carry (essentially) zero weight, as in sampling.

    Returns:
        (z [n, D], log p_flow [n], u [n], log w [n]) with log w = -u + log|dx/dz| - log p,
        unnormalised; non-finite u gives log w = -inf.
    """
    per_sample = isinstance(temperature, Tensor)
    parts = []
    for start in range(0, n, chunk):
        m = min(chunk, n - start)
        t_chunk = temperature[start:start + m] if per_sample else float(temperature)
        z, log_p = flow.sample(m, t_chunk)
        t = torch.as_tensor(t_chunk, dtype=z.dtype, device=z.device).expand(m)
        with torch.no_grad():
            u, log_det = target.reduced_energy(z, t, chirality_restraint_kt)
        log_w = log_importance_weights(u, log_p) + log_det
        log_w = torch.where(torch.isfinite(log_w), log_w, torch.full_like(log_w, -math.inf))
        parts.append((z, log_p, u, log_w))
    return tuple(torch.cat(p) for p in zip(*parts))


class Trainer:
    """Runs one training configuration on one target, writing into ``run_dir``.

    Args:
        target: e.g. :class:`trademd.training.targets.AnalyticTarget` or ``MoleculeTarget``.
        config: the settings.
        run_dir: output folder.
        device: torch device.
        validation_features: held-out features at T0 for the validation NLL (optional).
        ranks: this process's place in a ``torchrun`` launch (default: the only process).
    """

    def __init__(self, target, config: TrainConfig, run_dir: str | Path,
                 device: torch.device | str = "cpu", validation_features: Tensor | None = None,
                 ranks: Ranks = Ranks()):
        config.validate(target.reference_temperature)
        self.target, self.config, self.device = target, config, torch.device(device)
        self.ranks = ranks
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(config.seed)
        self.data = None if target.data_features is None else target.data_features.to(self.device)
        self.data_generator = torch.Generator().manual_seed(config.seed)
        self.validation = None if validation_features is None else validation_features.to(self.device)
        self.prior = self._structure_prior()
        self.flow = build_flow(self._flow_config()).to(self.device)
        distributed.broadcast_parameters(self.flow)
        if ranks.rank > 0:  # every rank draws its own flow samples
            torch.manual_seed(_rank_seed(config.seed, ranks.rank, 0))
        self.optimizer = torch.optim.Adam(self.flow.parameters(), lr=config.learning_rate)
        self.scheduler = torch.optim.lr_scheduler.OneCycleLR(
            self.optimizer, max_lr=config.learning_rate, total_steps=config.steps,
            pct_start=min(0.5, max(0.05, 2.0 / config.steps)),
        )
        self.ema = AveragedModel(self.flow, multi_avg_fn=get_ema_multi_avg_fn(config.ema_decay))
        self.cache = ExpectationCache(self._grid().to(self.device), momentum=config.cache_momentum)
        self.step = 0
        self.bad_batches = 0
        self.last_metrics: dict = {}
        self.best: dict | None = None  # {"step", "score", "criterion", "state_dict"} of the EMA
        self.buffer: RefinementBuffer | None = None
        #: data-free runs: weighted flow samples at T0 that stand in for data (redrawn regularly)
        self.boundary_buffer: RefinementBuffer | None = None
        #: energy evaluations of earlier runs of this training (restored by :meth:`resume`)
        self.evaluations_before = 0

    def energy_evaluations(self) -> int:
        """Target energy evaluations of this training so far, over all ranks and resumes
        (metrics samples, TRADE expectations, refinement buffers: every configuration whose
        energy was computed). A collective call under torchrun."""
        mine = torch.tensor(float(self.target.energy_evaluations), dtype=torch.float64, device=self.device)
        return int(distributed.all_reduce(mine).item()) + self.evaluations_before

    def _data_batch(self, size: int, source: Tensor | None = None) -> Tensor:
        """This rank's ``size`` frames of a global minibatch of ``size x world_size`` frames
        drawn (with replacement) by the generator all ranks share, from the data (or
        ``source``, e.g. the structure prior's samples)."""
        source = self.data if source is None else source
        r, w = self.ranks.rank, self.ranks.world_size
        index = torch.randint(len(source), (size * w,), generator=self.data_generator)
        return source[index[r * size:(r + 1) * size].to(self.device)]

    def _structure_prior(self) -> Tensor | None:
        """Samples [prior_samples, D] of the structure prior (:mod:`trademd.training.structure_prior`)
        that data-free and reverse-KL training of a molecule without data fit first; None for
        other runs."""
        c = self.config
        if c.kind not in (Objective.DATA_FREE, Objective.REVERSE_KL) or c.prior_fraction == 0 \
                or not hasattr(self.target, "structure_features"):
            return None
        if c.kind is Objective.DATA_FREE and c.prior_fraction > c.warmup_fraction:
            raise TradeMDError(f"prior_fraction must lie in [0, warmup_fraction]: the structure prior "
                               f"is fitted before the reverse-KL boundary, got {c.prior_fraction} > "
                               f"{c.warmup_fraction}")
        structure = self.target.structure_features()
        if structure is None:
            return None
        prior = StructurePrior.from_target(self.target, structure, self.target.reference_temperature,
                                           chirality_restraint_kt=c.chirality_restraint_kt)
        samples = prior.sample(c.prior_samples, torch.Generator().manual_seed(c.seed))
        return samples.to(self.device)

    def _in_prior_phase(self) -> bool:
        return self.prior is not None and self.step < self.config.prior_fraction * self.config.steps

    def _share(self, n: int) -> int:
        """This rank's part of ``n`` samples drawn over all ranks."""
        return distributed.shard_sizes(n, self.ranks.world_size)[self.ranks.rank]

    @property
    def model(self) -> TemperatureFlow:
        """The averaged (EMA) flow: what metrics score and what selection keeps."""
        return self.ema.module

    # -- configuration -------------------------------------------------------------------

    def _flow_config(self) -> dict:
        """Flow settings: the user's, completed from the target (dims, interval, T range)."""
        scaled = self.config.kind is Objective.NLL
        low, high = self.target.bounded_interval
        if self.config.kind is Objective.INTERPOLATION:
            return self._cnf_config()
        sigma = 0.5  # of the base, relative to the interval's half width; from the data if any
        data = self.target.data_features if self.config.kind.fits_data else self.prior
        bounded = data[:, self.target.n_torsions:] if data is not None else torch.empty(0)
        if bounded.numel():
            sigma = float((bounded.std(dim=0) / (0.5 * (high - low))).mean())
        config = {
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

    def _cnf_config(self) -> dict:
        """Settings of the interpolation CNF: a base a third of the box wide (it covers every
        mode of the analytic systems), the user's width/depth."""
        low, high = self.target.bounded_interval
        config = {"kind": "cnf", "n_bounded": self.target.n_bounded,
                  "temperature_range_k": [self.config.t_min, self.config.t_max],
                  "base_sigma": (high - low) / 6, "bounded_interval": [low, high],
                  "reference_temperature_k": self.target.reference_temperature}
        config.update({k: v for k, v in self.config.flow.items() if k in ("width", "depth", "base_sigma",
                                                                           "atol", "rtol")})
        return config

    def _grid(self) -> Tensor:
        """TRADE grid: log-spaced over [t_min, t_max], plus T0 and the focus temperatures."""
        c = self.config
        extra = torch.tensor([self.target.reference_temperature, *c.focus_temperatures], dtype=torch.float64)
        grid = torch.cat([log_spaced_grid(c.t_min, c.t_max, c.grid_size), extra])
        return torch.unique(grid)

    def selection_temperatures(self) -> list[tuple[str, float]]:
        """(name, T) at which ESS is measured and model selection scores: T_min, T0, T_max
        and every focus temperature."""
        c = self.config
        named = [("tmin", c.t_min), ("t0", self.target.reference_temperature), ("tmax", c.t_max)]
        return named + [(f"{t:g}", float(t)) for t in c.focus_temperatures]

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
            _, _, u, log_w = importance_weights(self.flow, self.target,
                                                self._share(self.config.cache_samples), temperature)
            ess, n = distributed.pooled_kish_ess(log_w)
            self.cache.update(index, distributed.pooled_snis_mean(u, log_w), ess / max(n, 1))

    def _trade_loss(self) -> tuple[Tensor, dict]:
        c = self.config
        n = c.trade_points
        if c.trade_mode == "grid":
            # only temperatures whose E[u] came from samples of some weight (trade_ess_floor):
            # where the flow has no effective samples yet, its SNIS estimate is one sample's u
            trusted = self.cache.trusted(c.trade_ess_floor)
            if not len(trusted):
                return torch.zeros((), device=self.device), {"trade_points_kept": 0.0}
            index = trusted[torch.randint(len(trusted), (n,), device=self.device)]
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
            z_d = self._data_batch(n)
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
        derivative = dlogp_dlogt(self.flow.log_prob, z[keep], t[keep], create_graph=True)
        residual = trade_residual(derivative, u[keep], expected[keep])
        loss = residual_loss(residual, c.residual_loss, c.huber_delta)
        return loss, {"trade_residual_rms": float(residual.detach().pow(2).mean().sqrt()),
                      "trade_points_kept": float(keep.float().mean())}

    def _reverse_kl(self) -> Tensor:
        """KL(flow || target) up to log Z, E[log p + u' - log|dx/dz|] over reparameterised
        flow samples: at T0 for the data-free boundary (over the range with
        ``reverse_kl_temperatures`` "range"), over the range otherwise. u' is the
        reduced energy cut linearly-logarithmically above ``reverse_kl_energy_cut``, so that
        clashes of an early flow (u up to 1e9) cannot dominate the gradients."""
        c = self.config
        n = c.reverse_kl_samples
        if c.kind is Objective.DATA_FREE and c.reverse_kl_temperatures == "t0":
            temperature = torch.full((n,), float(self.target.reference_temperature), device=self.device)
        else:
            temperature = self._temperatures(n)
        z, log_p = self.flow.rsample(n, temperature)
        u, log_det = self.target.reduced_energy(z, temperature, c.chirality_restraint_kt)
        return (log_p + linear_log_cut(u, c.reverse_kl_energy_cut) - log_det).mean()

    def loss(self) -> tuple[Tensor, dict]:
        """The objective of this step and its parts (floats)."""
        c = self.config
        parts: dict = {}
        loss = torch.zeros((), device=self.device)
        if self._in_prior_phase():  # no energies: maximum likelihood on the structure prior
            nll = -self.flow.log_prob(self._data_batch(c.batch_size, self.prior),
                                      self.target.reference_temperature).mean()
            return nll, {"prior_nll": float(nll.detach())}
        if c.kind.fits_data:
            batch = self._data_batch(c.batch_size)
            nll = -self.flow.log_prob(batch, self.target.reference_temperature).mean()
            loss = loss + nll
            parts["nll_t0"] = float(nll.detach())
        if c.kind.uses_trade:
            weight = self._trade_weight()
            if weight > 0:
                if c.trade_mode == "grid" and (not self.cache.ready or self.step % c.cache_every == 0):
                    self.refresh_cache()
                trade, extra = self._trade_loss()
                loss = loss + weight * trade
                parts.update(trade=float(trade.detach()), trade_weight=weight, **extra)
        if c.kind is Objective.INTERPOLATION:
            x, lam = residual_points(self.flow, c.batch_size)
            energy = lambda z, t: self.target.reduced_energy(z, t)[0]
            residual, excess = continuity_residual(self.flow, energy, x, lam)
            # as for TRADE: points whose energy change is far from its mean (high-energy
            # points of the broad base) carry no weight, only noise
            residual = residual[torch.isfinite(residual) & (excess <= c.residual_cutoff)]
            continuity = residual_loss(residual, c.residual_loss, c.huber_delta)
            loss = loss + continuity
            parts.update(continuity=float(continuity.detach()),
                         continuity_residual_rms=float(residual.detach().pow(2).mean().sqrt()))
        if c.kind.uses_reverse_kl:
            kl = self._reverse_kl()
            loss = loss + kl
            parts["reverse_kl"] = float(kl.detach())
        if c.kind is Objective.DATA_FREE and c.boundary_buffer_samples:
            nll = self._boundary_buffer_nll()
            loss = loss + nll
            parts.update(boundary_nll=float(nll.detach()), buffer_ess=self.boundary_buffer.relative_ess)
        return loss, parts

    def _boundary_buffer_nll(self) -> Tensor:
        """Importance-weighted NLL at T0 on a buffer of the flow's own samples, redrawn every
        ``boundary_buffer_every`` steps (:mod:`trademd.training.refine`): the data-free stand-in
        for the data that anchors the boundary while TRADE reshapes the other temperatures."""
        c = self.config
        draw = self.step // c.boundary_buffer_every
        if self.boundary_buffer is None or self.boundary_buffer.round_index != draw:
            t0 = float(self.target.reference_temperature)
            temperatures = torch.full((self._share(c.boundary_buffer_samples),), t0, device=self.device)
            self.boundary_buffer = self._weighted_buffer(draw, temperatures)
        z, t = self.boundary_buffer.batch(c.batch_size)
        return -self.flow.log_prob(z, t).mean()

    # -- refinement ----------------------------------------------------------------------

    def _start_refinement_round(self, round_index: int) -> None:
        """Draw this round's buffer from the EMA flow; the first round starts from the
        selected parameters with a fresh optimiser at the refinement learning rate."""
        c = self.config
        if round_index == 0:
            if self.best is not None:
                self.flow.load_state_dict(self.best["state_dict"])
            self.ema = AveragedModel(self.flow, multi_avg_fn=get_ema_multi_avg_fn(c.ema_decay))
            self.optimizer = torch.optim.Adam(self.flow.parameters(), lr=c.refine_learning_rate)
        grid = self.cache.temperatures.float()
        per_temperature = max(1, self._share(c.refine_samples) // len(grid))
        self.buffer = self._weighted_buffer(round_index, grid.repeat_interleave(per_temperature))

    def _weighted_buffer(self, round_index: int, temperatures: Tensor) -> RefinementBuffer:
        """Samples of the EMA flow at ``temperatures`` [n], weighed for exp(-u) and clipped
        (:class:`RefinementBuffer`): the refinement rounds' buffers and the data-free boundary's."""
        c = self.config
        z, _, _, log_w = importance_weights(self.model, self.target, len(temperatures), temperatures,
                                            chirality_restraint_kt=c.chirality_restraint_kt)
        return RefinementBuffer.from_samples(round_index, z, temperatures.to(z.device), log_w,
                                             c.refine_clip_fraction)

    def _refine_loss(self) -> tuple[Tensor, dict]:
        """Weighted forward KL on the buffer plus the NLL of the data at T0."""
        c = self.config
        round_index = (self.step - c.steps) // c.refine_steps
        if self.buffer is None or self.buffer.round_index != round_index:
            self._start_refinement_round(round_index)
        z, t = self.buffer.batch(c.batch_size)
        refine_nll = -self.flow.log_prob(z, t).mean()
        parts = {"refine_nll": float(refine_nll.detach()), "buffer_ess": self.buffer.relative_ess}
        if not c.kind.fits_data:
            return refine_nll, parts
        batch = self._data_batch(c.batch_size)
        nll = -self.flow.log_prob(batch, self.target.reference_temperature).mean()
        return refine_nll + nll, {**parts, "nll_t0": float(nll.detach())}

    # -- the loop ----------------------------------------------------------------------------

    def train(self, show_progress: bool = True) -> Path:
        """Run the main phase and the refinement rounds; checkpoint and write metrics as
        configured. Afterwards ``self.flow`` holds the selected parameters.

        Returns:
            The path of ``model.pt``.
        """
        c = self.config
        if self.ranks.is_main:
            (self.run_dir / "config.json").write_text(json.dumps(asdict(c), indent=2))
            if self.step == 0:  # a fresh run: no metrics of an earlier one
                (self.run_dir / "metrics.csv").unlink(missing_ok=True)
        if c.kind is Objective.INTERPOLATION and self.step == 0:
            initialise_normaliser_rate(self.flow, lambda z, t: self.target.reduced_energy(z, t)[0])
        progress = Progress(c.total_steps, "steps", enabled=show_progress and self.ranks.is_main)
        started, start_step = time.perf_counter(), self.step
        while self.step < c.total_steps:
            refining = self.step >= c.steps
            self.optimizer.zero_grad(set_to_none=True)
            loss, parts = self._refine_loss() if refining else self.loss()
            if not distributed.all_finite(loss.detach()):
                self._bad_batch()
                continue
            loss.backward()
            distributed.average_gradients(self.flow.parameters())
            norm = torch.nn.utils.clip_grad_norm_(self.flow.parameters(), c.clip_norm)
            if not torch.isfinite(norm):
                self._bad_batch()
                continue
            self.optimizer.step()
            if not refining:
                self.scheduler.step()
            self.ema.update_parameters(self.flow)
            self.step += 1
            if self._metrics_due():
                rate = (self.step - start_step) / (time.perf_counter() - started)
                self._write_metrics({"phase": "refine" if refining else "main",
                                     "loss": float(loss.detach()), **parts, "steps_per_s": rate})
                terms = {k: f"{parts[k]:.3f}" for k in ("nll_t0", "prior_nll", "boundary_nll", "trade", "reverse_kl",
                                                      "continuity", "refine_nll")
                         if k in parts}
                progress.update(self.step, loss=f"{float(loss.detach()):.3f}", **terms,
                                ess_tmin=f"{self.last_metrics['ess_tmin']:.3f}")
            if self.step % c.checkpoint_every == 0 or self.step == c.total_steps:
                self.save_checkpoint()
        if self.best is not None:
            self.flow.load_state_dict(self.best["state_dict"])
        path = self.save_model()
        distributed.barrier()  # model.pt exists for every rank once train() returns
        return path

    def _metrics_due(self) -> bool:
        """Every ``metrics_every`` steps, at the end of the main phase and of every round."""
        c = self.config
        end_of_round = self.step > c.steps and (self.step - c.steps) % c.refine_steps == 0
        return self.step % c.metrics_every == 0 or self.step == c.steps or end_of_round

    def _bad_batch(self) -> None:
        self.bad_batches += 1
        self.optimizer.zero_grad(set_to_none=True)
        if self.bad_batches >= self.config.max_bad_batches:
            raise TradeMDError(
                f"training stopped: {self.bad_batches} batches gave a non-finite loss or gradient "
                f"(last at step {self.step}); lower the learning rate or check the data energies"
            )

    # -- metrics and model selection ---------------------------------------------------------

    @torch.no_grad()
    def metrics(self) -> dict:
        """Scores of the EMA flow: validation NLL at T0 and the Kish relative ESS at every
        selection temperature, each pooled over ``metrics_samples`` flow samples."""
        c = self.config
        values = {"step": self.step, "bad_batches": self.bad_batches}
        if self.validation is not None:
            mine = self.validation[self.ranks.rank::self.ranks.world_size]
            log_p = self.model.log_prob(mine, self.target.reference_temperature).double()
            sums = distributed.all_reduce(torch.stack([log_p.sum(), torch.tensor(
                float(len(mine)), dtype=torch.float64, device=log_p.device)]))
            values["val_nll_t0"] = float(-sums[0] / sums[1])
        for name, temperature in self.selection_temperatures():
            _, _, _, log_w = importance_weights(self.model, self.target, self._share(c.metrics_samples),
                                                temperature, chirality_restraint_kt=c.chirality_restraint_kt)
            ess, n = distributed.pooled_kish_ess(log_w)
            values[f"ess_{name}"] = ess / n
        values["energy_evaluations"] = self.energy_evaluations()
        return values

    def _selection_score(self, values: dict) -> tuple[float | None, str]:
        """(score, criterion) of a metrics row; None where this step may not be selected."""
        c = self.config
        if not c.selects_by_ess:
            if "val_nll_t0" not in values:
                return None, "last step (no validation data)"
            return -values["val_nll_t0"], "validation NLL at T0"
        if c.kind.uses_trade and self.step < (c.warmup_fraction + c.ramp_fraction) * c.steps:
            return None, "TRADE weight still ramping up"
        floor = 1.0 / c.metrics_samples
        logs = [math.log(max(values[f"ess_{name}"], floor)) for name, _ in self.selection_temperatures()]
        names = ", ".join(f"{t:g}" for _, t in self.selection_temperatures())
        return sum(logs) / len(logs), f"mean log relative ESS at {names}"

    def _select(self, values: dict) -> bool:
        """Keep the EMA parameters if this step scores best so far; returns whether it did."""
        score, criterion = self._selection_score(values)
        if score is None and self.best is not None and self.best["score"] is not None:
            return False
        if score is not None and self.best is not None and self.best["score"] is not None \
                and score <= self.best["score"]:
            return False
        self.best = {"step": self.step, "score": score, "criterion": criterion,
                     "state_dict": {k: v.detach().clone() for k, v in self.model.state_dict().items()}}
        return True

    def _columns(self) -> list[str]:
        focus = [f"ess_{name}" for name, _ in self.selection_temperatures()[3:]]
        return list(METRICS_COLUMNS) + focus

    def _write_metrics(self, parts: dict) -> None:
        row = {**self.metrics(), **parts}
        selected = self._select(row)
        row["selection_score"] = self.best["score"] if selected else None
        row["selected"] = int(selected)
        self.last_metrics = row
        if not self.ranks.is_main:
            return
        path = self.run_dir / "metrics.csv"
        new_file = not path.exists()
        with path.open("a", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=self._columns())
            if new_file:
                writer.writeheader()
            writer.writerow(row)

    # -- persistence -------------------------------------------------------------------------

    def save_checkpoint(self) -> Path:
        """Write ``checkpoint.pt`` (rank 0): all state needed to continue exactly, with every
        rank's random state."""
        path = self.run_dir / "checkpoint.pt"
        rank_rngs = distributed.gather_objects(self._rng_states())
        evaluations = self.energy_evaluations()
        if not self.ranks.is_main:
            return path
        state = {
            "step": self.step, "bad_batches": self.bad_batches,
            "flow": self.flow.state_dict(), "ema": self.ema.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(), "cache": self.cache.state_dict(),
            "best": self.best, "buffer": None if self.buffer is None else self.buffer.state_dict(),
            "boundary_buffer": None if self.boundary_buffer is None else self.boundary_buffer.state_dict(),
            "rank_rngs": rank_rngs, "energy_evaluations": evaluations,
            "data_generator": self.data_generator.get_state(), "config": asdict(self.config),
        }
        torch.save(state, path.with_suffix(".tmp"))
        path.with_suffix(".tmp").replace(path)
        return path

    def resume(self) -> None:
        """Continue from ``checkpoint.pt`` in ``run_dir``, on the same or another number of
        ranks (a rank the checkpoint has no random state for starts a fresh stream; inside a
        refinement round every rank continues on rank 0's buffer)."""
        path = self.run_dir / "checkpoint.pt"
        if not path.is_file():
            raise TradeMDError(f"no checkpoint to resume in {str(self.run_dir)!r}: drop --resume")
        state = torch.load(path, map_location=self.device, weights_only=False)
        if "ema" not in state:
            raise TradeMDError(f"{str(path)!r} was written by an older trade-md without weight "
                               "averaging: train into a new --out")
        self.flow.load_state_dict(state["flow"])
        self.step, self.bad_batches = state["step"], state["bad_batches"]
        if self.step > self.config.steps:  # inside refinement: its optimiser, not the main one
            self.optimizer = torch.optim.Adam(self.flow.parameters(), lr=self.config.refine_learning_rate)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.ema.load_state_dict(state["ema"])
        self.cache.load_state_dict({"relative_ess": torch.full_like(self.cache.relative_ess, math.nan),
                                    **state["cache"]})  # checkpoints from before the ESS was kept
        self.best = state["best"]
        if state["buffer"] is not None:
            self.buffer = RefinementBuffer.from_state_dict(state["buffer"])
        if state.get("boundary_buffer") is not None:
            self.boundary_buffer = RefinementBuffer.from_state_dict(state["boundary_buffer"])
        rank_rngs = state.get("rank_rngs") or [{"cpu": state["torch_rng"], "cuda": state.get("cuda_rng")}]
        if self.ranks.rank < len(rank_rngs):
            torch.set_rng_state(rank_rngs[self.ranks.rank]["cpu"].cpu())
            cuda = rank_rngs[self.ranks.rank]["cuda"]
            if cuda is not None and self.device.type == "cuda":
                torch.cuda.set_rng_state(cuda.cpu(), self.device)
        else:  # resumed on more ranks than it was written by: a fresh stream for this one
            torch.manual_seed(_rank_seed(self.config.seed, self.ranks.rank, self.step))
        if "data_generator" in state:
            self.data_generator.set_state(state["data_generator"])
        # counted once, on rank 0; every process's own count starts again from zero
        self.evaluations_before = state.get("energy_evaluations", 0) if self.ranks.is_main else 0

    def _rng_states(self) -> dict:
        """This rank's random states (CPU, and its CUDA device's when on one)."""
        return {"cpu": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None}

    def save_model(self) -> Path:
        """Write ``model.pt`` (the selected EMA parameters: flow, target record, temperature
        range, T0, the energy evaluations of the whole training) and ``selection.json`` (which
        step was chosen and why); rank 0 writes."""
        path = self.run_dir / "model.pt"
        evaluations = self.energy_evaluations()
        if not self.ranks.is_main:
            return path
        flow = build_flow(self.flow.config).to(self.device)
        flow.load_state_dict(self.best["state_dict"] if self.best else self.model.state_dict())
        selection = {k: v for k, v in (self.best or {}).items() if k != "state_dict"}
        torch.save({
            "format": MODEL_FORMAT,
            "format_version": MODEL_FORMAT_VERSION,
            "flow": flow.checkpoint(),
            "target": self.target.record(),
            "reference_temperature": self.target.reference_temperature,
            "temperature_range": [self.config.t_min, self.config.t_max],
            "objective": self.config.objective,
            "selection": selection,
            "energy_evaluations": evaluations,
        }, path)
        (self.run_dir / "selection.json").write_text(json.dumps(selection, indent=2))
        return path


def _rank_seed(seed: int, rank: int, step: int) -> int:
    """Seed of the flow-sample stream of a rank > 0 (rank 0 keeps the run's own seed)."""
    return (seed * 1_000_003 + rank * 7919 + step) % (2 ** 63)

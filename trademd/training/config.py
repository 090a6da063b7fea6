"""Settings of a training run: nested, typed dataclasses that hold every training default once.

:class:`TrainConfig` is the run; its sections group the settings of one part of the
training (the optimiser, the TRADE loss, the reverse KL, the data-free boundary, the
refinement rounds, metrics and checkpoints, the flow). Their defaults are the ``quick``
preset (minutes on a laptop CPU for alanine dipeptide); presets and objectives change them by
overrides (:data:`PRESETS`, ``Objective.defaults``). Temperatures in K (reduced units for
analytic systems).

Settings are written nested (``{"trade": {"trade_points": 512}}``) or flat
(``{"trade_points": 512}``): every setting's name is unique over the sections, so a flat name
says where it lives. :meth:`TrainConfig.from_settings` checks every name and type, so a
mistyped key in a config file is a one-line :class:`TradeMDError`, not a later TypeError.
"""

import difflib
from dataclasses import MISSING, dataclass, field, fields, is_dataclass
import types
import typing

from trademd.errors import TradeMDError

__all__ = ["OptimiserSettings", "TradeSettings", "ReverseKLSettings", "DataFreeSettings",
           "RefinementSettings", "ReportSettings", "FlowSettings", "CoordinateSettings", "TrainConfig", "PRESETS",
           "DEFAULT_PRESET", "MOLECULE_LAYER_BLOCK", "default_layers", "merge_settings", "setting_names"]

#: One block of coupling layers of a molecule's flow: torsions given torsions, bounded features
#: given torsions, bounded given bounded.
MOLECULE_LAYER_BLOCK = ["torsions|torsions", "bounded|torsions", "bounded|bounded"]


def default_layers(n_torsions: int, molecule_blocks: int = 2) -> list[str]:
    """Coupling layers where the user sets none: three bounded layers for a system without
    torsions (analytic systems), else ``molecule_blocks`` blocks of :data:`MOLECULE_LAYER_BLOCK`
    (2 in the ``quick`` preset; ``paper`` sets 3)."""
    return ["bounded|bounded"] * 3 if n_torsions == 0 else MOLECULE_LAYER_BLOCK * molecule_blocks


@dataclass
class OptimiserSettings:
    """Adam with a one-cycle schedule, gradient clipping, weight averaging.

    Attributes:
        learning_rate: peak learning rate of the one-cycle schedule.
        clip_norm: largest gradient norm (larger gradients are scaled down to it).
        ema_decay: decay of the exponential moving average of the parameters, in [0, 1).
        max_bad_batches: batches with a non-finite loss or gradient before training stops.
        divergence_nats: a main-phase metrics row whose held-out NLL at T0 lies more than this
            (nats) above the phase's lowest rolls the training back to the last healthy row
            (:mod:`trademd.training.guard`); 0 turns the guard off.
        divergence_lr_factor: the learning rate is multiplied by this at every rollback.
        divergence_trade_factor: the TRADE weight is multiplied by this at every rollback.
    """

    learning_rate: float = 1e-3
    clip_norm: float = 3.0
    ema_decay: float = 0.99
    max_bad_batches: int = 50
    divergence_nats: float = 3.0
    divergence_lr_factor: float = 0.5
    divergence_trade_factor: float = 0.5


@dataclass
class TradeSettings:
    """The TRADE residual loss (:mod:`trademd.training.trade`) and its E_T[u] cache.

    Attributes:
        trade_mode: "grid" (E_T[u] cached on a grid of temperatures) or "continuous" (one
            temperature per step, E_T[u] from that step's samples).
        trade_weight: weight of the TRADE loss once ramped in.
        trade_points: evaluation points per step.
        evaluation_points: "samples" (flow samples), "data" (frames at T0) or "both".
        warmup_fraction: fraction of the main phase before the TRADE weight starts to rise.
        ramp_fraction: fraction of the main phase over which it rises to ``trade_weight``.
        residual_loss: "huber" or "squared", of the residuals.
        huber_delta: Huber threshold of the residuals.
        residual_cutoff: points whose u lies more than this above E_T[u] carry no weight.
        grid_size: log-spaced grid temperatures over [t_min, t_max] (T0 and the focus
            temperatures are added).
        trade_ess_floor: grid temperatures whose cached estimate had a lower relative ESS are
            left out of the TRADE loss (grid mode only), in [0, 1).
        cache_samples: flow samples per grid temperature of an E_T[u] estimate.
        cache_every: steps between E_T[u] estimates.
        cache_momentum: weight of the previous estimate in each update.
        expectation: how E_T[u] is estimated from flow samples: "snis" (self-normalised
            importance weights for exp(-u): the Boltzmann mean) or "model" (their plain mean,
            the model's own: :func:`trademd.training.trade.model_mean_log_weights`).
    """

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
    expectation: str = "snis"


@dataclass
class ReverseKLSettings:
    """The reverse KL divergence to exp(-u) on reparameterised flow samples.

    Attributes:
        reverse_kl_samples: flow samples per step.
        reverse_kl_temperatures: "t0" (the data-free boundary at T0 only) or "range".
        reverse_kl_energy_cut: reduced energy above which u is cut linearly-logarithmically.
        chirality_restraint_kt: kT per mirrored chiral centre (molecules), in the reverse KL
            and in every importance weight of training.
    """

    reverse_kl_samples: int = 256
    reverse_kl_temperatures: str = "t0"
    reverse_kl_energy_cut: float = 1000.0
    chirality_restraint_kt: float = 100.0


@dataclass
class DataFreeSettings:
    """Training a molecule without data: the structure prior first, then a boundary at T0
    held by a buffer of the flow's own weighted samples.

    Attributes:
        prior_fraction: fraction of the main phase spent fitting the structure prior, in [0, 1).
        prior_samples: samples drawn from the structure prior.
        boundary_buffer_samples: weighted flow samples at T0 standing in for data (0: none).
        boundary_buffer_every: steps between redraws of that buffer.
    """

    prior_fraction: float = 0.2
    prior_samples: int = 50000
    boundary_buffer_samples: int = 20000
    boundary_buffer_every: int = 150


@dataclass
class RefinementSettings:
    """Refinement rounds after the main phase (:mod:`trademd.training.refine`).

    Attributes:
        refine_rounds: rounds (0: none).
        refine_steps: steps per round.
        refine_samples: flow samples of a round's buffer, over the grid temperatures.
        refine_learning_rate: learning rate of the refinement (Adam, constant).
        refine_clip_fraction: fraction of the largest weights clipped per temperature.
    """

    refine_rounds: int = 7
    refine_steps: int = 400
    refine_samples: int = 40000
    refine_learning_rate: float = 2e-4
    refine_clip_fraction: float = 1e-3


@dataclass
class ReportSettings:
    """Metrics rows (``metrics.csv``, model selection) and checkpoints.

    Attributes:
        metrics_every: steps between metrics rows.
        metrics_samples: flow samples per selection temperature of the ESS metrics (>= 100).
        checkpoint_every: steps between checkpoints.
    """

    metrics_every: int = 150
    metrics_samples: int = 10000
    checkpoint_every: int = 250


@dataclass
class CoordinateSettings:
    """The internal coordinates the flow works in (:mod:`trademd.flow.coordinates`).

    Attributes:
        narrow_torsion_rad: torsions whose circular spread in the training data is below this
            (rad) are modelled as bounded features centred on their mean rather than on the
            circle; 0 models every torsion on the circle. Data-free targets have none.
    """

    narrow_torsion_rad: float = 0.0


@dataclass
class FlowSettings:
    """What the user chooses of the flow (:func:`trademd.flow.conditional.build_flow`); the
    objective completes it from the target. None: the objective's or the flow's default.

    Attributes:
        width: hidden units of each conditioner layer.
        depth: hidden layers of each conditioner.
        bins: spline bins.
        layers: coupling layers, e.g. ["torsions|torsions", "bounded|torsions", "bounded|bounded"].
        conditioner, activation, torsion_base, bounded_base, base_sigma, base_kappa, min_slope,
        torsion_shifts, groups: further settings of the coupling flow.
        atol, rtol: ODE tolerances of the continuous flow (interpolation).
    """

    width: int = 64
    depth: int = 2
    bins: int = 8
    layers: list[str] | None = None
    conditioner: str | None = None
    activation: str | None = None
    torsion_base: str | None = None
    bounded_base: str | None = None
    base_sigma: float | None = None
    base_kappa: float | None = None
    min_slope: float | None = None
    torsion_shifts: str | None = None
    groups: dict | None = None
    atol: float | None = None
    rtol: float | None = None

    def chosen(self) -> dict:
        """The settings that are set (not None), as the flow's config takes them."""
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}


@dataclass
class TrainConfig:
    """Settings of a training run (temperatures in K, reduced units for analytic systems).

    Attributes:
        t_min, t_max: the trained temperature range.
        objective: the name of the objective (:mod:`trademd.training.objectives`).
        steps: steps of the main phase.
        batch_size: minibatch size (per rank under torchrun).
        seed: random seed.
        focus_temperatures: temperatures added to the TRADE grid and to model selection.
        compile_splines: evaluate the flow's splines through ``torch.compile``
            (:func:`trademd.flow.spline.compile_splines`: 1.1-1.3x per step on a CPU after
            30-60 s of compiling; off by default, where the quick preset gains less than that).
    """

    t_min: float
    t_max: float
    objective: str = "trade"
    steps: int = 4000
    batch_size: int = 256
    seed: int = 0
    focus_temperatures: list[float] = field(default_factory=list)
    compile_splines: bool = False
    optimiser: OptimiserSettings = field(default_factory=OptimiserSettings)
    trade: TradeSettings = field(default_factory=TradeSettings)
    reverse_kl: ReverseKLSettings = field(default_factory=ReverseKLSettings)
    data_free: DataFreeSettings = field(default_factory=DataFreeSettings)
    refinement: RefinementSettings = field(default_factory=RefinementSettings)
    reporting: ReportSettings = field(default_factory=ReportSettings)
    flow: FlowSettings = field(default_factory=FlowSettings)
    coordinates: CoordinateSettings = field(default_factory=CoordinateSettings)

    @classmethod
    def from_settings(cls, settings: dict, source: str = "settings") -> "TrainConfig":
        """A config from nested or flat settings (every key and type checked).

        Args:
            settings: {name: value}, with sections as dicts ({"trade": {...}}) or their
                settings by flat name; must hold t_min and t_max.
            source: what the settings came from, for error messages (e.g. a file name).
        """
        return _build(cls, merge_settings({}, settings, source), source)

    @property
    def total_steps(self) -> int:
        """Main phase plus refinement rounds."""
        return self.steps + self.refinement.refine_rounds * self.refinement.refine_steps

    def validate(self, reference_temperature: float) -> None:
        """Raise :class:`TradeMDError` for impossible settings (the objective adds its own
        refusals: ``Objective.check``)."""
        t, refinement = self.trade, self.refinement
        if not 0 < self.t_min < self.t_max:
            raise TradeMDError(f"need 0 < tmin < tmax, got tmin={self.t_min}, tmax={self.t_max}")
        if not self.t_min <= reference_temperature <= self.t_max:
            raise TradeMDError(
                f"the data temperature T0={reference_temperature:g} lies outside "
                f"[{self.t_min:g}, {self.t_max:g}]: choose --tmin/--tmax around it"
            )
        if t.trade_mode not in ("grid", "continuous"):
            raise TradeMDError("trade mode must be grid or continuous")
        if not 0.0 <= t.trade_ess_floor < 1.0 or (t.trade_ess_floor and t.trade_mode != "grid"):
            raise TradeMDError(f"trade_ess_floor must lie in [0, 1) and needs trade_mode grid, got "
                               f"{t.trade_ess_floor} with {t.trade_mode}")
        if t.expectation not in ("snis", "model"):
            raise TradeMDError(f"expectation must be snis or model, got {t.expectation!r}")
        if t.evaluation_points not in ("samples", "data", "both"):
            raise TradeMDError("evaluation points must be samples, data or both")
        if self.reverse_kl.reverse_kl_temperatures not in ("t0", "range"):
            raise TradeMDError(f"reverse_kl_temperatures must be t0 or range, got "
                               f"{self.reverse_kl.reverse_kl_temperatures!r}")
        if not 0.0 <= self.data_free.prior_fraction < 1.0:
            raise TradeMDError(f"prior_fraction must lie in [0, 1), got {self.data_free.prior_fraction}")
        if self.steps < 4 or self.batch_size < 2:
            # the one-cycle schedule needs a few steps to rise and fall
            raise TradeMDError("--steps must be at least 4 and --batch-size at least 2")
        if not 0.0 <= self.optimiser.ema_decay < 1.0:
            raise TradeMDError(f"ema_decay must lie in [0, 1), got {self.optimiser.ema_decay}")
        o = self.optimiser
        if o.divergence_nats < 0 or not (0.0 < o.divergence_lr_factor <= 1.0 and 0.0 < o.divergence_trade_factor <= 1.0):
            raise TradeMDError(f"divergence_nats must be >= 0 and divergence_lr_factor, divergence_trade_factor "
                               f"in (0, 1], got {o.divergence_nats}, {o.divergence_lr_factor}, "
                               f"{o.divergence_trade_factor}")
        if self.reporting.metrics_samples < 100:
            raise TradeMDError("metrics_samples must be at least 100 (ESS from fewer is noise)")
        if refinement.refine_rounds < 0 or (refinement.refine_rounds and (
                refinement.refine_steps < 1 or refinement.refine_samples < 100)):
            raise TradeMDError("refinement needs refine_rounds >= 0, refine_steps >= 1 and refine_samples >= 100")
        if not 0.0 <= self.coordinates.narrow_torsion_rad < 3.1:
            raise TradeMDError(f"narrow_torsion_rad must lie in [0, 3.1) rad, got "
                               f"{self.coordinates.narrow_torsion_rad}")
        outside = [t for t in self.focus_temperatures if not self.t_min <= t <= self.t_max]
        if outside:
            raise TradeMDError(f"focus temperatures {outside} lie outside [{self.t_min:g}, {self.t_max:g}]: "
                               "widen --tmin/--tmax")


#: The preset of ``trade-md train`` and ``trade-md run`` unless told otherwise.
DEFAULT_PRESET = "quick"
#: Training presets: what each changes from the defaults above, which are the ``quick`` preset
#: (minutes on a laptop CPU); ``paper`` is the TRADE paper's alanine-dipeptide scale, for a GPU.
PRESETS: dict[str, dict] = {
    "quick": {},
    "paper": {
        "steps": 80000, "batch_size": 290,
        "optimiser": {"learning_rate": 1e-4, "ema_decay": 0.999},
        "trade": {"grid_size": 25, "cache_samples": 5000, "cache_every": 1000, "cache_momentum": 0.9,
                  "trade_points": 512, "evaluation_points": "samples", "ramp_fraction": 0.1},
        "reporting": {"metrics_every": 2000, "metrics_samples": 20000, "checkpoint_every": 2000},
        "refinement": {"refine_steps": 2000, "refine_samples": 100000, "refine_learning_rate": 5e-5},
        "flow": {"width": 256, "layers": MOLECULE_LAYER_BLOCK * 3},
    },
}


def _sections() -> dict[str, type]:
    """Section name -> its dataclass."""
    hints = typing.get_type_hints(TrainConfig)
    return {f.name: hints[f.name] for f in fields(TrainConfig) if is_dataclass(hints[f.name])}


def setting_names() -> dict[str, str | None]:
    """Every flat setting name -> the section that holds it (None: the run itself)."""
    names: dict[str, str | None] = {f.name: None for f in fields(TrainConfig) if f.name not in _sections()}
    for section, kind in _sections().items():
        if section == "flow":
            continue  # the flow's settings are only written nested: "width" alone says nothing
        names.update({f.name: section for f in fields(kind)})
    return names


def merge_settings(base: dict, changes: dict, source: str = "settings") -> dict:
    """``base`` (nested) with ``changes`` (nested or flat) written over it, section by section.

    Raises:
        TradeMDError: for a name that is no setting, or a section that is not a mapping.
    """
    sections, names = _sections(), setting_names()
    merged = {k: dict(v) if k in sections else v for k, v in base.items()}
    for key, value in changes.items():
        if key in sections:
            if not isinstance(value, dict):
                raise TradeMDError(f"{source}: {key!r} must be a mapping of its settings "
                                   f"({_names(sections[key])}), got {value!r}")
            known = {f.name for f in fields(sections[key])}
            unknown = sorted(set(value) - known)
            if unknown:
                raise TradeMDError(f"{source}: unknown setting {key}.{unknown[0]}: "
                                   f"{key} holds {_names(sections[key])}")
            merged.setdefault(key, {}).update(value)
        elif key in names and names[key] is not None:
            merged.setdefault(names[key], {})[key] = value
        elif key in names:
            merged[key] = value
        else:
            close = difflib.get_close_matches(key, [*names, *sections], n=1)
            hint = f"did you mean {close[0]!r}?" if close else f"see the sections {sorted(sections)}"
            raise TradeMDError(f"{source}: unknown setting {key!r}: {hint}")
    return merged


def _names(kind: type) -> str:
    return ", ".join(f.name for f in fields(kind))


def _build(kind: type, values: dict, source: str, prefix: str = ""):
    """An instance of the dataclass ``kind`` from checked ``values`` (sections recursively)."""
    hints = typing.get_type_hints(kind)
    missing = [f.name for f in fields(kind) if f.name not in values
               and f.default is MISSING and f.default_factory is MISSING]
    if missing:
        raise TradeMDError(f"{source}: give {', '.join(prefix + name for name in missing)}")
    built = {}
    for name, value in values.items():
        expected = hints[name]
        if is_dataclass(expected):
            built[name] = _build(expected, value, source, f"{prefix}{name}.")
        elif not _is_instance(value, expected):
            raise TradeMDError(f"{source}: {prefix}{name} must be {_type_name(expected)}, got {value!r}")
        else:
            built[name] = value
    return kind(**built)


def _is_instance(value, expected) -> bool:
    """Whether ``value`` fits the annotation ``expected`` (an int is a float; a bool is no number)."""
    origin = typing.get_origin(expected)
    if origin in (typing.Union, types.UnionType):
        return any(_is_instance(value, option) for option in typing.get_args(expected))
    if expected is type(None):
        return value is None
    if expected is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if expected is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if origin is list:
        (item,) = typing.get_args(expected)
        return isinstance(value, (list, tuple)) and all(_is_instance(v, item) for v in value)
    return isinstance(value, origin or expected)


def _type_name(expected) -> str:
    return str(expected).replace("typing.", "").replace("<class '", "").replace("'>", "")

"""How long ``trade-md run`` will take on this machine, said before it starts.

Each stage's work is counted from the run's settings, and the cost of one unit of it is
measured here, in a few seconds, with the code the stage itself runs:

- MD (:func:`trademd.simulate.simulate`): the engine the run builds (all replicas in one
  Context), timed for a burst of saves after a warm-up save; the work is the equilibration
  steps, ``n_saves`` saves of ``steps_per_save`` steps (each with a snapshot of every copy),
  the exact energy of every frame, and a checkpoint per chunk (:func:`md_work`).
- Training (:class:`trademd.training.trainer.Trainer`): a trainer on the molecule's structure
  (the features of the run's data have the same dimensions), with the run's settings, times
  real steps of each kind (NLL only, NLL + TRADE with its energies, refinement) and the
  weighing of a chunk of flow samples by their energies (the ESS metrics, the E_T[u] cache,
  the refinement buffers); the work is counted by :func:`training_work`.
- Sampling (:func:`trademd.sample.sample_run`): ``n_samples`` x temperatures flow samples
  weighed by their energies, at the cost measured for training's chunks.

The estimate changes no result: torch's random state is forked and its thread count
restored, the OpenMM Contexts and energy workers are its own and closed afterwards.
"""

from dataclasses import dataclass, replace
import math
from pathlib import Path
import tempfile
import time
from typing import TYPE_CHECKING, Callable

import numpy as np
import torch

from trademd.errors import TradeMDError
from trademd.md.settings import DynamicsSettings, ExchangeConfig
from trademd.platforms import torch_device
from trademd.training.config import TrainConfig
from trademd.training.objectives import RefinementPhase
from trademd.training.objectives.trade import Trade, TradeTerm
from trademd.training.sampling import importance_weights
from trademd.training.targets import split_frames
from trademd.training.temperatures import grid_temperatures, selection_temperatures

if TYPE_CHECKING:
    from trademd.systems import MolecularSystem

__all__ = ["MDWork", "TrainingWork", "MDCosts", "TrainingCosts", "RunEstimate", "md_work",
           "training_work", "measure_md", "measure_training", "estimate_run", "WEIGHED_BATCH"]

#: Flow samples weighed per timed call: a quarter of the chunks training (``importance_weights``)
#: and sampling (``sample_run``) weigh, so that three calls give a median in about a second;
#: a smaller chunk costs slightly more per sample (ala2-implicit: about 1.2x).
WEIGHED_BATCH = 1024
#: Seconds each timed kind of work is repeated for after its warm-up.
MIN_TIMING_S = 0.25
#: Seed of everything random in the measurement (never the run's streams).
ESTIMATE_SEED = 12345


@dataclass(frozen=True)
class MDWork:
    """What the MD still to run does (:func:`trademd.simulate.simulate`).

    Attributes:
        equilibration_steps: integrator steps of the discarded equilibration (0 on a resume).
        saves: saves left; each is ``steps_per_save`` steps of every copy and a snapshot.
        steps_per_save: integrator steps per save.
        frames: frames whose exact energy is recomputed (saves x copies).
        chunks: chunks written, each with a checkpoint.
    """

    equilibration_steps: int
    saves: int
    steps_per_save: int
    frames: int
    chunks: int


def md_work(config: DynamicsSettings, saves_done: int = 0) -> MDWork:
    """The work of ``config``'s MD from ``saves_done`` saves on (a resume skips the
    equilibration)."""
    copies = (config.ladders * len(config.temperatures_k) if isinstance(config, ExchangeConfig)
              else config.replicas)
    saves = max(0, config.n_saves - saves_done)
    return MDWork(equilibration_steps=config.equilibration_steps if saves_done == 0 else 0, saves=saves,
                  steps_per_save=config.steps_per_save, frames=saves * copies,
                  chunks=math.ceil(saves / config.chunk_saves))


@dataclass(frozen=True)
class MDCosts:
    """Seconds of each unit of MD work on this machine.

    Attributes:
        setup_s: building the engine, minimising, drawing velocities.
        save_s: one save (``steps_per_save`` steps of all copies and a snapshot).
        frame_energy_s: the exact energy of one frame.
        checkpoint_s: one chunk's checkpoint.
    """

    setup_s: float
    save_s: float
    frame_energy_s: float
    checkpoint_s: float

    def seconds(self, work: MDWork) -> float:
        """Expected seconds of ``work``; an equilibration step costs a save's share."""
        return (self.setup_s + work.equilibration_steps * self.save_s / work.steps_per_save
                + work.saves * self.save_s + work.frames * self.frame_energy_s
                + work.chunks * self.checkpoint_s)


@dataclass(frozen=True)
class TrainingWork:
    """What a ``trade`` training does from a given step on, counted from its settings by the
    trainer's own rules (:func:`training_work`).

    Attributes:
        nll_steps: main-phase steps whose TRADE weight is still 0 (the NLL of the data only).
        trade_steps: main-phase steps with the TRADE loss.
        refine_steps: refinement steps.
        trade_step_energies: energy evaluations of one TRADE step (``trade_points`` per kind
            of evaluation point: flow samples, data frames).
        cache_refreshes: E_T[u] estimates (the first TRADE step, then every ``cache_every``).
        cache_energies: energy evaluations of one estimate (grid temperatures x ``cache_samples``).
        metric_rows: metrics rows (every ``metrics_every`` steps and at the end of each round).
        metric_energies: energy evaluations of one row (selection temperatures x ``metrics_samples``).
        refine_buffers: refinement buffers drawn.
        refine_energies: energy evaluations of one buffer.
        validation_frames: held-out frames whose log-likelihood each metrics row computes.
    """

    nll_steps: int
    trade_steps: int
    refine_steps: int
    trade_step_energies: int
    cache_refreshes: int
    cache_energies: int
    metric_rows: int
    metric_energies: int
    refine_buffers: int
    refine_energies: int
    validation_frames: int

    @property
    def weighed_samples(self) -> int:
        """Flow samples drawn and weighed in chunks: metrics, E_T[u] estimates, buffers."""
        return (self.cache_refreshes * self.cache_energies + self.metric_rows * self.metric_energies
                + self.refine_buffers * self.refine_energies)

    @property
    def energy_evaluations(self) -> int:
        """Every energy evaluation: what the trainer counts (``model.pt``'s
        ``energy_evaluations``)."""
        return self.trade_steps * self.trade_step_energies + self.weighed_samples


def training_work(config: TrainConfig, reference_temperature: float, validation_frames: int = 0,
                  steps_done: int = 0) -> TrainingWork:
    """Count what the ``trade`` objective's training does from ``steps_done`` on.

    Step s of the main phase (0-based, s < ``steps``) is a TRADE step where the objective's
    ramp gives it a positive weight (:meth:`TradeTerm.weight`), else an NLL step; in grid mode
    E_T[u] is estimated at the first TRADE step (the cache is empty) and at every TRADE step
    that is a multiple of ``cache_every``. Steps from ``steps`` on are refinement steps, and
    a round's buffer is drawn at its first step. After step s, a metrics row is written when
    s + 1 is a multiple of ``metrics_every`` or ends the main phase or a round. Bad batches
    (repeated steps) are not counted, and every E_T[u] estimate is taken to be finite (a
    non-finite one makes the next TRADE step estimate again).

    Args:
        config: the training's settings (objective ``trade``).
        reference_temperature: T0 (K).
        validation_frames: held-out frames scored at every metrics row.
        steps_done: steps already done (a resumed training).
    """
    if config.objective != "trade":
        raise TradeMDError(f"the estimate counts the trade objective's work only, not {config.objective!r}'s")
    trade, settings = TradeTerm(config, reference_temperature, torch.device("cpu")), config.trade
    refinement = RefinementPhase(config, Trade(config))
    grid = len(grid_temperatures(config, reference_temperature))
    first_trade = next((s for s in range(config.steps) if trade.weight(s) > 0), None)
    nll_steps = trade_steps = refine_steps = refreshes = rows = buffers = 0
    for step in range(steps_done, config.total_steps):
        if step >= config.steps:
            refine_steps += 1
            buffers += (step - config.steps) % config.refinement.refine_steps == 0
        elif trade.weight(step) > 0:
            trade_steps += 1
            refreshes += settings.trade_mode == "grid" and (step == first_trade
                                                            or step % settings.cache_every == 0)
        else:
            nll_steps += 1
        done = step + 1
        rows += (done % config.reporting.metrics_every == 0 or done == config.steps
                 or refinement.ends_round(done))
    kinds = ((settings.evaluation_points in ("samples", "both") or settings.trade_mode == "continuous")
             + (settings.evaluation_points in ("data", "both")))
    return TrainingWork(
        nll_steps=nll_steps, trade_steps=trade_steps, refine_steps=refine_steps,
        trade_step_energies=kinds * settings.trade_points, cache_refreshes=refreshes,
        cache_energies=grid * settings.cache_samples, metric_rows=rows,
        metric_energies=len(selection_temperatures(config, reference_temperature)) * config.reporting.metrics_samples,
        refine_buffers=buffers, refine_energies=grid * max(1, config.refinement.refine_samples // grid),
        validation_frames=validation_frames)


@dataclass(frozen=True)
class TrainingCosts:
    """Seconds of each unit of training (and sampling) work on this machine.

    Attributes:
        setup_s: building the target (system, energy bridge), before the data's features.
        feature_s: the internal-coordinate features of one data frame.
        nll_step_s: one step with the NLL of the data only.
        trade_step_s: one step with the TRADE loss, its energy evaluations included.
        refine_step_s: one refinement step.
        weighed_sample_s: one flow sample weighed by its energy (timed in batches of
            :data:`WEIGHED_BATCH`).
        log_prob_s: the log-likelihood of one frame (no gradient).
    """

    setup_s: float
    feature_s: float
    nll_step_s: float
    trade_step_s: float
    refine_step_s: float
    weighed_sample_s: float
    log_prob_s: float

    def seconds(self, work: TrainingWork, data_frames: int) -> float:
        """Expected seconds of ``work`` on ``data_frames`` frames of MD."""
        return (self.setup_s + data_frames * self.feature_s + work.nll_steps * self.nll_step_s
                + work.trade_steps * self.trade_step_s + work.refine_steps * self.refine_step_s
                + work.weighed_samples * self.weighed_sample_s
                + work.metric_rows * work.validation_frames * self.log_prob_s)


def _seconds_per_call(call: Callable[[], object], min_seconds: float = MIN_TIMING_S,
                      max_calls: int = 9, sync: Callable[[], None] = lambda: None,
                      warm_up: bool = True) -> float:
    """Median wall seconds of ``call`` after a warm-up call (unless ``warm_up`` is False),
    called until ``min_seconds`` have passed or ``max_calls`` calls were made (at least 3 where
    ``max_calls`` allows): the median, because a shared machine slows single calls by
    several times now and then. ``sync`` waits for a GPU's queued work."""
    if warm_up:
        call()
        sync()
    seconds: list[float] = []
    started = time.perf_counter()
    while len(seconds) < max_calls and (len(seconds) < min(3, max_calls)
                                        or time.perf_counter() - started < min_seconds):
        before = time.perf_counter()
        call()
        sync()
        seconds.append(time.perf_counter() - before)
    return float(np.median(seconds))


def measure_md(config: DynamicsSettings) -> MDCosts:
    """Time the MD of ``config`` here: the engine ``simulate`` builds (its platform and
    threads), a warm-up save, then saves for :data:`MIN_TIMING_S`, the exact energies of the
    last save's frames and one checkpoint."""
    from trademd.md.engines import build_engine
    from trademd.md.settings import load_system

    started = time.perf_counter()
    molecule = load_system(config)
    engine = build_engine(molecule.create_openmm_system(config.hydrogen_mass_amu), config)
    engine.prepare(molecule.positions_nm(), 0, config.seed)
    setup_s = time.perf_counter() - started

    def save() -> np.ndarray:
        engine.advance(config.steps_per_save)
        return engine.snapshot()[0]

    save_s = _seconds_per_call(save)
    frames = save().reshape(-1, molecule.n_atoms, 3).astype(np.float32)
    frame_energy_s = _seconds_per_call(lambda: engine.molecule_energy(frames), max_calls=3) / len(frames)

    return MDCosts(setup_s, save_s, frame_energy_s, _seconds_per_call(engine.checkpoint, max_calls=3))


def measure_training(molecule: "MolecularSystem", config: TrainConfig, reference_temperature: float,
                     platform: str = "auto", device: str = "auto") -> TrainingCosts:
    """Time training steps of each kind here, with the run's settings, on a target built from
    the molecule's structure (:meth:`MoleculeTarget.from_structure`: the features of the run's
    data have the same dimensions) and synthetic data: features of the minimised structure
    perturbed by 2 pm. On a CPU with one torch thread, as ``train_run`` trains. The flow is
    untrained; its steps cost what a trained one's do."""
    from trademd.training.targets import MoleculeTarget
    from trademd.training.trainer import Trainer

    torch_dev = torch_device(device)
    sync = (lambda: torch.cuda.synchronize(torch_dev)) if torch_dev.type == "cuda" else (lambda: None)
    started = time.perf_counter()
    target = MoleculeTarget.from_structure(molecule, reference_temperature, platform)
    setup_s = time.perf_counter() - started
    try:
        structure = torch.as_tensor(target.positions(target.structure_features()[None].double())[0])
        noise = np.random.default_rng(ESTIMATE_SEED).normal(0.0, 0.002, size=(1024, *structure.shape[1:]))
        positions = structure + torch.as_tensor(noise)
        feature_s = _seconds_per_call(lambda: target.features(positions), max_calls=3) / len(positions)
        target.data_features = target.features(positions)
        # the same steps, but E_T[u], metrics and buffers from few samples (their cost per sample
        # is timed on its own), enough main steps for the timed ones, no stop for bad batches,
        # and every TRADE point kept (an untrained flow's samples would fall outside the
        # residual cutoff, sparing the derivative a trained flow pays for)
        small = replace(config, steps=max(config.steps, 50),
                        trade=replace(config.trade, cache_samples=16, residual_cutoff=math.inf),
                        reporting=replace(config.reporting, metrics_samples=100),
                        refinement=replace(config.refinement, refine_samples=100, refine_rounds=max(
                            1, config.refinement.refine_rounds)),
                        optimiser=replace(config.optimiser, max_bad_batches=10 ** 6))
        with tempfile.TemporaryDirectory() as run_dir:
            trainer = Trainer(target, small, Path(run_dir), device=torch_dev)
            term = trainer.objective.trade
            # a TRADE step that does not estimate E_T[u] (the warm-up call has filled the cache)
            trade_step = next((s for s in range(small.steps) if term.weight(s) > 0
                               and s % small.trade.cache_every), None)

            def step_at(step: int) -> Callable[[], object]:
                def call():
                    trainer.step = step
                    return trainer.take_step()
                return call

            nll_step_s = _seconds_per_call(step_at(0), sync=sync)
            # no TRADE step where its weight stays 0: none is counted either
            trade_step_s = 0.0 if trade_step is None else _seconds_per_call(step_at(trade_step), sync=sync)
            refine_step_s = _seconds_per_call(step_at(small.steps), sync=sync)
            model = trainer.model
            # the energy workers are warm from the steps
            weighed_sample_s = _seconds_per_call(
                lambda: importance_weights(model, target, WEIGHED_BATCH, reference_temperature,
                                           chirality_restraint_kt=config.reverse_kl.chirality_restraint_kt),
                max_calls=3, sync=sync, warm_up=False) / WEIGHED_BATCH
            frames = target.data_features.to(torch_dev)
            with torch.no_grad():
                log_prob_s = _seconds_per_call(lambda: model.log_prob(frames, reference_temperature),
                                               max_calls=4, sync=sync) / len(frames)
    finally:
        target.close()
    return TrainingCosts(setup_s, feature_s, nll_step_s, trade_step_s, refine_step_s,
                         weighed_sample_s, log_prob_s)


@dataclass(frozen=True)
class RunEstimate:
    """Expected wall seconds of each stage still to run on this machine (None: the stage is
    done and reused), and how long measuring took.

    Attributes:
        md_s, training_s, sampling_s: seconds of each stage.
        measured_s: seconds the measurement took.
        energy_evaluations: energy evaluations the training will count (None: no training).
    """

    md_s: float | None
    training_s: float | None
    sampling_s: float | None
    measured_s: float
    energy_evaluations: int | None = None

    @property
    def total_s(self) -> float:
        """Seconds of every stage still to run."""
        return sum(s for s in (self.md_s, self.training_s, self.sampling_s) if s is not None)

    def line(self) -> str:
        """``expected on this machine: MD ~12 min, training ~17 min, sampling ~1 min (about
        30 min; measured in 4 s)``."""
        stages = [f"{name} ~{_duration(seconds)}" for name, seconds in
                  (("MD", self.md_s), ("training", self.training_s), ("sampling", self.sampling_s))
                  if seconds is not None]
        return (f"expected on this machine: {', '.join(stages)} (about {_duration(self.total_s)}; "
                f"measured in {self.measured_s:.0f} s)")


def _duration(seconds: float) -> str:
    """``1 min`` (at least), ``17 min``, ``2.5 h``."""
    minutes = seconds / 60.0
    if minutes < 100:
        return f"{max(1, round(minutes))} min"
    return f"{minutes / 60:.1f} h"


def estimate_run(config, platform: str = "auto", device: str = "auto", *,
                 md_saves_done: int | None = 0, training_steps_done: int | None = 0,
                 sampling: bool = True) -> RunEstimate:
    """Expected wall seconds of ``trade-md run``'s stages still to run, measured here.

    Args:
        config: the run (a :class:`trademd.pipeline.RunConfig`; the pipeline imports this
            module, not the reverse).
        platform, device: the OpenMM platform and torch device the run uses.
        md_saves_done: saves the data file already holds (None: the MD is done).
        training_steps_done: steps of a resumed training (None: the model is trained).
        sampling: whether the samples are still to draw.
    """
    from trademd.systems import get_system
    from trademd.train import training_config

    started = time.perf_counter()
    threads = torch.get_num_threads()
    md_s = training_s = sampling_s = evaluations = None
    simulation = config.simulation(platform)
    cuda = [torch_device(device)] if torch_device(device).type == "cuda" else []
    try:
        if md_saves_done is not None:
            md_s = measure_md(simulation).seconds(md_work(simulation, md_saves_done))
        if training_steps_done is not None or sampling:
            if not cuda:
                torch.set_num_threads(1)  # as train_run trains
            t_min, t_max = config.temperature_range_k
            train = training_config(t_min, t_max, config.preset, overrides=config.training_overrides())
            t0 = config.data_temperature_k
            with torch.random.fork_rng(devices=cuda):
                torch.manual_seed(ESTIMATE_SEED)
                costs = measure_training(get_system(config.system), train, t0, platform, device)
            if training_steps_done is not None:
                frames = simulation.n_saves * simulation.replicas
                split = split_frames(np.arange(frames) // simulation.replicas)
                work = training_work(train, t0, len(split.validation), training_steps_done)
                training_s = costs.seconds(work, len(split.train) + len(split.validation))
                evaluations = work.energy_evaluations
            if sampling:
                sampling_s = (costs.setup_s + config.n_samples * len(config.temperatures_k)
                              * costs.weighed_sample_s)
    finally:
        torch.set_num_threads(threads)
    return RunEstimate(md_s, training_s, sampling_s, time.perf_counter() - started, evaluations)

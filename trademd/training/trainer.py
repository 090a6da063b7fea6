"""The training loop: one flow, one objective, a main phase and refinement rounds, reporters.

The trainer runs steps: it asks the phase of the step (the objective's main phase, then the
refinement rounds, :mod:`trademd.training.objectives`) for its loss, skips non-finite batches,
averages gradients over ranks, clips, steps the optimiser and the weight average, and hands
every step to its reporters (:mod:`trademd.training.reporters`: metrics.csv and model
selection, progress, checkpoints). It knows no objective by name: each objective says its
loss terms, its flow, its model selection and its state.

Weight averaging and model selection: an exponential moving average (EMA) of the parameters is
kept beside the trained ones; at every metrics step the EMA flow is scored (validation log-likelihood at
T0, the Kish relative ESS at the selection temperatures) and the objective's score decides
whether it is the best so far; ``model.pt`` holds the best-scoring EMA parameters.
``metrics.csv`` marks the chosen step, ``selection.json`` says why.

Data parallel (``torchrun``, :mod:`trademd.distributed`): every rank holds the data and draws
its slice of one global minibatch (``batch_size`` per rank) from a generator all ranks share,
so W ranks at batch B take the same steps as one process at batch W x B; each rank draws its
own flow samples and evaluates their energies; gradients are averaged over ranks before
clipping, and E_T[u], the ESS metrics and the validation log-likelihood are pooled over ranks, so every
rank selects the same step. Rank 0 writes every file.

A run directory holds ``config.json``, ``metrics.csv``, ``checkpoint.pt`` (everything
``resume`` needs) and, at the end, ``model.pt`` (what sampling needs) and ``selection.json``.
"""

import json
from pathlib import Path

import torch
from torch import Tensor

from trademd import distributed
from trademd.distributed import Ranks
from trademd.errors import TradeMDError
from trademd.flow.conditional import TemperatureFlow
from trademd.flow.factory import build_flow
from trademd.flow.spline import compile_splines
from trademd.seeds import stream_seed
from trademd.training.averaging import ExponentialAverage
from trademd.training.batches import MinibatchSource
from trademd.training.checkpoint import load_checkpoint, save_checkpoint
from trademd.training.config import TrainConfig
from trademd.training.guard import DivergenceGuard
from trademd.training.model_file import write_model
from trademd.training.objectives import RefinementPhase, make_objective
from trademd.training.reporters import CheckpointReporter, MetricsReporter, ProgressReporter, StepReport
from trademd.training.scores import relative_ess, validation_nll
from trademd.training.selection import ModelSelector
from trademd.training.temperatures import selection_temperatures

__all__ = ["Trainer", "MainPhase"]


class MainPhase:
    """The main phase, steps [0, steps): the objective's loss, the one-cycle schedule."""

    name = "main"
    scheduled = True

    def __init__(self, objective, config: TrainConfig):
        self.objective, self.config = objective, config

    @property
    def end_step(self) -> int:
        return self.config.steps

    @property
    def learning_rate(self) -> float:
        return self.config.optimiser.learning_rate

    def ends_round(self, step: int) -> bool:
        return step == self.config.steps

    def loss(self, run) -> tuple[Tensor, dict]:
        return self.objective.loss(run)


class Trainer:
    """Runs one training configuration on one target, writing into ``run_dir``.

    Args:
        target: e.g. :class:`trademd.training.targets.AnalyticTarget` or ``MoleculeTarget``.
        config: the settings.
        run_dir: output folder.
        device: torch device.
        validation_features: held-out features at T0 [M, D] for the validation log-likelihood (optional).
        ranks: this process's place in a ``torchrun`` launch (default: the only process).

    Attributes:
        objective: the objective (:mod:`trademd.training.objectives`).
        refinement: the refinement phase after the main one.
        flow: the trained flow; after :meth:`train`, the selected parameters.
        step: steps done.
        reporters: called after the steps they ask for, in order.
    """

    def __init__(self, target, config: TrainConfig, run_dir: str | Path,
                 device: torch.device | str = "cpu", validation_features: Tensor | None = None,
                 ranks: Ranks = Ranks()):
        self.objective = make_objective(config)
        config.validate(target.reference_temperature)
        self.target, self.config, self.device = target, config, torch.device(device)
        self.ranks = ranks
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(config.seed)
        compile_splines(config.compile_splines)
        self.batches = MinibatchSource(target.data_features, config.seed, ranks, self.device)
        self.validation = None if validation_features is None else validation_features.to(self.device)
        self.step = 0
        self.objective.prepare(self)
        self.flow = build_flow(self.objective.flow_config(self)).to(self.device)
        distributed.broadcast_parameters(self.flow)
        if ranks.rank > 0:  # every rank draws its own flow samples
            torch.manual_seed(stream_seed(config.seed, ranks.rank, 0))
        self.optimizer = self.new_optimizer(config.optimiser.learning_rate)
        self.scheduler = torch.optim.lr_scheduler.OneCycleLR(
            self.optimizer, max_lr=config.optimiser.learning_rate, total_steps=config.steps,
            pct_start=min(0.5, max(0.05, 2.0 / config.steps)),
        )
        self.ema = self._averaged(self.flow)
        self.refinement = RefinementPhase(config, self.objective)
        self.phases = [MainPhase(self.objective, config), self.refinement]
        self.selector = ModelSelector()
        o = config.optimiser
        self.guard = DivergenceGuard(o.divergence_nats, o.divergence_lr_factor, o.divergence_trade_factor)
        self.bad_batches = 0
        self.last_metrics: dict = {}
        #: energy evaluations of earlier runs of this training (restored by :meth:`resume`)
        self.evaluations_before = 0
        #: whether :meth:`train` shows progress (its argument)
        self.show_progress = True
        self.reporters = [MetricsReporter(self.run_dir / "metrics.csv"), ProgressReporter(),
                          CheckpointReporter(self.run_dir / "config.json")]

    # -- what objectives and reporters read ------------------------------------------------

    @property
    def model(self) -> TemperatureFlow:
        """The averaged (EMA) flow: what metrics score and what selection keeps."""
        return self.ema.module

    @property
    def data(self) -> Tensor | None:
        """The training features at T0 [N, D] (None: no data)."""
        return self.batches.data

    @property
    def best(self) -> dict | None:
        """{"step", "score", "criterion", "state_dict"} of the selected EMA parameters."""
        return self.selector.best

    def data_batch(self, size: int, source: Tensor | None = None) -> Tensor:
        """This rank's ``size`` frames of a global minibatch of the data (or ``source``)."""
        return self.batches.batch(size, source)

    def share(self, n: int) -> int:
        """This rank's part of ``n`` samples drawn over all ranks."""
        return distributed.shard_sizes(n, self.ranks.world_size)[self.ranks.rank]

    def selection_temperatures(self) -> list[tuple[str, float]]:
        """(name, T) at which ESS is measured and model selection scores: T_min, T0, T_max
        and every focus temperature."""
        return selection_temperatures(self.config, self.target.reference_temperature)

    def energy_evaluations(self) -> int:
        """Target energy evaluations of this training so far, over all ranks and resumes
        (metrics samples, TRADE expectations, refinement buffers: every configuration whose
        energy was computed). A collective call under torchrun."""
        mine = torch.tensor(float(self.target.energy_evaluations), dtype=torch.float64, device=self.device)
        return int(distributed.all_reduce(mine).item()) + self.evaluations_before

    def phase_at(self, step: int):
        """The phase that runs step ``step`` (0-based; the last phase past the end)."""
        return next((p for p in self.phases if step < p.end_step), self.phases[-1])

    def ends_round(self) -> bool:
        """Whether the steps done end the main phase or a refinement round."""
        return any(phase.ends_round(self.step) for phase in self.phases)

    def restart_from_best(self, learning_rate: float) -> None:
        """Load the selected parameters (if any), restart the weight average and the
        optimiser (Adam at ``learning_rate``)."""
        if self.best is not None:
            self.flow.load_state_dict(self.best["state_dict"])
        self.ema = self._averaged(self.flow)
        self.optimizer = self.new_optimizer(learning_rate)

    def new_optimizer(self, learning_rate: float) -> torch.optim.Adam:
        """Adam over the flow's parameters at ``learning_rate``; the fused kernel (one pass
        over each parameter instead of a dozen tensor operations: 4x faster on a CPU)."""
        return torch.optim.Adam(self.flow.parameters(), lr=learning_rate, fused=True)

    def _averaged(self, flow: TemperatureFlow) -> ExponentialAverage:
        return ExponentialAverage(flow, self.config.optimiser.ema_decay)

    # -- the loop ----------------------------------------------------------------------------

    def loss(self) -> tuple[Tensor, dict]:
        """The loss of this step (its phase's) and its parts (floats)."""
        return self.phase_at(self.step).loss(self)

    def train(self, show_progress: bool = True) -> Path:
        """Run the main phase and the refinement rounds, calling the reporters. Afterwards
        ``self.flow`` holds the selected parameters.

        Returns:
            The path of ``model.pt``.
        """
        self.show_progress = show_progress
        self.objective.start(self)
        for reporter in self.reporters:
            reporter.start(self)
        while self.step < self.config.total_steps:
            report = self.take_step()
            if report is None:
                continue
            for reporter in self.reporters:
                if reporter.due(self):
                    reporter.report(self, report)
        if self.best is not None:
            self.flow.load_state_dict(self.best["state_dict"])
        path = self.save_model()
        distributed.barrier()  # model.pt exists for every rank once train() returns
        return path

    def take_step(self) -> StepReport | None:
        """One optimiser step of the phase at ``self.step`` (no reporters); None where the
        loss or gradient was not finite (a bad batch: counted, the step not taken)."""
        phase = self.phase_at(self.step)
        self.optimizer.zero_grad(set_to_none=True)
        loss, parts = self.loss()
        if not distributed.all_finite(loss.detach()):
            self._bad_batch()
            return None
        loss.backward()
        distributed.average_gradients(self.flow.parameters())
        norm = torch.nn.utils.clip_grad_norm_(self.flow.parameters(), self.config.optimiser.clip_norm)
        if not torch.isfinite(norm):
            self._bad_batch()
            return None
        self.optimizer.step()
        if phase.scheduled:
            self.scheduler.step()
        self.ema.update_parameters(self.flow)
        self.step += 1
        return StepReport(phase.name, float(loss.detach()), parts)

    def _bad_batch(self) -> None:
        self.bad_batches += 1
        self.optimizer.zero_grad(set_to_none=True)
        if self.bad_batches >= self.config.optimiser.max_bad_batches:
            raise TradeMDError(
                f"training stopped: {self.bad_batches} batches gave a non-finite loss or gradient "
                f"(last at step {self.step}); lower the learning rate or check the data energies"
            )

    # -- scores and model selection ----------------------------------------------------------

    @torch.no_grad()
    def measure(self) -> dict:
        """Scores of the EMA flow: validation negative log-likelihood at T0 and the Kish relative ESS at every
        selection temperature, each pooled over ``metrics_samples`` flow samples."""
        c = self.config
        values = {"step": self.step, "bad_batches": self.bad_batches, "rollbacks": self.guard.rollbacks}
        if self.validation is not None:
            values["val_nll_t0"] = validation_nll(self.model, self.validation, self.target.reference_temperature,
                                                  self.ranks)
        for name, temperature in self.selection_temperatures():
            values[f"ess_{name}"] = relative_ess(self.model, self.target, self.share(c.reporting.metrics_samples),
                                                 temperature, c.reverse_kl.chirality_restraint_kt)
        values["energy_evaluations"] = self.energy_evaluations()
        return values

    def select(self, values: dict) -> bool:
        """Keep the EMA parameters if this metrics row scores best so far (the objective's
        score); returns whether it did."""
        score, criterion = self.objective.selection_score(values, self)
        return self.selector.offer(self.step, score, criterion, self.model)

    # -- persistence -------------------------------------------------------------------------

    def save_checkpoint(self) -> Path:
        """Write ``checkpoint.pt`` (rank 0; :mod:`trademd.training.checkpoint`)."""
        return save_checkpoint(self, self.run_dir / "checkpoint.pt")

    def resume(self) -> None:
        """Continue from ``checkpoint.pt`` in ``run_dir``, on the same or another number of
        ranks (a rank the checkpoint has no random state for starts a fresh stream)."""
        if not load_checkpoint(self, self.run_dir / "checkpoint.pt"):
            torch.manual_seed(stream_seed(self.config.seed, self.ranks.rank, self.step))

    def save_model(self) -> Path:
        """Write ``model.pt`` (the selected EMA parameters) and ``selection.json`` (which step
        was chosen and why); rank 0 writes."""
        path = self.run_dir / "model.pt"
        evaluations = self.energy_evaluations()
        if not self.ranks.is_main:
            return path
        flow = build_flow(self.flow.config).to(self.device)
        flow.load_state_dict(self.best["state_dict"] if self.best else self.model.state_dict())
        selection = self.selector.description()
        write_model(path, flow, self.target, (self.config.t_min, self.config.t_max), self.config.objective,
                    selection, evaluations)
        (self.run_dir / "selection.json").write_text(json.dumps(selection, indent=2))
        return path


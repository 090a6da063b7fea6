"""Reporters of the training loop (as OpenMM's ``Simulation`` calls its reporters): the loop
knows no files; each reporter says when it wants a step and writes what it keeps.

- :class:`MetricsReporter`: scores the EMA flow, offers it to model selection, appends a row
  to ``metrics.csv``.
- :class:`ProgressReporter`: the progress display.
- :class:`CheckpointReporter`: ``config.json`` at the start, ``checkpoint.pt`` when due.
"""

import csv
from dataclasses import asdict, dataclass
import json
from pathlib import Path
import sys
import time
from typing import Protocol

from trademd.progress import Progress

__all__ = ["StepReport", "Reporter", "MetricsReporter", "ProgressReporter", "CheckpointReporter",
           "METRICS_COLUMNS"]

#: Columns of metrics.csv (a term that an objective lacks stays empty; the focus temperatures'
#: ESS columns follow).
METRICS_COLUMNS = ("step", "phase", "loss", "nll_t0", "val_nll_t0", "val_nll_t0_trained", "trade", "trade_weight",
                   "trade_residual_rms", "trade_points_kept", "reverse_kl", "continuity",
                   "continuity_residual_rms", "prior_nll", "boundary_nll", "refine_nll",
                   "buffer_ess", "ess_tmin", "ess_t0", "ess_tmax", "selection_score", "selected",
                   "bad_batches", "rollbacks", "energy_evaluations", "steps_per_s")


@dataclass
class StepReport:
    """What a finished step hands its reporters.

    Attributes:
        phase: "main" or "refine".
        loss: the step's loss.
        parts: its terms as floats, by metrics.csv column.
    """

    phase: str
    loss: float
    parts: dict


class Reporter(Protocol):
    """What the loop calls: ``start`` before the first step, ``report`` after every step for
    which ``due`` says so (the trainer's ``step`` counts the steps done)."""

    def start(self, trainer) -> None: ...

    def due(self, trainer) -> bool: ...

    def report(self, trainer, step: StepReport) -> None: ...


def _warn(trainer, message: str) -> None:
    """One warning line on stderr (rank 0), on a line of its own beside the progress bar."""
    if trainer.ranks.is_main:
        print(f"\ntrade-md train: warning: {message}", file=sys.stderr, flush=True)


def metrics_due(trainer) -> bool:
    """Every ``metrics_every`` steps, and at the end of the main phase and of every round."""
    return trainer.step % trainer.config.reporting.metrics_every == 0 or trainer.ends_round()


class MetricsReporter:
    """Scores the EMA flow (:meth:`Trainer.measure`), offers it to model selection and to the
    divergence guard (:mod:`trademd.training.guard`), sets ``trainer.last_metrics`` and (rank 0)
    appends the row to ``metrics.csv``.

    Args:
        path: the metrics file.
    """

    def __init__(self, path: Path):
        self.path = path
        self.started, self.start_step = time.perf_counter(), 0

    def start(self, trainer) -> None:
        if trainer.ranks.is_main and trainer.step == 0:  # a fresh run: no metrics of an earlier one
            self.path.unlink(missing_ok=True)
        self.started, self.start_step = time.perf_counter(), trainer.step

    def due(self, trainer) -> bool:
        return metrics_due(trainer)

    def report(self, trainer, step: StepReport) -> None:
        rate = (trainer.step - self.start_step) / (time.perf_counter() - self.started)
        row = {**trainer.measure(), "phase": step.phase, "loss": step.loss, **step.parts, "steps_per_s": rate}
        rolled_back = trainer.guard.check(trainer, row)  # a diverged row is not offered to selection
        selected = not rolled_back and trainer.select(row)
        row["selection_score"] = trainer.best["score"] if selected else None
        row["selected"] = int(selected)
        if rolled_back:
            row["rollbacks"] = trainer.guard.rollbacks
            o = trainer.config.optimiser
            _warn(trainer, f"step {trainer.step}: held-out NLL at T0 {row['val_nll_t0']:.2f} nats, more than "
                           f"{o.divergence_nats:g} above its lowest; back to the last healthy metrics row, "
                           f"learning rate x{o.divergence_lr_factor:g}, TRADE weight x{o.divergence_trade_factor:g}")
        trainer.last_metrics = row
        if not trainer.ranks.is_main:
            return
        columns = list(METRICS_COLUMNS) + [f"ess_{name}" for name, _ in trainer.selection_temperatures()[3:]]
        new_file = not self.path.exists()
        with self.path.open("a", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=columns)
            if new_file:
                writer.writeheader()
            writer.writerow(row)


class ProgressReporter:
    """The progress bar, updated with the loss terms at every metrics row (shown on rank 0
    when the trainer's ``show_progress`` says so)."""

    #: loss terms shown, where a step has them
    TERMS = ("nll_t0", "prior_nll", "boundary_nll", "trade", "reverse_kl", "continuity", "refine_nll")

    def __init__(self):
        self.progress: Progress | None = None

    def start(self, trainer) -> None:
        self.progress = Progress(trainer.config.total_steps, "steps",
                                 enabled=trainer.show_progress and trainer.ranks.is_main)

    def due(self, trainer) -> bool:
        return metrics_due(trainer)

    def report(self, trainer, step: StepReport) -> None:
        terms = {k: f"{step.parts[k]:.3f}" for k in self.TERMS if k in step.parts}
        self.progress.update(trainer.step, loss=f"{step.loss:.3f}", **terms,
                             ess_tmin=f"{trainer.last_metrics['ess_tmin']:.3f}")


class CheckpointReporter:
    """Writes ``config.json`` when the loop starts and ``checkpoint.pt`` every
    ``checkpoint_every`` steps and at the last step (:meth:`Trainer.save_checkpoint`).

    Args:
        config_path: where the settings go.
    """

    def __init__(self, config_path: Path):
        self.config_path = config_path

    def start(self, trainer) -> None:
        if trainer.ranks.is_main:
            self.config_path.write_text(json.dumps(asdict(trainer.config), indent=2))

    def due(self, trainer) -> bool:
        c = trainer.config
        return trainer.step % c.reporting.checkpoint_every == 0 or trainer.step == c.total_steps

    def report(self, trainer, step: StepReport) -> None:
        trainer.save_checkpoint()

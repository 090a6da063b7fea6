"""The divergence guard of the main phase: a rollback when the fit at T0 falls apart.

On a ~100-dimensional molecule the TRADE loss can pull the flow away from the data it was fitted
to: on ala4 (seed 0, the 4,000-step preset, docs/results.md) the held-out NLL at T0 rose from
-13.0 to +11 nats within 150 steps of the TRADE weight's ramp and never came back, so every
later step, and the model selected from them, was lost. Healthy runs move the held-out NLL by
less than 0.2 nats after its minimum (ala2, Pro, Trp), 1.9 on ala4's refinement rounds.

At every metrics row of the main phase the guard scores the held-out NLL at T0 of both the
weight-averaged flow (the row's ``val_nll_t0``) and the trained one (on :data:`GUARD_FRAMES`
of the held-out frames), against the lowest seen in the phase. Both within ``divergence_nats``
of it: the row is healthy and the guard keeps a copy of the training state (parameters,
weight average, optimiser, the objective's state). The averaged flow above it, or the trained
one above it on two rows in a row: the guard puts that copy back and multiplies the learning rate by ``divergence_lr_factor`` and lets the objective weaken what
pulls away from the data (:meth:`~trademd.training.objectives.base.Objective.soften`: the
TRADE weight, by ``divergence_trade_factor``), for the rest of the phase; the step count, and so
the schedule and the time the run takes, go on. The average lags the trained flow by ~100
steps, so a flow already falling apart can look healthy there (ala4: -12.3 nats averaged while
the trained flow's batch NLL was -7.7): such a row is no copy to go back to. One row of the
trained flow alone is not enough to roll back: at the TRADE weight's onset it can jump
for a few steps and come back (Ace-Pro-Nme, seed 0: +3.9 nats at step 1350). Refinement rounds
restart from the selected model each round, so the guard leaves them alone; without held-out
data it does nothing.
"""

import copy
import math

import torch

from trademd.training.scores import validation_nll

__all__ = ["DivergenceGuard", "GUARD_FRAMES"]

#: Held-out frames (a fixed random subset) the trained flow is scored on at each metrics row: one
#: pass over ala2's 16,000 takes ~1 s on a core, ~4 % of the default run's training over its
#: ~27 main-phase rows; 4,096 frames give the mean NLL to ~0.1 nats, far below the threshold.
GUARD_FRAMES = 4096


class DivergenceGuard:
    """Rolls the main phase back to its last healthy metrics row when the held-out NLL at T0
    rises more than ``divergence_nats`` above its lowest value.

    Args:
        divergence_nats: the rise (nats) that counts as divergence; 0 turns the guard off.
        lr_factor: the learning rate is multiplied by this at every rollback, in (0, 1].
        soften_factor: what the objective's pull away from the data is multiplied by at every
            rollback, in (0, 1].

    Attributes:
        rollbacks: rollbacks so far (restored from a checkpoint by the trainer).
        lowest: lowest held-out NLL at T0 of the main phase seen since the run (re)started.
    """

    def __init__(self, divergence_nats: float, lr_factor: float, soften_factor: float):
        self.divergence_nats, self.lr_factor, self.soften_factor = divergence_nats, lr_factor, soften_factor
        self.rollbacks = 0
        self.lowest = math.inf
        self._healthy: dict | None = None
        self._frames: torch.Tensor | None = None
        self._suspect = False  # the last row's trained flow was off, its average not

    def check(self, trainer, row: dict) -> bool:
        """Look at one metrics row (``row["val_nll_t0"]``, ``row["phase"]``; adds the trained
        flow's ``val_nll_t0_trained``); keep the state of a healthy main-phase row, roll
        ``trainer`` back after a diverged one.

        Returns:
            Whether it rolled back.
        """
        value = row.get("val_nll_t0")
        if self.divergence_nats <= 0 or value is None or row.get("phase") != "main":
            return False
        if self._frames is None:
            order = torch.randperm(len(trainer.validation), generator=torch.Generator().manual_seed(0))
            self._frames = trainer.validation[order[:GUARD_FRAMES].to(trainer.validation.device)]
        with torch.no_grad():
            trained = validation_nll(trainer.flow, self._frames, trainer.target.reference_temperature, trainer.ranks)
        row["val_nll_t0_trained"] = trained
        averaged_off, trained_off = (not math.isfinite(v) or v > self.lowest + self.divergence_nats
                                     for v in (value, trained))
        if not (averaged_off or trained_off):
            self.lowest = min(self.lowest, max(value, trained))
            self._healthy, self._suspect = self._state(trainer), False
            return False
        if not (averaged_off or self._suspect):  # the trained flow alone: a transient, or the start
            self._suspect = True                  # of a divergence the average has not seen yet
            return False
        self._suspect = False
        if self._healthy is None:  # nothing healthy to go back to (e.g. just resumed)
            return False
        self._restore(trainer, self._healthy)
        self.rollbacks += 1
        return True

    @staticmethod
    def _state(trainer) -> dict:
        return copy.deepcopy({"flow": trainer.flow.state_dict(), "ema": trainer.ema.state_dict(),
                              "optimizer": trainer.optimizer.state_dict(),
                              "objective": trainer.objective.state_dict()})

    def _restore(self, trainer, state: dict) -> None:
        trainer.flow.load_state_dict(state["flow"])
        trainer.ema.load_state_dict(state["ema"])
        trainer.optimizer.load_state_dict(copy.deepcopy(state["optimizer"]))
        trainer.objective.load_state_dict(state["objective"])
        # the one-cycle schedule computes each step's rate from these keys of every group
        for group in trainer.optimizer.param_groups:
            for key in ("lr", "initial_lr", "max_lr", "min_lr"):
                if key in group:
                    group[key] *= self.lr_factor
        trainer.objective.soften(self.soften_factor)
        # a second rollback before the next healthy row starts from here: lowered again
        self._healthy = self._state(trainer)

"""``checkpoint.pt``: everything a run needs to continue exactly (parameters, EMA, best
parameters, optimiser, scheduler, the objective's and the refinement's state, every rank's
random state, the data generator), written by rank 0 and read by every rank."""

from dataclasses import asdict
from pathlib import Path

import torch

from trademd import distributed
from trademd.errors import TradeMDError

__all__ = ["save_checkpoint", "load_checkpoint", "checkpoint_step"]


def _rng_states(device: torch.device) -> dict:
    """This rank's random states (CPU, and its CUDA device's when on one)."""
    return {"cpu": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}


def save_checkpoint(trainer, path: Path) -> Path:
    """Write ``path`` (rank 0) from ``trainer``: all state needed to continue exactly, with
    every rank's random state. A collective call under torchrun."""
    rank_rngs = distributed.gather_objects(_rng_states(trainer.device))
    evaluations = trainer.energy_evaluations()
    if not trainer.ranks.is_main:
        return path
    state = {
        "step": trainer.step, "bad_batches": trainer.bad_batches, "rollbacks": trainer.guard.rollbacks,
        "flow": trainer.flow.state_dict(), "ema": trainer.ema.state_dict(),
        "optimizer": trainer.optimizer.state_dict(), "scheduler": trainer.scheduler.state_dict(),
        "best": trainer.best, **trainer.objective.state_dict(), **trainer.refinement.state_dict(),
        "rank_rngs": rank_rngs, "energy_evaluations": evaluations,
        "data_generator": trainer.batches.generator.get_state(), "config": asdict(trainer.config),
    }
    torch.save(state, path.with_suffix(".tmp"))
    path.with_suffix(".tmp").replace(path)
    return path


def load_checkpoint(trainer, path: Path) -> bool:
    """Continue ``trainer`` from ``path``, on the same or another number of ranks (inside a
    refinement round every rank continues on rank 0's buffer).

    Returns:
        Whether this rank's random state was restored (False: the checkpoint was written by
        fewer ranks, and this one needs a fresh stream).
    """
    if not path.is_file():
        raise TradeMDError(f"no checkpoint to resume in {str(path.parent)!r}: drop --resume")
    state = torch.load(path, map_location=trainer.device, weights_only=False)
    if "ema" not in state:
        raise TradeMDError(f"{str(path)!r} was written by an older trade-md without weight "
                           "averaging: train into a new --out")
    trainer.flow.load_state_dict(state["flow"])
    trainer.step, trainer.bad_batches = state["step"], state["bad_batches"]
    trainer.guard.rollbacks = state.get("rollbacks", 0)  # none before the guard existed
    phase = trainer.phase_at(trainer.step - 1)
    if not phase.scheduled:  # e.g. inside refinement: its optimiser, not the main one
        trainer.optimizer = trainer.new_optimizer(phase.learning_rate)
    trainer.optimizer.load_state_dict(state["optimizer"])
    trainer.scheduler.load_state_dict(state["scheduler"])
    trainer.ema.load_state_dict(state["ema"])
    trainer.objective.load_state_dict(state)
    trainer.refinement.load_state_dict(state)
    trainer.selector.best = state["best"]
    rank_rngs = state.get("rank_rngs") or [{"cpu": state["torch_rng"], "cuda": state.get("cuda_rng")}]
    rank = trainer.ranks.rank
    restored = rank < len(rank_rngs)
    if restored:
        torch.set_rng_state(rank_rngs[rank]["cpu"].cpu())
        cuda = rank_rngs[rank]["cuda"]
        if cuda is not None and trainer.device.type == "cuda":
            torch.cuda.set_rng_state(cuda.cpu(), trainer.device)
    if "data_generator" in state:
        trainer.batches.generator.set_state(state["data_generator"])
    # counted once, on rank 0; every process's own count starts again from zero
    trainer.evaluations_before = state.get("energy_evaluations", 0) if trainer.ranks.is_main else 0
    return restored


def checkpoint_step(path: Path) -> int:
    """Steps done when ``path`` was written (what a resume continues from)."""
    return int(torch.load(path, map_location="cpu", weights_only=False)["step"])

"""The one chunk loop of ``trade-md simulate``, for any :class:`~trademd.md.engines.MDEngine`.

Every ``chunk_saves`` saves the loop recomputes the energies of every ensemble's new frames
exactly in a single-molecule Context and hands the chunk to its reporters, in order (as
OpenMM's ``Simulation`` calls its reporters): :mod:`trademd.md.reporters` writes the frames,
the engine's exchange statistics and a checkpoint (OpenMM checkpoint plus the engine's own
state), and shows progress. The loop knows no files: an interrupted run resumes losing at
most one chunk, and a resumed run continues the uninterrupted one exactly on the same
platform, because the reporters say so.
"""

from dataclasses import dataclass
import time
from typing import Protocol

import numpy as np

from trademd.errors import TradeMDError
from trademd.md.engines import MDEngine
from trademd.md.settings import DynamicsSettings

__all__ = ["Chunk", "ChunkReporter", "run_saves"]


@dataclass(frozen=True)
class Chunk:
    """The saves of one chunk, frames in save-major order (at each save, every copy).

    Attributes:
        first_save: saves done before this chunk.
        n_saves: saves in this chunk.
        positions_nm: per ensemble, float32 [n_saves * copies, atoms, 3] (nm).
        energy_kj_mol: per ensemble, float64 [n_saves * copies] (kJ/mol), exact and finite.
        replica: int32 [n_saves * copies], the copy that made each frame.
        time_ps: float64 [n_saves * copies], simulation time of each frame after
            equilibration (ps).
        kinetic_temperature_k: float64 [K, n_saves], kinetic temperature of each ensemble at
            each save (K).
        started_s: ``time.perf_counter()`` when the chunk's dynamics began.
    """

    first_save: int
    n_saves: int
    positions_nm: list[np.ndarray]
    energy_kj_mol: list[np.ndarray]
    replica: np.ndarray
    time_ps: np.ndarray
    kinetic_temperature_k: np.ndarray
    started_s: float

    @property
    def saves_done(self) -> int:
        """Saves done after this chunk."""
        return self.first_save + self.n_saves


class ChunkReporter(Protocol):
    """Something the loop hands each finished chunk to (writes it, shows it)."""

    def report(self, engine: MDEngine, chunk: Chunk) -> None:
        """Take the chunk just finished by ``engine``."""


def _run_chunk(engine: MDEngine, config: DynamicsSettings, saves_done: int, n_chunk: int) -> Chunk:
    """``n_chunk`` saves of dynamics from save ``saves_done``, with exact energies."""
    started = time.perf_counter()
    copies = engine.copies_per_ensemble
    frames, kinetic = [], []
    for _ in range(n_chunk):
        engine.advance(config.steps_per_save)
        chunk_frames, chunk_kinetic = engine.snapshot()
        frames.append(chunk_frames)
        kinetic.append(chunk_kinetic)
    frames, kinetic = np.stack(frames, axis=1), np.stack(kinetic, axis=1)  # [K, saves, ...]
    save_index = np.repeat(np.arange(saves_done + 1, saves_done + n_chunk + 1), copies)
    positions = [frames[k].reshape(-1, *frames.shape[3:]).astype(np.float32) for k in range(len(frames))]
    energies = []
    for ensemble_positions in positions:
        ensemble_energies, _ = engine.molecule_energy(ensemble_positions)
        if not np.all(np.isfinite(ensemble_energies)):
            raise TradeMDError(
                "the simulation produced non-finite energies (it blew up): lower the "
                "(highest) temperature or check the force field"
            )
        energies.append(ensemble_energies)
    return Chunk(first_save=saves_done, n_saves=n_chunk, positions_nm=positions, energy_kj_mol=energies,
                 replica=np.tile(np.arange(copies, dtype=np.int32), n_chunk),
                 time_ps=save_index * config.steps_per_save * config.timestep_ps,
                 kinetic_temperature_k=kinetic, started_s=started)


def run_saves(engine: MDEngine, config: DynamicsSettings, saves_done: int,
              reporters: list[ChunkReporter]) -> None:
    """Run from ``saves_done`` to ``config.n_saves`` saves, ``config.chunk_saves`` at a time,
    handing every chunk to ``reporters`` in order."""
    while saves_done < config.n_saves:
        chunk = _run_chunk(engine, config, saves_done, min(config.chunk_saves, config.n_saves - saves_done))
        for reporter in reporters:
            reporter.report(engine, chunk)
        saves_done = chunk.saves_done

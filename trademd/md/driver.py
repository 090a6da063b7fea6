"""The one chunk loop of ``trade-md simulate``, for either engine of :mod:`trademd.md.engines`.

Every ``chunk_saves`` saves, the frames of every ensemble are appended with their energies
recomputed exactly in a single-molecule Context, the engine's statistics are written, and a
checkpoint is stored (OpenMM checkpoint plus the engine's own state): an interrupted run
resumes losing at most one chunk, and a resumed run continues the uninterrupted one exactly
on the same platform.
"""

import time

import numpy as np
import openmm

from trademd.errors import TradeMDError
from trademd.io.h5io import DynamicsFile
from trademd.md.settings import DynamicsSettings
from trademd.progress import Progress

__all__ = ["restore", "run_saves"]


def restore(engine, file: DynamicsFile, config: DynamicsSettings) -> int:
    """Load the file's last checkpoint into ``engine`` and drop frames written after it.

    Returns:
        The saves done at the checkpoint.
    """
    checkpoint, state_xml, saves_done, saved_platform, engine_state = file.load_checkpoint()
    if saved_platform == engine.platform_name:
        engine.context.loadCheckpoint(checkpoint)
    else:  # another platform cannot read the checkpoint: continue from positions + velocities
        engine.context.setState(openmm.XmlSerializer.deserialize(state_xml))
    engine.restore_state(engine_state, saves_done * config.steps_per_save)
    file.truncate(saves_done, engine.copies_per_ensemble)
    return saves_done


def run_saves(engine, file: DynamicsFile, config: DynamicsSettings, saves_done: int,
              started: float, show_progress: bool = True) -> None:
    """Run from ``saves_done`` to ``config.n_saves`` saves, writing chunk by chunk.

    Args:
        started: ``time.perf_counter()`` when this call's set-up began: the first checkpoint
            adds the time since then to the file's ``wall_time_s``.
    """
    mark = started
    copies = engine.copies_per_ensemble
    progress = Progress(config.n_saves * copies * len(engine.temperatures_k), "frames",
                        enabled=show_progress)
    while saves_done < config.n_saves:
        start = time.perf_counter()
        n_chunk = min(config.chunk_saves, config.n_saves - saves_done)
        frames, kinetic = [], []
        for _ in range(n_chunk):
            engine.advance(config.steps_per_save)
            chunk_frames, chunk_kinetic = engine.snapshot()
            frames.append(chunk_frames)
            kinetic.append(chunk_kinetic)
        frames, kinetic = np.stack(frames, axis=1), np.stack(kinetic, axis=1)  # [K, saves, ...]
        save_index = np.repeat(np.arange(saves_done + 1, saves_done + n_chunk + 1), copies)
        time_ps = save_index * config.steps_per_save * config.timestep_ps
        replica = np.tile(np.arange(copies, dtype=np.int32), n_chunk)
        for k, ensemble in enumerate(file.ensembles):
            positions = frames[k].reshape(-1, *frames.shape[3:]).astype(np.float32)
            energies, _ = engine.molecule_energy(positions)
            if not np.all(np.isfinite(energies)):
                raise TradeMDError(
                    "the simulation produced non-finite energies (it blew up): lower the "
                    "(highest) temperature or check the force field"
                )
            ensemble.append(positions, energies, replica, time_ps, kinetic[k])
        saves_done += n_chunk
        engine.write_chunk_statistics(file)
        file.save_checkpoint(
            engine.context.createCheckpoint(),
            openmm.XmlSerializer.serialize(engine.context.getState(getPositions=True, getVelocities=True)),
            saves_done, engine.platform_name, time.perf_counter() - mark, engine.checkpoint_state(),
        )
        mark = time.perf_counter()
        molecule_ns = n_chunk * config.save_every_ps * 1e-3 * engine.layout.n_copies
        progress.update(saves_done * copies * len(engine.temperatures_k),
                        ns_day=f"{molecule_ns * 86400 / (mark - start):.1f}",
                        T_kin="/".join(f"{t:.0f}" for t in kinetic[:, -1]) + "K",
                        **engine.progress_fields())

"""The reporters of the chunk loop of :mod:`trademd.md.driver`: each says what it takes from
a finished chunk and writes it (frames, exchange statistics and checkpoints into a
:class:`~trademd.io.trajectory_file.DynamicsFile`, progress onto the terminal), and
:func:`restore_checkpoint` reads a checkpoint back into an engine.
"""

import time

from trademd.io.trajectory_file import DynamicsFile
from trademd.md.driver import Chunk, ChunkReporter
from trademd.md.engines import MDEngine
from trademd.md.settings import DynamicsSettings
from trademd.progress import Progress

__all__ = ["FrameReporter", "ExchangeStatisticsReporter", "CheckpointReporter", "ProgressReporter",
           "file_reporters", "restore_checkpoint"]


class FrameReporter:
    """Appends every ensemble's frames, energies and kinetic temperatures to ``file``."""

    def __init__(self, file: DynamicsFile):
        self.file = file

    def report(self, engine: MDEngine, chunk: Chunk) -> None:
        for k, ensemble in enumerate(self.file.ensembles):
            ensemble.append(chunk.positions_nm[k], chunk.energy_kj_mol[k], chunk.replica,
                            chunk.time_ps, chunk.kinetic_temperature_k[k])


class ExchangeStatisticsReporter:
    """Writes the engine's exchange statistics and walkers to ``file`` (nothing for an engine
    that exchanges nothing)."""

    def __init__(self, file: DynamicsFile):
        self.file = file

    def report(self, engine: MDEngine, chunk: Chunk) -> None:
        statistics = engine.exchange_statistics()
        if statistics is not None:
            self.file.write_exchange_statistics(statistics.attempts, statistics.accepted,
                                                statistics.acceptance_rates, statistics.round_trips,
                                                statistics.rounds, statistics.walkers)


class CheckpointReporter:
    """Stores a checkpoint in ``file`` after every chunk (then the file is flushed and valid),
    adding the wall time since the previous one (the first: since ``started``, a
    ``time.perf_counter()`` value, so that set-up counts) to the file's ``wall_time_s``."""

    def __init__(self, file: DynamicsFile, started: float):
        self.file = file
        self.mark = started

    def report(self, engine: MDEngine, chunk: Chunk) -> None:
        checkpoint, state_xml = engine.checkpoint()
        self.file.save_checkpoint(
            checkpoint, state_xml, chunk.saves_done, engine.platform_name, time.perf_counter() - self.mark,
            engine.checkpoint_state(),
        )
        self.mark = time.perf_counter()


class ProgressReporter:
    """A progress line: frames written of ``n_saves``, simulated ns per day, the kinetic
    temperatures and the engine's own fields."""

    def __init__(self, engine: MDEngine, config: DynamicsSettings, enabled: bool = True):
        self.frames_per_save = engine.copies_per_ensemble * len(engine.temperatures_k)
        self.save_every_ps = config.save_every_ps
        self.progress = Progress(config.n_saves * self.frames_per_save, "frames", enabled=enabled)

    def report(self, engine: MDEngine, chunk: Chunk) -> None:
        molecule_ns = chunk.n_saves * self.save_every_ps * 1e-3 * engine.copies.n_copies
        seconds = time.perf_counter() - chunk.started_s
        self.progress.update(chunk.saves_done * self.frames_per_save,
                             ns_day=f"{molecule_ns * 86400 / seconds:.1f}",
                             T_kin="/".join(f"{t:.0f}" for t in chunk.kinetic_temperature_k[:, -1]) + "K",
                             **engine.progress_fields())


def file_reporters(engine: MDEngine, file: DynamicsFile, config: DynamicsSettings, started: float,
                   show_progress: bool = True) -> list[ChunkReporter]:
    """The reporters of a ``trade-md simulate`` run, in order: frames, exchange statistics,
    checkpoint (last, so a checkpoint always follows what it covers), progress."""
    return [FrameReporter(file), ExchangeStatisticsReporter(file), CheckpointReporter(file, started),
            ProgressReporter(engine, config, enabled=show_progress)]


def restore_checkpoint(engine: MDEngine, file: DynamicsFile, config: DynamicsSettings) -> int:
    """Load the file's last checkpoint into ``engine`` and drop frames written after it.

    Returns:
        The saves done at the checkpoint.
    """
    checkpoint, state_xml, saves_done, saved_platform, engine_state = file.load_checkpoint()
    engine.restore(checkpoint, state_xml, same_platform=saved_platform == engine.platform_name)
    engine.restore_state(engine_state, saves_done * config.steps_per_save)
    file.truncate(saves_done, engine.copies_per_ensemble)
    return saves_done

"""``trade-md simulate`` as a library call: plain Langevin MD of many copies of one molecule,
or replica exchange over a temperature ladder, written to HDF5 in chunks.

All copies run as non-interacting copies in one OpenMM Context, or on the CPU in one per thread
(:mod:`trademd.energy.copies`, :mod:`trademd.md.copy_contexts`),
each copy's centre of mass held near its lattice point by a flat-bottom restraint that leaves
the internal distribution unchanged; :mod:`trademd.md.engines` holds the two engines,
:mod:`trademd.md.driver` the chunk loop and :mod:`trademd.md.reporters` what writes the file.
A plain run writes a ``trade-md/trajectory`` file, replica exchange a
``trade-md/replica-exchange`` file with one ensemble per temperature (``docs/formats.md``).
"""

from dataclasses import asdict, replace
import json
from pathlib import Path
import time

from trademd import distributed
from trademd.errors import TradeMDError
from trademd.io.schema import REPLICA_EXCHANGE_FORMAT, file_format
from trademd.io.trajectory_file import DynamicsFile
from trademd.io.merge import merge_dynamics_files
from trademd.io.provenance import provenance
from trademd.md.driver import run_saves
from trademd.md.engines import build_engine
from trademd.md.reporters import file_reporters, restore_checkpoint
from trademd.md.settings import (
    DEFAULT_SYSTEM,
    DEFAULT_TEMPERATURE_K,
    DynamicsSettings,
    ExchangeConfig,
    SimulationConfig,
    check_timestep,
    load_system,
)

__all__ = ["SimulationConfig", "ExchangeConfig", "simulate", "simulation_config", "parse_shard",
           "shard_path", "simulate_shards", "merge"]


def simulation_config(*, system: str = DEFAULT_SYSTEM, pdb_path: str | None = None,
                      forcefield_files: tuple[str, ...] = (), temperature_k: float = DEFAULT_TEMPERATURE_K,
                      temperatures_k: tuple[float, ...] = (), replicas: int | None = None,
                      exchange_every_ps: float = 1.0, resume_file: str | Path | None = None,
                      **settings) -> SimulationConfig | ExchangeConfig:
    """The config of plain MD or of replica exchange from ``trade-md simulate``'s options.

    Replica exchange when ``temperatures_k`` is given, or when ``resume_file`` is a
    replica-exchange file; ``replicas`` means copies for plain MD and ladders for replica
    exchange (None: the config's default). A user molecule (``pdb_path``) is named
    ``user:<file name>``. Other keywords are :class:`DynamicsSettings` fields.
    """
    name = system if pdb_path is None else f"user:{Path(pdb_path).name}"
    common = dict(system_name=name, pdb_path=None if pdb_path is None else str(pdb_path),
                  forcefield_files=tuple(forcefield_files), **settings)
    resuming_ladder = (resume_file is not None and Path(resume_file).is_file()
                       and file_format(resume_file) == REPLICA_EXCHANGE_FORMAT)
    if temperatures_k or resuming_ladder:
        ladders = {} if replicas is None else {"ladders": replicas}
        return ExchangeConfig(temperatures_k=tuple(temperatures_k), exchange_every_ps=exchange_every_ps,
                              **ladders, **common)
    copies = {} if replicas is None else {"replicas": replicas}
    return SimulationConfig(temperature_k=temperature_k, **copies, **common)


def simulate(config: SimulationConfig | ExchangeConfig, out: str | Path, overwrite: bool = False,
             resume: bool = False, command: str | None = None, show_progress: bool = True) -> Path:
    """Run MD as ``config`` says (plain or replica exchange) and write, or continue, ``out``.

    With ``resume`` the file's own settings are used; only ``time_ps`` (to extend a finished
    run) and ``platform`` are taken from ``config``; a file stopped before its first
    checkpoint starts again.

    Returns:
        The path of the file. On Ctrl-C or a kill it holds every chunk finished so far and
        ``resume=True`` continues it.
    """
    from trademd.systems import record_attrs, system_from_attrs

    out = Path(out)
    started = time.perf_counter()
    if resume:
        if not out.is_file():
            raise TradeMDError(f"nothing to resume: {str(out)!r} does not exist (drop --resume)")
        file = DynamicsFile.reopen(out)
        if "merged_from" in file.attrs:
            file.close()
            raise TradeMDError(f"{str(out)!r} was merged from shard files and cannot be resumed: "
                               "resume the shards, then merge them again")
        config = _stored_config(file.attrs, config.time_ps, config.platform, config.cpu_threads)
        molecule = system_from_attrs(file.attrs, file.topology_pdb)
        if not file.has_checkpoint:  # stopped before its first chunk: nothing to keep
            file.close()
            resume, overwrite = False, True
    else:
        molecule = load_system(config)
    config.validate()
    check_timestep(config, molecule)
    engine = build_engine(molecule.create_openmm_system(config.hydrogen_mass_amu), config)
    if resume:
        saves_done = restore_checkpoint(engine, file, config)
    else:
        attrs = {**record_attrs(molecule), **engine.method_attrs(config),
                 **_dynamics_attrs(config, engine.platform_name), **provenance(command)}
        file = DynamicsFile.create(out, attrs, molecule.pdb_text, molecule.n_atoms,
                                   list(engine.temperatures_k), overwrite=overwrite)
        engine.prepare(molecule.positions_nm(), config.equilibration_steps, config.seed)
        saves_done = 0
    with file:  # set-up (minimisation, equilibration, restore) counts toward the wall time
        run_saves(engine, config, saves_done,
                  file_reporters(engine, file, config, started, show_progress=show_progress))
    return out


def _stored_config(attrs: dict, time_ps: float, platform: str,
                   cpu_threads: int | None) -> SimulationConfig | ExchangeConfig:
    """The settings a file was started with; only the total time, platform and threads may
    change."""
    settings = json.loads(attrs["simulation_config"])
    kind = ExchangeConfig if "temperatures_k" in settings else SimulationConfig
    config = kind(**settings)
    config.time_ps, config.platform, config.cpu_threads = time_ps, platform, cpu_threads
    return config


def parse_shard(text: str) -> tuple[int, int]:
    """``"i/N"`` -> (i, N), shard i (0-based) of N."""
    try:
        index, count = (int(part) for part in str(text).split("/"))
    except ValueError:
        index, count = -1, 0
    if not 0 <= index < count:
        raise TradeMDError(f"cannot read --shard {text!r}: write i/N with 0 <= i < N, e.g. 0/4")
    return index, count


def shard_path(out: str | Path, index: int, count: int) -> Path:
    """The file of shard ``index`` of ``count``: ``data.h5`` -> ``data.shard0of4.h5``."""
    out = Path(out)
    return out.with_name(f"{out.stem}.shard{index}of{count}{out.suffix}")


def simulate_shards(config: SimulationConfig | ExchangeConfig, out: str | Path,
                    shard: tuple[int, int] | None = None, overwrite: bool = False,
                    resume: bool = False, command: str | None = None,
                    show_progress: bool = True) -> Path:
    """``trade-md simulate`` with shards: independent runs of the same settings.

    - ``shard=(i, N)`` (a job of N): runs seed ``config.seed + i`` into :func:`shard_path`
      and returns it; ``trade-md merge`` joins the N files.
    - Under ``torchrun`` with W ranks (no ``shard``): rank r runs shard r of W on its share
      of the CPU cores (or its own GPU), and rank 0 merges the shards into ``out``.
    - Otherwise: :func:`simulate` into ``out``.
    """
    ranks = distributed.ranks_from_environment()
    if shard is None and not ranks.active:
        return simulate(config, out, overwrite=overwrite, resume=resume, command=command,
                        show_progress=show_progress)
    index, count = shard if shard is not None else (ranks.rank, ranks.world_size)
    threads = distributed.cpu_share(ranks) if shard is None else config.cpu_threads
    path = shard_path(out, index, count)
    simulate(replace(config, seed=config.seed + index, cpu_threads=threads), path,
             overwrite=overwrite, resume=resume and path.exists(), command=command,
             show_progress=show_progress and (shard is not None or ranks.is_main))
    if shard is not None:
        return path
    distributed.start()
    distributed.barrier()  # every shard is finished
    if ranks.is_main:
        merge([shard_path(out, r, count) for r in range(count)], out, overwrite=overwrite,
              command=command)
    distributed.barrier()
    return Path(out)


def merge(paths: list[str | Path], out: str | Path, overwrite: bool = False,
          command: str | None = None) -> Path:
    """``trade-md merge``: join finished simulate files of the same settings (shards) into one
    file whose frames are theirs, replica numbers offset (:mod:`trademd.io.merge`)."""
    return merge_dynamics_files(paths, out, provenance(command), overwrite=overwrite)


def _dynamics_attrs(config: DynamicsSettings, platform_name: str) -> dict:
    """File attributes of the settings both kinds of run share, and the full settings."""
    settings = asdict(config)
    settings["forcefield_files"] = list(config.forcefield_files)
    if isinstance(config, ExchangeConfig):
        settings["temperatures_k"] = [float(t) for t in config.temperatures_k]
    hydrogen_mass_amu = 0.0 if config.hydrogen_mass_amu is None else config.hydrogen_mass_amu
    return {"timestep_ps": config.timestep_ps, "friction_per_ps": config.friction_per_ps,
            "hydrogen_mass_amu": hydrogen_mass_amu,
            "seed": config.seed, "save_every_ps": config.save_every_ps,
            "equilibration_ps": config.equilibration_ps, "platform": platform_name,
            "simulation_config": settings}

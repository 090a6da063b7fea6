"""Langevin molecular dynamics of many replicas of one molecule, written to HDF5 in chunks.

All replicas run as non-interacting copies in one OpenMM Context (:mod:`trademd.md.copies`),
each copy's centre of mass held near its lattice point by a flat-bottom restraint that leaves
the internal distribution unchanged. Frames are saved every ``save_every_ps`` from every
replica; each frame's potential energy is recomputed exactly with a single-molecule Context.
Every ``chunk_saves`` saves the frames are appended and an OpenMM checkpoint is stored, so an
interrupted run resumes losing at most one chunk.
"""

from dataclasses import asdict, dataclass
import json
from pathlib import Path
import time

import numpy as np
import openmm

from trademd.errors import TradeMDError
from trademd.io.h5io import TrajectoryWriter, stored_molecule
from trademd.energy.molecule import MoleculeEnergy
from trademd.platforms import openmm_platform
from trademd.progress import Progress
from trademd.io.provenance import provenance
from trademd.md.copies import replicate_system
from trademd.units import BOLTZMANN_KJ_MOL_K

__all__ = ["DynamicsSettings", "SimulationConfig", "simulate", "load_system"]

#: Radius of the flat-bottom centre-of-mass restraint (nm) and the molecule size the lattice
#: tolerates (nm): copies never come within the GB neighbour-list cutoff of each other.
COM_RESTRAINT_NM = 0.5
MOLECULE_RADIUS_NM = 1.5


@dataclass(kw_only=True)
class DynamicsSettings:
    """What plain MD and replica exchange share: the system, how long, how often to save,
    the Langevin settings (times in ps). Keyword arguments only."""

    system_name: str
    time_ps: float
    save_every_ps: float = 1.0
    equilibration_ps: float = 100.0
    timestep_ps: float = 0.002
    friction_per_ps: float = 1.0
    seed: int = 0
    platform: str = "auto"
    chunk_saves: int = 10
    pdb_path: str | None = None
    forcefield_files: tuple[str, ...] = ()

    def validate(self) -> None:
        """Raise :class:`TradeMDError` for impossible times."""
        if self.save_every_ps < self.timestep_ps:
            raise TradeMDError(f"--save-every must be at least one time step ({self.timestep_ps * 1000:g} fs)")
        if self.time_ps < self.save_every_ps:
            raise TradeMDError("--time must be at least one --save-every interval")
        if self.equilibration_ps < 0:
            raise TradeMDError("--equilibration must not be negative")

    @property
    def steps_per_save(self) -> int:
        return max(1, int(round(self.save_every_ps / self.timestep_ps)))

    @property
    def n_saves(self) -> int:
        return int(round(self.time_ps / self.save_every_ps))


@dataclass(kw_only=True)
class SimulationConfig(DynamicsSettings):
    """Settings of a plain ``trade-md simulate`` run: ``replicas`` copies at ``temperature_k`` (K)."""

    temperature_k: float
    replicas: int = 64

    def validate(self) -> None:
        """Raise :class:`TradeMDError` for impossible settings."""
        if not self.temperature_k > 0:
            raise TradeMDError(f"temperature must be positive (kelvin), got {self.temperature_k}")
        if self.replicas < 1:
            raise TradeMDError(f"--replicas must be at least 1, got {self.replicas}")
        super().validate()


def load_system(config: SimulationConfig):
    """The :class:`~trademd.systems.MolecularSystem` a config names."""
    from trademd.systems import get_system, user_system

    if config.pdb_path is not None:
        return user_system(config.pdb_path, list(config.forcefield_files))
    return get_system(config.system_name)


def simulate(config: SimulationConfig, out: str | Path, overwrite: bool = False,
             resume: bool = False, command: str | None = None, show_progress: bool = True) -> Path:
    """Run MD as ``config`` says and write (or continue) the trajectory file ``out``.

    Returns:
        The path of the trajectory file. On Ctrl-C the file holds every chunk finished so far
        and ``resume=True`` continues it.
    """
    out = Path(out)
    mark = time.perf_counter()
    if resume:
        if not out.is_file():
            raise TradeMDError(f"nothing to resume: {str(out)!r} does not exist (drop --resume)")
        writer = TrajectoryWriter.reopen(out)
        config = _config_from_file(writer, config.time_ps, config.platform)
        molecule = stored_molecule(writer.h5)
    else:
        molecule = load_system(config)
    config.validate()
    single = molecule.create_openmm_system()
    replicated, layout = replicate_system(
        single, config.replicas, per_copy_energies=False,
        molecule_radius_nm=MOLECULE_RADIUS_NM, com_restraint_nm=COM_RESTRAINT_NM,
    )
    platform, properties = openmm_platform(config.platform)
    integrator = openmm.LangevinMiddleIntegrator(
        config.temperature_k, config.friction_per_ps, config.timestep_ps
    )
    integrator.setRandomNumberSeed(config.seed)
    context = openmm.Context(replicated, integrator, platform, properties)
    frame_energy = MoleculeEnergy(single)
    dof = config.replicas * (3 * molecule.n_atoms) - replicated.getNumConstraints()

    if resume:
        saves_done = _restore(writer, context, platform.getName())
    else:
        writer = TrajectoryWriter.create(
            out, _file_attrs(config, molecule, platform.getName(), command),
            molecule.pdb_text, molecule.n_atoms, overwrite=overwrite,
        )
        _prepare(context, layout, molecule.positions_nm(), config)
        saves_done = 0
    progress = Progress(config.n_saves * config.replicas, "frames", enabled=show_progress)
    with writer:
        while saves_done < config.n_saves:
            start = time.perf_counter()
            n_chunk = min(config.chunk_saves, config.n_saves - saves_done)
            frames, kinetic = [], []
            for _ in range(n_chunk):
                integrator.step(config.steps_per_save)
                state = context.getState(getPositions=True, getEnergy=True)
                frames.append(layout.split(state.getPositions(asNumpy=True)._value))
                kinetic.append(2 * state.getKineticEnergy()._value / (dof * BOLTZMANN_KJ_MOL_K))
            positions = np.concatenate(frames).astype(np.float32)
            energies, _ = frame_energy(positions)
            if not np.all(np.isfinite(energies)):
                raise TradeMDError(
                    "the simulation produced non-finite energies (it blew up): lower the "
                    "temperature or check the force field"
                )
            save_index = np.repeat(np.arange(saves_done + 1, saves_done + n_chunk + 1), config.replicas)
            writer.append(
                positions, energies,
                np.tile(np.arange(config.replicas, dtype=np.int32), n_chunk),
                save_index * config.steps_per_save * config.timestep_ps,
                np.asarray(kinetic),
            )
            saves_done += n_chunk
            writer.save_checkpoint(
                context.createCheckpoint(),
                openmm.XmlSerializer.serialize(context.getState(getPositions=True, getVelocities=True)),
                saves_done, platform.getName(), wall_time_s=time.perf_counter() - mark,
            )
            mark = time.perf_counter()
            elapsed = mark - start
            ns_per_day = n_chunk * config.save_every_ps * 1e-3 * config.replicas * 86400 / elapsed
            progress.update(saves_done * config.replicas, ns_day=f"{ns_per_day:.1f}",
                            T_kin=f"{np.mean(kinetic):.0f}K")
    return out


def _prepare(context: openmm.Context, layout, positions_nm: np.ndarray, config: SimulationConfig) -> None:
    """Minimise all copies, draw velocities, and run the discarded equilibration."""
    context.setPositions(layout.place(np.repeat(positions_nm[None], layout.n_copies, axis=0)))
    openmm.LocalEnergyMinimizer.minimize(context, 10.0, 1000)
    context.setVelocitiesToTemperature(config.temperature_k, config.seed)
    steps = int(round(config.equilibration_ps / config.timestep_ps))
    if steps:
        context.getIntegrator().step(steps)


def _restore(writer: TrajectoryWriter, context: openmm.Context, platform_name: str) -> int:
    """Load the last checkpoint into ``context``, drop frames written after it, return saves done."""
    checkpoint, state_xml, saves_done, saved_platform = writer.load_checkpoint()
    if saved_platform == platform_name:
        context.loadCheckpoint(checkpoint)
    else:  # another platform cannot read the checkpoint: continue from positions + velocities
        context.setState(openmm.XmlSerializer.deserialize(state_xml))
    writer.truncate(saves_done, int(writer.h5.attrs["n_replicas"]))
    return saves_done


def _config_from_file(writer: TrajectoryWriter, time_ps: float, platform: str) -> SimulationConfig:
    """The settings a file was started with; only the total time and platform may change."""
    attrs = writer.h5.attrs
    config = SimulationConfig(**json.loads(attrs["simulation_config"]))
    config.time_ps = time_ps
    config.platform = platform
    return config


def molecule_attrs(molecule) -> dict:
    """File attributes that record a :class:`~trademd.systems.MolecularSystem`."""
    return {
        "system": molecule.name,
        "description": molecule.description,
        "solvent": molecule.solvent,
        "forcefield_files": list(molecule.forcefield_files),
        "constraints": molecule.constraints,
        "phi_atoms": list(molecule.phi_atoms or []),
        "psi_atoms": list(molecule.psi_atoms or []),
    }


def _file_attrs(config: SimulationConfig, molecule, platform_name: str, command) -> dict:
    settings = asdict(config)
    settings["forcefield_files"] = list(config.forcefield_files)
    return {
        **molecule_attrs(molecule),
        "temperature_k": config.temperature_k,
        "integrator": "LangevinMiddleIntegrator",
        "timestep_ps": config.timestep_ps,
        "friction_per_ps": config.friction_per_ps,
        "seed": config.seed,
        "n_replicas": config.replicas,
        "save_every_ps": config.save_every_ps,
        "equilibration_ps": config.equilibration_ps,
        "platform": platform_name,
        "simulation_config": settings,
        **provenance(command),
    }

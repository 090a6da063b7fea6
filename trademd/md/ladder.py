"""Replica exchange (parallel tempering) on the replicated engine: ``trade-md simulate
--temperatures ...``.

All ``ladders x K`` configurations run as non-interacting copies in one OpenMM Context
(:mod:`trademd.md.copies`); copy ``l * K + k`` is rung k (temperature T_k) of ladder l for the
whole run. Its temperature is a per-degree-of-freedom variable ``kT`` of a custom Langevin
integrator (the LangevinMiddle splitting of OpenMM's LangevinMiddleIntegrator). Every
``exchange_every_ps`` neighbouring rungs try to swap configurations by the Metropolis rule of
:mod:`trademd.md.exchange`, with each copy's exact potential energy: the molecule's energy from
a single-molecule Context plus its centre-of-mass restraint. A swapped configuration moves to
the other copy's lattice point with the same offset (so its restraint energy moves with it)
and its velocities are rescaled by sqrt(T_new / T_old).

The output file holds one ensemble per temperature in the schema of plain runs, plus the
exchange statistics (``docs/formats.md``); it is written in chunks with a checkpoint, and
``resume=True`` continues it exactly.
"""

from dataclasses import asdict, dataclass
import json
import math
from pathlib import Path
import time

import numpy as np
import openmm

from trademd.errors import TradeMDError
from trademd.md.exchange import ExchangeState
from trademd.io.h5io import (REPLICA_EXCHANGE_FORMAT, TrajectoryWriter, create_replica_exchange_file, group_name,
                   open_checked, stored_molecule)
from trademd.energy.molecule import MoleculeEnergy
from trademd.platforms import openmm_platform
from trademd.progress import Progress
from trademd.io.provenance import provenance
from trademd.md.copies import com_restraint_energies, replicate_system
from trademd.simulate import COM_RESTRAINT_NM, MOLECULE_RADIUS_NM, DynamicsSettings, load_system, molecule_attrs
from trademd.units import BOLTZMANN_KJ_MOL_K

__all__ = ["ExchangeConfig", "LadderEngine", "langevin_middle_per_dof", "replica_exchange"]


@dataclass(kw_only=True)
class ExchangeConfig(DynamicsSettings):
    """Settings of a replica-exchange run (times in ps, temperatures in K).

    ``ladders`` independent copies of the temperature ladder run side by side: each
    temperature's ensemble gets ``ladders`` frames per save.
    """

    temperatures_k: tuple[float, ...]
    exchange_every_ps: float = 1.0
    ladders: int = 4

    def validate(self) -> None:
        """Raise :class:`TradeMDError` for impossible settings."""
        temperatures = list(self.temperatures_k)
        if len(temperatures) < 2:
            raise TradeMDError("replica exchange needs at least two --temperatures (K)")
        if min(temperatures) <= 0:
            raise TradeMDError(f"temperatures must be positive (kelvin), got {temperatures}")
        if temperatures != sorted(set(temperatures)):
            raise TradeMDError(f"give --temperatures in increasing order without repeats, got {temperatures}")
        if self.ladders < 1:
            raise TradeMDError(f"--replicas (ladders) must be at least 1, got {self.ladders}")
        if self.exchange_every_ps < self.timestep_ps:
            raise TradeMDError(f"--exchange-every must be at least one time step ({self.timestep_ps * 1000:g} fs)")
        super().validate()

    @property
    def steps_per_exchange(self) -> int:
        return max(1, int(round(self.exchange_every_ps / self.timestep_ps)))


def langevin_middle_per_dof(timestep_ps: float, friction_per_ps: float) -> openmm.CustomIntegrator:
    """OpenMM's LangevinMiddle scheme (kick, half drift, Ornstein-Uhlenbeck, half drift,
    constraints) as a CustomIntegrator whose temperature is the per-DOF variable ``kT``
    (kJ/mol): copies of one System can sit at different temperatures."""
    integrator = openmm.CustomIntegrator(timestep_ps)
    integrator.addGlobalVariable("a", math.exp(-friction_per_ps * timestep_ps))
    integrator.addGlobalVariable("b", math.sqrt(1.0 - math.exp(-2.0 * friction_per_ps * timestep_ps)))
    integrator.addPerDofVariable("kT", 0.0)
    integrator.addPerDofVariable("x1", 0.0)
    integrator.addUpdateContextState()
    integrator.addComputePerDof("v", "v + dt*f/m")
    integrator.addConstrainVelocities()
    integrator.addComputePerDof("x", "x + 0.5*dt*v")
    integrator.addComputePerDof("v", "a*v + b*sqrt(kT/m)*gaussian")
    integrator.addComputePerDof("x", "x + 0.5*dt*v")
    integrator.addComputePerDof("x1", "x")
    integrator.addConstrainPositions()
    integrator.addComputePerDof("v", "v + (x-x1)/dt")
    return integrator


class LadderEngine:
    """``ladders`` x K copies of one molecule in one Context, copy ``l * K + k`` at T_k.

    Args:
        system: the single-molecule OpenMM system.
        temperatures_k: the ladder, ascending [K].
        ladders: independent ladders.
        timestep_ps, friction_per_ps: Langevin settings.
        platform: OpenMM platform name of the dynamics (``auto``, ``CPU``, ``CUDA``, ...).
        seed: seed of the integrator's random numbers.
    """

    def __init__(self, system: openmm.System, temperatures_k, ladders: int, timestep_ps: float,
                 friction_per_ps: float, platform: str = "auto", seed: int = 0):
        self.temperatures_k = np.asarray(temperatures_k, dtype=np.float64)
        self.ladders = ladders
        n_copies = ladders * len(self.temperatures_k)
        replicated, self.layout = replicate_system(
            system, n_copies, per_copy_energies=False,
            molecule_radius_nm=MOLECULE_RADIUS_NM, com_restraint_nm=COM_RESTRAINT_NM,
        )
        self.masses_amu = np.array([system.getParticleMass(i)._value
                                    for i in range(system.getNumParticles())])
        self.integrator = langevin_middle_per_dof(timestep_ps, friction_per_ps)
        self.integrator.setRandomNumberSeed(seed)
        chosen, properties = openmm_platform(platform)
        self.platform_name = chosen.getName()
        self.context = openmm.Context(replicated, self.integrator, chosen, properties)
        self.apply_temperatures()
        self.molecule_energy = MoleculeEnergy(system)
        self.dof_per_copy = 3 * system.getNumParticles() - system.getNumConstraints()

    @property
    def copy_temperatures_k(self) -> np.ndarray:
        """Temperature of each copy [ladders * K] (K)."""
        return np.tile(self.temperatures_k, self.ladders)

    def apply_temperatures(self) -> None:
        """Set every copy's kT in the integrator (after construction or a checkpoint load)."""
        kt = np.repeat(BOLTZMANN_KJ_MOL_K * self.copy_temperatures_k, self.layout.n_atoms)
        self.integrator.setPerDofVariableByName("kT", [openmm.Vec3(k, k, k) for k in kt])

    def prepare(self, positions_nm: np.ndarray, equilibration_steps: int, seed: int) -> None:
        """Put every copy at ``positions_nm`` [atoms, 3], minimise, draw velocities at each
        copy's temperature, and run the (discarded) equilibration."""
        self.context.setPositions(
            self.layout.place(np.repeat(positions_nm[None], self.layout.n_copies, axis=0)))
        openmm.LocalEnergyMinimizer.minimize(self.context, 10.0, 1000)
        coldest = float(self.temperatures_k[0])
        self.context.setVelocitiesToTemperature(coldest, seed)
        velocities = self._velocities()
        velocities *= np.sqrt(self.copy_temperatures_k / coldest)[:, None, None]
        self.context.setVelocities(velocities.reshape(-1, 3))
        if equilibration_steps:
            self.integrator.step(equilibration_steps)

    def _velocities(self) -> np.ndarray:
        state = self.context.getState(getVelocities=True)
        return state.getVelocities(asNumpy=True)._value.reshape(self.layout.n_copies, -1, 3)

    def offsets_nm(self) -> np.ndarray:
        """Each copy's positions relative to its lattice point [copies, atoms, 3] (nm)."""
        state = self.context.getState(getPositions=True)
        return self.layout.split(state.getPositions(asNumpy=True)._value)

    def copy_energies(self, offsets_nm: np.ndarray) -> np.ndarray:
        """Potential energy of each copy in the replicated system: molecule plus restraint,
        float64 [copies] in kJ/mol."""
        molecule, _ = self.molecule_energy(offsets_nm)
        return molecule + com_restraint_energies(offsets_nm, self.masses_amu, COM_RESTRAINT_NM)

    def exchange(self, state: ExchangeState, rng: np.random.Generator) -> None:
        """One round of exchange attempts; swapped configurations move with their velocities
        rescaled to the new temperature."""
        offsets = self.offsets_nm()
        shape = (self.ladders, len(self.temperatures_k))
        source = state.exchange_round(self.copy_energies(offsets).reshape(shape), rng)
        if np.all(source == np.arange(shape[1])):
            return
        rows = np.arange(self.ladders)[:, None] * shape[1]
        source_copy = (rows + source).ravel()
        velocities = self._velocities()[source_copy]
        velocities *= np.sqrt(self.copy_temperatures_k / self.copy_temperatures_k[source_copy])[:, None, None]
        lattice = self.layout.lattice_nm()[:, None, :]
        self.context.setPositions((offsets[source_copy] + lattice).reshape(-1, 3))
        self.context.setVelocities(velocities.reshape(-1, 3))

    def kinetic_temperatures_k(self) -> np.ndarray:
        """Instantaneous kinetic temperature of each rung, averaged over ladders [K] (K)."""
        velocities = self._velocities()
        kinetic = 0.5 * np.einsum("cai,cai,a->c", velocities, velocities, self.masses_amu)
        per_copy = 2.0 * kinetic / (self.dof_per_copy * BOLTZMANN_KJ_MOL_K)
        return per_copy.reshape(self.ladders, -1).mean(axis=0)


def replica_exchange(config: ExchangeConfig, out: str | Path, overwrite: bool = False,
                     resume: bool = False, command: str | None = None,
                     show_progress: bool = True) -> Path:
    """Run (or continue) replica exchange as ``config`` says into the file ``out``.

    Returns:
        The path of the replica-exchange file. On Ctrl-C the file holds every chunk finished
        so far and ``resume=True`` continues it.
    """
    out = Path(out)
    mark = time.perf_counter()
    if resume:
        if not out.is_file():
            raise TradeMDError(f"nothing to resume: {str(out)!r} does not exist (drop --resume)")
        h5 = open_checked(out, REPLICA_EXCHANGE_FORMAT, mode="a")
        time_ps, platform = config.time_ps, config.platform
        config = ExchangeConfig(**json.loads(h5.attrs["simulation_config"]))
        config.time_ps, config.platform = time_ps, platform
        molecule = stored_molecule(h5)
    else:
        molecule = load_system(config)
    config.validate()
    single = molecule.create_openmm_system()
    engine = LadderEngine(single, config.temperatures_k, config.ladders, config.timestep_ps,
                          config.friction_per_ps, config.platform, config.seed)
    temperatures = list(config.temperatures_k)
    if resume:
        root = TrajectoryWriter(h5)
        saves_done, state, rng = _restore(root, engine, temperatures, config.ladders)
    else:
        h5 = create_replica_exchange_file(
            out, _file_attrs(config, molecule, engine.platform_name, command), molecule.pdb_text,
            molecule.n_atoms, temperatures, overwrite=overwrite,
        )
        root = TrajectoryWriter(h5)
        engine.prepare(molecule.positions_nm(), int(round(config.equilibration_ps / config.timestep_ps)),
                       config.seed)
        saves_done, state = 0, ExchangeState.start(temperatures, config.ladders)
        rng = np.random.default_rng(config.seed)
    ensembles = [TrajectoryWriter(h5[group_name(t)]) for t in temperatures]
    progress = Progress(config.n_saves, "saves", enabled=show_progress)
    step = saves_done * config.steps_per_save
    with root:
        while saves_done < config.n_saves:
            start = time.perf_counter()
            n_chunk = min(config.chunk_saves, config.n_saves - saves_done)
            frames, kinetic, walkers = [], [], []
            for _ in range(n_chunk):
                target = step + config.steps_per_save
                while step < target:
                    next_exchange = (step // config.steps_per_exchange + 1) * config.steps_per_exchange
                    n_steps = min(next_exchange, target) - step
                    engine.integrator.step(n_steps)
                    step += n_steps
                    if step % config.steps_per_exchange == 0:
                        engine.exchange(state, rng)
                frames.append(engine.offsets_nm().reshape(config.ladders, len(temperatures), -1, 3))
                kinetic.append(engine.kinetic_temperatures_k())
                walkers.append(state.walker_at.copy())
            saves_done += n_chunk
            _append_chunk(ensembles, engine, np.stack(frames), np.stack(kinetic), saves_done, config)
            _store_exchange_statistics(h5, state, np.stack(walkers))
            root.save_checkpoint(
                engine.context.createCheckpoint(),
                openmm.XmlSerializer.serialize(engine.context.getState(getPositions=True, getVelocities=True)),
                saves_done, engine.platform_name, wall_time_s=time.perf_counter() - mark,
            )
            mark = time.perf_counter()
            h5["checkpoint"].attrs["exchange_state"] = state.to_json()
            h5["checkpoint"].attrs["rng_state"] = json.dumps(rng.bit_generator.state)
            h5.flush()
            elapsed = mark - start
            ns_per_day = n_chunk * config.save_every_ps * 1e-3 * engine.layout.n_copies * 86400 / elapsed
            rates = ", ".join(f"{r:.2f}" for r in state.acceptance_rates)
            progress.update(saves_done, ns_day=f"{ns_per_day:.1f}", acceptance=f"[{rates}]",
                            round_trips=str(state.round_trips))
    return out


def _append_chunk(ensembles: list[TrajectoryWriter], engine: LadderEngine, frames: np.ndarray,
                  kinetic: np.ndarray, saves_done: int, config: ExchangeConfig) -> None:
    """Write a chunk of saves: frames [saves, ladders, K, atoms, 3] (nm), kinetic [saves, K]."""
    n_chunk = frames.shape[0]
    save_index = np.repeat(np.arange(saves_done - n_chunk + 1, saves_done + 1), config.ladders)
    time_ps = save_index * config.steps_per_save * config.timestep_ps
    ladder = np.tile(np.arange(config.ladders, dtype=np.int32), n_chunk)
    for k, writer in enumerate(ensembles):
        positions = frames[:, :, k].reshape(-1, *frames.shape[3:]).astype(np.float32)
        energies, _ = engine.molecule_energy(positions)
        if not np.all(np.isfinite(energies)):
            raise TradeMDError(
                "the simulation produced non-finite energies (it blew up): lower the highest "
                "temperature or check the force field"
            )
        writer.append(positions, energies, ladder, time_ps, kinetic[:, k])


def _store_exchange_statistics(h5, state: ExchangeState, walkers: np.ndarray) -> None:
    """Acceptance per pair, round trips (attributes and datasets of ``exchange/``) and the
    walker at every rung of every save [saves, ladders, K]."""
    group = h5["exchange"]
    for name, values in (("attempts", state.attempts), ("accepted", state.accepted)):
        if name in group:
            del group[name]
        group.create_dataset(name, data=values)
    if "walker_at_rung" not in group:
        dataset = group.create_dataset("walker_at_rung", shape=(0, *walkers.shape[1:]),
                                       maxshape=(None, *walkers.shape[1:]), dtype="int32")
        dataset.attrs["description"] = "walker (configuration history) at each rung [saves, ladders, K]"
    dataset = group["walker_at_rung"]
    start = dataset.shape[0]
    dataset.resize(start + len(walkers), axis=0)
    dataset[start:] = walkers
    group.attrs["acceptance_rate"] = json.dumps([None if math.isnan(r) else float(r)
                                                 for r in state.acceptance_rates])
    group.attrs["round_trips"] = state.round_trips
    group.attrs["exchange_rounds"] = state.n_rounds


def _restore(root: TrajectoryWriter, engine: LadderEngine, temperatures: list[float],
             ladders: int) -> tuple[int, ExchangeState, np.random.Generator]:
    """Load the last checkpoint into ``engine``, drop frames written after it; returns
    (saves done, exchange state, random stream)."""
    checkpoint, state_xml, saves_done, saved_platform = root.load_checkpoint()
    if saved_platform == engine.platform_name:
        engine.context.loadCheckpoint(checkpoint)
    else:  # another platform cannot read the checkpoint: continue from positions + velocities
        engine.context.setState(openmm.XmlSerializer.deserialize(state_xml))
    engine.apply_temperatures()
    attrs = root.h5["checkpoint"].attrs
    state = ExchangeState.from_json(str(attrs["exchange_state"]), temperatures)
    rng = np.random.default_rng()
    rng.bit_generator.state = json.loads(attrs["rng_state"])
    for t in temperatures:
        TrajectoryWriter(root.h5[group_name(t)]).truncate(saves_done, ladders)
    walkers = root.h5["exchange/walker_at_rung"]
    walkers.resize(saves_done, axis=0)
    return saves_done, state, rng


def _file_attrs(config: ExchangeConfig, molecule, platform_name: str, command) -> dict:
    settings = asdict(config)
    settings["temperatures_k"] = [float(t) for t in config.temperatures_k]
    settings["forcefield_files"] = list(config.forcefield_files)
    return {
        **molecule_attrs(molecule),
        "method": "replica exchange (parallel tempering), even-odd neighbour swaps",
        "integrator": "LangevinMiddle (CustomIntegrator, per-copy temperature)",
        "timestep_ps": config.timestep_ps,
        "friction_per_ps": config.friction_per_ps,
        "exchange_every_ps": config.exchange_every_ps,
        "seed": config.seed,
        "n_replicas": config.ladders,
        "save_every_ps": config.save_every_ps,
        "equilibration_ps": config.equilibration_ps,
        "platform": platform_name,
        "simulation_config": settings,
        **provenance(command),
    }

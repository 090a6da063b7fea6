"""The two MD engines behind ``trade-md simulate``, on the replicated system of
:mod:`trademd.energy.copies` (copies of the molecule on a lattice in one OpenMM Context, or
in one per CPU thread: :mod:`trademd.md.copy_contexts`).

- :class:`PlainEngine`: ``replicas`` copies at one temperature, OpenMM's
  LangevinMiddleIntegrator; one ensemble.
- :class:`LadderEngine`: replica exchange (parallel tempering). ``ladders x K`` copies, copy
  ``l * K + k`` is rung k (temperature T_k) of ladder l for the whole run; its temperature is
  a per-degree-of-freedom variable ``kT`` of a custom Langevin integrator (the LangevinMiddle
  splitting). Every ``exchange_every_ps`` neighbouring rungs try to swap configurations by the
  Metropolis rule of :mod:`trademd.md.exchange`, with each copy's exact potential energy: the
  molecule's energy from a single-molecule Context plus its centre-of-mass restraint. A
  swapped configuration moves to the other copy's lattice point with the same offset (so its
  restraint energy moves with it) and its velocities are rescaled by sqrt(T_new / T_old).

Both satisfy :class:`MDEngine`, what the chunk loop of :mod:`trademd.md.driver` needs:
``prepare``, ``advance``, ``snapshot`` (frames and kinetic temperatures of every ensemble),
``checkpoint_state`` / ``restore_state`` for what a resume needs beyond the OpenMM checkpoint,
``exchange_statistics`` for the reporters of :mod:`trademd.md.reporters`, and the file
attributes that describe the method. Engines know no files.
"""

from dataclasses import dataclass
import json
import math
from typing import Protocol

import numpy as np
import openmm
from openmm import unit

from trademd.energy.copies import com_restraint_energies
from trademd.energy.molecule import MoleculeEnergy
from trademd.md.copy_contexts import CopyContexts
from trademd.md.exchange import ExchangeState
from trademd.md.settings import (
    COM_RESTRAINT_NM,
    ExchangeConfig,
    SimulationConfig,
)
from trademd.units import BOLTZMANN_KJ_MOL_K

__all__ = ["MDEngine", "ExchangeStatistics", "PlainEngine", "LadderEngine", "langevin_middle_per_dof",
           "build_engine"]


@dataclass(frozen=True)
class ExchangeStatistics:
    """The exchange statistics of a replica-exchange run so far, and the walkers of the saves
    since they were last taken.

    Attributes:
        attempts, accepted: int [K - 1], per neighbour pair, over all ladders.
        acceptance_rates: [K - 1] accepted / attempts (NaN: no attempt yet).
        round_trips: walkers' trips from the lowest rung to the highest and back.
        rounds: exchange rounds done.
        walkers: int [saves, ladders, K], the walker at every rung at each new save.
    """

    attempts: np.ndarray
    accepted: np.ndarray
    acceptance_rates: list[float]
    round_trips: int
    rounds: int
    walkers: np.ndarray


class MDEngine(Protocol):
    """What the chunk loop of :mod:`trademd.md.driver` and its reporters need of an engine.

    Attributes:
        temperatures_k: float64 [K], the temperature of each ensemble (K).
        copies_per_ensemble: frames each ensemble gets per save.
        platform_name: the OpenMM platform the Contexts run on.
        copies: the Contexts of all copies.
        molecule_energy: exact single-molecule energies of frames.
    """

    temperatures_k: np.ndarray
    copies_per_ensemble: int
    platform_name: str
    copies: CopyContexts
    molecule_energy: MoleculeEnergy

    def prepare(self, positions_nm: np.ndarray, equilibration_steps: int, seed: int) -> None:
        """Put every copy at ``positions_nm`` [atoms, 3] (nm), minimise, draw velocities and
        run the (discarded) equilibration."""

    def advance(self, n_steps: int) -> None:
        """Run ``n_steps`` steps of dynamics."""

    def snapshot(self) -> tuple[np.ndarray, np.ndarray]:
        """(frames [K, copies, atoms, 3] in nm, kinetic temperature of each ensemble [K] in K)."""

    def checkpoint(self) -> tuple[bytes, str]:
        """(OpenMM checkpoint, portable State XML) of every copy."""

    def restore(self, checkpoint: bytes, state_xml: str, same_platform: bool) -> None:
        """Load :meth:`checkpoint`'s output (the State XML where the checkpoint cannot be read)."""

    def checkpoint_state(self) -> dict[str, str]:
        """What a resume needs beyond the OpenMM checkpoint, as text."""

    def restore_state(self, state: dict, steps_done: int) -> None:
        """Continue from a :meth:`checkpoint_state` taken after ``steps_done`` steps."""

    def exchange_statistics(self) -> ExchangeStatistics | None:
        """The exchange statistics (None: the engine exchanges nothing)."""

    def progress_fields(self) -> dict[str, str]:
        """Extra fields of the progress line."""

    @staticmethod
    def method_attrs(config: SimulationConfig | ExchangeConfig) -> dict:
        """File attributes that describe the run."""


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


class _CopyEngine:
    """What both engines share: ``n_copies`` copies in :class:`CopyContexts` with
    ``make_integrator``'s integrators (``parallel``: see there), the molecule's exact energy,
    kinetic temperatures."""

    def __init__(self, system: openmm.System, n_copies: int, make_integrator, platform: str, seed: int,
                 cpu_threads: int | None = None, parallel: bool = True):
        self.copies = CopyContexts(system, n_copies, make_integrator, platform, seed, cpu_threads, parallel)
        self.platform_name = self.copies.platform_name
        self.molecule_energy = MoleculeEnergy(system)
        self.masses_amu = np.array([system.getParticleMass(i).value_in_unit(unit.dalton)
                                    for i in range(system.getNumParticles())])
        self.dof_per_copy = 3 * system.getNumParticles() - system.getNumConstraints()

    def offsets_nm(self) -> np.ndarray:
        """Each copy's positions relative to its lattice point [copies, atoms, 3] (nm)."""
        return self.copies.offsets_nm()

    def checkpoint(self) -> tuple[bytes, str]:
        """(OpenMM checkpoint, portable State XML) of every copy."""
        return self.copies.checkpoint()

    def restore(self, checkpoint: bytes, state_xml: str, same_platform: bool) -> None:
        """Load :meth:`checkpoint`'s output (the State XML where the checkpoint cannot be read)."""
        self.copies.restore(checkpoint, state_xml, same_platform)

    def _copy_kinetic_temperatures_k(self) -> np.ndarray:
        """Instantaneous kinetic temperature of each copy [copies] (K)."""
        velocities = self.copies.velocities()
        kinetic = 0.5 * np.einsum("cai,cai,a->c", velocities, velocities, self.masses_amu)
        return 2.0 * kinetic / (self.dof_per_copy * BOLTZMANN_KJ_MOL_K)


class PlainEngine(_CopyEngine):
    """``config.replicas`` copies at ``config.temperature_k`` (LangevinMiddleIntegrator)."""

    def __init__(self, system: openmm.System, config: SimulationConfig):
        def make_integrator() -> openmm.Integrator:
            return openmm.LangevinMiddleIntegrator(config.temperature_k, config.friction_per_ps,
                                                   config.timestep_ps)

        super().__init__(system, config.replicas, make_integrator, config.platform, config.seed,
                         config.cpu_threads)
        self.temperatures_k = np.array([config.temperature_k])
        self.copies_per_ensemble = config.replicas

    def prepare(self, positions_nm: np.ndarray, equilibration_steps: int, seed: int) -> None:
        """Put every copy at ``positions_nm`` [atoms, 3], minimise, draw velocities, and run
        the (discarded) equilibration."""
        self.copies.place_minimised(positions_nm)
        self.copies.set_velocities_to_temperature(float(self.temperatures_k[0]), seed)
        if equilibration_steps:
            self.copies.step(equilibration_steps)

    def advance(self, n_steps: int) -> None:
        self.copies.step(n_steps)

    def snapshot(self) -> tuple[np.ndarray, np.ndarray]:
        """(frames [1, copies, atoms, 3] in nm, kinetic temperature [1] in K, over all copies)."""
        return self.offsets_nm()[None], self._copy_kinetic_temperatures_k().mean(keepdims=True)

    def checkpoint_state(self) -> dict[str, str]:
        return {}

    def restore_state(self, state: dict, steps_done: int) -> None:
        """Nothing beyond the OpenMM checkpoint."""

    def exchange_statistics(self) -> None:
        """No exchanges."""

    def progress_fields(self) -> dict[str, str]:
        return {}

    @staticmethod
    def method_attrs(config: SimulationConfig) -> dict:
        """File attributes that describe the run."""
        return {"temperature_k": config.temperature_k, "integrator": "LangevinMiddleIntegrator",
                "n_replicas": config.replicas}


class LadderEngine(_CopyEngine):
    """``ladders`` x K copies of one molecule in one Context, copy ``l * K + k`` at T_k, with
    neighbour exchanges every ``steps_per_exchange`` steps.

    Args:
        system: the single-molecule OpenMM system.
        config: temperatures (ascending, K), ladders, exchange interval, Langevin settings,
            platform and seed (also the seed of the exchange decisions).
    """

    def __init__(self, system: openmm.System, config: ExchangeConfig):
        self.temperatures_k = np.asarray(config.temperatures_k, dtype=np.float64)
        self.ladders = config.ladders
        self.copies_per_ensemble = config.ladders
        self.steps_per_exchange = config.steps_per_exchange
        super().__init__(system, config.ladders * len(self.temperatures_k),
                         lambda: langevin_middle_per_dof(config.timestep_ps, config.friction_per_ps),
                         config.platform, config.seed, config.cpu_threads, parallel=False)
        self.apply_temperatures()
        self.exchange_state = ExchangeState.start([float(t) for t in self.temperatures_k], config.ladders)
        self.rng = np.random.default_rng(config.seed)
        self.steps_done = 0
        self._walkers: list[np.ndarray] = []

    @property
    def copy_temperatures_k(self) -> np.ndarray:
        """Temperature of each copy [ladders * K] (K)."""
        return np.tile(self.temperatures_k, self.ladders)

    def apply_temperatures(self) -> None:
        """Set every copy's kT in the integrator (after construction or a checkpoint load)."""
        self.copies.set_copy_variable("kT", BOLTZMANN_KJ_MOL_K * self.copy_temperatures_k)

    def prepare(self, positions_nm: np.ndarray, equilibration_steps: int, seed: int) -> None:
        """Put every copy at ``positions_nm`` [atoms, 3], minimise, draw velocities at each
        copy's temperature, and run the (discarded) equilibration."""
        self.copies.place_minimised(positions_nm)
        coldest = float(self.temperatures_k[0])
        self.copies.set_velocities_to_temperature(coldest, seed)
        velocities = self.copies.velocities()
        velocities *= np.sqrt(self.copy_temperatures_k / coldest)[:, None, None]
        self.copies.set_velocities(velocities)
        if equilibration_steps:
            self.copies.step(equilibration_steps)

    def advance(self, n_steps: int) -> None:
        """``n_steps`` of dynamics with an exchange round at every multiple of the exchange
        interval (counted from the start of production)."""
        target = self.steps_done + n_steps
        while self.steps_done < target:
            next_exchange = (self.steps_done // self.steps_per_exchange + 1) * self.steps_per_exchange
            steps = min(next_exchange, target) - self.steps_done
            self.copies.step(steps)
            self.steps_done += steps
            if self.steps_done % self.steps_per_exchange == 0:
                self.exchange()

    def copy_energies(self, offsets_nm: np.ndarray) -> np.ndarray:
        """Potential energy of each copy in the replicated system: molecule plus restraint,
        float64 [copies] in kJ/mol."""
        molecule, _ = self.molecule_energy(offsets_nm)
        return molecule + com_restraint_energies(offsets_nm, self.masses_amu, COM_RESTRAINT_NM)

    def exchange(self) -> None:
        """One round of exchange attempts; swapped configurations move with their velocities
        rescaled to the new temperature."""
        offsets = self.offsets_nm()
        shape = (self.ladders, len(self.temperatures_k))
        source = self.exchange_state.exchange_round(self.copy_energies(offsets).reshape(shape), self.rng)
        if np.all(source == np.arange(shape[1])):
            return
        rows = np.arange(self.ladders)[:, None] * shape[1]
        source_copy = (rows + source).ravel()
        velocities = self.copies.velocities()[source_copy]
        velocities *= np.sqrt(self.copy_temperatures_k / self.copy_temperatures_k[source_copy])[:, None, None]
        self.copies.set_offsets(offsets[source_copy])
        self.copies.set_velocities(velocities)

    def kinetic_temperatures_k(self) -> np.ndarray:
        """Instantaneous kinetic temperature of each rung, averaged over ladders [K] (K)."""
        return self._copy_kinetic_temperatures_k().reshape(self.ladders, -1).mean(axis=0)

    def snapshot(self) -> tuple[np.ndarray, np.ndarray]:
        """(frames [K, ladders, atoms, 3] in nm, kinetic temperature per rung [K] in K); also
        records which walker sits at each rung."""
        frames = self.offsets_nm().reshape(self.ladders, len(self.temperatures_k), -1, 3)
        self._walkers.append(self.exchange_state.walker_at.copy())
        return frames.transpose(1, 0, 2, 3), self.kinetic_temperatures_k()

    def checkpoint_state(self) -> dict[str, str]:
        """The exchange bookkeeping and the random stream of the exchange decisions."""
        return {"exchange_state": self.exchange_state.to_json(),
                "rng_state": json.dumps(self.rng.bit_generator.state)}

    def restore_state(self, state: dict, steps_done: int) -> None:
        """Continue from a checkpoint's :meth:`checkpoint_state` after ``steps_done`` steps."""
        self.apply_temperatures()
        self.exchange_state = ExchangeState.from_json(str(state["exchange_state"]), [float(t) for t in self.temperatures_k])
        self.rng.bit_generator.state = json.loads(state["rng_state"])
        self.steps_done = steps_done

    def exchange_statistics(self) -> ExchangeStatistics:
        """Exchange statistics so far and the walkers of the saves since the last call."""
        state = self.exchange_state
        statistics = ExchangeStatistics(state.attempts, state.accepted, state.acceptance_rates,
                                        state.round_trips, state.n_rounds, np.stack(self._walkers))
        self._walkers = []
        return statistics

    def progress_fields(self) -> dict[str, str]:
        rates = ", ".join(f"{r:.2f}" for r in self.exchange_state.acceptance_rates)
        return {"acceptance": f"[{rates}]", "round_trips": str(self.exchange_state.round_trips)}

    @staticmethod
    def method_attrs(config: ExchangeConfig) -> dict:
        """File attributes that describe the run."""
        return {"method": "replica exchange (parallel tempering), even-odd neighbour swaps",
                "integrator": "LangevinMiddle (CustomIntegrator, per-copy temperature)",
                "exchange_every_ps": config.exchange_every_ps, "n_replicas": config.ladders}


def build_engine(system: openmm.System, config: SimulationConfig | ExchangeConfig) -> MDEngine:
    """The engine a config asks for."""
    if isinstance(config, ExchangeConfig):
        return LadderEngine(system, config)
    return PlainEngine(system, config)

"""Settings of the MD stage: plain Langevin MD and replica exchange, and the constants of the
replicated engine they share (times in ps, temperatures in K, lengths in nm)."""

from dataclasses import dataclass

from trademd.errors import TradeMDError

__all__ = ["COM_RESTRAINT_NM", "MOLECULE_RADIUS_NM", "MAX_HYDROGEN_MASS_AMU", "MAX_FLEXIBLE_TIMESTEP_PS",
           "DEFAULT_SYSTEM", "DEFAULT_TEMPERATURE_K", "DEFAULT_EQUILIBRATION_PS", "DEFAULT_REPLICAS",
           "DEFAULT_LADDERS", "RunMDPreset", "RUN_MD", "DynamicsSettings", "SimulationConfig",
           "ExchangeConfig", "load_system", "check_timestep"]

#: Radius of the flat-bottom centre-of-mass restraint (nm) and the molecule size the lattice
#: tolerates (nm): copies never come within the GB neighbour-list cutoff of each other.
COM_RESTRAINT_NM = 0.5
MOLECULE_RADIUS_NM = 1.5

#: Heaviest hydrogen allowed (amu): a methyl carbon keeps 12 - 3 x (4 - 1) = 3 amu.
MAX_HYDROGEN_MASS_AMU = 4.0
#: Longest time step (ps) for a system without bond constraints: alanine dipeptide at 600 K
#: is stable at 2 fs and 3 fs (4 amu hydrogens) and ends in NaN at 4 fs (4 amu hydrogens).
MAX_FLEXIBLE_TIMESTEP_PS = 0.002

#: The MD defaults, each written once (``trade-md simulate``, ``trade-md run`` and the library
#: read them): the built-in system, T0 of the data (K), the equilibration discarded per
#: replica (ps), the copies of plain MD and the ladders of replica exchange.
DEFAULT_SYSTEM = "ala2-implicit"
DEFAULT_TEMPERATURE_K = 600.0
DEFAULT_EQUILIBRATION_PS = 100.0
DEFAULT_REPLICAS = 64
DEFAULT_LADDERS = 4


@dataclass(frozen=True)
class RunMDPreset:
    """The MD of ``trade-md run``: its own preset, which differs from ``trade-md simulate``'s
    defaults in replicas (16, not :data:`DEFAULT_REPLICAS`), frame interval (0.1 ps, ten times
    the frames of 1 ps from the same MD, which is what stops the fit at T0 from overfitting,
    docs/results.md) and equilibration (20 ps, not :data:`DEFAULT_EQUILIBRATION_PS`).

    Attributes:
        system_name: built-in system.
        temperature_k: T0 (K).
        time_ps: production time per replica (ps).
        replicas: copies.
        save_every_ps: frame interval (ps).
        equilibration_ps: discarded equilibration per replica (ps).
    """

    system_name: str = DEFAULT_SYSTEM
    temperature_k: float = DEFAULT_TEMPERATURE_K
    time_ps: float = 1000.0
    replicas: int = 16
    save_every_ps: float = 0.1
    equilibration_ps: float = 20.0


#: What ``trade-md run`` simulates unless told otherwise.
RUN_MD = RunMDPreset()


@dataclass(kw_only=True)
class DynamicsSettings:
    """What plain MD and replica exchange share: the system, how long, how often to save,
    the Langevin settings (times in ps). Keyword arguments only.

    ``hydrogen_mass_amu`` (None: the force field's masses) repartitions mass from each heavy
    atom to its hydrogens (total mass unchanged). Masses do not enter the Boltzmann
    distribution of configurations, so this changes the dynamics only; heavier hydrogens
    allow a 4 fs ``timestep_ps`` with LangevinMiddle and HBonds constraints.
    ``cpu_threads`` (None: all cores) is what the OpenMM CPU platform may use.
    """

    system_name: str
    time_ps: float
    save_every_ps: float = 1.0
    equilibration_ps: float = DEFAULT_EQUILIBRATION_PS
    timestep_ps: float = 0.002
    friction_per_ps: float = 1.0
    hydrogen_mass_amu: float | None = None
    seed: int = 0
    platform: str = "auto"
    cpu_threads: int | None = None
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
        if self.hydrogen_mass_amu is not None and not 1.0 <= self.hydrogen_mass_amu <= MAX_HYDROGEN_MASS_AMU:
            raise TradeMDError(f"--hydrogen-mass must lie between 1 and {MAX_HYDROGEN_MASS_AMU:g} amu "
                               f"(got {self.hydrogen_mass_amu:g}); 1.5 with a 4 fs time step is usual")

    @property
    def steps_per_save(self) -> int:
        return max(1, int(round(self.save_every_ps / self.timestep_ps)))

    @property
    def n_saves(self) -> int:
        return int(round(self.time_ps / self.save_every_ps))

    @property
    def equilibration_steps(self) -> int:
        return int(round(self.equilibration_ps / self.timestep_ps))


@dataclass(kw_only=True)
class SimulationConfig(DynamicsSettings):
    """Settings of a plain ``trade-md simulate`` run: ``replicas`` copies at ``temperature_k`` (K)."""

    temperature_k: float
    replicas: int = DEFAULT_REPLICAS

    def validate(self) -> None:
        """Raise :class:`TradeMDError` for impossible settings."""
        if not self.temperature_k > 0:
            raise TradeMDError(f"temperature must be positive (kelvin), got {self.temperature_k}")
        if self.replicas < 1:
            raise TradeMDError(f"--replicas must be at least 1, got {self.replicas}")
        super().validate()


@dataclass(kw_only=True)
class ExchangeConfig(DynamicsSettings):
    """Settings of a replica-exchange run (times in ps, temperatures in K).

    ``ladders`` independent copies of the temperature ladder run side by side: each
    temperature's ensemble gets ``ladders`` frames per save.
    """

    temperatures_k: tuple[float, ...]
    exchange_every_ps: float = 1.0
    ladders: int = DEFAULT_LADDERS

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


def check_timestep(config: DynamicsSettings, molecule) -> None:
    """Refuse a time step too long for ``molecule`` (a MolecularSystem): without bond
    constraints, above :data:`MAX_FLEXIBLE_TIMESTEP_PS`."""
    if molecule.constraints == "None" and config.timestep_ps > MAX_FLEXIBLE_TIMESTEP_PS + 1e-12:
        raise TradeMDError(
            f"system {molecule.name!r} has no bond constraints: a {config.timestep_ps * 1000:g} fs "
            f"time step is unstable; use --timestep {MAX_FLEXIBLE_TIMESTEP_PS * 1000:g}fs or shorter")


def load_system(config: DynamicsSettings):
    """The :class:`~trademd.systems.MolecularSystem` a config names (built-in or user files)."""
    from trademd.systems import get_system, user_system

    if config.pdb_path is not None:
        return user_system(config.pdb_path, list(config.forcefield_files))
    return get_system(config.system_name)

"""``trade-md run``: simulate at T0 -> train -> sample at T -> figures, reusing finished stages.

Run directory layout::

    OUT/data_<T0>K.h5        MD frames at T0            (trade-md simulate)
    OUT/train/model.pt       the trained flow            (trade-md train)
    OUT/samples.h5           weighted samples at T       (trade-md sample)
    OUT/samples_ramachandran.png, OUT/summary.json

A stage whose output exists is skipped; an interrupted simulation or training resumes from
its checkpoint. Delete a stage's output to redo it.
"""

from dataclasses import dataclass
import json
from pathlib import Path
import sys

from trademd.errors import TradeMDError
from trademd.io.trajectory_file import frame_count
from trademd.sample import sample_run
from trademd.simulate import SimulationConfig, simulate
from trademd.systems import get_system
from trademd.train import train_run

__all__ = ["RunConfig", "run_pipeline"]


@dataclass(kw_only=True)
class RunConfig:
    """Settings of ``trade-md run`` (defaults: alanine dipeptide, the quick training preset).
    Keyword arguments only.

    Attributes:
        system: built-in molecular system.
        temperatures_k: temperatures to sample at (K).
        data_temperature_k: T0 of the simulation (K).
        simulation_ps: production time per replica (ps).
        replicas: MD replicas.
        save_every_ps: frame interval of the MD (ps). 0.1 ps gives ten times the frames of
            1 ps from the same MD, which is what stops the fit at T0 from overfitting
            (docs/results.md).
        timestep_ps: MD time step (ps; None: the system's, 4 fs with rigid bonds to
            hydrogen, 2 fs without constraints).
        hydrogen_mass_amu: hydrogen mass repartitioning (amu; 0: force-field masses; None:
            the system's, 1.5 amu with rigid bonds to hydrogen). With 1.5 amu a 4 fs step
            halves the MD's cost; configurations keep their Boltzmann distribution (masses
            do not enter it), and the samples are reweighted to the exact energy anyway.
        preset: training preset.
        steps: training steps (None: the preset's).
        n_samples: samples per temperature (enough for pooled ESS and free energies stable to
            a few percent).
        seed: seed of the MD and of training.
    """

    system: str = "ala2-implicit"
    temperatures_k: tuple[float, ...] = (300.0,)
    data_temperature_k: float = 600.0
    simulation_ps: float = 1000.0
    replicas: int = 16
    save_every_ps: float = 0.1
    timestep_ps: float | None = None
    hydrogen_mass_amu: float | None = None
    preset: str = "quick"
    steps: int | None = None
    n_samples: int = 100000
    seed: int = 0

    def __post_init__(self) -> None:
        self.temperatures_k = tuple(float(t) for t in self.temperatures_k)
        if not self.temperatures_k or min(self.temperatures_k) <= 0:
            raise TradeMDError("give at least one positive --temperature (K)")

    def simulation(self, platform: str = "auto") -> SimulationConfig:
        """The MD settings of the run's data."""
        molecule = get_system(self.system)
        hydrogen_mass_amu = (molecule.md_hydrogen_mass_amu if self.hydrogen_mass_amu is None
                             else self.hydrogen_mass_amu or None)
        return SimulationConfig(system_name=self.system, temperature_k=self.data_temperature_k,
                                time_ps=self.simulation_ps, replicas=self.replicas,
                                save_every_ps=self.save_every_ps, equilibration_ps=20.0,
                                timestep_ps=self.timestep_ps or molecule.md_timestep_ps,
                                hydrogen_mass_amu=hydrogen_mass_amu, seed=self.seed, platform=platform)

    @property
    def temperature_range_k(self) -> tuple[float, float]:
        """Trained range: 0.8 x the lowest temperature asked for to 1.1 x the highest of
        those and T0 (for 300 K from 600 K data: 240-660 K, the TRADE paper's range)."""
        low = 0.8 * min(*self.temperatures_k, self.data_temperature_k)
        high = 1.1 * max(*self.temperatures_k, self.data_temperature_k)
        return low, high


def _log(message: str) -> None:
    print(f"[trade-md run] {message}", file=sys.stderr, flush=True)


def run_pipeline(config: RunConfig, out: str | Path, platform: str = "auto", device: str = "auto",
                 command: str | None = None, show_progress: bool = True) -> dict:
    """Run or continue every stage; returns the summary (also written to summary.json)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    data = out / f"data_{config.data_temperature_k:g}K.h5"
    simulation = config.simulation(platform)
    if not data.exists():
        _log(f"simulating {config.system} at {config.data_temperature_k:g} K -> {data}")
        simulate(simulation, data, command=command, show_progress=show_progress)
    elif frame_count(data) < simulation.n_saves * simulation.replicas:
        _log(f"resuming the simulation in {data}")
        simulate(simulation, data, resume=True, command=command, show_progress=show_progress)
    else:
        _log(f"reusing {data}")

    train_dir = out / "train"
    model = train_dir / "model.pt"
    t_min, t_max = config.temperature_range_k
    if model.exists():
        _log(f"reusing {model}")
    else:
        resume = (train_dir / "checkpoint.pt").exists()
        _log(f"{'resuming' if resume else 'training'} TRADE over {t_min:g}-{t_max:g} K -> {train_dir}")
        train_run(train_dir, t_min, t_max, data=data, preset=config.preset,
                  overrides={"steps": config.steps, "seed": config.seed,
                             "focus_temperatures": list(config.temperatures_k)},
                  device=device, platform=platform, resume=resume, show_progress=show_progress)

    samples = out / "samples.h5"
    summary_path = out / "summary.json"
    if samples.exists() and summary_path.exists():
        _log(f"reusing {samples}")
        summaries = json.loads(summary_path.read_text())["samples"]
    else:  # not sampled yet, or interrupted between the samples file and its summary
        _log(f"sampling {config.n_samples} configurations at {config.temperatures_k} K -> {samples}")
        summaries = sample_run(model, list(config.temperatures_k), config.n_samples, samples,
                               overwrite=True, device=device, platform=platform,
                               command=command, show_progress=show_progress)
    summary = {"data": str(data), "model": str(model), "samples": summaries,
               "temperature_range_k": [t_min, t_max]}
    summary_path.write_text(json.dumps(summary, indent=2))
    return summary

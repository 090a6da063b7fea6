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
from trademd.md.settings import RUN_MD, SimulationConfig
from trademd.training.config import DEFAULT_PRESET

__all__ = ["RunConfig", "run_pipeline", "MEASURED_TRANSFER_RATIO"]

#: The widest transfer measured to work: samples at T0 / 2 from data at T0 (600 K -> 300 K:
#: 54 % ESS on alanine dipeptide with the defaults, docs/results.md). Temperatures below
#: T0 times this, or above T0, are outside anything measured.
MEASURED_TRANSFER_RATIO = 0.5


@dataclass(kw_only=True)
class RunConfig:
    """Settings of ``trade-md run`` (defaults: alanine dipeptide, the MD of
    :data:`trademd.md.settings.RUN_MD`, the default training preset); the CLI takes its
    defaults from here. Keyword arguments only.

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

    system: str = RUN_MD.system_name
    temperatures_k: tuple[float, ...] = (300.0,)
    data_temperature_k: float = RUN_MD.temperature_k
    simulation_ps: float = RUN_MD.time_ps
    replicas: int = RUN_MD.replicas
    save_every_ps: float = RUN_MD.save_every_ps
    timestep_ps: float | None = None
    hydrogen_mass_amu: float | None = None
    preset: str = DEFAULT_PRESET
    steps: int | None = None
    n_samples: int = 100000
    seed: int = 0

    def __post_init__(self) -> None:
        self.temperatures_k = tuple(float(t) for t in self.temperatures_k)
        if not self.temperatures_k or min(self.temperatures_k) <= 0:
            raise TradeMDError("give at least one positive --temperature (K)")

    def simulation(self, platform: str = "auto") -> SimulationConfig:
        """The MD settings of the run's data (equilibration: :data:`RUN_MD`'s)."""
        from trademd.systems import get_system

        molecule = get_system(self.system)
        hydrogen_mass_amu = (molecule.md_hydrogen_mass_amu if self.hydrogen_mass_amu is None
                             else self.hydrogen_mass_amu or None)
        return SimulationConfig(system_name=self.system, temperature_k=self.data_temperature_k,
                                time_ps=self.simulation_ps, replicas=self.replicas,
                                save_every_ps=self.save_every_ps, equilibration_ps=RUN_MD.equilibration_ps,
                                timestep_ps=self.timestep_ps or molecule.md_timestep_ps,
                                hydrogen_mass_amu=hydrogen_mass_amu, seed=self.seed, platform=platform)

    def training_overrides(self) -> dict:
        """The training settings the run sets over its preset (None: the preset's)."""
        return {"steps": self.steps, "seed": self.seed, "focus_temperatures": list(self.temperatures_k)}

    def range_warning(self) -> str | None:
        """What to expect when a requested temperature lies outside the measured transfer
        (below T0 x :data:`MEASURED_TRANSFER_RATIO`, or above T0), else None."""
        t0 = self.data_temperature_k
        low = [t for t in self.temperatures_k if t < MEASURED_TRANSFER_RATIO * t0]
        high = [t for t in self.temperatures_k if t > t0]
        if not low and not high:
            return None
        parts = []
        if low:
            parts.append(f"{min(low):g} K is {t0 / min(low):.1f}x below the data's {t0:g} K, while transfer "
                         f"is measured only down to T0/2 ({MEASURED_TRANSFER_RATIO * t0:g} K here)")
        if high:
            parts.append(f"{max(high):g} K lies above the data's {t0:g} K, where no transfer is measured")
        return ("; ".join(parts) + ": expect a far lower ESS and basin weights to check; read summary.json's "
                "batch spread and Pareto k, or simulate closer to the temperature you want (--data-temperature)")

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
                 command: str | None = None, show_progress: bool = True, estimate: bool = True) -> dict:
    """Run or continue every stage; returns the summary (also written to summary.json).

    With ``estimate``, first says how long the stages still to run will take on this machine,
    measured in a few seconds (:func:`trademd.estimate.estimate_run`; no result changes)."""
    from trademd.io.trajectory_file import frame_count
    from trademd.sample import sample_run
    from trademd.simulate import simulate
    from trademd.train import train_run
    from trademd.training.checkpoint import checkpoint_step

    out = Path(out)
    warning = config.range_warning()
    if warning:
        _log(f"warning: {warning}")
    out.mkdir(parents=True, exist_ok=True)
    data = out / f"data_{config.data_temperature_k:g}K.h5"
    simulation = config.simulation(platform)
    train_dir = out / "train"
    model = train_dir / "model.pt"
    checkpoint = train_dir / "checkpoint.pt"
    samples = out / "samples.h5"
    summary_path = out / "summary.json"
    # what is done already: saves of the data, steps of the training, the samples
    saves_done = frame_count(data) // simulation.replicas if data.exists() else 0
    steps_done = checkpoint_step(checkpoint) if checkpoint.exists() and not model.exists() else 0
    sampled = samples.exists() and summary_path.exists()
    if estimate and not (saves_done >= simulation.n_saves and model.exists() and sampled):
        from trademd.estimate import estimate_run

        _log(estimate_run(config, platform, device,
                          md_saves_done=None if saves_done >= simulation.n_saves else saves_done,
                          training_steps_done=None if model.exists() else steps_done,
                          sampling=not sampled).line())
    if not data.exists():
        _log(f"simulating {config.system} at {config.data_temperature_k:g} K -> {data}")
        simulate(simulation, data, command=command, show_progress=show_progress)
    elif saves_done < simulation.n_saves:
        _log(f"resuming the simulation in {data}")
        simulate(simulation, data, resume=True, command=command, show_progress=show_progress)
    else:
        _log(f"reusing {data}")

    t_min, t_max = config.temperature_range_k
    if model.exists():
        _log(f"reusing {model}")
    else:
        resume = checkpoint.exists()
        _log(f"{'resuming' if resume else 'training'} TRADE over {t_min:g}-{t_max:g} K -> {train_dir}")
        train_run(train_dir, t_min, t_max, data=data, preset=config.preset,
                  overrides=config.training_overrides(),
                  device=device, platform=platform, resume=resume, show_progress=show_progress)

    if sampled:
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

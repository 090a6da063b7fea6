"""The ``trade-md`` command: parses arguments and calls the library, nothing else."""

from functools import wraps
import inspect
from pathlib import Path
import shlex
from typing import List, Optional

import typer
from typer.core import TyperGroup

from trademd.errors import TradeMDError
from trademd.md.settings import (
    DEFAULT_EQUILIBRATION_PS,
    DEFAULT_LADDERS,
    DEFAULT_REPLICAS,
    DEFAULT_SYSTEM,
    DEFAULT_TEMPERATURE_K,
)
from trademd.pipeline import RunConfig
from trademd.training.config import DEFAULT_PRESET
from trademd.units import format_time_ps

#: The defaults of ``trade-md run`` (:class:`trademd.pipeline.RunConfig`).
RUN_DEFAULTS = RunConfig()


class Commands(TyperGroup):
    """The command group: checks and expands each command's option values
    (:func:`expand_multi_value_options`) before click parses them, so that ``trade-md`` and
    ``app(args)`` read the same words the same way."""

    def parse_args(self, ctx, args: list[str]) -> list[str]:
        try:
            args = expand_multi_value_options(args, self)
        except TradeMDError as error:
            typer.echo(f"error: {error}", err=True)
            raise typer.Exit(2) from None
        return super().parse_args(ctx, args)


app = typer.Typer(
    cls=Commands,
    add_completion=False,
    pretty_exceptions_enable=False,
    no_args_is_help=True,
    help="Equilibrium samples of molecules at temperatures never simulated (TRADE).",
)


def full_command(ctx: typer.Context) -> str:
    """The command with every option spelled out, defaults included: reproduces the run."""
    words = [ctx.command_path]
    flags = {p.name: next((o for o in p.opts if o.startswith("--")), None) for p in ctx.command.params}
    for name, value in ctx.params.items():
        flag = flags.get(name)
        if flag is None:  # a positional argument (or several)
            words += [shlex.quote(str(v)) for v in (value if isinstance(value, (list, tuple)) else [value])]
            continue
        if isinstance(value, bool):
            words += [flag] if value else []
        elif isinstance(value, (list, tuple)):
            words += [w for v in value for w in (flag, shlex.quote(str(v)))]
        elif value is not None:
            words += [flag, shlex.quote(str(value))]
    return " ".join(words)


#: Ctrl-C message of a command with a ``--resume`` option.
INTERRUPTED_RESUMABLE = "interrupted: the work up to the last checkpoint is saved; continue with --resume"


def reports_errors(command=None, *, interrupted: str | None = None):
    """Turn :class:`TradeMDError` into a one-line message and exit status 1, an output path
    below a regular file into a one-line message and status 1, and Ctrl-C into ``interrupted``
    (default: :data:`INTERRUPTED_RESUMABLE` for a command with a ``resume`` parameter, else
    just "interrupted") and status 130. Use as ``@reports_errors`` or
    ``@reports_errors(interrupted=...)``."""
    if command is None:
        return lambda function: reports_errors(function, interrupted=interrupted)
    if interrupted is None:
        resumable = "resume" in inspect.signature(command).parameters
        interrupted = INTERRUPTED_RESUMABLE if resumable else "interrupted"

    @wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except TradeMDError as error:
            typer.echo(f"error: {error}", err=True)
            raise typer.Exit(1) from None
        except (FileExistsError, NotADirectoryError) as error:
            typer.echo(f"error: {path_problem(error)}", err=True)
            raise typer.Exit(1) from None
        except KeyboardInterrupt:
            typer.echo(interrupted, err=True)
            raise typer.Exit(130) from None

    return wrapper


def path_problem(error: OSError) -> str:
    """One line for an output that cannot be created because a regular file stands where its
    folder should be (``--out some.h5/x.h5`` with ``some.h5`` a file)."""
    if error.filename is None:
        return f"{error.strerror or error}: check the output path"
    path = Path(error.filename)
    blocker = next((p for p in (path, *path.parents) if p.exists() and not p.is_dir()), None)
    if blocker is None:
        return f"cannot create {str(path)!r}: {error.strerror}: check the output path"
    where = "" if blocker == path else f"cannot create {str(path)!r}: "
    return f"{where}{str(blocker)!r} is a file, not a folder: choose another output path"


@app.command()
@reports_errors
def systems() -> None:
    """List the built-in molecular systems."""
    from trademd.systems import list_systems

    for system in list_systems():
        typer.echo(
            f"{system.name:17s} {system.n_atoms:3d} atoms  {system.solvent:13s} "
            f"{system.force_field_label:38s} {system.description}"
        )


@app.command()
@reports_errors
def simulate(
    ctx: typer.Context,
    out: Path = typer.Option(..., "--out", help="HDF5 trajectory file to write"),
    system: str = typer.Option(DEFAULT_SYSTEM, help="built-in system (see `trade-md systems`)"),
    pdb: Optional[Path] = typer.Option(None, help="user system: PDB file of one molecule"),
    forcefield: Optional[List[str]] = typer.Option(None, help="user system: force-field XML (repeat)"),
    temperature: float = typer.Option(DEFAULT_TEMPERATURE_K, help="temperature in K"),
    temperatures: Optional[List[float]] = typer.Option(
        None, help="replica exchange over these temperatures (K), e.g. --temperatures 300 350 400"),
    exchange_every: str = typer.Option("1ps", help="replica exchange: interval between exchange attempts"),
    time: str = typer.Option("1ns", help="production time per replica, e.g. 20ns"),
    replicas: Optional[int] = typer.Option(
        None, help=f"copies simulated together (default {DEFAULT_REPLICAS}); replica exchange: ladders "
                   f"(default {DEFAULT_LADDERS})"),
    save_every: str = typer.Option("1ps", help="interval between saved frames"),
    timestep: str = typer.Option("2fs", help="integration time step (4fs needs --hydrogen-mass)"),
    hydrogen_mass: Optional[float] = typer.Option(
        None, help="hydrogen mass repartitioning: hydrogens get this mass (amu, e.g. 1.5), taken from their heavy atom"),
    equilibration: str = typer.Option(format_time_ps(DEFAULT_EQUILIBRATION_PS),
                                      help="discarded equilibration per replica"),
    platform: str = typer.Option("auto", help="OpenMM platform: auto, CPU, CUDA, OpenCL or Reference"),
    seed: int = typer.Option(0, help="random seed of velocities and the Langevin integrator"),
    shard: Optional[str] = typer.Option(
        None, help="run shard i/N of N independent runs (seed + i) into OUT.shard<i>of<N>.h5; join them with `trade-md merge`"),
    overwrite: bool = typer.Option(False, help="replace an existing output file"),
    resume: bool = typer.Option(False, help="continue an interrupted run of --out"),
    quiet: bool = typer.Option(False, help="no progress display"),
) -> None:
    """Run Langevin MD of many replicas (one OpenMM Context on a GPU, one per CPU thread on the
    CPU) and write frames to HDF5; with
    --temperatures, replica exchange writing one ensemble per temperature. Under torchrun each
    rank runs a shard (seed + rank) and rank 0 merges them into --out."""
    from trademd.simulate import parse_shard, shard_path, simulate_shards, simulation_config
    from trademd.units import parse_time_ps

    config = simulation_config(
        system=system, pdb_path=pdb, forcefield_files=tuple(forcefield or ()),
        temperature_k=temperature, temperatures_k=tuple(temperatures or ()), replicas=replicas,
        resume_file=(out if shard is None else shard_path(out, *parse_shard(shard))) if resume else None,
        exchange_every_ps=parse_time_ps(exchange_every),
        time_ps=parse_time_ps(time), save_every_ps=parse_time_ps(save_every),
        timestep_ps=parse_time_ps(timestep), hydrogen_mass_amu=hydrogen_mass,
        equilibration_ps=parse_time_ps(equilibration, allow_zero=True), seed=seed, platform=platform,
    )
    path = simulate_shards(config, out, shard=None if shard is None else parse_shard(shard),
                           overwrite=overwrite, resume=resume, command=full_command(ctx),
                           show_progress=not quiet)
    typer.echo(str(path))


@app.command()
@reports_errors
def merge(
    ctx: typer.Context,
    files: List[Path] = typer.Argument(..., help="finished simulate files of the same settings (e.g. shards)"),
    out: Path = typer.Option(..., "--out", help="merged HDF5 file to write"),
    overwrite: bool = typer.Option(False, help="replace an existing output file"),
) -> None:
    """Join simulate files of the same settings (shards of one run) into one file."""
    from trademd.simulate import merge as merge_files

    typer.echo(str(merge_files(list(files), out, overwrite=overwrite, command=full_command(ctx))))


@app.command()
@reports_errors
def info(file: Path = typer.Argument(..., help="any HDF5 file trade-md wrote")) -> None:
    """Print what a trade-md HDF5 file holds: format, attributes, datasets with units."""
    from trademd.io.schema import describe

    typer.echo(describe(file))


@app.command()
@reports_errors
def export(
    file: Path = typer.Argument(..., help="trajectory (simulate) or samples (sample) file"),
    format: str = typer.Option("dcd", "--format", help="dcd, xtc, pdb or npz"),
    out: Optional[Path] = typer.Option(None, help="output path (default: FILE with new suffix)"),
    temperature: Optional[float] = typer.Option(None, help="samples or replica-exchange file: which temperature (K)"),
    resample: Optional[int] = typer.Option(None, help="samples file: draw N frames by importance weight"),
    seed: int = typer.Option(0, help="random seed of --resample"),
) -> None:
    """Write frames as DCD, XTC, PDB (through mdtraj) or NPZ; optionally resampled by weight."""
    from trademd.io.export import export_file

    typer.echo(str(export_file(file, format, out, temperature, resample, seed)))


@app.command()
@reports_errors
def energy(
    file: Path = typer.Argument(..., help="trajectory file written by `trade-md simulate`"),
    platform: str = typer.Option("auto", help="OpenMM platform: auto, CPU, CUDA, OpenCL or Reference"),
    write: bool = typer.Option(False, help="replace the stored energies with the recomputed ones"),
    temperature: Optional[float] = typer.Option(None, help="replica-exchange file: which ensemble (K)"),
) -> None:
    """Recompute the potential energy of every frame and compare with the stored values."""
    from trademd.recompute import recompute_trajectory_energies

    check = recompute_trajectory_energies(file, platform=platform, write=write, temperature_k=temperature)
    typer.echo(f"frames: {check.n_frames}")
    typer.echo(f"max |recomputed - stored|: {check.max_abs_difference_kj_mol:.6g} kJ/mol")
    typer.echo(f"mean energy: {check.mean_energy_kj_mol:.6f} kJ/mol")
    if check.n_overflow:
        typer.echo(f"non-finite energies: {check.n_overflow} frames (atoms on top of each other)")
    if check.written:
        typer.echo(f"wrote recomputed energies to {file}")


@app.command()
@reports_errors
def train(
    out: Path = typer.Option(..., "--out", help="run directory (model.pt, metrics.csv, loss.png)"),
    data: Optional[Path] = typer.Option(None, help="trajectory file from `trade-md simulate` (its T is T0)"),
    temperature: Optional[float] = typer.Option(
        None, help="replica-exchange --data: train on the ensemble at this temperature (K)"),
    system: Optional[str] = typer.Option(None, help="analytic system instead of data: gaussian-2d, double-well-5d, mixture-2d"),
    tmin: float = typer.Option(..., help="lowest temperature of the trained range (K)"),
    tmax: float = typer.Option(..., help="highest temperature of the trained range (K)"),
    objective: Optional[str] = typer.Option(None, help="trade (default), nll, reverse-kl, nll+reverse-kl, data-free, interpolation (analytic systems: a CNF on the continuity residual)"),
    data_free: bool = typer.Option(False, "--data-free", help="no data: a boundary by reverse KL at T0, TRADE over the range (--objective data-free)"),
    t0: Optional[float] = typer.Option(None, "--t0", help="training a molecule without data (--data-free, --objective reverse-kl): the temperature in K of its boundary and feature widths (default --tmax)"),
    preset: str = typer.Option(DEFAULT_PRESET, help="quick (laptop CPU, minutes) or paper (GPU scale)"),
    steps: Optional[int] = typer.Option(None, help="training steps (overrides the preset)"),
    batch_size: Optional[int] = typer.Option(None, help="NLL batch size, per rank under torchrun (overrides the preset)"),
    compile_splines: Optional[bool] = typer.Option(
        None, "--compile/--no-compile",
        help="splines through torch.compile: 1.1-1.3x per step after 30-60 s of compiling (default: off)"),
    config: Optional[Path] = typer.Option(None, help="JSON or YAML file of training settings"),
    device: str = typer.Option("auto", help="torch device: auto, cpu or cuda"),
    platform: str = typer.Option("auto", help="OpenMM platform of the energies: auto, CPU, CUDA, OpenCL or Reference"),
    seed: Optional[int] = typer.Option(None, help="random seed"),
    resume: bool = typer.Option(False, help="continue from the run directory's checkpoint"),
    quiet: bool = typer.Option(False, help="no progress display"),
) -> None:
    """Fit a temperature-conditional flow at T0 and transfer it over [tmin, tmax] with TRADE."""
    from trademd.train import train_run

    if data_free and objective not in (None, "data-free"):
        raise TradeMDError(f"--data-free is the objective data-free, not {objective!r}: give one of them")
    overrides = {"objective": "data-free" if data_free else objective, "steps": steps,
                 "batch_size": batch_size, "seed": seed, "compile_splines": compile_splines}
    model = train_run(out, tmin, tmax, data=data, temperature_k=temperature, boundary_temperature_k=t0, system=system,
                      preset=preset, config_file=config, overrides=overrides, device=device,
                      platform=platform, resume=resume, show_progress=not quiet)
    typer.echo(str(model))


@app.command()
@reports_errors
def sample(
    ctx: typer.Context,
    model: Path = typer.Option(..., help="model.pt from `trade-md train`"),
    temperature: List[float] = typer.Option(..., help="temperature(s) in K; repeat for several"),
    out: Path = typer.Option(..., "--out", help="HDF5 samples file to write"),
    n: int = typer.Option(10000, "--n", "--samples",
                          help="samples per temperature (under torchrun write --samples: torchrun takes --n as its own)"),
    batch_size: int = typer.Option(4096, help="samples per batch"),
    extrapolate: bool = typer.Option(False, help="allow temperatures outside the trained range"),
    device: str = typer.Option("auto", help="torch device: auto, cpu or cuda"),
    platform: str = typer.Option("auto", help="OpenMM platform of the energies: auto, CPU, CUDA, OpenCL or Reference"),
    seed: int = typer.Option(0, help="random seed of the samples (the same with any number of torchrun ranks)"),
    overwrite: bool = typer.Option(False, help="replace an existing output file"),
    json_summary: bool = typer.Option(False, "--json", help="print a one-line JSON summary per T"),
    quiet: bool = typer.Option(False, help="no progress display"),
) -> None:
    """Sample a trained model at any temperature with OpenMM energies and importance weights."""
    import json

    from trademd.sample import sample_run

    summaries = sample_run(model, list(temperature), n, out, overwrite=overwrite,
                           extrapolate=extrapolate, device=device, platform=platform,
                           batch_size=batch_size, command=full_command(ctx), show_progress=not quiet,
                           seed=seed)
    for summary in summaries:
        if json_summary:
            typer.echo(json.dumps(summary))
        else:
            delta, error = summary.get("delta_f_positive_phi_kt"), summary.get("delta_f_positive_phi_kt_error")
            # no error where a region holds less than one effective sample: the value is no measurement
            extra = (f", dF(phi>0 vs phi<0) {delta:.2f} +- {'n/a' if error is None else f'{error:.2f}'} kT"
                     if delta is not None else "")
            typer.echo(f"{summary['temperature_k']:g} K: n {summary['n']}, ESS {summary['ess']:.0f} "
                       f"({100 * summary['relative_ess']:.1f} %){extra} -> {summary['path']}")


@app.command()
@reports_errors
def evaluate(
    samples: Path = typer.Option(..., help="samples file from `trade-md sample`"),
    reference: Path = typer.Option(
        ..., help="reference: trade-md trajectory or replica-exchange .h5, openmmtools storage .nc, or a trajectory mdtraj reads (.dcd, .xtc, .pdb, ...)"),
    temperature: Optional[float] = typer.Option(
        None, help="temperature (K); default: the reference's; a replica-exchange reference takes any T in its ladder (MBAR)"),
    topology: Optional[Path] = typer.Option(None, help="PDB of the atoms of a --reference trajectory mdtraj reads (.dcd, .xtc, ...)"),
    model: Optional[Path] = typer.Option(None, help="model.pt, to report the reference frames' NLL"),
    out: Optional[Path] = typer.Option(None, help="metrics JSON (default: SAMPLES_T<T>_metrics.json)"),
    platform: str = typer.Option("auto", help="OpenMM platform of reference energies recomputed: auto, CPU, CUDA, OpenCL or Reference"),
    bootstrap: Optional[int] = typer.Option(
        None, help="block-bootstrap resamples of a replica-exchange reference's MBAR error (default 100)"),
    seed: int = typer.Option(0, help="random seed of the bootstrap"),
    json_summary: bool = typer.Option(False, "--json", help="print the metrics as one line of JSON"),
) -> None:
    """Compare samples with a reference ensemble: phi/psi KL and JS, energy W1, ESS, free energies
    (with the reference's own error; a replica-exchange reference pooled over its rungs by MBAR)."""
    import json

    from trademd.evaluate import evaluate_samples, metrics_path, summary_lines

    out_json = metrics_path(samples, temperature, out)
    resamples = {} if bootstrap is None else {"bootstrap_resamples": bootstrap}
    metrics = evaluate_samples(samples, reference, temperature, model, out_json, out_json.with_suffix(".png"),
                               topology_path=topology, platform=platform, seed=seed, **resamples)
    if json_summary:
        typer.echo(json.dumps(metrics))
        return
    for line in summary_lines(metrics):
        typer.echo(line)
    typer.echo(f"metrics -> {out_json}, figure -> {out_json.with_suffix('.png')}")


@app.command()
@reports_errors(interrupted="interrupted: finished stages are kept; rerun the same command to continue")
def run(
    ctx: typer.Context,
    out: Path = typer.Option(Path("runs/demo"), "--out", help="run directory"),
    system: str = typer.Option(RUN_DEFAULTS.system, help="built-in system"),
    temperature: List[float] = typer.Option(list(RUN_DEFAULTS.temperatures_k), help="temperature(s) to sample at (K)"),
    data_temperature: float = typer.Option(RUN_DEFAULTS.data_temperature_k, help="simulation temperature T0 (K)"),
    time: str = typer.Option(
        format_time_ps(RUN_DEFAULTS.simulation_ps),
        help=f"simulation time per replica ({RUN_DEFAULTS.replicas} replicas x {format_time_ps(RUN_DEFAULTS.simulation_ps)} "
             f"every {format_time_ps(RUN_DEFAULTS.save_every_ps)}: "
             f"{round(RUN_DEFAULTS.replicas * RUN_DEFAULTS.simulation_ps / RUN_DEFAULTS.save_every_ps):,} frames)"),
    replicas: int = typer.Option(RUN_DEFAULTS.replicas, help="MD replicas"),
    save_every: str = typer.Option(format_time_ps(RUN_DEFAULTS.save_every_ps), help="MD frame interval"),
    timestep: Optional[str] = typer.Option(None, help="MD time step (default: the system's, 4fs with rigid bonds to hydrogen, 2fs without)"),
    hydrogen_mass: Optional[float] = typer.Option(
        None, help="MD hydrogen mass (amu; repartitioned from heavy atoms, 0: force-field masses; default: the system's, 1.5 with rigid bonds to hydrogen)"),
    seed: int = typer.Option(RUN_DEFAULTS.seed, help="seed of the MD and of training"),
    preset: str = typer.Option(RUN_DEFAULTS.preset, help="training preset: quick or paper"),
    steps: Optional[int] = typer.Option(None, help="training steps (default: the preset's)"),
    n: int = typer.Option(RUN_DEFAULTS.n_samples, help="samples per temperature"),
    platform: str = typer.Option("auto", help="OpenMM platform: auto, CPU, CUDA, OpenCL or Reference"),
    device: str = typer.Option("auto", help="torch device: auto, cpu or cuda"),
    quiet: bool = typer.Option(False, help="no progress display"),
    estimate: bool = typer.Option(True, help="first say how long the stages to run will take here (measured in a few seconds)"),
) -> None:
    """The main job in one command: simulate at T0, train TRADE, sample at T, plot."""
    import json

    from trademd.pipeline import RunConfig, run_pipeline
    from trademd.units import parse_time_ps

    config = RunConfig(system=system, temperatures_k=tuple(temperature), data_temperature_k=data_temperature,
                       simulation_ps=parse_time_ps(time), replicas=replicas, save_every_ps=parse_time_ps(save_every),
                       timestep_ps=parse_time_ps(timestep) if timestep else None,
                       hydrogen_mass_amu=hydrogen_mass,
                       preset=preset, steps=steps, n_samples=n, seed=seed)
    summary = run_pipeline(config, out, platform=platform, device=device,
                           command=full_command(ctx), show_progress=not quiet, estimate=estimate)
    for entry in summary["samples"]:
        typer.echo(json.dumps(entry))


def expand_multi_value_options(argv: list[str], group=None) -> list[str]:
    """Check a command's option values and spell out the list options.

    An option declared as a list (``sample --temperature``, ``simulate --temperatures``,
    ``--forcefield``) takes every word that follows it up to the next ``--option``:
    ``--temperatures 300 350 400`` becomes ``--temperatures 300 --temperatures 350
    --temperatures 400``. Any other option takes one value, once; several values or a repeat
    raise :class:`TradeMDError` (click alone would keep the last).

    Args:
        argv: the words after ``trade-md`` (the command name first).
        group: the (click) command group (default: :data:`app`'s).
    """
    group = group if group is not None else typer.main.get_command(app)
    name_at = next((i for i, word in enumerate(argv) if not word.startswith("-")), None)
    command = None if name_at is None else getattr(group, "commands", {}).get(argv[name_at])
    if command is None:
        return list(argv)
    return [*argv[: name_at + 1], *_expand_command_options(argv[name_at + 1:], command)]


def _expand_command_options(words: list[str], command) -> list[str]:
    options = {flag: p for p in command.params if p.param_type_name == "option"
               for flag in (*p.opts, *p.secondary_opts)}
    n_arguments = sum(p.param_type_name == "argument" for p in command.params)
    expanded, n_loose = [], 0
    uses: dict[str, list[tuple[str, list[str]]]] = {}  # single-value option -> (flag, words) per use
    current = None  # (flag, option, words after it) of the option the next words follow
    for at, word in enumerate(words):
        if word == "--":  # the rest are arguments
            expanded += words[at:]
            n_loose += len(words) - at - 1
            break
        expanded.append(word)
        if word.startswith("--"):
            flag, inline, value = word.partition("=")
            option = options.get(flag)
            if option is None or option.is_flag or option.count:  # unknown: click reports it
                current = None
                continue
            current = (flag, option, [value] if inline else [])
            if not option.multiple:
                uses.setdefault(option.name, []).append((flag, current[2]))
        elif current is None:
            n_loose += 1
        else:
            flag, option, following = current
            if option.multiple and following:
                expanded[-1:] = [flag, word]
            elif following:  # a second word after a single-value option: an argument, or a mistake
                n_loose += 1
            following.append(word)
    for each_use in uses.values():
        flag = each_use[0][0]
        several = [following for _, following in each_use if len(following) > 1]
        if several and n_loose > n_arguments:
            plural = options.get(f"{flag}s")
            other = f", or several with {flag}s" if plural is not None and plural.multiple else ""
            raise TradeMDError(f"{flag} takes one value (got {' '.join(several[0])}): give one value{other}")
        if len(each_use) > 1:
            got = ", ".join(following[0] if following else "nothing" for _, following in each_use)
            raise TradeMDError(f"{flag} is given {len(each_use)} times ({got}): give it once")
    return expanded


def main() -> None:
    """Entry point of the ``trade-md`` console script."""
    app()

"""The ``trade-md`` command: parses arguments and calls the library, nothing else."""

from functools import wraps
import shlex
from pathlib import Path
from typing import List, Optional

import typer

from trademd.errors import TradeMDError

app = typer.Typer(
    add_completion=False,
    pretty_exceptions_enable=False,
    no_args_is_help=True,
    help="Equilibrium samples of molecules at temperatures never simulated (TRADE).",
)


def full_command(ctx: typer.Context) -> str:
    """The command with every option spelled out, defaults included: reproduces the run."""
    words = [ctx.command_path]
    for name, value in ctx.params.items():
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            words += [flag] if value else []
        elif isinstance(value, (list, tuple)):
            words += [w for v in value for w in (flag, shlex.quote(str(v)))]
        elif value is not None:
            words += [flag, shlex.quote(str(value))]
    return " ".join(words)


def reports_errors(command):
    """Turn :class:`TradeMDError` into a one-line message and exit status 1; Ctrl-C into 130."""

    @wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except TradeMDError as error:
            typer.echo(f"error: {error}", err=True)
            raise typer.Exit(1) from None
        except KeyboardInterrupt:
            typer.echo("interrupted: finished chunks are saved; continue with --resume", err=True)
            raise typer.Exit(130) from None

    return wrapper


@app.command()
@reports_errors
def systems() -> None:
    """List the built-in molecular systems."""
    from trademd.systems import list_systems

    for system in list_systems():
        typer.echo(
            f"{system.name:16s} {system.n_atoms:3d} atoms  {system.solvent:13s} "
            f"{' + '.join(system.forcefield_files):34s} {system.description}"
        )


@app.command()
@reports_errors
def simulate(
    ctx: typer.Context,
    out: Path = typer.Option(..., "--out", help="HDF5 trajectory file to write"),
    system: str = typer.Option("ala2-implicit", help="built-in system (see `trade-md systems`)"),
    pdb: Optional[Path] = typer.Option(None, help="user system: PDB file of one molecule"),
    forcefield: Optional[List[str]] = typer.Option(None, help="user system: force-field XML (repeat)"),
    temperature: float = typer.Option(600.0, help="temperature in K"),
    time: str = typer.Option("1ns", help="production time per replica, e.g. 20ns"),
    replicas: int = typer.Option(64, help="copies of the molecule simulated together"),
    save_every: str = typer.Option("1ps", help="interval between saved frames"),
    equilibration: str = typer.Option("100ps", help="discarded equilibration per replica"),
    platform: str = typer.Option("auto", help="OpenMM platform: auto, CPU or CUDA"),
    seed: int = typer.Option(0, help="random seed of velocities and the Langevin integrator"),
    overwrite: bool = typer.Option(False, help="replace an existing output file"),
    resume: bool = typer.Option(False, help="continue an interrupted run of --out"),
    quiet: bool = typer.Option(False, help="no progress display"),
) -> None:
    """Run Langevin MD of many replicas in one OpenMM Context and write frames to HDF5."""
    from trademd.simulate import SimulationConfig
    from trademd.simulate import simulate as run_simulation
    from trademd.units import parse_time_ps

    config = SimulationConfig(
        system_name=system if pdb is None else f"user:{pdb.name}",
        temperature_k=temperature,
        time_ps=parse_time_ps(time),
        replicas=replicas,
        save_every_ps=parse_time_ps(save_every),
        equilibration_ps=0.0 if equilibration.strip() in ("0", "0ps") else parse_time_ps(equilibration),
        seed=seed,
        platform=platform,
        pdb_path=str(pdb) if pdb is not None else None,
        forcefield_files=tuple(forcefield or ()),
    )
    path = run_simulation(config, out, overwrite=overwrite, resume=resume,
                          command=full_command(ctx), show_progress=not quiet)
    typer.echo(str(path))


@app.command()
@reports_errors
def info(file: Path = typer.Argument(..., help="any HDF5 file trade-md wrote")) -> None:
    """Print what a trade-md HDF5 file holds: format, attributes, datasets with units."""
    from trademd.h5io import describe

    typer.echo(describe(file))


@app.command()
@reports_errors
def export(
    file: Path = typer.Argument(..., help="trajectory file written by `trade-md simulate`"),
    format: str = typer.Option("dcd", "--format", help="dcd, xtc or pdb"),
    out: Optional[Path] = typer.Option(None, help="output path (default: FILE with new suffix)"),
) -> None:
    """Write a trajectory file as DCD, XTC or PDB through mdtraj."""
    from trademd.export import export_trajectory

    typer.echo(str(export_trajectory(file, format, out)))


def main() -> None:
    """Entry point of the ``trade-md`` console script."""
    app()

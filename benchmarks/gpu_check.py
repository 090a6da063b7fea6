"""Everything we want to know from a lent GPU, in one run of under 8 minutes.

    python benchmarks/gpu_check.py                       # on the GPU machine: CUDA, cuda
    python benchmarks/gpu_check.py --platform OpenCL     # an AMD/Intel/Apple GPU
    python benchmarks/gpu_check.py --dry-run --platform OpenCL --device cpu   # tiny, on a CPU (pocl)

Sections (each timed; a failing section is recorded and the others still run):
1. ``install``: OpenMM's ``testInstallation`` (which platforms work, their force errors).
2. ``tests``: the CUDA- and OpenCL-marked tests of the suite (skipped in a dry run).
3. ``bridge``: energy+force evaluations per second of the energy bridge on the GPU platform
   (replicated per-copy Contexts) against the CPU pool, ala2-implicit and ala4-implicit at
   batches 256-4096, with the largest error against a double-precision single-molecule
   Reference Context; and the replicated kernel alone at several copies per Context in mixed
   and double precision (what chooses the defaults).
4. ``md``: molecule-ns/day of the replicated MD engine at 16, 64 and 256 copies.
5. ``training``: training steps per second of the quick and paper presets (a few hundred steps
   of ``trade-md train`` on GPU-made 600 K data).
6. ``paper_run``: a shortened paper-preset run (simulate -> train -> sample at 300 K) and its
   pooled ESS at 300 K.

Writes one JSON (``--out``) and prints a table. The machine needs the project and its wheels
(``../shared/gpu/wheels.sh``).
"""

import argparse
import csv
import json
import os
import platform as host
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np

#: Sizes of a full run (on a GPU) and of a dry run (seconds on a CPU).
FULL = dict(batches=[256, 1024, 4096], bridge_copies=None, kernel_copies=[16, 64, 128], md_copies=[16, 64, 256],
            md_steps=2000, data_replicas=64, data_time="100ps", train_steps=300, paper_steps=1500,
            paper_refine_steps=300, estimate_samples=2000, samples=100000, bridge_seconds=2.0)
DRY = dict(batches=[32], bridge_copies=4, kernel_copies=[4], md_copies=[4], md_steps=100,
           data_replicas=2, data_time="2ps", train_steps=6, paper_steps=6, paper_refine_steps=2,
           estimate_samples=100, samples=400, bridge_seconds=0.2)
SYSTEMS = ("ala2-implicit", "ala4-implicit")


#: Where child interpreters start: outside the checkout, whose source folder trademd/ (without
#: cli/ and systems/ inside it) would otherwise shadow the installed package.
OUTSIDE = tempfile.gettempdir()


def _cli(*args: str, timeout_s: float = 600) -> str:
    """Run ``trade-md ARGS`` in a fresh interpreter; its stdout (raises with its stderr)."""
    result = subprocess.run([sys.executable, "-m", "trademd", *args], capture_output=True, text=True,
                            timeout=timeout_s, cwd=OUTSIDE)
    if result.returncode != 0:
        tail = [line for line in result.stderr.splitlines() if "unsupported OpenCL" not in line][-5:]
        raise RuntimeError(f"trade-md {' '.join(args)} failed ({result.returncode}): {' | '.join(tail)}")
    return result.stdout


def _rate(evaluate, n_per_call: int, seconds: float) -> float:
    """Calls of ``evaluate`` x ``n_per_call`` per second, after one warm-up call."""
    evaluate()
    calls, start = 0, time.perf_counter()
    while calls < 2 or time.perf_counter() - start < seconds:
        evaluate()
        calls += 1
    return calls * n_per_call / (time.perf_counter() - start)


def _configurations(molecule, n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return molecule.positions_nm()[None] + rng.normal(0.0, 0.01, size=(n, molecule.n_atoms, 3))


def check_install() -> dict:
    result = subprocess.run([sys.executable, "-m", "openmm.testInstallation"], capture_output=True,
                            text=True, timeout=300)
    lines = [line for line in result.stdout.splitlines() if line.strip()]
    from trademd.platforms import available_openmm_platforms, opencl_gpu_present, resolve_platform

    return {"returncode": result.returncode, "report": lines[-12:], "platforms": available_openmm_platforms(),
            "opencl_gpu": opencl_gpu_present(), "auto": resolve_platform("auto")}


def check_tests() -> dict:
    root = Path(__file__).resolve().parent.parent
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-c", str(root / "setup.cfg"), "--rootdir",
                             str(root), "-m", "cuda or opencl", str(root / "tests")],
                            capture_output=True, text=True, timeout=420, cwd=OUTSIDE)
    return {"returncode": result.returncode, "summary": result.stdout.strip().splitlines()[-1:]}


def check_bridge(platform: str, sizes: dict) -> dict:
    import torch

    from trademd.energy.bridge import EnergyBridge
    from trademd.energy.molecule import MoleculeEnergy
    from trademd.energy.pool import ReplicatedKernel
    from trademd.platforms import openmm_platform
    from trademd.systems import get_system

    rows = []
    for name in SYSTEMS:
        molecule = get_system(name)
        system = molecule.create_openmm_system()
        probe = _configurations(molecule, 64, seed=1)
        exact, _ = MoleculeEnergy(system, "Reference")(probe)
        with EnergyBridge(molecule, platform=platform, copies=sizes["bridge_copies"]) as gpu, EnergyBridge(molecule, platform="CPU") as cpu:
            error = float(np.abs(gpu.evaluate_numpy(probe)[0] - exact).max())
            for batch in sizes["batches"]:
                x = torch.tensor(_configurations(molecule, batch))
                gpu_rate = _rate(lambda: gpu.evaluate(x), batch, sizes["bridge_seconds"])
                cpu_rate = _rate(lambda: cpu.evaluate(x), batch, sizes["bridge_seconds"])
                rows.append({"system": name, "what": f"bridge {gpu.platform} x{gpu.copies} vs CPU pool",
                             "batch": batch, "evals_per_s": gpu_rate, "baseline_evals_per_s": cpu_rate,
                             "ratio": gpu_rate / cpu_rate, "max_error_kj_mol": error})
        for precision in ("mixed", "double"):
            properties = openmm_platform(platform, threads=1, precision=precision)[1]
            for copies in sizes["kernel_copies"]:
                start = time.perf_counter()
                kernel = ReplicatedKernel(system, copies, platform, properties, molecule_radius_nm=1.0)
                build_s = time.perf_counter() - start
                error = float(np.abs(kernel(probe)[0] - exact).max())
                x = _configurations(molecule, 4 * copies)
                rows.append({"system": name, "what": f"kernel {platform} {precision} x{copies}", "batch": 4 * copies,
                             "evals_per_s": _rate(lambda: kernel(x), len(x), sizes["bridge_seconds"]),
                             "max_error_kj_mol": error, "build_s": build_s})
    return {"rows": rows}


def check_md(platform: str, sizes: dict) -> dict:
    import openmm

    from trademd.energy.copies import replicate_system
    from trademd.md.settings import COM_RESTRAINT_NM, MOLECULE_RADIUS_NM
    from trademd.platforms import openmm_platform
    from trademd.systems import get_system

    rows = []
    for name in SYSTEMS:
        molecule = get_system(name)
        for copies in sizes["md_copies"]:
            system, layout = replicate_system(molecule.create_openmm_system(), copies, per_copy_energies=False,
                                              molecule_radius_nm=MOLECULE_RADIUS_NM, com_restraint_nm=COM_RESTRAINT_NM)
            integrator = openmm.LangevinMiddleIntegrator(600.0, 1.0, 0.002)
            chosen, properties = openmm_platform(platform)
            context = openmm.Context(system, integrator, chosen, properties)
            context.setPositions(layout.place(np.repeat(molecule.positions_nm()[None], copies, axis=0)))
            context.setVelocitiesToTemperature(600.0, 1)
            integrator.step(20)
            context.getState(getEnergy=True)
            start = time.perf_counter()
            integrator.step(sizes["md_steps"])
            energy = context.getState(getEnergy=True).getPotentialEnergy()._value  # waits for the device
            elapsed = time.perf_counter() - start
            ns_day = sizes["md_steps"] * 0.002e-3 * copies * 86400 / elapsed
            rows.append({"system": name, "copies": copies, "ns_per_day": ns_day,
                         "finite": bool(np.isfinite(energy))})
    return {"rows": rows}


def _train(data: Path, out: Path, preset: str, steps: int, refine_steps: int, platform: str,
           device: str, estimate_samples: int) -> dict:
    """``trade-md train`` with a preset, cut to ``steps`` (one short refinement round, metrics
    and expectations from ``estimate_samples`` samples); its wall time and the last steps/s
    of metrics.csv."""
    settings = {"metrics_every": max(2, steps // 2), "checkpoint_every": 10 * steps,
                "metrics_samples": estimate_samples, "refine_rounds": 1 if refine_steps else 0,
                "refine_steps": max(1, refine_steps), "refine_samples": estimate_samples}
    if preset == "paper":
        settings.update(cache_every=max(1, steps // 4), cache_samples=estimate_samples)
    config = out.parent / f"{out.name}.json"
    config.write_text(json.dumps(settings))
    start = time.perf_counter()
    _cli("train", "--data", str(data), "--tmin", "240", "--tmax", "660", "--preset", preset,
         "--steps", str(steps), "--config", str(config), "--out", str(out), "--device", device,
         "--platform", platform, "--quiet")
    wall_s = time.perf_counter() - start
    with (out / "metrics.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    rates = [float(r["steps_per_s"]) for r in rows if r.get("steps_per_s") not in (None, "")]
    return {"preset": preset, "steps": steps, "wall_s": wall_s, "steps_per_s": rates[-1] if rates else None,
            "model": str(out / "model.pt")}


def make_data(work: Path, platform: str, sizes: dict) -> Path:
    data = work / "data_600K.h5"
    _cli("simulate", "--system", "ala2-implicit", "--temperature", "600", "--time", sizes["data_time"],
         "--replicas", str(sizes["data_replicas"]), "--save-every", "0.1ps", "--equilibration", "1ps",
         "--platform", platform, "--out", str(data), "--quiet")
    return data


def check_training(data: Path, work: Path, platform: str, device: str, sizes: dict) -> dict:
    rows = [_train(data, work / f"train_{preset}", preset, sizes["train_steps"], 0, platform, device,
                   sizes["estimate_samples"]) for preset in ("quick", "paper")]
    return {"rows": rows}


def check_paper_run(data: Path, work: Path, platform: str, device: str, sizes: dict) -> dict:
    trained = _train(data, work / "paper_run", "paper", sizes["paper_steps"], sizes["paper_refine_steps"],
                     platform, device, sizes["estimate_samples"])
    start = time.perf_counter()
    lines = _cli("sample", "--model", trained["model"], "--temperature", "300", "--temperature", "600",
                 "--n", str(sizes["samples"]), "--out", str(work / "paper_samples.h5"), "--device", device,
                 "--platform", platform, "--json", "--quiet")
    summaries = [json.loads(line) for line in lines.splitlines() if line.startswith("{")]
    return {"train": trained, "sample_wall_s": time.perf_counter() - start,
            "ess": {f"{s['temperature_k']:g}K": s["relative_ess"] for s in summaries}}


def _section(name: str, results: dict, run) -> None:
    start = time.perf_counter()
    try:
        results[name] = run()
    except Exception as error:  # a broken section is a finding: record it, go on
        results[name] = {"error": f"{type(error).__name__}: {error}",
                         "traceback": traceback.format_exc().splitlines()[-6:]}
    results[name]["seconds"] = time.perf_counter() - start
    print(f"[{name}] {results[name]['seconds']:.0f} s{'  ERROR ' + results[name]['error'] if 'error' in results[name] else ''}",
          flush=True)


def print_table(results: dict) -> None:
    print("\n| section | what | figure |\n| --- | --- | --- |")
    install = results.get("install", {})
    if "platforms" in install:
        print(f"| install | platforms, auto | {install['platforms']}, {install['auto']} |")
    for row in results.get("bridge", {}).get("rows", []):
        ratio = f", {row['ratio']:.1f}x the CPU pool" if "ratio" in row else ""
        print(f"| bridge | {row['system']} {row['what']} batch {row['batch']} | {row['evals_per_s']:,.0f} evals/s"
              f"{ratio}, max error {row['max_error_kj_mol']:.1e} kJ/mol |")
    for row in results.get("md", {}).get("rows", []):
        print(f"| md | {row['system']} {row['copies']} copies | {row['ns_per_day']:,.0f} ns/day |")
    for row in results.get("training", {}).get("rows", []):
        print(f"| training | {row['preset']}, {row['steps']} steps | {row['steps_per_s']} steps/s, {row['wall_s']:.0f} s wall |")
    paper = results.get("paper_run", {})
    if "ess" in paper:
        print(f"| paper run | {paper['train']['steps']} steps | relative ESS {paper['ess']} |")
    for name, section in results.items():
        if isinstance(section, dict) and "error" in section:
            print(f"| {name} | ERROR | {section['error']} |")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--platform", default="auto", help="OpenMM platform to check (auto: CUDA, else an OpenCL GPU)")
    parser.add_argument("--device", default="auto", help="torch device: auto, cuda or cpu")
    parser.add_argument("--out", type=Path, default=Path("gpu_check.json"), help="JSON of all figures")
    parser.add_argument("--dry-run", action="store_true", help="tiny sizes: checks the script itself on a CPU")
    parser.add_argument("--work", type=Path, default=None, help="folder for the runs (default: a temporary one)")
    args = parser.parse_args(argv)
    os.environ.setdefault("OPENMM_DEFAULT_PLATFORM", "CPU")  # a library that names no platform
    from trademd.platforms import resolve_platform

    platform = resolve_platform(args.platform)
    sizes = DRY if args.dry_run else FULL
    import torch

    results: dict = {"date": time.strftime("%Y-%m-%d %H:%M"), "host": host.node(), "platform": platform,
                     "device": args.device, "dry_run": args.dry_run, "torch": torch.__version__,
                     "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
                     "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])])}
    with tempfile.TemporaryDirectory() as scratch:
        work = (args.work or Path(scratch)).resolve()
        work.mkdir(parents=True, exist_ok=True)
        if not args.dry_run:  # both compile every kernel: minutes on pocl, seconds on a GPU
            _section("install", results, check_install)
            _section("tests", results, check_tests)
        _section("bridge", results, lambda: check_bridge(platform, sizes))
        _section("md", results, lambda: check_md(platform, sizes))
        data_holder: dict = {}
        _section("data", results, lambda: {"path": str(data_holder.setdefault("path", make_data(work, platform, sizes)))})
        if "path" in data_holder:
            data = data_holder["path"]
            # a dry run trains with CPU energies: each training process would compile 64-copy
            # kernels again, a minute on pocl (the bridge section checks that path)
            energies = "CPU" if args.dry_run else platform
            _section("training", results, lambda: check_training(data, work, energies, args.device, sizes))
            _section("paper_run", results, lambda: check_paper_run(data, work, energies, args.device, sizes))
    args.out.write_text(json.dumps(results, indent=1, default=str))
    print_table(results)
    print(f"\nwrote {args.out}")
    return results


if __name__ == "__main__":
    main()

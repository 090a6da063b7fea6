"""A/B of the quick preset's training steps: a baseline revision's training code against the
working tree's, in one process.

The baseline's ``trademd`` package is taken from git (``git archive``, default ``main``) and
imported as ``trademd_baseline`` beside the working tree's (``systems`` and ``cli`` stay the
working tree's). Both train the same target with the quick preset over 240-660 K from the
same weights (perturbed away from the identity), as ``Trainer.train`` runs a step (loss,
backward, gradient clipping, Adam, weight average), in three phases:

- ``nll``: a main-phase step in the TRADE warm-up: the NLL of 256 frames at T0;
- ``trade``: a main-phase step with the TRADE weight on: that NLL plus the TRADE loss at 128
  flow samples and 128 frames (E_T[u] cached, as between refreshes);
- ``refine``: a refinement step: the weighted NLL of 256 buffer samples plus the NLL of 256 frames.

The target is alanine dipeptide's shape (19 torsions, 29 bounded features, data at 600 K) with
a cheap analytic energy, so the flow's work is what is timed; ``--data FILE.h5`` trains on a
``trade-md simulate`` file with OpenMM energies instead (then the TRADE step includes them;
``--pretrain 300`` first fits the flow to the data, so its samples are molecules).

Printed: on the same batches in float64 and in float32, the largest differences of the losses
and gradients; steps/s of each phase, baseline and current interleaved (``--repeats`` rounds of
``--seconds`` each, so machine load hits both alike), medians; with ``--profile``, the
torch.profiler table of each phase (and of one metrics row, ``Trainer.measure``) of both.

    python benchmarks/flow_step_ab.py [--baseline main] [--seconds 3] [--repeats 5] [--profile]
"""

import argparse
import copy
import importlib
import io
import math
from pathlib import Path
import re
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time

import torch
from torch.profiler import ProfilerActivity, profile

import trademd
from trademd.training.config import TrainConfig
from trademd.training.trainer import Trainer

REPOSITORY = Path(__file__).resolve().parents[1]
T_RANGE, T0 = (240.0, 660.0), 600.0
#: the trainer's step of each phase: in the warm-up, with the TRADE weight on (not a cache
#: refresh), the first refinement round, of a schedule both revisions are given (the quick
#: preset of the baseline 9eb5f51: 1500 main steps, rounds of 150; today's preset trains
#: 4000 and 400, which would put step 1501 in the main phase)
PHASE_STEPS = {"nll": 1, "trade": 1001, "refine": 1501}
PHASE_SETTINGS = {"steps": 1500, "refinement": {"refine_steps": 150}}


def load_baseline(revision: str):
    """The ``trademd`` package of ``revision``, imported as ``trademd_baseline``."""
    archive = subprocess.run(["git", "archive", revision, "trademd"], cwd=REPOSITORY,
                             capture_output=True, check=True).stdout
    root = Path(tempfile.mkdtemp())
    tarfile.open(fileobj=io.BytesIO(archive)).extractall(root, filter="data")
    package = root / "trademd_baseline"
    (root / "trademd").rename(package)
    # modules of the revision's package are the baseline's; others (systems, cli) the tree's
    own = "|".join(sorted({p.relative_to(package).parts[0].removesuffix(".py")
                           for p in package.iterdir()}, key=len, reverse=True))
    pattern = re.compile(rf"\btrademd\.({own})\b")
    for path in package.rglob("*.py"):
        text = pattern.sub(r"trademd_baseline.\1", path.read_text())
        text = re.sub(r"^from trademd import", "from trademd_baseline import", text, flags=re.M)
        path.write_text(text)
    sys.path.insert(0, str(root))
    importlib.import_module("trademd_baseline.training.trainer")
    return sys.modules["trademd_baseline"]


class SyntheticTarget:
    """Alanine dipeptide's training target in shape: 19 torsions (1-3 modes each) and 29
    bounded features (spread 0.2 in [-1, 1]) at T0 = 600 K, and an analytic energy (kJ/mol:
    torsion wells and harmonic bounded features) for the reduced energies."""

    n_torsions, n_bounded = 19, 29
    bounded_interval = (-1.0, 1.0)
    boltzmann_k = 0.0083144626
    reference_temperature = T0
    split = None
    name = "synthetic-ala2"

    def __init__(self, frames: int = 20000, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.modes = torch.randint(1, 4, (self.n_torsions,), generator=g)
        self.phases = (2 * torch.rand(self.n_torsions, generator=g) - 1) * math.pi
        self.depths = 2.0 + 18.0 * torch.rand(self.n_torsions, generator=g)  # kJ/mol
        self.stiffness = 200.0 + 800.0 * torch.rand(self.n_bounded, generator=g)  # kJ/mol
        self.data_features = self._draw(frames, g)
        self.validation_features = self._draw(frames // 8, g)
        self.energy_evaluations = 0

    def _draw(self, n: int, g: torch.Generator) -> torch.Tensor:
        mode = (torch.rand(n, self.n_torsions, generator=g) * self.modes).floor()
        centre = self.phases + 2 * math.pi * mode / self.modes
        noise = torch.randn(n, self.n_torsions, generator=g) * 0.5 / self.modes
        torsions = torch.remainder(centre + noise + math.pi, 2 * math.pi) - math.pi
        bounded = (0.2 * torch.randn(n, self.n_bounded, generator=g)).clamp(-0.99, 0.99)
        return torch.cat([torsions, bounded], dim=1).to(torch.get_default_dtype())

    def reduced_energy(self, z, temperature, chirality_restraint_kt: float = 0.0):
        torsions, bounded = z[:, :self.n_torsions], z[:, self.n_torsions:]
        energy = (self.depths.to(z) * (1 - torch.cos(self.modes.to(z) * (torsions - self.phases.to(z))))).sum(1)
        energy = energy + 0.5 * (self.stiffness.to(z) * (0.2 * bounded) ** 2).sum(1)
        self.energy_evaluations += len(z)
        return energy / (self.boltzmann_k * temperature), torch.zeros_like(energy)

    def record(self) -> dict:
        return {"kind": "synthetic"}

    def close(self) -> None:
        pass


def make_trainers(baseline, target, run_dir: Path, pretrain: int = 0) -> dict:
    """{"baseline": ..., "current": ...}: trainers of both revisions on ``target`` with the quick
    preset and the same weights: perturbed away from the identity, then ``pretrain`` steps of
    the NLL at T0 (learning rate 1e-3, the current code), so flow samples look like data."""
    settings = {"t_min": T_RANGE[0], "t_max": T_RANGE[1], **PHASE_SETTINGS}
    trainers = {
        "baseline": baseline.training.trainer.Trainer(
            target, baseline.training.config.TrainConfig.from_settings(settings), run_dir / "baseline",
            validation_features=target.validation_features),
        "current": Trainer(target, TrainConfig.from_settings(settings), run_dir / "current",
                           validation_features=target.validation_features),
    }
    with torch.no_grad():
        for p in trainers["baseline"].flow.parameters():
            p.add_(0.02 * torch.randn_like(p))
    for trainer in trainers.values():
        trainer.reporters = []
    current = trainers["current"]
    current.flow.load_state_dict(trainers["baseline"].flow.state_dict())
    if pretrain:
        current.step = PHASE_STEPS["nll"]
        optimizer = current.optimizer
        current.optimizer = torch.optim.Adam(current.flow.parameters(), lr=1e-3)
        for _ in range(pretrain):
            train_step(current)
        current.optimizer = optimizer
        trainers["baseline"].flow.load_state_dict(current.flow.state_dict())
    for trainer in trainers.values():
        trainer.ema.module.load_state_dict(trainer.flow.state_dict())
    return trainers


def prepare(trainers: dict, phase: str) -> None:
    """Bring both trainers to ``phase`` with the same E_T[u] cache or refinement buffer."""
    a, b = trainers["baseline"], trainers["current"]
    for trainer in (a, b):
        trainer.step = PHASE_STEPS[phase]
    if phase == "trade":
        torch.manual_seed(1)
        a.objective.trade.refresh(a)
        b.objective.trade.cache.load_state_dict(a.objective.trade.cache.state_dict())
    if phase == "refine":
        for trainer in (a, b):
            torch.manual_seed(2)
            trainer.refinement.start_round(trainer, 0)
        b.refinement.buffer = type(b.refinement.buffer).from_state_dict(a.refinement.buffer.state_dict())


def train_step(trainer) -> float:
    """One step as ``Trainer.train`` runs it (no scheduler, reporters or step count)."""
    trainer.optimizer.zero_grad(set_to_none=True)
    loss, _ = trainer.loss()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(trainer.flow.parameters(), trainer.config.optimiser.clip_norm)
    trainer.optimizer.step()
    trainer.ema.update_parameters(trainer.flow)
    return float(loss.detach())


def differences(trainers: dict, phase: str) -> tuple[float, float]:
    """(|loss difference|, largest |gradient difference| / largest |gradient|) of one step of
    ``phase`` from the same weights and random state."""
    results = []
    for trainer in trainers.values():
        trainer.flow.load_state_dict(trainers["baseline"].flow.state_dict())
        trainer.batches.generator.manual_seed(3)
        torch.manual_seed(3)
        trainer.optimizer.zero_grad(set_to_none=True)
        loss, _ = trainer.loss()
        loss.backward()
        results.append((float(loss.detach()), [p.grad.clone() for p in trainer.flow.parameters()]))
    (loss_a, grads_a), (loss_b, grads_b) = results
    scale = max(float(g.abs().max()) for g in grads_a)
    return abs(loss_a - loss_b), max(float((a - b).abs().max()) for a, b in zip(grads_a, grads_b)) / scale


def profile_table(trainer, phase: str, steps: int, rows: int) -> str:
    """Markdown table of the ops of ``steps`` steps of ``phase`` (or one metrics row)."""
    work = trainer.measure if phase == "metrics" else (lambda: train_step(trainer))
    steps = 1 if phase == "metrics" else steps
    work()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        for _ in range(steps):
            work()
        wall = (time.perf_counter() - start) / steps
    events = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
    total = sum(e.self_cpu_time_total for e in events) / steps / 1000
    lines = [f"wall {1000 * wall:.1f} ms per {'row' if phase == 'metrics' else 'step'} under the profiler, "
             f"self CPU {total:.1f} ms", "", "| op | self ms | share | calls |", "| --- | --- | --- | --- |"]
    for e in events[:rows]:
        ms = e.self_cpu_time_total / steps / 1000
        lines.append(f"| `{e.key}` | {ms:.2f} | {100 * ms / total:.0f} % | {e.count // steps} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", default="main", help="git revision of the baseline")
    parser.add_argument("--phases", nargs="+", default=list(PHASE_STEPS), choices=list(PHASE_STEPS))
    parser.add_argument("--seconds", type=float, default=3.0, help="time per measurement")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--data", help="a trade-md simulate file: train on it (OpenMM energies)")
    parser.add_argument("--pretrain", type=int, default=0,
                        help="NLL steps before timing (e.g. 300 with --data: realistic flow samples)")
    parser.add_argument("--profile", action="store_true", help="print a profile of each phase")
    parser.add_argument("--profile-steps", type=int, default=10)
    parser.add_argument("--rows", type=int, default=15)
    parser.add_argument("--compile-splines", action="store_true",
                        help="the working tree's splines through torch.compile")
    args = parser.parse_args()
    if args.compile_splines:
        from trademd.flow.spline import compile_splines

        compile_splines()
    torch.set_num_threads(1)  # as trade-md train on a CPU
    baseline = load_baseline(args.baseline)
    run_dir = Path(tempfile.mkdtemp())
    print(f"baseline {args.baseline} ({baseline.__file__}) against the working tree "
          f"({trademd.__file__}); torch {torch.__version__}, 1 thread")

    def target_for_dtype():
        if args.data:
            from trademd.training.targets import MoleculeTarget
            target = MoleculeTarget.from_trajectory(args.data, platform="CPU")
            dtype = torch.get_default_dtype()
            target.data_features = target.data_features.to(dtype)
            target.validation_features = target.validation_features.to(dtype)
            return target
        return SyntheticTarget()

    for dtype in (torch.float64, torch.float32):
        torch.set_default_dtype(dtype)
        torch.manual_seed(0)
        trainers = make_trainers(baseline, target_for_dtype(), run_dir / str(dtype), args.pretrain)
        for phase in args.phases:
            prepare(trainers, phase)
            loss, gradient = differences(trainers, phase)
            print(f"{str(dtype):14s} {phase:7s} |loss difference| {loss:.2e}, "
                  f"largest gradient difference / largest gradient {gradient:.2e}")
    torch.set_default_dtype(torch.float32)

    rates = {(phase, name): [] for phase in args.phases for name in trainers}
    cpu_ms = {(phase, name): [] for phase in args.phases for name in trainers}
    for phase in args.phases:
        prepare(trainers, phase)
        initial = {name: copy.deepcopy(t.flow.state_dict()) for name, t in trainers.items()}
        for _ in range(args.repeats):
            for name, trainer in trainers.items():
                trainer.flow.load_state_dict(initial[name])
                train_step(trainer)  # warm-up
                start, cpu_start, n = time.perf_counter(), time.process_time(), 0
                while time.perf_counter() - start < args.seconds:
                    train_step(trainer)
                    n += 1
                rates[phase, name].append(n / (time.perf_counter() - start))
                cpu_ms[phase, name].append(1000 * (time.process_time() - cpu_start) / n)
    print(f"\nsteps/s, median of {args.repeats} interleaved rounds of {args.seconds:g} s "
          f"(ms per step in brackets); CPU time of this process per step (what other jobs on "
          f"the cores do not change; OpenMM's energy workers are other processes):\n")
    print("| phase | baseline | current | speed-up | CPU ms per step: baseline | current | speed-up |\n"
          "| --- | --- | --- | --- | --- | --- | --- |")
    for phase in args.phases:
        a, b = (statistics.median(rates[phase, name]) for name in ("baseline", "current"))
        cpu_a, cpu_b = (statistics.median(cpu_ms[phase, name]) for name in ("baseline", "current"))
        print(f"| {phase} | {a:.2f} ({1000 / a:.1f} ms) | {b:.2f} ({1000 / b:.1f} ms) | {b / a:.2f}x "
              f"| {cpu_a:.1f} | {cpu_b:.1f} | {cpu_a / cpu_b:.2f}x |")
    if args.profile:
        for phase in [*args.phases, "metrics"]:
            if phase != "metrics":
                prepare(trainers, phase)
            for name, trainer in trainers.items():
                print(f"\n#### {phase}, {name}\n\n{profile_table(trainer, phase, args.profile_steps, args.rows)}")
    for trainer in trainers.values():
        trainer.target.close()


if __name__ == "__main__":
    main()

"""Training and sampling throughput on 1 and on N torchrun ranks (CPU: gloo; GPU: NCCL).

Makes a short ala2-implicit data set at 600 K, then for each rank count:
- ``torchrun --nproc_per_node R -m trademd train`` (quick preset, TRADE, ``--steps`` steps,
  batch per rank 256): training steps/s (metrics.csv, EMA scoring included) and data
  frames/s (steps/s x batch x R);
- ``torchrun --nproc_per_node R -m trademd sample`` of ``--samples`` samples at 300 K: samples
  (= OpenMM energies) per second, wall clock of the whole command (start-up included).
Ratios are against 1 rank, measured in the same run.

    python benchmarks/distributed_scaling.py --ranks 1 2 [--steps 120] [--samples 40000]
        [--device cpu] [--platform CPU] [--out runs/scaling]
"""

import argparse
import csv
import json
from pathlib import Path
import subprocess
import sys
import time


def torchrun(ranks: int, *arguments: str, cwd: Path) -> float:
    """Run ``python -m trademd ARGUMENTS`` on ``ranks`` processes; wall seconds."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc_per_node={ranks}", "-m", "trademd", *arguments]
    start = time.perf_counter()
    result = subprocess.run(command, cwd=cwd, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(result.stderr[-3000:])
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--samples", type=int, default=40000)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--platform", default="CPU")
    parser.add_argument("--out", type=Path, default=Path("runs/scaling"))
    args = parser.parse_args()
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    data = out / "data_600K.h5"
    if not data.exists():
        torchrun(1, "simulate", "--system", "ala2-implicit", "--temperature", "600", "--time", "50ps",
                 "--replicas", "8", "--save-every", "0.1ps", "--equilibration", "5ps",
                 "--platform", args.platform, "--quiet", "--out", str(data), cwd=out)
    settings = {"metrics_every": args.steps // 2, "checkpoint_every": args.steps, "refine_rounds": 0}
    (out / "bench.json").write_text(json.dumps(settings))
    results = {}
    for ranks in args.ranks:
        run = out / f"train_{ranks}"
        if run.exists():
            for path in sorted(run.iterdir()):
                path.unlink()
        torchrun(ranks, "train", "--data", str(data), "--tmin", "240", "--tmax", "660", "--steps",
                 str(args.steps), "--config", "bench.json", "--device", args.device,
                 "--platform", args.platform, "--quiet", "--out", str(run), cwd=out)
        with (run / "metrics.csv").open() as handle:
            steps_per_s = float(list(csv.DictReader(handle))[-1]["steps_per_s"])
        wall = torchrun(ranks, "sample", "--model", str(run / "model.pt"), "--temperature", "300",
                        "--samples", str(args.samples), "--device", args.device, "--platform", args.platform,
                        "--quiet", "--overwrite", "--out", str(out / f"samples_{ranks}.h5"), cwd=out)
        results[ranks] = {"steps_per_s": steps_per_s, "frames_per_s": steps_per_s * 256 * ranks,
                          "samples_per_s": args.samples / wall, "sample_wall_s": wall}
    base = results[args.ranks[0]]
    print(f"{'ranks':>5} {'steps/s':>8} {'frames/s':>9} {'x':>5} {'samples/s':>10} {'x':>5}")
    for ranks, r in results.items():
        print(f"{ranks:5d} {r['steps_per_s']:8.2f} {r['frames_per_s']:9.0f} "
              f"{r['frames_per_s'] / base['frames_per_s']:5.2f} {r['samples_per_s']:10.0f} "
              f"{r['samples_per_s'] / base['samples_per_s']:5.2f}")
    (out / "scaling.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()

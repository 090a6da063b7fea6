"""Throughput of the temperature-conditional flow at the alanine-dipeptide size.

Training step = log p and d log p / dlogT in one forward-mode pass (as TRADE trains:
``TemperatureFlow.log_prob_dlogt``) + backward + Adam step, on random features at random
temperatures over the training range; sampling = ``flow.sample``. The A/B of the training steps
against another revision is ``benchmarks/flow_step_ab.py``.

    python benchmarks/flow_throughput.py --device auto --widths 256 128
"""

import argparse
import math
import time

import torch

from trademd.flow.conditional import TemperatureFlow

T_RANGE = (240.0, 660.0)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, seconds, min_iters=3):
    """Run ``fn`` once to warm up, then repeatedly for about ``seconds``; calls per second."""
    fn()
    sync(device)
    start, iters = time.perf_counter(), 0
    while iters < min_iters or time.perf_counter() - start < seconds:
        fn()
        iters += 1
    sync(device)
    return iters / (time.perf_counter() - start)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda")
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--widths", type=int, nargs="+", default=[256, 128])
    parser.add_argument("--torsions", type=int, default=19)
    parser.add_argument("--bounded", type=int, default=29)
    parser.add_argument("--seconds", type=float, default=10.0, help="time per measurement")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    args = parser.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available()
                          else ("cpu" if args.device == "auto" else args.device))
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else (
        f"cpu, {torch.get_num_threads()} threads")
    print(f"device {name}; torch {torch.__version__}; batch {args.batch}; "
          f"n_torsions {args.torsions}, n_bounded {args.bounded}")

    torch.manual_seed(0)
    n = b = args.batch
    for width in args.widths:
        flow = TemperatureFlow(args.torsions, args.bounded, T_RANGE, bounded_interval=(-1.0, 1.0),
                               width=width, bounded_base="scaled_truncated_normal",
                               reference_temperature_k=600.0).to(device)
        with torch.no_grad():  # away from the identity, so the splines do real work
            for p in flow.parameters():
                p.add_(0.02 * torch.randn_like(p))
        n_params = sum(p.numel() for p in flow.parameters())
        optimizer = torch.optim.Adam(flow.parameters(), lr=1e-4, fused=True)
        z, _ = flow.sample(b, 600.0)

        def train_step():
            temperatures = torch.exp(torch.empty(b, device=device).uniform_(
                math.log(T_RANGE[0]), math.log(T_RANGE[1])))
            logp, dlogp = flow.log_prob_dlogt(z, temperatures)
            loss = -logp.mean() + dlogp.pow(2).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

        def sample():
            flow.sample(n, 450.0)

        steps = timed(train_step, device, args.seconds)
        samples = timed(sample, device, args.seconds) * n
        print(f"width {width:4d} ({len(flow.layers)} layers, {n_params / 1e6:.2f} M params): "
              f"{steps:8.2f} train steps/s ({steps * b:9.0f} samples/s), "
              f"{samples:10.0f} samples/s drawn")


if __name__ == "__main__":
    main()

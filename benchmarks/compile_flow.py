"""The NLL step of the quick preset's flow with its whole ``log_prob`` through ``torch.compile``
(one graph over all coupling layers, shapes dynamic) against eager evaluation, in one process.

Alanine dipeptide's shape (19 torsions, 29 bounded features), width 64, depth 2, batch 256,
one torch thread; a step is loss, backward, gradient clipping and fused Adam. Printed: the
time of compiling (the first step), the step time of each variant (``--rounds`` interleaved
rounds of ``--seconds``, medians and their ratio) and the largest difference of log p.

    python benchmarks/compile_flow.py [--seconds 3] [--rounds 3]
"""

import argparse
import statistics
import time

import torch

from trademd.flow.conditional import TemperatureFlow


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    flow = TemperatureFlow(19, 29, (240.0, 660.0), width=64, depth=2, bounded_interval=(0.0, 4.0))
    with torch.no_grad():
        for parameter in flow.parameters():
            parameter.add_(0.02 * torch.randn_like(parameter))
    features = torch.cat([torch.rand(256, 19) * 6.28 - 3.14, torch.rand(256, 29) * 3.0 + 0.5], 1)
    optimizer = torch.optim.Adam(flow.parameters(), lr=1e-4, fused=True)

    def step(log_prob) -> None:
        optimizer.zero_grad(set_to_none=True)
        (-log_prob(features, 600.0).mean()).backward()
        torch.nn.utils.clip_grad_norm_(flow.parameters(), 3.0)
        optimizer.step()

    variants = {"eager": flow.log_prob, "compiled": torch.compile(flow.log_prob, dynamic=True)}
    start = time.perf_counter()
    step(variants["compiled"])
    print(f"compiling (first step): {time.perf_counter() - start:.1f} s", flush=True)
    times = {name: [] for name in variants}
    for _ in range(args.rounds):
        for name, log_prob in variants.items():
            for _ in range(3):
                step(log_prob)
            start, n = time.perf_counter(), 0
            while time.perf_counter() - start < args.seconds:
                step(log_prob)
                n += 1
            times[name].append(1e3 * (time.perf_counter() - start) / n)
    for name, values in times.items():
        print(f"{name}: {statistics.median(values):.1f} ms per NLL step (rounds {', '.join(f'{v:.1f}' for v in values)})")
    print(f"speed-up: {statistics.median(times['eager']) / statistics.median(times['compiled']):.2f}x")
    with torch.no_grad():
        difference = (variants["eager"](features, 600.0) - variants["compiled"](features, 600.0)).abs().max()
    print(f"largest |log p difference| (float32): {float(difference):.2e}")


if __name__ == "__main__":
    main()

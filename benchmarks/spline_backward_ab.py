"""The splines' hand-written backwards against autograd of the same arithmetic, alone.

For the 12 coupling layers of the quick preset on alanine dipeptide (transformed features per
layer 10, 9, 29, 19, 15, 14, twice; 8 bins; batch 256, float32, one thread): the forward spline
(``call_and_ladj``, as the NLL evaluates it) and its forward-mode derivative
(``call_and_ladj_jvp``, as TRADE does), each evaluated and backpropagated through all 12 layers,
recorded autograd (``RationalQuadraticSpline``) against ``trademd.flow.spline_fused`` and
``spline_fused_jvp``; rounds interleaved, medians of the CPU time of this process.

    python benchmarks/spline_backward_ab.py [--seconds 2] [--rounds 5]
"""

import argparse
import statistics
import time

import torch

from trademd.flow.spline import RationalQuadraticSpline
from trademd.flow.spline_fused import fused_call
from trademd.flow.spline_fused_jvp import fused_call_jvp

FEATURES = [10, 9, 29, 19, 15, 14] * 2
BINS, BATCH, MIN_SLOPE = 8, 256, 1e-3


def layer_inputs(seed: int = 0) -> list[list[torch.Tensor]]:
    """Per layer: bin logits, slope logits, their tangents, x, its tangent (logits and
    tangents require gradients, as the conditioner's outputs do)."""
    generator = torch.Generator().manual_seed(seed)
    layers = []
    for n in FEATURES:
        shapes = [(BATCH, BINS, 2, n), (BATCH, BINS + 1, n)] * 2
        tensors = [0.3 * torch.randn(shape, generator=generator) for shape in shapes]
        tensors = [t.requires_grad_(True) for t in tensors]
        tensors += [2 * torch.rand(BATCH, n, generator=generator) - 1, torch.randn(BATCH, n, generator=generator)]
        layers.append(tensors)
    return layers


def recorded(bins, slopes, bins_dot, slopes_dot, x, x_dot):
    return RationalQuadraticSpline(bins, slopes, MIN_SLOPE).call_and_ladj(x)


def recorded_jvp(bins, slopes, bins_dot, slopes_dot, x, x_dot):
    spline = RationalQuadraticSpline(bins, slopes, MIN_SLOPE, tangents=(bins_dot, slopes_dot))
    return spline.call_and_ladj_jvp(x, x_dot)


def fused(bins, slopes, bins_dot, slopes_dot, x, x_dot):
    return fused_call(bins, slopes, x, MIN_SLOPE)


def fused_jvp(bins, slopes, bins_dot, slopes_dot, x, x_dot):
    return fused_call_jvp(bins, slopes, bins_dot, slopes_dot, x, x_dot, MIN_SLOPE)


def forward_backward(function, layers) -> None:
    total = 0.0
    for inputs in layers:
        total = total + sum(out.sum() for out in function(*inputs))
    total.backward()


def cpu_ms(function, layers, seconds: float) -> float:
    """CPU milliseconds of this process per forward and backward through all layers."""
    forward_backward(function, layers)
    start, n = time.process_time(), 0
    while time.process_time() - start < seconds:
        forward_backward(function, layers)
        n += 1
    return 1000 * (time.process_time() - start) / n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    layers = layer_inputs()
    pairs = {"call_and_ladj (NLL)": (recorded, fused), "call_and_ladj_jvp (TRADE)": (recorded_jvp, fused_jvp)}
    print(f"torch {torch.__version__}, 1 thread; CPU ms per forward and backward of 12 layers, "
          f"median of {args.rounds} interleaved rounds of {args.seconds:g} s\n")
    print("| spline | autograd | hand-written backward | speed-up |\n| --- | --- | --- | --- |")
    for name, (baseline, current) in pairs.items():
        times = {"baseline": [], "current": []}
        for _ in range(args.rounds):
            times["baseline"].append(cpu_ms(baseline, layers, args.seconds))
            times["current"].append(cpu_ms(current, layers, args.seconds))
        a, b = statistics.median(times["baseline"]), statistics.median(times["current"])
        print(f"| {name} | {a:.2f} | {b:.2f} | {a / b:.2f}x |")


if __name__ == "__main__":
    main()

"""A/B of one TRADE-like training step of the flow against the flow code of another revision.

Loads the flow module of ``--baseline`` (a git revision; ``trademd/flow/conditional.py``, or
``trademd/flows.py`` before the package was grouped by stage; what it imports comes from the
working tree) beside the working tree's, gives
both the same weights, checks that log p and every gradient agree, then times them
interleaved in one process (so machine load hits both alike): a step is log p and
d log p / dT (create_graph) at batch 256 over 240-660 K, a loss of both, backward.

    python benchmarks/flow_step_ab.py --baseline HEAD~1
"""

import argparse
import importlib.util
import math
from pathlib import Path
import re
import statistics
import subprocess
import tempfile
import time

import torch

import trademd.flow.conditional as current

#: Where the modules a flat-layout flows.py imported live now.
FLAT_MODULES = {"base": "flow.base", "errors": "errors"}


def load_revision(revision: str):
    for name in ("trademd/flow/conditional.py", "trademd/flows.py"):
        shown = subprocess.run(["git", "show", f"{revision}:{name}"], capture_output=True, text=True,
                               cwd=Path(__file__).resolve().parents[1])
        if shown.returncode == 0:
            break
    else:
        raise SystemExit(f"revision {revision} has no flow module")
    source = re.sub(r"^from \.(base|errors) import", lambda m: "from trademd." + FLAT_MODULES[m.group(1)] + " import",
                    shown.stdout, flags=re.M)
    path = Path(tempfile.mkdtemp()) / "flows_baseline.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("trademd.flows_baseline", path)
    module = importlib.util.module_from_spec(spec)
    module.__package__ = "trademd"
    spec.loader.exec_module(module)
    return module


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", default="HEAD~1")
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    layers = ["torsions|torsions", "bounded|torsions", "bounded|bounded"] * 2
    flows = {"baseline": load_revision(args.baseline).TemperatureFlow(19, 29, (240.0, 660.0), width=args.width, layers=layers),
             "current": current.TemperatureFlow(19, 29, (240.0, 660.0), width=args.width, layers=layers)}
    with torch.no_grad():
        for p in flows["current"].parameters():
            p.normal_(0.0, 0.05)
    flows["baseline"].load_state_dict(flows["current"].state_dict())
    z, _ = flows["current"].sample(256, 600.0)
    t = torch.exp(torch.empty(256).uniform_(math.log(240.0), math.log(660.0)))

    def step(flow):
        flow.zero_grad()
        temperatures = t.clone().requires_grad_(True)
        log_p = flow.log_prob(z, temperatures)
        (derivative,) = torch.autograd.grad(log_p.sum(), temperatures, create_graph=True)
        (-log_p.mean() + derivative.pow(2).mean()).backward()
        return log_p.detach(), [p.grad.clone() for p in flow.parameters()]

    (log_a, grads_a), (log_b, grads_b) = step(flows["baseline"]), step(flows["current"])
    print(f"log p identical: {torch.equal(log_a, log_b)}; largest gradient difference: "
          f"{max(float((a - b).abs().max()) for a, b in zip(grads_a, grads_b)):.3g}")
    rates = {name: [] for name in flows}
    for _ in range(args.repeats):
        for name, flow in flows.items():
            start, n = time.perf_counter(), 0
            while time.perf_counter() - start < args.seconds:
                step(flow)
                n += 1
            rates[name].append(n / (time.perf_counter() - start))
    base, new = statistics.median(rates["baseline"]), statistics.median(rates["current"])
    print(f"steps/s (median of {args.repeats}): baseline {base:.2f}, current {new:.2f}, ratio {new / base:.3f}")


if __name__ == "__main__":
    main()

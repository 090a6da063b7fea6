"""How far a replica-exchange reference's own Ramachandran histogram is from the truth: the
noise floor of the total variation (TV) that `trade-md evaluate` reports against it.

The ladders of a `trade-md simulate --temperatures ... --replicas L` file are independent
simulations. Split them into two halves, pool each half over every rung by MBAR at the
temperature asked, and measure the TV between the halves' phi/psi histograms (the bins
`evaluate` uses). Two independent estimates each off the truth by e have TV about sqrt(2) e
between them, and the whole file (twice the frames) is off by about e / sqrt(2), so the whole
reference's own TV to the truth is about TV(half, half) / 2: a model's TV against this
reference cannot be read below that. The positive-phi free energy of each half is printed too.

    python benchmarks/reference_noise.py runs/omt/ref_remd4.h5 --temperature 300
"""

import argparse
import json

import numpy as np

from trademd.analysis.mbar import mbar_weights
from trademd.analysis.observables import basin_free_energy, phi_psi, phi_psi_histogram
from trademd.evaluate import METRIC_BINS, total_variation
from trademd.io.references import read_reference
from trademd.systems import system_from_attrs


def half_histograms(path: str, temperature_k: float) -> dict:
    reference = read_reference(path)
    first = reference.ensembles[0]
    molecule = system_from_attrs(first.attrs, first.topology_pdb)
    phi, psi, energy, rung, ladder = [], [], [], [], []
    for index, ensemble in enumerate(reference.ensembles):
        angles = phi_psi(molecule, ensemble.positions_nm)
        phi.append(angles[0])
        psi.append(angles[1])
        energy.append(ensemble.energy_kj_mol)
        rung.append(np.full(ensemble.n_frames, index))
        ladder.append(ensemble.replica)
    phi, psi, energy, rung, ladder = (np.concatenate(v) for v in (phi, psi, energy, rung, ladder))
    ladders = np.unique(ladder)
    if len(ladders) < 2:
        raise SystemExit(f"{path} has one ladder: the noise needs two or more (--replicas)")
    halves = {"A": np.isin(ladder, ladders[: len(ladders) // 2]), "B": np.isin(ladder, ladders[len(ladders) // 2:])}
    result = {"reference": path, "temperature_k": temperature_k, "ladders": int(len(ladders)),
              "frames": int(len(phi)), "bins": METRIC_BINS}
    histograms = {}
    for name, mask in {**halves, "all": np.ones(len(phi), dtype=bool)}.items():
        weights, _ = mbar_weights(energy[mask], rung[mask], reference.temperatures_k, temperature_k)
        histograms[name], _ = phi_psi_histogram(phi[mask], psi[mask], weights, bins=METRIC_BINS)
        result[f"delta_f_positive_phi_kt_{name}"] = float(basin_free_energy(phi[mask], weights)[0])
        result[f"mbar_effective_frames_{name}"] = float(weights.sum() ** 2 / (weights ** 2).sum())
    result["tv_half_vs_half"] = total_variation(histograms["A"], histograms["B"])
    result["tv_all_vs_truth_estimate"] = result["tv_half_vs_half"] / 2
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("reference")
    parser.add_argument("--temperature", type=float, required=True)
    args = parser.parse_args()
    print(json.dumps(half_histograms(args.reference, args.temperature), indent=2))


if __name__ == "__main__":
    main()

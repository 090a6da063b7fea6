"""``trade-md sample`` as a library call: draw samples of a trained model at any temperature,
weigh them with OpenMM energies, histogram, plot and write them.

For samples z ~ p_theta(z|T) mapped to configurations x(z), the model's density of x (modulo
rigid motions, see :mod:`trademd.flow.coordinates`) is log p(x|T) = log p_theta(z|T) - log|dx/dz|,
and the importance weights for the Boltzmann distribution at T are

    log w = -U(x) / (k_B T) - log p(x|T),

self-normalised. Samples with the wrong chirality at a chiral centre, a peptide bond turned
cis/trans against the PDB (:mod:`trademd.analysis.isomers`) or a non-finite energy are flagged
and get zero weight (reported as ``fraction_flagged``). The Kish effective sample
size (sum w)^2 / sum w^2 is reported pooled and per batch (:mod:`trademd.analysis.ess`).
"""

import math
from pathlib import Path

import numpy as np
import torch

from trademd import distributed
from trademd.analysis.chirality import wrong_chirality_mask
from trademd.analysis.isomers import flipped_peptide_bond_mask
from trademd.analysis.ess import weight_diagnostics
from trademd.analysis.observables import backbone_angles, basin_free_energy, phi_psi_histogram
from trademd.analysis.plots import ramachandran_grid_png, ramachandran_png
from trademd.errors import TradeMDError
from trademd.io.samples_file import TemperatureSamples, write_samples
from trademd.io.schema import group_name
from trademd.distributed import Ranks
from trademd.io.provenance import provenance
from trademd.platforms import torch_device
from trademd.progress import Progress
from trademd.seeds import stream_seed
from trademd.training.model_file import TrainedModel, load_model
from trademd.training.trade import log_importance_weights
from trademd.weights import self_normalised_weights

__all__ = ["ESS_BATCHES", "draw_samples", "sample_run", "summarise"]

#: Consecutive batches whose Kish ESS gives the spread of the pooled figure.
ESS_BATCHES = 5


def _check_batch_size(batch_size: int) -> None:
    if batch_size < 1:
        raise TradeMDError(f"--batch-size must be at least 1, got {batch_size}")


def draw_samples(model: TrainedModel, temperature_k: float, n: int, batch_size: int = 4096,
                 extrapolate: bool = False, show_progress: bool = True, seed: int = 0,
                 ranks: Ranks = Ranks()) -> TemperatureSamples:
    """Draw ``n`` weighted samples at ``temperature_k`` from a trained model.

    Batch b (of ``batch_size``) is drawn from its own seed (``seed``, T, b), so the samples do
    not depend on how many ranks draw them: under ``torchrun`` rank r draws the batches
    b = r, r + W, ..., every rank receives all of them in batch order, and the weights are
    normalised over all samples.

    Raises:
        TradeMDError: for T outside the trained range (unless ``extrapolate``), n < 1 or
            batch_size < 1.
    """
    t_min, t_max = model.temperature_range
    if not temperature_k > 0:
        raise TradeMDError(f"temperature must be positive (K), got {temperature_k}")
    if not (t_min <= temperature_k <= t_max) and not extrapolate:
        raise TradeMDError(
            f"{temperature_k:g} K lies outside the trained range [{t_min:g}, {t_max:g}] K: "
            "choose a temperature inside it, or pass --extrapolate to sample anyway"
        )
    if n < 1:
        raise TradeMDError(f"--n must be at least 1, got {n}")
    _check_batch_size(batch_size)
    target = model.target
    n_batches = math.ceil(n / batch_size)
    mine = range(ranks.rank, n_batches, ranks.world_size)
    progress = Progress(sum(min(batch_size, n - b * batch_size) for b in mine), "samples",
                        enabled=show_progress and ranks.is_main)
    drawn, done = {}, 0
    for b in mine:
        drawn[b] = _draw_batch(model, temperature_k, min(batch_size, n - b * batch_size),
                               stream_seed(seed, round(temperature_k * 1000), b))
        done += len(drawn[b]["energy"])
        progress.update(done)
    for other in distributed.gather_objects(drawn):
        drawn.update(other)
    batches = [drawn[b] for b in range(n_batches)]
    positions, log_prob, energy, wrong, flipped = (np.concatenate([batch[k] for batch in batches])
                                                   for k in ("x", "log_prob", "energy", "wrong", "flipped"))
    nonfinite = ~np.isfinite(energy)
    log_w = log_importance_weights(energy / (target.boltzmann_k * temperature_k), log_prob)
    log_w[wrong | flipped | nonfinite | ~np.isfinite(log_w)] = -np.inf
    weights = self_normalised_weights(log_w)
    phi_residues, psi_residues = backbone_angles(target.molecule, positions)
    first = (phi_residues[:, 0], psi_residues[:, 0]) if phi_residues.shape[1] else (np.zeros(0), np.zeros(0))
    several = phi_residues.shape[1] > 1
    return TemperatureSamples(float(temperature_k), positions, log_prob, energy, log_w, weights,
                              wrong, nonfinite, *first, flipped_peptide_bond=flipped,
                              **({"phi_residues": phi_residues, "psi_residues": psi_residues} if several else {}))


def _attribute_value(value):
    """A summary value as an HDF5 attribute: lists as float arrays, None in them as NaN."""
    if isinstance(value, list):
        return np.array([math.nan if v is None else v for v in value], dtype=np.float64)
    return value


def _residue_histograms(samples: TemperatureSamples) -> dict:
    """Every residue's phi/psi histograms, reweighted and not, [residues, bins, bins] (only
    for systems with several residues)."""
    if not samples.phi_residues.size:
        return {}
    pairs = list(zip(samples.phi_residues.T, samples.psi_residues.T))
    return {"phi_psi_weighted_residues": np.stack([phi_psi_histogram(phi, psi, samples.weights)[0]
                                                   for phi, psi in pairs]),
            "phi_psi_unweighted_residues": np.stack([phi_psi_histogram(phi, psi)[0] for phi, psi in pairs])}


def _draw_batch(model: TrainedModel, temperature_k: float, m: int, seed: int) -> dict:
    """One batch: positions float32 [m, atoms, 3] (nm), log p(x|T) and energies float64 [m]
    (kJ/mol), wrong-chirality and flipped-peptide-bond flags bool [m]; the global random
    state is left as it was."""
    target = model.target
    device = next(model.flow.parameters()).device
    with torch.no_grad(), torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        z, log_p_z = model.flow.sample(m, temperature_k)
        x, log_det = target.positions(z)
        x = x.float().double()  # the energies belong to the float32 positions stored
        energy, _ = target.bridge.evaluate(x)
    centres, omegas = target.molecule.chiral_centres, target.molecule.peptide_bonds
    reference = torch.as_tensor(target.molecule.positions_nm())
    wrong = (wrong_chirality_mask(x.cpu(), centres, reference).numpy()
             if len(centres) else np.zeros(m, dtype=bool))
    flipped = (flipped_peptide_bond_mask(x.cpu(), omegas, reference).numpy()
               if len(omegas) else np.zeros(m, dtype=bool))
    return {"x": x.float().cpu().numpy(), "log_prob": (log_p_z.double() - log_det).cpu().numpy(),
            "energy": energy.double().cpu().numpy(), "wrong": wrong, "flipped": flipped}


def summarise(samples: TemperatureSamples, path: Path) -> dict:
    """The one-line JSON summary of samples at one temperature: the Kish ESS pooled over all
    samples, that of each of ``ESS_BATCHES`` consecutive batches (its spread), the weight
    share of the 10 largest weights and the Pareto k of the weight tail
    (:mod:`trademd.analysis.ess`)."""
    finite = samples.weights > 0
    mean_energy = float(np.sum(samples.weights[finite] * samples.energy_kj_mol[finite]))
    diagnostics = weight_diagnostics(samples.log_weights, n_batches=ESS_BATCHES)
    summary = {
        "path": str(path),
        "temperature_k": samples.temperature_k,
        "n": samples.n,
        "ess": samples.ess,
        "relative_ess": samples.relative_ess,
        "relative_ess_batches": list(diagnostics.batch_relative_ess),
        "relative_ess_batch_min": diagnostics.batch_relative_ess_min,
        "relative_ess_batch_max": diagnostics.batch_relative_ess_max,
        "top10_weight_share": diagnostics.top10_weight_share,
        "pareto_k": diagnostics.pareto_k if math.isfinite(diagnostics.pareto_k) else None,
        "mean_energy_kj_mol": mean_energy,
        "fraction_flagged": samples.fraction_flagged,
    }
    if len(samples.phi):
        delta_f, error = basin_free_energy(samples.phi, samples.weights, samples.ess)
        summary["delta_f_positive_phi_kt"] = delta_f if math.isfinite(delta_f) else None
        summary["delta_f_positive_phi_kt_error"] = error if math.isfinite(error) else None
    if samples.phi_residues.size:
        per_residue = [basin_free_energy(phi, samples.weights, samples.ess)[0] for phi in samples.phi_residues.T]
        summary["delta_f_positive_phi_kt_residues"] = [f if math.isfinite(f) else None for f in per_residue]
    return summary


def sample_run(model_path: str | Path, temperatures: list[float], n: int, out: str | Path,
               overwrite: bool = False, extrapolate: bool = False, device: str = "auto",
               platform: str = "auto", batch_size: int = 4096, command: str | None = None,
               show_progress: bool = True, seed: int = 0) -> list[dict]:
    """Sample a trained model at each temperature into one HDF5 file (a group per T) and a
    Ramachandran PNG per temperature next to it; returns the summaries.

    Under ``torchrun`` the ranks share the batches (each evaluating its own energies, on CPU
    with its share of the cores) and rank 0 writes the files: the same samples, weights and
    ESS as one process with the same ``seed``; ranks other than 0 return no summaries."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise TradeMDError(f"{str(out)!r} exists: pass --overwrite to replace it")
    _check_batch_size(batch_size)  # before the model loads
    device = torch_device(device)
    ranks = distributed.start(device)
    model = load_model(model_path, device=device, platform=platform)
    groups, summaries = [], []
    try:
        for temperature_k in temperatures:
            samples = draw_samples(model, temperature_k, n, batch_size, extrapolate, show_progress,
                                   seed=seed, ranks=ranks)
            if not ranks.is_main:  # rank 0 summarises and writes
                continue
            summary = summarise(samples, out)
            summaries.append(summary)
            title = (f"{model.target.name} at {temperature_k:g} K, reweighted "
                     f"(ESS {100 * samples.relative_ess:.1f} %)")
            png = (ramachandran_grid_png(samples.phi_residues, samples.psi_residues, samples.weights, title)
                   if samples.phi_residues.size else
                   ramachandran_png(samples.phi, samples.psi, samples.weights, title))
            suffix = "" if len(temperatures) == 1 else f"_{group_name(temperature_k)}"
            png_path = out.with_name(f"{out.stem}{suffix}_ramachandran.png")
            png_path.parent.mkdir(parents=True, exist_ok=True)
            png_path.write_bytes(png)
            weighted, edges = phi_psi_histogram(samples.phi, samples.psi, samples.weights)
            unweighted, _ = phi_psi_histogram(samples.phi, samples.psi)
            samples.summary = {k: _attribute_value(v) for k, v in summary.items() if k != "path" and v is not None}
            samples.histograms = {"phi_psi_weighted": weighted, "phi_psi_unweighted": unweighted,
                                  "bin_edges_rad": edges, **_residue_histograms(samples)}
            samples.ramachandran_png = png
            groups.append(samples)
    finally:
        model.close()
    if not ranks.is_main:
        distributed.barrier()  # returns once rank 0 has written the file
        return []
    attrs = {
        "model": str(Path(model_path).resolve()),
        "system": model.target.name,
        "forcefield_files": list(model.target.molecule.forcefield_files),
        "temperatures_k": [float(t) for t in temperatures],
        "trained_range_k": list(model.temperature_range),
        "reference_temperature_k": model.reference_temperature,
        "seed": seed,
        **provenance(command),
    }
    write_samples(out, groups, attrs, model.target.molecule.pdb_text, overwrite=True)
    distributed.barrier()
    return summaries

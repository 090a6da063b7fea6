"""Sampling a trained model at any temperature: OpenMM energies, importance weights, ESS,
phi/psi and Ramachandran histograms.

For samples z ~ p_theta(z|T) mapped to configurations x(z), the model's density of x (modulo
rigid motions, see :mod:`trademd.flow.coordinates`) is log p(x|T) = log p_theta(z|T) - log|dx/dz|,
and the importance weights for the Boltzmann distribution at T are

    log w = -U(x) / (k_B T) - log p(x|T),

self-normalised. Samples with the wrong chirality at a chiral centre or a non-finite energy
are flagged and get zero weight (reported as ``fraction_flagged``). The Kish effective sample
size (sum w)^2 / sum w^2 is reported absolute and relative to n.
"""

from dataclasses import dataclass
import math
from pathlib import Path

import numpy as np
import torch

from trademd.flow.coordinates import wrong_chirality_mask
from trademd.errors import TradeMDError
from trademd.flow.conditional import TemperatureFlow, load_flow
from trademd.progress import Progress
from trademd.training.trade import kish_ess, log_importance_weights
from trademd.training.trainer import MODEL_FORMAT, MODEL_FORMAT_VERSION

__all__ = ["TrainedModel", "load_model", "TemperatureSamples", "draw_samples",
           "basin_free_energy", "phi_psi", "phi_psi_histogram", "PHI_PSI_BINS"]

#: Bins per axis of the phi/psi histograms (the TRADE paper's KL uses 30 x 30... here 60).
PHI_PSI_BINS = 60


@dataclass
class TrainedModel:
    """A flow and the target it was trained on, ready to sample.

    Attributes:
        flow: the temperature-conditional flow.
        target: a :class:`~trademd.training.targets.MoleculeTarget` (energies, coordinates).
        temperature_range: (T_min, T_max) in K it was trained on.
        reference_temperature: T0 of the training data (K).
        path: the model file.
    """

    flow: TemperatureFlow
    target: object
    temperature_range: tuple[float, float]
    reference_temperature: float
    path: Path

    def close(self) -> None:
        self.target.close()


def load_model(path: str | Path, device: torch.device | str = "cpu", platform: str = "auto") -> TrainedModel:
    """Load ``model.pt`` written by ``trade-md train``."""
    from trademd.training.targets import MoleculeTarget

    path = Path(path)
    if not path.is_file():
        raise TradeMDError(f"model file {str(path)!r} not found: give the model.pt of a `trade-md train` run")
    try:
        saved = torch.load(path, map_location="cpu", weights_only=False)
        record = saved["target"]
    except Exception:
        raise TradeMDError(f"{str(path)!r} is not a trade-md model file (model.pt from `trade-md train`)") from None
    # files written before the format was recorded are version 1 too
    if saved.get("format", MODEL_FORMAT) != MODEL_FORMAT:
        raise TradeMDError(f"{str(path)!r} is a {saved['format']!r} file, not a trade-md model (model.pt)")
    if saved.get("format_version", 1) > MODEL_FORMAT_VERSION:
        raise TradeMDError(
            f"{str(path)!r} has model format version {saved['format_version']}, newer than this "
            f"trade-md reads ({MODEL_FORMAT_VERSION}): upgrade trade-md")
    if record.get("kind") != "molecule":
        raise TradeMDError(
            f"{str(path)!r} was trained on the analytic system {record.get('system')!r}: "
            "`trade-md sample` writes molecular samples; use the Python API for analytic systems"
        )
    target = MoleculeTarget.from_record(record, saved["reference_temperature"], platform=platform)
    flow = load_flow(saved["flow"], map_location=torch.device(device))
    flow.eval()
    t_min, t_max = saved["temperature_range"]
    return TrainedModel(flow, target, (float(t_min), float(t_max)),
                        float(saved["reference_temperature"]), path)


@dataclass
class TemperatureSamples:
    """Samples at one temperature (arrays over n samples).

    Attributes:
        temperature_k: T (K).
        positions_nm: float32 [n, atoms, 3].
        log_prob: float64 [n], log p(x|T) of the model.
        energy_kj_mol: float64 [n], OpenMM potential energy (+inf where it overflowed).
        log_weights: float64 [n], unnormalised; -inf for flagged samples.
        weights: float64 [n], normalised to sum 1.
        wrong_chirality: bool [n].
        nonfinite_energy: bool [n].
        phi, psi: float64 [n] radians (empty if the system has none).
    """

    temperature_k: float
    positions_nm: np.ndarray
    log_prob: np.ndarray
    energy_kj_mol: np.ndarray
    log_weights: np.ndarray
    weights: np.ndarray
    wrong_chirality: np.ndarray
    nonfinite_energy: np.ndarray
    phi: np.ndarray
    psi: np.ndarray

    @property
    def n(self) -> int:
        return int(len(self.log_prob))

    @property
    def ess(self) -> float:
        """Kish effective sample size (absolute)."""
        return float(kish_ess(torch.as_tensor(self.log_weights)))

    @property
    def relative_ess(self) -> float:
        return self.ess / self.n

    @property
    def fraction_flagged(self) -> float:
        return float(np.mean(self.wrong_chirality | self.nonfinite_energy))


def draw_samples(model: TrainedModel, temperature_k: float, n: int, batch_size: int = 4096,
                 extrapolate: bool = False, show_progress: bool = True) -> TemperatureSamples:
    """Draw ``n`` weighted samples at ``temperature_k`` from a trained model.

    Raises:
        TradeMDError: for T outside the trained range (unless ``extrapolate``), n < 1.
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
    target = model.target
    reference = torch.as_tensor(target.molecule.positions_nm())
    centres = target.molecule.chiral_centres
    parts: dict[str, list] = {k: [] for k in ("x", "log_prob", "energy", "wrong")}
    progress = Progress(n, "samples", enabled=show_progress)
    done = 0
    while done < n:
        m = min(batch_size, n - done)
        with torch.no_grad():
            z, log_p_z = model.flow.sample(m, temperature_k)
            x, log_det = target.positions(z)
            x = x.float().double()  # the energies belong to the float32 positions stored
            energy, _ = target.bridge.evaluate(x)
        parts["x"].append(x.float().cpu().numpy())
        parts["log_prob"].append((log_p_z.double() - log_det).cpu().numpy())
        parts["energy"].append(energy.double().cpu().numpy())
        wrong = (wrong_chirality_mask(x.cpu(), centres, reference).numpy()
                 if len(centres) else np.zeros(m, dtype=bool))
        parts["wrong"].append(wrong)
        done += m
        progress.update(done)
    positions = np.concatenate(parts["x"])
    log_prob = np.concatenate(parts["log_prob"])
    energy = np.concatenate(parts["energy"])
    wrong = np.concatenate(parts["wrong"])
    nonfinite = ~np.isfinite(energy)
    log_w = log_importance_weights(energy / (target.boltzmann_k * temperature_k), log_prob)
    log_w[wrong | nonfinite | ~np.isfinite(log_w)] = -np.inf
    weights = _normalised(log_w)
    phi, psi = phi_psi(target.molecule, positions)
    return TemperatureSamples(float(temperature_k), positions, log_prob, energy, log_w, weights,
                              wrong, nonfinite, phi, psi)


def _normalised(log_weights: np.ndarray) -> np.ndarray:
    finite = np.isfinite(log_weights)
    if not finite.any():
        raise TradeMDError(
            "every sample has zero weight (wrong chirality or non-finite energy): the model is "
            "not usable at this temperature; train longer or check the data"
        )
    shifted = np.where(finite, np.exp(log_weights - log_weights[finite].max()), 0.0)
    return shifted / shifted.sum()


def phi_psi(molecule, positions_nm: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Backbone dihedrals (radians) by mdtraj, empty arrays if the system has none."""
    import mdtraj

    if molecule.phi_atoms is None or molecule.psi_atoms is None:
        return np.zeros(0), np.zeros(0)
    trajectory = mdtraj.Trajectory(positions_nm, molecule.mdtraj_topology())
    angles = mdtraj.compute_dihedrals(trajectory, [molecule.phi_atoms, molecule.psi_atoms])
    return angles[:, 0].astype(np.float64), angles[:, 1].astype(np.float64)


def phi_psi_histogram(phi: np.ndarray, psi: np.ndarray, weights: np.ndarray | None = None,
                      bins: int = PHI_PSI_BINS) -> tuple[np.ndarray, np.ndarray]:
    """Normalised 2-D histogram [bins, bins] (probabilities summing to 1) over [-pi, pi)^2 and
    its bin edges [bins + 1] (the same for both axes)."""
    edges = np.linspace(-math.pi, math.pi, bins + 1)
    histogram, _, _ = np.histogram2d(phi, psi, bins=[edges, edges], weights=weights)
    total = histogram.sum()
    return (histogram / total if total > 0 else histogram), edges


def basin_free_energy(phi: np.ndarray, weights: np.ndarray | None = None,
                      ess: float | None = None) -> tuple[float, float]:
    """Free-energy difference (in kT) of the positive-phi region relative to the negative-phi
    (alpha/beta) region, -ln(P(phi > 0) / P(phi < 0)), and its standard error from the
    binomial variance with ``ess`` effective samples (default: len(phi) or the Kish ESS of the
    weights)."""
    if weights is None:
        weights = np.full(len(phi), 1.0 / len(phi))
        ess = ess or float(len(phi))
    else:
        weights = weights / weights.sum()
        ess = ess or float(1.0 / np.sum(weights**2))
    p_positive = float(weights[phi > 0].sum())
    if p_positive <= 0 or p_positive >= 1:
        return (math.inf if p_positive <= 0 else -math.inf), math.inf
    delta_f = -math.log(p_positive / (1 - p_positive))
    error = math.sqrt(p_positive * (1 - p_positive) / ess) / (p_positive * (1 - p_positive))
    return delta_f, error

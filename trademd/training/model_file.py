"""The model file (``model.pt``) of ``trade-md train``: its format, and loading it for sampling."""

from dataclasses import dataclass
from pathlib import Path

import torch

from trademd.errors import TradeMDError
from trademd.flow.conditional import TemperatureFlow
from trademd.flow.factory import load_flow
from trademd.training.targets import MoleculeTarget

__all__ = ["MODEL_FORMAT", "MODEL_FORMAT_VERSION", "TrainedModel", "write_model", "load_model"]

#: ``format`` and ``format_version`` of a model file (files without them are version 1).
MODEL_FORMAT = "trade-md/model"
MODEL_FORMAT_VERSION = 1

def write_model(path: Path, flow: TemperatureFlow, target, temperature_range: tuple[float, float],
                objective: str, selection: dict, energy_evaluations: int) -> Path:
    """Write ``path`` (``model.pt``): the flow, the target's record, the temperature range,
    T0, the objective's name, which step was selected and why, the energy evaluations of the
    whole training."""
    torch.save({
        "format": MODEL_FORMAT,
        "format_version": MODEL_FORMAT_VERSION,
        "flow": flow.checkpoint(),
        "target": target.record(),
        "reference_temperature": target.reference_temperature,
        "temperature_range": list(temperature_range),
        "objective": objective,
        "selection": selection,
        "energy_evaluations": energy_evaluations,
    }, path)
    return path


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
    target: MoleculeTarget
    temperature_range: tuple[float, float]
    reference_temperature: float
    path: Path

    def close(self) -> None:
        self.target.close()


def load_model(path: str | Path, device: torch.device | str = "cpu", platform: str = "auto") -> TrainedModel:
    """Load ``model.pt`` written by ``trade-md train``."""
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

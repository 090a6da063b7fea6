"""``nll``: the NLL of the data at T0 only. The flow's bounded base is temperature-scaled, the
only way T enters; the model is selected by the NLL of held-out data at T0."""

from torch import Tensor

from trademd.training.objectives.base import Objective, TrainingRun, data_nll

__all__ = ["NLL"]


class NLL(Objective):
    """Maximum likelihood of the data at T0 (the baseline that knows no energies)."""

    name = "nll"
    scaled_base = True

    def loss(self, run: TrainingRun) -> tuple[Tensor, dict]:
        nll = data_nll(run, run.config.batch_size)
        return nll, {"nll_t0": float(nll.detach())}

    def selection_score(self, values: dict, run: TrainingRun) -> tuple[float | None, str]:
        """The validation NLL at T0 (without held-out data: the last step)."""
        if "val_nll_t0" not in values:
            return None, "last step (no validation data)"
        return -values["val_nll_t0"], "validation NLL at T0"

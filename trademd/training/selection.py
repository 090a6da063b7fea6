"""Model selection: the best-scoring EMA parameters seen at the metrics steps."""

from torch import nn

__all__ = ["ModelSelector"]


class ModelSelector:
    """Keeps the parameters of the best-scoring metrics step.

    Attributes:
        best: {"step", "score", "criterion", "state_dict"} of the kept step (None before one).
    """

    def __init__(self):
        self.best: dict | None = None

    def offer(self, step: int, score: float | None, criterion: str, model: nn.Module) -> bool:
        """Keep ``model``'s parameters if ``score`` beats the kept one (a step with no score
        is kept only while no scored step is); returns whether it did."""
        scored = self.best is not None and self.best["score"] is not None
        if score is None and scored:
            return False
        if score is not None and scored and score <= self.best["score"]:
            return False
        self.best = {"step": step, "score": score, "criterion": criterion,
                     "state_dict": {k: v.detach().clone() for k, v in model.state_dict().items()}}
        return True

    def description(self) -> dict:
        """The kept step without its parameters (``selection.json``)."""
        return {k: v for k, v in (self.best or {}).items() if k != "state_dict"}

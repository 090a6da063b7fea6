"""Training objectives, one module each; the trainer finds them here by name.

- ``trade`` (:mod:`.trade`): NLL of data at T0 plus the TRADE residual loss over the range.
- ``nll`` (:mod:`.nll`): NLL at T0 only, with a temperature-scaled base.
- ``reverse-kl``, ``nll+reverse-kl`` (:mod:`.reverse_kl`): reverse KL over the range, alone or
  with the NLL.
- ``data-free`` (:mod:`.data_free`): a reverse-KL boundary and TRADE, no data.
- ``interpolation`` (:mod:`.interpolation`): a CNF on the continuity residual.

Refinement (:mod:`.refinement`) is a phase after any of them but interpolation.
"""

from trademd.training.config import TrainConfig
from trademd.training.objectives.base import Objective, unknown_objective
from trademd.training.objectives.data_free import DataFree
from trademd.training.objectives.interpolation import Interpolation
from trademd.training.objectives.nll import NLL
from trademd.training.objectives.refinement import RefinementPhase
from trademd.training.objectives.reverse_kl import NLLReverseKL, ReverseKL
from trademd.training.objectives.trade import Trade

__all__ = ["OBJECTIVES", "Objective", "RefinementPhase", "objective_class", "make_objective"]

#: Every objective by name (the order of the CLI's help).
OBJECTIVES: dict[str, type[Objective]] = {
    kind.name: kind for kind in (Trade, NLL, ReverseKL, NLLReverseKL, DataFree, Interpolation)}


def objective_class(name: str) -> type[Objective]:
    """The objective called ``name``."""
    if name not in OBJECTIVES:
        raise unknown_objective(name, list(OBJECTIVES))
    return OBJECTIVES[name]


def make_objective(config: TrainConfig) -> Objective:
    """The objective ``config`` names, its settings checked."""
    objective = objective_class(config.objective)(config)
    objective.check(config)
    return objective

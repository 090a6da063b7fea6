"""The first part of training a molecule without data: maximum likelihood on samples of its
structure prior (:mod:`trademd.training.structure_prior`, no energies in the loss) for
``prior_fraction`` of the main phase, before the energy takes over."""

import torch
from torch import Tensor

from trademd.training.objectives.base import TrainingRun
from trademd.training.structure_prior import StructurePrior

__all__ = ["StructurePriorFit"]


class StructurePriorFit:
    """Samples of a molecule's structure prior and the NLL the flow fits them by.

    Attributes:
        samples: [prior_samples, D] prior samples (features).
        end_step: the first step after the prior phase.
    """

    def __init__(self, samples: Tensor, end_step: float):
        self.samples, self.end_step = samples, end_step

    @classmethod
    def for_run(cls, run: TrainingRun) -> "StructurePriorFit | None":
        """The prior fit of a molecule trained without data; None where there is none
        (``prior_fraction`` 0, an analytic system, a structure outside the normalisation)."""
        c = run.config
        if c.data_free.prior_fraction == 0 or not hasattr(run.target, "structure_features"):
            return None
        structure = run.target.structure_features()
        if structure is None:
            return None
        prior = StructurePrior.from_target(run.target, structure, run.target.reference_temperature,
                                           chirality_restraint_kt=c.reverse_kl.chirality_restraint_kt)
        samples = prior.sample(c.data_free.prior_samples, torch.Generator().manual_seed(c.seed))
        return cls(samples.to(run.device), c.data_free.prior_fraction * c.steps)

    def active(self, step: int) -> bool:
        """Whether ``step`` lies in the prior phase."""
        return step < self.end_step

    def loss(self, run: TrainingRun) -> tuple[Tensor, dict]:
        """NLL at T0 of a minibatch of prior samples."""
        batch = run.data_batch(run.config.batch_size, self.samples)
        nll = -run.flow.log_prob(batch, run.target.reference_temperature).mean()
        return nll, {"prior_nll": float(nll.detach())}

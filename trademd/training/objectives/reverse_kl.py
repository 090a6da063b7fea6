"""``reverse-kl`` and ``nll+reverse-kl``: the reverse KL divergence to exp(-u) at temperatures
drawn over the range, alone (a molecule first fits its structure prior) or beside the NLL of
the data at T0."""

import torch
from torch import Tensor

from trademd.training.objectives.base import Objective, TrainingRun, data_nll
from trademd.training.objectives.prior_fit import StructurePriorFit
from trademd.training.sampling import linear_log_cut
from trademd.training.temperatures import log_uniform_temperatures

__all__ = ["reverse_kl_loss", "ReverseKL", "NLLReverseKL"]


def reverse_kl_loss(run: TrainingRun, at_reference: bool = False) -> Tensor:
    """KL(flow || target) up to log Z, E[log p + u' - log|dx/dz|] over ``reverse_kl_samples``
    reparameterised flow samples at T0 (``at_reference``) or at temperatures drawn
    log-uniformly over the range. u' is the reduced energy cut linearly-logarithmically above
    ``reverse_kl_energy_cut``, so that clashes of an early flow (u up to 1e9) cannot dominate
    the gradients."""
    c = run.config
    n = c.reverse_kl.reverse_kl_samples
    if at_reference:
        temperature = torch.full((n,), float(run.target.reference_temperature), device=run.device)
    else:
        temperature = log_uniform_temperatures(n, c.t_min, c.t_max, run.device)
    z, log_p = run.flow.rsample(n, temperature)
    u, log_det = run.target.reduced_energy(z, temperature, c.reverse_kl.chirality_restraint_kt)
    return (log_p + linear_log_cut(u, c.reverse_kl.reverse_kl_energy_cut) - log_det).mean()


class ReverseKL(Objective):
    """Reverse KL over the range from the energy alone (a baseline; no data)."""

    name = "reverse-kl"
    fits_data = False
    energy_only = True

    def prepare(self, run: TrainingRun) -> None:
        self.prior = StructurePriorFit.for_run(run)

    def flow_data(self, run: TrainingRun) -> Tensor | None:
        return None if self.prior is None else self.prior.samples

    def loss(self, run: TrainingRun) -> tuple[Tensor, dict]:
        if self.prior is not None and self.prior.active(run.step):
            return self.prior.loss(run)
        kl = torch.zeros((), device=run.device) + reverse_kl_loss(run)
        return kl, {"reverse_kl": float(kl.detach())}


class NLLReverseKL(Objective):
    """NLL of the data at T0 plus reverse KL over the range."""

    name = "nll+reverse-kl"

    def loss(self, run: TrainingRun) -> tuple[Tensor, dict]:
        nll = data_nll(run, run.config.batch_size)
        kl = reverse_kl_loss(run)
        return torch.zeros((), device=run.device) + nll + kl, {"nll_t0": float(nll.detach()),
                                                                  "reverse_kl": float(kl.detach())}

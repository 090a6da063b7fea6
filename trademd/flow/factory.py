"""What every temperature-conditional flow offers (:class:`ConditionalFlow`), and building or
loading one from its config: a coupling flow (:class:`~trademd.flow.conditional.TemperatureFlow`)
or, with ``kind: cnf``, the continuous flow of the interpolation objective
(:class:`~trademd.flow.cnf.TemperatureCNF`). The two flow modules import neither each other
nor this one.
"""

from typing import Protocol, runtime_checkable

import torch
from torch import Tensor

from trademd.errors import TradeMDError
from trademd.flow.cnf import TemperatureCNF
from trademd.flow.conditional import TemperatureFlow

__all__ = ["ConditionalFlow", "build_flow", "load_flow"]


@runtime_checkable
class ConditionalFlow(Protocol):
    """A normalizing flow p(z | T) over features z [n, D] conditioned on a temperature T (K):
    what training, sampling and metrics use of a flow.

    Attributes:
        config: the plain dict :func:`build_flow` rebuilds the flow from.
    """

    config: dict

    def log_prob(self, z: Tensor, temperature_k) -> Tensor:
        """log p(z | T) [n] of features z [n, D]; T a float or a tensor [n] (K)."""

    def sample(self, n: int, temperature_k) -> tuple[Tensor, Tensor]:
        """n samples z [n, D] and their log p(z | T) [n], without gradients."""

    def rsample(self, n: int, temperature_k) -> tuple[Tensor, Tensor]:
        """n samples and their log p(z | T), differentiable w.r.t. the parameters."""

    def checkpoint(self) -> dict:
        """``{"config": ..., "state_dict": ...}``: what :func:`load_flow` reads back."""


def build_flow(config: dict) -> TemperatureFlow | TemperatureCNF:
    """A new flow from ``flow.config`` (a plain dict): a coupling flow, or with ``kind: cnf``
    the continuous flow of the interpolation objective (:mod:`trademd.flow.cnf`)."""
    try:
        if config.get("kind") == "cnf":
            return TemperatureCNF(**{k: v for k, v in config.items() if k != "kind"})
        return TemperatureFlow(**config)
    except TypeError as error:
        raise TradeMDError(f"cannot build a flow from this config ({error}): "
                           "was it written by another version?") from error


def load_flow(checkpoint: dict, map_location: str | torch.device | None = None) -> TemperatureFlow | TemperatureCNF:
    """Rebuild a flow from ``{"config", "state_dict"}`` (e.g. ``torch.load`` of a model file),
    in the dtype it was saved in, on ``map_location`` if given."""
    # files written before seam shifts existed have every seam at +-pi
    config = checkpoint["config"]
    flow = build_flow(config if config.get("kind") == "cnf" else {"torsion_shifts": "none", **config})
    state = checkpoint["state_dict"]
    dtypes = [v.dtype for v in state.values() if v.is_floating_point()]
    if dtypes:
        flow = flow.to(dtypes[0])  # a float64 flow comes back as float64
    if map_location is not None:
        state = {k: v.to(map_location) for k, v in state.items()}
        flow = flow.to(map_location)
    flow.load_state_dict(state)
    return flow

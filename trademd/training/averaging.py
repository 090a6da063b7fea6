"""The exponential moving average of the flow's parameters that training evaluates and selects.

:class:`ExponentialAverage` is torch's ``AveragedModel`` with ``get_ema_multi_avg_fn`` (same
state dict, same numbers: the same ``torch._foreach_lerp_``), updated without the generic
path's per-step work: grouping the parameters by device and dtype, moving the step count to
the device and copying every buffer each step (about 1 ms a step on a CPU, 3 % of an NLL step
of the quick preset; docs/performance.md). The flows' buffers are constant index tables, so
they are copied once, with the module; the average lives on the model's device and dtype (a
deep copy of it: ``foreach`` refuses anything else).
"""

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

__all__ = ["ExponentialAverage"]


class ExponentialAverage(AveragedModel):
    """EMA of ``model``'s parameters with ``decay`` per step; the first update copies them.

    >>> model = nn.Linear(2, 1)
    >>> average = ExponentialAverage(model, decay=0.5)
    >>> average.update_parameters(model)
    >>> with torch.no_grad():
    ...     _ = model.bias.add_(1.0)
    >>> average.update_parameters(model)
    >>> bool(torch.allclose(average.module.bias, model.bias - 0.5))
    True
    """

    def __init__(self, model: nn.Module, decay: float):
        super().__init__(model, multi_avg_fn=get_ema_multi_avg_fn(decay))
        self.weight = 1.0 - decay

    def update_parameters(self, model: nn.Module) -> None:
        if int(self.n_averaged) == 0:  # the first: a copy
            super().update_parameters(model)
            return
        with torch.no_grad():
            torch._foreach_lerp_(list(self.module.parameters()), list(model.parameters()), self.weight)
        self.n_averaged += 1

"""The flow's weight average (trademd.training.averaging) against torch's generic AveragedModel
with the same EMA function: the same parameters bit for bit, the same state dict."""

import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from trademd.flow.conditional import TemperatureFlow
from trademd.training.averaging import ExponentialAverage


def test_the_same_average_as_torchs_generic_one_bit_for_bit():
    torch.manual_seed(0)
    flow = TemperatureFlow(2, 3, (300.0, 600.0), width=8)
    ours = ExponentialAverage(flow, decay=0.9)
    generic = AveragedModel(flow, multi_avg_fn=get_ema_multi_avg_fn(0.9))
    for _ in range(5):
        with torch.no_grad():
            for parameter in flow.parameters():
                parameter.add_(torch.randn_like(parameter))
        ours.update_parameters(flow)
        generic.update_parameters(flow)
    state, generic_state = ours.state_dict(), generic.state_dict()
    assert list(state) == list(generic_state)
    for key in state:
        assert torch.equal(state[key], generic_state[key]), key
    assert int(ours.n_averaged) == 5
    # and not simply the model: the average lags it
    assert not torch.equal(ours.module.layers[0].net[0].weight, flow.layers[0].net[0].weight)

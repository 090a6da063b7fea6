"""The conditioner networks of the coupling layers, and their forward-mode derivative.

A conditioner maps a layer's conditioning features [B, n_in] to its spline parameters
[B, n_out]: an MLP (zuko's) or a residual network, each an ``nn.Sequential`` of linear layers,
residual blocks and activations. :func:`network_output` evaluates one, its output columns
reordered; :func:`network_output_jvp` also pushes a tangent through it (output and
Jacobian-vector product in one pass of plain tensor arithmetic, which reverse-mode autograd
differentiates like any other).
"""

import math

import torch
from torch import Tensor, nn
from zuko.nn import MLP, Linear as ZukoLinear

from trademd.errors import TradeMDError

__all__ = ["ACTIVATIONS", "Residual", "conditioner_network", "network_output", "network_output_jvp"]

ACTIVATIONS = {"silu": nn.SiLU, "relu": nn.ReLU, "elu": nn.ELU, "gelu": nn.GELU, "tanh": nn.Tanh}
#: functional forms of the activations with their default settings
_FUNCTIONS = {nn.SiLU: nn.functional.silu, nn.ReLU: torch.relu, nn.Tanh: torch.tanh}
_INV_SQRT_2 = 1.0 / math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


class Residual(nn.Sequential):
    """x + layers(x): a residual block of the ``residual`` conditioner, [B, width] -> [B, width]."""

    def forward(self, x: Tensor) -> Tensor:
        return x + super().forward(x)


def conditioner_network(kind: str, n_in: int, n_out: int, width: int, depth: int,
                        activation: str) -> nn.Sequential:
    """A conditioner [B, n_in] -> [B, n_out]: ``"mlp"`` (``depth`` hidden layers) or
    ``"residual"`` (``depth`` residual blocks of width ``width``); the last layer is
    zero-initialised, so the spline parameters start at zero (the identity)."""
    act = ACTIVATIONS[activation]
    if kind == "mlp":
        net = MLP(n_in, n_out, [width] * depth, activation=act)
    elif kind == "residual":
        blocks = [Residual(act(), nn.Linear(width, width), act(), nn.Linear(width, width))
                  for _ in range(depth)]
        net = nn.Sequential(nn.Linear(n_in, width), *blocks, act(), nn.Linear(width, n_out))
    else:
        raise TradeMDError(f"unknown conditioner {kind!r}: use 'residual' or 'mlp'")
    nn.init.zeros_(net[-1].weight)
    nn.init.zeros_(net[-1].bias)
    return net


def network_output(net: nn.Sequential, x: Tensor, rows: Tensor) -> Tensor:
    """``net(x)[:, rows]`` [B, len(rows)] for x [B, n_in], a network of
    :func:`conditioner_network`: the last layer takes only those rows of its weights (rows may
    repeat), cheaper than indexing the output, whose backward would zero-fill a copy of it."""
    *hidden, last = net
    for layer in hidden:
        x = _layer(layer, x)
    return nn.functional.linear(x, last.weight.index_select(0, rows), last.bias.index_select(0, rows))


def network_output_jvp(net: nn.Sequential, x: Tensor, x_dot: Tensor, rows: Tensor) -> tuple[Tensor, Tensor]:
    """:func:`network_output` and its directional derivative along ``x_dot`` [B, n_in]."""
    *hidden, last = net
    for layer in hidden:
        x, x_dot = _layer_jvp(layer, x, x_dot)
    weight = last.weight.index_select(0, rows)
    return nn.functional.linear(x, weight, last.bias.index_select(0, rows)), nn.functional.linear(x_dot, weight)


def _layer(layer: nn.Module, x: Tensor) -> Tensor:
    """layer(x) for a linear layer, a residual block or an activation, by the functional
    calls (a module call costs microseconds of Python, as much as a small operation)."""
    if isinstance(layer, (nn.Linear, ZukoLinear)):
        return nn.functional.linear(x, layer.weight, layer.bias)
    if isinstance(layer, Residual):
        y = x
        for inner in layer:
            y = _layer(inner, y)
        return x + y
    return _FUNCTIONS[type(layer)](x) if type(layer) in _FUNCTIONS else layer(x)


def _layer_jvp(layer: nn.Module, x: Tensor, x_dot: Tensor) -> tuple[Tensor, Tensor]:
    """(layer(x), its directional derivative along x_dot) of a linear layer, a residual block
    or an activation."""
    if isinstance(layer, (nn.Linear, ZukoLinear)):  # zuko's MLP is made of its own (unstacked)
        return layer(x), nn.functional.linear(x_dot, layer.weight)
    if isinstance(layer, Residual):
        y, y_dot = x, x_dot
        for inner in layer:
            y, y_dot = _layer_jvp(inner, y, y_dot)
        return x + y, x_dot + y_dot
    y, slope = _activation_and_slope(layer, x)
    return y, slope * x_dot


def _activation_and_slope(activation: nn.Module, x: Tensor) -> tuple[Tensor, Tensor]:
    """(activation(x), its derivative at x), elementwise, for the modules of :data:`ACTIVATIONS`
    with their default settings."""
    if isinstance(activation, nn.SiLU):
        sigmoid, y = torch.sigmoid(x), nn.functional.silu(x)
        return y, sigmoid + y * (1.0 - sigmoid)
    if isinstance(activation, nn.ReLU):
        return torch.relu(x), (x > 0).to(x.dtype)
    if isinstance(activation, nn.ELU) and activation.alpha == 1.0:
        y = nn.functional.elu(x)
        return y, torch.where(x > 0, 1.0, y + 1.0)
    if isinstance(activation, nn.GELU) and activation.approximate == "none":
        cdf = 0.5 * (1.0 + torch.erf(x * _INV_SQRT_2))
        return x * cdf, cdf + x * _INV_SQRT_2PI * torch.exp(-0.5 * x**2)
    if isinstance(activation, nn.Tanh):
        y = torch.tanh(x)
        return y, 1.0 - y**2
    raise TradeMDError(f"no forward-mode derivative for {activation!r} in a conditioner")

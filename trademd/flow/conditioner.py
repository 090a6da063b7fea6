"""The conditioner networks of the coupling layers, and their forward-mode derivative.

A conditioner maps a layer's conditioning features [B, n_in] to its spline parameters
[B, n_out]: an MLP (zuko's) or a residual network, each an ``nn.Sequential`` of linear layers,
residual blocks and activations. :func:`network_jvp` pushes a tangent through one
(output and Jacobian-vector product in one pass of plain tensor arithmetic, which reverse-mode
autograd differentiates like any other).
"""

import math

import torch
from torch import Tensor, nn
from zuko.nn import MLP, Linear as ZukoLinear

from trademd.errors import TradeMDError

__all__ = ["ACTIVATIONS", "Residual", "conditioner_network", "network_jvp"]

ACTIVATIONS = {"silu": nn.SiLU, "relu": nn.ReLU, "elu": nn.ELU, "gelu": nn.GELU, "tanh": nn.Tanh}
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


def network_jvp(net: nn.Module, x: Tensor, x_dot: Tensor) -> tuple[Tensor, Tensor]:
    """(net(x), its directional derivative along ``x_dot``), for a network of
    :func:`conditioner_network`: x, x_dot [B, n_in] -> [B, n_out], [B, n_out]."""
    if isinstance(net, (nn.Linear, ZukoLinear)):  # zuko's MLP is made of its own (unstacked)
        return net(x), nn.functional.linear(x_dot, net.weight)
    if isinstance(net, nn.Sequential):
        y, y_dot = x, x_dot
        for layer in net:
            y, y_dot = network_jvp(layer, y, y_dot)
        if isinstance(net, Residual):
            return x + y, x_dot + y_dot
        return y, y_dot
    y, slope = _activation_and_slope(net, x)
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

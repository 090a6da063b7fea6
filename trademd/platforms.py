"""Choosing where OpenMM and torch run: ``auto`` picks CUDA when present, else the CPU."""

import os

import openmm

from trademd.errors import TradeMDError

__all__ = ["openmm_platform", "available_openmm_platforms", "torch_device"]

PLATFORM_CHOICES = ("auto", "CPU", "CUDA", "Reference")


def available_openmm_platforms() -> list[str]:
    """Names of the OpenMM platforms this installation can use."""
    return [openmm.Platform.getPlatform(i).getName() for i in range(openmm.Platform.getNumPlatforms())]


def openmm_platform(name: str = "auto", threads: int | None = None) -> tuple[openmm.Platform, dict]:
    """The OpenMM platform called ``name`` and its properties.

    Args:
        name: ``auto`` (CUDA if available, else CPU), ``CPU``, ``CUDA`` or ``Reference``.
        threads: CPU threads (default: all cores); ignored on other platforms.

    Returns:
        (platform, properties) for ``openmm.Context``.
    """
    if name not in PLATFORM_CHOICES:
        raise TradeMDError(f"unknown platform {name!r}: choose one of {list(PLATFORM_CHOICES)}")
    available = available_openmm_platforms()
    if name == "auto":
        name = "CUDA" if "CUDA" in available else "CPU"
    if name not in available:
        fix = " (install the GPU build: pip install 'trade-md[cuda]')" if name == "CUDA" else ""
        raise TradeMDError(
            f"OpenMM platform {name} is not available here (available: {available}): "
            f"use --platform auto or CPU{fix}"
        )
    properties = {}
    if name == "CPU":
        properties["Threads"] = str(threads or os.cpu_count() or 1)
    elif name == "CUDA":
        from trademd.distributed import local_device_index

        properties["Precision"] = "mixed"
        properties["DeviceIndex"] = str(local_device_index())  # under torchrun: the rank's GPU
    return openmm.Platform.getPlatformByName(name), properties


def torch_device(name: str = "auto"):
    """The torch device for ``auto`` (CUDA if available), ``cpu`` or ``cuda`` (under torchrun,
    the GPU of the rank's local rank)."""
    import torch

    from trademd.distributed import local_device_index

    if name not in ("auto", "cpu", "cuda"):
        raise TradeMDError(f"unknown device {name!r}: choose auto, cpu or cuda")
    if name == "cuda" and not torch.cuda.is_available():
        raise TradeMDError("torch sees no CUDA device: use --device auto or cpu")
    if name == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", local_device_index())

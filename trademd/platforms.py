"""Choosing where OpenMM and torch run.

``auto`` picks CUDA when present, then OpenCL when an OpenCL *GPU* is present (AMD, Intel and
Apple GPUs run OpenCL), else the CPU. An OpenCL implementation that runs on the CPU (pocl, used
to test the GPU kernels on machines without a GPU) is never chosen by ``auto``: name
``OpenCL`` to use it. Every OpenMM Context of trade-md names its platform: with an OpenCL
implementation installed, OpenMM itself would otherwise pick OpenCL for code that names none.
"""

import ctypes
import ctypes.util
import functools
import os

import openmm

from trademd.errors import TradeMDError

__all__ = ["openmm_platform", "available_openmm_platforms", "opencl_gpu_present",
           "resolve_platform", "torch_device", "PLATFORM_CHOICES", "GPU_PLATFORMS"]

PLATFORM_CHOICES = ("auto", "CPU", "CUDA", "OpenCL", "Reference")
#: Platforms whose kernels run on a device (CUDA, and OpenCL on a GPU or, with pocl, the CPU).
GPU_PLATFORMS = ("CUDA", "OpenCL")

#: OpenCL's CL_DEVICE_TYPE_GPU and CL_SUCCESS.
_CL_DEVICE_TYPE_GPU = 1 << 2
_CL_SUCCESS = 0


def available_openmm_platforms() -> list[str]:
    """Names of the OpenMM platforms this installation can use."""
    return [openmm.Platform.getPlatform(i).getName() for i in range(openmm.Platform.getNumPlatforms())]


@functools.cache
def opencl_gpu_present() -> bool:
    """Whether an OpenCL platform of this machine offers a GPU device (asked of the OpenCL
    loader directly, in microseconds, without building an OpenMM Context)."""
    library = ctypes.util.find_library("OpenCL")
    if library is None:
        return False
    try:
        opencl = ctypes.CDLL(library)
        count = ctypes.c_uint(0)
        if opencl.clGetPlatformIDs(0, None, ctypes.byref(count)) != _CL_SUCCESS or count.value == 0:
            return False
        platforms = (ctypes.c_void_p * count.value)()
        if opencl.clGetPlatformIDs(count, platforms, None) != _CL_SUCCESS:
            return False
        for platform in platforms:
            devices = ctypes.c_uint(0)
            status = opencl.clGetDeviceIDs(ctypes.c_void_p(platform), ctypes.c_ulonglong(_CL_DEVICE_TYPE_GPU),
                                           0, None, ctypes.byref(devices))
            if status == _CL_SUCCESS and devices.value > 0:
                return True
    except (OSError, AttributeError):
        return False
    return False


def resolve_platform(name: str = "auto") -> str:
    """The platform ``name`` stands for: ``auto`` becomes CUDA if available, else OpenCL if an
    OpenCL GPU is present, else CPU; other names are checked and returned.

    Raises:
        TradeMDError: an unknown name, or a platform this installation lacks.
    """
    if name not in PLATFORM_CHOICES:
        raise TradeMDError(f"unknown platform {name!r}: choose one of {list(PLATFORM_CHOICES)}")
    available = available_openmm_platforms()
    if name == "auto":
        if "CUDA" in available:
            return "CUDA"
        return "OpenCL" if "OpenCL" in available and opencl_gpu_present() else "CPU"
    if name not in available:
        fixes = {"CUDA": " (install the GPU build: pip install 'trade-md[cuda]')",
                 "OpenCL": " (install an OpenCL driver for your GPU; on a CPU-only Debian/Ubuntu "
                           "machine, apt-get install pocl-opencl-icd ocl-icd-libopencl1)"}
        raise TradeMDError(
            f"OpenMM platform {name} is not available here (available: {available}): "
            f"use --platform auto or CPU{fixes.get(name, '')}"
        )
    return name


def openmm_platform(name: str = "auto", threads: int | None = None,
                    precision: str | None = None) -> tuple[openmm.Platform, dict]:
    """The OpenMM platform called ``name`` and its properties.

    Args:
        name: ``auto`` (see :func:`resolve_platform`), ``CPU``, ``CUDA``, ``OpenCL`` or
            ``Reference``.
        threads: CPU threads (default: all cores); ignored on other platforms.
        precision: ``single``, ``mixed`` or ``double`` on CUDA and OpenCL (default mixed);
            ignored on other platforms.

    Returns:
        (platform, properties) for ``openmm.Context``.
    """
    name = resolve_platform(name)
    properties = {}
    if name == "CPU":
        properties["Threads"] = str(threads or os.cpu_count() or 1)
    elif name in GPU_PLATFORMS:
        from trademd.distributed import local_device_index, ranks_from_environment

        properties["Precision"] = precision or "mixed"
        if name == "CUDA" or ranks_from_environment().world_size > 1:
            # under torchrun: the rank's GPU; a lone OpenCL process lets OpenMM pick the fastest
            # device of all OpenCL platforms
            properties["DeviceIndex"] = str(local_device_index())
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

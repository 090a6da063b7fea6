"""Data-parallel runs under ``torchrun``: which process this is, and the collective
operations training and sampling need (``torch.distributed``: gloo on CPU, NCCL on CUDA).

Launched by ``torchrun`` (``WORLD_SIZE`` > 1 in the environment) every rank runs the same
program; without it there is one rank and every function here communicates nothing, so the
same code serves both. Pooled estimates (self-normalised means, Kish ESS) are exact: each rank
sums its own weights against a maximum shared by all ranks, and the sums are added.
"""

import atexit
from dataclasses import dataclass
import math
import os

import torch
import torch.distributed as dist
from torch import Tensor

from trademd.weights import kish_ess_from_sums, shifted_weights_torch

__all__ = ["Ranks", "ranks_from_environment", "start", "stop", "barrier", "all_reduce", "all_finite",
           "average_gradients", "broadcast_parameters", "gather_objects", "pooled_snis_mean",
           "pooled_kish_ess", "shard_sizes", "local_device_index", "cpu_share"]


@dataclass(frozen=True)
class Ranks:
    """This process's place in a (possibly one-process) run.

    Attributes:
        rank: global rank, 0 writes every file.
        world_size: number of processes.
        local_rank: rank on this node (the CUDA device it uses).
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        """More than one process: collectives communicate."""
        return self.world_size > 1


def ranks_from_environment() -> Ranks:
    """The ranks ``torchrun`` sets (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``); one rank without."""
    return Ranks(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
                 int(os.environ.get("LOCAL_RANK", 0)))


def start(device: torch.device | None = None) -> Ranks:
    """Join the process group of a ``torchrun`` launch (NCCL when ``device`` is a CUDA device,
    gloo otherwise), once per process (left at exit); a no-op for one process."""
    ranks = ranks_from_environment()
    if ranks.active and not dist.is_initialized():
        dist.init_process_group("nccl" if device is not None and device.type == "cuda" else "gloo")
        atexit.register(stop)
    return ranks


def barrier() -> None:
    """Wait for every rank (e.g. until rank 0 has written a file the others read)."""
    if _communicating():
        dist.barrier()


def stop() -> None:
    """Leave the process group, if one was joined (no collective: safe after an error)."""
    if dist.is_initialized():
        dist.destroy_process_group()


def _communicating() -> bool:
    return dist.is_initialized() and dist.get_world_size() > 1


def all_reduce(tensor: Tensor, op: str = "sum") -> Tensor:
    """In-place sum (or ``max``/``min``) over ranks; returns ``tensor``."""
    if _communicating():
        dist.all_reduce(tensor, {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX,
                                 "min": dist.ReduceOp.MIN}[op])
    return tensor


def all_finite(value: Tensor) -> bool:
    """Whether ``value`` is finite on every rank (so that all ranks skip a bad batch together)."""
    flag = torch.tensor([1.0 if bool(torch.isfinite(value).all()) else 0.0], device=value.device)
    return bool(all_reduce(flag, "min").item() > 0)


def average_gradients(parameters) -> None:
    """Replace every gradient by its mean over ranks (one flattened all-reduce), as
    DistributedDataParallel does; parameters without a gradient count as zero."""
    if not _communicating():
        return
    parameters = list(parameters)
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in parameters]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    offset = 0
    for p in parameters:
        n = p.numel()
        p.grad = flat[offset:offset + n].view_as(p).clone()
        offset += n


def broadcast_parameters(module: torch.nn.Module) -> None:
    """Give every rank rank 0's parameters and buffers."""
    if _communicating():
        for tensor in module.state_dict().values():
            dist.broadcast(tensor, 0)


def gather_objects(value) -> list:
    """Every rank's ``value`` in rank order (on every rank)."""
    if not _communicating():
        return [value]
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, value)
    return gathered


def _shifted_weights(log_weights: Tensor) -> Tensor:
    """exp(log w - m), m the largest finite log weight over all ranks (float64 [n])."""
    log_weights = log_weights.double()
    finite = torch.isfinite(log_weights)
    local_max = log_weights[finite].max() if finite.any() else torch.tensor(-math.inf, dtype=torch.float64,
                                                                            device=log_weights.device)
    shift = all_reduce(local_max.reshape(1).clone(), "max")
    if not torch.isfinite(shift).all():
        return torch.zeros_like(log_weights)
    return shifted_weights_torch(log_weights, shift)


def pooled_snis_mean(values: Tensor, log_weights: Tensor) -> float:
    """Self-normalised importance-sampling mean sum(w v) / sum(w) over the samples of all
    ranks (values [n], log weights [n], unnormalised; non-finite log weights weigh 0).
    NaN if no weight is finite anywhere."""
    weights = _shifted_weights(log_weights)
    values = torch.where(weights > 0, values.double(), torch.zeros_like(weights))
    sums = all_reduce(torch.stack([(weights * values).sum(), weights.sum()]))
    return float(sums[0] / sums[1]) if sums[1] > 0 else math.nan


def pooled_kish_ess(log_weights: Tensor) -> tuple[float, int]:
    """(Kish ESS (sum w)^2 / sum w^2, number of samples) over the samples of all ranks."""
    weights = _shifted_weights(log_weights)
    sums = all_reduce(torch.stack([weights.sum(), (weights ** 2).sum(),
                                   torch.tensor(float(len(weights)), dtype=torch.float64,
                                                device=weights.device)]))
    return kish_ess_from_sums(sums[0], sums[1]), int(round(float(sums[2])))


def shard_sizes(n: int, world_size: int) -> list[int]:
    """``n`` items split over ranks as evenly as possible (the first ranks take the rest)."""
    base, rest = divmod(n, world_size)
    return [base + (1 if r < rest else 0) for r in range(world_size)]


def local_device_index() -> int:
    """The CUDA device of this rank: its local rank, modulo the devices it can see (0 when
    the launcher gives each rank one device through CUDA_VISIBLE_DEVICES)."""
    count = torch.cuda.device_count() if torch.cuda.is_available() else 1
    return ranks_from_environment().local_rank % max(1, count)


def cpu_share(ranks: Ranks) -> int:
    """This rank's share of the machine's CPU cores when ranks run side by side (>= 1)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", ranks.world_size))
    return max(1, cores // max(1, per_node))


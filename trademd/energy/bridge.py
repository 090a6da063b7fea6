"""The OpenMM bridge: energies and forces of batches of configurations, for torch.

:class:`EnergyBridge` evaluates U(x) (kJ/mol) and F(x) = -dU/dx (kJ/mol/nm) of a batch of
molecule configurations x [B, atoms, 3] (nm) with OpenMM, exactly as a plain single-molecule
Context does; :func:`potential_energy` wraps it in a ``torch.autograd.Function`` so that
dU/dx = -F flows back to a flow's parameters, and :meth:`EnergyBridge.reduced_energy` gives
u = U / (k_B T) for per-sample temperatures.

How it evaluates (chosen per system and platform from measurements recorded in
``docs/performance.md``): on a CPU machine a pool of worker processes (one per core), each
owning a single-molecule Context on the faster of the Reference and CPU platforms (timed at
start-up; Reference for small molecules, and double precision as a bonus). On the GPU
platforms (CUDA, OpenCL) one replicated per-copy Context
(:class:`~trademd.energy.pool.ReplicatedKernel`, double precision) evaluates many
configurations per kernel launch, for vacuum and implicit solvent alike; elsewhere on request
(``kernel="replicated"``). Configurations that could reach another copy's cutoff (an atom
farther than ``layout.max_radius_nm`` from the centroid) never enter a replicated Context.

Configurations whose energy or forces are not finite, or do not fit the output dtype (atoms on
top of each other), get U = +inf and F = 0, and are counted in :attr:`EnergyBridge.n_overflow`.
NaN or infinite coordinates are refused with a :class:`TradeMDError`. Nothing is cached.
"""

import atexit
import multiprocessing
import os
import threading
import time
import warnings
import weakref

import numpy as np
import openmm
import torch
from torch.autograd.function import once_differentiable

from trademd.distributed import cpu_share, ranks_from_environment
from trademd.energy.pool import (
    WORKERS_SUPPORTED,
    KernelSpec,
    SingleKernel,
    WorkerPool,
    build_kernel,
    probe_positions_nm,
)
from trademd.errors import TradeMDError
from trademd.platforms import GPU_PLATFORMS, openmm_platform, resolve_platform
from trademd.units import BOLTZMANN_KJ_MOL_K

__all__ = [
    "EnergyBridge",
    "potential_energy",
]

KERNEL_CHOICES = ("auto", "single", "replicated")

#: Copies per replicated Context: (vacuum, implicit solvent) per platform. The CPU values are
#: the measured optima (per-copy GB costs O(copies) per particle); the GPU values are a
#: starting point (64 vacuum copies compiled and ran on an H100, 512 overflowed CUDA's kernel
#: arguments): ``benchmarks/gpu_check.py`` measures them on a lent GPU.
_COPIES = {"CUDA": (64, 64), "OpenCL": (64, 64), "CPU": (64, 4), "Reference": (64, 4)}

#: Objects a forked child inherited from its parent and must never destroy (see
#: :meth:`EnergyBridge._reset_process_state`).
_INHERITED: list = []

_OPEN_BRIDGES: "weakref.WeakSet[EnergyBridge]" = weakref.WeakSet()


@atexit.register
def _close_open_bridges() -> None:
    for bridge in list(_OPEN_BRIDGES):
        bridge.close()


def _after_fork_in_child() -> None:
    """A forked child gets fresh per-process state in every open bridge at once, before any
    inherited Context could be destroyed (OpenMM Contexts do not survive fork)."""
    for bridge in list(_OPEN_BRIDGES):
        bridge._check_fork()


os.register_at_fork(after_in_child=_after_fork_in_child)


def _fastest_platform(system: openmm.System, probe_nm: np.ndarray, candidates) -> str:
    """The candidate platform whose single-molecule Context evaluates ``probe_nm`` fastest."""
    batch = np.repeat(probe_nm[None], 8, axis=0)
    best, best_s = candidates[0], float("inf")
    for name in candidates:
        kernel = SingleKernel(system, name, openmm_platform(name, threads=1)[1])
        kernel(batch[:2])
        start = time.perf_counter()
        kernel(batch)
        elapsed = time.perf_counter() - start
        if elapsed < best_s:
            best, best_s = name, elapsed
    return best


class EnergyBridge:
    """Energies and forces of batches of configurations of one molecule, computed by OpenMM.

    Thread-safe (calls are serialised), fork-safe (a forked child starts its own workers and
    Contexts and never touches, stops or destroys its parent's), and a context manager;
    :meth:`close` stops the worker processes, which also stop by themselves when this process
    dies. Workers start at the first batch of ``min_pool_batch`` or more configurations.
    OpenMM itself requires a child made by a bare ``os.fork`` to leave with ``os._exit`` (as
    multiprocessing's children do): its Contexts' static state aborts a normal exit there.

    Args:
        system: the molecule: a :class:`~trademd.systems.MolecularSystem` or a single-molecule
            ``openmm.System``.
        platform: ``auto`` (CUDA if available, else OpenCL on a GPU, else the fastest
            CPU-side platform), ``CPU``, ``CUDA``, ``OpenCL`` or ``Reference``: the OpenMM
            platform of the evaluating Contexts.
        workers: worker processes besides this one, which evaluates its own share of every
            batch (default: usable cores - 1 on CPU platforms, under torchrun the rank's
            share of them - 1; none on CUDA and OpenCL; 0 evaluates everything in this
            process).
        kernel: ``auto``, ``single`` (single-molecule Contexts) or ``replicated`` (per-copy
            replicated Contexts of ``copies`` copies). ``auto`` is ``replicated`` on CUDA and
            OpenCL, ``single`` elsewhere; ``single`` with a GPU platform runs the
            single-molecule Contexts on the CPU side.
        copies: copies per replicated Context (default: measured optimum per platform/solvent).
            A Context the platform refuses to build (CUDA's kernel-argument limit) is retried
            with half as many copies, with a warning; :attr:`copies` says what is used.
        molecule_radius_nm: the largest atom-centroid distance (nm) a replicated Context
            accepts; default max(1.0, twice the reference structure's).
        min_pool_batch: smaller batches are evaluated in this process (no inter-process
            latency).

    Example:
        >>> from trademd.systems import get_system
        >>> with EnergyBridge(get_system("ala2-vacuum"), workers=0) as bridge:
        ...     x = torch.tensor(get_system("ala2-vacuum").positions_nm())[None]
        ...     energy_kj_mol, forces_kj_mol_nm = bridge.evaluate(x)
        >>> energy_kj_mol.shape, forces_kj_mol_nm.shape
        (torch.Size([1]), torch.Size([1, 22, 3]))
    """

    def __init__(self, system, platform: str = "auto", workers: int | None = None,
                 kernel: str = "auto", copies: int | None = None,
                 molecule_radius_nm: float | None = None, min_pool_batch: int = 32):
        openmm_system, reference_nm = _as_openmm_system(system)
        if kernel not in KERNEL_CHOICES:
            raise TradeMDError(f"unknown kernel {kernel!r}: choose one of {list(KERNEL_CHOICES)}")
        if workers is not None and workers < 0:
            raise TradeMDError(f"workers must be 0 or more, got {workers}")
        resolved = resolve_platform(platform)  # a one-line error if unknown or not available
        gpu = resolved in GPU_PLATFORMS
        platform_name = resolved if gpu or platform != "auto" else "auto"
        has_gb = any(isinstance(f, (openmm.GBSAOBCForce, openmm.CustomGBForce))
                     for f in openmm_system.getForces())
        self.kernel = kernel if kernel != "auto" else ("replicated" if gpu else "single")
        if gpu and self.kernel == "single":  # single-molecule Contexts run on the CPU side
            gpu, platform_name = False, "auto"
        if platform_name == "auto":
            platform_name = (
                _fastest_platform(openmm_system, reference_nm, ("Reference", "CPU"))
                if self.kernel == "single" else "CPU"
            )
        self.platform = platform_name
        self.n_atoms = openmm_system.getNumParticles()
        if workers and not WORKERS_SUPPORTED:
            raise TradeMDError("energy worker processes need a POSIX system (Linux, macOS): use workers=0")
        # the cores of this process, or its share of them when torchrun ranks run side by side
        default_workers = 0 if gpu or not WORKERS_SUPPORTED else cpu_share(ranks_from_environment()) - 1
        self.n_workers = default_workers if workers is None else workers
        self.copies = copies or _COPIES[platform_name][int(has_gb)]
        if self.copies < 1:
            raise TradeMDError(f"copies must be at least 1, got {self.copies}")
        radius_nm = np.sqrt(((reference_nm - reference_nm.mean(0)) ** 2).sum(1)).max()
        self.molecule_radius_nm = molecule_radius_nm or max(1.0, 2.0 * float(radius_nm))
        self.min_pool_batch = min_pool_batch
        #: Configurations given U = +inf and F = 0 so far (non-finite or overflowing results).
        self.n_overflow = 0
        self._spec: KernelSpec = {
            "kind": self.kernel,
            "system_xml": openmm.XmlSerializer.serialize(openmm_system),
            "platform": platform_name,
            # double precision on GPUs: copies sit tens of nm apart, where mixed precision's
            # float32 positions lose accuracy (docs/performance.md)
            "properties": openmm_platform(platform_name, threads=1, precision="double")[1],
            "n_copies": self.copies,
            "molecule_radius_nm": self.molecule_radius_nm,
        }
        self._closed = False
        self._reset_process_state()
        self._local = self._first_kernel(reference_nm)  # fails early, with OpenMM's reason
        _OPEN_BRIDGES.add(self)

    def _first_kernel(self, reference_nm: np.ndarray):
        """The in-process kernel, checked on the reference structure. A replicated Context
        the platform cannot build or run (CUDA's kernel-argument space overflowed at 512
        vacuum copies) is retried with half as many copies, down to one; any other failure
        raises OpenMM's own error."""
        while True:
            try:
                kernel = build_kernel(self._spec)
                if self.kernel != "replicated" or np.isfinite(kernel(reference_nm[None])[0]).all():
                    return kernel
                reason = "the reference structure's energy was not finite"
            except openmm.OpenMMException as error:
                if self.kernel != "replicated" or self.copies == 1:
                    raise
                reason = str(error).strip().splitlines()[0]
            if self.copies == 1:
                raise TradeMDError(f"the replicated OpenMM Context on {self.platform} failed "
                                   f"({reason}): use kernel='single'")
            tried, self.copies = self.copies, max(1, self.copies // 2)
            self._spec["n_copies"] = self.copies
            warnings.warn(f"OpenMM could not run {tried} copies per Context on "
                          f"{self.platform} ({reason}): using {self.copies}", stacklevel=3)

    def __repr__(self) -> str:
        return (f"EnergyBridge(kernel={self.kernel!r}, platform={self.platform!r}, "
                f"workers={self.n_workers}, copies={self.copies}, atoms={self.n_atoms})")

    # -- process bookkeeping ------------------------------------------------------------------

    def _reset_process_state(self) -> None:
        """Forget everything tied to a process: the pool, the in-process kernel, the lock.

        In a forked child the parent's OpenMM Contexts must not be destroyed (their
        destructors crash there), so they are kept, unused, in :data:`_INHERITED`."""
        if getattr(self, "_local", None) is not None or getattr(self, "_pool", None) is not None:
            _INHERITED.append((self._local, self._pool))
        self._pid = os.getpid()
        self._lock = threading.Lock()
        self._pool: WorkerPool | None = None
        self._local = None

    def _check_fork(self) -> None:
        if os.getpid() != self._pid:  # a forked child: the workers and Contexts are the parent's
            self._reset_process_state()

    @property
    def worker_pids(self) -> list[int]:
        """Process ids of the running worker processes (empty before the first pooled batch)."""
        pool = self._pool
        return pool.pids if pool is not None and not pool.closed else []

    def close(self) -> None:
        """Stop the worker processes and free the Contexts. Safe to call more than once."""
        if os.getpid() != self._pid:  # inherited by fork: the workers are not ours to stop
            self._closed = True
            return
        with self._lock:
            self._closed = True
            if self._pool is not None:
                self._pool.close()
                self._pool = None
            self._local = None
        _OPEN_BRIDGES.discard(self)

    def __enter__(self) -> "EnergyBridge":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        try:
            if not self._closed and self._pool is not None and os.getpid() == self._pid:
                self._pool.close()
        except Exception:
            pass

    # -- evaluation ---------------------------------------------------------------------------

    def evaluate_numpy(self, positions_nm: np.ndarray, dtype=np.float64) -> tuple[np.ndarray, np.ndarray]:
        """Energies and forces of configurations given as a NumPy array.

        Args:
            positions_nm: [B, atoms, 3] in nm.
            dtype: the precision the results must fit (float32 or float64); a result that is
                not finite in it counts as an overflow.

        Returns:
            (energy_kj_mol float64 [B], forces_kj_mol_nm float64 [B, atoms, 3]); overflowing
            configurations have energy +inf and zero forces.
        """
        positions_nm = self._checked_positions(positions_nm)
        self._check_fork()
        with self._lock:
            if self._closed:
                raise TradeMDError("this EnergyBridge is closed: create a new one")
            if len(positions_nm) == 0:
                energies, forces = np.empty(0), np.empty_like(positions_nm)
            elif self._pooled(len(positions_nm)):
                if self._pool is None or self._pool.closed:
                    self._pool = WorkerPool(self._spec, self.n_workers)
                if self._local is None:
                    self._local = build_kernel(self._spec)
                whole = self.copies if self.kernel == "replicated" else 8
                energies, forces = self._pool.evaluate(
                    positions_nm, self._chunk_size(len(positions_nm)), local=self._local,
                    local_chunk=whole, min_chunk=whole,
                )
            else:
                if self._local is None:
                    self._local = build_kernel(self._spec)
                energies, forces = self._local(positions_nm)
            bad = _overflowing(energies, forces, np.finfo(dtype).max)
            energies[bad] = np.inf
            forces[bad] = 0.0
            self.n_overflow += int(bad.sum())
        return energies, forces

    def _pooled(self, batch: int) -> bool:
        """Whether a batch goes to the worker processes: large enough, and not inside a
        daemonic process (a DataLoader worker), which may not have children."""
        if self.n_workers == 0 or batch < self.min_pool_batch:
            return False
        return not multiprocessing.current_process().daemon

    def _chunk_size(self, batch: int) -> int:
        """The largest chunk a worker gets (chunks shrink as a batch runs out): a quarter of
        a fair share, whole replicated Contexts."""
        size = max(8, -(-batch // (4 * (self.n_workers + 1))))
        if self.kernel == "replicated":
            size = -(-size // self.copies) * self.copies
        return size

    def _checked_positions(self, positions_nm) -> np.ndarray:
        positions_nm = np.asarray(positions_nm)
        if positions_nm.ndim != 3 or positions_nm.shape[1:] != (self.n_atoms, 3):
            raise TradeMDError(
                f"positions must have shape [batch, {self.n_atoms}, 3] (nm), got {list(positions_nm.shape)}"
            )
        if not np.issubdtype(positions_nm.dtype, np.floating):
            raise TradeMDError(f"positions must be floating point (nm), got {positions_nm.dtype}")
        finite = np.isfinite(positions_nm).all(axis=(1, 2))
        if not finite.all():
            bad = np.flatnonzero(~finite)
            raise TradeMDError(
                f"{len(bad)} of {len(positions_nm)} configurations hold NaN or infinite coordinates "
                f"(first: index {bad[0]}): the model produced invalid positions; check it or "
                "filter them before asking for energies"
            )
        return np.ascontiguousarray(positions_nm, dtype=np.float64)

    def evaluate(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Energies and forces of a batch of configurations (no gradient tracking).

        Args:
            x: positions [B, atoms, 3] in nm, float32 or float64, on any device.

        Returns:
            (energy_kj_mol [B], forces_kj_mol_nm [B, atoms, 3]) of x's dtype and device.
        """
        if not isinstance(x, torch.Tensor):
            raise TradeMDError(f"positions must be a torch tensor, got {type(x).__name__}")
        if x.dtype not in (torch.float32, torch.float64):
            raise TradeMDError(f"positions must be float32 or float64, got {x.dtype}")
        numpy_dtype = np.float32 if x.dtype == torch.float32 else np.float64
        energies, forces = self.evaluate_numpy(x.detach().cpu().numpy(), dtype=numpy_dtype)
        # NumPy casts: torch's own float64 -> float32 copy costs milliseconds per batch here.
        return (
            torch.from_numpy(energies.astype(numpy_dtype, copy=False)).to(x.device),
            torch.from_numpy(forces.astype(numpy_dtype, copy=False)).to(x.device),
        )

    def potential_energy(self, x: torch.Tensor) -> torch.Tensor:
        """U(x) [B] in kJ/mol, differentiable: dU/dx = -F. See :func:`potential_energy`."""
        return potential_energy(x, self)

    def reduced_energy(self, x: torch.Tensor, temperature_k) -> torch.Tensor:
        """u = U(x) / (k_B T) [B], differentiable in x (and in T if it requires grad).

        Args:
            x: positions [B, atoms, 3] in nm.
            temperature_k: temperature in K, a number or a tensor [B] (one per sample).
        """
        temperature_k = torch.as_tensor(temperature_k, dtype=x.dtype, device=x.device)
        if temperature_k.ndim == 0:
            temperature_k = temperature_k.expand(x.shape[0])
        if temperature_k.shape != (x.shape[0],):
            raise TradeMDError(
                f"temperature_k must be a number or have shape [{x.shape[0]}] (one per sample), "
                f"got {list(temperature_k.shape)}"
            )
        if not bool(torch.all(torch.isfinite(temperature_k) & (temperature_k > 0))):
            raise TradeMDError("temperatures must be positive and finite (kelvin)")
        return potential_energy(x, self) / (BOLTZMANN_KJ_MOL_K * temperature_k)


def _as_openmm_system(system) -> tuple[openmm.System, np.ndarray]:
    """(single-molecule system, reference positions float64 [atoms, 3] nm) of ``system``."""
    if hasattr(system, "create_openmm_system"):
        return system.create_openmm_system(), np.asarray(system.positions_nm(), dtype=np.float64)
    if isinstance(system, openmm.System):
        if system.getNumParticles() == 0:
            raise TradeMDError("the OpenMM system has no particles: give a molecule")
        return system, probe_positions_nm(system.getNumParticles())
    raise TradeMDError(
        f"expected a MolecularSystem or an openmm.System, got {type(system).__name__}"
    )


def _overflowing(energies: np.ndarray, forces: np.ndarray, largest: float) -> np.ndarray:
    """bool [B]: results that are not finite, or too large for the output precision."""
    with np.errstate(invalid="ignore"):
        energy_ok = np.isfinite(energies) & (np.abs(energies) <= largest)
        force_ok = np.isfinite(forces).all(axis=(1, 2)) & (np.abs(forces).max(axis=(1, 2), initial=0.0) <= largest)
    return ~(energy_ok & force_ok)


class _PotentialEnergy(torch.autograd.Function):
    """U(x) with the OpenMM forces as its gradient: dU/dx = -F."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, bridge: EnergyBridge) -> torch.Tensor:
        energy_kj_mol, forces_kj_mol_nm = bridge.evaluate(x)
        ctx.save_for_backward(forces_kj_mol_nm)
        return energy_kj_mol

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_energy: torch.Tensor):
        (forces_kj_mol_nm,) = ctx.saved_tensors
        return -grad_energy[:, None, None] * forces_kj_mol_nm, None


def potential_energy(x: torch.Tensor, bridge: EnergyBridge) -> torch.Tensor:
    """Potential energy U(x) [B] in kJ/mol of positions x [B, atoms, 3] in nm, as a torch
    operation whose gradient is -F (first derivatives only). Overflowing configurations give
    +inf with zero gradient."""
    return _PotentialEnergy.apply(x, bridge)

"""OpenMM kernels that evaluate many configurations, and a pool of worker processes running them.

A *kernel* turns positions float64 [n, atoms, 3] (nm) into energies float64 [n] (kJ/mol) and
forces float64 [n, atoms, 3] (kJ/mol/nm), exactly as a single-molecule Context would:

- :class:`SingleKernel`: one single-molecule Context, one configuration at a time (the
  reference computation);
- :class:`ReplicatedKernel`: ``n_copies`` non-interacting copies in one Context
  (:mod:`trademd.energy.copies`, ``per_copy_energies=True``), copy c's energy read as
  dU/dlam_c; configurations too extended for the lattice go to a :class:`SingleKernel`.

:class:`WorkerPool` runs one kernel per worker process (a fresh interpreter, one OpenMM thread
each) and hands out chunks of a batch as workers become free; positions, energies and forces
travel through shared memory (:class:`SharedBatch`), the sockets to the workers carry only
index ranges. Workers ignore Ctrl-C, stop on request, and exit by themselves when the parent
process dies (their socket closes or their parent process id changes). They are started with
:mod:`subprocess`, not :mod:`multiprocessing`, so that multiprocessing's exit handler never
sees them: in a child forked from the pool's process (which inherits whatever multiprocessing
knows of its parent's children) it could otherwise terminate the parent's workers at exit.
This module imports no torch, so workers start quickly.
"""

import mmap
from multiprocessing.connection import wait
import os
import pickle
import socket
import struct
import subprocess
import sys
import tempfile
import time

import numpy as np
import openmm
from openmm import unit

from trademd.errors import TradeMDError
from trademd.energy.copies import SUPPORTED_FORCES, copy_energy_parameter, replicate_system

__all__ = [
    "KernelSpec",
    "SingleKernel",
    "ReplicatedKernel",
    "build_kernel",
    "probe_positions_nm",
    "WorkerPool",
    "WORKERS_SUPPORTED",
]

#: Forces whose energy does not change when the whole molecule is translated: positions of
#: systems made only of these are centred (in float64) before OpenMM sees them, so that large
#: absolute coordinates lose no precision on single-precision platforms.
_TRANSLATION_INVARIANT_FORCES = (
    *SUPPORTED_FORCES,
    "CustomBondForce",
    "CustomAngleForce",
    "CustomTorsionForce",
    "CustomGBForce",
)

#: Seconds a worker waits for a request before checking that its parent is still alive.
_PARENT_CHECK_S = 1.0
#: Seconds the pool waits for workers to start, and for them to stop before killing them.
_START_TIMEOUT_S = 120.0
_STOP_TIMEOUT_S = 3.0

KernelSpec = dict
"""What a worker needs to build its kernel (picklable): ``kind`` ("single" or "replicated"),
``system_xml`` (XmlSerializer text), ``platform`` (OpenMM platform name), ``properties``
(platform properties), and for "replicated" ``n_copies`` and ``molecule_radius_nm``."""


def probe_positions_nm(n_atoms: int, spacing_nm: float = 0.3) -> np.ndarray:
    """Atoms on a cubic grid ``spacing_nm`` apart, each moved by up to 0.05 nm (fixed seed)
    so that no three are collinear: a configuration with finite energy and forces for any
    system (for timing and checks), float64 [n_atoms, 3] in nm."""
    side = max(1, int(np.ceil(n_atoms ** (1.0 / 3.0) - 1e-9)))
    index = np.arange(n_atoms)
    grid = np.stack([index % side, (index // side) % side, index // (side * side)], axis=1)
    jitter = np.random.default_rng(0).uniform(-0.05, 0.05, size=(n_atoms, 3))
    return grid.astype(np.float64) * spacing_nm + jitter


def _is_translation_invariant(system: openmm.System) -> bool:
    return all(type(f).__name__ in _TRANSLATION_INVARIANT_FORCES for f in system.getForces())


_KJ_MOL = unit.kilojoule_per_mole
_KJ_MOL_NM = unit.kilojoule_per_mole / unit.nanometer


def _evaluate(context: openmm.Context, positions_nm: np.ndarray, forces_out: np.ndarray) -> float:
    """Potential energy (kJ/mol) at ``positions_nm`` [atoms, 3]; forces (kJ/mol/nm) written
    into ``forces_out`` float64 [atoms, 3]."""
    context.setPositions(positions_nm)
    state = context.getState(getEnergy=True, getForces=True)
    forces_out[...] = state.getForces(asNumpy=True).value_in_unit(_KJ_MOL_NM)
    return state.getPotentialEnergy().value_in_unit(_KJ_MOL)


class SingleKernel:
    """One single-molecule Context evaluating configurations one after another.

    Args:
        system: the single-molecule OpenMM system.
        platform: OpenMM platform name (``Reference``, ``CPU``, ``CUDA``).
        properties: platform properties (``{"Threads": "1"}`` for CPU).
    """

    def __init__(self, system: openmm.System, platform: str, properties: dict | None = None):
        self.n_atoms = system.getNumParticles()
        self.platform = platform
        self._centre = _is_translation_invariant(system)
        self._context = openmm.Context(
            system, openmm.VerletIntegrator(0.001), openmm.Platform.getPlatformByName(platform),
            dict(properties or {}),
        )

    def __call__(self, positions_nm: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Energies float64 [n] (kJ/mol) and forces float64 [n, atoms, 3] (kJ/mol/nm) of
        positions float64 [n, atoms, 3] (nm). A configuration OpenMM refuses gets NaN."""
        positions_nm = np.asarray(positions_nm, dtype=np.float64)
        if self._centre:
            positions_nm = positions_nm - positions_nm.mean(axis=1, keepdims=True)
        energies = np.empty(len(positions_nm))
        forces = np.empty_like(positions_nm)
        for k, x in enumerate(positions_nm):
            try:
                energies[k] = _evaluate(self._context, x, forces[k])
            except openmm.OpenMMException:
                energies[k] = np.nan
                forces[k] = np.nan
        return energies, forces


class ReplicatedKernel:
    """``n_copies`` configurations per OpenMM evaluation, in one replicated Context.

    Each copy's energy is dE/dlam_c of the per-copy system; each copy's forces are its atoms'
    forces (copies never interact). A configuration with an atom farther than
    ``layout.max_radius_nm`` from its centroid could reach another copy's cutoff, so it is
    evaluated by a :class:`SingleKernel` on the same platform instead. A partly filled last
    chunk is padded with copies of its first configuration, whose results are dropped.

    Args:
        system: the single-molecule OpenMM system (forces as :mod:`trademd.energy.copies` supports).
        n_copies: copies per evaluation.
        platform: OpenMM platform name.
        properties: platform properties.
        molecule_radius_nm: the largest atom-centroid distance the lattice tolerates (nm).
    """

    def __init__(self, system: openmm.System, n_copies: int, platform: str,
                 properties: dict | None = None, molecule_radius_nm: float = 1.0):
        replicated, self.layout = replicate_system(
            system, n_copies, per_copy_energies=True, molecule_radius_nm=molecule_radius_nm
        )
        self.n_atoms = system.getNumParticles()
        self.n_copies = n_copies
        self.platform = platform
        self._names = [copy_energy_parameter(c) for c in range(n_copies)]
        self._context = openmm.Context(
            replicated, openmm.VerletIntegrator(0.001),
            openmm.Platform.getPlatformByName(platform), dict(properties or {}),
        )
        self._single = SingleKernel(system, platform, properties)
        self._forces = np.empty((n_copies * self.n_atoms, 3))

    def fits(self, positions_nm: np.ndarray) -> np.ndarray:
        """bool [n]: which configurations stay within ``layout.max_radius_nm`` of their
        centroid and may go into the replicated Context."""
        centred = positions_nm - positions_nm.mean(axis=1, keepdims=True)
        radius_nm = np.sqrt((centred**2).sum(axis=2)).max(axis=1)
        return radius_nm <= self.layout.max_radius_nm

    def __call__(self, positions_nm: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Energies float64 [n] (kJ/mol) and forces float64 [n, atoms, 3] (kJ/mol/nm)."""
        positions_nm = np.asarray(positions_nm, dtype=np.float64)
        energies = np.empty(len(positions_nm))
        forces = np.empty_like(positions_nm)
        inside = self.fits(positions_nm)
        outside = np.flatnonzero(~inside)
        if len(outside):
            energies[outside], forces[outside] = self._single(positions_nm[outside])
        inside = np.flatnonzero(inside)
        for start in range(0, len(inside), self.n_copies):
            chosen = inside[start:start + self.n_copies]
            chunk = positions_nm[chosen]
            if len(chosen) < self.n_copies:
                pad = np.repeat(chunk[:1], self.n_copies - len(chosen), axis=0)
                chunk = np.concatenate([chunk, pad])
            energies[chosen], forces[chosen] = self._evaluate_chunk(chunk, len(chosen))
        return energies, forces

    def _evaluate_chunk(self, chunk_nm: np.ndarray, n_used: int):
        try:
            self._context.setPositions(self.layout.place(chunk_nm))
            state = self._context.getState(getEnergy=True, getForces=True,
                                           getParameterDerivatives=True)
        except openmm.OpenMMException:
            return np.full(n_used, np.nan), np.full((n_used, self.n_atoms, 3), np.nan)
        derivatives = state.getEnergyParameterDerivatives()
        energies = np.array([derivatives[name] for name in self._names[:n_used]])
        self._forces[...] = state.getForces(asNumpy=True).value_in_unit(_KJ_MOL_NM)
        forces = self._forces.reshape(self.n_copies, self.n_atoms, 3)[:n_used].copy()
        return energies, forces


def build_kernel(spec: KernelSpec):
    """The kernel a :data:`KernelSpec` describes (in the calling process)."""
    system = openmm.XmlSerializer.deserialize(spec["system_xml"])
    if spec["kind"] == "single":
        return SingleKernel(system, spec["platform"], spec["properties"])
    if spec["kind"] == "replicated":
        return ReplicatedKernel(system, spec["n_copies"], spec["platform"], spec["properties"],
                                spec["molecule_radius_nm"])
    raise TradeMDError(f"unknown kernel kind {spec['kind']!r}: use 'single' or 'replicated'")


class SharedBatch:
    """A batch in memory shared with the workers: positions_nm float64 [capacity, atoms, 3],
    forces_kj_mol_nm float64 [capacity, atoms, 3], energy_kj_mol float64 [capacity].

    Backed by a file in /dev/shm (or the temporary directory) that the creator unlinks as
    soon as every worker has mapped it, so nothing is left behind, whatever happens later.
    Requests and replies then carry only index ranges: no data goes through the pipes.

    Args:
        n_atoms: atoms per configuration.
        capacity: configurations it holds.
        path: an existing file to map (a worker), or None to create one (the pool).
    """

    def __init__(self, n_atoms: int, capacity: int, path: str | None = None):
        self.n_atoms, self.capacity = n_atoms, capacity
        per_copy = n_atoms * 3
        size = 8 * capacity * (2 * per_copy + 1)
        if path is None:
            directory = "/dev/shm" if os.path.isdir("/dev/shm") else None
            descriptor, path = tempfile.mkstemp(prefix="trademd-energy-", dir=directory)
            try:
                os.ftruncate(descriptor, size)
                self._map = mmap.mmap(descriptor, size)
            except BaseException:
                os.close(descriptor)
                os.unlink(path)
                raise
        else:
            descriptor = os.open(path, os.O_RDWR)
            try:
                self._map = mmap.mmap(descriptor, size)
            except BaseException:
                os.close(descriptor)
                raise
        os.close(descriptor)
        self.path = path
        values = np.frombuffer(self._map, dtype=np.float64)
        self.positions_nm = values[: capacity * per_copy].reshape(capacity, n_atoms, 3)
        self.forces_kj_mol_nm = values[capacity * per_copy: 2 * capacity * per_copy].reshape(capacity, n_atoms, 3)
        self.energy_kj_mol = values[2 * capacity * per_copy:]

    def unlink(self) -> None:
        """Remove the backing file (the mappings stay valid)."""
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass


#: Worker processes inherit their end of a socket pair by file descriptor (``pass_fds``),
#: which POSIX systems support; elsewhere (Windows) the bridge evaluates in this process only.
WORKERS_SUPPORTED = os.name == "posix"


class _Channel:
    """Picklable messages through one end of a connected socket pair, each sent as its length
    (8 bytes) and its pickle. Has ``fileno``, so :func:`multiprocessing.connection.wait`
    waits on it; the end of the connection (the other process closed it, or died) reads as
    ready, and :meth:`recv` then raises EOFError."""

    _HEADER = struct.Struct("!Q")

    def __init__(self, sock: socket.socket):
        self._socket = sock

    def fileno(self) -> int:
        return self._socket.fileno()

    def send(self, message) -> None:
        payload = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
        self._socket.sendall(self._HEADER.pack(len(payload)) + payload)

    def poll(self, timeout_s: float) -> bool:
        """Whether a message (or the end of the connection) arrives within ``timeout_s``."""
        return bool(wait([self._socket], timeout_s))

    def recv(self):
        (size,) = self._HEADER.unpack(self._read(self._HEADER.size))
        return pickle.loads(self._read(size))

    def _read(self, size: int) -> bytes:
        data = bytearray()
        while len(data) < size:
            chunk = self._socket.recv(size - len(data))
            if not chunk:
                raise EOFError("the other process closed the connection")
            data += chunk
        return bytes(data)

    def close(self) -> None:
        self._socket.close()


#: What a worker interpreter runs: Ctrl-C ignored from the start (it is the parent's to
#: handle), the parent's ``sys.path``, then :func:`_worker_main` with the file descriptor of
#: its end of the socket pair and the parent's process id.
_WORKER_COMMAND = (
    "import signal, sys; signal.signal(signal.SIGINT, signal.SIG_IGN); sys.path[:] = sys.argv[3:]; "
    "from trademd.energy.pool import _worker_main; _worker_main(int(sys.argv[1]), int(sys.argv[2]))"
)


def _next_message(conn: _Channel, parent_pid: int):
    """The next message from the parent, or None once the parent is gone (the connection
    ended, or this process was re-parented)."""
    while True:
        try:
            if conn.poll(_PARENT_CHECK_S):
                return conn.recv()
        except (EOFError, OSError):
            return None
        if os.getppid() != parent_pid:
            return None


def _worker_main(fd: int, parent_pid: int) -> None:
    """Body of a worker process, talking to the parent through the socket ``fd``: receive
    the :data:`KernelSpec`, build the kernel and answer ("ready", pid) or ("error", message);
    then serve requests until ("stop",), the end of the connection or a dead parent:
    ("map", path, capacity) maps a new :class:`SharedBatch` and answers ("mapped",);
    ("eval", start, stop) evaluates rows [start, stop) of it in place and answers
    ("ok", start, stop), or ("error", message)."""
    conn = _Channel(socket.socket(fileno=fd))
    spec = _next_message(conn, parent_pid)
    if spec is None:
        return
    try:
        kernel = build_kernel(spec)
        n_atoms = openmm.XmlSerializer.deserialize(spec["system_xml"]).getNumParticles()
    except Exception as error:  # reported to the parent, which raises TradeMDError
        conn.send(("error", f"{type(error).__name__}: {error}"))
        return
    conn.send(("ready", os.getpid()))
    batch = None
    while True:
        message = _next_message(conn, parent_pid)
        if message is None or message[0] == "stop":
            return
        try:
            if message[0] == "map":
                batch = None  # drop the old mapping before making the new one
                batch = SharedBatch(n_atoms, message[2], path=message[1])
                reply = ("mapped",)
            else:
                _, start, stop = message
                energies, forces = kernel(batch.positions_nm[start:stop])
                batch.energy_kj_mol[start:stop] = energies
                batch.forces_kj_mol_nm[start:stop] = forces
                reply = ("ok", start, stop)
        except Exception as error:
            reply = ("error", f"{type(error).__name__}: {error}")
        try:
            conn.send(reply)
        except OSError:
            return


def _exit_code(process: subprocess.Popen) -> int | None:
    """The exit status of a worker that is ending (None if it has not ended within 0.1 s)."""
    try:
        return process.wait(0.1)
    except subprocess.TimeoutExpired:
        return None


class WorkerPool:
    """Worker processes, each owning one kernel, evaluating chunks of a batch in parallel.

    Not thread-safe by itself: the owner (:class:`trademd.energy.bridge.EnergyBridge`) serialises
    calls. Any failure while a batch is in flight (a worker dying, Ctrl-C) stops the pool;
    the owner starts a fresh one on its next call.

    Args:
        spec: the kernel every worker builds.
        n_workers: number of worker processes (>= 1).
    """

    def __init__(self, spec: KernelSpec, n_workers: int):
        if n_workers < 1:
            raise TradeMDError(f"a worker pool needs at least one worker, got {n_workers}")
        self._processes: list[subprocess.Popen] = []
        self._conns: list[_Channel] = []
        self._batch: SharedBatch | None = None
        self._n_atoms = openmm.XmlSerializer.deserialize(spec["system_xml"]).getNumParticles()
        self.closed = False
        try:
            for _ in range(n_workers):
                parent_end, child_end = socket.socketpair()
                with child_end:
                    try:
                        process = subprocess.Popen(
                            [sys.executable, "-c", _WORKER_COMMAND, str(child_end.fileno()),
                             str(os.getpid()), *sys.path],
                            pass_fds=(child_end.fileno(),),
                        )
                    except BaseException:
                        parent_end.close()
                        raise
                self._processes.append(process)
                self._conns.append(_Channel(parent_end))
            for conn in self._conns:
                try:
                    conn.send(spec)
                except OSError:
                    pass  # the worker is dead already: reported while waiting for it below
            deadline = time.monotonic() + _START_TIMEOUT_S
            for conn, process in zip(self._conns, self._processes):
                reply = self._receive(conn, process, deadline - time.monotonic(), "starting")
                if reply[0] != "ready":
                    raise TradeMDError(f"an energy worker could not build its OpenMM kernel: {reply[1]}")
        except BaseException:
            self.close()
            raise

    @property
    def pids(self) -> list[int]:
        """Process ids of the workers."""
        return [p.pid for p in self._processes]

    @property
    def n_workers(self) -> int:
        return len(self._processes)

    def _receive(self, conn: _Channel, process: subprocess.Popen, timeout_s: float, doing: str):
        if not conn.poll(max(timeout_s, 0.0)):
            raise TradeMDError(f"an energy worker did not answer while {doing} within "
                               f"{timeout_s:.0f} s: the machine may be overloaded")
        try:
            return conn.recv()
        except (EOFError, OSError):  # the connection ended: the worker died
            pass
        raise TradeMDError(
            f"an energy worker process died while {doing} (exit code {_exit_code(process)}): "
            "it may have run out of memory or been killed; the pool restarts on the next call"
        )

    def _shared_batch(self, n: int) -> SharedBatch:
        """A :class:`SharedBatch` of at least ``n`` configurations that every worker maps."""
        if self._batch is not None and self._batch.capacity >= n:
            return self._batch
        capacity = max(n, 2 * self._batch.capacity if self._batch is not None else 256)
        self._batch = None
        batch = SharedBatch(self._n_atoms, capacity)
        try:
            for conn in self._conns:
                conn.send(("map", batch.path, capacity))
            for conn, process in zip(self._conns, self._processes):
                reply = self._receive(conn, process, _START_TIMEOUT_S, "mapping shared memory")
                if reply[0] != "mapped":
                    raise TradeMDError(f"an energy worker could not map shared memory: {reply[1]}")
        finally:
            batch.unlink()
        self._batch = batch
        return batch

    def evaluate(self, positions_nm: np.ndarray, max_chunk: int, local=None,
                 local_chunk: int = 8, min_chunk: int = 8) -> tuple[np.ndarray, np.ndarray]:
        """Energies float64 [n] and forces float64 [n, atoms, 3] of positions float64
        [n, atoms, 3].

        Workers take chunks from the front of the batch, two at a time so that the next one
        is already waiting when a worker finishes (no idle round trip). Chunks shrink as the
        batch runs out (guided scheduling: a share of what is left, between ``min_chunk`` and
        ``max_chunk``), so all finish together. With a ``local`` kernel this process works
        too, on pieces of ``local_chunk`` from the back, handing out chunks between pieces;
        the two ends meet wherever the actual speeds (a shared machine) put them.
        """
        if self.closed:
            raise TradeMDError("the energy worker pool is closed")
        n = len(positions_nm)
        try:
            batch = self._shared_batch(n)
            batch.positions_nm[:n] = positions_nm
            front, back = 0, n  # workers take [front, ...), this process takes [..., back)
            sharers = self.n_workers + (local is not None)
            in_flight = {conn: 0 for conn in self._conns}  # requests sent, not yet answered
            process_of = dict(zip(self._conns, self._processes))

            def hand_out(conn) -> None:
                nonlocal front
                size = min(max_chunk, max(min_chunk, (back - front) // (2 * sharers)))
                if size > min_chunk:
                    size -= size % min_chunk  # whole replicated Contexts
                stop = min(front + max(size, 1), back)
                conn.send(("eval", front, stop))
                in_flight[conn] += 1
                front = stop

            for _ in range(2):
                for conn in self._conns:
                    if front < back:
                        hand_out(conn)
            while front < back or any(in_flight.values()):
                working_here = local is not None and front < back
                busy = [c for c in self._conns if in_flight[c]]
                # a worker that died is ready too: its connection has ended
                ready = wait(busy, timeout=0 if working_here else None)
                for conn in busy:
                    if conn not in ready:
                        continue
                    reply = self._receive(conn, process_of[conn], _START_TIMEOUT_S, "evaluating")
                    if reply[0] != "ok":
                        raise TradeMDError(f"OpenMM failed in an energy worker: {reply[1]}")
                    in_flight[conn] -= 1
                    if front < back:
                        hand_out(conn)
                if working_here and front < back:
                    start = max(back - local_chunk, front)
                    energies, forces = local(positions_nm[start:back])
                    batch.energy_kj_mol[start:back] = energies
                    batch.forces_kj_mol_nm[start:back] = forces
                    back = start
            return batch.energy_kj_mol[:n].copy(), batch.forces_kj_mol_nm[:n].copy()
        except (OSError, EOFError) as error:  # a pipe to a dead worker
            self.close()
            raise TradeMDError(
                f"an energy worker process died ({type(error).__name__}): it may have run out "
                "of memory or been killed; the pool restarts on the next call"
            ) from None
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Stop the workers (asking first, then terminating, then killing) and reap them."""
        self.closed = True
        for conn in self._conns:
            try:
                conn.send(("stop",))
            except (OSError, ValueError):
                pass
        deadline = time.monotonic() + _STOP_TIMEOUT_S
        for process in self._processes:
            try:
                process.wait(max(deadline - time.monotonic(), 0.0))
            except subprocess.TimeoutExpired:
                pass
        for process in self._processes:
            for stop in (process.terminate, process.kill):
                if process.poll() is None:
                    stop()
                    try:
                        process.wait(1.0)
                    except subprocess.TimeoutExpired:
                        pass
        for conn in self._conns:
            conn.close()
        self._conns, self._processes, self._batch = [], [], None

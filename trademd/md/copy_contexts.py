"""Copies of one molecule in one or several OpenMM Contexts, stepped side by side.

The MD engines of :mod:`trademd.md.engines` run ``n_copies`` non-interacting copies of a
molecule (:mod:`trademd.energy.copies`). On a GPU they all sit in one Context, which is what
fills the device. On the CPU platform one Context with two threads is slower than two Contexts
of half the copies with one thread each, stepped at the same time in two Python threads
(OpenMM releases the GIL while it steps): 1.35x on alanine dipeptide in implicit solvent,
docs/performance.md. :class:`CopyContexts` hides the split: positions, velocities and
per-copy integrator variables are read and written for all copies in copy order, whatever
the number of Contexts ("parts").

Checkpoints: with one part, OpenMM's own checkpoint and State XML (what older files hold);
with several, one container of the parts' checkpoints and a JSON list of their State XMLs.
A checkpoint loads into the same number of parts on the same platform; otherwise the States
give every copy's positions and velocities, which go into any split.
"""

from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
import json
import os
from typing import Callable

import numpy as np
import openmm
from openmm import unit

from trademd.energy.copies import CopyLayout, replicate_system
from trademd.energy.structure import minimised_positions
from trademd.md.settings import COM_RESTRAINT_NM, MOLECULE_RADIUS_NM
from trademd.platforms import openmm_platform, resolve_platform

__all__ = ["CopyContexts", "part_sizes", "openmm_seed"]

_PARTS_MAGIC = b"trade-md checkpoint parts\n"


def openmm_seed(seed: int, part: int = 0) -> int:
    """OpenMM's random seed for our ``seed`` and Context ``part``: never 0, which OpenMM takes
    as "choose one at random" (seed 0 would make a run unrepeatable). Part 0 keeps the seed a
    one-Context run always had; other parts get streams that no other (seed, part) shares."""
    if part:
        seed = int(np.random.SeedSequence([seed, part]).generate_state(1)[0])
    return seed % (2 ** 31 - 1) + 1


def part_sizes(n_copies: int, platform_name: str, cpu_threads: int | None, parallel: bool = True) -> list[int]:
    """Copies per Context: one Context on GPU platforms (and the Reference platform) or when
    not ``parallel``; on the CPU platform one Context per thread (``cpu_threads``, None: all
    cores), at most one per copy, the copies split as evenly as contiguous ranges allow."""
    n_parts = 1
    if platform_name == "CPU" and parallel:
        n_parts = max(1, min(n_copies, cpu_threads or os.cpu_count() or 1))
    base, extra = divmod(n_copies, n_parts)
    return [base + (1 if p < extra else 0) for p in range(n_parts)]


class CopyContexts:
    """``n_copies`` copies of ``system`` in the Contexts :func:`part_sizes` chooses, each a
    replicated system (copies on a lattice, centre-of-mass restraints) with its own integrator.

    Args:
        system: the single-molecule OpenMM system.
        n_copies: copies in all.
        make_integrator: builds one integrator (called once per part).
        platform: OpenMM platform name (``auto`` resolved here).
        seed: random seed of the integrators (part p gets :func:`openmm_seed` (seed, p)).
        cpu_threads: CPU threads in all (None: all cores); several parts get one each.
        parallel: False keeps all copies in one Context. A CustomIntegrator must: on the CPU
            platform it draws its random numbers from one stream per process, which Contexts
            stepping at the same time would share (runs would not repeat, and the stream is not
            made for threads); LangevinMiddleIntegrator has a stream per Context.
    """

    def __init__(self, system: openmm.System, n_copies: int, make_integrator: Callable[[], openmm.Integrator],
                 platform: str, seed: int, cpu_threads: int | None = None, parallel: bool = True):
        self.platform_name = resolve_platform(platform)
        self.system = system
        self.sizes = part_sizes(n_copies, self.platform_name, cpu_threads, parallel)
        threads = 1 if len(self.sizes) > 1 else cpu_threads
        chosen, properties = openmm_platform(self.platform_name, threads=threads)
        self.layouts: list[CopyLayout] = []
        self.integrators: list[openmm.Integrator] = []
        self.contexts: list[openmm.Context] = []
        for part, size in enumerate(self.sizes):
            replicated, layout = replicate_system(system, size, per_copy_energies=False,
                                                  molecule_radius_nm=MOLECULE_RADIUS_NM,
                                                  com_restraint_nm=COM_RESTRAINT_NM)
            integrator = make_integrator()
            integrator.setRandomNumberSeed(openmm_seed(seed, part))
            self.layouts.append(layout)
            self.integrators.append(integrator)
            self.contexts.append(openmm.Context(replicated, integrator, chosen, properties))
        self.n_copies = n_copies
        self.n_atoms = system.getNumParticles()
        self._starts = np.cumsum([0] + self.sizes)
        self._pool = ThreadPoolExecutor(len(self.sizes)) if len(self.sizes) > 1 else None

    def _per_part(self, values: np.ndarray) -> list[np.ndarray]:
        """Split an array over copies (first axis) into the parts' ranges."""
        return [values[a:b] for a, b in zip(self._starts[:-1], self._starts[1:])]

    def step(self, n_steps: int) -> None:
        """``n_steps`` of every part's integrator, the parts at the same time."""
        if self._pool is None:
            self.integrators[0].step(n_steps)
        else:
            list(self._pool.map(lambda integrator: integrator.step(n_steps), self.integrators))

    def place_minimised(self, positions_nm: np.ndarray) -> None:
        """Minimise one molecule on the CPU and put every copy there: identical copies that
        never interact minimise identically, and OpenMM's minimiser kernel crashed under
        OpenCL on pocl (docs/performance.md)."""
        minimised_nm = minimised_positions(self.system, positions_nm, tolerance_kj_mol_nm=10.0,
                                           max_iterations=1000)
        for context, layout in zip(self.contexts, self.layouts):
            context.setPositions(layout.place(np.repeat(minimised_nm[None], layout.n_copies, axis=0)))

    def set_velocities_to_temperature(self, temperature_k: float, seed: int) -> None:
        """Maxwell-Boltzmann velocities at ``temperature_k`` (K); part p draws with
        :func:`openmm_seed` (seed, p)."""
        for part, context in enumerate(self.contexts):
            context.setVelocitiesToTemperature(temperature_k, openmm_seed(seed, part))

    def offsets_nm(self) -> np.ndarray:
        """Each copy's positions relative to its lattice point [copies, atoms, 3] (nm)."""
        return np.concatenate([
            layout.split(context.getState(getPositions=True).getPositions(asNumpy=True)
                         .value_in_unit(unit.nanometer))
            for context, layout in zip(self.contexts, self.layouts)])

    def velocities(self) -> np.ndarray:
        """[copies, atoms, 3] in nm/ps."""
        return np.concatenate([
            context.getState(getVelocities=True).getVelocities(asNumpy=True)
            .value_in_unit(unit.nanometer / unit.picosecond).reshape(-1, self.n_atoms, 3)
            for context in self.contexts])

    def set_offsets(self, offsets_nm: np.ndarray) -> None:
        """Put copy c at its lattice point plus ``offsets_nm[c]`` ([copies, atoms, 3], nm)."""
        for context, layout, part in zip(self.contexts, self.layouts, self._per_part(offsets_nm)):
            context.setPositions((part + layout.lattice_nm()[:, None, :]).reshape(-1, 3))

    def set_velocities(self, velocities: np.ndarray) -> None:
        """Set every copy's velocities ([copies, atoms, 3], nm/ps)."""
        for context, part in zip(self.contexts, self._per_part(velocities)):
            context.setVelocities(part.reshape(-1, 3))

    def set_copy_variable(self, name: str, per_copy: np.ndarray) -> None:
        """Set the integrators' per-degree-of-freedom variable ``name`` to ``per_copy[c]`` on
        every degree of freedom of copy c."""
        for integrator, part in zip(self.integrators, self._per_part(np.asarray(per_copy, dtype=float))):
            values = np.repeat(part, self.n_atoms)
            integrator.setPerDofVariableByName(name, [openmm.Vec3(v, v, v) for v in values])

    def checkpoint(self) -> tuple[bytes, str]:
        """(OpenMM checkpoint, portable State XML) of all parts (module docstring)."""
        checkpoints = [context.createCheckpoint() for context in self.contexts]
        states = [openmm.XmlSerializer.serialize(context.getState(getPositions=True, getVelocities=True))
                  for context in self.contexts]
        if len(self.contexts) == 1:
            return checkpoints[0], states[0]
        header = json.dumps([len(c) for c in checkpoints]).encode() + b"\n"
        return _PARTS_MAGIC + header + b"".join(checkpoints), json.dumps(states)

    def restore(self, checkpoint: bytes, state_xml: str, same_platform: bool) -> None:
        """Load :meth:`checkpoint`'s output: the checkpoints where they fit these parts on the
        platform that wrote them, else every copy's positions and velocities from the States."""
        checkpoints = _split_checkpoint(checkpoint)
        if same_platform and len(checkpoints) == len(self.contexts):
            for context, part_checkpoint in zip(self.contexts, checkpoints):
                context.loadCheckpoint(part_checkpoint)
            return
        states = json.loads(state_xml) if state_xml.lstrip().startswith("[") else [state_xml]
        offsets, velocities = [], []
        for xml in states:
            state = openmm.XmlSerializer.deserialize(xml)
            positions = state.getPositions(asNumpy=True).value_in_unit(unit.nanometer)
            n_copies = len(positions) // self.n_atoms
            offsets.append(replace(self.layouts[0], n_copies=n_copies).split(positions))
            velocities.append(state.getVelocities(asNumpy=True)
                              .value_in_unit(unit.nanometer / unit.picosecond).reshape(-1, self.n_atoms, 3))
        self.set_offsets(np.concatenate(offsets))
        self.set_velocities(np.concatenate(velocities))


def _split_checkpoint(checkpoint: bytes) -> list[bytes]:
    """The parts' checkpoints in :meth:`CopyContexts.checkpoint`'s container (one: as is)."""
    if not checkpoint.startswith(_PARTS_MAGIC):
        return [checkpoint]
    header, _, body = checkpoint[len(_PARTS_MAGIC):].partition(b"\n")
    parts, start = [], 0
    for length in json.loads(header):
        parts.append(body[start:start + length])
        start += length
    return parts

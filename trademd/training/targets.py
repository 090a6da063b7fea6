"""What training needs from a physical system, in the flow's feature space z.

A target knows its Boltzmann constant, its boundary temperature T0 and data there, and turns
flow features z into reduced energies u = U / (k T) and the log-Jacobian log|dx/dz| of the map
back to configurations, so that the Boltzmann density in feature space is

    log q(z|T) = -u(x(z), T) + log|dx/dz| - log Z(T).

:class:`AnalyticTarget` wraps the analytic systems (z = x, log|dx/dz| = 0, k = 1).
:class:`MoleculeTarget` maps z through internal coordinates to Cartesian coordinates and
evaluates OpenMM energies through the energy bridge.
"""

from dataclasses import dataclass
import json
import math
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from torch import Tensor

from trademd.analysis.chirality import chirality_restraint
from trademd.energy.bridge import EnergyBridge, potential_energy
from trademd.errors import TradeMDError
from trademd.flow.coordinates import InternalCoordinates, constrained_bonds_from_openmm
from trademd.io.trajectory_file import read_trajectory
from trademd.systems import system_from_attrs
from trademd.systems.analytic import AnalyticSystem
from trademd.units import BOLTZMANN_KJ_MOL_K

__all__ = ["Target", "AnalyticTarget", "MoleculeTarget", "DataSplit", "split_frames"]


class Target(Protocol):
    """What training and sampling need from a system; every attribute is set by the
    constructor (None where a target has no such thing).

    Attributes:
        name: the system's name.
        boltzmann_k: k in the units of the energies (kJ/mol/K, or 1 for analytic systems).
        reference_temperature: T0 of the data (K or reduced units).
        n_torsions: leading periodic features of z (radians).
        n_bounded: bounded features after them.
        bounded_interval: (low, high) of the bounded features.
        data_features: training data at T0 in feature space [N, D] (None: no data).
        validation_features: held-out data at T0 [M, D] (None: none held out).
        split: how the frames of a data file were split (None: no data file).
        energy_evaluations: configurations whose energy this target has evaluated so far
            (in this process): the cost that compares with MD steps and other samplers.
    """

    name: str
    boltzmann_k: float
    reference_temperature: float
    n_torsions: int
    n_bounded: int
    bounded_interval: tuple[float, float]
    data_features: Tensor | None
    validation_features: Tensor | None
    split: "DataSplit | None"
    energy_evaluations: int

    def reduced_energy(self, z: Tensor, temperature: Tensor,
                       chirality_restraint_kt: float = 0.0) -> tuple[Tensor, Tensor]:
        """(u [B], log|dx/dz| [B]) of features z [B, D] at temperatures [B]; differentiable."""

    def record(self) -> dict:
        """What a model file stores to rebuild this target."""

    def close(self) -> None:
        """Release what the target holds (worker processes)."""


class AnalyticTarget:
    """An analytic system as a training target: exact data at T0, energies in torch.

    Args:
        system: the analytic system.
        n_data: number of exact samples drawn at T0 as training data.
        seed: seed of those samples.
    """

    def __init__(self, system: AnalyticSystem, n_data: int = 20000, seed: int = 0):
        self.system = system
        self.name = system.name
        self.n_torsions = 0
        self.validation_features = None
        self.split = None
        self.boltzmann_k = system.boltzmann_k
        self.reference_temperature = system.reference_temperature
        self.energy_evaluations = 0
        self.n_bounded = system.dim
        self.bounded_interval = (-system.half_width, system.half_width)
        generator = torch.Generator().manual_seed(seed)
        self.data_features = system.sample(n_data, system.reference_temperature, generator).float()

    def reduced_energy(self, z: Tensor, temperature: Tensor,
                       chirality_restraint_kt: float = 0.0) -> tuple[Tensor, Tensor]:
        """(u [B], log|dx/dz| [B]) for features z [B, D] at temperatures [B]; differentiable.
        (No chiral centres: ``chirality_restraint_kt`` changes nothing.)"""
        energy = self.system.energy(z)
        self.energy_evaluations += len(z)
        return energy / (self.boltzmann_k * temperature), torch.zeros_like(energy)

    def record(self) -> dict:
        """What a model file stores to rebuild this target."""
        return {"kind": "analytic", "system": self.name}

    def close(self) -> None:
        """Nothing to release."""


@dataclass(frozen=True)
class DataSplit:
    """Frame indices of the training, validation and test sets (int64 arrays)."""

    train: np.ndarray
    validation: np.ndarray
    test: np.ndarray

    def to_json(self) -> str:
        return json.dumps({k: getattr(self, k).tolist() for k in ("train", "validation", "test")})


def split_frames(save_index: np.ndarray, fractions=(0.8, 0.1, 0.1)) -> DataSplit:
    """Split frames by time: within every replica the first 80 % of saves train, the next
    10 % validate, the last 10 % test, so held-out frames are not interleaved with training
    frames (correlated neighbours). Deterministic.

    Args:
        save_index: per frame, the index of its save (time order) [frames].
    """
    saves = np.unique(save_index)
    if len(saves) < 10:
        raise TradeMDError(
            f"the data file holds only {len(saves)} saves per replica: simulate longer "
            "(at least 10 saves) to split training, validation and test frames"
        )
    first_validation = saves[int(round(fractions[0] * len(saves)))]
    first_test = saves[int(round((fractions[0] + fractions[1]) * len(saves)))]
    frames = np.arange(len(save_index))
    return DataSplit(
        train=frames[save_index < first_validation],
        validation=frames[(save_index >= first_validation) & (save_index < first_test)],
        test=frames[save_index >= first_test],
    )


class MoleculeTarget:
    """A molecule as a training or sampling target.

    Features z = (torsions, normalised free bonds and angles) of
    :class:`~trademd.flow.coordinates.InternalCoordinates`; energies from OpenMM through
    :class:`~trademd.energy.bridge.EnergyBridge`. Build it from a ``trade-md simulate`` file with
    :meth:`from_trajectory` (training) or from a model file's record with :meth:`from_record`.

    Args:
        molecule: the :class:`~trademd.systems.MolecularSystem`.
        coordinates: the fitted internal-coordinate transform.
        reference_temperature: T0 of the data (K).
        platform: OpenMM platform of the energy bridge.
        workers: energy worker processes besides this one (None: cores - 1).
    """

    def __init__(self, molecule, coordinates: InternalCoordinates, reference_temperature: float,
                 platform: str = "auto", workers: int | None = None, openmm_system=None):
        self.molecule = molecule
        self.name = molecule.name
        self.boltzmann_k = BOLTZMANN_KJ_MOL_K
        self.reference_temperature = float(reference_temperature)
        self.energy_evaluations = 0
        self.coordinates = coordinates
        self.n_torsions = coordinates.n_torsions
        self.n_bounded = coordinates.n_bonded_dims
        bound = float(coordinates.bound)
        self.bounded_interval = (-bound, bound)
        self.data_features: Tensor | None = None
        self.validation_features: Tensor | None = None
        self.split: DataSplit | None = None
        self._structure_features: Tensor | None = None
        self.openmm_system = openmm_system if openmm_system is not None else molecule.create_openmm_system()
        self.bridge = EnergyBridge(self.openmm_system, platform=platform, workers=workers)

    @classmethod
    def from_trajectory(cls, data_path: str | Path, platform: str = "auto",
                        workers: int | None = None, temperature_k: float | None = None,
                        narrow_torsion_rad: float = 0.0) -> "MoleculeTarget":
        """Fit the coordinates on the training frames of a trajectory file; sets ``split``,
        ``data_features`` and ``validation_features``. ``temperature_k`` picks the ensemble
        of a replica-exchange file (required there; it becomes T0), see
        :func:`~trademd.io.trajectory_file.read_trajectory`; torsions that spread less than
        ``narrow_torsion_rad`` (rad) in the training frames become bounded features
        (:func:`~trademd.flow.coordinates.narrow_torsion_mask`)."""
        trajectory = read_trajectory(data_path, temperature_k)
        molecule = system_from_attrs(trajectory.attrs, trajectory.topology_pdb)
        n_replicas = int(trajectory.attrs.get("n_replicas", 1))
        split = split_frames(np.arange(trajectory.n_frames) // n_replicas)
        positions = torch.as_tensor(trajectory.positions_nm, dtype=torch.float64)
        system = molecule.create_openmm_system()
        coordinates = InternalCoordinates.from_data(
            molecule.zmatrix, positions[split.train], constrained_bonds_from_openmm(system),
            closures=molecule.ring_closures, narrow_torsion_rad=narrow_torsion_rad)
        target = cls(molecule, coordinates, trajectory.temperature_k, platform, workers, openmm_system=system)
        target.split = split
        target.data_features = target.features(positions[split.train])
        target.validation_features = target.features(positions[split.validation])
        return target

    @classmethod
    def from_structure(cls, molecule, temperature_k: float, platform: str = "auto",
                       workers: int | None = None) -> "MoleculeTarget":
        """A target without data (data-free training at T0 = ``temperature_k``): the features
        are centred on the minimised structure of the system's PDB and scaled by the force
        field's thermal widths at T0 (:mod:`trademd.energy.structure`), so that the flow's
        interval holds +-5 widths of every bond and angle; torsions are free."""
        from trademd.energy.structure import harmonic_widths, minimised_positions

        system = molecule.create_openmm_system()
        constraints = constrained_bonds_from_openmm(system)
        coordinates = InternalCoordinates(molecule.zmatrix, constraints, closures=molecule.ring_closures)
        reference = minimised_positions(system, molecule.positions_nm())
        widths = harmonic_widths(system, molecule.zmatrix, coordinates.free_bond_rows, temperature_k,
                                 molecule.ring_closures)
        coordinates.fit_structure(reference, widths)
        target = cls(molecule, coordinates, temperature_k, platform, workers, openmm_system=system)
        target._structure_features = target.features(torch.as_tensor(reference)[None])[0]
        return target

    @classmethod
    def from_record(cls, record: dict, reference_temperature: float, platform: str = "auto",
                    workers: int | None = None) -> "MoleculeTarget":
        """Rebuild the target a model file describes (see :meth:`record`)."""
        from trademd.systems import system_from_record

        molecule = system_from_record(record["system"], record["pdb_text"], record["forcefield_files"])
        coordinates = InternalCoordinates.from_state_dict(record["coordinates"])
        return cls(molecule, coordinates, reference_temperature, platform, workers)

    def structure_features(self) -> Tensor | None:
        """Features [D] of the system's PDB structure after OpenMM energy minimisation, the
        centre of :mod:`trademd.training.structure_prior` (computed once; None if the
        structure lies outside the normalisation range)."""
        if self._structure_features is None:
            from trademd.energy.structure import minimised_positions

            reference = minimised_positions(self.openmm_system, self.molecule.positions_nm())
            features = self.features(torch.as_tensor(reference)[None])
            self._structure_features = features[0] if len(features) else None
        return self._structure_features

    @torch.no_grad()
    def features(self, positions_nm: Tensor) -> Tensor:
        """Flow features [N, D] (float32) of configurations [N, atoms, 3]; frames outside the
        normalisation range are dropped."""
        features, _ = self.coordinates(positions_nm.to(torch.float64))
        z = torch.cat([features.torsions, features.bounded], dim=1)
        return z[~features.out_of_range].float()

    def positions(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """(x [B, atoms, 3] nm in the canonical frame, log|dx/dz| [B]) of features z [B, D]."""
        coordinates = self.coordinates.to(device=z.device)
        x, log_det = coordinates.inverse(z[:, : self.n_torsions].double(), z[:, self.n_torsions :].double())
        return x, log_det

    def reduced_energy(self, z: Tensor, temperature: Tensor,
                       chirality_restraint_kt: float = 0.0) -> tuple[Tensor, Tensor]:
        """(u = U / (k T) [B], log|dx/dz| [B]) of features z [B, D] at T [B] (K); differentiable
        in z through the OpenMM forces; +inf where the energy overflows or where z gives no
        finite configuration (a diverging flow's sample: its point then carries no weight). With
        ``chirality_restraint_kt`` > 0, u also holds that many kT per mirrored chiral centre
        (:func:`~trademd.analysis.chirality.chirality_restraint`; zero on the physical enantiomer)."""
        x, log_det = self.positions(z)
        finite = torch.isfinite(x).flatten(1).all(dim=1)
        if bool(finite.all()):
            energy_kj_mol = potential_energy(x, self.bridge)
        else:
            rows = finite.nonzero()[:, 0]
            energy_kj_mol = torch.full((len(z),), math.inf, dtype=x.dtype, device=x.device).index_put(
                (rows,), potential_energy(x[rows], self.bridge) if len(rows) else x.new_zeros(0))
        self.energy_evaluations += int(finite.sum())
        u = energy_kj_mol / (self.boltzmann_k * temperature.double())
        centres = self.molecule.chiral_centres
        if chirality_restraint_kt > 0 and len(centres):
            u = u + chirality_restraint_kt * chirality_restraint(x, centres, self.molecule.positions_nm())
        u = torch.where(finite, u, torch.full_like(u, math.inf))
        return u.to(z.dtype), log_det.to(z.dtype)

    def record(self) -> dict:
        """What a model file stores to rebuild the system and the coordinate transform."""
        return {
            "kind": "molecule",
            "system": self.name,
            "pdb_text": self.molecule.pdb_text,
            "forcefield_files": list(self.molecule.forcefield_files),
            "coordinates": self.coordinates.to("cpu").state_dict(),
        }

    def close(self) -> None:
        """Stop the energy bridge's worker processes."""
        self.bridge.close()

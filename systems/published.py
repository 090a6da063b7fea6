"""The OpenMM systems of published Boltzmann-generator benchmarks, built by openmmtools itself
(so that they are the same systems by construction, not re-parameterised look-alikes).

``openmmtools.testsystems.AlanineDipeptideImplicit`` with ``constraints=None`` is the alanine
dipeptide of FAB (Midgley et al. 2023), temperature-annealed Boltzmann generators and
constrained mass transport: Amber ff96 from openmmtools' prmtop, OBC1 implicit solvent, no
cutoff, no constraints (all 66 Cartesian coordinates, 60 internal ones, are degrees of
freedom). Its atom order and positions are those of the shipped ``alanine-dipeptide.pdb``
(tests/test_systems.py checks both against openmmtools).
"""

import openmm
from openmm import unit

from trademd.errors import TradeMDError
from trademd.progress import quiet_loggers

__all__ = ["alanine_dipeptide_openmmtools_system"]


def alanine_dipeptide_openmmtools_system(hydrogen_mass_amu: float | None = None) -> openmm.System:
    """openmmtools' ``AlanineDipeptideImplicit(constraints=None)`` as an OpenMM system
    (22 particles), hydrogens at ``hydrogen_mass_amu`` (None: the prmtop's masses)."""
    testsystems = _openmmtools_testsystems()
    hydrogen_mass = None if hydrogen_mass_amu is None else hydrogen_mass_amu * unit.amu
    return testsystems.AlanineDipeptideImplicit(constraints=None, hydrogenMass=hydrogen_mass).system


def _openmmtools_testsystems():
    """``openmmtools.testsystems``, imported without the banners its pymbar import logs."""
    try:
        with quiet_loggers("pymbar", "openmmtools"):
            from openmmtools import testsystems
    except ImportError:
        raise TradeMDError("this system is built by openmmtools, which is not installed: "
                           "pip install openmmtools") from None
    return testsystems

"""Many non-interacting copies of one small molecule in a single OpenMM ``System``.

One OpenMM ``Context`` per 22-atom molecule is dominated by per-call overhead; N copies in one
``System`` amortise it (see ``docs/performance.md``). Every force of the single-molecule system
is rewritten so that copies never interact:

- bonds, angles and torsions are replicated term by term;
- ``NonbondedForce`` (NoCutoff) becomes a ``CustomBondForce`` over all intramolecular pairs
  (exceptions for 1-2/1-3/1-4 pairs, Lorentz-Berthelot combination otherwise);
- ``GBSAOBCForce`` becomes a ``CustomGBForce`` with the same OBC2 expressions; that, or a
  system's own ``CustomGBForce`` (e.g. OBC1 from an Amber prmtop, as in openmmtools' test
  systems), is replicated particle by particle with its expressions. Its cutoff is used only as a
  neighbour list: the copies sit on a lattice with spacing larger than the cutoff plus twice
  the molecule's extent, so no pair of atoms from different copies is ever within the cutoff
  and each copy's GB energy is that of the isolated molecule.

With ``per_copy_energies=True`` every energy term of copy ``c`` is multiplied by a global
parameter ``lam_c`` (= 1) with an energy-parameter derivative, so one ``getState`` returns
dU/dlam_c = U_c for all copies at once. With ``per_copy_energies=False`` (molecular dynamics)
each force type is one force over all copies, and an optional flat-bottom restraint on each
copy's centre of mass keeps it near its lattice point without touching the internal
distribution.
"""

from dataclasses import dataclass
import math

import numpy as np
import openmm
from openmm import unit

from trademd.errors import TradeMDError

__all__ = ["CopyLayout", "replicate_system", "copy_energy_parameter", "com_restraint_energies",
           "SUPPORTED_FORCES"]

#: 1/(4 pi eps0) in kJ nm/(mol e^2), the value OpenMM uses internally.
COULOMB_KJ_NM_MOL = 138.935456
#: OBC radius offset (nm) and probe radius of the ACE surface-area term (nm), as in OpenMM.
_OBC_OFFSET_NM = 0.009
_PROBE_RADIUS_NM = 0.14
#: Force constant of the flat-bottom centre-of-mass restraint, kJ/(mol nm^2).
COM_RESTRAINT_KJ_MOL_NM2 = 1000.0

#: Names the replicated CustomGBForce adds: the per-particle copy index, and the name under
#: which each energy term defines lam_c of its particle's copy.
_COPY_INDEX = "trademd_copy"
_COPY_SCALE = "trademd_lam"


#: Forces of a single-molecule system that :func:`replicate_system` can rewrite.
SUPPORTED_FORCES = (
    "HarmonicBondForce",
    "HarmonicAngleForce",
    "PeriodicTorsionForce",
    "NonbondedForce",
    "GBSAOBCForce",
    "CustomGBForce",
    "CMMotionRemover",
)


def copy_energy_parameter(copy_index: int) -> str:
    """Name of the global parameter that scales the energy of copy ``copy_index``."""
    return f"lam_{copy_index}"


@dataclass(frozen=True)
class CopyLayout:
    """Where the copies sit: a cubic lattice with ``spacing_nm`` between neighbours.

    Attributes:
        n_copies: number of copies.
        n_atoms: atoms per copy.
        spacing_nm: lattice spacing in nm.
        gb_cutoff_nm: neighbour-list cutoff of the GB force (nm), or None without GB.
        max_radius_nm: largest allowed distance of an atom from its copy's centroid (nm) for
            copies to stay out of each other's cutoff.
    """

    n_copies: int
    n_atoms: int
    spacing_nm: float
    gb_cutoff_nm: float | None
    max_radius_nm: float

    def lattice_nm(self) -> np.ndarray:
        """Lattice points, float64 [n_copies, 3] in nm."""
        side = max(1, math.ceil(round(self.n_copies ** (1.0 / 3.0), 9)))
        index = np.arange(self.n_copies)
        grid = np.stack([index % side, (index // side) % side, index // (side * side)], axis=1)
        return grid.astype(np.float64) * self.spacing_nm

    def place(self, positions_nm: np.ndarray) -> np.ndarray:
        """Translate each configuration's centroid onto its lattice point.

        Args:
            positions_nm: [n_copies, n_atoms, 3] in nm.

        Returns:
            [n_copies * n_atoms, 3] in nm, ready for ``Context.setPositions``.
        """
        centred = positions_nm - positions_nm.mean(axis=1, keepdims=True)
        return (centred + self.lattice_nm()[:, None, :]).reshape(-1, 3)

    def split(self, system_positions_nm: np.ndarray) -> np.ndarray:
        """Inverse of :meth:`place` up to translation: [n_copies * n_atoms, 3] ->
        [n_copies, n_atoms, 3], each copy moved back by its lattice point."""
        per_copy = system_positions_nm.reshape(self.n_copies, self.n_atoms, 3)
        return per_copy - self.lattice_nm()[:, None, :]


def replicate_system(
    system: openmm.System,
    n_copies: int,
    per_copy_energies: bool,
    molecule_radius_nm: float = 1.0,
    com_restraint_nm: float | None = None,
    gb_cutoff_nm: float = 3.0,
) -> tuple[openmm.System, CopyLayout]:
    """Build a ``System`` of ``n_copies`` non-interacting copies of ``system``.

    Args:
        system: the single-molecule system (NoCutoff; forces in ``SUPPORTED_FORCES``).
        n_copies: number of copies (>= 1).
        per_copy_energies: scale copy c's terms by ``lam_c`` with energy-parameter derivatives.
        molecule_radius_nm: largest distance of an atom from its copy's centroid that the
            lattice must tolerate (nm); sets the spacing.
        com_restraint_nm: radius of a flat-bottom restraint on each copy's centre of mass around
            its lattice point (nm), or None for no restraint. Energy is zero inside it.
        gb_cutoff_nm: neighbour-list cutoff of the GB force (nm).

    Returns:
        The replicated system and its :class:`CopyLayout`.
    """
    if n_copies < 1:
        raise TradeMDError(f"the number of copies must be at least 1, got {n_copies}")
    names = [type(f).__name__ for f in system.getForces()]
    unsupported = sorted(set(names) - set(SUPPORTED_FORCES))
    if unsupported:
        raise TradeMDError(
            f"cannot replicate forces {unsupported}: supported are {list(SUPPORTED_FORCES)} "
            "(implicit solvent OBC or vacuum, NoCutoff)"
        )
    has_gb = "GBSAOBCForce" in names or "CustomGBForce" in names
    drift_nm = com_restraint_nm or 0.0
    reach_nm = 2.0 * (molecule_radius_nm + drift_nm)
    spacing_nm = reach_nm + (gb_cutoff_nm if has_gb else 0.0) + 1.0
    layout = CopyLayout(
        n_copies=n_copies,
        n_atoms=system.getNumParticles(),
        spacing_nm=spacing_nm,
        gb_cutoff_nm=gb_cutoff_nm if has_gb else None,
        max_radius_nm=molecule_radius_nm + drift_nm,
    )
    replicated = openmm.System()
    for _ in range(n_copies):
        for atom in range(layout.n_atoms):
            replicated.addParticle(system.getParticleMass(atom))
    for copy in range(n_copies):
        shift = copy * layout.n_atoms
        for k in range(system.getNumConstraints()):
            i, j, length = system.getConstraintParameters(k)
            replicated.addConstraint(i + shift, j + shift, length)

    groups = [[c] for c in range(n_copies)] if per_copy_energies else [list(range(n_copies))]
    for force in system.getForces():
        if isinstance(force, openmm.CMMotionRemover):  # meaningless for copies on a lattice
            continue
        if isinstance(force, (openmm.GBSAOBCForce, openmm.CustomGBForce)):
            gb = _obc2_as_custom_gb(force) if isinstance(force, openmm.GBSAOBCForce) else force
            replicated.addForce(_custom_gb_force(gb, layout, per_copy_energies))
            continue
        builder = _BUILDERS[type(force).__name__]
        for copies in groups:
            prefix = f"{copy_energy_parameter(copies[0])}*" if per_copy_energies else ""
            new_force = builder(force, copies, layout.n_atoms, prefix)
            if per_copy_energies:
                new_force.addGlobalParameter(copy_energy_parameter(copies[0]), 1.0)
                new_force.addEnergyParameterDerivative(copy_energy_parameter(copies[0]))
            replicated.addForce(new_force)
    if com_restraint_nm is not None:
        replicated.addForce(_com_restraint(layout, com_restraint_nm))
    return replicated, layout


def _bond_force(force: openmm.HarmonicBondForce, copies, n_atoms, prefix):
    new = openmm.CustomBondForce(f"{prefix}0.5*k*(r-r0)^2")
    new.addPerBondParameter("r0")
    new.addPerBondParameter("k")
    terms = [force.getBondParameters(b) for b in range(force.getNumBonds())]
    for c in copies:
        for i, j, r0, k in terms:
            new.addBond(i + c * n_atoms, j + c * n_atoms, [r0, k])
    return new


def _angle_force(force: openmm.HarmonicAngleForce, copies, n_atoms, prefix):
    new = openmm.CustomAngleForce(f"{prefix}0.5*k*(theta-theta0)^2")
    new.addPerAngleParameter("theta0")
    new.addPerAngleParameter("k")
    terms = [force.getAngleParameters(a) for a in range(force.getNumAngles())]
    for c in copies:
        for i, j, l, theta0, k in terms:
            s = c * n_atoms
            new.addAngle(i + s, j + s, l + s, [theta0, k])
    return new


def _torsion_force(force: openmm.PeriodicTorsionForce, copies, n_atoms, prefix):
    new = openmm.CustomTorsionForce(f"{prefix}k*(1+cos(n*theta-phase))")
    for name in ("n", "phase", "k"):
        new.addPerTorsionParameter(name)
    terms = [force.getTorsionParameters(t) for t in range(force.getNumTorsions())]
    for c in copies:
        for i, j, l, m, n, phase, k in terms:
            s = c * n_atoms
            new.addTorsion(i + s, j + s, l + s, m + s, [n, phase, k])
    return new


def nonbonded_pairs(force: openmm.NonbondedForce) -> list[tuple[int, int, float, float, float]]:
    """All intramolecular pairs (i, j, charge product e^2, sigma nm, epsilon kJ/mol) of a
    NoCutoff ``NonbondedForce``: exceptions as given, other pairs by Lorentz-Berthelot; pairs
    with zero charge product and zero epsilon are left out."""
    if force.getNonbondedMethod() != openmm.NonbondedForce.NoCutoff:
        raise TradeMDError(
            "replication needs a NonbondedForce with NoCutoff: build the system with "
            "nonbondedMethod=NoCutoff (implicit solvent or vacuum)"
        )
    n = force.getNumParticles()
    atom = []
    for i in range(n):
        charge, sigma, epsilon = force.getParticleParameters(i)
        atom.append((charge.value_in_unit(unit.elementary_charge),
                     sigma.value_in_unit(unit.nanometer),
                     epsilon.value_in_unit(unit.kilojoule_per_mole)))
    exceptions = {}
    for e in range(force.getNumExceptions()):
        i, j, qq, sigma, epsilon = force.getExceptionParameters(e)
        exceptions[(min(i, j), max(i, j))] = (qq.value_in_unit(unit.elementary_charge**2),
                                             sigma.value_in_unit(unit.nanometer),
                                             epsilon.value_in_unit(unit.kilojoule_per_mole))
    pairs = []
    for i in range(n):
        qi, si, ei = atom[i]
        for j in range(i + 1, n):
            if (i, j) in exceptions:
                qq, sigma, epsilon = exceptions[(i, j)]
            else:
                qj, sj, ej = atom[j]
                qq, sigma, epsilon = qi * qj, 0.5 * (si + sj), math.sqrt(ei * ej)
            if qq != 0.0 or epsilon != 0.0:
                pairs.append((i, j, qq, sigma, epsilon))
    return pairs


def _nonbonded_force(force: openmm.NonbondedForce, copies, n_atoms, prefix):
    new = openmm.CustomBondForce(
        f"{prefix}({COULOMB_KJ_NM_MOL}*qq/r + 4*eps*((sig/r)^12-(sig/r)^6))"
    )
    for name in ("qq", "sig", "eps"):
        new.addPerBondParameter(name)
    pairs = nonbonded_pairs(force)
    for c in copies:
        for i, j, qq, sigma, epsilon in pairs:
            new.addBond(i + c * n_atoms, j + c * n_atoms, [qq, sigma, epsilon])
    return new


def _obc2_as_custom_gb(force: openmm.GBSAOBCForce) -> openmm.CustomGBForce:
    """OBC2 generalised Born (OpenMM's ``GBSAOBCForce``) of one molecule as a NoCutoff
    ``CustomGBForce`` with the same energy, for :func:`_custom_gb_force` to replicate."""
    solute = force.getSoluteDielectric()
    solvent = force.getSolventDielectric()
    sa_energy = force.getSurfaceAreaEnergy().value_in_unit(
        unit.kilojoule_per_mole / unit.nanometer**2)
    pre = f"({-0.5 * COULOMB_KJ_NM_MOL * (1.0 / solute - 1.0 / solvent)!r})"
    gb = openmm.CustomGBForce()
    for name in ("charge", "or", "sr"):
        gb.addPerParticleParameter(name)
    gb.addComputedValue(
        "I",
        "select(step(r+sr2-or1), 0.5*(1/L-1/U+0.25*(r-sr2^2/r)*(1/(U^2)-1/(L^2))+0.5*log(L/U)/r), 0);"
        "U=r+sr2; L=max(or1, D); D=abs(r-sr2)",
        openmm.CustomGBForce.ParticlePairNoExclusions,
    )
    gb.addComputedValue(
        "B",
        f"1/(1/or-tanh(psi-0.8*psi^2+4.85*psi^3)/radius); psi=I*or; radius=or+{_OBC_OFFSET_NM}",
        openmm.CustomGBForce.SingleParticle,
    )
    gb.addEnergyTerm(f"{pre}*charge^2/B", openmm.CustomGBForce.SingleParticle)
    if sa_energy != 0.0:
        gb.addEnergyTerm(
            f"{4.0 * math.pi * sa_energy!r}*(radius+{_PROBE_RADIUS_NM})^2*(radius/B)^6;"
            f" radius=or+{_OBC_OFFSET_NM}",
            openmm.CustomGBForce.SingleParticle,
        )
    gb.addEnergyTerm(
        f"2*{pre}*charge1*charge2/f; f=sqrt(r^2+B1*B2*exp(-r^2/(4*B1*B2)))",
        openmm.CustomGBForce.ParticlePairNoExclusions,
    )
    for i in range(force.getNumParticles()):  # charge (e), offset radius (nm), scaled radius
        charge, radius, scaling = force.getParticleParameters(i)
        offset_radius = radius.value_in_unit(unit.nanometer) - _OBC_OFFSET_NM
        gb.addParticle([charge.value_in_unit(unit.elementary_charge), offset_radius, scaling * offset_radius])
    return gb


def _custom_gb_force(force: openmm.CustomGBForce, layout: CopyLayout, per_copy: bool):
    """A ``CustomGBForce`` of one molecule (NoCutoff) replicated over the copies: the same
    computed values, energy terms, global parameters and tabulated functions; particles and
    exclusions repeated per copy. With ``per_copy``, every energy term is multiplied by
    lam_c of its particle's copy, selected by a per-particle copy index (pair terms by the
    index of particle 1: both particles of a pair within the cutoff belong to the same copy).

    The selector sum_c lam_c * delta(index - c) is written into each energy term itself, not
    into a computed value: OpenMM's GPU kernels (CUDA, OpenCL) do not carry energy-parameter
    derivatives through computed values, so a computed-value selector gave dE/dlam_c hundreds
    of kJ/mol off there (right on the CPU and Reference platforms)."""
    if force.getNonbondedMethod() != openmm.CustomGBForce.NoCutoff:
        raise TradeMDError("replication needs a CustomGBForce with NoCutoff: build the system "
                           "with nonbondedMethod=NoCutoff (nonbondedCutoff=None for a prmtop)")
    gb = openmm.CustomGBForce()
    for k in range(force.getNumPerParticleParameters()):
        gb.addPerParticleParameter(force.getPerParticleParameterName(k))
    gb.addPerParticleParameter(_COPY_INDEX)
    for k in range(force.getNumGlobalParameters()):
        gb.addGlobalParameter(force.getGlobalParameterName(k), force.getGlobalParameterDefaultValue(k))
    for k in range(force.getNumTabulatedFunctions()):
        function = openmm.XmlSerializer.clone(force.getTabulatedFunction(k))
        gb.addTabulatedFunction(force.getTabulatedFunctionName(k), function)
    for k in range(force.getNumComputedValues()):
        gb.addComputedValue(*force.getComputedValueParameters(k))
    if per_copy:
        for c in range(layout.n_copies):
            gb.addGlobalParameter(copy_energy_parameter(c), 1.0)
            gb.addEnergyParameterDerivative(copy_energy_parameter(c))
    for k in range(force.getNumEnergyTerms()):
        expression, kind = force.getEnergyTermParameters(k)
        if per_copy:
            index = _COPY_INDEX if kind == openmm.CustomGBForce.SingleParticle else f"{_COPY_INDEX}1"
            expression = _scaled_by_copy(expression, index, layout.n_copies)
        gb.addEnergyTerm(expression, kind)
    n_atoms = layout.n_atoms
    for c in range(layout.n_copies):
        for i in range(n_atoms):
            gb.addParticle([*force.getParticleParameters(i), float(c)])
        for k in range(force.getNumExclusions()):
            i, j = force.getExclusionParticles(k)
            gb.addExclusion(i + c * n_atoms, j + c * n_atoms)
    if layout.n_copies > 1:
        gb.setNonbondedMethod(openmm.CustomGBForce.CutoffNonPeriodic)
        gb.setCutoffDistance(layout.gb_cutoff_nm)
    return gb


def _scaled_by_copy(expression: str, index: str, n_copies: int) -> str:
    """An OpenMM energy expression ``main; definitions...`` multiplied by lam_c of the copy
    whose index the per-particle variable ``index`` holds: ``trademd_lam*(main);
    definitions...; trademd_lam=lam_0*delta(index-0)+...`` (a definition, which Lepton inlines,
    so its derivative with respect to each lam_c is exact on every platform)."""
    main, *definitions = expression.split(";")
    selector = "+".join(f"{copy_energy_parameter(c)}*delta({index}-{c})" for c in range(n_copies))
    return ";".join([f"{_COPY_SCALE}*({main})", *definitions, f"{_COPY_SCALE}={selector}"])


def com_restraint_energies(offsets_nm: np.ndarray, masses_amu: np.ndarray,
                           radius_nm: float) -> np.ndarray:
    """Energy of each copy's centre-of-mass restraint (the force ``com_restraint_nm`` adds).

    Args:
        offsets_nm: positions relative to the copies' lattice points (what
            :meth:`CopyLayout.split` returns), [n_copies, n_atoms, 3] in nm.
        masses_amu: atom masses of one copy [n_atoms].
        radius_nm: the restraint's radius.

    Returns:
        float64 [n_copies] in kJ/mol.
    """
    centre = np.einsum("cai,a->ci", offsets_nm, masses_amu) / masses_amu.sum()
    excess = np.maximum(0.0, np.linalg.norm(centre, axis=1) - radius_nm)
    return 0.5 * COM_RESTRAINT_KJ_MOL_NM2 * excess ** 2


def _com_restraint(layout: CopyLayout, radius_nm: float) -> openmm.CustomCentroidBondForce:
    """Flat-bottom harmonic restraint of each copy's centre of mass to its lattice point."""
    restraint = openmm.CustomCentroidBondForce(
        1, "0.5*k_com*max(0, d-d_com)^2; d=sqrt((x1-x0)^2+(y1-y0)^2+(z1-z0)^2)"
    )
    restraint.addGlobalParameter("k_com", COM_RESTRAINT_KJ_MOL_NM2)
    restraint.addGlobalParameter("d_com", radius_nm)
    for name in ("x0", "y0", "z0"):
        restraint.addPerBondParameter(name)
    for c, point in enumerate(layout.lattice_nm()):
        group = restraint.addGroup(list(range(c * layout.n_atoms, (c + 1) * layout.n_atoms)))
        restraint.addBond([group], [float(x) for x in point])
    return restraint


_BUILDERS = {
    "HarmonicBondForce": _bond_force,
    "HarmonicAngleForce": _angle_force,
    "PeriodicTorsionForce": _torsion_force,
    "NonbondedForce": _nonbonded_force,
}

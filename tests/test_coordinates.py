"""Internal coordinates: exact round trips, log-dets against autograd, constraints, chirality."""

import io
import math

import numpy as np
import pytest
import torch

from trademd.analysis.chirality import (
    chirality_restraint,
    chirality_signs,
    wrong_chirality_mask,
)
from trademd.errors import TradeMDError
from trademd.flow.coordinates import (
    InternalCoordinates,
    cartesian_to_internal,
    constrained_bonds_from_openmm,
    internal_log_det,
    internal_to_cartesian,
)
from trademd.systems import get_system
from trademd.systems.zmatrix import zmatrix_from_bonds

# ---------------------------------------------------------------------------------------------
# molecules


@pytest.fixture(scope="module")
def ala2():
    return get_system("ala2-implicit")


@pytest.fixture(scope="module")
def ala2_constraints(ala2):
    return constrained_bonds_from_openmm(ala2.create_openmm_system())


def _random_rotation(rng) -> np.ndarray:
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    q = q * np.sign(np.diag(r))
    return q if np.linalg.det(q) > 0 else -q


def _random_tree(seed: int, n_atoms: int = 14):
    """A random tree-shaped molecule: (zmatrix, heavy flags, bonds)."""
    rng = np.random.default_rng(seed)
    bonds = [(int(rng.integers(0, i)), i) for i in range(1, n_atoms)]
    degree = np.bincount(np.array(bonds).ravel(), minlength=n_atoms)
    heavy = [bool(d > 1 or rng.random() < 0.3) for d in degree]
    return zmatrix_from_bonds(n_atoms, bonds, heavy), heavy, bonds


def _random_configurations(zmatrix, batch: int, seed: int) -> torch.Tensor:
    """Configurations with sane geometry (angles away from 0 and pi), randomly rotated and
    translated: float64 [batch, n_atoms, 3]."""
    rng = np.random.default_rng(seed)
    n = len(zmatrix)
    bonds = torch.as_tensor(rng.uniform(0.09, 0.16, size=(batch, n - 1)))
    angles = torch.as_tensor(rng.uniform(0.6, 2.6, size=(batch, n - 2)))
    torsions = torch.as_tensor(rng.uniform(-math.pi, math.pi, size=(batch, n - 3)))
    x = internal_to_cartesian(bonds, angles, torsions, zmatrix)
    rotations = torch.as_tensor(np.stack([_random_rotation(rng) for _ in range(batch)]))
    shifts = torch.as_tensor(rng.normal(size=(batch, 1, 3)))
    return x @ rotations.transpose(-1, -2) + shifts


def canonical_frame(x: torch.Tensor, zmatrix) -> torch.Tensor:
    """x [..., n_atoms, 3] translated and properly rotated into the canonical frame of the
    Z-matrix seeds (trademd.flow.coordinates' docstring): s1 at the origin, s0 on +x, s2 in
    the xy-plane with y > 0. What ``internal_to_cartesian(*cartesian_to_internal(x, z), z)``
    must return."""
    s0, s1, s2 = (int(row[0]) for row in np.asarray(zmatrix)[:3])
    y = x - x[..., s1 : s1 + 1, :]
    e1 = y[..., s0, :] / torch.linalg.vector_norm(y[..., s0, :], dim=-1, keepdim=True)
    v = y[..., s2, :] - (y[..., s2, :] * e1).sum(-1, keepdim=True) * e1
    e2 = v / torch.linalg.vector_norm(v, dim=-1, keepdim=True)
    basis = torch.stack([e1, e2, torch.cross(e1, e2, dim=-1)], dim=-1)  # columns e1 e2 e3
    return y @ basis


def _torsion_column(zmatrix, atoms) -> int:
    """Column of the ``torsions`` features whose Z-matrix row is the dihedral ``atoms`` or its
    reverse (torsion column k is row k + 3)."""
    rows = [tuple(row) for row in np.asarray(zmatrix)[3:].tolist()]
    quad = tuple(int(a) for a in atoms)
    (column,) = [k for k, row in enumerate(rows) if row in (quad, quad[::-1])]
    return column


def _ala2_configurations(ala2, batch: int, seed: int, sigma: float = 0.01) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    x = ala2.positions_nm()[None] + rng.normal(0.0, sigma, size=(batch, ala2.n_atoms, 3))
    return torch.as_tensor(x)


@pytest.fixture(scope="module", params=["ala2", "random-tree"])
def molecule(request, ala2):
    """(zmatrix, float64 configurations [8, n, 3]) for alanine dipeptide and a random tree."""
    if request.param == "ala2":
        return ala2.zmatrix, _ala2_configurations(ala2, 8, seed=1)
    zmatrix, _, _ = _random_tree(seed=3)
    return zmatrix, _random_configurations(zmatrix, 8, seed=4)


# ---------------------------------------------------------------------------------------------
# the functional transform


def test_internal_coordinates_match_mdtraj(ala2):
    import mdtraj

    x = _ala2_configurations(ala2, 4, seed=0)
    bonds, angles, torsions = cartesian_to_internal(x, ala2.zmatrix)
    traj = mdtraj.Trajectory(x.numpy(), ala2.mdtraj_topology())
    z = ala2.zmatrix
    np.testing.assert_allclose(
        bonds.numpy(), mdtraj.compute_distances(traj, z[1:, :2], periodic=False), atol=1e-6
    )
    np.testing.assert_allclose(
        angles.numpy(), mdtraj.compute_angles(traj, z[2:, :3], periodic=False), atol=1e-5
    )
    reference = mdtraj.compute_dihedrals(traj, z[3:], periodic=False)
    wrapped = (torsions.numpy() - reference + np.pi) % (2 * np.pi) - np.pi
    assert np.abs(wrapped).max() < 1e-5
    assert torsions.min() >= -math.pi and torsions.max() < math.pi
    assert angles.min() > 0 and angles.max() < math.pi
    # phi and psi are Z-matrix torsions
    _, phi = mdtraj.compute_phi(traj)
    _, psi = mdtraj.compute_psi(traj)
    for column, expected in ((_torsion_column(z, ala2.phi_atoms), phi), (_torsion_column(z, ala2.psi_atoms), psi)):
        diff = (torsions[:, column].numpy() - expected[:, 0] + np.pi) % (2 * np.pi) - np.pi
        assert np.abs(diff).max() < 1e-5


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
def test_round_trip_is_exact(molecule, dtype, tol):
    zmatrix, x = molecule
    x = x.to(dtype)
    back = internal_to_cartesian(*cartesian_to_internal(x, zmatrix), zmatrix)
    assert back.dtype == dtype
    assert (back - canonical_frame(x, zmatrix)).abs().max() < tol
    # rotation-free check: all pairwise distances
    assert (torch.cdist(back, back) - torch.cdist(x, x)).abs().max() < 2 * tol
    # the canonical frame: s1 at origin, s0 on +x, s2 in the xy-plane with y > 0
    s0, s1, s2 = zmatrix[:3, 0]
    assert back[:, s1].abs().max() == 0
    assert (back[:, s0, 1:] == 0).all() and (back[:, s0, 0] > 0).all()
    assert (back[:, s2, 2] == 0).all() and (back[:, s2, 1] > 0).all()


def _rigid(x_canonical: torch.Tensor, omega: torch.Tensor, shift: torch.Tensor, base: torch.Tensor):
    """base @ exp([omega]_x) rotation, then translation: x [n, 3]."""
    skew = torch.zeros(3, 3, dtype=omega.dtype)
    skew = skew.index_put((torch.tensor([2, 0, 1]), torch.tensor([1, 2, 0])), omega)
    skew = skew - skew.T
    rotation = base @ torch.linalg.matrix_exp(skew)
    return x_canonical @ rotation.T + shift


def test_log_det_equals_autograd_jacobian_with_rigid_motions(molecule):
    """log J = log|det d x / d(ic, omega, t)| at omega = 0: the square 3n x 3n Jacobian."""
    zmatrix, x = molecule
    n = len(zmatrix)
    base = torch.as_tensor(_random_rotation(np.random.default_rng(5)))
    for frame in x[:3]:
        bonds, angles, torsions = cartesian_to_internal(frame, zmatrix)
        inputs = torch.cat([bonds, angles, torsions, torch.zeros(3, dtype=x.dtype), frame[0]])

        def to_cartesian(v):
            b, a, t = v[: n - 1], v[n - 1 : 2 * n - 3], v[2 * n - 3 : 3 * n - 6]
            y = internal_to_cartesian(b, a, t, zmatrix)
            return _rigid(y, v[3 * n - 6 : 3 * n - 3], v[3 * n - 3 :], base).reshape(-1)

        jacobian = torch.autograd.functional.jacobian(to_cartesian, inputs)
        assert jacobian.shape == (3 * n, 3 * n)
        _, logabsdet = torch.linalg.slogdet(jacobian)
        assert abs(float(logabsdet - internal_log_det(bonds, angles))) < 1e-8


def test_log_det_equals_frame_jacobian_plus_orbit_factor(molecule):
    """ic (3n-6) -> the 3n-6 Cartesian coordinates free in the canonical frame."""
    zmatrix, x = molecule
    n = len(zmatrix)
    s0, _, s2 = zmatrix[:3, 0]
    others = torch.as_tensor(zmatrix[3:, 0])
    for frame in x[:3]:
        bonds, angles, torsions = cartesian_to_internal(frame, zmatrix)

        def to_free(v):
            y = internal_to_cartesian(v[: n - 1], v[n - 1 : 2 * n - 3], v[2 * n - 3 :], zmatrix)
            return torch.cat([y[s0, :1], y[s2, :2], y[others].reshape(-1)])

        jacobian = torch.autograd.functional.jacobian(to_free, torch.cat([bonds, angles, torsions]))
        assert jacobian.shape == (3 * n - 6, 3 * n - 6)
        _, frame_logdet = torch.linalg.slogdet(jacobian)
        orbit = 2 * torch.log(bonds[0]) + torch.log(bonds[1]) + torch.log(torch.sin(angles[0]))
        assert abs(float(frame_logdet + orbit - internal_log_det(bonds, angles))) < 1e-8


# ---------------------------------------------------------------------------------------------
# the module: normalisation, log-dets, constraints


def _fitted(zmatrix, x, constraints=None, **kwargs) -> InternalCoordinates:
    return InternalCoordinates.from_data(zmatrix, x, constraints, **kwargs)


def test_fit_statistics_and_interval(molecule):
    zmatrix, x = molecule
    ic = _fitted(zmatrix, x, bound=2.0, n_std=4.0)
    bonds, angles, _ = cartesian_to_internal(x, zmatrix)
    v = torch.cat([bonds, angles], -1)
    torch.testing.assert_close(ic.mean, v.mean(0))
    torch.testing.assert_close(ic.std, v.std(0))
    features, _ = ic(x)
    assert features.bounded.shape == (len(x), ic.n_bonded_dims) == (len(x), 2 * len(zmatrix) - 3)
    assert features.torsions.shape == (len(x), ic.n_torsions)
    # training data: mean 0, std bound / n_std, well inside [-bound, bound]
    torch.testing.assert_close(features.bounded.mean(0), torch.zeros(ic.n_bonded_dims, dtype=x.dtype))
    torch.testing.assert_close(features.bounded.std(0), torch.full((ic.n_bonded_dims,), 0.5, dtype=x.dtype))
    assert not features.out_of_range.any()


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
def test_module_round_trip_and_log_dets_cancel(molecule, dtype, tol):
    zmatrix, x = molecule
    ic = _fitted(zmatrix, x).to(dtype)
    x = x.to(dtype)
    features, log_det = ic(x)
    back, log_det_back = ic.inverse(features.torsions, features.bounded)
    assert back.dtype == log_det.dtype == dtype
    assert (back - canonical_frame(x, zmatrix)).abs().max() < tol
    assert (log_det + log_det_back).abs().max() < 1e3 * tol
    again, _ = ic(back)
    assert (again.bounded - features.bounded).abs().max() < 1e2 * tol


def test_normalisation_log_det_matches_autograd(molecule):
    """d bounded / d(free bonds, angles) at fixed torsions: log|det| = -sum log scale."""
    zmatrix, x = molecule
    ic = _fitted(zmatrix, x)
    bonds, angles, torsions = cartesian_to_internal(x[0], zmatrix)
    n_b = ic.n_bonds

    def normalised(v):
        y = internal_to_cartesian(v[:n_b], v[n_b:], torsions, zmatrix)
        return ic(y[None])[0].bounded[0]

    jacobian = torch.autograd.functional.jacobian(normalised, torch.cat([bonds, angles]))
    _, logabsdet = torch.linalg.slogdet(jacobian)
    features, log_det = ic(x[:1])
    assert abs(float(logabsdet - (log_det[0] + internal_log_det(bonds, angles)))) < 1e-8


def test_module_inverse_log_det_matches_full_autograd_jacobian(molecule):
    """(torsions, bounded, omega, t) -> x: square Jacobian; its log|det| is inverse's log-det."""
    zmatrix, x = molecule
    ic = _fitted(zmatrix, x)
    n_t, n_b = ic.n_torsions, ic.n_bonded_dims
    base = torch.eye(3, dtype=x.dtype)
    features, log_det = ic(x[:2])
    for k in range(2):
        inputs = torch.cat([features.torsions[k], features.bounded[k], torch.zeros(6, dtype=x.dtype)])

        def to_cartesian(v):
            y, _ = ic.inverse(v[None, :n_t], v[None, n_t : n_t + n_b])
            return _rigid(y[0], v[n_t + n_b : n_t + n_b + 3], v[n_t + n_b + 3 :], base).reshape(-1)

        jacobian = torch.autograd.functional.jacobian(to_cartesian, inputs)
        _, logabsdet = torch.linalg.slogdet(jacobian)
        _, inverse_log_det = ic.inverse(features.torsions[k : k + 1], features.bounded[k : k + 1])
        assert abs(float(logabsdet - inverse_log_det[0])) < 1e-8
        assert abs(float(logabsdet + log_det[k])) < 1e-8


def test_constrained_bonds_from_openmm(ala2_constraints):
    assert len(ala2_constraints) == 12
    assert all(i < j for i, j in ala2_constraints)
    assert ala2_constraints[(6, 7)] == pytest.approx(0.101)
    assert ala2_constraints[(8, 9)] == pytest.approx(0.109)


def _constrained_data(ala2, constraints, batch: int, seed: int) -> torch.Tensor:
    """Configurations near the PDB that obey the constraints exactly: float64."""
    rng = np.random.default_rng(seed)
    ic0 = InternalCoordinates(ala2.zmatrix, constraints)
    bonds, angles, torsions = cartesian_to_internal(torch.as_tensor(ala2.positions_nm()), ala2.zmatrix)
    bonds = bonds + torch.as_tensor(rng.normal(0, 0.003, size=(batch, len(bonds))))
    bonds = torch.where(ic0.bond_fixed, ic0.fixed_lengths, bonds)
    angles = angles + torch.as_tensor(rng.normal(0, 0.05, size=(batch, len(angles))))
    torsions = torsions + torch.as_tensor(rng.normal(0, 0.3, size=(batch, len(torsions))))
    return internal_to_cartesian(bonds, angles, torsions, ala2.zmatrix)


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-12), (torch.float32, 1e-6)])
def test_constrained_bonds_are_held_fixed(ala2, ala2_constraints, dtype, tol):
    x = _constrained_data(ala2, ala2_constraints, 16, seed=2)
    ic = _fitted(ala2.zmatrix, x, ala2.create_openmm_system()).to(dtype)
    assert (ic.n_bonds, ic.n_angles, ic.n_torsions) == (21 - 12, 20, 19)
    assert ic.n_torsions + ic.n_bonded_dims == 3 * 22 - 6 - 12
    # random features inside the support: constrained bonds come out at the constraint length
    generator = torch.Generator().manual_seed(0)
    bounded = (torch.rand(32, ic.n_bonded_dims, generator=generator) * 2 - 1).to(dtype)
    torsions = ((torch.rand(32, ic.n_torsions, generator=generator) * 2 - 1) * math.pi).to(dtype)
    y, log_det = ic.inverse(torsions, bounded)
    for (i, j), length in ala2_constraints.items():
        assert (torch.linalg.vector_norm(y[:, i] - y[:, j], dim=-1) - length).abs().max() < tol
    features, log_det_forward = ic(y)
    assert (features.bounded - bounded).abs().max() < 1e3 * tol
    assert (log_det + log_det_forward).abs().max() < 1e4 * tol
    # data that obey the constraints round-trip exactly
    features, _ = ic(x.to(dtype))
    back, _ = ic.inverse(features.torsions, features.bounded)
    assert (back - canonical_frame(x.to(dtype), ala2.zmatrix)).abs().max() < 1e4 * tol


def test_constrained_log_det_convention(ala2, ala2_constraints):
    """With the constrained lengths as extra inputs the map (features, lengths, omega, t) -> x
    is square; its log|det| is the inverse's log-det: 2 log b of a constrained bond stays,
    it gets no normalisation term."""
    x = _constrained_data(ala2, ala2_constraints, 16, seed=3)
    ic = _fitted(ala2.zmatrix, x, ala2_constraints)
    n_t, n_b, n_c = ic.n_torsions, ic.n_bonded_dims, int(ic.bond_fixed.sum())
    fixed_rows = torch.nonzero(ic.bond_fixed)[:, 0]
    free_rows = torch.nonzero(~ic.bond_fixed)[:, 0]  # in feature order: the free bond rows - 1
    assert free_rows.tolist() == (ic.free_bond_rows - 1).tolist() and len(free_rows) == ic.n_bonds
    features, log_det = ic(x[:1])
    inputs = torch.cat(
        [features.torsions[0], features.bounded[0], ic.fixed_lengths[fixed_rows], torch.zeros(6, dtype=x.dtype)]
    )

    def to_cartesian(v):
        t, z = v[:n_t], v[n_t : n_t + n_b]
        values = ic.mean + z * ic.std * ic.n_std / ic.bound
        bonds = torch.zeros(ic.n_atoms - 1, dtype=v.dtype)
        bonds = bonds.index_copy(0, free_rows, values[: ic.n_bonds])
        bonds = bonds.index_copy(0, fixed_rows, v[n_t + n_b : n_t + n_b + n_c])
        y = internal_to_cartesian(bonds, values[ic.n_bonds :], t, ala2.zmatrix)
        rigid = v[n_t + n_b + n_c :]
        return _rigid(y, rigid[:3], rigid[3:], torch.eye(3, dtype=v.dtype)).reshape(-1)

    y_module, log_det_inverse = ic.inverse(features.torsions, features.bounded)
    torch.testing.assert_close(to_cartesian(inputs).reshape(-1, 3), y_module[0], rtol=0, atol=1e-12)
    jacobian = torch.autograd.functional.jacobian(to_cartesian, inputs)
    assert jacobian.shape == (66, 66)
    _, logabsdet = torch.linalg.slogdet(jacobian)
    assert abs(float(logabsdet - log_det_inverse[0])) < 1e-8
    assert abs(float(logabsdet + log_det[0])) < 1e-8


def test_fit_rejects_undeclared_and_violated_constraints(ala2, ala2_constraints):
    x = _constrained_data(ala2, ala2_constraints, 8, seed=4)
    with pytest.raises(TradeMDError, match="does not vary"):
        InternalCoordinates.from_data(ala2.zmatrix, x)
    noisy = _ala2_configurations(ala2, 8, seed=5)
    with pytest.raises(TradeMDError, match="violate"):
        InternalCoordinates.from_data(ala2.zmatrix, noisy, ala2_constraints)
    with pytest.raises(TradeMDError, match="not a bond of the Z-matrix"):
        InternalCoordinates(ala2.zmatrix, {(0, 21): 0.1})
    with pytest.raises(TradeMDError, match="not fitted"):
        InternalCoordinates(ala2.zmatrix)(x)


def test_out_of_range_modes(ala2):
    x = _ala2_configurations(ala2, 8, seed=6)
    far = x.clone()
    far[0, 0] += 0.3  # H1 far away: its bond is many standard deviations out
    for mode in ("flag", "clamp"):
        ic = _fitted(ala2.zmatrix, x, out_of_range=mode)
        features, _ = ic(far)
        assert features.out_of_range.tolist() == [True] + [False] * 7
        limit = features.bounded.abs().max()
        assert (limit > 1) if mode == "flag" else (limit == 1)
    ic = _fitted(ala2.zmatrix, x, out_of_range="raise")
    ic(x)
    with pytest.raises(TradeMDError, match="outside the flow's support"):
        ic(far)


def test_save_and_load(ala2, ala2_constraints):
    x = _constrained_data(ala2, ala2_constraints, 8, seed=7)
    ic = _fitted(ala2.zmatrix, x, ala2_constraints, bound=3.0, n_std=6.0)
    buffer = io.BytesIO()
    torch.save(ic.state_dict(), buffer)
    buffer.seek(0)
    loaded = InternalCoordinates.from_state_dict(torch.load(buffer, weights_only=True))
    assert (loaded.n_bonds, loaded.n_bonded_dims, loaded.bound, loaded.fitted) == (ic.n_bonds, ic.n_bonded_dims, 3.0, True)
    assert np.array_equal(loaded.free_bond_rows, ic.free_bond_rows)
    (f1, l1), (f2, l2) = ic(x), loaded(x)
    assert torch.equal(f1.bounded, f2.bounded) and torch.equal(l1, l2)
    fresh = InternalCoordinates(ala2.zmatrix, ala2_constraints, bound=3.0, n_std=6.0)
    fresh.load_state_dict(ic.state_dict())
    assert torch.equal(fresh(x)[1], l1)
    with pytest.raises(TradeMDError, match="bound=3.0"):
        InternalCoordinates(ala2.zmatrix, ala2_constraints).load_state_dict(ic.state_dict())


@pytest.mark.cuda
def test_cuda_matches_cpu(ala2):
    x = _ala2_configurations(ala2, 64, seed=8)
    ic = _fitted(ala2.zmatrix, x)
    cpu_features, cpu_log_det = ic(x)
    gpu = ic.to("cuda")
    for dtype, tol in ((torch.float64, 1e-10), (torch.float32, 1e-4)):
        gpu = gpu.to(dtype)
        features, log_det = gpu(x.to("cuda", dtype))
        back, log_det_back = gpu.inverse(features.torsions, features.bounded)
        assert back.device.type == "cuda" and back.dtype == dtype
        assert (back.cpu().double() - canonical_frame(x, ala2.zmatrix)).abs().max() < tol
        assert (features.bounded.cpu().double() - cpu_features.bounded).abs().max() < 1e2 * tol
        assert (log_det.cpu().double() - cpu_log_det).abs().max() < 1e2 * tol
        assert (log_det + log_det_back).abs().max() < 1e2 * tol


# ---------------------------------------------------------------------------------------------
# chirality


def test_chirality_flips_under_mirror_and_is_reported(ala2):
    reference, centres = ala2.positions_nm(), ala2.chiral_centres
    assert centres.tolist() == [[8, 6, 14, 10]]  # CA with N, C, CB
    x = _ala2_configurations(ala2, 6, seed=9)
    signs = chirality_signs(x, centres)
    assert signs.shape == (6, 1)
    assert (signs == chirality_signs(reference, centres)).all()
    assert (chirality_signs(-x, centres) == -signs).all()
    # a mirror image: bonds and angles unchanged, torsions negated
    b, a, t = cartesian_to_internal(x, ala2.zmatrix)
    bm, am, tm = cartesian_to_internal(-x, ala2.zmatrix)
    torch.testing.assert_close((b, a), (bm, am))
    assert (((t + tm + math.pi) % (2 * math.pi)) - math.pi).abs().max() < 1e-9
    mixed = torch.cat([x, -x[:2]])
    assert wrong_chirality_mask(mixed, centres, reference).tolist() == [False] * 6 + [True] * 2
    assert float(wrong_chirality_mask(mixed, centres, reference).double().mean()) == pytest.approx(0.25)
    # the flow can make the wrong one: CB's torsion about CA-C sets CA's handedness
    ic = _fitted(ala2.zmatrix, x)
    features, _ = ic(x[:1])
    torsions = features.torsions.clone()
    column = _torsion_column(ala2.zmatrix, (10, 8, 14, 6))
    torsions[0, column] = -torsions[0, column]
    flipped, _ = ic.inverse(torsions, features.bounded)
    assert wrong_chirality_mask(flipped, centres, reference).all()


def test_chirality_restraint_is_flat_on_the_physical_enantiomer_and_differentiable(ala2):
    reference = ala2.positions_nm()
    x = _ala2_configurations(ala2, 4, seed=3)
    centres = ala2.chiral_centres
    assert torch.equal(chirality_restraint(x, centres, reference), torch.zeros(4, dtype=x.dtype))
    mirrored = chirality_restraint(-x, centres, reference)
    assert (mirrored > 0.5 * len(centres)).all()  # about 1 per mirrored centre
    wrong = wrong_chirality_mask(-x, centres, reference)
    assert wrong.all()
    # gradient against central finite differences on a mirrored configuration
    y = (-x[:1]).clone().requires_grad_(True)
    chirality_restraint(y, centres, reference).sum().backward()
    direction = torch.randn_like(y)
    h = 1e-6
    plus = chirality_restraint(-x[:1] + h * direction, centres, reference)
    minus = chirality_restraint(-x[:1] - h * direction, centres, reference)
    assert float((y.grad * direction).sum()) == pytest.approx(float((plus - minus) / (2 * h)), rel=1e-6)

"""The normalized polynomial Count Sketch: scikit-learn's feature map, its analytic VJP, its hashes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.kernel_approximation import PolynomialCountSketch

from steer_core.errors import SteerError
from steer_core.sketch import CountSketch

DIM = 24


def _rows(n: int = 7, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, DIM, generator=g, dtype=torch.float64) * 4.0


@pytest.mark.parametrize("degree", [1, 2, 3])
@pytest.mark.parametrize("coef0", [1.0, 0.5])
def test_matches_scikit_learn_on_the_same_hashes(degree, coef0):
    a = _rows()
    ref = PolynomialCountSketch(degree=degree, n_components=96, gamma=0.3, coef0=coef0, random_state=3).fit(a.numpy())
    ours = CountSketch(index_hash=torch.as_tensor(ref.indexHash_), bit_hash=torch.as_tensor(ref.bitHash_).float(),
                       n_components=96, gamma=0.3, coef0=coef0)
    # scikit-learn sketches what it is given: hand it the normalized rows.
    expected = ref.transform((a / a.norm(dim=1, keepdim=True)).numpy())
    got = ours.features(a).double().numpy()
    assert got.dtype == np.float64 and ours.features(a).dtype == torch.float32
    np.testing.assert_allclose(got, expected, atol=2e-6, rtol=0)
    np.testing.assert_allclose(ours.features(a, normalize=False).double().numpy(),
                               ref.transform(a.numpy()), rtol=1e-4, atol=1e-3)


def test_inner_products_approximate_the_polynomial_kernel():
    a = _rows(40, seed=1)
    sk = CountSketch.create(DIM, degree=2, n_components=20000, gamma=0.5, coef0=1.0, seed=0)
    phi = sk.features(a).double()
    unit = a / a.norm(dim=1, keepdim=True)
    exact = (0.5 * unit @ unit.T + 1.0) ** 2
    assert (phi @ phi.T - exact).abs().mean() < 0.05 * exact.abs().mean()


@pytest.mark.parametrize("degree", [1, 2, 3, 4])
def test_analytic_vjp_equals_autograd(degree):
    sk = CountSketch.create(DIM, degree=degree, n_components=61, gamma=0.2, coef0=0.7, seed=degree)
    a = _rows().float()
    g = torch.Generator().manual_seed(5)
    for cotangent in (torch.randn(len(a), 61, generator=g), torch.randn(61, generator=g)):
        leaf = a.clone().requires_grad_(True)
        phi = sk.features(leaf)
        (phi * cotangent).sum().backward()
        analytic = sk.vjp(a, cotangent)
        torch.testing.assert_close(analytic, leaf.grad, atol=1e-6, rtol=1e-4)
        assert analytic.abs().max() > 1e-4  # not trivially zero


def test_gradient_ignores_the_activation_norm_direction():
    sk = CountSketch.create(DIM, n_components=50, seed=0)
    a = _rows().float()
    grad = sk.vjp(a, torch.ones(50))
    # phi depends on a / |a| only: scaling a changes nothing, so the gradient has no radial part.
    torch.testing.assert_close((grad * a).sum(dim=1), torch.zeros(len(a)), atol=1e-6, rtol=0)
    torch.testing.assert_close(sk.features(3.0 * a), sk.features(a), atol=1e-6, rtol=1e-5)


def test_seeded_hashes_and_round_trip():
    a = _rows().float()
    one = CountSketch.create(DIM, degree=2, n_components=100, seed=7)
    same = CountSketch.create(DIM, degree=2, n_components=100, seed=7)
    other = CountSketch.create(DIM, degree=2, n_components=100, seed=8)
    assert one.same_hashes(same) and not one.same_hashes(other)
    assert torch.equal(one.features(a), same.features(a))
    stored = one.tensors()
    assert stored["index_hash"].dtype == torch.int32 and stored["bit_hash"].dtype == torch.int8
    back = CountSketch.from_tensors(stored, 100, one.gamma, one.coef0)
    assert back.same_hashes(one)
    assert torch.equal(back.features(a), one.features(a))


def test_zero_row_gives_finite_values():
    sk = CountSketch.create(DIM, n_components=40)
    a = torch.zeros(2, DIM)
    assert torch.isfinite(sk.features(a)).all()
    assert torch.isfinite(sk.vjp(a, torch.ones(40))).all()


@pytest.mark.parametrize(("kwargs", "field"), [
    ({"degree": 0}, "params.degree"),
    ({"degree": 1.5}, "params.degree"),
    ({"n_components": 1}, "params.n_components"),
    ({"gamma": 0.0}, "params.gamma"),
    ({"gamma": float("nan")}, "params.gamma"),
    ({"coef0": -1.0}, "params.coef0"),
])
def test_bad_parameters_name_the_field(kwargs, field):
    with pytest.raises(SteerError) as info:
        CountSketch.create(DIM, **kwargs)
    assert info.value.field == field


def test_wrong_width_is_rejected():
    sk = CountSketch.create(DIM, n_components=40)
    with pytest.raises(SteerError, match="features"):
        sk.features(torch.ones(1, DIM + 1))

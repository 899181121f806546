"""Every backend's kernels agree with the NumPy reference (float64: 1e-10 relative) and are stable."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from backends import get_backend
from kernels import ACTIVATIONS

RTOL = 1e-10


@pytest.fixture
def reference():
    return get_backend("numpy").kernels


@pytest.fixture
def data():
    rng = np.random.default_rng(7)
    return {
        "x": rng.standard_normal((37, 23)),
        "W": rng.standard_normal((23, 11)) * 0.3,
        "b": rng.standard_normal(11),
        "dout": rng.standard_normal((37, 11)),
        "scores": rng.standard_normal((37, 10)) * 4,
        "labels": rng.integers(0, 10, 37),
    }


def close(backend, got, want, rtol=RTOL):
    got = backend.to_numpy(got)
    assert got.shape == np.shape(want) and got.dtype == np.asarray(want).dtype
    np.testing.assert_allclose(got, want, rtol=rtol, atol=0)


def test_affine(other_backend, reference, data):
    k, be = other_backend.kernels, other_backend
    x, W, b, dout = (be.asarray(data[n]) for n in ("x", "W", "b", "dout"))
    close(be, k.affine_forward(x, W, b), reference.affine_forward(data["x"], data["W"], data["b"]))
    got, want = k.affine_backward(dout, x, W), reference.affine_backward(data["dout"], data["x"], data["W"])
    for g_, w_ in zip(got, want, strict=True):
        close(be, g_, w_)
    assert k.affine_backward(dout, x, W, need_dx=False)[0] is None


@pytest.mark.parametrize("kind", ACTIVATIONS)
def test_activations(other_backend, reference, data, kind):
    be, k = other_backend, other_backend.kernels
    x = data["x"] * 3
    y_ref = reference.activation_forward(kind, x)
    y = k.activation_forward(kind, be.asarray(x))
    close(be, y, y_ref)
    dx_ref = reference.activation_backward(kind, data["x"], x, y_ref)
    close(be, k.activation_backward(kind, be.asarray(data["x"]), be.asarray(x), y), dx_ref)


def test_softmax_and_cross_entropy(other_backend, reference, data):
    be, k = other_backend, other_backend.kernels
    scores, labels = data["scores"], data["labels"]
    close(be, k.softmax(be.asarray(scores)), reference.softmax(scores))
    onehot = np.eye(10)[labels]
    for target in (labels, onehot):
        loss, probs = k.softmax_cross_entropy(be.asarray(scores), be.asarray(target))
        loss_ref, probs_ref = reference.softmax_cross_entropy(scores, target)
        close(be, loss, loss_ref)
        close(be, probs, probs_ref)
        close(
            be,
            k.softmax_cross_entropy_backward(probs, be.asarray(target), 2.0),
            reference.softmax_cross_entropy_backward(probs_ref, target, 2.0),
        )


def test_reference_cross_entropy_is_log_sum_exp(reference, data):
    scores, labels = data["scores"], data["labels"]
    loss, probs = reference.softmax_cross_entropy(scores, labels)
    direct = np.mean(np.log(np.exp(scores).sum(axis=1)) - scores[np.arange(len(labels)), labels])
    assert abs(float(loss) - direct) < 1e-13
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-14)
    grad = reference.softmax_cross_entropy_backward(probs, labels)
    np.testing.assert_allclose(grad, (probs - np.eye(10)[labels]) / len(labels), rtol=1e-14)
    np.testing.assert_array_equal(grad, reference.softmax_cross_entropy_backward(probs, np.eye(10)[labels]))


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_extremes_are_finite_without_warnings(backend, dtype):
    k = backend.kernels
    x = backend.asarray(np.array([[-1000.0, 1000.0, 0.0, -745.5, 709.9, -40.0]], dtype=dtype))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        y = backend.to_numpy(k.activation_forward("sigmoid", x))
        p = backend.to_numpy(k.softmax(x))
        loss, probs = k.softmax_cross_entropy(x, backend.asarray(np.array([0])))
    assert np.isfinite(y).all() and np.isfinite(p).all() and np.isfinite(float(loss))
    assert y[0, 0] == 0.0 and y[0, 1] == 1.0 and y[0, 2] == 0.5
    assert p[0, 1] == 1.0 and abs(float(loss) - 2000.0) < 1e-3 * 2000


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_dtype_is_preserved(backend, dtype):
    k = backend.kernels
    x = backend.asarray(np.ones((3, 4)), dtype=dtype)
    W = backend.asarray(np.ones((4, 2)), dtype=dtype)
    b = backend.asarray(np.zeros(2), dtype=dtype)
    assert k.affine_forward(x, W, b).dtype == np.dtype(dtype)
    for kind in ACTIVATIONS:
        assert k.activation_forward(kind, x).dtype == np.dtype(dtype)
    loss, probs = k.softmax_cross_entropy(x, backend.asarray(np.array([0, 1, 3])))
    assert probs.dtype == np.dtype(dtype)

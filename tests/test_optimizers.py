"""Optimizers: each update rule against hand-computed steps, in-place updates, state, bad settings."""

from __future__ import annotations

import math

import numpy as np
import pytest

from nets import TwoLayerNet
from nets.optimizers import OPTIMIZERS, SGD, AdaGrad, Adam, Momentum, RMSprop, get_optimizer

# Two parameters, two steps of gradients (a third, zero, where the rule keeps moving without one).
G1 = [0.5, -1.0]
G2 = [0.25, 2.0]
G3 = [0.0, 0.0]


def run_steps(optimizer, grads_per_step, start=(1.0, -2.0)):
    """Apply the steps to {"p": start}; returns the param array after each step (copies)."""
    params = {"p": np.array(start, dtype=np.float64)}
    original = params["p"]
    history = []
    for g in grads_per_step:
        optimizer.update(params, {"p": np.array(g, dtype=np.float64)})
        assert params["p"] is original, "update must change params in place"
        history.append(params["p"].copy())
    return history


def test_sgd_steps():
    steps = run_steps(SGD(lr=0.1), [G1, G2])
    np.testing.assert_allclose(steps[0], [0.95, -1.9], rtol=1e-15)
    np.testing.assert_allclose(steps[1], [0.925, -2.1], rtol=1e-15)


def test_momentum_steps():
    # v1 = -0.1 g1 = [-0.05, 0.1]; v2 = 0.9 v1 - 0.1 g2 = [-0.07, -0.11]; v3 = 0.9 v2 = [-0.063, -0.099]
    steps = run_steps(Momentum(lr=0.1, momentum=0.9), [G1, G2, G3])
    np.testing.assert_allclose(steps[0], [0.95, -1.9], rtol=1e-15)
    np.testing.assert_allclose(steps[1], [0.88, -2.01], rtol=1e-15)
    np.testing.assert_allclose(steps[2], [0.817, -2.109], rtol=1e-15)


def test_adagrad_steps():
    # h1 = [0.25, 1]; h2 = [0.3125, 5]; step = 0.1 g / (sqrt(h) + 1e-7)
    steps = run_steps(AdaGrad(lr=0.1), [G1, G2])
    first = [1 - 0.1 * 0.5 / (0.5 + 1e-7), -2 + 0.1 * 1.0 / (1.0 + 1e-7)]
    np.testing.assert_allclose(steps[0], first, rtol=1e-15)
    np.testing.assert_allclose(steps[0], [0.90000002, -1.90000001], atol=1e-9)
    second = [first[0] - 0.1 * 0.25 / (0.5590169943749474 + 1e-7), first[1] - 0.1 * 2.0 / (2.23606797749979 + 1e-7)]
    np.testing.assert_allclose(steps[1], second, rtol=1e-15)


def test_rmsprop_steps():
    # h1 = 0.01 g1^2 = [0.0025, 0.01]; h2 = 0.99 h1 + 0.01 g2^2 = [0.0031, 0.0499]
    steps = run_steps(RMSprop(lr=0.01, decay_rate=0.99), [G1, G2])
    first = [1 - 0.01 * 0.5 / (0.05 + 1e-7), -2 + 0.01 * 1.0 / (0.1 + 1e-7)]
    np.testing.assert_allclose(steps[0], first, rtol=1e-14)
    np.testing.assert_allclose(steps[0], [0.9, -1.9], atol=1e-6)  # the first step is ~10 lr * sign(g)
    second = [first[0] - 0.01 * 0.25 / (math.sqrt(0.0031) + 1e-7), first[1] - 0.01 * 2.0 / (math.sqrt(0.0499) + 1e-7)]
    np.testing.assert_allclose(steps[1], second, rtol=1e-14)


def test_adam_steps():
    # t=1: m = 0.1 g1 = [0.05, -0.1], v = 0.001 g1^2 = [0.00025, 0.001], lr_t = 0.001 sqrt(0.001) / 0.1
    # t=2: m = m + 0.1 (g2 - m) = [0.07, 0.11], v = v + 0.001 (g2^2 - v) = [0.00031225, 0.004999],
    #      lr_t = 0.001 sqrt(1 - 0.999^2) / (1 - 0.9^2) = 0.001 sqrt(0.001999) / 0.19
    steps = run_steps(Adam(lr=0.001, beta1=0.9, beta2=0.999), [G1, G2])
    lr_1 = 0.001 * math.sqrt(0.001) / 0.1
    first = [1 - lr_1 * 0.05 / (math.sqrt(0.00025) + 1e-7), -2 - lr_1 * -0.1 / (math.sqrt(0.001) + 1e-7)]
    np.testing.assert_allclose(steps[0], first, rtol=1e-14)
    np.testing.assert_allclose(steps[0], [0.999, -1.999], atol=1e-8)  # the first Adam step is ~lr * sign(g)
    lr_2 = 0.001 * math.sqrt(0.001999) / 0.19
    second = [
        first[0] - lr_2 * 0.07 / (math.sqrt(0.00031225) + 1e-7),
        first[1] - lr_2 * 0.11 / (math.sqrt(0.004999) + 1e-7),
    ]
    np.testing.assert_allclose(steps[1], second, rtol=1e-14)


def test_textbook_defaults():
    assert SGD().lr == 0.01
    assert (Momentum().lr, Momentum().momentum) == (0.01, 0.9)
    assert AdaGrad().lr == 0.01
    assert (RMSprop().lr, RMSprop().decay_rate) == (0.01, 0.99)
    assert (Adam().lr, Adam().beta1, Adam().beta2) == (0.001, 0.9, 0.999)


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_updates_the_net_in_place_and_keeps_dtype(name):
    net = TwoLayerNet(4, 3, 2, seed=1, dtype="float32")
    x, t = np.ones((2, 4), dtype=np.float32), np.array([0, 1])
    before = {k: p.copy() for k, p in net.params.items()}
    ids = {k: id(p) for k, p in net.params.items()}
    scores_before = net.predict(x).copy()
    get_optimizer(name).update(net.params, net.gradient(x, t))
    assert {k: id(p) for k, p in net.params.items()} == ids
    assert all(p.dtype == np.float32 for p in net.params.values())
    assert any(not np.array_equal(before[k], net.params[k]) for k in before)
    assert not np.array_equal(net.predict(x), scores_before), "the layers must see the updated arrays"


@pytest.mark.parametrize("name", ["momentum", "adagrad", "rmsprop", "adam"])
def test_state_round_trip_continues_bit_identically(name):
    rng = np.random.default_rng(3)
    grads = [{"a": rng.standard_normal((2, 3)), "b": rng.standard_normal(3)} for _ in range(4)]
    start = {"a": rng.standard_normal((2, 3)), "b": rng.standard_normal(3)}

    straight = {k: v.copy() for k, v in start.items()}
    opt = get_optimizer(name)
    for g in grads:
        opt.update(straight, g)

    resumed = {k: v.copy() for k, v in start.items()}
    first = get_optimizer(name)
    for g in grads[:2]:
        first.update(resumed, g)
    state = first.state_dict()
    assert state["iteration"] == 2
    second = get_optimizer(name)
    second.load_state_dict(state)
    assert set(second.state_dict()) == set(state)
    for g in grads[2:]:
        second.update(resumed, g)
    for k in start:
        np.testing.assert_array_equal(resumed[k], straight[k])


def test_load_state_rejects_other_optimizers_state():
    momentum = Momentum()
    momentum.update({"p": np.ones(2)}, {"p": np.ones(2)})
    adagrad = AdaGrad()
    adagrad.update({"p": np.ones(2)}, {"p": np.ones(2)})
    with pytest.raises(ValueError, match=r"not a Adam state: needs 'iteration' and keys '<m\|v>/<param>'"):
        Adam().load_state_dict(adagrad.state_dict())
    wrong_shape = Momentum()
    wrong_shape.load_state_dict(momentum.state_dict())
    with pytest.raises(ValueError, match=r"saved v\['p'\] has shape \(2,\)"):
        wrong_shape.update({"p": np.ones(3)}, {"p": np.ones(3)})


@pytest.mark.parametrize(
    ("cls", "kwargs", "message"),
    [
        (SGD, {"lr": 0.0}, r"lr must be in \(0, inf\); got 0.0"),
        (SGD, {"lr": -0.1}, r"lr must be in \(0, inf\); got -0.1"),
        (SGD, {"lr": float("nan")}, r"lr must be in \(0, inf\); got nan"),
        (SGD, {"lr": float("inf")}, r"lr must be in \(0, inf\); got inf"),
        (Momentum, {"momentum": 1.0}, r"momentum must be in \[0, 1\); got 1.0"),
        (Momentum, {"momentum": -0.5}, r"momentum must be in \[0, 1\); got -0.5"),
        (RMSprop, {"decay_rate": 0.0}, r"decay_rate must be in \(0, 1\); got 0.0"),
        (RMSprop, {"decay_rate": 1.0}, r"decay_rate must be in \(0, 1\); got 1.0"),
        (Adam, {"beta1": 1.0}, r"beta1 must be in \[0, 1\); got 1.0"),
        (Adam, {"beta2": 1.5}, r"beta2 must be in \[0, 1\); got 1.5"),
        (AdaGrad, {"lr": -1}, r"lr must be in \(0, inf\); got -1"),
    ],
)
def test_bad_hyperparameters(cls, kwargs, message):
    with pytest.raises(ValueError, match=message):
        cls(**kwargs)


@pytest.mark.parametrize("bad", ["0.1", None, True])
def test_non_numeric_lr_is_a_type_error(bad):
    with pytest.raises(TypeError, match="lr must be a number"):
        SGD(lr=bad)


def test_edge_values_are_accepted():
    assert Momentum(momentum=0.0).momentum == 0.0
    assert Adam(beta1=0.0, beta2=0.0).beta2 == 0.0
    assert SGD(lr=np.float32(0.5)).lr == 0.5


def test_grads_must_match_params_and_nothing_moves_otherwise():
    params = {"W1": np.ones((2, 2)), "b1": np.zeros(2)}
    opt = Adam()
    with pytest.raises(ValueError, match=r"missing \['b1'\], unexpected \['b2'\]"):
        opt.update(params, {"W1": np.ones((2, 2)), "b2": np.ones(2)})
    with pytest.raises(ValueError, match=r"grads\['b1'\] has shape \(3,\); params\['b1'\] has \(2,\)"):
        opt.update(params, {"W1": np.ones((2, 2)), "b1": np.ones(3)})
    np.testing.assert_array_equal(params["W1"], np.ones((2, 2)))
    np.testing.assert_array_equal(params["b1"], np.zeros(2))
    assert opt.iteration == 0


def test_get_optimizer():
    opt = get_optimizer("Adam", lr=0.01)
    assert isinstance(opt, Adam) and opt.lr == 0.01
    assert set(OPTIMIZERS) == {"sgd", "momentum", "adagrad", "rmsprop", "adam"}
    with pytest.raises(
        ValueError, match="unknown optimizer 'lbfgs'; valid names: sgd, momentum, adagrad, rmsprop, adam"
    ):
        get_optimizer("lbfgs")

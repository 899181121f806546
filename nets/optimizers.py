"""Parameter update rules of the textbook: SGD, Momentum, AdaGrad, RMSprop and Adam.

``update(params, grads)`` changes every array of ``params`` in place (numpy or cupy arrays; the
state arrays are made on the parameter's own device), so a net's layers see the new values.
The rules and constants are the ones of "Deep Learning from Scratch" (eps = 1e-7 added after
the square root; Adam's bias correction folded into the step size).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from backends import to_numpy

Array = Any
EPS = 1e-7


def _check_range(name: str, value: Any, low: float, high: float, low_open: bool, high_open: bool) -> float:
    """``value`` as a float inside the interval; ValueError naming the value and the interval."""
    interval = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(f"{name} must be a number in {interval}; got {value!r}")
    number = float(value)
    inside = (
        math.isfinite(number)
        and (number > low if low_open else number >= low)
        and (number < high if high_open else number <= high)
    )
    if not inside:
        raise ValueError(f"{name} must be in {interval}; got {value!r}")
    return number


def _check_lr(lr: Any) -> float:
    return _check_range("lr", lr, 0.0, math.inf, low_open=True, high_open=True)


def _check_fraction(name: str, value: Any, zero_allowed: bool = True) -> float:
    return _check_range(name, value, 0.0, 1.0, low_open=not zero_allowed, high_open=True)


class Optimizer:
    """Base class: checks that grads match params, keeps per-parameter state arrays.

    ``state_dict()`` returns the state as host numpy arrays (for checkpoints); ``load_state_dict``
    restores it exactly, onto the parameters' device at the next update.
    """

    state_names: tuple[str, ...] = ()

    def __init__(self, lr: float) -> None:
        self.lr = _check_lr(lr)
        self.iteration = 0
        self._state: dict[str, dict[str, Array]] = {name: {} for name in self.state_names}
        self._pending: dict[str, dict[str, np.ndarray]] = {name: {} for name in self.state_names}

    def update(self, params: Mapping[str, Array], grads: Mapping[str, Array]) -> None:
        """params[k] -= step(grads[k]) for every k, in place. grads: same keys and shapes as params."""
        if set(params) != set(grads):
            missing, extra = sorted(set(params) - set(grads)), sorted(set(grads) - set(params))
            raise ValueError(f"grads must have the same keys as params; missing {missing}, unexpected {extra}")
        for key, param in params.items():
            if tuple(grads[key].shape) != tuple(param.shape):
                raise ValueError(
                    f"grads[{key!r}] has shape {tuple(grads[key].shape)}; params[{key!r}] has {tuple(param.shape)}"
                )
        self.iteration += 1
        for key, param in params.items():
            self._step(key, param, grads[key])

    def _step(self, key: str, param: Array, grad: Array) -> None:
        raise NotImplementedError

    def _slot(self, name: str, key: str, param: Array) -> Array:
        """State array ``name`` for parameter ``key``: zeros like param at first, on param's device."""
        slots = self._state[name]
        if key not in slots:
            slot = np.zeros_like(param)  # dispatches to cupy.zeros_like for a cupy param
            pending = self._pending[name].pop(key, None)
            if pending is not None:
                if pending.shape != tuple(param.shape):
                    raise ValueError(
                        f"saved {name}[{key!r}] has shape {pending.shape}; params[{key!r}] has {tuple(param.shape)}"
                    )
                slot[...] = pending
            slots[key] = slot
        return slots[key]

    def state_dict(self) -> dict[str, np.ndarray]:
        """{"iteration": 0-d int64, "<state>/<param>": host array} (pending loaded state included)."""
        state = {"iteration": np.asarray(self.iteration, dtype=np.int64)}
        for name in self.state_names:
            for key, value in {**self._pending[name], **self._state[name]}.items():
                state[f"{name}/{key}"] = to_numpy(value).copy()
        return state

    def load_state_dict(self, state: Mapping[str, np.ndarray]) -> None:
        """Restore what state_dict() returned; the arrays move to the parameters' device at the next update."""
        unknown = [k for k in state if k != "iteration" and k.split("/", 1)[0] not in self.state_names]
        if "iteration" not in state or unknown:
            raise ValueError(
                f"not a {type(self).__name__} state: needs 'iteration' and keys "
                f"'<{'|'.join(self.state_names) or 'none'}>/<param>'; got {sorted(state)}"
            )
        self.iteration = int(state["iteration"])
        self._state = {name: {} for name in self.state_names}
        self._pending = {name: {} for name in self.state_names}
        for full_key, value in state.items():
            if full_key != "iteration":
                name, key = full_key.split("/", 1)
                self._pending[name][key] = np.array(value)

    def __repr__(self) -> str:
        settings = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_") and k != "iteration")
        return f"{type(self).__name__}({settings})"


class SGD(Optimizer):
    """p -= lr * g."""

    def __init__(self, lr: float = 0.01) -> None:
        super().__init__(lr)

    def _step(self, key: str, param: Array, grad: Array) -> None:
        param -= self.lr * grad


class Momentum(Optimizer):
    """v = momentum * v - lr * g; p += v (v starts at 0)."""

    state_names = ("v",)

    def __init__(self, lr: float = 0.01, momentum: float = 0.9) -> None:
        super().__init__(lr)
        self.momentum = _check_fraction("momentum", momentum)

    def _step(self, key: str, param: Array, grad: Array) -> None:
        v = self._slot("v", key, param)
        v *= self.momentum
        v -= self.lr * grad
        param += v


class AdaGrad(Optimizer):
    """h += g * g; p -= lr * g / (sqrt(h) + 1e-7)."""

    state_names = ("h",)

    def __init__(self, lr: float = 0.01) -> None:
        super().__init__(lr)

    def _step(self, key: str, param: Array, grad: Array) -> None:
        h = self._slot("h", key, param)
        h += grad * grad
        param -= self.lr * grad / (np.sqrt(h) + EPS)


class RMSprop(Optimizer):
    """h = decay_rate * h + (1 - decay_rate) * g * g; p -= lr * g / (sqrt(h) + 1e-7)."""

    state_names = ("h",)

    def __init__(self, lr: float = 0.01, decay_rate: float = 0.99) -> None:
        super().__init__(lr)
        self.decay_rate = _check_fraction("decay_rate", decay_rate, zero_allowed=False)

    def _step(self, key: str, param: Array, grad: Array) -> None:
        h = self._slot("h", key, param)
        h *= self.decay_rate
        h += (1 - self.decay_rate) * grad * grad
        param -= self.lr * grad / (np.sqrt(h) + EPS)


class Adam(Optimizer):
    """m += (1 - beta1)(g - m); v += (1 - beta2)(g^2 - v); p -= lr_t * m / (sqrt(v) + 1e-7),
    lr_t = lr * sqrt(1 - beta2^t) / (1 - beta1^t) at step t = 1, 2, ..."""

    state_names = ("m", "v")

    def __init__(self, lr: float = 0.001, beta1: float = 0.9, beta2: float = 0.999) -> None:
        super().__init__(lr)
        self.beta1 = _check_fraction("beta1", beta1)
        self.beta2 = _check_fraction("beta2", beta2)

    def _step(self, key: str, param: Array, grad: Array) -> None:
        t = self.iteration
        lr_t = self.lr * math.sqrt(1.0 - self.beta2**t) / (1.0 - self.beta1**t)
        m, v = self._slot("m", key, param), self._slot("v", key, param)
        m += (1 - self.beta1) * (grad - m)
        v += (1 - self.beta2) * (grad * grad - v)
        param -= lr_t * m / (np.sqrt(v) + EPS)


OPTIMIZERS: dict[str, type[Optimizer]] = {
    "sgd": SGD,
    "momentum": Momentum,
    "adagrad": AdaGrad,
    "rmsprop": RMSprop,
    "adam": Adam,
}


def get_optimizer(name: str, **hyperparameters: Any) -> Optimizer:
    """OPTIMIZERS[name.lower()](**hyperparameters); ValueError listing the valid names."""
    key = name.lower() if isinstance(name, str) else name
    if key not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; valid names: {', '.join(OPTIMIZERS)}")
    return OPTIMIZERS[key](**hyperparameters)

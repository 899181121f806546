"""Peers: the textbook's layered implementation (the baseline) and torch (autograd, gradcheck).

Same net, weights and batch as the gap group (784-50-10 sigmoid, batch 100, float64), on the
host. The textbook naive numerical gradient is timed over every parameter where the profile times
gradgap's naive loop over every parameter (standard, full), else on the very sample gradgap's
naive loop is timed on (the same seeded draw: extra_info sample_digest matches the gap group's),
so the two loops are compared on the same parameters in the same run. torch.autograd.gradcheck
runs over every parameter in the full profile, else over b1, W2 and b2 with W1 fixed, scaled to
all 39,760 (extra_info: estimate, scaled_from, estimate_how). torch is optional (`peers` extra).
"""

from __future__ import annotations

from functools import partial

import numpy as np
import pytest

from bench.common import (
    NUMERICAL_ATOL,
    SEED_BATCH,
    SEED_N_PARAMS,
    SEED_SIZES,
    STEP,
    assert_close,
    assert_same_computation,
    describe,
    flops_record,
    mark_estimate,
    measure,
    sample_parameters,
    values_at,
)
from bench.textbook import LOG_EPSILON, TextbookTwoLayerNet
from nets import TwoLayerNet

# The textbook's loss is -log(y + 1e-7), not -log(y): its central differences differ from the exact
# gradient by a relative (1e-7 / y) on the label's probability y, at most ~1e-5 here.
TEXTBOOK_RTOL = 1e-5
GRADCHECK_SAMPLE = ("b1", "W2", "b2")  # quick profile: gradcheck over these 560 parameters, W1 held fixed


def seed_twin(reference):
    return TwoLayerNet(*SEED_SIZES, seed=0, backend=reference.name)


def peer_group(method: str, n_sampled: int | None) -> str:
    label = f"peers {method} 784-50-10 B={SEED_BATCH} float64"
    return label if n_sampled is None else f"{label} on {n_sampled} params"


@pytest.mark.parametrize("method", ["backprop", "naive"])
def test_textbook(benchmark, reference, method, data, profile):
    """The baseline: Affine/Sigmoid/SoftmaxWithLoss objects in plain NumPy, and the textbook loop."""
    batch = data.first(SEED_BATCH)
    twin = seed_twin(reference)
    want = twin.gradient(batch.x, batch.t)
    textbook = TextbookTwoLayerNet({name: reference.to_numpy(p) for name, p in twin.params.items()})
    onehot = np.eye(SEED_SIZES[-1])[batch.t]
    n_sampled = None
    if method == "backprop":
        compute = partial(textbook.gradient, batch.x, onehot)

        def check(got):
            assert_same_computation(got, want, "float64", "textbook backprop")
    elif profile.naive_sample is None:
        compute = partial(textbook.numerical_gradient, batch.x, onehot)

        def check(got):
            assert_close(got, want, rtol=TEXTBOOK_RTOL, atol=NUMERICAL_ATOL, context="textbook naive vs backprop")
    else:
        sample = sample_parameters({name: p.shape for name, p in textbook.params.items()}, profile.naive_sample, seed=0)
        n_sampled = len(sample)
        compute = partial(textbook.numerical_gradient_at, batch.x, onehot, sample)

        def check(got):
            assert_close(
                got,
                values_at(want, sample),
                rtol=TEXTBOOK_RTOL,
                atol=NUMERICAL_ATOL,
                context=f"textbook naive at {n_sampled} sampled parameters vs backprop",
            )

    describe(
        benchmark,
        suite="peers",
        group=peer_group(method, n_sampled),
        backend="textbook",
        method=method,
        sizes=SEED_SIZES,
        n_params=SEED_N_PARAMS,
        batch=SEED_BATCH,
        dtype="float64",
        data=batch,
        profile=profile,
        log_epsilon=LOG_EPSILON,
        **flops_record(method, twin, batch.x),
    )
    if n_sampled is not None:
        mark_estimate(benchmark, n_sampled, SEED_N_PARAMS, sample=sample)
    measure(benchmark, reference, compute, check, profile, slow=method == "naive" and n_sampled is None)


@pytest.mark.parametrize("method", ["autograd", "gradcheck"])
def test_torch(benchmark, reference, method, data, profile):
    """torch on the CPU, float64: autograd backprop, and torch.autograd.gradcheck (eps = h = 1e-4)."""
    torch = pytest.importorskip("torch", reason="torch is not installed: pip install 'gradgap[peers]'")
    batch = data.first(SEED_BATCH)
    twin = seed_twin(reference)
    x, t = torch.from_numpy(batch.x), torch.from_numpy(batch.t)
    params = {name: torch.from_numpy(reference.to_numpy(p).copy()) for name, p in twin.params.items()}

    def loss(W1, b1, W2, b2):
        return torch.nn.functional.cross_entropy(torch.sigmoid(x @ W1 + b1) @ W2 + b2, t)

    n_sampled = None
    if method == "autograd":
        leaves = {name: p.requires_grad_() for name, p in params.items()}
        want = twin.gradient(batch.x, batch.t)

        def compute():
            return dict(zip(leaves, torch.autograd.grad(loss(**leaves), list(leaves.values())), strict=True))

        def check(got):
            assert_same_computation({k: g.numpy() for k, g in got.items()}, want, "float64", "torch autograd")

        compute()  # torch's first call sets up its thread pool and allocator: keep it out of the sizing call
    else:
        assert_same_computation(float(loss(**params)), twin.loss(batch.x, batch.t), "float64", "torch loss")
        names = tuple(params) if profile.gradcheck_all else GRADCHECK_SAMPLE
        inputs = tuple(params[name].requires_grad_() for name in names)
        fixed = {name: p for name, p in params.items() if name not in names}
        n_sampled = sum(p.numel() for p in inputs) if len(names) < len(params) else None

        def of_inputs(*values):
            return loss(**fixed, **dict(zip(names, values, strict=True)))

        compute = partial(torch.autograd.gradcheck, of_inputs, inputs, eps=STEP, atol=NUMERICAL_ATOL, rtol=0.0)

        def check(got):
            assert got is True, "torch.autograd.gradcheck did not pass"

    describe(
        benchmark,
        suite="peers",
        group=peer_group("backprop" if method == "autograd" else "naive", n_sampled),
        backend="torch",
        method=method,
        sizes=SEED_SIZES,
        n_params=SEED_N_PARAMS,
        batch=SEED_BATCH,
        dtype="float64",
        data=batch,
        profile=profile,
        threads=torch.get_num_threads(),
        torch_version=torch.__version__,
    )
    if n_sampled is not None:
        how = (
            f"torch.autograd.gradcheck over {', '.join(names)} ({n_sampled:,} parameters, W1 held fixed), scaled "
            f"by {SEED_N_PARAMS / n_sampled:,.1f} to all {SEED_N_PARAMS:,}: gradcheck perturbs each input element "
            "with two forward passes, so its time grows with the parameters it covers"
        )
        mark_estimate(benchmark, n_sampled, SEED_N_PARAMS, how=how)
    measure(benchmark, reference, compute, check, profile, slow=method == "gradcheck" and n_sampled is None)

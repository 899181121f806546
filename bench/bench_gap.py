"""The gap: naive, batched and incremental numerical gradients against backprop, on every backend.

Seed setting: TwoLayerNet(784, 50, 10) (sigmoid, 0.01 * N(0, 1) weights, seed 0) on the first 100
MNIST training images, float64: 39,760 parameters. Deep: MultiLayerNet(784, [100] * 4, 10)
(relu, He init), same batch. In the quick profile the naive method is timed on a random sample
of parameters and scaled to all of them (extra_info: estimate, scaled_from, scale); the sampled
timings sit in groups of their own so that each group compares like with like. The batched
method and the deep net's incremental method take tens of seconds a call on some backends: the
quick profile times them once and checks that result right after (a failing one is not saved).
"""

from __future__ import annotations

import pytest

from bench.common import (
    DEEP_HIDDEN,
    GAP_METHODS,
    SEED_BATCH,
    SEED_N_PARAMS,
    SEED_SIZES,
    GradientCase,
    describe,
    mark_estimate,
    measure,
)
from nets import MultiLayerNet, TwoLayerNet

DEEP_METHODS = ("backprop", "naive", "incremental")
SLOW = {("gap", "batched"), ("deep", "incremental")}  # tens of seconds a call: one timed call in quick


def seed_net(backend_name: str) -> TwoLayerNet:
    return TwoLayerNet(*SEED_SIZES, seed=0, backend=backend_name)


def deep_net(backend_name: str) -> MultiLayerNet:
    return MultiLayerNet(SEED_SIZES[0], list(DEEP_HIDDEN), SEED_SIZES[-1], seed=0, backend=backend_name)


def run_gap(benchmark, case: GradientCase, method: str, naive_sample: int | None, suite: str, profile) -> None:
    compute, check, n_sampled = case.gradient(method, naive_sample)
    label = f"{suite} {'-'.join(map(str, case.sizes))} B={case.batch} {case.dtype} [{case.backend.name}]"
    if n_sampled is not None:
        label += f" naive on {n_sampled} sampled params"
    describe(
        benchmark,
        suite=suite,
        group=label,
        backend=case.backend.name,
        method=method,
        sizes=case.sizes,
        n_params=case.n_params,
        batch=case.batch,
        dtype=case.dtype,
        data=case.data,
        profile=profile,
        activation=case.net.activation,
    )
    if n_sampled is not None:
        mark_estimate(benchmark, n_sampled, case.n_params)
    measure(benchmark, case.backend, compute, check, profile, slow=(suite, method) in SLOW)


@pytest.mark.parametrize("method", GAP_METHODS)
def test_gap(benchmark, backend, reference, method, data, profile):
    """One gradient of the seed setting by each method; backprop is each group's baseline."""
    case = GradientCase(backend, reference, data.first(SEED_BATCH), seed_net)
    assert case.n_params == SEED_N_PARAMS
    run_gap(benchmark, case, method, profile.naive_sample, "gap", profile)


@pytest.mark.parametrize("method", DEEP_METHODS)
def test_gap_deep(benchmark, backend, reference, method, data, profile):
    """MultiLayerNet(784, [100] * 4, 10): incremental against naive (always sampled) and backprop."""
    case = GradientCase(backend, reference, data.first(SEED_BATCH), deep_net)
    run_gap(benchmark, case, method, profile.deep_naive_sample, "deep", profile)

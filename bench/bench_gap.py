"""The gap: the naive, batched, incremental and series numerical gradients against backprop, on every backend.

Seed setting: TwoLayerNet(784, 50, 10) (sigmoid, 0.01 * N(0, 1) weights, seed 0) on the first 100
MNIST training images, float64: 39,760 parameters. Deep: MultiLayerNet(784, [100] * 4, 10)
(relu, He init), same batch. Where a profile samples the naive method (quick: the seed net; every
profile: the deep net), the library's own loop is timed on a random sample of parameters
(net.numerical_gradient(method="naive", entries=...)) and scaled to all of them (extra_info:
estimate, scaled_from, scale, estimate_how); the sampled timings sit in groups of their own so
that each group compares like with like. Slow calls (the batched method; the deep net's
incremental and batched methods; the naive loop over every parameter) are timed once in the quick
and standard profiles and checked right after (a failing one is not saved). The deep net's
batched method takes minutes a call: the full profile only. Every record carries
extra_info["flops"] (bench.common.flops_per_call) for the roofline.
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
    library_methods,
    mark_estimate,
    measure,
)
from nets import MultiLayerNet, TwoLayerNet

# Seconds to minutes a call: one timed call in the quick and standard profiles (so is naive over every parameter).
SLOW = {("gap", "batched"), ("deep", "incremental"), ("deep", "batched")}


def seed_net(backend_name: str) -> TwoLayerNet:
    return TwoLayerNet(*SEED_SIZES, seed=0, backend=backend_name)


def deep_net(backend_name: str) -> MultiLayerNet:
    return MultiLayerNet(SEED_SIZES[0], list(DEEP_HIDDEN), SEED_SIZES[-1], seed=0, backend=backend_name)


def skip_unless_offered(method: str) -> None:
    """Skip (with the reason) a method this version of nets does not have yet."""
    if method != "backprop" and method not in library_methods():
        pytest.skip(f"method {method!r} is not in this version of nets (it offers {', '.join(library_methods())})")


def run_gap(benchmark, case: GradientCase, method: str, naive_sample: int | None, suite: str, profile) -> None:
    compute, check, sample = case.gradient(method, naive_sample)
    label = f"{suite} {'-'.join(map(str, case.sizes))} B={case.batch} {case.dtype} [{case.backend.name}]"
    if sample is not None:
        label += f" naive on {len(sample)} sampled params"
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
        **case.flops(method),
    )
    if sample is not None:
        mark_estimate(benchmark, len(sample), case.n_params, sample=sample)
    slow = (suite, method) in SLOW or (method == "naive" and sample is None)
    measure(benchmark, case.backend, compute, check, profile, slow=slow)


@pytest.mark.parametrize("method", GAP_METHODS)
def test_gap(benchmark, backend, reference, method, data, profile):
    """One gradient of the seed setting by each method; backprop is each group's baseline."""
    skip_unless_offered(method)
    case = GradientCase(backend, reference, data.first(SEED_BATCH), seed_net, check_sample=profile.check_sample)
    assert case.n_params == SEED_N_PARAMS
    run_gap(benchmark, case, method, profile.naive_sample, "gap", profile)


@pytest.mark.parametrize("method", GAP_METHODS)
def test_gap_deep(benchmark, backend, reference, method, data, profile):
    """MultiLayerNet(784, [100] * 4, 10): every method against naive (always sampled) and backprop."""
    if method != "backprop" and method not in profile.deep_methods:
        pytest.skip(
            f"the deep net's {method} method is not in the {profile.name} profile (a whole gradient of this net "
            "takes seconds by incremental, minutes by batched): see bench.common.PROFILES"
        )
    skip_unless_offered(method)
    case = GradientCase(backend, reference, data.first(SEED_BATCH), deep_net, check_sample=profile.check_sample)
    run_gap(benchmark, case, method, profile.deep_naive_sample, "deep", profile)

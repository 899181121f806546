"""How each method's time grows: batch size, hidden width (TwoLayerNet) and depth (MultiLayerNet).

batch: TwoLayerNet(784, 50, 10) on the first B images; forward and backprop in float64 and
float32 up to 10,000, the numerical methods in float64. hidden: TwoLayerNet(784, H, 10), B = 100.
depth: MultiLayerNet(784, [100] * d, 10) (relu, He init), B = 100: backprop, naive, incremental
and series each over the profile's depths, so that the report can fit each one's slope. The naive
method is timed on a sample of parameters with the library's own loop and scaled (extra_info:
estimate, estimate_how); each group is one method over one sweep. Records carry extra_info["flops"].
"""

from __future__ import annotations

from functools import partial

import pytest

from bench.common import (
    PROFILES,
    SEED_BATCH,
    SEED_SIZES,
    GradientCase,
    assert_same_computation,
    describe,
    library_methods,
    mark_estimate,
    measure,
)
from nets import MultiLayerNet, TwoLayerNet

NUMERICAL = ("naive", "incremental", "series")


def sweep_cases(profile) -> list[tuple[str, int, str, str]]:
    """(sweep, value, method, dtype) for every point the profile measures."""
    cases = []
    for dtype in ("float64", "float32"):
        cases += [("batch", b, m, dtype) for m in ("forward", "backprop") for b in profile.backprop_batch_sizes]
    cases += [("batch", b, method, "float64") for method in NUMERICAL for b in profile.batch_sizes]
    cases += [("hidden", h, method, "float64") for method in ("backprop", *NUMERICAL) for h in profile.hidden_sizes]
    cases += [("depth", d, method, "float64") for method in ("backprop", "naive") for d in profile.depths]
    cases += [("depth", d, "incremental", "float64") for d in profile.incremental_depths]
    cases += [("depth", d, "series", "float64") for d in profile.series_depths]
    return cases


def pytest_generate_tests(metafunc):
    if "sweep" in metafunc.fixturenames:
        cases = sweep_cases(PROFILES[metafunc.config.getoption("--gap-profile")])
        metafunc.parametrize(
            ("sweep", "value", "method", "dtype"), cases, ids=[f"{s}={v}-{m}-{d}" for s, v, m, d in cases]
        )


def make_net(sweep: str, value: int, dtype: str, backend_name: str):
    if sweep == "depth":
        return MultiLayerNet(SEED_SIZES[0], [100] * value, SEED_SIZES[-1], seed=0, backend=backend_name, dtype=dtype)
    hidden = value if sweep == "hidden" else SEED_SIZES[1]
    return TwoLayerNet(SEED_SIZES[0], hidden, SEED_SIZES[-1], seed=0, backend=backend_name, dtype=dtype)


def test_scaling(benchmark, backend, reference, sweep, value, method, dtype, data, profile):
    if method in NUMERICAL and method not in library_methods():
        pytest.skip(f"method {method!r} is not in this version of nets (it offers {', '.join(library_methods())})")
    batch = data.first(value if sweep == "batch" else SEED_BATCH)
    net_of = partial(make_net, sweep, value, dtype)
    case = GradientCase(backend, reference, batch, net_of, dtype=dtype, check_sample=profile.check_sample)
    if method == "forward":
        want = case.twin.loss(case.rx, case.rt)
        compute = partial(case.net.loss, case.x, case.t)
        sample = None

        def check(got):
            assert_same_computation(got, want, dtype, f"{case.context} forward")
    else:
        compute, check, sample = case.gradient(method, profile.scaling_naive_sample)
    describe(
        benchmark,
        suite="scaling",
        group=f"scaling {sweep} {method} {dtype} [{backend.name}]",
        backend=backend.name,
        method=method,
        sizes=case.sizes,
        n_params=case.n_params,
        batch=case.batch,
        dtype=dtype,
        data=case.data,
        profile=profile,
        activation=case.net.activation,
        sweep=sweep,
        x=value,
        **case.flops(method),
    )
    if sample is not None:
        mark_estimate(benchmark, len(sample), case.n_params, sample=sample)
    measure(benchmark, backend, compute, check, profile)

"""The roofline's ceiling: the machine's float64 matmul rate, measured in the same run as the gradients.

One (n, n) @ (n, n) float64 product (n = DGEMM_SIZE = 1000: 2 n^3 = 2e9 floating-point operations)
through NumPy's BLAS, on the BLAS threads the rest of the suite uses (whatever the session has:
extra_info blas_threads). The report divides each gradient's counted FLOPs (extra_info["flops"])
by its time and compares that rate with this one. Checked against a product computed without BLAS.
"""

from __future__ import annotations

import numpy as np

from bench.common import DGEMM_SIZE, assert_close, blas_threads, describe, measure

CHECKED_ROWS = 4


def test_dgemm(benchmark, reference, profile):
    n = DGEMM_SIZE
    rng = np.random.default_rng(3)
    a, b = rng.standard_normal((n, n)), rng.standard_normal((n, n))
    want = (a[:CHECKED_ROWS, :, None] * b[None, :, :]).sum(axis=1)  # elementwise products, no BLAS

    def check(got):
        assert got.shape == (n, n) and got.dtype == np.float64, f"dgemm gave {got.shape} {got.dtype}"
        assert_close(got[:CHECKED_ROWS], want, rtol=1e-12, atol=1e-12 * n, context=f"dgemm {n}x{n}x{n}")

    describe(
        benchmark,
        suite="dgemm",
        group=f"dgemm {n}x{n}x{n} float64",
        backend=reference.name,
        method="dgemm",
        sizes=(n, n, n),
        n_params=0,
        batch=n,
        dtype="float64",
        data="random",
        profile=profile,
        flops=2.0 * n**3,
        flops_how=f"2 n^3 for an (n, n) @ (n, n) product, n = {n}",
        dgemm={"n": n, "dtype": "float64", "blas_threads": blas_threads()},
    )
    measure(benchmark, reference, np.matmul, check, profile, args=(a, b))

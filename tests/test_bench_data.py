"""Where the benchmark suite's data comes from (bench.common.load_data), and the synthetic stand-in.

Order: load_mnist's directory (GRADGAP_DATA_DIR, else its cache), the checkout's sibling
../shared/data/mnist, a download by load_mnist (a loopback HTTP server serving the real files
here), and only then synthetic data, with the reason recorded. Without network the fallback
must take seconds, not minutes.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

import bench.common
from bench.common import MNIST_FILE_NAMES, load_data, synthetic_batch
from nets.data import MNIST_FILES, load_mnist

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def nowhere(tmp_path, monkeypatch) -> Path:
    """No MNIST files anywhere: GRADGAP_DATA_DIR and the sibling checkout folder both point at empty folders."""
    empty = tmp_path / "empty-data"
    empty.mkdir()
    monkeypatch.setenv("GRADGAP_DATA_DIR", str(empty))
    monkeypatch.setattr(bench.common, "SHARED_MNIST", tmp_path / "no-shared")
    return empty


def closed_port() -> int:
    """A loopback port that nothing listens on (connections are refused at once)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_unreachable_mirror_falls_back_to_synthetic_fast_and_says_why(nowhere):
    url = f"http://127.0.0.1:{closed_port()}/"
    start = time.monotonic()
    batch = load_data(100, mirrors=[url])
    assert time.monotonic() - start < 15, "no network must fail in seconds"
    assert batch.source == "synthetic" and batch.origin == "synthetic" and batch.path is None
    assert batch.x.shape == (100, 784) and batch.t.shape == (100,)
    assert url in batch.reason and "accepted a connection" in batch.reason and str(nowhere) in batch.reason
    info = batch.info()
    assert info["data"] == "synthetic" and info["data_fallback_reason"] == batch.reason
    np.testing.assert_array_equal(batch.x, synthetic_batch(100).x)


def test_a_mirror_that_fails_the_download_falls_back_with_its_error(nowhere, server):
    batch = load_data(100, mirrors=[server.url("missing")])
    assert batch.source == "synthetic"
    assert "downloading into" in batch.reason and "HTTP 404" in batch.reason


def test_download_when_the_files_are_nowhere(nowhere, server, mnist_dir):
    before = {spec.name: server.count("ok", spec) for spec in MNIST_FILES.values()}
    batch = load_data(100, mirrors=[server.url("ok")])
    assert batch.source == "mnist" and batch.origin == "downloaded" and batch.path == str(nowhere)
    assert batch.reason is None and "data_fallback_reason" not in batch.info()
    for spec in MNIST_FILES.values():
        assert server.count("ok", spec) == before[spec.name] + 1
        assert hashlib.sha256((nowhere / spec.name).read_bytes()).hexdigest() == spec.sha256
    (x_train, t_train), _ = load_mnist(normalize=False, data_dir=mnist_dir)
    np.testing.assert_array_equal(batch.x, x_train[:100] / 255.0)
    np.testing.assert_array_equal(batch.t, t_train[:100])


def test_the_sibling_checkout_folder_comes_before_a_download(nowhere, server, mnist_dir, monkeypatch):
    monkeypatch.setattr(bench.common, "SHARED_MNIST", Path(mnist_dir))
    before = sum(server.count("ok", spec) for spec in MNIST_FILES.values())
    batch = load_data(10, mirrors=[server.url("ok")])
    assert batch.source == "mnist" and batch.origin == "shared" and batch.path == str(mnist_dir)
    assert sum(server.count("ok", spec) for spec in MNIST_FILES.values()) == before, "nothing was downloaded"
    assert not any(nowhere.iterdir())


def test_gradgap_data_dir_comes_first(tmp_path, mnist_dir, monkeypatch):
    own = tmp_path / "own"
    own.mkdir()
    for name in MNIST_FILE_NAMES:
        (own / name).symlink_to(Path(mnist_dir) / name)
    monkeypatch.setenv("GRADGAP_DATA_DIR", str(own))
    batch = load_data(10, mirrors=[f"http://127.0.0.1:{closed_port()}/"])
    assert batch.source == "mnist" and batch.origin == "GRADGAP_DATA_DIR" and batch.path == str(own)


def test_synthetic_data_is_sparse_like_mnist_per_pixel_and_per_column(mnist_dir):
    """About 500 of 784 columns are non-zero in MNIST's first 100 images; the synthetic ones must match."""
    synthetic = synthetic_batch(10_000)
    (x_train, _), _ = load_mnist(normalize=False, data_dir=mnist_dir)
    for n, tolerance in ((100, 40), (10_000, 40)):
        real_columns = int(np.count_nonzero((x_train[:n] != 0).any(axis=0)))
        columns = int(np.count_nonzero((synthetic.x[:n] != 0).any(axis=0)))
        assert abs(columns - real_columns) <= tolerance, f"first {n}: {columns} non-zero columns, MNIST {real_columns}"
        assert np.mean(synthetic.x[:n] != 0) == pytest.approx(np.mean(x_train[:n] != 0), abs=0.02)
    assert 450 <= int(np.count_nonzero((synthetic.x[:100] != 0).any(axis=0))) <= 550
    assert synthetic.x.min() == 0.0 and synthetic.x.max() <= 1.0 and synthetic.x.dtype == np.float64
    assert set(np.unique(synthetic.t)) == set(range(10)) and synthetic.t.dtype == np.int64


def test_the_suite_records_where_its_data_came_from(tmp_path):
    """A real benchmark run without MNIST anywhere: the JSON says synthetic, and why (extra_info, machine_info)."""
    out = tmp_path / "run.json"
    script = textwrap.dedent(f"""
        import sys
        from pathlib import Path
        import pytest
        import bench.common
        bench.common.SHARED_MNIST = Path({str(tmp_path / "no-shared")!r})
        sys.exit(pytest.main(["bench/bench_gap.py::test_gap[backend=numpy-backprop]", "-q", "-p", "no:cacheprovider",
                              "--benchmark-json={out}"]))
    """)
    env = {
        **os.environ,
        "GRADGAP_DATA_DIR": str(tmp_path / "empty"),
        "GRADGAP_MNIST_MIRRORS": f"http://127.0.0.1:{closed_port()}/",
    }
    command = [sys.executable, "-c", script]
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    doc = json.loads(out.read_text())
    (bench_record,) = doc["benchmarks"]
    info = bench_record["extra_info"]
    assert info["data"] == "synthetic" and info["data_origin"] == "synthetic"
    assert "accepted a connection" in info["data_fallback_reason"]
    assert doc["machine_info"]["gradgap"]["data"]["data_fallback_reason"] == info["data_fallback_reason"]

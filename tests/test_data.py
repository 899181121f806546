"""load_mnist on the canonical files, where it looks for them, and the IDX parser (incl. a fuzz test)."""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np
import pytest

# hypothesis is a dev-only library (".[dev]"): under the main install ".[numba,bench]" this module skips.
pytest.importorskip("hypothesis", reason="the fuzz tests need hypothesis: pip install -e '.[dev]'")
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nets.data import (
    MNIST_FILES,
    MnistDataError,
    atomic_file,
    default_data_dir,
    load_mnist,
    mirror_list,
    read_idx,
)
from tests.conftest import assert_by_rows

TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


def test_default_load_shapes_dtypes_and_known_statistics(mnist_dir):
    (x_train, t_train), (x_test, t_test) = load_mnist(data_dir=mnist_dir)
    assert (x_train.shape, x_train.dtype) == ((60000, 784), np.float32)
    assert (x_test.shape, x_test.dtype) == ((10000, 784), np.float32)
    assert (t_train.shape, t_train.dtype, t_test.shape, t_test.dtype) == ((60000,), np.int64, (10000,), np.int64)
    assert t_train[0] == 5
    assert np.bincount(t_train).tolist() == TRAIN_COUNTS
    assert np.bincount(t_test).tolist() == TEST_COUNTS
    assert 0.0 <= x_train.min() and x_train.max() == 1.0
    assert float(x_train.mean(dtype=np.float64)) == pytest.approx(33.3184 / 255, abs=1e-6)


def test_options_shape_the_arrays(mnist_dir):
    (x_train, t_train), (x_test, t_test) = load_mnist(
        normalize=False, flatten=False, one_hot_label=True, dtype="float64", data_dir=mnist_dir
    )
    assert (x_train.shape, x_train.dtype) == ((60000, 1, 28, 28), np.uint8)
    assert x_test.shape == (10000, 1, 28, 28) and x_train.max() == 255
    assert (t_train.shape, t_train.dtype, t_test.shape) == ((60000, 10), np.float64, (10000, 10))
    assert (t_train.sum(axis=1) == 1).all() and t_train[0].argmax() == 5
    (x64, _), _ = load_mnist(dtype="float64", data_dir=mnist_dir)
    flat = x_train.reshape(len(x_train), -1)
    assert_by_rows(np.testing.assert_array_equal, x64, lambda rows: flat[rows] / 255.0, flat.shape)


def test_each_call_returns_fresh_writable_arrays(mnist_dir):
    (x_raw, t_raw), _ = load_mnist(normalize=False, data_dir=mnist_dir)
    x_raw[:] = 0
    t_raw[:] = 9
    (x_again, t_again), _ = load_mnist(normalize=False, data_dir=mnist_dir)
    assert x_again.max() == 255 and t_again[0] == 5, "a caller's writes must not reach the cache"


def test_bad_dtype(mnist_dir):
    with pytest.raises(TypeError, match="dtype must be a floating-point dtype"):
        load_mnist(dtype="int32", data_dir=mnist_dir)


def test_data_dir_from_environment(mnist_dir, monkeypatch):
    monkeypatch.setenv("GRADGAP_DATA_DIR", str(mnist_dir))
    assert default_data_dir() == Path(mnist_dir)
    (_, t_train), _ = load_mnist(mirrors=[])  # no mirrors: it must not need to download
    assert t_train[0] == 5


def test_default_data_dir_is_a_user_cache(monkeypatch, tmp_path):
    monkeypatch.delenv("GRADGAP_DATA_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert default_data_dir() == tmp_path / "gradgap" / "mnist"
    monkeypatch.setenv("GRADGAP_DATA_DIR", "")  # empty counts as unset
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert default_data_dir() == Path.home() / ".cache" / "gradgap" / "mnist"


def test_mirror_list(monkeypatch):
    monkeypatch.delenv("GRADGAP_MNIST_MIRRORS", raising=False)
    assert mirror_list()[0].startswith("https://") and all(m.endswith("/") for m in mirror_list())
    monkeypatch.setenv("GRADGAP_MNIST_MIRRORS", " http://a.example/mnist , http://b.example/x/ ,")
    assert mirror_list() == ["http://a.example/mnist/", "http://b.example/x/"]
    assert mirror_list(["http://c.example"]) == ["http://c.example/"]
    with pytest.raises(TypeError, match="list of base URLs"):
        mirror_list("http://c.example/")


def test_missing_file_without_mirrors_is_a_clear_error(tmp_path):
    with pytest.raises(MnistDataError, match="train-images-idx3-ubyte.gz is missing and no download mirror"):
        load_mnist(data_dir=tmp_path, mirrors=[])


def test_cached_file_with_a_wrong_checksum_is_never_used(mnist_dir, tmp_path):
    for spec in MNIST_FILES.values():
        (tmp_path / spec.name).symlink_to(Path(mnist_dir) / spec.name)
    labels = tmp_path / MNIST_FILES["test_labels"].name
    labels.unlink()
    data = bytearray((Path(mnist_dir) / labels.name).read_bytes())
    data[100] ^= 0xFF
    labels.write_bytes(bytes(data))
    with pytest.raises(MnistDataError, match=r"t10k-labels-idx1-ubyte.gz is not the canonical .*Delete it"):
        load_mnist(data_dir=tmp_path, mirrors=["http://127.0.0.1:9/never-contacted/"])
    assert labels.read_bytes() == bytes(data), "the bad file is reported, not replaced behind the user's back"


def test_unreadable_cached_file(tmp_path):
    (tmp_path / MNIST_FILES["train_images"].name).mkdir()
    with pytest.raises(MnistDataError, match="cannot read .*train-images-idx3-ubyte.gz: .*delete or fix it"):
        load_mnist(data_dir=tmp_path, mirrors=[])


# --- the IDX parser -------------------------------------------------------------------------------------------


def idx_labels(values) -> bytes:
    return (2049).to_bytes(4, "big") + len(values).to_bytes(4, "big") + bytes(values)


def idx_images(n, rows, cols, fill=7) -> bytes:
    header = (2051).to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in (n, rows, cols))
    return header + bytes([fill]) * (n * rows * cols)


def test_read_idx_labels_and_images_from_bytes_and_paths(tmp_path):
    labels = read_idx(idx_labels([3, 1, 4]))
    assert labels.dtype == np.uint8 and labels.tolist() == [3, 1, 4]
    images = read_idx(gzip.compress(idx_images(2, 3, 4)))
    assert images.shape == (2, 3, 4) and (images == 7).all()
    path = tmp_path / "x.idx.gz"
    path.write_bytes(gzip.compress(idx_labels([9])))
    assert read_idx(path).tolist() == [9] and read_idx(str(path)).tolist() == [9]
    assert read_idx(idx_labels([])).shape == (0,)


def test_read_idx_on_the_real_label_file(mnist_dir):
    labels = read_idx(Path(mnist_dir) / "t10k-labels-idx1-ubyte.gz")
    assert labels.shape == (10000,) and np.bincount(labels).tolist() == TEST_COUNTS


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "too short for an IDX header: 0 bytes"),
        ((2050).to_bytes(4, "big") + bytes(8), "magic number 2050; expected 2049 .labels. or 2051 .images."),
        (b"\x00\x00\x08\x03\x00\x00", "truncated inside its header: 6 bytes, the header needs 16"),
        (idx_images(2, 3, 4)[:-1], r"is truncated: 39 bytes, dimensions \(2, 3, 4\) need 40"),
        (idx_labels([1, 2]) + b"\x00", r"longer than its header says: 11 bytes, dimensions \(2,\) need 10"),
        (gzip.compress(idx_labels([1, 2]))[:-3], "not a valid gzip file"),
        (b"\x1f\x8b" + bytes(30), "not a valid gzip file"),
    ],
)
def test_read_idx_rejects_malformed_data(data, message):
    with pytest.raises(MnistDataError, match=message):
        read_idx(data)


def test_read_idx_missing_path_and_wrong_type(tmp_path):
    with pytest.raises(MnistDataError, match="cannot read"):
        read_idx(tmp_path / "absent.gz")
    with pytest.raises(TypeError, match="path or bytes"):
        read_idx(42)


def check_parse(data: bytes) -> None:
    """The parser's whole contract: a consistent uint8 array, or MnistDataError; nothing else."""
    try:
        array = read_idx(data)
    except MnistDataError:
        return
    assert array.dtype == np.uint8 and array.ndim in (1, 3)


SEEDS = [idx_labels([0, 1, 2, 9]), idx_images(2, 2, 3, fill=200)]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=64))
def test_fuzz_random_bytes(data):
    check_parse(data)
    check_parse(b"\x1f\x8b" + data)
    check_parse(b"\x00\x00\x08\x03" + data)


@settings(max_examples=300, deadline=None)
@given(
    seed=st.sampled_from(SEEDS),
    compress=st.booleans(),
    edits=st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), max_size=4),
    cut=st.integers(0, 10_000),
    extra=st.binary(max_size=8),
)
def test_fuzz_mutated_valid_files(seed, compress, edits, cut, extra):
    data = bytearray(gzip.compress(seed) if compress else seed)
    for position, value in edits:
        data[position % len(data)] = value
    check_parse(bytes(data[: max(cut, len(data) // 2)]) + extra)


def test_atomic_file_replaces_whole_or_not_at_all(tmp_path):
    """The one atomic-write helper (downloads, checkpoints, curves, charts): a reader never sees half a file."""
    target = tmp_path / "checkpoint.npz"
    target.write_bytes(b"old contents")
    with pytest.raises(RuntimeError, match="interrupted mid-write"), atomic_file(target) as out:
        out.write(b"half of the new")
        raise RuntimeError("interrupted mid-write")
    assert target.read_bytes() == b"old contents" and sorted(p.name for p in tmp_path.iterdir()) == [target.name]
    with atomic_file(target) as out:
        assert Path(out.name).parent == tmp_path and not target.read_bytes().startswith(b"new")
        out.write(b"new contents")
    assert target.read_bytes() == b"new contents" and sorted(p.name for p in tmp_path.iterdir()) == [target.name]
    mask = os.umask(0)
    os.umask(mask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~mask  # not the temp file's 0600
    with atomic_file(tmp_path / "curves.json", mode="w") as out:
        out.write('{"ok": true}')
    assert (tmp_path / "curves.json").read_text() == '{"ok": true}'

"""Downloading MNIST from a real HTTP server on 127.0.0.1, and everything that can go wrong on the way.

The server serves the canonical files at /ok/<name> and damaged versions under other prefixes:
/missing/ (404), /truncated/ (a short file, honest Content-Length), /corrupt/ (one byte flipped),
/cut/ (full Content-Length, connection closed mid-body), /together/ (waits until two clients ask).
Only the first test downloads the 9.9 MB training images; the others pre-link the files they do
not exercise and download the small ones.
"""

from __future__ import annotations

import errno
import hashlib
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import nets.data
from nets.data import MNIST_FILES, MnistDataError, load_mnist

REPO = Path(__file__).resolve().parent.parent
SMALL = MNIST_FILES["test_labels"]  # 4,542 bytes: the file most fault tests download


@pytest.fixture
def data_dir(mnist_dir, tmp_path):
    """A cache directory holding links to every canonical file except the small test-label file."""
    target = tmp_path / "mnist"
    target.mkdir()
    for spec in MNIST_FILES.values():
        if spec is not SMALL:
            (target / spec.name).symlink_to(Path(mnist_dir) / spec.name)
    return target


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def leftovers(directory: Path) -> list[str]:
    """Temporary download files left behind (there must be none)."""
    return sorted(p.name for p in directory.iterdir() if p.name.startswith("."))


def test_downloads_all_four_files_from_the_environment_mirror(server, tmp_path, monkeypatch, capsys):
    target = tmp_path / "cache" / "mnist"  # created on demand
    monkeypatch.setenv("GRADGAP_DATA_DIR", str(target))
    monkeypatch.setenv("GRADGAP_MNIST_MIRRORS", server.url("missing") + "," + server.url("ok"))
    (x_train, t_train), (x_test, _) = load_mnist(progress=True)
    assert x_train.shape == (60000, 784) and x_test.shape == (10000, 784) and t_train[0] == 5
    for spec in MNIST_FILES.values():
        assert sha256(target / spec.name) == spec.sha256
        assert server.count("ok", spec) == 1 and server.count("missing", spec) == 1
    assert leftovers(target) == []
    assert "t10k-labels-idx1-ubyte.gz" in capsys.readouterr().err  # the tqdm bars went to stderr
    load_mnist()
    assert all(server.count("ok", spec) == 1 for spec in MNIST_FILES.values()), "a present file is not fetched"


def test_every_mirror_404(server, data_dir):
    with pytest.raises(MnistDataError) as info:
        load_mnist(data_dir=data_dir, mirrors=[server.url("missing")])
    message = str(info.value)
    assert "could not download t10k-labels-idx1-ubyte.gz" in message and "HTTP 404" in message
    assert "GRADGAP_MNIST_MIRRORS" in message and "GRADGAP_DATA_DIR" in message
    assert not (data_dir / SMALL.name).exists() and leftovers(data_dir) == []


@pytest.mark.parametrize(
    ("mode", "reason"),
    [
        ("truncated", r"got 2271 bytes with sha256 \w+; expected 4542 bytes"),
        ("corrupt", r"got 4542 bytes with sha256 \w+; expected 4542 bytes with sha256 f7ae60f9"),
        ("cut", "the connection closed after 2271 of 4542 bytes"),
    ],
)
def test_bad_downloads_never_reach_the_final_name(server, data_dir, mode, reason):
    with pytest.raises(MnistDataError, match=reason):
        load_mnist(data_dir=data_dir, mirrors=[server.url(mode)])
    assert not (data_dir / SMALL.name).exists() and leftovers(data_dir) == []


def test_a_bad_mirror_falls_through_to_a_good_one(server, data_dir):
    before = server.count("ok", SMALL)
    load_mnist(data_dir=data_dir, mirrors=[server.url("corrupt"), server.url("cut"), server.url("ok")])
    assert sha256(data_dir / SMALL.name) == SMALL.sha256
    assert server.count("ok", SMALL) == before + 1 and leftovers(data_dir) == []


def test_unreachable_mirror(data_dir):
    with socket.socket() as sock:  # a loopback port that is bound, so free, but never listened on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        with pytest.raises(MnistDataError, match=f"127.0.0.1:{port}/t10k-labels-idx1-ubyte.gz: cannot connect"):
            load_mnist(data_dir=data_dir, mirrors=[f"http://127.0.0.1:{port}"])
    assert leftovers(data_dir) == []


def test_disk_full_while_writing(server, data_dir, monkeypatch):
    def no_space(out, chunk):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(nets.data, "_write_chunk", no_space)
    before = server.count("ok", SMALL)
    with pytest.raises(MnistDataError, match=r"could not write .*\.part while downloading t10k-labels.*No space left"):
        load_mnist(data_dir=data_dir, mirrors=[server.url("ok"), server.url("ok")])
    assert server.count("ok", SMALL) == before + 1, "a local write failure must not be retried on other mirrors"
    assert not (data_dir / SMALL.name).exists() and leftovers(data_dir) == []


def test_unwritable_directory(server, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    with pytest.raises(MnistDataError, match="cannot create the MNIST directory .* set GRADGAP_DATA_DIR"):
        load_mnist(data_dir=blocker / "mnist", mirrors=[server.url("ok")])


def test_two_processes_downloading_at_once_both_succeed(server, data_dir):
    """Both processes request the first missing file; the server answers only when both have asked."""
    (data_dir / MNIST_FILES["train_labels"].name).unlink()  # two small files to fetch, the first one together
    script = textwrap.dedent(f"""
        import hashlib
        from nets.data import load_mnist
        (x, t), (xt, tt) = load_mnist(data_dir={str(data_dir)!r}, mirrors=[{server.url("together")!r}])
        print(hashlib.sha256(t.tobytes() + tt.tobytes()).hexdigest(), x.shape, xt.shape)
    """)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", script], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for _ in range(2)
    ]
    results = [proc.communicate(timeout=120) for proc in procs]
    for proc, (_, err) in zip(procs, results, strict=True):
        assert proc.returncode == 0, err
    assert results[0][0] == results[1][0] and "(60000, 784) (10000, 784)" in results[0][0]
    assert server.count("together", MNIST_FILES["train_labels"]) == 2, "both processes downloaded it at once"
    for spec in (MNIST_FILES["train_labels"], SMALL):
        assert sha256(data_dir / spec.name) == spec.sha256
    assert leftovers(data_dir) == []

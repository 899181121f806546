"""MNIST: the four canonical gzipped IDX files, checked, cached, downloaded atomically when absent.

Where the files live: the ``data_dir`` argument, else $GRADGAP_DATA_DIR, else a user cache
directory ($XDG_CACHE_HOME/gradgap/mnist, default ~/.cache/gradgap/mnist). A missing file is
downloaded from the first mirror that works ($GRADGAP_MNIST_MIRRORS, comma-separated base URLs,
overrides DEFAULT_MIRRORS) into a uniquely named temporary file next to its final place, its
SHA-256 checked, then renamed (os.replace), so a bad or interrupted download never appears under
the final name and several processes can download at once. A file whose SHA-256 is not the
canonical one is an error, never used.
"""

from __future__ import annotations

import contextlib
import functools
import gzip
import hashlib
import http.client
import logging
import os
import tempfile
import urllib.error
import urllib.request
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np

from nets.progress import Progress

logger = logging.getLogger(__name__)

DEFAULT_MIRRORS: tuple[str, ...] = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
)
IMAGE_MAGIC, LABEL_MAGIC = 2051, 2049
IMAGE_SIDE = 28
N_CLASSES = 10
CHUNK_BYTES = 1 << 20
TIMEOUT_S = 30.0


@dataclass(frozen=True)
class MnistFile:
    """One canonical file: its name, gzipped size and SHA-256, and what it decodes to."""

    name: str
    size: int
    sha256: str
    magic: int
    count: int


MNIST_FILES: dict[str, MnistFile] = {
    "train_images": MnistFile(
        "train-images-idx3-ubyte.gz",
        9912422,
        "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609",
        IMAGE_MAGIC,
        60000,
    ),
    "train_labels": MnistFile(
        "train-labels-idx1-ubyte.gz",
        28881,
        "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c",
        LABEL_MAGIC,
        60000,
    ),
    "test_images": MnistFile(
        "t10k-images-idx3-ubyte.gz",
        1648877,
        "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
        IMAGE_MAGIC,
        10000,
    ),
    "test_labels": MnistFile(
        "t10k-labels-idx1-ubyte.gz",
        4542,
        "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6",
        LABEL_MAGIC,
        10000,
    ),
}


class MnistDataError(RuntimeError):
    """An MNIST file is missing, corrupted, truncated or could not be downloaded or written."""


def default_data_dir() -> Path:
    """$GRADGAP_DATA_DIR, else $XDG_CACHE_HOME/gradgap/mnist, else ~/.cache/gradgap/mnist."""
    if os.environ.get("GRADGAP_DATA_DIR"):
        return Path(os.environ["GRADGAP_DATA_DIR"]).expanduser()
    cache_home = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache_home).expanduser() / "gradgap" / "mnist"


def mirror_list(mirrors: Sequence[str] | None = None) -> list[str]:
    """The mirrors to try, in order: the argument, else $GRADGAP_MNIST_MIRRORS, else DEFAULT_MIRRORS."""
    if mirrors is None:
        env = os.environ.get("GRADGAP_MNIST_MIRRORS", "")
        mirrors = [m for m in (part.strip() for part in env.split(",")) if m] or list(DEFAULT_MIRRORS)
    if isinstance(mirrors, str):
        raise TypeError(f"mirrors must be a list of base URLs, not the string {mirrors!r}")
    return [m if m.endswith("/") else m + "/" for m in mirrors]


def load_mnist(
    normalize: bool = True,
    flatten: bool = True,
    one_hot_label: bool = False,
    dtype: Any = "float32",
    data_dir: str | os.PathLike[str] | None = None,
    mirrors: Sequence[str] | None = None,
    progress: bool = False,
) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """(x_train, t_train), (x_test, t_test) as new numpy arrays (the caller may modify them).

    x: (N, 784) if flatten else (N, 1, 28, 28); pixel / 255 in ``dtype`` if normalize else uint8.
    t: (N, 10) one-hot in ``dtype`` if one_hot_label else int64 labels in [0, 10).
    N = 60000 (train) and 10000 (test). Missing files are downloaded (see the module docstring);
    any problem with a file raises MnistDataError saying which file and what to do.
    """
    float_dtype = np.dtype(dtype)
    if float_dtype.kind != "f":
        raise TypeError(f"dtype must be a floating-point dtype such as 'float32' or 'float64'; got {float_dtype}")
    directory = Path(data_dir).expanduser() if data_dir is not None else default_data_dir()
    paths = {key: ensure_file(spec, directory, mirrors, progress) for key, spec in MNIST_FILES.items()}
    arrays = {key: _decoded(path, MNIST_FILES[key]) for key, path in paths.items()}

    def images(raw: np.ndarray) -> np.ndarray:
        shaped = raw.reshape(raw.shape[0], -1) if flatten else raw.reshape(raw.shape[0], 1, IMAGE_SIDE, IMAGE_SIDE)
        if not normalize:
            return shaped.copy()
        scaled = shaped.astype(float_dtype)
        scaled /= float_dtype.type(255)
        return scaled

    def labels(raw: np.ndarray) -> np.ndarray:
        if one_hot_label:
            return np.eye(N_CLASSES, dtype=float_dtype)[raw]
        return raw.astype(np.int64)

    return (
        (images(arrays["train_images"]), labels(arrays["train_labels"])),
        (images(arrays["test_images"]), labels(arrays["test_labels"])),
    )


def ensure_file(spec: MnistFile, directory: Path, mirrors: Sequence[str] | None = None, progress: bool = False) -> Path:
    """directory / spec.name, downloaded first if absent; MnistDataError unless its SHA-256 is canonical."""
    path = directory / spec.name
    if not path.exists():
        download(spec, directory, mirrors, progress)
    try:
        digest, size = _sha256_of(path), path.stat().st_size
    except OSError as err:
        raise MnistDataError(f"cannot read {path}: {err}; delete or fix it, or set GRADGAP_DATA_DIR") from err
    if digest != spec.sha256:
        raise MnistDataError(
            f"{path} is not the canonical {spec.name}: sha256 {digest} ({size} bytes), expected {spec.sha256} "
            f"({spec.size} bytes); it is corrupted or truncated. Delete it to download it again, or set "
            "GRADGAP_DATA_DIR to a directory holding the canonical files."
        )
    return path


def download(spec: MnistFile, directory: Path, mirrors: Sequence[str] | None = None, progress: bool = False) -> Path:
    """Fetch spec.name from the first mirror that serves the canonical bytes into directory (atomically)."""
    urls = [base + spec.name for base in mirror_list(mirrors)]
    if not urls:
        raise MnistDataError(
            f"{directory / spec.name} is missing and no download mirror is configured; "
            "set GRADGAP_MNIST_MIRRORS or put the file there yourself"
        )
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise MnistDataError(
            f"cannot create the MNIST directory {directory}: {err}; set GRADGAP_DATA_DIR to a writable directory"
        ) from err
    failures = []
    for url in urls:
        logger.info("downloading %s from %s", spec.name, url)
        try:
            return _download_one(url, spec, directory, progress)
        except _MirrorFailed as failure:
            logger.info("%s: %s", url, failure)
            failures.append(f"{url}: {failure}")
    raise MnistDataError(
        f"could not download {spec.name} into {directory}; every mirror failed:\n  "
        + "\n  ".join(failures)
        + "\nCheck the network connection, set GRADGAP_MNIST_MIRRORS to mirrors that serve the canonical files "
        f"(comma-separated base URLs), or copy the four MNIST .gz files into {directory} "
        "(or set GRADGAP_DATA_DIR to where they are)."
    )


class _MirrorFailed(Exception):
    """This mirror did not deliver the canonical file; the next one may."""


def _write_chunk(out: IO[bytes], chunk: bytes) -> None:
    """Write one downloaded chunk (tests replace this to simulate a full disk)."""
    out.write(chunk)


def _download_one(url: str, spec: MnistFile, directory: Path, progress: bool) -> Path:
    """Stream url into a temp file in ``directory``, check size and SHA-256, rename to spec.name.

    Network or content problems raise _MirrorFailed; a local write problem raises MnistDataError.
    The temporary file is removed whatever happens unless it was renamed.
    """
    final = directory / spec.name
    writing = False
    try:
        with atomic_file(final, suffix=".part") as out:
            writing = True
            digest, received = _stream(url, spec, out, Path(out.name), progress)
            if received != spec.size or digest != spec.sha256:
                raise _MirrorFailed(
                    f"got {received} bytes with sha256 {digest}; expected {spec.size} bytes "
                    f"with sha256 {spec.sha256} (a different or damaged file)"
                )
    except OSError as err:  # creating the temp file, or flushing, syncing and renaming it
        if not writing:
            raise MnistDataError(
                f"cannot write into {directory} ({err.strerror}); set GRADGAP_DATA_DIR to a writable directory"
            ) from err
        raise _local_write_error(err, final, spec) from err
    return final


@contextlib.contextmanager
def atomic_file(path: Path, mode: str = "wb", suffix: str = ".tmp") -> Iterator[IO[Any]]:
    """A file to write ``path`` through: a uniquely named temp file next to it (its name in ``.name``).

    When the block ends normally the file is flushed, fsynced, given the usual permissions and
    renamed over ``path`` (os.replace, atomic); when it raises, the temp file is removed and
    ``path`` is untouched. A reader never sees a half-written ``path``.
    """
    out = tempfile.NamedTemporaryFile(mode, prefix=f".{path.name}.", suffix=suffix, dir=path.parent, delete=False)
    temp = Path(out.name)
    try:
        with out:
            yield out
            out.flush()
            os.fsync(out.fileno())
        os.chmod(temp, 0o666 & ~_umask())  # the temp file is 0600; the final one gets the usual permissions
        os.replace(temp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            temp.unlink()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _local_write_error(err: OSError, path: Path, spec: MnistFile) -> MnistDataError:
    return MnistDataError(
        f"could not write {path} while downloading {spec.name} ({err.strerror or err}); nothing was saved as "
        f"{spec.name}. Free some disk space (the four files take 11.6 MB) or set GRADGAP_DATA_DIR to another "
        "writable directory."
    )


def _stream(url: str, spec: MnistFile, out: IO[bytes], temp: Path, progress: bool) -> tuple[str, int]:
    """Copy the response body to ``out``; returns (sha256 hex, bytes received)."""
    sha = hashlib.sha256()
    received = 0
    request = urllib.request.Request(url, headers={"User-Agent": "gradgap-mnist/0.1"})
    try:
        with (
            urllib.request.urlopen(request, timeout=TIMEOUT_S) as response,
            Progress(progress, spec.size, spec.name, unit="B", unit_scale=True) as bar,
        ):
            declared = response.headers.get("Content-Length")
            while True:
                chunk = response.read(CHUNK_BYTES)
                if not chunk:
                    break
                received += len(chunk)
                if received > spec.size:
                    raise _MirrorFailed(f"the body is longer than the canonical {spec.size} bytes")
                sha.update(chunk)
                try:
                    _write_chunk(out, chunk)
                except OSError as err:
                    raise _local_write_error(err, temp, spec) from err
                bar.update(len(chunk))
    except urllib.error.HTTPError as err:
        raise _MirrorFailed(f"HTTP {err.code} {err.reason}") from err
    except urllib.error.URLError as err:
        raise _MirrorFailed(f"cannot connect ({err.reason})") from err
    except (http.client.HTTPException, OSError) as err:  # OSError: reset, timeout, refused mid-transfer
        raise _MirrorFailed(f"the transfer failed after {received} bytes ({type(err).__name__}: {err})") from err
    if declared is not None and declared.isdigit() and received != int(declared):
        raise _MirrorFailed(f"the connection closed after {received} of {declared} bytes (interrupted download)")
    return sha.hexdigest(), received


def _sha256_of(path: Path) -> str:
    stat = path.stat()
    return _sha256_cached(str(path), stat.st_mtime_ns, stat.st_size, stat.st_ino)


@functools.lru_cache(maxsize=32)
def _sha256_cached(path: str, mtime_ns: int, size: int, inode: int) -> str:
    """SHA-256 of a file, computed once per (path, mtime, size, inode)."""
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(CHUNK_BYTES), b""):
            sha.update(chunk)
    return sha.hexdigest()


_decoded_cache: dict[str, np.ndarray] = {}


def _decoded(path: Path, spec: MnistFile) -> np.ndarray:
    """The uint8 contents of a verified file: (N, 28, 28) images or (N,) labels, read-only.

    Cached by content (its SHA-256, already checked), so copies of a file in several
    directories are decoded once per process.
    """
    if spec.sha256 not in _decoded_cache:
        array = read_idx(path)
        expected = (spec.count, IMAGE_SIDE, IMAGE_SIDE) if spec.magic == IMAGE_MAGIC else (spec.count,)
        if array.shape != expected or (spec.magic == LABEL_MAGIC and array.max(initial=0) >= N_CLASSES):
            raise MnistDataError(f"{path} decodes to shape {array.shape}; expected {expected} (labels < {N_CLASSES})")
        array.setflags(write=False)
        _decoded_cache[spec.sha256] = array
    return _decoded_cache[spec.sha256]


def read_idx(source: str | os.PathLike[str] | bytes | bytearray | memoryview) -> np.ndarray:
    """Parse an IDX file (gzipped or not; a path or its bytes): magic 2049 -> (N,) labels,
    2051 -> (N, rows, cols) images, both uint8. Any malformed content raises MnistDataError."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        data, where = bytes(source), "IDX data"
    elif isinstance(source, (str, os.PathLike)):
        where = os.fspath(source)
        try:
            data = Path(source).read_bytes()
        except OSError as err:
            raise MnistDataError(f"cannot read {where}: {err}") from err
    else:
        raise TypeError(f"read_idx takes a path or bytes; got {type(source).__name__}")
    if data[:2] == b"\x1f\x8b":
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError, zlib.error) as err:
            raise MnistDataError(f"{where} is not a valid gzip file ({err}); it is truncated or corrupted") from err
    if len(data) < 4:
        raise MnistDataError(f"{where} is too short for an IDX header: {len(data)} bytes")
    magic = int.from_bytes(data[:4], "big")
    if magic not in (LABEL_MAGIC, IMAGE_MAGIC):
        raise MnistDataError(
            f"{where} has IDX magic number {magic}; expected {LABEL_MAGIC} (labels) or "
            f"{IMAGE_MAGIC} (images): not an MNIST file"
        )
    n_dims = 1 if magic == LABEL_MAGIC else 3
    header = 4 + 4 * n_dims
    if len(data) < header:
        raise MnistDataError(f"{where} is truncated inside its header: {len(data)} bytes, the header needs {header}")
    dims = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(n_dims))
    expected = header + int(np.prod(dims, dtype=object))
    if len(data) != expected:
        problem = "truncated" if len(data) < expected else "longer than its header says"
        raise MnistDataError(f"{where} is {problem}: {len(data)} bytes, dimensions {dims} need {expected}")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims)

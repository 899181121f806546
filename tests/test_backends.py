"""Backend registry: selection, errors, lazy imports, the Backend object."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest

import kernels
from backends import (
    BACKEND_NAMES,
    BackendError,
    BackendNotInstalledError,
    UnknownBackendError,
    available_backends,
    get_backend,
)
from tests.conftest import REPO


def run_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=REPO, capture_output=True, text=True)


def test_default_is_numpy(monkeypatch):
    monkeypatch.delenv("GRADGAP_BACKEND", raising=False)
    assert get_backend().name == "numpy"


def test_empty_environment_value_counts_as_unset(monkeypatch):
    monkeypatch.setenv("GRADGAP_BACKEND", "")
    assert get_backend().name == "numpy"


def test_environment_selects_and_argument_wins(monkeypatch):
    monkeypatch.setenv("GRADGAP_BACKEND", "numba")
    pytest.importorskip("numba", reason="numba not installed")
    assert get_backend().name == "numba"
    assert get_backend("numpy").name == "numpy"


@pytest.mark.parametrize("name", ["NumPy", "torch", "numpy ", "gpu"])
def test_unknown_name_lists_valid_names(name, monkeypatch):
    with pytest.raises(UnknownBackendError, match="valid names: numpy, numba, cupy") as info:
        get_backend(name)
    assert isinstance(info.value, ValueError) and isinstance(info.value, BackendError)
    monkeypatch.setenv("GRADGAP_BACKEND", name)
    with pytest.raises(UnknownBackendError, match="GRADGAP_BACKEND"):
        get_backend()


def test_backend_object(backend):
    assert backend.name in BACKEND_NAMES
    a = backend.asarray(np.arange(6.0).reshape(2, 3), dtype="float32")
    assert a.dtype == np.float32 and isinstance(backend.xp.asarray(a), type(a))
    np.testing.assert_array_equal(backend.to_numpy(a), np.arange(6.0).reshape(2, 3))
    backend.synchronize()
    for name in kernels.KERNEL_NAMES:
        assert callable(getattr(backend.kernels, name)), f"{backend.name} kernels lack {name}"
    assert get_backend(backend.name) is backend


def test_available_backends_contains_numpy():
    names = available_backends()
    assert names[0] == "numpy" and set(names) <= set(BACKEND_NAMES)


def test_importing_the_project_loads_neither_numba_nor_cupy():
    result = run_python(
        """
        import sys
        import backends, nets, nets.gradient, nets.layers, nets.optimizers, kernels
        net = nets.TwoLayerNet(4, 3, 2)
        loaded = [m for m in ("numba", "cupy") if m in sys.modules]
        assert not loaded, loaded
        """
    )
    assert result.returncode == 0, result.stderr


def test_missing_numba_names_the_extra_and_chains_the_cause():
    result = run_python(
        """
        import sys
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name == "numba" or name.startswith("numba."):
                    raise ImportError("No module named 'numba' (blocked for the test)")
        sys.meta_path.insert(0, Block())
        from backends import get_backend, BackendNotInstalledError
        try:
            get_backend("numba")
        except BackendNotInstalledError as err:
            assert isinstance(err, ImportError)
            assert "pip install 'gradgap[numba]'" in str(err), str(err)
            assert isinstance(err.__cause__, ImportError)
            print("ok")
        """
    )
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr


def test_not_installed_error_is_an_import_error():
    assert issubclass(BackendNotInstalledError, ImportError)

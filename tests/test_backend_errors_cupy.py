"""Asking for the cupy backend where it cannot work: cupy missing, or cupy without a usable CUDA device.

Each case runs in a fresh interpreter so that nothing leaks into this one. "Missing" is a meta-path
finder that makes ``import cupy`` fail whether or not cupy is installed. "No device" needs cupy itself
to answer getDeviceCount with an error, which the real cupy does only on a machine with cupy and no
usable driver: there a stand-in ``cupy`` package, first on sys.path, raises as the CUDA runtime does.
A fake module in a subprocess is acceptable here because the real situation cannot be staged in CI.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

BLOCK_CUPY = """
import sys

class NoCupy:
    def find_spec(self, name, path=None, target=None):
        if name == "cupy" or name.startswith("cupy."):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None

sys.meta_path.insert(0, NoCupy())
"""

REPORT_ERROR = """
import json
import sys

import backends

try:
    backends.get_backend(NAME)
    error = None
except Exception as err:
    error = {
        "type": type(err).__name__,
        "bases": [cls.__name__ for cls in type(err).__mro__],
        "message": str(err),
        "cause": type(err.__cause__).__name__ if err.__cause__ else None,
    }
print(json.dumps({
    "error": error,
    "available": backends.available_backends(),
    "kernels_loaded": "kernels.cupy_kernels" in sys.modules,
}))
"""


def run_python(code: str, *, first_on_path: Path | None = None, env_backend: str | None = None) -> dict:
    """Run code in a fresh interpreter from the repo root; returns the JSON it prints last."""
    env = {key: value for key, value in os.environ.items() if key not in ("GRADGAP_BACKEND", "PYTHONPATH")}
    env["PYTHONPATH"] = os.pathsep.join(([str(first_on_path)] if first_on_path else []) + [str(REPO)])
    if env_backend is not None:
        env["GRADGAP_BACKEND"] = env_backend
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def fake_cupy(tmp_path: Path, device_count_body: str) -> Path:
    """A directory holding a stand-in ``cupy`` whose cuda.runtime.getDeviceCount() runs the given body."""
    package = tmp_path / "fake" / "cupy"
    package.mkdir(parents=True)
    source = f'''
        """Stand-in for cupy on a machine without a usable CUDA device (tests/test_backend_errors_cupy.py)."""
        from types import SimpleNamespace

        class CUDARuntimeError(RuntimeError):
            pass

        def getDeviceCount():
            {device_count_body}

        cuda = SimpleNamespace(runtime=SimpleNamespace(getDeviceCount=getDeviceCount))
    '''
    (package / "__init__.py").write_text(textwrap.dedent(source))
    return package.parent


@pytest.mark.parametrize("how", ["argument", "GRADGAP_BACKEND"])
def test_missing_cupy_names_the_extras(how):
    name, env_backend = ("'cupy'", None) if how == "argument" else ("None", "cupy")
    report = run_python(BLOCK_CUPY + REPORT_ERROR.replace("NAME", name), env_backend=env_backend)
    error = report["error"]
    assert error is not None, "get_backend('cupy') succeeded although cupy cannot be imported"
    assert error["type"] == "BackendNotInstalledError"
    assert {"BackendError", "ImportError"} <= set(error["bases"])
    assert "gradgap[cuda12]" in error["message"] and "gradgap[cuda13]" in error["message"]
    assert error["cause"] == "ModuleNotFoundError"
    assert not report["kernels_loaded"]
    assert "cupy" not in report["available"] and "numpy" in report["available"]


def test_cupy_without_a_device_is_its_own_error(tmp_path):
    fake = fake_cupy(tmp_path, 'raise CUDARuntimeError("cudaErrorNoDevice: no CUDA-capable device is detected")')
    report = run_python(REPORT_ERROR.replace("NAME", "'cupy'"), first_on_path=fake)
    error = report["error"]
    assert error is not None and error["type"] == "NoCudaDeviceError"
    assert "BackendError" in error["bases"] and "ImportError" not in error["bases"]
    assert "no usable CUDA device" in error["message"] and "cudaErrorNoDevice" in error["message"]
    assert error["cause"] == "CUDARuntimeError"
    assert not report["kernels_loaded"]
    assert "cupy" not in report["available"]


def test_cupy_reporting_zero_devices_is_no_device(tmp_path):
    report = run_python(
        REPORT_ERROR.replace("NAME", "None"), first_on_path=fake_cupy(tmp_path, "return 0"), env_backend="cupy"
    )
    assert report["error"]["type"] == "NoCudaDeviceError"
    assert "0 devices" in report["error"]["message"]
    assert not report["kernels_loaded"]


def test_importing_backends_and_nets_never_imports_cupy(tmp_path):
    fake = fake_cupy(tmp_path, "return 1")
    (fake / "cupy" / "__init__.py").write_text('raise AssertionError("cupy was imported")\n')
    code = """
import json
import sys

import numpy as np

import backends
import nets
import nets.gradient
import nets.layers
from nets import MultiLayerNet, TwoLayerNet

net = TwoLayerNet(4, 3, 2, backend="numpy")
net.loss(np.ones((2, 4)), np.array([0, 1]))
MultiLayerNet(4, [3], 2, backend="numpy").numerical_gradient(np.ones((2, 4)), np.array([0, 1]), method="incremental")
backends.to_numpy(np.ones(2))
print(json.dumps({"cupy": "cupy" in sys.modules}))
"""
    assert run_python(code, first_on_path=fake) == {"cupy": False}

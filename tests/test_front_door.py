"""The front door: what a newcomer runs first works with only the libraries its install brings.

Each test runs the real command in a subprocess whose PYTHONPATH starts with a directory of
stand-in packages that raise ModuleNotFoundError on import: the same as those libraries not being
installed (matplotlib after `pip install -e .`; hypothesis, dask and ruff after the README's main
install `pip install -e ".[numba,bench]"`; SciPy, which no extra brings any more).
"""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SKIPPED_CHART = re.compile(r"^matplotlib is not installed: skipped (curves|losses)\.png \(pip install matplotlib")


def without(tmp_path: Path, *libraries: str) -> dict[str, str]:
    """An environment in which ``import <library>`` raises ModuleNotFoundError for each of ``libraries``."""
    shims = tmp_path / "not-installed"
    for name in libraries:
        package = shims / name
        package.mkdir(parents=True)
        # ModuleNotFoundError, as for a library that is absent (pytest.importorskip tells the two apart)
        (package / "__init__.py").write_text(
            f"raise ModuleNotFoundError(\"No module named '{name}' (test stand-in)\", name='{name}')\n"
        )
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(shims), str(REPO)])}


def run(env: dict[str, str], *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )


def test_the_stand_in_really_hides_the_library(tmp_path):
    done = run(without(tmp_path, "matplotlib"), "-c", "import matplotlib")
    assert done.returncode == 1 and "ModuleNotFoundError: No module named 'matplotlib'" in done.stderr


@pytest.mark.parametrize(
    ("module", "arguments", "chart"),
    [
        ("nets.train", ["--iters", "3", "--hidden", "5", "--batch-size", "10"], "curves.png"),
        ("nets.compare_optimizers", ["--iters", "2", "--batch-size", "8"], "losses.png"),
        ("nets.gradcheck", ["--batch", "1", "--method", "incremental"], None),
    ],
    ids=["train", "compare_optimizers", "gradcheck"],
)
def test_clis_run_without_matplotlib(tmp_path, mnist_dir, module, arguments, chart):
    out_dir = tmp_path / "out"
    extra = [] if module == "nets.gradcheck" else ["--no-progress", "--out", str(out_dir)]
    done = run(without(tmp_path, "matplotlib"), "-m", module, *arguments, *extra, "--data-dir", str(mnist_dir))
    assert done.returncode == 0, done.stdout + done.stderr
    output = (done.stdout + done.stderr).splitlines()
    mentions = [line for line in output if "matplotlib" in line]
    if chart is None:
        assert mentions == [], mentions  # nothing to plot: nothing to say
        return
    assert len(mentions) == 1 and SKIPPED_CHART.match(mentions[0]), output  # one clear line, no traceback
    assert chart in mentions[0] and "Traceback" not in done.stderr
    assert not (out_dir / chart).exists() and (out_dir / chart.replace(".png", ".json")).exists()


def test_himmelblau_runs_without_matplotlib(tmp_path):
    done = run(without(tmp_path, "matplotlib"), "-m", "examples.himmelblau", "--steps", "50", "--print-every", "25")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("step 0: x = [0.000999") and "final point" in done.stdout


@pytest.mark.parametrize("where", [[], ["bench"]], ids=["root", "bench"])
def test_benchmark_suite_collects_without_the_dev_libraries(tmp_path, where):
    """`pytest --benchmark-only` (root and bench/) after the main install: no collection error."""
    env = without(tmp_path, "hypothesis", "dask", "distributed", "ruff")
    # hypothesis's pytest plugin is installed here with hypothesis; a venv without hypothesis has neither
    plugins = ["-p", "no:hypothesispytest", "-p", "no:cacheprovider"]
    done = run(env, "-m", "pytest", *where, "--benchmark-only", "--collect-only", "-q", *plugins)
    tail = "\n".join((done.stdout + done.stderr).splitlines()[-40:])
    assert done.returncode == 0, tail
    assert not re.search(r"\b\d+ errors?\b", done.stdout) and "ImportError" not in done.stdout, tail
    assert re.search(r"\b\d+ tests? collected\b", done.stdout), tail
    if not where:  # the modules that need hypothesis say so instead of failing
        assert "need hypothesis" in done.stdout, tail


def test_numba_backend_without_scipy(tmp_path):
    """SciPy is in no extra: the numba backend works without it, and threadpoolctl still finds (and
    limits) the BLAS that numpy's GEMMs use, which the numba kernels rely on."""
    script = """
import numpy as np
from threadpoolctl import ThreadpoolController, threadpool_info
from backends import get_backend
from nets import TwoLayerNet
rng = np.random.default_rng(0)
x, t = rng.random((6, 20)), rng.integers(0, 4, 6)
grads = [TwoLayerNet(20, 7, 4, weight_init_std=0.3, backend=name).numerical_gradient(x, t, method="incremental")
         for name in ("numpy", "numba")]
assert all(np.allclose(grads[0][k], grads[1][k], rtol=0, atol=1e-9) for k in grads[0])
blas = [info for info in threadpool_info() if info["user_api"] == "blas"]
assert blas, "threadpoolctl sees no BLAS without scipy"
with ThreadpoolController().limit(limits=1, user_api="blas"):
    assert all(info["num_threads"] == 1 for info in threadpool_info() if info["user_api"] == "blas")
print("ok", sorted(info["internal_api"] for info in blas))
"""
    done = run(without(tmp_path, "scipy"), "-c", script)
    assert done.returncode == 0 and done.stdout.startswith("ok"), done.stdout + done.stderr


def test_no_njit_function_needs_scipy():
    """np.dot, @ and np.linalg inside an njit function need SciPy's BLAS bindings: none may use them
    (else scipy must go back into the numba extra). GEMMs stay outside njit, in numpy."""
    tree = ast.parse((REPO / "kernels" / "numba_kernels.py").read_text())
    offenders = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.FunctionDef) or not any("njit" in ast.unparse(d) for d in node.decorator_list):
            continue
        for sub in ast.walk(node):
            matmul = isinstance(sub, ast.BinOp) and isinstance(sub.op, ast.MatMult)
            named = isinstance(sub, ast.Attribute) and sub.attr in ("dot", "vdot", "matmul", "linalg", "inner")
            if matmul or named:
                offenders.append(f"{node.name} line {sub.lineno}: {ast.unparse(sub)[:60]}")
    assert offenders == [], "njit functions that need SciPy: " + "; ".join(offenders)


def test_ci_runs_exactly_the_readme_test_command():
    """.ci/run installs and tests exactly as the README's second command line says."""
    readme = (REPO / "README.md").read_text().splitlines()
    commands = [line.split("#")[0].strip() for line in readme if line.startswith("pip install -e ")]
    assert len(commands) >= 2 and "python -m pytest" in commands[1], commands
    ci = [line.strip() for line in (REPO / ".ci" / "run").read_text().splitlines()]
    assert commands[1] in ci, f"{commands[1]!r} is not a line of .ci/run"
    assert "--benchmark-disable" in commands[1]  # a correctness run of every benchmark, untimed

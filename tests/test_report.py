"""bench.report on a real (small) run of the benchmark suite, and its errors for unusable files."""

from __future__ import annotations

import json
import platform
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from bench.common import SEED_N_PARAMS, load_data
from bench.report import (
    INCREMENTAL_SHORTCUTS,
    ReportError,
    fmt_ratio,
    fmt_time,
    load_runs,
    main,
    slope,
    write_report,
)

REPO = Path(__file__).resolve().parent.parent
# A fast slice of the real suite (quick profile): the seed setting on NumPy without the batched
# method, the textbook baseline, one kernel and a two-point batch sweep of backprop.
SUBSET = (
    "bench/bench_gap.py::test_gap[backend=numpy-backprop]",
    "bench/bench_gap.py::test_gap[backend=numpy-naive]",
    "bench/bench_gap.py::test_gap[backend=numpy-incremental]",
    "bench/bench_peers.py::test_textbook",
    "bench/bench_kernels.py::test_kernel[affine_forward-float64-backend=numpy]",
    "bench/bench_scaling.py::test_scaling[batch=1-backprop-float64-backend=numpy]",
    "bench/bench_scaling.py::test_scaling[batch=10-backprop-float64-backend=numpy]",
)


@pytest.fixture(scope="module")
def run_json(tmp_path_factory) -> Path:
    """pytest-benchmark JSON written by the suite itself (the SUBSET above)."""
    path = tmp_path_factory.mktemp("results") / "run.json"
    command = [
        sys.executable,
        "-m",
        "pytest",
        *SUBSET,
        "-q",
        "-p",
        "no:cacheprovider",
        "--gap-profile=quick",
        f"--benchmark-json={path}",
    ]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return path


@pytest.fixture(scope="module")
def doc(run_json) -> dict:
    return json.loads(run_json.read_text())


@pytest.fixture(scope="module")
def report(run_json, tmp_path_factory) -> Path:
    return write_report([run_json], tmp_path_factory.mktemp("report"), command="test")


def gap_min(doc: dict, method: str) -> dict:
    (bench,) = [
        b for b in doc["benchmarks"] if b["extra_info"].get("suite") == "gap" and b["extra_info"]["method"] == method
    ]
    return bench


def test_suite_records_what_the_report_needs(doc):
    info = gap_min(doc, "incremental")["extra_info"]
    assert info["backend"] == "numpy" and info["n_params"] == SEED_N_PARAMS and info["batch"] == 100
    assert info["dtype"] == "float64" and info["data"] in ("mnist", "synthetic") and info["profile"] == "quick"
    assert isinstance(info["threads"], int) and info["threads"] >= 1
    naive = gap_min(doc, "naive")["extra_info"]
    assert naive["estimate"] is True and 0 < naive["scaled_from"] < SEED_N_PARAMS
    assert naive["scale"] == pytest.approx(SEED_N_PARAMS / naive["scaled_from"])
    machine = doc["machine_info"]["gradgap"]
    assert machine["profile"] == "quick" and machine["node"] == platform.node()
    assert machine["cpu_model"] and machine["versions"]["numpy"] == np.__version__
    assert any(lib["user_api"] == "blas" and lib["num_threads"] >= 1 for lib in machine["blas"])


def test_report_files_and_headline_table(report, doc):
    text = report.read_text()
    for chart in ("gap.png", "speedup.png", "kernels.png", "scaling.png", "throughput.png"):
        assert (report.parent / chart).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"({chart})" in text
    backprop, incremental = gap_min(doc, "backprop"), gap_min(doc, "incremental")
    naive = gap_min(doc, "naive")
    naive_s = naive["stats"]["min"] * naive["extra_info"]["scale"]
    assert (
        f"| numpy | incremental | {fmt_time(incremental['stats']['min'])} | "
        f"{fmt_ratio(incremental['stats']['min'] / backprop['stats']['min'])} |" in text
    )
    assert f"| numpy | naive | {fmt_time(naive_s)} | {fmt_ratio(naive_s / backprop['stats']['min'])} |" in text
    assert f"est. from {naive['extra_info']['scaled_from']:,} of {SEED_N_PARAMS:,} params" in text
    assert "| numpy | batched | not measured |" in text
    assert platform.node() in text
    data = gap_min(doc, "backprop")["extra_info"]["data"]
    assert ("real MNIST batch" in text) == (data == "mnist")
    for shortcut in INCREMENTAL_SHORTCUTS:
        assert shortcut in text


def test_targets_are_judged_from_the_run(report, doc):
    text = report.read_text()
    naive = gap_min(doc, "naive")
    ratio = naive["stats"]["min"] * naive["extra_info"]["scale"] / gap_min(doc, "incremental")["stats"]["min"]
    verdict = "PASS" if ratio >= 20 else "FAIL"
    assert f"| 4 | NumPy incremental ≥ 20× faster than NumPy naive | {fmt_ratio(ratio)} | {verdict} |" in text
    assert "| 4 | NumPy batched ≥ 1.5× faster than NumPy naive | n/a | n/a | missing: numpy batched |" in text
    assert "| 3 | NumPy backprop ≤ 0.75 × textbook layered backprop |" in text


def test_scaling_slopes_in_the_report(report):
    assert "| batch | numpy | backprop | float64 | 1, 10 |" in report.read_text()


def test_merged_runs_name_their_machines(run_json, tmp_path):
    other = tmp_path / "gpu-run.json"
    doc = json.loads(run_json.read_text())
    doc["machine_info"]["gradgap"]["node"] = "gpu-box"
    other.write_text(json.dumps(doc))
    runs = load_runs([run_json, other])
    assert runs[1].label.startswith("gpu-box") and runs[0].label != runs[1].label
    text = write_report([run_json, other], tmp_path / "out").read_text()
    assert "| machine | backend | method |" in text
    for run in runs:
        assert f"| {run.label} | numpy | incremental |" in text


def test_synthetic_data_is_reported_as_such(run_json, tmp_path):
    doc = json.loads(run_json.read_text())
    for bench in doc["benchmarks"]:
        bench["extra_info"]["data"] = "synthetic"
    path = tmp_path / "synthetic.json"
    path.write_text(json.dumps(doc))
    text = write_report([path], tmp_path / "out").read_text()
    assert "synthetic data of MNIST's shape" in text and "real MNIST" not in text


def test_cli_from_saved_results(run_json, tmp_path, capsys):
    assert main(["--from", str(run_json), "--out", str(tmp_path / "cli")]) == 0
    out = capsys.readouterr().out
    assert "| numpy | incremental |" in out and "report written to" in out
    assert (tmp_path / "cli" / "REPORT.md").exists()


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "no such results file"),
        ("", "the file is empty"),
        ("  \n", "the file is empty"),
        ('{"benchmarks": [', "malformed JSON at line 1"),
        ("[]", "not a pytest-benchmark results file"),
        ('{"benchmarks": [{"name": "x", "stats": {"min": 1.0}}]}', "holds no gradgap benchmarks"),
        (
            '{"benchmarks": [{"name": "x", "extra_info": {"suite": "gap"}, "stats": {"min": 1.0}}]}',
            "lacks a usable field",
        ),
    ],
    ids=["missing", "empty", "blank", "truncated", "not-benchmarks", "not-gradgap", "no-backend"],
)
def test_unusable_results_files(tmp_path, capsys, content, message):
    path = tmp_path / "results.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(ReportError, match=message) as err:
        write_report([path], tmp_path / "out")
    assert str(path) in str(err.value)
    assert main(["--from", str(path), "--out", str(tmp_path / "out")]) == 2
    assert f"error: {path}" in capsys.readouterr().err
    assert not (tmp_path / "out" / "REPORT.md").exists()


def test_cli_exit_code_2_in_a_subprocess(tmp_path):
    missing = tmp_path / "nope.json"
    done = subprocess.run(
        [sys.executable, "-m", "bench.report", "--from", str(missing), "--out", str(tmp_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2 and f"error: {missing}: no such results file" in done.stderr


def test_slope_of_a_power_law():
    assert slope([(1, 2.0), (10, 20.0), (100, 200.0)]) == pytest.approx(1.0)
    assert slope([(10, 1.0), (100, 100.0)]) == pytest.approx(2.0)
    assert slope([(10, 1.0)]) is None


def test_synthetic_data_has_mnist_shape_and_sparsity(monkeypatch, tmp_path):
    monkeypatch.setenv("GRADGAP_DATA_DIR", str(tmp_path))  # no MNIST files there
    monkeypatch.setattr("bench.common.SHARED_MNIST", tmp_path)
    batch = load_data(100)
    assert batch.source == "synthetic" and batch.x.shape == (100, 784) and batch.t.shape == (100,)
    assert 0.15 < np.mean(batch.x > 0) < 0.23 and batch.x.min() == 0.0 and batch.x.max() <= 1.0
    assert set(np.unique(batch.t)) <= set(range(10))
    np.testing.assert_array_equal(load_data(100).x, batch.x)  # seeded

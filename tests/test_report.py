"""bench.report on a real (small) run of the CLI and on the committed full-profile results, and its errors.

The CLI runs once, in a subprocess, on a small selection of the real suite (quick profile,
GRADGAP_BACKEND=numpy): its progress bars, log file, terminal table and report are checked. The
committed run bench/results/vm-20261123-122834.json (full profile, written before the suite recorded
estimate_how, flops or data reasons) checks the estimate markers of the sweeps, the distributed
figure and that an older file still renders.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from bench.common import PROFILES, SEED_N_PARAMS
from bench.report import ReportError, load_runs, write_report
from bench.report.charts import chart_gap, chart_scaling, chart_speedup, chart_texts
from bench.report.cli import DEFAULT_PROFILE, build_parser, main
from bench.report.formatting import fmt_rate, fmt_ratio, fmt_time
from bench.report.render import render
from bench.report.results import slope
from bench.report.run_plugin import phase_of
from nets.markdown import markdown_table

REPO = Path(__file__).resolve().parent.parent
COMMITTED = REPO / "bench" / "results" / "vm-20261123-122834.json"
GPU_RUN = REPO / "bench" / "results" / "h200-20261204-181142.json"
# A fast slice of the real suite: the seed setting on NumPy without batched (seconds a call) and series,
# the textbook baseline and the dgemm rate; the quick profile times both naive loops on one sample of parameters.
SELECTION = "(test_gap[ and numpy and (backprop or naive or incremental)) or test_textbook or test_dgemm"


@pytest.fixture(scope="module")
def cli(tmp_path_factory) -> SimpleNamespace:
    """`GRADGAP_BACKEND=numpy python -m bench.report --profile quick -k SELECTION`, run for real."""
    root = tmp_path_factory.mktemp("cli")
    out, results = root / "report", root / "results"
    env = {**os.environ, "GRADGAP_BACKEND": "numpy"}
    command = [sys.executable, "-m", "bench.report", "--profile", "quick", "-k", SELECTION]
    command += ["--out", str(out), "--results", str(results)]
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, timeout=600)  # bytes: keep the \r
    stdout, stderr = done.stdout.decode(), done.stderr.decode()
    assert done.returncode == 0, stdout[-3000:] + stderr[-3000:]
    (json_path,) = results.glob("*.json")
    return SimpleNamespace(
        stdout=stdout, stderr=stderr, out=out, json_path=json_path, doc=json.loads(json_path.read_text())
    )


@pytest.fixture(scope="module")
def report_text(cli) -> str:
    return (cli.out / "REPORT.md").read_text()


@pytest.fixture(scope="module")
def committed() -> str:
    """REPORT.md's text for the committed full run (no charts drawn)."""
    return render(load_runs([COMMITTED]), [], "test", REPO / "report")


def gap_bench(doc: dict, method: str, suite: str = "gap") -> dict:
    (bench,) = [
        b for b in doc["benchmarks"] if b["extra_info"].get("suite") == suite and b["extra_info"]["method"] == method
    ]
    return bench


# --------------------------------------------------------------------------------- the CLI's run


def test_progress_is_one_bar_per_phase_and_pytest_output_goes_to_the_log(cli):
    assert "pytest's output: " in cli.stdout
    log = Path(cli.stdout.split("pytest's output: ", 1)[1].split()[0])
    assert log.parent == cli.json_path.parent and log.exists()
    assert "bench/bench_gap.py" in log.read_text() and "passed" in log.read_text()
    final = [line.rsplit("\r", 1)[-1] for line in cli.stderr.split("\n")]  # what stays on a terminal
    bars = [line for line in final if "|" in line and "100%" in line]
    assert "6 benchmarks in 3 phases" in final
    assert [bar.split()[0].rstrip(":") for bar in bars] == ["dgemm", "gap", "peers"]
    assert "1/1" in bars[0] and "gap: numpy 100%" in bars[1] and "3/3" in bars[1] and "2/2" in bars[2]
    for noise in ("PASSED", "SKIPPED", "::test_gap", "benchmark:"):  # pytest's own lines stay in the log
        assert noise not in cli.stdout and noise not in cli.stderr


def test_terminal_shows_the_headline_table_and_the_paths(cli):
    assert "| backend | method | time per gradient |" in cli.stdout and "| numpy | incremental |" in cli.stdout
    assert f"report: {cli.out / 'REPORT.md'}" in cli.stdout
    assert f"results: {cli.json_path}" in cli.stdout
    charts = cli.stdout.split("charts: ", 1)[1].split("\n", 1)[0].split(", ")
    assert str(cli.out / "gap.png") in charts
    for chart in charts:
        assert Path(chart).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_suite_records_what_the_report_needs(cli):
    info = gap_bench(cli.doc, "incremental")["extra_info"]
    assert info["backend"] == "numpy" and info["n_params"] == SEED_N_PARAMS and info["batch"] == 100
    assert info["dtype"] == "float64" and info["data"] in ("mnist", "synthetic") and info["profile"] == "quick"
    assert isinstance(info["threads"], int) and info["threads"] >= 1
    assert info["flops"] > 0 and info["flops_how"]
    naive = gap_bench(cli.doc, "naive")["extra_info"]
    assert naive["estimate"] is True and 0 < naive["scaled_from"] < SEED_N_PARAMS and naive["estimate_how"]
    assert naive["scale"] == pytest.approx(SEED_N_PARAMS / naive["scaled_from"])
    machine = cli.doc["machine_info"]["gradgap"]
    assert machine["profile"] == "quick" and machine["node"] == platform.node()
    assert machine["cpu_model"] and machine["versions"]["numpy"] == np.__version__
    assert any(lib["user_api"] == "blas" and lib["num_threads"] >= 1 for lib in machine["blas"])
    record = cli.doc["machine_info"]["gradgap_run"]
    assert record["backends"]["numba"] == "not selected (GRADGAP_BACKEND=numpy)" and record["selected"] == ["numpy"]
    assert record["outcomes"] == {"numpy": {"passed": 3, "failed": 0, "skipped": 0}}


def test_headline_table_marks_the_estimate(cli, report_text):
    backprop, incremental = gap_bench(cli.doc, "backprop"), gap_bench(cli.doc, "incremental")
    naive = gap_bench(cli.doc, "naive")
    naive_s = naive["stats"]["min"] * naive["extra_info"]["scale"]
    assert (
        f"| numpy | incremental | {fmt_time(incremental['stats']['min'])} | "
        f"{fmt_ratio(incremental['stats']['min'] / backprop['stats']['min'])} |" in report_text
    )
    assert (
        f"| numpy | naive | {fmt_time(naive_s)} (est.) | {fmt_ratio(naive_s / backprop['stats']['min'])} (est.) |"
        in report_text
    )
    assert f"est.: {naive['extra_info']['estimate_how']} |" in report_text
    assert "| numpy | batched | not measured |" in report_text
    assert platform.node() in report_text


def test_report_says_which_backends_ran_and_why_the_others_did_not(report_text):
    assert (
        "Backends: ran: numpy; did not run: numba (not selected (GRADGAP_BACKEND=numpy)); "
        "cupy (not selected (GRADGAP_BACKEND=numpy))." in report_text
    )


def test_report_says_where_the_data_came_from(cli, report_text):
    info = gap_bench(cli.doc, "backprop")["extra_info"]
    if info["data"] == "mnist":
        assert "Data: the real MNIST batch" in report_text and info["data_path"] in report_text
    else:
        assert (
            f"synthetic data of MNIST's shape and sparsity, not real MNIST: the MNIST files could not be used, "
            f"because {info['data_fallback_reason']}" in report_text
        )


def test_targets_are_judged_from_the_run(cli, report_text):
    naive = gap_bench(cli.doc, "naive")
    value = naive["stats"]["min"] * naive["extra_info"]["scale"] / gap_bench(cli.doc, "incremental")["stats"]["min"]
    verdict = "PASS" if value >= 20 else "FAIL"
    assert f"| NumPy incremental ≥ 20× faster than NumPy naive | {fmt_ratio(value)} (est.) | {verdict} |" in report_text
    assert (
        "| NumPy batched ≥ 1.5× faster than NumPy naive | not measured | not measured | missing: numpy batched |"
        in report_text
    )
    assert (
        "| Numba series ≤ 3× Numba backprop | not measured | not measured | missing: numba series, numba backprop "
        "(numba did not run: not selected (GRADGAP_BACKEND=numpy)) |" in report_text
    )
    assert "| NumPy backprop ≤ 0.75 × textbook layered backprop |" in report_text
    ours, book = gap_bench(cli.doc, "naive"), gap_bench(cli.doc, "naive", suite="peers")
    assert ours["extra_info"]["sample_digest"] == book["extra_info"]["sample_digest"]  # the same parameters
    value = ours["stats"]["min"] / book["stats"]["min"]
    assert (
        "| NumPy naive loop no slower than the textbook's own loop (same parameters, same run) | "
        f"{fmt_ratio(value)} | {'PASS' if value <= 1 else 'FAIL'} | both loops on the same "
        f"{ours['extra_info']['scaled_from']:,} parameters |" in report_text
    )
    targets = report_text.split("## Targets", 1)[1].split("\n## ", 1)[0]
    unmeasured = [row for row in targets.splitlines() if "| not measured |" in row]
    assert unmeasured and all(row.split(" | ")[3] == "not measured" for row in unmeasured)  # never PASS


def test_roofline_table(cli, report_text):
    assert "## Roofline" in report_text
    for method in ("backprop", "incremental"):
        bench = gap_bench(cli.doc, method)
        flops, seconds = bench["extra_info"]["flops"], bench["stats"]["min"]
        assert (
            f"| seed net | numpy | {method} | {fmt_rate(flops)} | {fmt_time(seconds)} | {flops / seconds / 1e9:.3g} |"
            in report_text
        )
    dgemm = gap_bench(cli.doc, "dgemm", suite="dgemm")
    peak = dgemm["extra_info"]["flops"] / dgemm["stats"]["min"]
    assert (
        f"| dgemm | numpy | (1000, 1000) @ (1000, 1000) float64, {dgemm['extra_info']['dgemm']['blas_threads']} "
        f"BLAS threads | 2 G | {fmt_time(dgemm['stats']['min'])} | {peak / 1e9:.3g} | 100% |" in report_text
    )
    naive = gap_bench(cli.doc, "naive")
    naive_s = naive["stats"]["min"] * naive["extra_info"]["scale"]
    gflops = naive["extra_info"]["flops"] / naive_s / 1e9
    assert f" | {gflops * 1e9 / peak:.1%} (est.) | " in report_text
    assert (
        f"| seed net | numpy | naive | {fmt_rate(naive['extra_info']['flops'])} | {fmt_time(naive_s)} (est.) | "
        f"{gflops:.3g} (est.) |" in report_text
    )


# --------------------------------------------------------------------------------- estimates, older files


def test_estimates_are_marked_in_the_tables_of_an_older_full_run(committed):
    # The example: the Scaling table's naive rows at batch 10,000 showed as if measured.
    assert (
        "| batch | numpy | naive | float64 | 1, 3, 10, 30, 100, 300, 1000, 3000, 10000 | 0.72 (est.) | 2.37 s (est.) "
        "| 1,592.67 s (est.) | est. at every size: timed on 401 of 39,760 parameters and scaled to all of them |"
        in committed
    )
    assert "| batch | numpy | incremental | float64 | 1, 3, 10, 30, 100, 300, 1000, 3000, 10000 | 0.95 | 3.16 ms |" in (
        committed
    )
    assert (
        "| numpy | naive | 107.87 s (est.) | 110,412× (est.) | est.: timed on 2,001 of 109,810 parameters" in committed
    )
    assert (
        "| 784-1000-1000-1000-10 | incremental | 2 | 7.52 s | 1,890.17 s (est.) | 1.48 k (est.) | est.: timed on "
        "0.4% of the sharded columns" in committed
    )
    assert "| numpy | naive | 16.28 s | 45,408× | 0.82× | 2.44 k |  |" in committed  # measured in full: no mark


def test_a_gpu_run_reports_cupy_and_compares_like_with_like():
    # bench/results/h200-20261204-181142.json: GRADGAP_BACKEND=cupy python -m bench.report on an H200 (standard).
    text = render(load_runs([GPU_RUN]), [], "test", REPO / "report")
    assert "Backends: ran: cupy; did not run: numpy (not selected (GRADGAP_BACKEND=cupy)); numba (not selected" in text
    assert "| cupy | naive | 27.06 s | 16,808× | 0.543× | 1.47 k |  |" in text  # every parameter: measured
    coverage = "| CuPy: float32 forward/backprop and a batch sweep (largest batch shown) | 10,000 | PASS |"
    assert coverage in text
    # The only dgemm is the CPU's: the GPU's rows get no share of it.
    assert "| seed net | cupy | batched | 262 G | 449 ms | 584 | no GPU dgemm in this run |" in text
    dgemm = "| dgemm | numpy | (1000, 1000) @ (1000, 1000) float64, 16 BLAS threads | 2 G | 7.25 ms | 276 | 100% |"
    assert dgemm in text


def test_an_older_file_says_why_backends_did_not_run(committed):
    assert "Backends: ran: numpy, numba; did not run: cupy (not installed: pip install 'gradgap[cuda12]'" in committed
    assert "| Numba series ≤ 3× Numba backprop | not measured | not measured | missing: numba series |" in committed


def test_estimates_are_marked_on_the_charts(cli):
    scaling = chart_texts(chart_scaling(load_runs([COMMITTED])))
    assert scaling.count("est.") >= 9  # every estimated point of the naive batch sweep, at least
    assert "est.: timed on 401 of 39,760 parameters and scaled\nto all of them" in scaling  # the legend: how
    assert "numpy naive float64 (slope 0.72) (est.)" in scaling and "numpy incremental float64 (slope 0.95)" in scaling
    run = load_runs([cli.json_path])
    speedup = chart_texts(chart_speedup(run))
    assert "numpy naive (est.)" in speedup and "numpy incremental (est.)" in speedup  # over a sampled baseline
    assert any(text.startswith("est.: numpy naive: timed on") for text in speedup)
    gap = chart_texts(chart_gap(run))
    assert any(text.endswith("\nest.") for text in gap) and any(
        text.startswith("est.: numpy naive: timed") for text in gap
    )
    assert not any(text.startswith("est.: numpy incremental") for text in gap)  # measured: no legend entry


def test_a_backend_whose_benchmarks_all_failed_says_so(cli, tmp_path):
    doc = json.loads(cli.json_path.read_text())
    record = doc["machine_info"]["gradgap_run"]
    del record["backends"]["numba"]  # as if numba had been selected and available ...
    record["outcomes"]["numba"] = {"passed": 0, "failed": 4, "skipped": 0}  # ... and every benchmark had failed
    record["outcomes"]["numpy"]["failed"] = 1
    path = tmp_path / "failed.json"
    path.write_text(json.dumps(doc))
    text = render(load_runs([path]), [], "test", tmp_path)
    assert (
        "Backends: ran: numpy (1 of its benchmarks failed); did not run: numba (available, but all 4 of its "
        "benchmarks failed (see the run's pytest log))" in text
    )


def test_synthetic_data_is_reported_with_its_reason(cli, tmp_path):
    doc = json.loads(cli.json_path.read_text())
    reason = "no download mirror accepted a connection within 3 s"
    for bench in doc["benchmarks"]:
        bench["extra_info"].update(data="synthetic", data_origin="synthetic", data_fallback_reason=reason)
        bench["extra_info"].pop("data_path", None)
    doc["machine_info"]["gradgap"]["data"] = {"data": "synthetic", "data_fallback_reason": reason}
    path = tmp_path / "synthetic.json"
    path.write_text(json.dumps(doc))
    text = render(load_runs([path]), [], "test", tmp_path)
    assert f"not real MNIST: the MNIST files could not be used, because {reason}." in text
    assert "real MNIST batch" not in text


def test_merged_runs_name_their_machines(cli, tmp_path):
    other = tmp_path / "gpu-run.json"
    doc = json.loads(cli.json_path.read_text())
    doc["machine_info"]["gradgap"]["node"] = "gpu-box"
    other.write_text(json.dumps(doc))
    runs = load_runs([cli.json_path, other])
    assert runs[1].label.startswith("gpu-box") and runs[0].label != runs[1].label
    text = render(runs, [], "test", tmp_path)
    assert "| machine | backend | method |" in text
    for run in runs:
        assert f"| {run.label} | numpy | incremental |" in text


def test_cli_from_saved_results(cli, tmp_path, capsys):
    assert main(["--from", str(cli.json_path), "--out", str(tmp_path / "cli")]) == 0
    out = capsys.readouterr().out
    assert "| numpy | incremental |" in out and f"report: {tmp_path / 'cli' / 'REPORT.md'}" in out
    assert (tmp_path / "cli" / "REPORT.md").exists()


# --------------------------------------------------------------------------------- errors


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


def test_unknown_backend_in_the_environment_runs_nothing(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("GRADGAP_BACKEND", "NumPy")
    assert main(["--results", str(tmp_path / "results"), "--out", str(tmp_path / "out")]) == 2
    assert "unknown backend 'NumPy' in GRADGAP_BACKEND; valid names: numpy, numba, cupy" in capsys.readouterr().err
    assert not (tmp_path / "results").exists()


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


def test_without_matplotlib_the_report_has_no_charts_and_says_so(tmp_path):
    shim = tmp_path / "shim" / "matplotlib"
    shim.mkdir(parents=True)
    (shim / "__init__.py").write_text("raise ImportError('matplotlib made unimportable by the test')\n")
    out = tmp_path / "out"
    done = subprocess.run(
        [sys.executable, "-m", "bench.report", "--from", str(COMMITTED), "--out", str(out)],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(shim.parent)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    line = "charts skipped: matplotlib cannot be imported (matplotlib made unimportable by the test)"
    assert [text for text in done.stdout.splitlines() if text.startswith("charts")] == [
        f"{line}: pip install 'gradgap[bench]'"
    ]
    assert sorted(p.name for p in out.iterdir()) == ["REPORT.md"] and line in (out / "REPORT.md").read_text()


# --------------------------------------------------------------------------------- parts


def test_the_default_profile_is_one_of_the_suite():
    assert DEFAULT_PROFILE in PROFILES and build_parser().parse_args([]).profile == DEFAULT_PROFILE


def test_slope_of_a_power_law():
    assert slope([(1, 2.0), (10, 20.0), (100, 200.0)]) == pytest.approx(1.0)
    assert slope([(10, 1.0), (100, 100.0)]) == pytest.approx(2.0)
    assert slope([(10, 1.0)]) is None


def test_phases_are_named_by_suite_and_backend():
    assert phase_of("bench/bench_gap.py::test_gap[backend=numba-naive]") == "gap: numba"
    assert phase_of("bench/bench_gap.py::test_gap_deep[backend=numpy-series]") == "deep: numpy"
    assert phase_of("bench/bench_scaling.py::test_scaling[depth=2-series-float64-backend=cupy]") == "scaling: cupy"
    assert phase_of("bench/bench_peers.py::test_textbook[naive]") == "peers"


def test_markdown_table():
    assert markdown_table(["a", "b"], [[1, "x"], ["", 2.5]]) == "| a | b |\n|---|---|\n| 1 | x |\n|  | 2.5 |"
    with pytest.raises(ValueError, match="row 1 has 1 cells; the header has 2"):
        markdown_table(["a", "b"], [[1, 2], [3]])

"""python -m bench.report: run the benchmark suite (or read saved runs) and write a report with charts.

    python -m bench.report                        # the default profile on every installed backend
    python -m bench.report --profile full         # the long sweeps too
    GRADGAP_BACKEND=numba python -m bench.report  # one backend (with the textbook and the peers)
    python -m bench.report --from a.json b.json   # merge saved runs (say a GPU and a CPU run); runs nothing
    python -m bench.report --out DIR              # where REPORT.md and the PNG charts go (default report/)

A run saves pytest-benchmark's JSON and pytest's log under bench/results/<machine>-<date>.{json,log}
and shows one progress bar per phase. Ratios are always taken within one run (one machine, one
session). Times are the best round (min) of each benchmark; a figure the suite estimated (a sample
of parameters timed and scaled) is marked "est." wherever it appears, with how it was made.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from backends import BACKEND_NAMES
from bench.common import PROFILES
from bench.report.charts import CHARTS, matplotlib_missing
from bench.report.render import build_report, describe_data, headline_table
from bench.report.results import ReportError, load_runs
from bench.report.runner import RESULTS_DIR, SuiteRun, run_suite

DEFAULT_PROFILE = "standard"  # bench.common.PROFILES: <= 5 minutes on 2 cores; --profile full adds the long sweeps


def selected_backends(environ: Mapping[str, str] | None = None) -> list[str]:
    """[the backend GRADGAP_BACKEND names], or [] (unset or empty) for every installed one."""
    name = (os.environ if environ is None else environ).get("GRADGAP_BACKEND", "")
    if not name:
        return []
    if name not in BACKEND_NAMES:
        raise ReportError(f"unknown backend {name!r} in GRADGAP_BACKEND; valid names: {', '.join(BACKEND_NAMES)}")
    return [name]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench.report",
        description=__doc__.split("\n\n")[0],
        epilog="GRADGAP_BACKEND=name runs that backend only (with the textbook and the peers).",
    )
    parser.add_argument(
        "--from", dest="sources", nargs="+", metavar="FILE", help="merge these saved results files; run nothing"
    )
    parser.add_argument(
        "--profile",
        choices=sorted(PROFILES),
        default=DEFAULT_PROFILE,
        help=f"profile to run (default {DEFAULT_PROFILE}; full adds the long sweeps)",
    )
    parser.add_argument("-k", dest="keyword", metavar="EXPR", help="only the benchmarks matching pytest's -k EXPR")
    parser.add_argument(
        "--out", type=Path, default=Path("report"), help="directory for REPORT.md and the charts (default report/)"
    )
    parser.add_argument(
        "--results",
        type=Path,
        default=RESULTS_DIR,
        help="directory for the run's JSON and pytest log (default bench/results/)",
    )
    return parser


def run_and_save(args: argparse.Namespace) -> tuple[list[Path], int]:
    """Run the suite with phase bars; returns ([the JSON written], exit status 0 or 1)."""
    backends = selected_backends()
    run = SuiteRun.at(args.results)
    which = ", ".join(backends) if backends else "every installed backend"
    print(f"profile {args.profile}, {which}; pytest's output: {run.log_path}", flush=True)
    run_suite(run, args.profile, backends, args.keyword)
    for name, why in run.absent.items():
        print(f"{name}: not run ({why})")
    if not run.json_path.exists() or run.json_path.stat().st_size == 0:  # pytest-benchmark opens it early
        tail = run.log_path.read_text(encoding="utf-8", errors="replace").splitlines()[-15:]
        raise ReportError(
            f"pytest exited with code {run.exit_code} and wrote no results to {run.json_path}; "
            f"the end of {run.log_path}:\n  " + "\n  ".join(tail)
        )
    status = 0
    if run.exit_code != 0:
        failed = "".join(f"\n  {nodeid}" for nodeid in run.failed)
        print(
            f"warning: pytest exited with code {run.exit_code}; the report covers the benchmarks that passed "
            f"(see {run.log_path}){failed}",
            file=sys.stderr,
        )
        status = 1
    print(f"results: {run.json_path}")
    return [run.json_path], status


def main(argv: Sequence[str] | None = None) -> int:
    """The command; exit status 0, 1 (some benchmarks failed: reported without them) or 2 (error)."""
    args = build_parser().parse_args(argv)
    command = "python -m bench.report " + " ".join(argv if argv is not None else sys.argv[1:])
    try:
        sources, status = (list(args.sources), 0) if args.sources else run_and_save(args)
        runs = load_runs(sources)
        report = build_report(runs, args.out, command.strip())
    except ReportError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    print()
    for run in runs:
        print(f"data ({run.label}): {describe_data(run)}")
    print(headline_table(runs) if any(run.of_suite("gap") for run in runs) else "no seed-setting (gap) results")
    print(f"\nreport: {report}")
    charts = [report.parent / name for name, _, _ in CHARTS if (report.parent / name).exists()]  # stale ones go
    if charts:
        print("charts: " + ", ".join(map(str, charts)))
    elif matplotlib_missing():
        print(matplotlib_missing())
    return status

"""The benchmark report: `python -m bench.report` runs the suite (or reads saved runs) and writes REPORT.md.

Parts: results (JSON -> Runs of Measurements), targets (the promised ratios, named by what they
measure), charts (the PNGs, on one scaffold), render (the markdown), runner and plugin (the suite
under pytest with one progress bar per phase), cli (the command).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from bench.report.results import Measurement, ReportError, Run, load_run, load_runs


def write_report(paths: Sequence[str | Path], out_dir: str | Path, command: str = "python -m bench.report") -> Path:
    """Read the results files, write out_dir/REPORT.md and the charts; returns REPORT.md's path.

    Raises ReportError (naming the file) for a missing, empty or malformed results file.
    """
    from bench.report.render import build_report

    return build_report(load_runs(paths), out_dir, command)


__all__ = ["Measurement", "ReportError", "Run", "load_run", "load_runs", "write_report"]

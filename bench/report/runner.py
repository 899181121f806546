"""Run the benchmark suite under pytest in a subprocess: one progress bar per phase, pytest's output to a log.

The subprocess loads bench.report.run_plugin, which selects the backends, orders the benchmarks by phase
and appends progress events to a file; this side follows that file and draws a tqdm bar per phase
(items done, elapsed, ETA from the phase's item count and pace). pytest's own output, every line of
it, goes to the log file.
"""

from __future__ import annotations

import json
import platform
import re
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import IO

from bench.report.results import REPO
from nets.progress import Progress

BENCH_DIR = REPO / "bench"
RESULTS_DIR = BENCH_DIR / "results"
POLL_S = 0.2


@dataclass
class SuiteRun:
    """Where one run of the suite writes: the pytest-benchmark JSON, pytest's log, the progress events."""

    json_path: Path
    log_path: Path
    events_path: Path
    phases: list[tuple[str, int]] = field(default_factory=list)
    absent: dict[str, str] = field(default_factory=dict)
    failed: list[str] = field(default_factory=list)
    exit_code: int | None = None

    @classmethod
    def at(cls, results_dir: Path = RESULTS_DIR) -> SuiteRun:
        """Fresh paths under results_dir named by machine and time: <machine>-<YYYYmmdd-HHMMSS>.{json,log}."""
        machine = re.sub(r"[^A-Za-z0-9_.-]+", "_", platform.node() or "machine")
        stem = results_dir / f"{machine}-{datetime.now():%Y%m%d-%H%M%S}"
        return cls(stem.with_suffix(".json"), stem.with_suffix(".log"), stem.with_suffix(".events.jsonl"))


def pytest_command(run: SuiteRun, profile: str, backends: Sequence[str], keyword: str | None) -> list[str]:
    """The pytest command line of a report run (benchmarks only, JSON saved, the report plugin loaded)."""
    command = [
        sys.executable,
        "-m",
        "pytest",
        str(BENCH_DIR),
        f"--gap-profile={profile}",
        "--benchmark-only",
        f"--benchmark-json={run.json_path}",
        "--benchmark-columns=min,median,rounds,iterations",
        "-p",
        "bench.report.run_plugin",
        f"--report-events={run.events_path}",
        f"--report-backends={','.join(backends)}",
        "-p",
        "no:cacheprovider",
        "-p",
        "no:randomly",
        "-rfEs",
        "--durations=10",
    ]
    return command + (["-k", keyword] if keyword else [])


class PhaseBars:
    """One progress bar per phase (nets.progress), one after the other: each is left on its own line when done."""

    def __init__(self, stream: IO[str]) -> None:
        self.stream = stream
        self.bar: Progress | None = None
        self.phase: str | None = None
        self.counts: dict[str, int] = {}
        self.failed: dict[str, int] = {}
        self.skipped: dict[str, int] = {}

    def collected(self, phases: Sequence[tuple[str, int]]) -> None:
        self.counts = dict(phases)
        total = sum(self.counts.values())
        self.stream.write(f"{total} benchmarks in {len(phases)} phases\n")
        if phases:
            self._open(phases[0][0])

    def done(self, phase: str, outcome: str) -> None:
        if phase != self.phase or self.bar is None:
            self._open(phase)
        if outcome == "failed":
            self.failed[phase] = self.failed.get(phase, 0) + 1
        elif outcome == "skipped":
            self.skipped[phase] = self.skipped.get(phase, 0) + 1
        counts = (("failed", self.failed.get(phase, 0)), ("skipped", self.skipped.get(phase, 0)))
        self.bar.postfix(", ".join(f"{n} {what}" for what, n in counts if n))
        self.bar.update(1)
        if self.bar.finished:
            self._close_bar()
            phases = list(self.counts)
            following = phases.index(phase) + 1 if phase in phases else len(phases)
            if following < len(phases):
                self._open(phases[following])

    def _open(self, phase: str) -> None:
        self._close_bar()
        self.phase = phase
        width = max((len(p) for p in self.counts), default=len(phase))
        self.bar = Progress(
            True,
            self.counts.get(phase, 1),
            phase.ljust(width),
            unit="bench",
            stream=self.stream,
            bar_format="{desc} {percentage:3.0f}%|{bar:24}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}]{postfix}",
        )

    def _close_bar(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def close(self) -> None:
        self._close_bar()


def run_suite(
    run: SuiteRun,
    profile: str,
    backends: Sequence[str] = (),
    keyword: str | None = None,
    stream: IO[str] = sys.stderr,
) -> SuiteRun:
    """Run the suite (pytest output to run.log_path), drawing phase bars on stream; returns run, filled in.

    An interrupt (Ctrl-C) is passed on to pytest, which stops and still writes the JSON of the
    benchmarks done; then KeyboardInterrupt is raised here.
    """
    run.json_path.parent.mkdir(parents=True, exist_ok=True)
    run.events_path.unlink(missing_ok=True)
    bars = PhaseBars(stream)
    offset = 0
    with run.log_path.open("w", encoding="utf-8") as log:
        process = subprocess.Popen(
            pytest_command(run, profile, backends, keyword), cwd=REPO, stdout=log, stderr=subprocess.STDOUT
        )
        try:
            while True:
                finished = process.poll() is not None
                offset = _follow(run, bars, offset)
                if finished:
                    break
                time.sleep(POLL_S)
        except KeyboardInterrupt:
            process.send_signal(signal.SIGINT)
            process.wait()
            bars.close()
            raise
        finally:
            bars.close()
    run.exit_code = process.returncode
    run.events_path.unlink(missing_ok=True)
    return run


def _follow(run: SuiteRun, bars: PhaseBars, offset: int) -> int:
    """Read the events appended since offset; returns the new offset (a partial last line waits)."""
    if not run.events_path.exists():
        return offset
    with run.events_path.open("rb") as f:
        f.seek(offset)
        chunk = f.read()
    complete = chunk[: chunk.rfind(b"\n") + 1]
    for line in complete.decode("utf-8").splitlines():
        event = json.loads(line)
        if event["event"] == "collected":
            run.phases = [tuple(p) for p in event["phases"]]
            run.absent = dict(event["absent"])
            bars.collected(run.phases)
        elif event["event"] == "done":
            if event["outcome"] == "failed":
                run.failed.append(event["nodeid"])
            bars.done(event["phase"], event["outcome"])
    return offset + len(complete)

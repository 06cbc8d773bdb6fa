"""The benchmark report, and the figures section `make bench` writes into docs/performance.md.

The page's prose is written by hand; what stands between its two markers is written only by
`authsvc bench --write-docs PATH`, with the command, the date and the machine beside the
figures, so a figure on the page always says where it came from.
"""

from __future__ import annotations

import os
import platform
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

RESULTS_START = "<!-- bench-results:start -->"
RESULTS_END = "<!-- bench-results:end -->"


@dataclass(frozen=True)
class Machine:
    cpu_model: str
    cores: int
    python: str
    postgresql: str

    def describe(self) -> str:
        return (
            f"{self.cpu_model}, {self.cores} cores; Python {self.python}; "
            f"PostgreSQL {self.postgresql}"
        )


def cpu_model() -> str:
    """The CPU's model name (Linux: /proc/cpuinfo), else what `platform` knows."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as cpuinfo:
            for line in cpuinfo:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and value.strip():
                    return f"{value.strip()} ({platform.machine()})"
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def this_machine(postgresql: str) -> Machine:
    return Machine(
        cpu_model=cpu_model(),
        cores=os.cpu_count() or 1,
        python=platform.python_version(),
        postgresql=postgresql,
    )


@dataclass(frozen=True)
class BenchReport:
    tables: str
    """Markdown: the figures and the signing-algorithm table."""
    setup: str
    """One line: the server's workers, the load, run lengths, argon2id parameters."""
    machine: Machine
    finished_at: datetime

    def markdown(self) -> str:
        """The report on its own (stdout, `--output`)."""
        return "\n".join(
            [
                self.tables,
                "",
                f"{self.machine.describe()}; {self.finished_at:%Y-%m-%d %H:%M} UTC; {self.setup}",
            ]
        )


def results_section(report: BenchReport, command: str) -> str:
    """What goes between the markers: command, date and machine, then the figures."""
    return "\n".join(
        [
            f"Written by `{command}` on {report.finished_at:%Y-%m-%d %H:%M} UTC.",
            "",
            f"Machine: {report.machine.describe()}.",
            "",
            report.tables,
            "",
            f"Setup: {report.setup}.",
        ]
    )


class MissingMarkers(ValueError):
    """The page has no `bench-results` markers to write between."""


def check_page(page: str) -> None:
    """Raise `MissingMarkers` unless `page` holds the start marker, then the end marker."""
    start = page.find(RESULTS_START)
    if start < 0 or page.find(RESULTS_END, start) < 0:
        raise MissingMarkers(f"needs the lines {RESULTS_START} and {RESULTS_END}, in that order")


def with_results(page: str, section: str) -> str:
    """`page` with the text between the markers replaced by `section`; the rest unchanged."""
    check_page(page)
    start = page.index(RESULTS_START) + len(RESULTS_START)
    end = page.index(RESULTS_END, start)
    return page[:start] + "\n" + section.strip("\n") + "\n" + page[end:]


def write_results(path: Path, report: BenchReport, command: str) -> None:
    """Rewrite the figures section of the page at `path`."""
    page = path.read_text(encoding="utf-8")
    path.write_text(with_results(page, results_section(report, command)), encoding="utf-8")

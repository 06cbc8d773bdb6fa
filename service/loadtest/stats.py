"""Latency and error accounting, merged across load processes, and its rendering."""

from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

PERCENTILES = (50.0, 90.0, 99.0, 99.9)


@dataclass
class ProcessResult:
    """What one load process measured."""

    latencies: list[float] = field(default_factory=list)  # seconds, successful calls
    errors: Counter[str] = field(default_factory=Counter)  # status code name -> count
    dropped: int = 0  # open-loop sends skipped because too many were in flight
    elapsed: float = 0.0
    cpu_seconds: float = 0.0  # this process's own CPU time over the measured part


@dataclass(frozen=True)
class ScenarioSummary:
    """One scenario's figures, ready for a table or JSON."""

    scenario: str
    requests_per_second: float
    ok: int
    errors: dict[str, int]
    dropped: int
    duration: float
    latency_ms: dict[str, float]
    processes: int
    concurrency: int
    rate: float | None
    # The load processes' own CPU time over the measured part (what each call costs the
    # client side: the bench's cost table shows it beside the server's and PostgreSQL's).
    load_cpu_seconds: float = 0.0

    @property
    def error_count(self) -> int:
        return sum(self.errors.values())


def percentile(sorted_values: list[float], p: float) -> float:
    """Nearest-rank percentile of an ascending list (0.0 for an empty one)."""
    if not sorted_values:
        return 0.0
    rank = max(0, min(len(sorted_values) - 1, math.ceil(p / 100.0 * len(sorted_values)) - 1))
    return sorted_values[rank]


def summarize(
    scenario: str,
    results: list[ProcessResult],
    *,
    processes: int,
    concurrency: int,
    rate: float | None,
) -> ScenarioSummary:
    latencies = sorted(x for r in results for x in r.latencies)
    errors: Counter[str] = Counter()
    for r in results:
        errors.update(r.errors)
    duration = max((r.elapsed for r in results), default=0.0)
    total = len(latencies) + sum(errors.values())
    return ScenarioSummary(
        scenario=scenario,
        requests_per_second=total / duration if duration else 0.0,
        ok=len(latencies),
        errors=dict(errors),
        dropped=sum(r.dropped for r in results),
        duration=duration,
        latency_ms={f"p{p:g}": percentile(latencies, p) * 1000 for p in PERCENTILES},
        processes=processes,
        concurrency=concurrency,
        rate=rate,
        load_cpu_seconds=sum(r.cpu_seconds for r in results),
    )


def render_table(summaries: list[ScenarioSummary]) -> str:
    """A fixed-width table for a terminal."""
    header = (
        f"{'scenario':<16}{'req/s':>10}"
        + "".join(f"{'p' + format(p, 'g') + ' ms':>11}" for p in PERCENTILES)
        + f"{'ok':>10}  errors"
    )
    lines = [header, "-" * len(header)]
    for s in summaries:
        errors = ", ".join(f"{k}: {v}" for k, v in sorted(s.errors.items())) or "none"
        if s.dropped:
            errors += f" (dropped: {s.dropped})"
        lines.append(
            f"{s.scenario:<16}{s.requests_per_second:>10.1f}"
            + "".join(f"{s.latency_ms[f'p{p:g}']:>11.2f}" for p in PERCENTILES)
            + f"{s.ok:>10}  {errors}"
        )
    return "\n".join(lines)


def write_json(path: Path, summaries: list[ScenarioSummary], **extra: object) -> None:
    payload = {"scenarios": [asdict(s) for s in summaries], **extra}
    path.write_text(json.dumps(payload, indent=2) + "\n")

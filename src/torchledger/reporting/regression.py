"""Noise-aware regression detection over a machine's history of runs.

The newest run is compared with a baseline made from the earlier runs of the same machine: the median of their
medians over the last ``window`` runs. A change is reported only when it is both large (more than the group's
threshold, 10% by default: TorchBench treats deltas under about 7% as noise on tuned machines, asv defaults to 5%)
and clear of the noise (more than ``sigmas`` times the combined spread: the history's robust standard deviation,
1.4826 x MAD, and the newest run's own, IQR / 1.349). A benchmark with fewer than ``min_history`` earlier runs has
no noise estimate yet and is listed as such, never as a regression. A benchmark whose newest statistics are not valid
(left out of its run when read, or a median that is not a finite number > 0) is listed as invalid, never as unchanged;
earlier medians that are not finite numbers > 0 are left out of the baseline.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field

from torchledger.reporting.results import Run


@dataclass(frozen=True)
class Finding:
    """A benchmark whose newest median moved beyond both the threshold and the noise."""

    name: str
    group: str
    kind: str  # "regression" or "improvement"
    baseline: float
    newest: float
    noise: float
    history: int

    @property
    def change(self) -> float:
        """Relative change of the median time: +0.2 is 20% slower."""
        return self.newest / self.baseline - 1


@dataclass(frozen=True)
class Comparison:
    machine: str
    newest: Run
    baseline_runs: int
    findings: list[Finding]
    stable: int
    unseen: list[str]
    short_history: list[str]
    invalid: list[str] = field(default_factory=list)

    @property
    def regressions(self) -> list[Finding]:
        return [f for f in self.findings if f.kind == "regression"]


def compare_history(history: list[Run], *, window: int = 5, threshold: float = 0.10,
                    group_thresholds: dict[str, float] | None = None, sigmas: float = 3.0,
                    min_history: int = 3) -> Comparison:
    """Compare the newest run of ``history`` (oldest first, one machine) with the ``window`` runs before it."""
    if not history:
        raise ValueError("history is empty: no runs to compare")
    if window < 1:
        raise ValueError(f"window={window} must be >= 1")
    if not (math.isfinite(threshold) and threshold > 0):
        raise ValueError(f"threshold={threshold} must be a finite number > 0")
    if not (math.isfinite(sigmas) and sigmas > 0):
        raise ValueError(f"sigmas={sigmas} must be a finite number > 0")
    for group, value in (group_thresholds or {}).items():
        if not (math.isfinite(value) and value > 0):
            raise ValueError(f"group_thresholds[{group!r}]={value} must be a finite number > 0")
    newest, previous = history[-1], history[-1 - window:-1]
    findings: list[Finding] = []
    stable = 0
    unseen: list[str] = []
    short: list[str] = []
    invalid = set(newest.invalid)
    for name, result in sorted(newest.results.items()):
        if not (_valid(result.median) and math.isfinite(result.iqr) and result.iqr >= 0):
            invalid.add(name)
            continue
        values = [run.results[name].median for run in previous
                  if name in run.results and _valid(run.results[name].median)]
        if not values:
            unseen.append(name)
            continue
        if len(values) < min_history:
            short.append(name)
            continue
        base = statistics.median(values)
        mad = statistics.median(abs(v - base) for v in values)
        noise = math.hypot(1.4826 * mad, result.iqr / 1.349)
        delta = result.median - base
        limit = (group_thresholds or {}).get(result.group, threshold)
        kind = None
        if delta > limit * base and delta > sigmas * noise:
            kind = "regression"
        elif -delta > limit * base and -delta > sigmas * noise:
            kind = "improvement"
        if kind is None:
            stable += 1
        else:
            findings.append(Finding(name, result.group, kind, base, result.median, noise, len(values)))
    return Comparison(machine=newest.machine, newest=newest, baseline_runs=len(previous), findings=findings,
                      stable=stable, unseen=unseen, short_history=short, invalid=sorted(invalid))


def _valid(median: float) -> bool:
    return math.isfinite(median) and median > 0


def _seconds(x: float) -> str:
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("us", 1e-6)):
        if x >= scale:
            return f"{x / scale:.3g} {unit}"
    return f"{x / 1e-9:.3g} ns"


def markdown(comparisons: list[Comparison], unjudged: dict[str, str] | None = None) -> str:
    """A Markdown summary: per machine, what got slower or faster and by how much.

    ``unjudged`` maps machines that were not compared to the reason (e.g. their newest run is not a valid run).
    """
    lines = ["# Benchmark regressions", ""]
    for machine, reason in sorted((unjudged or {}).items()):
        lines += [f"## {machine}", "", f"This machine is not judged: {reason}.", ""]
    for c in comparisons:
        lines.append(f"## {c.machine}")
        lines.append("")
        lines.append(f"Newest run {c.newest.path.name} (commit {c.newest.commit or 'unknown'}, {c.newest.datetime}) "
                     f"against the median of {c.baseline_runs} earlier run(s).")
        lines.append("")
        if c.baseline_runs == 0:
            lines.append("No earlier run of this machine: nothing to compare with yet.")
            lines.append("")
            continue
        if c.findings:
            lines.append("| benchmark | group | change | baseline | newest | noise (1 sigma) |")
            lines.append("| --- | --- | --- | --- | --- | --- |")
            for f in sorted(c.findings, key=lambda f: -f.change):
                lines.append(f"| {f.name} | {f.group} | {'slower' if f.kind == 'regression' else 'faster'} "
                             f"{abs(f.change) * 100:.1f}% | {_seconds(f.baseline)} | {_seconds(f.newest)} | "
                             f"{_seconds(f.noise)} |")
            lines.append("")
        lines.append(f"{len(c.regressions)} regression(s), {len(c.findings) - len(c.regressions)} improvement(s), "
                     f"{c.stable} unchanged within noise, {len(c.short_history)} with too short a history to judge, "
                     f"{len(c.unseen)} new benchmark(s) without history.")
        if c.invalid:
            lines.append("")
            lines.append(f"{len(c.invalid)} with invalid statistics, not judged: {', '.join(c.invalid)}.")
        lines.append("")
    return "\n".join(lines)

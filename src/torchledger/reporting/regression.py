"""Noise-aware regression detection over a machine's history of runs.

A machine's newest state is every run of its newest commit merged (a suite run one group at a time is one run). Each
of its benchmarks is compared with a baseline made from the earlier runs of the same machine that ran it with the
same work: the median of their medians over the last ``window`` of them. A change is reported only when it is both
large (more than the group's threshold: :data:`DEFAULT_GROUP_THRESHOLDS`, else 10%) and clear of the noise (more than
``sigmas`` times the combined spread: the history's robust standard deviation, 1.4826 x MAD, and the newest run's
own, IQR / 1.349). A benchmark with fewer than ``min_history`` earlier runs has no noise estimate yet and is listed as
such, never as a regression; so is one whose work changed (another size profile), one new, one with invalid newest
statistics, and one that earlier runs had and the newest commit did not run. Earlier medians that are not finite
numbers > 0 are left out of the baseline.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field

from torchledger.reporting.results import Run, describe, newest_results, work_text
from torchledger.reporting.units import format_seconds

# Default thresholds per benchmark group, from repeated runs of the small profile on a 2-core CPU (README,
# "Thresholds from measured noise"): twice the group's median relative difference between two runs of the same
# benchmark, rounded up to 5%, never under DEFAULT_THRESHOLD (10%). Measured: precision 3.2%, roofline 2.5%,
# checkpointing 5.3%, formulas 10.4%, count 15.8%, fusion 16.2%, accumulation 16.8%, dataloader 44.1%.
DEFAULT_THRESHOLD = 0.10
DEFAULT_GROUP_THRESHOLDS: dict[str, float] = {"precision": 0.10, "roofline": 0.10, "checkpointing": 0.15,
                                              "formulas": 0.25, "count": 0.35, "fusion": 0.35, "accumulation": 0.35,
                                              "dataloader": 0.90}


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
class Judged:
    """One benchmark that was judged: its verdict and what it was judged against."""

    name: str
    group: str
    verdict: str  # "regression", "improvement" or "unchanged"
    baseline: float
    newest: float
    noise: float
    threshold: float
    against: str  # e.g. "median of 5 runs, 2026-01-01 to 2026-01-05, work: small, shape 512x512x512"

    @property
    def change(self) -> float:
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
    judged: list[Judged] = field(default_factory=list)
    not_judged: dict[str, str] = field(default_factory=dict)  # benchmark -> why
    newest_files: tuple[str, ...] = ()

    @property
    def regressions(self) -> list[Finding]:
        return [f for f in self.findings if f.kind == "regression"]


def compare_history(history: list[Run], *, window: int = 5, threshold: float = DEFAULT_THRESHOLD,
                    group_thresholds: dict[str, float] | None = None, sigmas: float = 3.0,
                    min_history: int = 3) -> Comparison:
    """Compare the newest state of one machine with its history (``history`` oldest first).

    The newest state is every run of the newest commit merged (:func:`newest_results`: a suite run group by group
    is one run). Each of its benchmarks is judged against the medians of the last ``window`` runs before the one it
    came from that ran it with the same work (repeated runs of one commit are history too); a benchmark that
    earlier runs had and the newest commit did not run is listed as not run, never dropped silently.
    ``group_thresholds`` overrides :data:`DEFAULT_GROUP_THRESHOLDS`.
    """
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
    limits = {**DEFAULT_GROUP_THRESHOLDS, **(group_thresholds or {})}
    newest = newest_results(history)
    same_commit = [r for r in history if newest.commit and r.commit == newest.commit] or [history[-1]]
    first = next(i for i, r in enumerate(history) if r is same_commit[0])
    source = {name: i for i, r in enumerate(history) if i >= first and any(r is s for s in same_commit)
              for name in r.results}
    earlier = history[:first]
    findings: list[Finding] = []
    judged: list[Judged] = []
    not_judged: dict[str, str] = {}
    stable = 0
    unseen: list[str] = []
    short: list[str] = []
    invalid = {name for run in same_commit for name in run.invalid if name not in newest.results}
    for name in sorted(invalid):
        not_judged[name] = "invalid statistics in the newest run"
    for name, result in sorted(newest.results.items()):
        if not (_valid(result.median) and math.isfinite(result.iqr) and result.iqr >= 0):
            invalid.add(name)
            not_judged[name] = "invalid statistics in the newest run"
            continue
        work = describe(result).work
        ran = [run for run in history[:source[name]] if name in run.results and _valid(run.results[name].median)]
        same = [run for run in ran if describe(run.results[name]).work == work][-window:]
        if not ran:
            unseen.append(name)
            not_judged[name] = "new: no earlier run has it"
            continue
        if not same:
            not_judged[name] = (f"work changed: {work_text(work)} now, "
                                f"{work_text(describe(ran[-1].results[name]).work)} before")
            continue
        if len(same) < min_history:
            short.append(name)
            not_judged[name] = f"{len(same)} earlier run(s), fewer than --min-history {min_history}"
            continue
        values = [run.results[name].median for run in same]
        base = statistics.median(values)
        mad = statistics.median(abs(v - base) for v in values)
        noise = math.hypot(1.4826 * mad, result.iqr / 1.349)
        delta = result.median - base
        limit = limits.get(result.group, threshold)
        kind = None
        if delta > limit * base and delta > sigmas * noise:
            kind = "regression"
        elif -delta > limit * base and -delta > sigmas * noise:
            kind = "improvement"
        days = sorted({run.datetime[:10] for run in same})
        span = days[0] if len(days) == 1 else f"{days[0]} to {days[-1]}"
        against = f"median of {len(values)} run(s), {span}; work: {work_text(work)}"
        judged.append(Judged(name, result.group, kind or "unchanged", base, result.median, noise, limit, against))
        if kind is None:
            stable += 1
        else:
            findings.append(Finding(name, result.group, kind, base, result.median, noise, len(values)))
    for name in sorted({n for run in earlier for n in run.results} - set(newest.results) - invalid):
        last = next(run for run in reversed(earlier) if name in run.results)
        not_judged[name] = f"not run at the newest commit (last run in {last.path.name})"
    return Comparison(machine=newest.machine, newest=newest, baseline_runs=min(window, len(history) - 1),
                      findings=findings,
                      stable=stable, unseen=unseen, short_history=short, invalid=sorted(invalid), judged=judged,
                      not_judged=not_judged, newest_files=tuple(r.path.name for r in same_commit))


def _valid(median: float) -> bool:
    return math.isfinite(median) and median > 0


def markdown(comparisons: list[Comparison], unjudged: dict[str, str] | None = None) -> str:
    """A Markdown summary: per machine, every benchmark judged (verdict, change, what it was judged against) and
    every benchmark not judged, with the reason.

    ``unjudged`` maps machines that were not compared to the reason (e.g. their newest run is not a valid run).
    """
    lines = ["# Benchmark regressions", ""]
    for machine, reason in sorted((unjudged or {}).items()):
        lines += [f"## {machine}", "", f"This machine is not judged: {reason}.", ""]
    for c in comparisons:
        lines.append(f"## {c.machine}")
        lines.append("")
        merged = (f", merged with the earlier run(s) of its commit {', '.join(c.newest_files[:-1])}"
                  if len(c.newest_files) > 1 else "")
        lines.append(f"Newest run {c.newest.path.name} (commit {c.newest.commit or 'unknown'}, {c.newest.datetime}"
                     f"{merged}); each benchmark against the median of its earlier runs of the same work.")
        lines.append("")
        if c.baseline_runs == 0:
            lines.append("No earlier run of this machine: nothing to compare with yet.")
            lines.append("")
        if c.judged:
            order = {"regression": 0, "improvement": 1, "unchanged": 2}
            lines.append("| benchmark | group | verdict | change | baseline | newest | noise (1 sigma) | threshold "
                         "| judged against |")
            lines.append("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
            for j in sorted(c.judged, key=lambda j: (order[j.verdict], -abs(j.change), j.name)):
                verdict = {"regression": "slower", "improvement": "faster"}.get(j.verdict, "unchanged")
                lines.append(f"| {j.name} | {j.group} | {verdict} | {j.change * 100:+.1f}% | "
                             f"{format_seconds(j.baseline)} | {format_seconds(j.newest)} | "
                             f"{format_seconds(j.noise)} | {j.threshold * 100:.0f}% | {j.against} |")
            lines.append("")
        lines.append(f"{len(c.regressions)} regression(s), {len(c.findings) - len(c.regressions)} improvement(s), "
                     f"{c.stable} unchanged within noise, {len(c.short_history)} with too short a history to judge, "
                     f"{len(c.unseen)} new benchmark(s) without history.")
        if c.invalid:
            lines.append("")
            lines.append(f"{len(c.invalid)} with invalid statistics, not judged: {', '.join(c.invalid)}.")
        if c.not_judged:
            lines += ["", "Not judged:", "", "| benchmark | why |", "| --- | --- |"]
            lines += [f"| {name} | {why} |" for name, why in sorted(c.not_judged.items())]
        lines.append("")
    return "\n".join(lines)

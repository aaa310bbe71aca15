"""Reading pytest-benchmark runs back: one JSON file per run, filed in one folder per machine.

A file that is not valid JSON, or valid JSON that is not a pytest-benchmark run, is named in a warning and skipped:
one bad file never stops a report.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Result:
    """One benchmark of one run: its timing statistics (seconds) and what it recorded beside them."""

    name: str
    group: str
    median: float
    iqr: float
    rounds: int
    extra_info: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Run:
    """One run: when, on what machine, at which commit, and its results by benchmark name."""

    path: Path
    machine: str
    datetime: str
    commit: str
    machine_info: dict[str, Any]
    results: dict[str, Result]


def load_run(path: Path) -> Run:
    """Parse one pytest-benchmark JSON file; ValueError naming the file when it is not one."""
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: not readable JSON ({exc})") from None
    if not isinstance(data, dict) or not isinstance(data.get("benchmarks"), list) or "machine_info" not in data:
        raise ValueError(f"{path}: not a pytest-benchmark run (no 'benchmarks' list and 'machine_info')")
    results: dict[str, Result] = {}
    try:
        for b in data["benchmarks"]:
            stats = b["stats"]
            results[b["fullname"]] = Result(
                name=b["fullname"], group=b.get("group") or "(no group)", median=float(stats["median"]),
                iqr=float(stats.get("iqr", 0.0)), rounds=int(stats.get("rounds", 1)),
                extra_info=dict(b.get("extra_info") or {}),
            )
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"{path}: a benchmark entry lacks its statistics ({exc!r})") from None
    machine_info = data["machine_info"] if isinstance(data["machine_info"], dict) else {}
    tag = (machine_info.get("torchledger") or {}).get("device_tag") or path.parent.parent.name or path.parent.name
    commit = (data.get("commit_info") or {}).get("id") or ""
    return Run(path=path, machine=str(tag), datetime=str(data.get("datetime", "")), commit=str(commit)[:12],
               machine_info=machine_info, results=results)


def load_runs(paths: Iterable[str | Path]) -> dict[str, list[Run]]:
    """Every run under ``paths`` (storage folders, machine folders or single files), by machine, oldest first.

    Raises ValueError when a path does not exist; skips, with a warning naming it, any file that is not a run.
    """
    files: list[Path] = []
    for p in paths:
        path = Path(p)
        if not path.exists():
            raise ValueError(f"PATH={str(p)!r} does not exist")
        files += [path] if path.is_file() else sorted(path.rglob("*.json"))
    runs: dict[str, list[Run]] = {}
    for f in files:
        try:
            run = load_run(f)
        except ValueError as exc:
            warnings.warn(f"skipped {exc}", stacklevel=2)
            continue
        runs.setdefault(run.machine, []).append(run)
    for history in runs.values():
        history.sort(key=lambda r: (r.datetime, r.path.name))
    return runs

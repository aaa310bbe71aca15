"""Reading pytest-benchmark runs back: one JSON file per run, filed in one folder per machine.

A file that is not valid JSON, or valid JSON that is not a pytest-benchmark run (a field of the wrong type, no valid
``datetime``), or not a regular file at all (a named pipe is never opened for reading), is named in a warning and
skipped: one bad file never stops a report. A benchmark entry whose statistics are not valid (a median that is not a
finite number > 0, an IQR that is not a finite number >= 0) is named in a warning and left out of its run.

The newest file of a folder, by pytest-benchmark's autosave numbering (``0042_<commit>_<date>.json``), is different:
when it is not a valid run, :func:`read_runs` reports it as such instead of a warning, because the run before it
would otherwise silently take its place.
"""

from __future__ import annotations

import json
import math
import os
import re
import stat
import sys
import warnings
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime as _datetime
from datetime import timezone
from pathlib import Path
from typing import Any, TextIO


class SkippedData(UserWarning):
    """A file, or a benchmark entry of one, left out because it is not valid data; the message names it."""


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
    """One run: when, on what machine, at which commit, and its results by benchmark name.

    ``invalid`` names the benchmarks of the run whose statistics were not valid (left out of ``results``).
    """

    path: Path
    machine: str
    datetime: str
    commit: str
    machine_info: dict[str, Any]
    results: dict[str, Result]
    invalid: tuple[str, ...] = ()


@dataclass(frozen=True)
class BrokenNewest:
    """The newest file of a folder (by autosave number) that is not a valid run, and the machines it belongs to."""

    path: Path
    reason: str
    machines: tuple[str, ...]


@dataclass(frozen=True)
class Runs:
    """What :func:`read_runs` found: the valid runs by machine (oldest first), and the broken newest files."""

    by_machine: dict[str, list[Run]]
    broken_newest: list[BrokenNewest]


def finite(value: object) -> float | None:
    """``value`` as a float when it is a finite JSON number (not a bool); None otherwise."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        number = float(value)
    except OverflowError:
        return None
    return number if math.isfinite(number) else None


def shown(value: object, limit: int = 60) -> str:
    """``repr(value)``, shortened to ``limit`` characters: for messages that name a value read from a file."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def moment(text: object) -> _datetime | None:
    """An ISO 8601 date and time as a naive UTC datetime (a naive one is taken as UTC); None when it is not one."""
    if not isinstance(text, str):
        return None
    try:
        when = _datetime.fromisoformat(text)
        return when.astimezone(timezone.utc).replace(tzinfo=None) if when.tzinfo else when
    except (ValueError, OverflowError):
        return None


def _read_regular(path: Path) -> bytes:
    """The bytes of ``path`` when it is a regular file; ValueError otherwise (a FIFO is never waited on)."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except OSError as exc:
        raise ValueError(f"{path}: not readable ({exc.strerror or exc})") from None
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            kind = "a named pipe" if stat.S_ISFIFO(mode) else "a folder" if stat.S_ISDIR(mode) else "a special file"
            raise ValueError(f"{path}: not a regular file ({kind})")
        with os.fdopen(fd, "rb", closefd=False) as f:
            return f.read()
    except OSError as exc:
        raise ValueError(f"{path}: not readable ({exc.strerror or exc})") from None
    finally:
        os.close(fd)


def _object(data: dict[str, Any], key: str, where: str, path: Path) -> dict[str, Any]:
    """``data[key]`` when it is an object, {} when absent or null; ValueError naming the field otherwise."""
    value = data.get(key)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ValueError(f"{path}: not a pytest-benchmark run ({where}{key} is {shown(value)}, not an object)")
    return value


def _check_machine_info(machine_info: dict[str, Any], path: Path) -> dict[str, Any]:
    """The ``torchledger`` part of ``machine_info``, its fields checked for the types the readers rely on."""
    _object(machine_info, "cpu", "machine_info.", path)
    info = _object(machine_info, "torchledger", "machine_info.", path)
    gpus = info.get("gpus")
    if gpus is not None and not (isinstance(gpus, list) and all(isinstance(g, dict) for g in gpus)):
        raise ValueError(f"{path}: not a pytest-benchmark run "
                         f"(machine_info.torchledger.gpus is {shown(gpus)}, not a list of objects)")
    tag = info.get("device_tag")
    if tag is not None and not isinstance(tag, str):
        raise ValueError(f"{path}: not a pytest-benchmark run "
                         f"(machine_info.torchledger.device_tag is {shown(tag)}, not a string)")
    return info


def _result(entry: dict[str, Any], name: str, path: Path) -> Result | None:
    """One benchmark entry; None, with a warning naming the file and the benchmark, when its statistics are invalid."""
    stats = entry.get("stats")
    problem = None
    median = iqr = None
    rounds = 1
    if not isinstance(stats, dict):
        problem = f"stats {shown(stats)} is not an object"
    else:
        median = finite(stats.get("median"))
        iqr = finite(stats.get("iqr", 0.0))
        raw_rounds = stats.get("rounds", 1)
        if median is None or median <= 0:
            problem = f"median {shown(stats.get('median'))} is not a finite number > 0"
        elif iqr is None or iqr < 0:
            problem = f"iqr {shown(stats.get('iqr'))} is not a finite number >= 0"
        elif isinstance(raw_rounds, bool) or not isinstance(raw_rounds, int) or raw_rounds < 1:
            problem = f"rounds {shown(raw_rounds)} is not a positive integer"
        else:
            rounds = raw_rounds
    if problem is not None or median is None or iqr is None:
        warnings.warn(f"{path}: {name}: {problem}: left out", SkippedData, stacklevel=3)
        return None
    extra = entry.get("extra_info")
    if extra is not None and not isinstance(extra, dict):
        warnings.warn(f"{path}: {name}: extra_info {shown(extra)} is not an object: ignored", SkippedData,
                      stacklevel=3)
        extra = None
    group = entry.get("group")
    return Result(name=name, group=group if isinstance(group, str) and group else "(no group)", median=median,
                  iqr=iqr, rounds=rounds, extra_info=dict(extra or {}))


def load_run(path: Path) -> Run:
    """Parse one pytest-benchmark JSON file; ValueError naming the file when it is not one.

    Benchmark entries with invalid statistics are left out of the run, each named in a :class:`SkippedData` warning.
    """
    raw = _read_regular(path)
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: not readable JSON ({exc})") from None
    except RecursionError:
        raise ValueError(f"{path}: not a pytest-benchmark run (JSON nested too deeply)") from None
    if not isinstance(data, dict) or not isinstance(data.get("benchmarks"), list) or "machine_info" not in data:
        raise ValueError(f"{path}: not a pytest-benchmark run (no 'benchmarks' list and 'machine_info')")
    if not isinstance(data["machine_info"], dict):
        raise ValueError(f"{path}: not a pytest-benchmark run (machine_info is {shown(data['machine_info'])}, "
                         "not an object)")
    machine_info: dict[str, Any] = data["machine_info"]
    info = _check_machine_info(machine_info, path)
    commit = _object(data, "commit_info", "", path).get("id")
    if commit is not None and not isinstance(commit, str):
        raise ValueError(f"{path}: not a pytest-benchmark run (commit_info.id is {shown(commit)}, not a string)")
    if moment(data.get("datetime")) is None:
        raise ValueError(f"{path}: not a pytest-benchmark run ('datetime' is {shown(data.get('datetime'))}, "
                         "not an ISO 8601 date and time)")
    results: dict[str, Result] = {}
    invalid: list[str] = []
    for i, entry in enumerate(data["benchmarks"]):
        name = entry.get("fullname") if isinstance(entry, dict) else None
        if not isinstance(entry, dict) or not isinstance(name, str) or not name:
            raise ValueError(f"{path}: not a pytest-benchmark run (benchmark #{i} has no 'fullname')")
        result = _result(entry, name, path)
        if result is None:
            invalid.append(name)
        else:
            results[name] = result
    tag = info.get("device_tag") or _folder_tag(path)
    return Run(path=path, machine=tag, datetime=data["datetime"], commit=(commit or "")[:12],
               machine_info=machine_info, results=results, invalid=tuple(invalid))


def _folder_tag(path: Path) -> str:
    """The machine a run file is filed under: ``<storage>/<device tag>/<machine id>/<run>.json``."""
    return path.parent.parent.name or path.parent.name


_AUTOSAVE = re.compile(r"(\d+)_.*\.json")


def _autosave_number(path: Path) -> int | None:
    match = _AUTOSAVE.fullmatch(path.name)
    return int(match.group(1)) if match else None


def read_runs(paths: Iterable[str | Path]) -> Runs:
    """Every run under ``paths`` (storage folders, machine folders or single files), by machine, oldest first.

    Raises ValueError when a path does not exist; skips, with a :class:`SkippedData` warning naming it, any file that
    is not a run, except the newest autosaved file of each folder, which is returned in ``broken_newest`` instead.
    """
    files: list[Path] = []
    for p in paths:
        path = Path(p)
        if not path.exists() and not path.is_symlink():
            raise ValueError(f"PATH={str(p)!r} does not exist")
        files += sorted(path.rglob("*.json")) if path.is_dir() else [path]
    files = list(dict.fromkeys(files))
    newest: dict[Path, Path] = {}
    for f in files:
        number = _autosave_number(f)
        if number is not None:
            best = newest.get(f.parent)
            if best is None or (number, f.name) > (_autosave_number(best) or 0, best.name):
                newest[f.parent] = f
    runs: dict[str, list[Run]] = {}
    machines_of: dict[Path, set[str]] = {}
    broken: list[tuple[Path, str]] = []
    for f in files:
        try:
            run = load_run(f)
        except ValueError as exc:
            if newest.get(f.parent) == f:
                broken.append((f, str(exc)))
            else:
                warnings.warn(f"skipped {exc}", SkippedData, stacklevel=2)
            continue
        runs.setdefault(run.machine, []).append(run)
        machines_of.setdefault(f.parent, set()).add(run.machine)
    for history in runs.values():
        history.sort(key=lambda r: (moment(r.datetime) or _datetime.min, r.path.name))
    return Runs(runs, [BrokenNewest(f, reason, tuple(sorted(machines_of.get(f.parent) or {_folder_tag(f)})))
                       for f, reason in broken])


def load_runs(paths: Iterable[str | Path]) -> dict[str, list[Run]]:
    """Every valid run under ``paths``, by machine, oldest first: :func:`read_runs` with every file not a run named
    in a warning, the newest autosaved one of a folder included."""
    found = read_runs(paths)
    for b in found.broken_newest:
        warnings.warn(f"skipped {b.reason}", SkippedData, stacklevel=2)
    return found.by_machine


@contextmanager
def skipped_data_as_lines(prefix: str, stream: TextIO | None = None) -> Iterator[None]:
    """Within the block, every :class:`SkippedData` warning is written to ``stream`` (stderr) as one line.

    Other warnings are shown as usual.
    """
    out = stream or sys.stderr
    with warnings.catch_warnings():
        warnings.simplefilter("always", SkippedData)
        show = warnings.showwarning

        def one_line(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                     file: TextIO | None = None, line: str | None = None) -> None:
            if issubclass(category, SkippedData):
                print(f"{prefix}{message}", file=out, flush=True)
            else:
                show(message, category, filename, lineno, file, line)

        warnings.showwarning = one_line
        yield


def newest_results(history: list[Run]) -> Run:
    """The newest run of a machine (``history`` oldest first) with the results of the earlier runs of the same
    commit merged in, the newer result winning: one invocation of the suite per benchmark group (as a time-limited
    GPU session runs it) still makes one complete run of that commit."""
    if not history:
        raise ValueError("history is empty: no runs")
    newest = history[-1]
    if not newest.commit:
        return newest
    merged: dict[str, Result] = {}
    for run in history:
        if run.commit == newest.commit:
            merged.update(run.results)
    return Run(path=newest.path, machine=newest.machine, datetime=newest.datetime, commit=newest.commit,
               machine_info=newest.machine_info, results=merged, invalid=newest.invalid)

"""Hardware comparison report: the newest run of each machine merged into one Markdown page with PNG figures.

- a system-description table per machine;
- per benchmark group, speed normalized to a reference machine (a table and a bar chart);
- a roofline chart: achieved FLOP/s against arithmetic intensity for the matmuls that recorded both, under each
  machine's ceilings (the hardware table's peaks on GPUs; on a CPU, its own measured matmul peak and copy bandwidth);
- predicted against measured peak memory for every benchmark that recorded both.

A figure in ``extra_info`` that is present but not a finite number > 0 is named (file, benchmark, field) in a warning
and its benchmark is left out of the chart and table that need it. The report is built in a new folder of its own
beside the target and renamed onto it when whole: nothing is ever deleted but that folder, and an existing report
is never replaced, not even by a report built at the same moment.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import stat
import sys
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from torchledger.formulas.hardware import DeviceSpec, lookup_device
from torchledger.reporting.calibration import run_cpu_threads
from torchledger.reporting.results import (
    Comparable,
    Described,
    Result,
    Run,
    SkippedData,
    describe,
    finite,
    newest_results,
    shown,
    work_difference,
    work_text,
)
from torchledger.reporting.units import format_bytes, format_rate, format_seconds


def _progress(step: int, total: int, what: str) -> None:
    print(f"[{step}/{total}] {what}", file=sys.stderr, flush=True)


def _cell(value: object) -> str:
    """A value read from a file, on one line and safe inside a Markdown table cell."""
    return " ".join(str(value).split()).replace("|", "\\|")


def _bytes(value: object) -> str:
    number = finite(value)
    return format_bytes(number) if number is not None and number >= 0 else "?"


def _system_rows(runs: dict[str, Run]) -> list[str]:
    # "CPU threads": what a CPU benchmark of the run ran on (--ledger-threads); a one-thread figure and a two-thread
    # one of the same machine are different figures
    lines = ["| machine | GPU | CPU | cores | CPU threads | RAM | torch | CUDA | run | commit |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for tag, run in runs.items():
        info = run.machine_info.get("torchledger")
        info = info if isinstance(info, dict) else {}
        gpus = ", ".join(f"{g.get('name')} ({_bytes(g.get('memory_bytes') or 0)}, driver {g.get('driver')}, "
                         f"{g.get('power_limit_w')} W, PCIe gen {g.get('pcie_generation')} x{g.get('pcie_width')})"
                         for g in info.get("gpus") or [] if isinstance(g, dict)) or "none"
        cpu_info = run.machine_info.get("cpu")
        cpu = info.get("cpu_model") or (cpu_info.get("brand_raw") if isinstance(cpu_info, dict) else None) or "?"
        cells = [tag, gpus, cpu, info.get("cpu_cores_logical", "?"), run_cpu_threads(run) or "torch's default",
                 _bytes(info.get("ram_bytes") or 0),
                 info.get("torch", "?"), info.get("cuda") or "-", run.datetime[:19], run.commit or "-"]
        lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    return lines


_ELEMENT_BYTES = {"fp64": 8, "fp32": 4, "tf32": 4, "bf16": 2, "fp16": 2, "fp8": 1, "int8": 1}
_MARKERS = {"fp64": "X", "fp32": "o", "tf32": "s", "bf16": "^", "fp16": "v", "fp8": "D", "int8": "P"}
_UNITS = {"tflops": "TFLOP/s", "gbps": "GB/s", "samples_per_s": "samples/s", "batches_per_s": "batches/s"}


@dataclass
class _Measures:
    """The figures of one run that the report reads from ``extra_info``, each value checked once."""

    roofline: dict[str, tuple[float, float, str]] = field(default_factory=dict)  # dtype: intensity, TFLOP/s, bench
    bandwidth: float | None = None  # measured copy bandwidth, bytes/s
    memory: list[tuple[str, int, int]] = field(default_factory=list)  # benchmark, predicted, measured bytes


def _number(run: Run, name: str, key: str) -> float | None:
    """``extra_info[key]`` of benchmark ``name``: None when absent, and also, with a warning, when not valid."""
    value = run.results[name].extra_info.get(key)
    if value is None:
        return None
    number = finite(value)
    if number is None or number <= 0:
        warnings.warn(f"{run.path}: {name}: extra_info {key} {shown(value)} is not a finite number > 0: "
                      "left out of the report", SkippedData, stacklevel=2)
        return None
    return number


def _intensity(run: Run, name: str, dtype: str) -> float | None:
    """FLOP per byte of a matmul: recorded, or from its (m, k, n) shape with inputs and output in ``dtype``."""
    recorded = _number(run, name, "intensity")
    if recorded is not None or "intensity" in run.results[name].extra_info:
        return recorded
    shape = run.results[name].extra_info.get("shape")
    size = _ELEMENT_BYTES.get(dtype)
    if not (isinstance(shape, list) and len(shape) == 3 and size):
        return None
    m, k, n = (finite(v) for v in shape)
    if m is None or k is None or n is None or min(m, k, n) <= 0:
        return None
    return 2 * m * k * n / (size * (m * k + k * n + m * n))


def _measures(run: Run) -> _Measures:
    m = _Measures()
    for name, r in sorted(run.results.items()):
        dtype = r.extra_info.get("dtype")
        dtype = dtype if isinstance(dtype, str) else ""
        intensity, tflops = _intensity(run, name, dtype), _number(run, name, "tflops")
        if intensity is not None and tflops is not None and dtype and (dtype not in m.roofline
                                                                       or tflops > m.roofline[dtype][1]):
            m.roofline[dtype] = (intensity, tflops, name)
        if "copy_bandwidth" in name:
            m.bandwidth = _number(run, name, "bandwidth_bytes_per_s") or m.bandwidth
        predicted, peak = _number(run, name, "predicted_memory"), _number(run, name, "peak_memory")
        if predicted is not None and peak is not None:
            m.memory.append((name, int(predicted), int(peak)))
    return m


def _lookup(name: str) -> DeviceSpec | None:
    """The hardware table's entry for a GPU name, or None (quietly: an unknown GPU uses measured ceilings)."""
    return lookup_device(name, warn=False)


def _ceilings(run: Run, measured: _Measures) -> tuple[dict[str, float], float | None, str]:
    """Peak TFLOP/s by dtype, memory bandwidth (bytes/s) and where they come from: the hardware table's for a known
    GPU, else the machine's own best measured matmul per dtype and copy bandwidth."""
    info = run.machine_info.get("torchledger")
    gpus = info.get("gpus") if isinstance(info, dict) else None
    if isinstance(gpus, list) and gpus and isinstance(gpus[0], dict):
        spec = _lookup(str(gpus[0].get("name")))
        if spec is not None:
            return {d: p / 1e12 for d, p in spec.peaks.items()}, spec.memory_bandwidth, f"datasheet ({spec.name})"
    return {d: v[1] for d, v in measured.roofline.items()}, measured.bandwidth, "measured"


def colours(machines: list[str]) -> dict[str, str]:
    """One colour per machine, the same in every figure of a report."""
    return {m: f"C{i % 10}" for i, m in enumerate(machines)}


def _ratio(x: float) -> str:
    return f"{x:,.0f}x" if x >= 1000 else f"{x:.3g}x"


def _spread_labels(items: list[tuple[float, str, str]], gap: float) -> list[tuple[float, str, str]]:
    """Labels at (log10) heights moved apart, in order, so that no two are closer than ``gap`` decades."""
    out: list[tuple[float, str, str]] = []
    for y, text, colour in sorted(items):
        if out and y - out[-1][0] < gap:
            y = out[-1][0] + gap
        out.append((y, text, colour))
    return out


def _plot_speed(group: str, names: list[str], speed: dict[str, list[float | None]], notes: list[str],
                colour: dict[str, str], reference: str, out: Path) -> None:
    import math

    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter, NullFormatter

    fig = Figure(figsize=(10, max(3.0, 0.45 * len(names) * max(len(speed), 1) + 1.6)))
    ax = fig.subplots()
    height = 0.8 / max(len(speed), 1)
    values = [v for vs in speed.values() for v in vs if v]
    lo = min([*values, 1.0]) / 3
    hi = max([*values, 1.0]) * 3
    for i, (machine, vs) in enumerate(speed.items()):
        ys = [j + i * height for j in range(len(names))]
        bars = [(y, v) for y, v in zip(ys, vs, strict=True) if v]
        ax.barh([y for y, _ in bars], [v - 1 for _, v in bars], left=1, height=height, color=colour[machine],
                label=machine)
        for y, v in bars:
            ax.annotate(_ratio(v), (v, y), xytext=(3 if v >= 1 else -3, 0), textcoords="offset points",
                        ha="left" if v >= 1 else "right", va="center", fontsize=7)
    for j, note in enumerate(notes):
        if note:
            ax.annotate(note, (1, j + 0.4 - height / 2), xytext=(4, 0), textcoords="offset points", va="center",
                        fontsize=7, color="dimgray")
    ax.set_xscale("log")
    ax.set_xlim(lo, hi)
    ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: _ratio(x) if x > 0 and math.isfinite(x) else ""))
    ax.xaxis.set_minor_formatter(NullFormatter())  # plain labels only: no mathtext (its parser is not thread-safe)
    ax.set_yticks([j + 0.4 - height / 2 for j in range(len(names))])
    ax.set_yticklabels([n.split("::")[-1][:60] for n in names], fontsize=7)
    ax.invert_yaxis()
    ax.axvline(1.0, color="black", linewidth=0.8)
    ax.set_xlabel(f"speed relative to {reference} (log scale; > 1 is faster): rate ratio, or time ratio of "
                  "identical work")
    ax.set_title(f"group: {group}")
    if values:
        ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def _plot_roofline(runs: dict[str, Run], measures: dict[str, _Measures], out: Path,
                   colour: dict[str, str] | None = None) -> list[tuple[str, str, float, float, float | None]]:
    """The roofline figure; returns its points: machine, dtype, intensity, TFLOP/s, fraction of that dtype's
    ceiling at that intensity (None without a ceiling)."""
    import math

    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from matplotlib.ticker import FuncFormatter, NullFormatter

    colour = colour or colours(list(runs))
    points: list[tuple[str, str, float, float, float | None]] = []
    lines: list[tuple[str, str, float, float]] = []  # machine, dtype, peak TFLOP/s, bandwidth TB/s
    for tag, run in runs.items():
        peaks, bandwidth, _ = _ceilings(run, measures[tag])
        for dtype, (x, y, _name) in sorted(measures[tag].roofline.items()):
            peak = peaks.get(dtype)
            roof = min(peak, x * bandwidth / 1e12) if peak and bandwidth else peak
            points.append((tag, dtype, x, y, y / roof if roof else None))
            if peak and bandwidth:
                lines.append((tag, dtype, peak, bandwidth / 1e12))
    if not points:
        return points
    fig = Figure(figsize=(10.5, 6.5))
    ax = fig.subplots()
    xs = [p[2] for p in points]
    x_lo, x_hi = min(xs) / 30, max(xs) * 40  # room on the right for the ceilings' labels
    for tag, dtype, x, y, _ in points:
        ax.scatter([x], [y], color=colour[tag], marker=_MARKERS.get(dtype, "o"), s=40, zorder=3,
                   edgecolors="black", linewidths=0.4)
    label_items: list[tuple[float, str, str]] = []
    by_ceiling: dict[tuple[str, float, float], list[str]] = {}
    for tag, dtype, peak, bw in lines:
        key = next((k for k in by_ceiling if k[0] == tag and abs(k[1] / peak - 1) < 0.02), (tag, peak, bw))
        by_ceiling.setdefault(key, []).append(dtype)
    for (tag, peak, bw), dtypes in by_ceiling.items():
        ridge = peak / bw
        grid = sorted({x_lo, min(max(ridge, x_lo), x_hi), x_hi})
        ax.plot(grid, [min(peak, g * bw) for g in grid], color=colour[tag], linewidth=1, linestyle="--", zorder=2)
        text = f"{tag} {', '.join(dtypes)}: {format_rate(peak, 'TFLOP/s')}"
        label_items.append((math.log10(peak), text, colour[tag]))
    ys = [p[3] for p in points] + [p[2] for p in lines]
    y_lo, y_hi = min(ys) / 10, max(ys) * 4
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlim(x_lo, x_hi)
    ax.set_ylim(y_lo, y_hi)
    gap = (math.log10(y_hi) - math.log10(y_lo)) * 0.04
    for y, text, c in _spread_labels(label_items, gap):
        ax.annotate(text, (x_hi, 10 ** y), xytext=(-4, 2), textcoords="offset points", ha="right", va="bottom",
                    fontsize=7, color=c)
    number = FuncFormatter(lambda v, _: f"{v:,.0f}" if v >= 1 else f"{v:g}")
    for axis in (ax.xaxis, ax.yaxis):
        axis.set_major_formatter(number)
        axis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("arithmetic intensity (FLOP/byte)")
    ax.set_ylabel("achieved TFLOP/s")
    ax.set_title("roofline: each matmul under its own dtype's ceiling (dashed)")
    handles = [Line2D([], [], color=colour[t], linestyle="--", label=t) for t in runs]
    dtypes = sorted({p[1] for p in points}, key=lambda d: list(_MARKERS).index(d) if d in _MARKERS else 99)
    handles += [Line2D([], [], color="gray", marker=_MARKERS.get(d, "o"), linestyle="", label=d) for d in dtypes]
    ax.legend(handles=handles, fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.grid(True, which="major", linewidth=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    return points


def _plot_memory(runs: dict[str, Run], measures: dict[str, _Measures], out: Path,
                 colour: dict[str, str] | None = None) -> list[tuple[str, str, int, int]]:
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter, NullFormatter

    colour = colour or colours(list(runs))
    rows = [(tag, name, predicted, measured) for tag in runs for name, predicted, measured in measures[tag].memory]
    if not rows:
        return rows
    fig = Figure(figsize=(6.5, 6))
    ax = fig.subplots()
    for tag in runs:
        pts = [(p, m) for t, _, p, m in rows if t == tag]
        if pts:
            ax.scatter([p for p, _ in pts], [m for _, m in pts], color=colour[tag], label=tag, zorder=3)
    lo = min(min(p, m) for _, _, p, m in rows) / 1.5
    hi = max(max(p, m) for _, _, p, m in rows) * 1.5
    ax.plot([lo, hi], [lo, hi], color="black", linewidth=0.8, label="measured = predicted")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlim(lo, hi)
    ax.set_ylim(lo, hi)
    in_bytes = FuncFormatter(lambda v, _: format_bytes(v) if v > 0 else "")
    for axis in (ax.xaxis, ax.yaxis):
        axis.set_major_formatter(in_bytes)
        axis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("predicted peak memory")
    ax.set_ylabel("measured peak memory")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    return rows


def _figure_names(groups: list[str]) -> dict[str, str]:
    """A file name per group, inside the report folder whatever the group is called, and one per group."""
    names: dict[str, str] = {}
    for group in groups:
        base = "speed-" + (re.sub(r"[^A-Za-z0-9_.-]", "_", group).lstrip(".") or "group")
        name, n = f"{base}.png", 2
        while name in names.values():
            name, n = f"{base}-{n}.png", n + 1
        names[group] = name
    return names


def _figure(c: Comparable | None, result: Result | None) -> str:
    """A table cell: the comparable figure with its fraction of peak, and the median time."""
    if result is None:
        return "-"
    time = format_seconds(result.median)
    if c is None:
        return time
    text = format_rate(c.value, _UNITS[c.name])
    if c.fraction_of_peak is not None:
        text += f" ({c.fraction_of_peak * 100:.0f}% of {c.dtype + ' ' if c.dtype else ''}peak)"
    return f"{text}; {time}"


def compare_row(ref: tuple[Result, Described] | None, other: tuple[Result, Described] | None
                ) -> tuple[float | None, str]:
    """How a machine's result compares with the reference's: (speed ratio or None, the cell that says so).

    A rate of the hardware (TFLOP/s, GB/s) compares across sizes of work; seconds, and rates of samples or batches,
    only between runs of identical, recorded work. Anything else is not a speed ratio: the cell names why.
    """
    if ref is None or other is None:
        return None, "-" if other is None else "no reference result"
    (r_res, r_desc), (o_res, o_desc) = ref, other
    same_work = r_desc.work is not None and r_desc.work == o_desc.work
    rc, oc = r_desc.comparable, o_desc.comparable
    if rc is not None and oc is not None and rc.name == oc.name and (rc.size_free or same_work):
        ratio = oc.value / rc.value
        return ratio, f"{_ratio(ratio)} ({_UNITS[rc.name]}{', same work' if same_work else ''})"
    if same_work:
        ratio = r_res.median / o_res.median
        return ratio, f"{_ratio(ratio)} (time, same work)"
    difference = work_difference({"reference": r_desc.work, "this": o_desc.work})
    return None, f"not compared: {difference}"


def _write(runs: dict[str, Run], ref: str, folder: Path) -> None:
    """The page and its figures, into ``folder``."""
    colour = colours(list(runs))
    measures = {tag: _measures(run) for tag, run in runs.items()}
    described = {tag: {n: (r, describe(r, f"{run.path}: {n}")) for n, r in run.results.items()}
                 for tag, run in runs.items()}
    groups = sorted({r.group for run in runs.values() for r in run.results.values()})
    figures = _figure_names(groups)
    others = [t for t in runs if t != ref]
    total = len(groups) + 3
    step = 0
    lines = ["# Hardware comparison", "",
             f"The newest state of each of {len(runs)} machine(s) (all runs of its newest commit), compared with "
             f"`{ref}`. Machines are compared on rates that do not depend on the size of the work (TFLOP/s, GB/s), "
             "each with its fraction of that machine's own peak for the dtype; seconds only between runs of "
             "identical work. Rows whose work differs show both machines side by side with the difference named, "
             "never as a speed ratio.", "",
             "## Machines", "", *_system_rows(runs), ""]
    step += 1
    _progress(step, total, "machines")
    lines += ["## Speed by group", ""]
    for group in groups:
        step += 1
        _progress(step, total, f"group {group}")
        names = sorted({n for run in runs.values() for n, r in run.results.items() if r.group == group})
        speed: dict[str, list[float | None]] = {t: [] for t in others}
        notes: list[str] = []
        lines += [f"### {_cell(group)}", "",
                  "| benchmark | work | " + " | ".join(runs) + "".join(f" | {t} against {ref}" for t in others)
                  + " |", "| --- | --- |" + " --- |" * (len(runs) + len(others))]
        for n in names:
            row = {t: described[t].get(n) for t in runs}
            works = {t: d[1].work for t, d in row.items() if d is not None}
            difference = work_difference(works)
            work = work_text(next(iter(works.values()))) if not difference or len(works) == 1 else \
                f"differs: {difference}"
            cells = [_figure(d[1].comparable if d else None, d[0] if d else None) for d in row.values()]
            versus = []
            for t in others:
                ratio, text = compare_row(row[ref], row[t])
                speed[t].append(ratio)
                versus.append(text)
            notes.append("" if any(speed[t][-1] for t in others) else
                         ("work differs: not compared" if difference and len(works) > 1 else ""))
            lines.append(f"| {_cell(n.split('::')[-1])} | {_cell(work)} | " + " | ".join(cells)
                         + "".join(f" | {_cell(v)}" for v in versus) + " |")
        _plot_speed(group, names, speed, notes, colour, ref, folder / figures[group])
        lines += ["", f"![speed, {_cell(group)}]({figures[group]})", ""]
    step += 1
    _progress(step, total, "roofline")
    lines += ["## Roofline", ""]
    points = _plot_roofline(runs, measures, folder / "roofline.png", colour)
    if points:
        lines += ["The fastest matmul of each dtype on each machine against its arithmetic intensity, each under "
                  "its own dtype's ceiling: the datasheet's peak and memory bandwidth for a known GPU, the machine's "
                  "own best matmul of that dtype and copy bandwidth otherwise.", "",
                  "| machine | dtype | intensity | achieved | ceiling | of ceiling | benchmark |",
                  "| --- | --- | --- | --- | --- | --- | --- |"]
        for tag, dtype, x, y, fraction in points:
            peaks, _, source = _ceilings(runs[tag], measures[tag])
            ceiling = f"{format_rate(peaks[dtype], 'TFLOP/s')} ({source})" if dtype in peaks else "none"
            bench = measures[tag].roofline[dtype][2].split("::")[-1]
            lines.append(f"| {tag} | {_cell(dtype)} | {x:,.0f} FLOP/byte | {format_rate(y, 'TFLOP/s')} | "
                         f"{_cell(ceiling)} | {'-' if fraction is None else f'{fraction * 100:.0f}%'} | "
                         f"{_cell(bench)} |")
        lines += ["", "![roofline](roofline.png)", ""]
    else:
        lines += ["No benchmark recorded both `intensity` (or a matmul `shape`) and `tflops`.", ""]
    step += 1
    _progress(step, total, "memory")
    lines += ["## Predicted and measured memory", ""]
    rows = _plot_memory(runs, measures, folder / "memory.png", colour)
    if rows:
        lines += ["| machine | benchmark | predicted | measured | error |", "| --- | --- | --- | --- | --- |"]
        for tag, name, predicted, measured in rows:
            lines.append(f"| {tag} | {_cell(name.split('::')[-1])} | {format_bytes(predicted)} | "
                         f"{format_bytes(measured)} | {100 * (predicted - measured) / measured:+.2f}% |")
        lines += ["", "![memory](memory.png)", ""]
    else:
        lines += ["No benchmark recorded both `predicted_memory` and `peak_memory`.", ""]
    (folder / "report.md").write_text("\n".join(lines))


def _check_target(out_dir: Path) -> None:
    """ValueError naming ``-o`` unless it is a new folder, or an existing empty one (which the report replaces)."""
    if out_dir.name in ("", ".", ".."):
        raise ValueError(f"-o {out_dir}: name a new folder for the report")
    if out_dir.is_symlink():
        raise ValueError(f"-o {out_dir}: is a symbolic link; a report is written to a new folder, never through "
                         "a link")
    if out_dir.exists():
        if not out_dir.is_dir():
            raise ValueError(f"-o {out_dir}: exists and is not a folder; reports never overwrite")
        if any(out_dir.iterdir()):
            raise ValueError(f"-o {out_dir}: the folder exists and is not empty; reports never overwrite")


def _make_parents(folder: Path) -> list[Path]:
    """Create ``folder`` and its missing parents; returns the folders this call created, outermost first."""
    missing: list[Path] = []
    while not folder.exists() and not folder.is_symlink() and folder != folder.parent:
        missing.append(folder)
        folder = folder.parent
    created: list[Path] = []
    for d in reversed(missing):
        try:
            d.mkdir()
        except FileExistsError:
            continue
        created.append(d)
    return created


def _publish(tmp: Path, out_dir: Path) -> None:
    """Rename the finished ``tmp`` onto ``out_dir`` in one step, never replacing a report or a file.

    rename(2) replaces nothing but an empty folder: a target that has become a file, a link or a non-empty folder
    (another report finished first) makes it fail, and this one is refused.
    """
    try:
        os.rename(tmp, out_dir)
    except OSError as exc:
        if exc.errno in (errno.EEXIST, errno.ENOTEMPTY, errno.ENOTDIR, errno.EISDIR):
            raise ValueError(f"-o {out_dir}: was taken while this report was being built (by another report to the "
                             "same folder?); reports never overwrite") from None
        raise


def _folder_mode(page: Path) -> int:
    """The mode a folder made under the current umask would have, read off a file just written under it."""
    mode = stat.S_IMODE(page.stat().st_mode) & 0o666
    return mode | (mode & 0o444) >> 2


def build_report(history: dict[str, list[Run]], out_dir: Path, *, reference: str | None = None) -> Path:
    """Write ``out_dir/report.md`` and its figures from the newest run of each machine (with the earlier runs of its
    commit merged in: :func:`~torchledger.reporting.results.newest_results`); returns the page's path.

    The folder is written whole or not at all: built in a new folder of its own beside ``out_dir``, then renamed
    onto it. ``out_dir`` must not exist or be an empty folder; ValueError names it otherwise, also when another
    report takes it first. On any failure, Ctrl-C included, the build folder (and the parents this call created)
    are removed and the error is raised again: OSError for a folder that cannot be written.
    """
    if not history:
        raise ValueError("no runs to report on")
    runs = {tag: newest_results(h) for tag, h in sorted(history.items())}
    ref = reference or next(iter(runs))
    if ref not in runs:
        raise ValueError(f"reference={ref!r} is not among the machines: {', '.join(runs)}")
    _check_target(out_dir)
    created = _make_parents(out_dir.parent)
    tmp: Path | None = None
    try:
        tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f"{out_dir.name}.partial-"))
        _write(runs, ref, tmp)
        tmp.chmod(_folder_mode(tmp / "report.md"))
        _publish(tmp, out_dir)
    except BaseException:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        for d in reversed(created):
            try:
                d.rmdir()
            except OSError:
                break
        raise
    return out_dir / "report.md"

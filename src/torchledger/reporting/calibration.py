"""A machine's calibration for the step-time model, read from the suite's own benchmark runs of that machine.

From the newest run of a machine folder (``results/<device tag>/``, the runs of its newest commit merged, as
:func:`~torchledger.reporting.results.newest_results` merges them), only the measurements of the hardware's ceilings
are read, never a timed training step:

- every matmul of the ``roofline`` group (``test_biggest_matmul``, and ``test_matmul_shape``: the shapes the
  profile's steps run, each in its operand layout) and of the ``precision`` group (``test_matmul``): its dtype, its
  shape (``work.shape``, ``shape``, or the edge of a square matmul of the recorded FLOPs), its ``layout`` (``nn``
  where the run recorded none) and its achieved FLOP/s (FLOPs over the median
  wall time of a call, the statistic the timed steps report); repeated measurements of one shape and dtype are
  averaged;
- the device-to-device copy of the ``roofline`` group (``test_copy_bandwidth``): bytes read plus written
  (``bytes_moved`` in the runs that recorded it, else twice the copied ``work.bytes``) over the median time.

- every kernel of the ``roofline`` group's ``test_kernel_rate`` (attention, the norms, the activations and
  cross-entropy, forward and backward, at the profile's shapes): its ``kernel``, ``dtype`` and ``units`` over the
  median time, the rate :meth:`~torchledger.formulas.steptime.Calibration.kernel_rate` gives the op list's kernels
  of that name and dtype (a run without them leaves those ops to their bytes, attention to the matmul rate);
- the update in place of the ``roofline`` group (``test_update_bandwidth``: ``x.mul_(s)``), bytes read plus written
  back over the median time, the bandwidth of the ops that update their operand in place (the optimizer, gradient
  accumulation); a run without it charges them the copy's;
- an optimizer's own update (``test_optimizer_update``: AdamW foreach over the profile's MLP parameters), the bytes
  its op list moves over the median time less its launches at the optimizer phase's host cost per op: the
  bandwidth that optimizer's ops are charged at (``optimizer_bandwidth``), which its multi-operand updates do not
  reach at ``x.mul_``'s;
- on a CPU, the size of its last-level cache (``machine_info.torchledger.llc_bytes``, read from sysfs), as
  ``cache_bytes``: the run times its matmuls with their operands cached, and a step whose parameters, gradients
  and optimizer state outgrow that cache reads each weight from memory in the forward and writes each weight
  gradient into lines that are not cached (:func:`~torchledger.formulas.steptime.op_seconds`);
- on a CPU, the host's cost per op of a model's own step, per phase (``test_model_host_cost``: the profile's
  transformer at batch 1 and one token; each phase's seconds less the device time this calibration predicts for
  that size, over the phase's launches), which :meth:`~torchledger.formulas.steptime.Calibration.for_model` puts in
  place of the figure below for that model and recipe. On CUDA it is recorded and not applied: there the host
  issues a step's ops while the GPU runs earlier ones, and the model adds the two (an upper bound), so a larger
  host figure would only loosen the bound;
- the host's cost per op inside a training step, per phase, from the ``roofline`` group's ``test_host_overhead``
  (``host_overhead_s``: a step of 64 Linear(8, 8) at batch 1, each phase's median seconds over the launches the
  step-time model lists for that step; results of one run averaged), where the run has it; else the device kind's
  documented figure (:data:`~torchledger.formulas.steptime.LAUNCH_OVERHEAD_S`) stands in. The bare launch of
  ``test_launch_overhead`` (one-element adds, no module, no autograd) is not charged: it is a floor under the cost
  of a step's op, not that cost. The calibration's ``source`` says which figure was used.

The datasheet peaks (for MFU) come from the hardware table when the run names a GPU of it.

**The machine's speed.** A CPU figure timed with the speed probe in its rounds (``machine_speed``, see
:class:`~torchledger.formulas.steptime.MachineSpeed`) is carried to one speed before it is averaged or used: to the
speed ``at`` (a timed step's own ``machine_speed``, when the calibration predicts that step), else to the median
speed of the run's ceilings. A rate scales with its probe's rate (matmuls and kernels with the matmul probe, the
bandwidths with the copy probe), the host's cost per op with the host probe's seconds. Figures of older runs, which
recorded no speed, are taken as measured.
"""

from __future__ import annotations

import warnings
from dataclasses import replace
from pathlib import Path
from typing import Any

from torchledger.formulas.hardware import lookup_device, peak_dtype
from torchledger.formulas.specs import get_preset
from torchledger.formulas.steptime import (
    LAUNCH_OVERHEAD_S,
    LAYOUTS,
    Calibration,
    KernelPoint,
    MachineSpeed,
    MatmulPoint,
    achieved_bandwidth,
    op_seconds,
    transformer_step_ops,
)
from torchledger.reporting.results import Result, Run, finite, newest_results, read_runs

__all__ = ["HOST_PHASES", "calibration_from_run", "read_calibration"]

# The phases test_host_overhead measures (the recompute takes the forward's figure: Calibration.per_launch)
HOST_PHASES = ("forward", "backward", "optimizer")

_MATMUL_TESTS = ("test_biggest_matmul", "test_matmul", "test_matmul_shape")
# every test whose figures the calibration reads (a timed step is never among them)
_CEILING_TESTS = (*_MATMUL_TESTS, "test_kernel_rate", "test_host_overhead", "test_model_host_cost",
                  "test_optimizer_update", "test_update_bandwidth", "test_copy_bandwidth")


def _test_name(result: Result) -> str:
    return result.name.rsplit("::", 1)[-1].split("[", 1)[0]


def _shape(extra: dict[str, Any]) -> tuple[int, int, int] | None:
    """The (m, k, n) of a matmul benchmark: recorded, or the edge of the square matmul of its FLOPs."""
    work = extra.get("work")
    for raw in ((work or {}).get("shape") if isinstance(work, dict) else None, extra.get("shape")):
        if isinstance(raw, list) and len(raw) == 3 and all(isinstance(v, int) and v > 0 for v in raw):
            return raw[0], raw[1], raw[2]
    flops = finite(extra.get("flops"))
    if flops is None or flops <= 0:
        return None
    edge = round((flops / 2) ** (1 / 3))
    return (edge, edge, edge) if 2 * edge**3 == flops else None


def _speed_reference(run: Run, at: MachineSpeed | None) -> MachineSpeed | None:
    """The speed the run's ceilings are carried to: ``at``, else the median of the speeds its ceilings recorded."""
    if at is not None:
        return at
    speeds = [speed for result in run.results.values() if result.group in ("roofline", "precision")
              and _test_name(result) in _CEILING_TESTS
              and (speed := MachineSpeed.from_record(result.extra_info.get("machine_speed"))) is not None]
    return MachineSpeed.median(speeds) if speeds else None


def calibration_from_run(run: Run, at: MachineSpeed | None = None) -> Calibration:
    """The calibration of one run (see the module docstring), its ceilings carried to the machine speed ``at``
    (default: the median speed of the run's ceilings); ValueError naming the run when it measured no matmul or no
    copy bandwidth."""
    reference = _speed_reference(run, at)
    carried: set[int] = set()  # the results whose figures were carried

    def scaled(kind: str, value: float, extra: dict[str, Any]) -> float:
        speed = MachineSpeed.from_record(extra.get("machine_speed"))
        if speed is None or reference is None:
            return value
        carried.add(id(extra))
        return speed.scale(kind, value, reference)

    info = run.machine_info.get("torchledger") or {}
    gpus = info.get("gpus") or []
    gpu_name = gpus[0].get("name") if gpus and isinstance(gpus[0], dict) else None
    kind = "cuda" if gpu_name else "cpu"
    samples: dict[tuple[str, tuple[int, int, int], str], list[float]] = {}
    bandwidths: list[float] = []
    host: dict[str, list[float]] = {}
    kernels: dict[tuple[str, str, int], list[float]] = {}
    updates: list[float] = []
    model_floors: dict[tuple[str, str], tuple[int, int, dict[str, float]]] = {}
    optimizer_runs: dict[str, list[tuple[float, int, float, dict[str, Any]]]] = {}
    for result in run.results.values():
        name, extra = _test_name(result), result.extra_info
        if result.group == "roofline" and name == "test_kernel_rate":
            kernel, dtype, units = extra.get("kernel"), extra.get("dtype"), extra.get("units")
            if isinstance(kernel, str) and isinstance(dtype, str) and isinstance(units, int) and units > 0 \
                    and result.median > 0:
                kernels.setdefault((kernel, dtype, units), []).append(scaled("compute", units / result.median, extra))
        elif result.group == "roofline" and name == "test_host_overhead":
            figures = extra.get("host_overhead_s")
            for phase, value in (figures.items() if isinstance(figures, dict) else ()):
                seconds = finite(value)
                if phase in HOST_PHASES and seconds is not None and seconds > 0:
                    host.setdefault(phase, []).append(scaled("host", seconds, extra))
        elif result.group == "roofline" and name == "test_model_host_cost":
            figures, model, recipe = extra.get("phase_median_s"), extra.get("model"), extra.get("recipe")
            batch, seq_len = extra.get("batch"), extra.get("seq_len")
            if isinstance(figures, dict) and isinstance(model, str) and isinstance(recipe, str) \
                    and isinstance(batch, int) and isinstance(seq_len, int) and batch > 0 and seq_len > 0:
                phases = {p: scaled("host", v, extra) for p, value in figures.items()
                          if p in HOST_PHASES and (v := finite(value)) is not None and v > 0}
                if phases:
                    model_floors[(model, recipe)] = (batch, seq_len, phases)
        elif result.group == "roofline" and name == "test_optimizer_update":
            optimizer, impl = extra.get("optimizer"), extra.get("impl")
            moved, launches = finite(extra.get("bytes")), extra.get("launches")
            if isinstance(optimizer, str) and isinstance(impl, str) and moved and moved > 0 \
                    and isinstance(launches, int) and launches >= 0 and result.median > 0:
                optimizer_runs.setdefault(f"{optimizer}.{impl}", []).append((moved, launches, result.median, extra))
        elif result.group == "roofline" and name == "test_update_bandwidth":
            work = extra.get("work")
            updated = finite(work.get("bytes")) if isinstance(work, dict) else None
            if updated and updated > 0 and result.median > 0:
                updates.append(scaled("memory", 2 * updated / result.median, extra))  # read and written back
        elif result.group == "roofline" and name == "test_copy_bandwidth":
            work = extra.get("work")
            copied = finite(work.get("bytes")) if isinstance(work, dict) else None
            moved = finite(extra.get("bytes_moved")) or (2 * copied if copied else None)  # read and written
            if moved and moved > 0:
                bandwidths.append(scaled("memory", moved / result.median, extra))
        elif result.group in ("roofline", "precision") and name in _MATMUL_TESTS:
            shape, flops, dtype = _shape(extra), finite(extra.get("flops")), extra.get("dtype")
            if shape is None or not flops or not isinstance(dtype, str):
                continue
            try:
                key = peak_dtype(dtype)
            except ValueError:
                continue
            layout = extra.get("layout", "nn")  # recorded since the shapes run in the step's layouts
            if layout not in LAYOUTS:
                continue
            samples.setdefault((key, shape, layout), []).append(scaled("compute", flops / result.median, extra))
    if not samples:
        raise ValueError(f"{run.path}: no matmul of the roofline or precision group to calibrate from")
    if not bandwidths:
        raise ValueError(f"{run.path}: no copy bandwidth of the roofline group to calibrate from")
    matmul: dict[str, list[MatmulPoint]] = {}
    for (dtype, (m, k, n), layout), rates in sorted(samples.items()):
        matmul.setdefault(dtype, []).append(MatmulPoint(m, k, n, sum(rates) / len(rates), layout))
    peaks: dict[str, float] = {}
    if gpu_name:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            dev = lookup_device(gpu_name, warn=False)
        peaks = dict(dev.peaks) if dev is not None else {}
    launch_s = LAUNCH_OVERHEAD_S[kind]
    host_s = {phase: sum(v) / len(v) for phase, v in host.items()}
    if host_s:
        launch_note = "host cost per op measured (test_host_overhead): " + ", ".join(
            f"{phase} {seconds * 1e6:.3g} us" for phase, seconds in host_s.items())
        missing = [p for p in HOST_PHASES if p not in host_s]
        if missing:
            launch_note += f"; {', '.join(missing)} {launch_s * 1e6:.3g} us documented for {kind}"
    else:
        launch_note = (f"launch overhead {launch_s * 1e6:.3g} us documented for {kind} (the run has no "
                       "test_host_overhead)")
    points = []
    for (kernel, dtype, units), rates in sorted(kernels.items()):
        try:
            points.append(KernelPoint(kernel, peak_dtype(dtype), units, sum(rates) / len(rates)))
        except ValueError:  # a kernel or dtype this version does not model
            continue
    kernel_note = f"; {len(points)} kernel rates measured (test_kernel_rate)" if points else ""
    if model_floors and kind == "cpu":
        kernel_note += f"; host cost per op of {len(model_floors)} models measured (test_model_host_cost)"
    if carried and reference is not None:
        to = "of the step" if at else "median"
        kernel_note += (f"; {len(carried)} results' ceilings carried to the machine speed {to} "
                        f"(matmul probe {reference.matmul_flops_per_s / 1e9:.4g} GFLOP/s, copy probe "
                        f"{reference.copy_bytes_per_s / 1e9:.4g} GB/s, host probe {reference.host_op_s * 1e6:.3g} us)")
    # a CPU run times its matmuls with their operands cached (the work is called again after the speed probe):
    # its last-level cache says when a step's weights and weight gradients are not cached instead (op_seconds)
    cache = _count(info.get("llc_bytes")) if kind == "cpu" else None
    if cache is not None:
        kernel_note += f"; last-level cache {cache / 2**20:.4g} MiB"
    cal = Calibration(device=gpu_name or str(info.get("cpu_model") or run.machine),
                       matmul={k: tuple(v) for k, v in matmul.items()},
                       bandwidth=sum(bandwidths) / len(bandwidths), launch_s=launch_s, kind=kind,
                       peaks=peaks, host_s=host_s, kernels=tuple(points),
                       update_bandwidth=sum(updates) / len(updates) if updates else None,
                       speed=reference if carried else None, cache_bytes=cache,
                       source=f"the {run.machine} run of commit {run.commit or 'unknown'}, {run.datetime[:10]}; "
                              f"{launch_note}{kernel_note}")
    if optimizer_runs:
        optimizer_bw: dict[str, float] = {}
        for key, runs in optimizer_runs.items():
            values = [bw for moved, launches, median, extra in runs
                      if (bw := _optimizer_bandwidth(cal, reference, moved, launches, median, extra)) is not None]
            if values:
                optimizer_bw[key] = sum(values) / len(values)
        notes = "".join(f"; {key} updates measured at {bw / 1e9:.4g} GB/s (test_optimizer_update)"
                        for key, bw in optimizer_bw.items())
        cal = replace(cal, optimizer_bandwidth=optimizer_bw, source=cal.source + notes)
    if not model_floors or kind != "cpu":  # on CUDA recorded, not applied (the module docstring says why)
        return cal
    return replace(cal, model_host_s={key: _model_host_s(cal, key, floor) for key, floor in model_floors.items()})


def _optimizer_bandwidth(cal: Calibration, reference: MachineSpeed | None, moved: float, launches: int,
                         median: float, extra: dict[str, Any]) -> float | None:
    """Bytes over seconds of an optimizer's update, the host's cost of its launches (the calibration's per-launch
    figure of the optimizer phase, at the speed of the measurement) taken off first; carried to ``reference`` by the
    copy probe. None where the host's cost takes the whole time."""
    speed = MachineSpeed.from_record(extra.get("machine_speed"))
    per_launch = cal.per_launch("optimizer")
    if speed is not None and reference is not None:
        per_launch = reference.scale("host", per_launch, speed)
    bandwidth = achieved_bandwidth(moved, launches, median, per_launch)
    if bandwidth is None or speed is None or reference is None:
        return bandwidth
    return speed.scale("memory", bandwidth, reference)


def _model_host_s(cal: Calibration, key: tuple[str, str], floor: tuple[int, int, dict[str, float]]
                  ) -> dict[str, float]:
    """The host's seconds per op of each phase of a model's step: the phase's measured seconds at the floor size
    (batch, sequence length) less the device time the calibration predicts for that phase's ops there (their
    compute or memory time, no launches), over the phase's launches; at least 0."""
    (model, recipe), (batch, seq_len, seconds) = key, floor
    ops = transformer_step_ops(get_preset(model), batch, seq_len, precision=recipe, device=cal.kind)
    out: dict[str, float] = {}
    for phase, measured in seconds.items():
        mine = [op for op in ops if op.phase == phase]
        launches = sum(op.launches * op.count for op in mine)
        if not launches:
            continue
        device = sum(op.count * max(op_seconds(op, cal)[:2]) for op in mine)
        out[phase] = max(0.0, measured - device) / launches
    return out


def _count(value: object) -> int | None:
    """``value`` where it is a whole number > 0 as a run records one (not a bool), else None."""
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def run_cpu_threads(run: Run) -> int | None:
    """The CPU threads a run's benchmarks ran with (``machine_info.torchledger.cpu_threads``, set by
    ``--ledger-threads``); None for torch's default, as every run from before the option ran."""
    return _count((run.machine_info.get("torchledger") or {}).get("cpu_threads"))


def read_calibration(path: str | Path, at: MachineSpeed | None = None, *,
                     cpu_threads: int | str | None = "any") -> Calibration:
    """The calibration of the machine whose runs lie under ``path`` (a machine folder such as
    ``results/cuda-nvidia-h200``, or one run file): its newest run, merged with the earlier runs of the same
    commit, its ceilings carried to the machine speed ``at`` where given. With ``cpu_threads`` (a count, or None
    for torch's default) only the runs made at that many CPU threads are read (:func:`run_cpu_threads`): a ceiling
    measured on two threads does not predict a step timed on one. ValueError when ``path`` holds no such run, or
    runs of more than one machine."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        found = read_runs([path])
    if not found.by_machine:
        raise ValueError(f"calibration={str(path)!r} holds no benchmark run")
    if len(found.by_machine) > 1:
        raise ValueError(f"calibration={str(path)!r} holds runs of {len(found.by_machine)} machines "
                         f"({', '.join(sorted(found.by_machine))}): name one machine's folder")
    (history,) = found.by_machine.values()
    if cpu_threads != "any":
        if not (cpu_threads is None or (isinstance(cpu_threads, int) and cpu_threads > 0)):
            raise ValueError(f"cpu_threads must be a count >= 1, None (torch's default) or 'any', "
                             f"got {cpu_threads!r}")
        history = [run for run in history if run_cpu_threads(run) == cpu_threads]
        if not history:
            threads = "torch's default" if cpu_threads is None else cpu_threads
            raise ValueError(f"calibration={str(path)!r} holds no benchmark run made at cpu_threads={threads}")
    return calibration_from_run(newest_results(history), at)

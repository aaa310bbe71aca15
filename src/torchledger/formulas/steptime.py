"""Step time: a per-op roofline over the ops of one training step, with ceilings taken from a calibration.

Every op of the step is listed analytically from the spec (:func:`transformer_step_ops`, :func:`mlp_step_ops`):
each matmul with its shape and dtype, every memory-bound op (norms, activations, casts, residual adds, the
attention kernel's traffic, the embedding, the loss, the optimizer's update) with the bytes it reads and writes in
the recipe's dtypes. One op takes

    time = max(FLOPs / achievable FLOP/s for its dtype and shape, bytes / achievable bandwidth) + launches x overhead

(the roofline of Williams et al. 2009 per op, as PyTorch's ``RuntimeEstimator`` estimates each op; the overhead is
the host's fixed cost of one op inside a training step, per phase: the forward's module calls and autograd
recording, the backward's autograd engine, the optimizer's per-tensor Python, on top of issuing the kernel), and the
phases (forward, backward, recompute, optimizer) are the sums of their ops. Communication is an input in seconds
(from the sharding model, :mod:`.distributed`), added as exposed time: no overlap with the backward is assumed, so
it is an upper bound where the framework overlaps.

The ceilings come from a :class:`Calibration`, each measured where the run has it:

- matmul FLOP/s per dtype at measured shapes and operand layouts (:data:`LAYOUTS`: a Linear's forward, input
  gradient and weight gradient run three different BLAS kernels). A matmul takes the rate of its very shape and
  layout, else of its shape in any layout, else the rate interpolated piecewise-linearly in log(FLOPs) between the
  measured shapes of its dtype, held at the nearest one outside them (NB: a shape smaller than every measured one
  gets the smallest one's rate; the bytes term of the roofline is what slows small and skinny matmuls then). On the
  2-core EPYC, fp16 GEMMs without a fast path ran 0.4 GFLOP/s in ``nn`` and 34.5 GFLOP/s in ``nt`` at one shape;
- the memory bandwidth of a copy into another buffer, and of an update in place (``update_bandwidth``): a CPU reads
  the destination's cache lines before writing them (write-allocate), so a copy moves three bytes per two it
  counts and an in-place update two (the EPYC: 31 against 51 to 61 GB/s); the optimizer's updates and gradient
  accumulation run in place;
- the rate of the step's named kernels (:data:`KERNELS`: attention, the norms, the activations, cross-entropy,
  forward and backward, per dtype), which then take ``units / rate`` as their compute time: an attention kernel
  does not reach the GEMM rate of its FLOPs (unmeasured, it is costed as a matmul of its batched QK^T shape; the
  EPYC's fp32 flash attention ran 62 GFLOP/s where gpt-tiny's GEMMs ran about 190), and kernels that evaluate
  transcendental functions per element take longer than their bytes (GELU's backward, erf and exp: twice);
- the host's cost per op, per phase (:attr:`Calibration.host_s`), else a documented per-launch figure;
- on a CPU, the size of the last-level cache (:attr:`Calibration.cache_bytes`). A CPU run times its matmuls with
  their operands cached. When the step's parameters, gradients and optimizer state outgrow that cache, a forward
  matmul reads its weight from memory, and a weight-gradient matmul writes into lines that are not cached: the
  tensor's bytes over the bandwidth are added to the matmul's compute time (``cold_bytes``). On the EPYC the
  small profile's MLP touches 101 MB between two reads of a weight, against a 32 MiB L3. On one thread, its
  forward's three matmuls took 0.86 to 1.00 ms longer from memory than cached, against 0.92 to 0.94 ms for their
  weights over the copy bandwidth. Its three weight-gradient matmuls took 1.53 to 1.65 ms longer into cold
  memory, against 1.05 ms for the gradients' 25 MB at the copy bandwidth's 24 GB/s: a lower bound for the op alone.

A shared CPU does not run at one speed: on the 2-core EPYC a fixed matmul, a copy and a one-element op all ran at
half speed together for seconds at a time (a 256 x 512 x 512 matmul 200 then 80 GFLOP/s, a 16 MiB copy 95 then
37 GB/s, an op's host cost 1.0 then 1.9 us), whatever takes the other half of the physical cores. A ceiling
measured in a fast phase then predicts a step timed in a slow one too fast. Every CPU figure the suite times carries
the :class:`MachineSpeed` measured by a fixed probe in the same rounds, and :meth:`MachineSpeed.scale` carries a
ceiling from the speed it was measured at to the speed of the step it predicts. The slow phases are the second
thread's: a parallel op waits for its slowest thread, and one-thread work was not slowed (the same small copies 1.00
times as long in the slow rounds, 1.36 on two threads), so the suite's CPU benchmarks run on one thread by default.

Where no run exists, :func:`datasheet_calibration` takes the hardware table's peaks scaled by
:data:`DATASHEET_EFFICIENCY`.

MFU (PaLM, Chowdhery et al. 2022, App. B) counts the model's FLOPs (forward and backward, no recomputation); HFU
counts the FLOPs the hardware runs (recomputation included). Both are over the dense datasheet peak of the
recipe's compute dtype.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field, replace
from itertools import pairwise
from typing import Any

from ._validate import non_negative_int, one_of, positive_int, positive_number
from .flops import attention_backward_flops, attention_flops, matmul_flops
from .hardware import DeviceSpec, peak_dtype
from .memory import OPTIMIZER_STATES, dtype_bytes, get_recipe
from .specs import MLPSpec, ModelSpec, check_seq_len, param_counts
from .vocabulary import OPTIMIZER_IMPLS, OPTIMIZERS, STEP_CHECKPOINTING, checkpointed_blocks

__all__ = [
    "BOUNDS",
    "DATASHEET_EFFICIENCY",
    "KERNELS",
    "LAUNCH_OVERHEAD_S",
    "LAYOUTS",
    "PHASES",
    "Calibration",
    "KernelPoint",
    "MachineSpeed",
    "MatmulPoint",
    "Op",
    "PhaseTime",
    "StepTime",
    "achieved_bandwidth",
    "datasheet_calibration",
    "mlp_step_ops",
    "op_seconds",
    "optimizer_ops",
    "step_time",
    "transformer_step_ops",
]

PHASES: tuple[str, ...] = ("forward", "backward", "recompute", "optimizer", "communication")
BOUNDS: tuple[str, ...] = ("compute", "memory", "launch", "communication")
_LAUNCH_PHASES = PHASES[:-1]  # the phases made of ops (communication is given in seconds)

# PyTorch's RuntimeEstimator (torch/distributed/_tools/runtime_estimator.py) takes 0.75 of the datasheet FLOP/s as
# what a matmul achieves; the same fraction is applied here to the datasheet bandwidth where no run was measured.
# NB: the one GPU run at hand (H200) reached 0.75-0.79 of the matmul peaks and 0.86 of the bandwidth.
DATASHEET_EFFICIENCY = 0.75

# The fixed cost of one kernel launch or eager op, by device kind, where a calibration does not measure it.
# CUDA: a kernel launch costs a few microseconds (NVIDIA, "Getting Started with CUDA Graphs", 2019); on the CPU an
# eager op passes the Python binding, the dispatcher and autograd's recording, about 10 us (PyTorch's
# "Performance Tuning Guide" on framework overhead for small ops). Neither is fitted to this project's runs. A run
# with the roofline group's ``test_host_overhead`` measures it per phase instead (reporting/calibration.py reads it).
LAUNCH_OVERHEAD_S: dict[str, float] = {"cuda": 5e-6, "cpu": 10e-6}

# CUDA foreach kernels (aten/src/ATen/native/cuda/MultiTensorApply.cuh): each launch takes at most 36 tensors for a
# 4-list op (110, 64, 48, 36 for 1 to 4 lists) and 320 blocks of 65,536 elements.
_FOREACH_TENSORS = 36
_FOREACH_ELEMENTS = 320 * 65536


# The kernels whose rate a calibration may measure, each forward and backward (``<name>_backward``), and what their
# ``units`` count: elements of the kernel's input (for cross-entropy, of the logits), for attention the FLOPs that
# :func:`~torchledger.formulas.flops.attention_flops` and ``attention_backward_flops`` count.
KERNELS: tuple[str, ...] = ("attention", "layer_norm", "rms_norm", "gelu", "silu", "cross_entropy")


def _kernel_name(kernel: str) -> str:
    base = kernel.removesuffix("_backward")
    if base not in KERNELS:
        raise ValueError(f"kernel={kernel!r} is not one of {', '.join(KERNELS)} (or their _backward)")
    return kernel


def _interpolate(points: list[tuple[float, float]], x: float) -> float:
    """Piecewise-linear in ``x`` between (x, rate) points sorted by x, held at the nearest one outside them."""
    if x <= points[0][0]:
        return points[0][1]
    for (x0, r0), (x1, r1) in pairwise(points):
        if x <= x1:
            return r0 + (x - x0) / (x1 - x0) * (r1 - r0)
    return points[-1][1]


@dataclass(frozen=True)
class KernelPoint:
    """One measured kernel: ``kernel`` (a name of :data:`KERNELS`, or it with ``_backward``) in ``dtype`` over
    ``units`` (see :data:`KERNELS`) at ``per_s`` units per second."""

    kernel: str
    dtype: str
    units: int
    per_s: float

    def __post_init__(self) -> None:
        _kernel_name(self.kernel)
        positive_int("units", self.units)
        positive_number("per_s", self.per_s)


@dataclass(frozen=True)
class MachineSpeed:
    """How fast a machine ran while one figure was measured, by a fixed probe timed in the same rounds
    (:class:`torchledger.measuring.timing.SpeedProbe`): ``matmul_flops_per_s`` of a fixed fp32 matmul,
    ``copy_bytes_per_s`` of a fixed copy (read plus written), ``host_op_s`` the seconds of one fixed one-element op.

    Three probes, one per kind of ceiling a calibration holds, each scaling the ceilings of its kind: the matmul
    probe the matmul and kernel rates (both are the cores' arithmetic), the copy probe the two bandwidths, the host
    probe the host's cost per op."""

    matmul_flops_per_s: float
    copy_bytes_per_s: float
    host_op_s: float

    def __post_init__(self) -> None:
        positive_number("matmul_flops_per_s", self.matmul_flops_per_s)
        positive_number("copy_bytes_per_s", self.copy_bytes_per_s)
        positive_number("host_op_s", self.host_op_s)

    @classmethod
    def from_record(cls, raw: Any) -> MachineSpeed | None:
        """The speed a benchmark recorded (its ``extra_info["machine_speed"]``); None where it recorded none or
        an unusable one (an older run)."""
        if not isinstance(raw, dict):
            return None
        try:
            return cls(raw["matmul_flops_per_s"], raw["copy_bytes_per_s"], raw["host_op_s"])
        except (KeyError, TypeError, ValueError):
            return None

    @staticmethod
    def median(speeds: list[MachineSpeed]) -> MachineSpeed:
        """Each probe's median over ``speeds`` (a run's typical speed)."""
        if not speeds:
            raise ValueError("speeds must hold at least one MachineSpeed")

        return MachineSpeed(statistics.median(s.matmul_flops_per_s for s in speeds),
                            statistics.median(s.copy_bytes_per_s for s in speeds),
                            statistics.median(s.host_op_s for s in speeds))

    def scale(self, kind: str, value: float, to: MachineSpeed) -> float:
        """``value``, measured at this speed, at the speed ``to``: a rate of ``kind`` ``"compute"`` (FLOP/s, units/s)
        or ``"memory"`` (bytes/s) in proportion to its probe's rate; ``"host"`` seconds in proportion to the host
        probe's seconds."""
        if kind == "compute":
            return value * to.matmul_flops_per_s / self.matmul_flops_per_s
        if kind == "memory":
            return value * to.copy_bytes_per_s / self.copy_bytes_per_s
        if kind == "host":
            return value * to.host_op_s / self.host_op_s
        raise ValueError(f"kind must be one of 'compute', 'memory', 'host', got {kind!r}")


# Operand layouts of a matmul, as BLAS names them for row-major C = A B: ``nn`` both stored as used; ``nt`` B stored
# transposed (a Linear's forward, x W^T, reads the (n, k) weight); ``tn`` A stored transposed (a Linear's weight
# gradient, dY^T X). A library picks a different kernel for each, at a different rate.
LAYOUTS: tuple[str, ...] = ("nn", "nt", "tn")


@dataclass(frozen=True)
class MatmulPoint:
    """One measured matmul: (m, k) x (k, n) in ``layout`` (:data:`LAYOUTS`) at ``flops_per_s`` achieved."""

    m: int
    k: int
    n: int
    flops_per_s: float
    layout: str = "nn"

    def __post_init__(self) -> None:
        one_of("layout", self.layout, LAYOUTS)

    @property
    def flops(self) -> int:
        return matmul_flops(self.m, self.k, self.n)


@dataclass(frozen=True)
class Calibration:
    """The achievable ceilings of one machine: matmul FLOP/s by peak dtype at measured shapes, bandwidth (bytes/s,
    read plus written, of a copy into another buffer; ``update_bandwidth``: of an update in place, where measured),
    the per-launch overhead in seconds (``launch_s``; ``host_s``: measured per phase, which wins where given), the
    measured rates of named kernels (``kernels``), the machine speed its measured ceilings were carried to
    (``speed``, where they recorded one), the host's cost per op measured on a model's own code by (model, recipe)
    (``model_host_s``, which :meth:`for_model` puts in place of ``host_s``), the bandwidth an optimizer's own ops
    reached by ``"<optimizer>.<impl>"`` (``optimizer_bandwidth``: its ops are charged at it instead of the copy's or
    the update's), the last-level cache of a machine whose matmuls were timed with their operands cached
    (``cache_bytes``: a CPU run; None where the matmuls were timed from memory or the size is unknown), and where
    they came from."""

    device: str
    matmul: dict[str, tuple[MatmulPoint, ...]]
    bandwidth: float
    launch_s: float
    kind: str = "cuda"
    peaks: dict[str, float] = field(default_factory=dict)
    source: str = ""
    host_s: dict[str, float] = field(default_factory=dict)
    kernels: tuple[KernelPoint, ...] = ()
    update_bandwidth: float | None = None
    speed: MachineSpeed | None = None
    model_host_s: dict[tuple[str, str], dict[str, float]] = field(default_factory=dict)
    optimizer_bandwidth: dict[str, float] = field(default_factory=dict)
    cache_bytes: int | None = None

    def __post_init__(self) -> None:
        positive_number("bandwidth", self.bandwidth)
        if self.cache_bytes is not None:
            positive_int("cache_bytes", self.cache_bytes)
        if self.update_bandwidth is not None:
            positive_number("update_bandwidth", self.update_bandwidth)
        for name, value in self.optimizer_bandwidth.items():
            positive_number(f"optimizer_bandwidth[{name!r}]", value)
        if not (isinstance(self.launch_s, (int, float)) and self.launch_s >= 0):
            raise ValueError(f"launch_s={self.launch_s!r} must be a number >= 0")
        for name, host in (("host_s", self.host_s), *((f"model_host_s[{key!r}]", v)
                                                       for key, v in self.model_host_s.items())):
            for phase, seconds in host.items():
                one_of(name, phase, _LAUNCH_PHASES)
                if not (isinstance(seconds, (int, float)) and seconds >= 0):
                    raise ValueError(f"{name}[{phase!r}]={seconds!r} must be a number >= 0")
        one_of("kind", self.kind, ("cuda", "cpu"))
        for dtype, points in self.matmul.items():
            if not points:
                raise ValueError(f"matmul[{dtype!r}] holds no measured shape")
            for p in points:
                positive_number(f"matmul[{dtype!r}].flops_per_s", p.flops_per_s)

    def matmul_rate(self, dtype: str, m: int, k: int, n: int, layout: str = "nn") -> float:
        """Achievable FLOP/s of an (m, k) x (k, n) matmul in ``dtype`` and ``layout``: the measured rate of that
        very shape and layout, else of that shape in any layout (averaged), else interpolated in log(FLOPs) between
        the measured shapes of that dtype (shapes of equal FLOPs averaged), held at the nearest one outside them."""
        one_of("layout", layout, LAYOUTS)
        key = peak_dtype(dtype)
        points = self.matmul.get(key)
        if not points:
            raise ValueError(f"dtype={dtype!r}: the calibration of {self.device} has no matmul of that dtype "
                             f"(has: {', '.join(sorted(self.matmul)) or 'none'})")
        same = [p.flops_per_s for p in points if (p.m, p.k, p.n, p.layout) == (m, k, n, layout)] or [
            p.flops_per_s for p in points if (p.m, p.k, p.n) == (m, k, n)]
        if same:
            return sum(same) / len(same)
        by_flops: dict[int, list[float]] = {}
        for p in points:
            by_flops.setdefault(p.flops, []).append(p.flops_per_s)
        ordered = [(math.log(f), sum(r) / len(r)) for f, r in sorted(by_flops.items())]
        return _interpolate(ordered, math.log(matmul_flops(m, k, n)))

    def kernel_rate(self, kernel: str, dtype: str, units: int) -> float | None:
        """Measured units per second of ``kernel`` in ``dtype`` over ``units``: interpolated in log(units)
        between the measured sizes (held at the nearest outside them); None where the calibration did not measure
        that kernel in that dtype."""
        _kernel_name(kernel)
        key = peak_dtype(dtype)
        by_units: dict[int, list[float]] = {}
        for p in self.kernels:
            if p.kernel == kernel and peak_dtype(p.dtype) == key:
                by_units.setdefault(p.units, []).append(p.per_s)
        if not by_units:
            return None
        ordered = [(math.log(u), sum(r) / len(r)) for u, r in sorted(by_units.items())]
        return _interpolate(ordered, math.log(max(1, units)))

    def for_model(self, model: str, recipe: str) -> Calibration:
        """This calibration with the host's cost per op measured on ``model`` in ``recipe`` where it has it
        (``model_host_s``); else itself."""
        host = self.model_host_s.get((model, recipe))
        if host is None:
            return self
        return replace(self, host_s=dict(host), source=f"{self.source}; host cost per op of {model} {recipe}: "
                       + ", ".join(f"{p} {v * 1e6:.3g} us" for p, v in host.items()))

    def per_launch(self, phase: str) -> float:
        """Seconds charged per launch of an op of ``phase``: the measured host cost per op of that phase, else
        ``launch_s``. The recompute re-runs the forward's ops: the forward's figure where it has none of its own.
        NB: checkpoint's own hooks (saving, unpacking, a second graph) are not in the forward's figure."""
        one_of("phase", phase, PHASES)
        if phase in self.host_s:
            return self.host_s[phase]
        if phase == "recompute" and "forward" in self.host_s:
            return self.host_s["forward"]
        return self.launch_s

    def peak(self, dtype: str) -> float | None:
        """The datasheet peak of ``dtype`` (for MFU), None where the machine has no table entry."""
        return self.peaks.get(peak_dtype(dtype))


def datasheet_calibration(dev: DeviceSpec, *, efficiency: float = DATASHEET_EFFICIENCY) -> Calibration:
    """A calibration from the hardware table alone: every dtype's peak and the memory bandwidth times
    ``efficiency`` (a large square matmul stands for every shape), and the CUDA launch overhead."""
    if not 0 < efficiency <= 1:
        raise ValueError(f"efficiency={efficiency!r} must be in (0, 1]")
    big = 8192
    matmul: dict[str, tuple[MatmulPoint, ...]] = {
        d: (MatmulPoint(big, big, big, rate * efficiency),) for d, rate in dev.peaks.items()}
    return Calibration(dev.name, matmul, dev.memory_bandwidth * efficiency, LAUNCH_OVERHEAD_S["cuda"], "cuda",
                       dict(dev.peaks), f"{dev.source} x {efficiency} (no measured run)")


@dataclass(frozen=True)
class Op:
    """One op of a step (or ``count`` identical ones): its FLOPs, the bytes it reads and writes, its matmul shape
    (m, k, n) where it is a matmul, the dtype it computes in, the kernels it launches, and where it is one of the
    named :data:`KERNELS`, that name and its ``units``. ``cold_bytes``: the bytes of a tensor the op reads or
    writes that the step last touched one step before: the weight a forward matmul reads as stored (outside
    autocast; the previous step's update touched it last), and the gradient a weight-gradient matmul writes (into
    the blocks the previous step's gradient held, freed by ``zero_grad``); ``reuse_bytes``: what the step touches
    in between (the parameters, their gradients and the optimizer's state). NB: the reuse distance is that of a
    step's first micro-batch; between two micro-batches of one step the optimizer's state is not touched."""

    name: str
    phase: str
    flops: int = 0
    bytes: int = 0
    shape: tuple[int, int, int] | None = None
    dtype: str = "fp32"
    launches: int = 1
    count: int = 1
    kernel: str | None = None
    units: int = 0
    layout: str = "nn"
    in_place: bool = False
    cold_bytes: int = 0
    reuse_bytes: int = 0


def op_seconds(op: Op, cal: Calibration) -> tuple[float, float, float]:
    """(compute, memory, launch) seconds of one instance of ``op``: its time is max(compute, memory) + launch.

    The compute time of a named kernel the calibration measured is its units over the measured rate (for
    attention this replaces the GEMM rate of its FLOPs); else a matmul's FLOPs over the matmul rate of its shape,
    else none. A matmul whose ``cold_bytes`` the step last touched more than the machine's last-level cache ago
    (``reuse_bytes`` over :attr:`Calibration.cache_bytes`) moves them from memory: a weight is read from it, and
    a write into lines not in the cache first reads them (write-allocate). Their bytes over the bandwidth are added
    to its compute time, which the calibration timed with the operands cached. NB: a measured kernel's time includes
    its own launch, which is charged again as a launch. The bytes
    go at the bandwidth the calibration measured for the op's optimizer (an ``optimizer`` op named
    ``<optimizer>.<impl>[i]``, :attr:`Calibration.optimizer_bandwidth`), else of an update in place for an op that
    updates its operand, else of a copy."""
    compute = 0.0
    rate = cal.kernel_rate(op.kernel, op.dtype, op.units) if op.kernel and op.units else None
    if rate is not None:
        compute = op.units / rate
    elif op.flops:
        m, k, n = op.shape if op.shape is not None else (1, 1, max(1, op.flops // 2))
        compute = op.flops / cal.matmul_rate(op.dtype, m, k, n, op.layout)
    if op.cold_bytes and cal.cache_bytes is not None and op.reuse_bytes > cal.cache_bytes:
        compute += op.cold_bytes / cal.bandwidth
    bandwidth = cal.optimizer_bandwidth.get(op.name.split("[", 1)[0]) if op.phase == "optimizer" else None
    if bandwidth is None:
        bandwidth = cal.update_bandwidth if op.in_place and cal.update_bandwidth else cal.bandwidth
    return compute, op.bytes / bandwidth, op.launches * cal.per_launch(op.phase)


def achieved_bandwidth(moved: float, launches: int, seconds: float, per_launch: float) -> float | None:
    """Bytes per second an op sequence reached (an optimizer's update, as ``optimizer_bandwidth`` holds it):
    ``moved`` bytes over ``seconds`` less its ``launches`` at ``per_launch`` seconds of host cost each; None where the
    launches take the whole time."""
    device = seconds - launches * per_launch
    return moved / device if device > 0 else None


@dataclass(frozen=True)
class PhaseTime:
    """Seconds of one phase, split by what bounds each op, and the bound that takes most of the phase."""

    seconds: float
    compute_s: float
    memory_s: float
    launch_s: float
    bound: str

    def to_dict(self) -> dict[str, Any]:
        return {"seconds": self.seconds, "bound": self.bound, "compute_s": self.compute_s,
                "memory_s": self.memory_s, "launch_s": self.launch_s}


@dataclass(frozen=True)
class StepTime:
    """The predicted time of one optimizer step, by phase, with throughput and utilization (per rank: ``tokens``,
    ``model_flops`` and ``hardware_flops`` are one rank's)."""

    phases: dict[str, PhaseTime]
    tokens: int
    model_flops: int
    hardware_flops: int
    peak_flops: float | None
    calibration: str
    ranks: int = 1  # data-parallel ranks, each running ``tokens`` per step

    @property
    def step_s(self) -> float:
        return sum(p.seconds for p in self.phases.values())

    @property
    def tokens_per_s(self) -> float:
        """Tokens per second over all ranks."""
        return self.tokens * self.ranks / self.step_s

    @property
    def mfu(self) -> float | None:
        """Model FLOPs (no recomputation) per second over the datasheet peak (PaLM's MFU)."""
        return None if not self.peak_flops else self.model_flops / self.step_s / self.peak_flops

    @property
    def hfu(self) -> float | None:
        """Hardware FLOPs (recomputation included) per second over the datasheet peak."""
        return None if not self.peak_flops else self.hardware_flops / self.step_s / self.peak_flops

    def to_dict(self) -> dict[str, Any]:
        return {"step_s": self.step_s, "tokens_per_s": self.tokens_per_s, "mfu": self.mfu, "hfu": self.hfu,
                "model_flops": self.model_flops, "hardware_flops": self.hardware_flops,
                "phases": {k: v.to_dict() for k, v in self.phases.items()}, "calibration": self.calibration}


def step_time(ops: list[Op], cal: Calibration, *, tokens: int, model_flops: int, hardware_flops: int | None = None,
              compute_dtype: str = "fp32", communication_s: float = 0.0) -> StepTime:
    """Sum the roofline times of ``ops`` by phase; ``communication_s`` is the exposed communication of the step.

    ``model_flops``: the step's FLOPs without recomputation (for MFU); ``hardware_flops``: with it (for HFU;
    default: the FLOPs of ``ops``). ``compute_dtype`` picks the peak that MFU and HFU are taken over."""
    positive_int("tokens", tokens)
    non_negative_int("model_flops", model_flops)
    if not (isinstance(communication_s, (int, float)) and communication_s >= 0):
        raise ValueError(f"communication_s={communication_s!r} must be a number >= 0")
    parts: dict[str, list[float]] = {p: [0.0, 0.0, 0.0] for p in PHASES}
    hw = 0
    for op in ops:
        if op.phase not in parts:
            raise ValueError(f"op {op.name!r}: phase={op.phase!r} is not one of {', '.join(PHASES)}")
        c, m, launch = op_seconds(op, cal)
        part = parts[op.phase]
        part[0 if c >= m else 1] += max(c, m) * op.count
        part[2] += launch * op.count
        hw += op.flops * op.count
    phases: dict[str, PhaseTime] = {}
    for name, (c, m, launch) in parts.items():
        if name == "communication":
            phases[name] = PhaseTime(float(communication_s), 0.0, 0.0, 0.0, "communication")
            continue
        seconds = c + m + launch
        bound = max((("compute", c), ("memory", m), ("launch", launch)), key=lambda kv: kv[1])[0]
        phases[name] = PhaseTime(seconds, c, m, launch, bound)
    return StepTime(phases, tokens, model_flops, hw if hardware_flops is None else hardware_flops,
                    cal.peak(compute_dtype), cal.device)


# --------------------------------------------------------------------------------------------------- op lists


@dataclass
class _Builder:
    """Collects ops; dtype sizes of the recipe; phase set per call."""

    compute: str  # peak dtype of the matmuls
    c: int  # bytes of a compute-dtype element
    a: int  # bytes of a residual-stream element (fp32 under autocast)
    p: int  # parameter bytes
    g: int  # gradient bytes
    autocast: bool
    ops: list[Op] = field(default_factory=list)

    @property
    def act(self) -> str:
        """The dtype of the residual stream, the norms and the loss: fp32 under autocast (its fp32 op list holds
        layer_norm and log_softmax), else the recipe's."""
        return "fp32" if self.autocast else self.compute

    def mem(self, name: str, phase: str, nbytes: int, count: int = 1, launches: int = 1, *,
            kernel: str | None = None, units: int = 0, dtype: str | None = None, in_place: bool = False) -> None:
        if count and nbytes >= 0:
            self.ops.append(Op(name, phase, bytes=nbytes, launches=launches, count=count, kernel=kernel,
                               units=units, dtype=dtype or self.act, in_place=in_place))

    def mm(self, name: str, phase: str, m: int, k: int, n: int, count: int = 1, *, groups: int = 1,
           split: int = 0, layout: str = "nn", cold: int = 0) -> None:
        """An (m, k) x (k, n) matmul in the compute dtype, reading A and B and writing C once; ``groups`` such
        matmuls side by side (a Mixture of Experts' experts) share the rows of dimension ``split`` (0: m, 1: k),
        and each runs at the rate of its own shape."""
        shape = [m, k, n]
        shape[split] = max(1, shape[split] // groups)
        # each group has its own second operand (split 0: a (k, n) weight) or its own output (split 1: an (m, n)
        # weight gradient): groups - 1 more of them are read or written
        self.ops.append(Op(name, phase, flops=matmul_flops(m, k, n),
                           bytes=(m * k + k * n + m * n + (groups - 1) * (n * (k if split == 0 else m))) * self.c,
                           shape=(shape[0], shape[1], shape[2]), dtype=self.compute, count=count, layout=layout,
                           cold_bytes=cold))

    def linear(self, name: str, tokens: int, d_in: int, d_out: int, bias: bool, fwd_phases: list[tuple[str, int]],
               bwd_count: int, *, input_grad: bool = True, input_cast: bool = True, experts: int = 1) -> None:
        """A Linear layer: forward (per entry of ``fwd_phases``, (phase, count)), and its backward ``bwd_count``
        times. Under autocast the weight (and the input, when it arrives in fp32) is cast to the compute dtype.
        ``experts``: that many such layers share the ``tokens`` rows (a Mixture of Experts)."""
        w = (d_in * d_out + (d_out if bias else 0)) * experts
        for phase, count in fwd_phases:
            if self.autocast:
                self.mem(f"{name}.cast_weight", phase, w * (self.p + self.c), count)
                if input_cast:
                    self.mem(f"{name}.cast_input", phase, tokens * d_in * (self.a + self.c), count)
            # x W^T; outside autocast the forward reads the weight as stored (under it, the cast reads it)
            stored = d_in * d_out * experts * self.p if phase == "forward" and not self.autocast else 0
            self.mm(name, phase, tokens, d_in, d_out, count, groups=experts, layout="nt", cold=stored)
        if not bwd_count:
            return
        if input_grad:
            self.mm(f"{name}.dgrad", "backward", tokens, d_out, d_in, bwd_count, groups=experts)  # dY W
            if self.autocast and input_cast:
                self.mem(f"{name}.cast_input.backward", "backward", tokens * d_in * (self.c + self.a), bwd_count)
        # dY^T X, written into memory the previous step's gradient held (zero_grad freed it and the allocator hands
        # the same blocks back): a write into lines not in the cache first reads them (write-allocate)
        self.mm(f"{name}.wgrad", "backward", d_out, tokens, d_in, bwd_count, groups=experts, split=1,
                layout="tn", cold=d_in * d_out * experts * self.c)
        if bias:
            self.mem(f"{name}.bias_grad", "backward", tokens * d_out * self.c, bwd_count)
        if self.autocast:  # the grad of the cast: back to the parameter's dtype
            self.mem(f"{name}.cast_weight.backward", "backward", w * (self.c + self.g), bwd_count)


def optimizer_ops(n_params: int, n_tensors: int, *, optimizer: str = "adamw", optimizer_impl: str = "foreach",
                  param_bytes: int = 4, grad_bytes: int = 4, state_bytes: int = 4, master_bytes: int = 0,
                  device: str = "cuda") -> list[Op]:
    """The optimizer's update as memory-bound ops, by the kernels PyTorch's implementations run
    (torch/optim/adam.py ``_multi_tensor_adam``, sgd.py): bytes read and written per element and launches.

    AdamW, foreach: mul_(p) [2p], lerp_(m, g) [2s + g], mul_(v) [2s], addcmul_(v, g, g) [2s + g], sqrt(v) [2s],
    div_ [2s], add_(eps) [2s], addcdiv_(p, m, denom) [2p + 2s]: 4p + 14s + 2g bytes per parameter (80 in fp32);
    Adam skips the first. Fused: one kernel reading p, g, m, v and writing p, m, v. SGD: add_(p, g); with momentum
    mul_(buf), add_(buf, g), add_(p, buf). Master weights (``master_bytes``): the update runs on the fp32 copy,
    which is then copied to the parameters. NB: launches follow CUDA's foreach chunking
    (MultiTensorApply.cuh); on the CPU, and for ``for-loop``, every op runs once per tensor.
    """
    one_of("optimizer", optimizer, OPTIMIZERS)
    one_of("optimizer_impl", optimizer_impl, OPTIMIZER_IMPLS)
    positive_int("n_params", n_params)
    positive_int("n_tensors", n_tensors)
    p, g, s = (master_bytes or param_bytes), grad_bytes, state_bytes
    if optimizer in ("adam", "adamw"):
        kernels = [2 * s + g, 2 * s, 2 * s + g, 2 * s, 2 * s, 2 * s, 2 * p + 2 * s]
        if optimizer == "adamw":
            kernels.insert(0, 2 * p)
        fused = 2 * p + g + 4 * s
    elif optimizer == "momentum":
        kernels = [2 * s, 2 * s + g, 2 * p + s]
        fused = 2 * p + g + 2 * s
    else:
        kernels = [2 * p + g]
        fused = 2 * p + g
    if optimizer_impl == "fused":
        kernels = [fused]
    if device == "cuda" and optimizer_impl != "for-loop":
        launches = max(-(-n_tensors // _FOREACH_TENSORS), -(-n_params // _FOREACH_ELEMENTS))
    else:
        launches = n_tensors
    # Every kernel updates its first operand in place except Adam's sqrt(v), which writes a new tensor (the denominator
    # that div_, add_ and addcdiv_ then use): on a CPU a write into another buffer first reads its cache lines
    # (write-allocate), an update in place does not (Calibration.update_bandwidth).
    out_of_place = {len(kernels) - 4} if optimizer in ("adam", "adamw") and optimizer_impl != "fused" else set()
    ops = [Op(f"{optimizer}.{optimizer_impl}[{i}]", "optimizer", bytes=b * n_params, launches=launches,
              in_place=i not in out_of_place) for i, b in enumerate(kernels)]
    if master_bytes:
        ops.append(Op("master_to_params", "optimizer", bytes=(master_bytes + param_bytes) * n_params,
                      launches=launches))
    return ops


def _recipe_builder(precision: str) -> tuple[_Builder, Any]:
    r = get_recipe(precision)
    compute = "fp32" if r.compute_dtype == "float32" else peak_dtype(r.compute_dtype)
    c = dtype_bytes(r.compute_dtype)
    return _Builder(compute, c, dtype_bytes(r.param_dtype), dtype_bytes(r.param_dtype), dtype_bytes(r.grad_dtype),
                    r.autocast), r


def _tail_ops(b: _Builder, r: Any, n_params: int, n_tensors: int, *, optimizer: str, optimizer_impl: str,
              device: str, grad_accum: int, shards: int = 1) -> None:
    """Gradient accumulation's adds, GradScaler's unscale (``16-mixed``) and the optimizer, the last two over one
    rank's ``1 / shards`` of the parameters (ZeRO and FSDP shard gradients and optimizer state)."""
    if grad_accum > 1:  # later micro-batches add into .grad: read both, write one, in place
        b.mem("grad_accumulate", "backward", 3 * n_params * b.g, grad_accum - 1, in_place=True)
    full_params = n_params
    n_params = -(-n_params // positive_int("shards", shards))
    if r.name == "16-mixed":  # GradScaler.unscale_: _amp_foreach_non_finite_check_and_unscale_ reads, writes grads
        launches = -(-n_tensors // _FOREACH_TENSORS) if device == "cuda" else n_tensors
        b.mem("grad_scaler.unscale", "optimizer", 2 * n_params * b.g, launches=launches, in_place=True)
    master = dtype_bytes(r.master_dtype) if r.master_dtype else 0
    state = dtype_bytes(r.optimizer_dtype)
    b.ops.extend(optimizer_ops(n_params, n_tensors, optimizer=optimizer, optimizer_impl=optimizer_impl,
                               param_bytes=b.p, grad_bytes=b.g, state_bytes=state,
                               master_bytes=master, device=device))
    # Between a forward's read of a weight and the next one, the step touches every parameter, its gradient and
    # (on this rank) its optimizer state and master copy: the reuse distance of the forward's weight reads.
    reuse = full_params * (b.p + b.g) + n_params * (OPTIMIZER_STATES[optimizer] * state + master)
    b.ops[:] = [replace(op, reuse_bytes=reuse) if op.cold_bytes else op for op in b.ops]


def transformer_step_ops(
    spec: ModelSpec,
    batch: int,
    seq_len: int,
    *,
    precision: str = "32-true",
    optimizer: str = "adamw",
    optimizer_impl: str = "foreach",
    checkpointing: str = "none",
    grad_accum: int = 1,
    device: str = "cuda",
    fused_attention: bool = True,
    shards: int = 1,
) -> list[Op]:
    """Every op of one optimizer step of the reference transformer of ``spec`` (``grad_accum`` micro-batches of
    ``batch`` x ``seq_len`` tokens), read from the spec's fields: projections of width q_dim + 2 kv_dim, MLP of
    ``mlp_matrices`` matrices (a gated MLP multiplies two of them elementwise), norms with ``norm_params`` per
    layer, biases where ``bias``, a position table where the spec has one, the LM head (tied or not).

    Memory-bound ops, bytes read + written: norm 2 tensors forward, 5 backward (dx, and the weight grads read x
    and dy again); activation 2 forward, 3 backward; residual add 3 forward, and one gradient add (3) where the
    stream branches; the attention kernel reads q, k, v and writes its output (backward: reads q, k, v, out, dout,
    writes dq, dk, dv), plus the transpose back to (B, T, H D) and, backward, the concatenation of dq, dk, dv;
    cross-entropy: log_softmax over the logits (autocast casts them to fp32 first) and its backward, with the
    one-hot gradient written densely. ``fused_attention``: the kernel recomputes QK^T in its backward (flash,
    memory-efficient, PyTorch's CPU flash) instead of the math path's saved scores. ``shards``: the ranks that
    split the gradients' unscaling and the optimizer's update (ZeRO, FSDP; 1 for DDP).
    NB: checkpointed blocks are recomputed whole (early stop skips the last matmul: counted, as
    :func:`~torchledger.formulas.flops.model_flops` does, by leaving out the MLP's down projection).
    """
    positive_int("batch", batch)
    check_seq_len(spec, seq_len)
    positive_int("grad_accum", grad_accum)
    one_of("checkpointing", checkpointing, STEP_CHECKPOINTING)
    one_of("device", device, ("cuda", "cpu"))
    b, r = _recipe_builder(precision)
    n, d, f, L = batch * seq_len, spec.d_model, spec.d_ff, spec.n_layers
    q, kv, hd = spec.q_dim, spec.kv_dim, spec.head_dim
    ga = grad_accum
    ckpt = len(checkpointed_blocks(checkpointing, L))
    counts = param_counts(spec)
    norm_tensors = max(1, spec.norm_params // d)
    bias = bool(spec.bias)
    a, c = b.a, b.c
    gated = spec.mlp_matrices == 3
    # Block forward phases: every block in the forward; the checkpointed ones again in the recompute.
    block_fwd = [("forward", L * ga)] + ([("recompute", ckpt * ga)] if ckpt else [])
    no_last = [("forward", L * ga)] + ([("recompute", 0)] if ckpt else [])  # early stop: down proj not re-run
    bwd = L * ga

    def mem_fwd(name: str, nbytes: int, **kernel: Any) -> None:
        for phase, count in block_fwd:
            b.mem(name, phase, nbytes, count, **kernel)

    norm = "layer_norm" if spec.description.norm == "layernorm" else "rms_norm"

    # embeddings (lookups: read the rows, write the activations) and their backward (zeroed table, scatter-add)
    b.mem("embedding", "forward", 2 * n * d * a, ga)
    b.mem("embedding.backward", "backward", spec.vocab_size * d * b.g + 2 * n * d * b.g, ga)
    if counts.position_embedding:
        b.mem("position_embedding+add", "forward", 4 * n * d * a, ga)
        b.mem("position_embedding.backward", "backward", counts.position_embedding * b.g + 2 * n * d * b.g, ga)
    # blocks
    mem_fwd("norm_1", 2 * n * d * a, kernel=norm, units=n * d)
    b.mem("norm_1.backward", "backward", 5 * n * d * a, bwd, kernel=f"{norm}_backward", units=n * d)
    b.linear("attn.qkv", n, d, q + 2 * kv, bias, block_fwd, bwd)
    heads = batch * spec.n_heads
    window = getattr(spec, "sliding_window", None)
    windowed: dict[str, Any] = {} if window is None else {"window": window}
    att_fwd = attention_flops(batch, spec.n_heads, seq_len, seq_len, hd, **windowed)
    att_bwd = attention_backward_flops(batch, spec.n_heads, seq_len, seq_len, hd, recompute_scores=fused_attention,
                                       **windowed)
    for phase, count in block_fwd:
        if count:
            b.ops.append(Op("attention", phase, flops=att_fwd, bytes=n * (2 * q + 2 * kv) * c,
                            shape=(heads * seq_len, hd, seq_len), dtype=b.compute, count=count,
                            kernel="attention", units=att_fwd))
    b.ops.append(Op("attention.backward", "backward", flops=att_bwd, bytes=n * (4 * q + 4 * kv) * c,
                    shape=(heads * seq_len, hd, seq_len), dtype=b.compute, count=bwd,
                    kernel="attention_backward", units=att_bwd))
    mem_fwd("attention.transpose", 2 * n * q * c)
    b.mem("attention.transpose.backward", "backward", 2 * n * q * c, bwd)
    b.mem("qkv_grad.cat", "backward", 2 * n * (q + 2 * kv) * c, bwd)
    b.linear("attn.out", n, q, d, bias, block_fwd, bwd, input_cast=False)
    mem_fwd("residual_add_1", n * d * (2 * a + c))
    b.mem("residual_grad_add_1", "backward", 3 * n * d * a, bwd)
    mem_fwd("norm_2", 2 * n * d * a, kernel=norm, units=n * d)
    b.mem("norm_2.backward", "backward", 5 * n * d * a, bwd, kernel=f"{norm}_backward", units=n * d)
    # A Mixture of Experts: the router's logits, and n x k token-rows through the experts' matrices, gathered
    # before them and scattered (weighted) back after. NB: the router's softmax and top-k are left out.
    experts, active = getattr(spec, "experts", 1), getattr(spec, "active_experts", 1)
    rows = n * active
    if experts > 1:
        b.linear("moe.router", n, d, experts, False, block_fwd, bwd)
        mem_fwd("moe.dispatch", 2 * rows * d * c)
        b.mem("moe.dispatch.backward", "backward", 2 * rows * d * c, bwd)
        mem_fwd("moe.combine", 3 * rows * d * c)
        b.mem("moe.combine.backward", "backward", 4 * rows * d * c, bwd)
    for name in (("mlp.gate", "mlp.up") if gated else ("mlp.fc",)):
        b.linear(name, rows, d, f, bias, block_fwd, bwd, input_cast=experts == 1, experts=experts)
    act = "silu" if gated else "gelu"  # the activation runs on the matmul's output, in the compute dtype
    mem_fwd("mlp.act", 2 * rows * f * c, kernel=act, units=rows * f, dtype=b.compute)
    b.mem("mlp.act.backward", "backward", 3 * rows * f * c, bwd, kernel=f"{act}_backward", units=rows * f,
          dtype=b.compute)
    if gated:
        mem_fwd("mlp.gate*up", 3 * rows * f * c)
        b.mem("mlp.gate*up.backward", "backward", 4 * rows * f * c, bwd)
    # early stop: a dense block's down projection is not re-run (nothing saves its output); an MoE combine saves it
    b.linear("mlp.down", rows, f, d, bias, no_last if experts == 1 else block_fwd, bwd, input_cast=False,
             experts=experts)
    mem_fwd("residual_add_2", n * d * (2 * a + c))
    b.mem("residual_grad_add_2", "backward", 3 * n * d * a, bwd)
    # final norm, head, loss
    b.mem("final_norm", "forward", 2 * n * d * a, ga, kernel=norm, units=n * d)
    b.mem("final_norm.backward", "backward", 5 * n * d * a, ga, kernel=f"{norm}_backward", units=n * d)
    b.linear("lm_head", n, d, spec.vocab_size, False, [("forward", ga)], ga)
    if spec.tied_embeddings:  # the head's weight grad and the embedding's meet in one .grad
        b.mem("tied_grad_add", "backward", 3 * spec.vocab_size * d * b.g, ga)
    nv = n * spec.vocab_size
    if b.autocast:  # autocast runs cross_entropy in fp32: cast the logits, and the gradient back
        b.mem("logits.cast", "forward", nv * (c + 4), ga)
        b.mem("logits.cast.backward", "backward", nv * (4 + c), ga)
    b.mem("log_softmax", "forward", 2 * nv * 4 if b.autocast else 2 * nv * a, ga, kernel="cross_entropy", units=nv)
    b.mem("nll+log_softmax.backward", "backward", 4 * nv * (4 if b.autocast else a), ga, launches=3,
          kernel="cross_entropy_backward", units=nv)
    mlp_tensors = spec.mlp_matrices * experts + int(experts > 1)
    n_tensors = 1 + int(bool(counts.position_embedding)) + norm_tensors * (2 * L + 1) + L * (
        2 + mlp_tensors + (2 + mlp_tensors) * int(bias)) + int(not spec.tied_embeddings)
    _tail_ops(b, r, counts.total, n_tensors, optimizer=optimizer, optimizer_impl=optimizer_impl, device=device,
              grad_accum=ga, shards=shards)
    return [op for op in b.ops if op.count]


def mlp_step_ops(spec: MLPSpec, batch: int, *, precision: str = "32-true", optimizer: str = "adamw",
                 optimizer_impl: str = "foreach", grad_accum: int = 1, device: str = "cuda") -> list[Op]:
    """Every op of one optimizer step of the reference MLP (Linear layers with ReLU between them, cross-entropy
    over the last layer's outputs): the first layer skips its data-grad (the input needs none)."""
    positive_int("batch", batch)
    positive_int("grad_accum", grad_accum)
    one_of("device", device, ("cuda", "cpu"))
    b, r = _recipe_builder(precision)
    ga = grad_accum
    layers = list(pairwise(spec.dims))
    for i, (d_in, d_out) in enumerate(layers):
        b.linear(f"linear{i}", batch, d_in, d_out, True, [("forward", ga)], ga, input_grad=i > 0,
                 input_cast=i == 0)
        if i < len(layers) - 1:
            b.mem(f"relu{i}", "forward", 2 * batch * d_out * b.c, ga)
            b.mem(f"relu{i}.backward", "backward", 3 * batch * d_out * b.c, ga)
    out = batch * spec.dims[-1]
    if b.autocast:
        b.mem("logits.cast", "forward", out * (b.c + 4), ga)
        b.mem("logits.cast.backward", "backward", out * (4 + b.c), ga)
    e = 4 if b.autocast else b.a  # autocast runs cross-entropy in fp32; else the logits' own dtype
    b.mem("log_softmax", "forward", 2 * out * e, ga, kernel="cross_entropy", units=out)
    b.mem("nll+log_softmax.backward", "backward", 4 * out * e, ga, launches=3, kernel="cross_entropy_backward",
          units=out)
    _tail_ops(b, r, spec.n_params, 2 * len(layers), optimizer=optimizer, optimizer_impl=optimizer_impl,
              device=device, grad_accum=ga)
    return [op for op in b.ops if op.count]

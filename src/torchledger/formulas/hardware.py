"""Hardware peaks as data: dense FLOP/s per dtype, memory and host-link bandwidth; lookup by device name; roofline.

All peaks are dense (no 2:4 sparsity) tensor-core figures where the chip has tensor cores for that dtype; ``fp32``
is the non-tensor (SIMT) rate that PyTorch's default "highest" fp32 matmul precision runs at, and ``tf32`` the
tensor-core rate it reaches with ``torch.backends.cuda.matmul.allow_tf32``. ``fp64`` is the fp64 tensor-core rate
where one exists (cuBLAS DGEMM uses it). Integer rates (int8) are ops/s. Bandwidths in bytes/s, host link per
direction. A missing dtype means the chip has no fast path for it (None).
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass, field

from ._validate import non_negative_int, positive_number
from .memory import canonical_dtype

T = 1e12
G = 1e9

PEAK_DTYPES: tuple[str, ...] = ("fp64", "fp32", "tf32", "bf16", "fp16", "fp8", "int8")
_PEAK_ALIASES: dict[str, str] = {
    "float64": "fp64", "float32": "fp32", "tfloat32": "tf32", "bfloat16": "bf16", "float16": "fp16",
    "float8_e4m3fn": "fp8", "float8_e5m2": "fp8", "int8": "int8",
}

PCIE_GEN3_X16 = 16 * G  # 32 GB/s bidirectional as the datasheets state it
PCIE_GEN4_X16 = 32 * G  # 64 GB/s bidirectional
PCIE_GEN5_X16 = 64 * G  # 128 GB/s bidirectional

# Device memory a CUDA process holds outside the caching allocator once it has trained: the CUDA context, the kernel
# images it loaded and the library handles. ``torchledger measure`` read 804,061,184 B ("outside_allocator": the
# driver's used memory less the allocator's reserved bytes) on one H200 with torch 2.11 and CUDA's lazy loading.
# It varies with the driver, the CUDA version and the kernels a step loads; it is the one measurement at hand, and
# sizing for a device (``estimate --gpu``) reserves it on every device of the table.
CUDA_CONTEXT_BYTES = 804_061_184


@dataclass(frozen=True)
class DeviceSpec:
    """One accelerator's datasheet figures."""

    name: str
    peaks: dict[str, float]
    memory_bandwidth: float
    host_link_bandwidth: float
    memory_bytes: int
    source: str
    patterns: tuple[str, ...] = field(default=(), repr=False)
    compute_capability: tuple[int, int] | None = None
    measured_memory_bytes: int | None = None  # what the driver reports as total, where a run has read it
    measured_source: str = ""

    @property
    def capacity_bytes(self) -> int:
        """The device memory the driver offers: the measured total where known, else the datasheet's figure."""
        return self.memory_bytes if self.measured_memory_bytes is None else self.measured_memory_bytes

    @property
    def capacity_source(self) -> str:
        return self.measured_source if self.measured_memory_bytes is not None else self.source

    def peak(self, dtype: str) -> float | None:
        """Dense peak FLOP/s (ops/s for int8) for ``dtype``, or None where the chip has no such path."""
        return self.peaks.get(peak_dtype(dtype))


def peak_dtype(dtype: str) -> str:
    """Normalize a dtype name (``bfloat16``, ``torch.float16``, ``tf32``...) to a key of the peak table."""
    if isinstance(dtype, str) and dtype.lower() in PEAK_DTYPES:
        return dtype.lower()
    name = canonical_dtype(dtype)
    if name not in _PEAK_ALIASES:
        raise ValueError(f"dtype={dtype!r} has no entry in the peak table; known: {', '.join(PEAK_DTYPES)}")
    return _PEAK_ALIASES[name]


_HOPPER_SXM = {"fp64": 67 * T, "fp32": 67 * T, "tf32": 494.7 * T, "bf16": 989.4 * T, "fp16": 989.4 * T,
               "fp8": 1978.9 * T, "int8": 1978.9 * T}
_AMPERE_A100 = {"fp64": 19.5 * T, "fp32": 19.5 * T, "tf32": 156 * T, "bf16": 312 * T, "fp16": 312 * T, "int8": 624 * T}

# Order matters: the first entry whose pattern matches the lowercased device name wins.
DEVICES: tuple[DeviceSpec, ...] = (
    # NVIDIA H100 Tensor Core GPU datasheet (SXM column; sparsity figures halved).
    DeviceSpec("H100 SXM", _HOPPER_SXM, 3.35e12, PCIE_GEN5_X16, 80 * 2**30, "NVIDIA H100 datasheet, SXM",
               (r"h100.*(sxm|hbm3)", r"h100$", r"^nvidia h100$"), compute_capability=(9, 0)),
    # Same datasheet, PCIe column.
    DeviceSpec("H100 PCIe", {"fp64": 51.2 * T, "fp32": 51.2 * T, "tf32": 378 * T, "bf16": 756 * T, "fp16": 756 * T,
                             "fp8": 1513 * T, "int8": 1513 * T},
               2.0e12, PCIE_GEN5_X16, 80 * 2**30, "NVIDIA H100 datasheet, PCIe", (r"h100.*pcie",),
               compute_capability=(9, 0)),
    # NVIDIA H200 datasheet (SXM): Hopper compute as H100 SXM, 141 GB HBM3e at 4.8 TB/s.
    DeviceSpec("H200 SXM", _HOPPER_SXM, 4.8e12, PCIE_GEN5_X16, 141 * 10**9, "NVIDIA H200 datasheet, SXM",
               (r"h200(?!.*nvl)",), compute_capability=(9, 0), measured_memory_bytes=150_754_820_096,
               measured_source="NVML total on one H200, torch 2.11"),
    # NVIDIA A100 datasheet: 40 GB HBM2 1,555 GB/s; 80 GB HBM2e 2,039 GB/s (SXM), 1,935 GB/s (PCIe).
    DeviceSpec("A100 SXM 80GB", _AMPERE_A100, 2.039e12, PCIE_GEN4_X16, 80 * 2**30, "NVIDIA A100 datasheet",
               (r"a100.*sxm.*80", r"a100.*80gb.*hbm"), compute_capability=(8, 0)),
    DeviceSpec("A100 PCIe 80GB", _AMPERE_A100, 1.935e12, PCIE_GEN4_X16, 80 * 2**30, "NVIDIA A100 datasheet",
               (r"a100.*80.*pcie", r"a100.*pcie.*80"), compute_capability=(8, 0)),
    DeviceSpec("A100 40GB", _AMPERE_A100, 1.555e12, PCIE_GEN4_X16, 40 * 2**30, "NVIDIA A100 datasheet",
               (r"a100",), compute_capability=(8, 0)),
    # NVIDIA L40S datasheet: dense = half the sparsity figures.
    DeviceSpec("L40S", {"fp32": 91.6 * T, "tf32": 183 * T, "bf16": 362.05 * T, "fp16": 362.05 * T,
                        "fp8": 733 * T, "int8": 733 * T},
               864 * G, PCIE_GEN4_X16, 48 * 2**30, "NVIDIA L40S datasheet", (r"l40s",), compute_capability=(8, 9)),
    # NVIDIA L4 datasheet: dense = half the sparsity figures.
    DeviceSpec("L4", {"fp32": 30.3 * T, "tf32": 60 * T, "bf16": 121 * T, "fp16": 121 * T, "fp8": 242.5 * T,
                      "int8": 242.5 * T},
               300 * G, PCIE_GEN4_X16, 24 * 2**30, "NVIDIA L4 datasheet", (r"\bl4\b",), compute_capability=(8, 9)),
    # NVIDIA A10 datasheet (A10G is AWS's A10 variant; Lightning's table uses the same rates).
    DeviceSpec("A10G", {"fp32": 31.2 * T, "tf32": 62.5 * T, "bf16": 125 * T, "fp16": 125 * T, "int8": 250 * T},
               600 * G, PCIE_GEN4_X16, 24 * 2**30, "NVIDIA A10 datasheet; AWS G5 (A10G)", (r"a10g?\b",),
               compute_capability=(8, 6)),
    # NVIDIA V100 datasheet: SXM2 7.8 / 15.7 / 125 (fp16 tensor), PCIe 7 / 14 / 112; 900 GB/s HBM2.
    DeviceSpec("V100 SXM2", {"fp64": 7.8 * T, "fp32": 15.7 * T, "fp16": 125 * T}, 900 * G, PCIE_GEN3_X16,
               32 * 2**30, "NVIDIA V100 datasheet, SXM2", (r"v100.*sxm", r"v100s"), compute_capability=(7, 0)),
    DeviceSpec("V100 PCIe", {"fp64": 7 * T, "fp32": 14 * T, "fp16": 112 * T}, 900 * G, PCIE_GEN3_X16,
               16 * 2**30, "NVIDIA V100 datasheet, PCIe", (r"v100",), compute_capability=(7, 0)),
    # NVIDIA T4 datasheet: 8.1 fp32, 65 fp16 (mixed, tensor), 130 int8 TOPS, 320 GB/s.
    DeviceSpec("T4", {"fp32": 8.1 * T, "fp16": 65 * T, "int8": 130 * T}, 320 * G, PCIE_GEN3_X16, 16 * 10**9,
               "NVIDIA T4 datasheet", (r"\bt4\b",), compute_capability=(7, 5)),
    # NVIDIA Ada Lovelace architecture whitepaper, RTX 4090 column: tensor rates with fp32 accumulate (what
    # PyTorch uses), dense; GeForce cards run fp16/bf16 with fp32 accumulate at half the fp16-accumulate rate.
    DeviceSpec("RTX 4090", {"fp64": 1.29 * T, "fp32": 82.6 * T, "tf32": 82.6 * T, "bf16": 165.2 * T,
                            "fp16": 165.2 * T, "fp8": 330.3 * T, "int8": 660.6 * T},
               1008 * G, PCIE_GEN4_X16, 24 * 2**30, "NVIDIA Ada Lovelace whitepaper, RTX 4090", (r"4090",),
               compute_capability=(8, 9)),
)


def lookup_device(name: str, *, warn: bool = True) -> DeviceSpec | None:
    """The table entry for a ``torch.cuda.get_device_name()`` string; None if none matches, with a warning unless
    ``warn=False`` (a report over machines of any kind expects unknown ones)."""
    key = str(name).strip().lower()
    for dev in DEVICES:
        if any(re.search(p, key) for p in dev.patterns):
            return dev
    if warn:
        warnings.warn(f"device {name!r} is not in torchledger's hardware table: no peak figures for it",
                      stacklevel=2)
    return None


def device_names() -> tuple[str, ...]:
    """The names of the hardware table's entries, in table order."""
    return tuple(dev.name for dev in DEVICES)


def _key(name: str) -> str:
    return re.sub(r"[\s_-]+", "", str(name).lower())


def get_device(name: str) -> DeviceSpec:
    """The entry named ``name`` (case, spaces, hyphens and underscores ignored: ``h100-sxm`` is ``H100 SXM``);
    ValueError naming the value and the choices when no entry has that name."""
    for dev in DEVICES:
        if _key(dev.name) == _key(name):
            return dev
    raise ValueError(f"gpu={name!r} is not in the hardware table; choices: {', '.join(device_names())}")


def peak_flops(name: str, dtype: str) -> float | None:
    """Dense peak FLOP/s of device ``name`` for ``dtype``; None (with a warning) for an unknown device."""
    dev = lookup_device(name)
    return None if dev is None else dev.peak(dtype)


def arithmetic_intensity(flops: int, bytes_moved: int) -> float:
    """FLOPs per byte moved to or from memory."""
    non_negative_int("flops", flops)
    positive_number("bytes_moved", bytes_moved)
    return flops / bytes_moved


def matmul_intensity(m: int, k: int, n: int, dtype_bytes: int) -> float:
    """Arithmetic intensity of an (m, k) x (k, n) matmul that reads A and B once and writes C once."""
    for name, v in (("m", m), ("k", k), ("n", n), ("dtype_bytes", dtype_bytes)):
        positive_number(name, v)
    return 2 * m * k * n / ((m * k + k * n + m * n) * dtype_bytes)


def attainable_flops(intensity: float, peak_flops_per_second: float, memory_bandwidth: float) -> float:
    """Roofline (Williams et al. 2009): min(peak, intensity x bandwidth)."""
    positive_number("intensity", intensity)
    positive_number("peak_flops_per_second", peak_flops_per_second)
    positive_number("memory_bandwidth", memory_bandwidth)
    return min(peak_flops_per_second, intensity * memory_bandwidth)


def ridge_point(peak_flops_per_second: float, memory_bandwidth: float) -> float:
    """Arithmetic intensity (FLOP/byte) where the roofline turns from memory-bound to compute-bound."""
    return positive_number("peak_flops_per_second", peak_flops_per_second) / positive_number(
        "memory_bandwidth", memory_bandwidth
    )

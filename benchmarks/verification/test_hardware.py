"""The hardware table: lookups from real device-name strings, datasheet peaks, roofline arithmetic."""

from __future__ import annotations

from pathlib import Path

import pytest

from torchledger.formulas import hardware as H

# Strings as torch.cuda.get_device_name() returns them on each card.
DEVICE_NAMES = [
    ("NVIDIA H100 80GB HBM3", "H100 SXM"),
    ("NVIDIA H100", "H100 SXM"),
    ("NVIDIA H100 PCIe", "H100 PCIe"),
    ("NVIDIA H200", "H200 SXM"),
    ("NVIDIA A100-SXM4-40GB", "A100 40GB"),
    ("NVIDIA A100-SXM4-80GB", "A100 SXM 80GB"),
    ("NVIDIA A100-PCIE-40GB", "A100 40GB"),
    ("NVIDIA A100 80GB PCIe", "A100 PCIe 80GB"),
    ("NVIDIA L4", "L4"),
    ("NVIDIA L40S", "L40S"),
    ("NVIDIA A10G", "A10G"),
    ("Tesla V100-SXM2-16GB", "V100 SXM2"),
    ("Tesla V100-PCIE-32GB", "V100 PCIe"),
    ("Tesla T4", "T4"),
    ("NVIDIA GeForce RTX 4090", "RTX 4090"),
]


@pytest.mark.parametrize(("device_name", "entry"), DEVICE_NAMES)
def test_lookup_from_device_name(device_name: str, entry: str) -> None:
    dev = H.lookup_device(device_name)
    assert dev is not None
    assert dev.name == entry
    assert dev.source


@pytest.mark.parametrize("device_name", ["NVIDIA L40", "AMD Instinct MI300X", "NVIDIA H100 NVL", "cpu"])
def test_unknown_device_warns_and_returns_none(device_name: str) -> None:
    with pytest.warns(UserWarning, match="not in torchledger's hardware table"):
        assert H.lookup_device(device_name) is None
    with pytest.warns(UserWarning):
        assert H.peak_flops(device_name, "bf16") is None


@pytest.mark.parametrize(
    ("device_name", "dtype", "tflops"),
    [
        # NVIDIA datasheets, dense (the sparsity figures halved)
        ("NVIDIA H100 80GB HBM3", "bf16", 989.4),
        ("NVIDIA H100 80GB HBM3", "fp8", 1978.9),
        ("NVIDIA H100 80GB HBM3", "tf32", 494.7),
        ("NVIDIA H100 80GB HBM3", "fp32", 67),
        ("NVIDIA H100 PCIe", "fp16", 756),
        ("NVIDIA H200", "int8", 1978.9),
        ("NVIDIA A100-SXM4-80GB", "bf16", 312),
        ("NVIDIA A100-SXM4-80GB", "tf32", 156),
        ("NVIDIA A100-SXM4-80GB", "int8", 624),
        ("NVIDIA L4", "fp8", 242.5),
        ("NVIDIA L40S", "bf16", 362.05),
        ("Tesla T4", "fp16", 65),
        ("Tesla V100-SXM2-16GB", "fp16", 125),
        ("NVIDIA GeForce RTX 4090", "bf16", 165.2),
    ],
)
def test_datasheet_peaks(device_name: str, dtype: str, tflops: float) -> None:
    assert H.peak_flops(device_name, dtype) == pytest.approx(tflops * 1e12)


def test_dtype_names_and_missing_paths() -> None:
    h100 = H.lookup_device("NVIDIA H100 80GB HBM3")
    assert h100 is not None
    assert h100.peak("torch.bfloat16") == h100.peak("bfloat16") == h100.peak("BF16")
    a100 = H.lookup_device("NVIDIA A100-SXM4-40GB")
    assert a100 is not None and a100.peak("float8_e4m3fn") is None  # Ampere has no fp8 tensor cores
    with pytest.raises(ValueError, match="dtype='int64' has no entry in the peak table"):
        h100.peak("int64")


def test_bandwidths() -> None:
    h100, h200 = H.lookup_device("NVIDIA H100 80GB HBM3"), H.lookup_device("NVIDIA H200")
    assert h100 is not None and h200 is not None
    assert (h100.memory_bandwidth, h200.memory_bandwidth) == (3.35e12, 4.8e12)
    assert h100.host_link_bandwidth == 64e9  # PCIe Gen5 x16, 128 GB/s both directions together


def test_roofline() -> None:
    peak, bw = 989.4e12, 3.35e12
    assert H.ridge_point(peak, bw) == pytest.approx(295.34, abs=0.01)
    # 8192^3 bf16 matmul: 2 n^3 FLOPs over 3 n^2 elements of 2 bytes = n / 3 FLOP/byte
    assert H.matmul_intensity(8192, 8192, 8192, 2) == pytest.approx(8192 / 3)
    assert H.attainable_flops(8192 / 3, peak, bw) == peak
    # an elementwise add of fp32 vectors: 1 FLOP per 12 bytes, memory-bound
    assert H.arithmetic_intensity(1000, 12000) == pytest.approx(1 / 12)
    assert H.attainable_flops(1 / 12, peak, bw) == pytest.approx(bw / 12)


def test_roofline_bad_input() -> None:
    with pytest.raises(ValueError, match="memory_bandwidth=0"):
        H.attainable_flops(1.0, 1e12, 0)
    with pytest.raises(ValueError, match="bytes_moved=0"):
        H.arithmetic_intensity(10, 0)


def _cache_entry(root: Path, index: int, kind: str, level: int, size: str) -> None:
    entry = root / f"index{index}"
    entry.mkdir(parents=True)
    for name, text in (("type", kind), ("level", str(level)), ("size", size)):
        (entry / name).write_text(text + "\n")


def test_last_level_cache_is_the_highest_data_level_in_sysfs(tmp_path: Path) -> None:
    from torchledger.measuring.machine import last_level_cache_bytes

    # the 2-core EPYC's cpu0 as sysfs lists it (lscpu: L1d 64 KiB, L2 2 MiB, L3 32 MiB over both cores)
    _cache_entry(tmp_path, 0, "Data", 1, "32K")
    _cache_entry(tmp_path, 1, "Instruction", 1, "32K")
    _cache_entry(tmp_path, 2, "Unified", 2, "1024K")
    _cache_entry(tmp_path, 3, "Unified", 3, "32768K")
    assert last_level_cache_bytes(tmp_path) == 32 * 2**20
    # an instruction cache never counts, an unreadable size is skipped, and no entries say nothing
    other = tmp_path / "other"
    _cache_entry(other, 0, "Unified", 2, "2M")
    _cache_entry(other, 1, "Instruction", 3, "64M")
    _cache_entry(other, 2, "Unified", 3, "lots")
    assert last_level_cache_bytes(other) == 2 * 2**20
    assert last_level_cache_bytes(tmp_path / "none") is None

"""The roofline group: memory bandwidth and the biggest matmul per dtype, as fractions of the hardware table's peaks;
on CUDA the same matmul is also timed with ``triton.testing.do_bench``: the suite's own timing should sit within 5%
of it (recorded, not asserted), which checks that the harness measures the GPU and not itself."""

from __future__ import annotations

import warnings
from typing import Any

import pytest
import torch

from benchmarks.performance.conftest import Ledger
from torchledger.formulas import flops as F
from torchledger.formulas.hardware import lookup_device, matmul_intensity

DTYPES = {"fp32": torch.float32, "tf32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _table_entry(ledger: Ledger) -> Any:
    if not ledger.cuda:
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return lookup_device(ledger.name)


@pytest.mark.benchmark(group="roofline")
def test_copy_bandwidth(ledger: Ledger, sizes: dict[str, Any]) -> None:
    n = sizes["copy_bytes"]
    src = torch.empty(n, dtype=torch.uint8, device=ledger.device).fill_(1)
    dst = torch.empty_like(src)
    seconds = ledger.time(lambda: dst.copy_(src), rounds=sizes["rounds"], warmup=2, bytes_moved=2 * n)
    spec = _table_entry(ledger)
    bandwidth = 2 * n / seconds if seconds else None  # read and write
    ledger.record(bandwidth_bytes_per_s=bandwidth,
                  fraction_of_peak=None if spec is None or bandwidth is None else bandwidth / spec.memory_bandwidth)


@pytest.mark.benchmark(group="roofline")
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_biggest_matmul(ledger: Ledger, sizes: dict[str, Any], dtype: str) -> None:
    # on the CPU twice the precision group's size, except fp16, which CPUs run without a fast path
    n = sizes["matmul"] * (1 if ledger.cuda or dtype == "fp16" else 2)
    a = torch.randn(n, n, device=ledger.device, dtype=DTYPES[dtype])
    b = torch.randn(n, n, device=ledger.device, dtype=DTYPES[dtype])
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high" if dtype == "tf32" else "highest")
    try:
        flops = F.matmul_flops(n, n, n)
        seconds = ledger.time(lambda: a @ b, rounds=sizes["rounds"], warmup=2, flops=flops, mfu_dtype=dtype,
                              dtype=dtype, intensity=matmul_intensity(n, n, n, a.element_size()))
        ledger.record(fraction_of_peak=ledger.benchmark.extra_info.get("mfu"))
        if ledger.cuda and seconds:
            try:
                from triton.testing import do_bench
            except ImportError:
                ledger.record(do_bench_s=None, do_bench_note="triton is not installed")
            else:
                do_bench_s = do_bench(lambda: a @ b) / 1000.0  # ms, L2 flushed between runs
                ledger.record(do_bench_s=do_bench_s, harness_over_do_bench=seconds / do_bench_s,
                              within_5pct_of_do_bench=abs(seconds / do_bench_s - 1) <= 0.05)
    finally:
        torch.set_float32_matmul_precision(previous)

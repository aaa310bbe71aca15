"""The roofline group: memory bandwidth and the biggest matmul per dtype, as fractions of the hardware table's peaks;
on CUDA the same matmul is also timed with ``triton.testing.do_bench``, with the GPU's clocks sampled during both.
Under sustained timing (the default on CUDA) the two must agree within 5%, or within 3% once each time is
normalized by the SM clock it ran at: this checks that the harness measures the GPU and not itself. Under burst
timing the ratio is recorded, not asserted (a burst runs at the clocks of a GPU that is idle most of the time)."""

from __future__ import annotations

import warnings
from itertools import pairwise
from typing import Any

import pytest
import torch

from benchmarks.performance.conftest import Ledger
from torchledger.formulas import flops as F
from torchledger.formulas.hardware import lookup_device, matmul_intensity
from torchledger.formulas.steptime import Op, optimizer_ops
from torchledger.measuring.gpu_state import GpuStateSampler, cuda_uuid
from torchledger.measuring.timing import agrees_with_do_bench

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
    seconds = ledger.time(lambda: dst.copy_(src), rounds=sizes["rounds"], warmup=2, bytes_moved=2 * n,
                          work={"bytes": n})
    spec = _table_entry(ledger)
    bandwidth = 2 * n / seconds if seconds else None  # read and write
    ledger.record(bandwidth_bytes_per_s=bandwidth,
                  fraction_of_peak=None if spec is None or bandwidth is None else bandwidth / spec.memory_bandwidth)


@pytest.mark.benchmark(group="roofline")
def test_optimizer_update(ledger: Ledger, sizes: dict[str, Any]) -> None:
    """One AdamW (foreach) step over parameters shaped as the profile's MLP (its weights and biases), each round
    after the speed probe's copy has displaced the caches, as a training step's backward leaves them: the bandwidth
    the optimizer's own ops reach. Its eight foreach ops read up to three tensors and update one in place
    (``addcdiv_(p, m, denom)``), and its ``sqrt`` writes a new tensor; on the 2-core EPYC, inside the MLP's step they
    ran 41 to 86 GB/s where ``x.mul_`` ran 60 to 114, and the whole update took 10.6 to 11.5 ms against 7.3 to 9.4
    predicted at the ``x.mul_`` bandwidth. ``bytes`` and ``launches`` are those the op list gives this update; the
    calibration takes the launches' host cost off the time before dividing."""
    torch.manual_seed(0)
    shapes = [shape for d_in, d_out in pairwise(sizes["mlp"]) for shape in ((d_out, d_in), (d_out,))]
    optimizer, ops = adamw_update([torch.randn(shape, device=ledger.device) for shape in shapes],
                                  "cuda" if ledger.cuda else "cpu")
    n, params = sum(p.numel() for p in optimizer.param_groups[0]["params"]), len(shapes)
    nbytes = sum(op.bytes for op in ops)
    ledger.time(optimizer.step, rounds=max(sizes["rounds"], 10), warmup=2, bytes_moved=nbytes, refill=_nothing,
                work={"optimizer": "adamw", "impl": "foreach", "params": n, "tensors": params})
    ledger.record(optimizer="adamw", impl="foreach", params=n, tensors=params, bytes=nbytes,
                  launches=sum(op.launches * op.count for op in ops))


def adamw_update(values: list[torch.Tensor], kind: str) -> tuple[torch.optim.AdamW, list[Op]]:
    """An AdamW (foreach) optimizer over parameters holding ``values``, each with a random gradient, its state made
    by one step; with the op list of its update on a device of ``kind``."""
    params = [torch.nn.Parameter(v) for v in values]
    for p in params:
        p.grad = torch.randn_like(p)
    optimizer = torch.optim.AdamW(params, foreach=True)
    optimizer.step()  # the state
    return optimizer, optimizer_ops(sum(p.numel() for p in params), len(params), optimizer="adamw",
                                    optimizer_impl="foreach", device=kind)


def _nothing() -> None:
    """No refill after the probe: the update starts with caches that hold other data, as after a backward."""


@pytest.mark.benchmark(group="roofline")
def test_update_bandwidth(ledger: Ledger, sizes: dict[str, Any]) -> None:
    """An update in place (``x.mul_(s)`` over as many bytes as the copy): each cache line is read and written back.
    A copy into another buffer also reads the destination's lines before writing them on a CPU (write-allocate), so
    the two differ there; the optimizer's updates and gradient accumulation run in place."""
    n = sizes["copy_bytes"]
    x = torch.ones(n // 4, dtype=torch.float32, device=ledger.device)
    seconds = ledger.time(lambda: x.mul_(1.0), rounds=sizes["rounds"], warmup=2, bytes_moved=2 * n,
                          work={"bytes": n, "in_place": True})
    spec = _table_entry(ledger)
    bandwidth = 2 * n / seconds if seconds else None  # read and written
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
                              work={"shape": [n, n, n]}, dtype=dtype,
                              intensity=matmul_intensity(n, n, n, a.element_size()))
        ledger.record(fraction_of_peak=ledger.benchmark.extra_info.get("mfu"))
        if ledger.cuda and seconds:
            try:
                from triton.testing import do_bench
            except ImportError:
                ledger.record(do_bench_s=None, do_bench_note="triton is not installed")
            else:
                with GpuStateSampler(torch.device(ledger.device).index or 0, uuid=cuda_uuid(ledger.device)) as state:
                    do_bench_s = do_bench(lambda: a @ b) / 1000.0  # ms, L2 flushed between runs
                do_bench_state = state.summary()
                ours = ledger.benchmark.extra_info.get("gpu_state") or {}
                agreement = agrees_with_do_bench(seconds, do_bench_s, _sm_median(ours), _sm_median(do_bench_state))
                ledger.record(do_bench_s=do_bench_s, do_bench_gpu_state=do_bench_state,
                              harness_over_do_bench=agreement["ratio"], cycles_over_do_bench=agreement["cycle_ratio"],
                              within_5pct_of_do_bench=abs(agreement["ratio"] - 1) <= 0.05)
                if ledger.timing == "sustained":
                    cycles = agreement["cycle_ratio"]
                    clocks = "no SM clock was recorded" if cycles is None else (
                        f"in clock cycles {abs(cycles - 1):.1%} apart (over 3%)")
                    assert agreement["agrees"], (
                        f"{dtype} {n}^3: the suite's {seconds * 1e3:.3f} ms and do_bench's {do_bench_s * 1e3:.3f} ms "
                        f"are {abs(agreement['ratio'] - 1):.1%} apart (over 5%), and {clocks}")
    finally:
        torch.set_float32_matmul_precision(previous)


def _sm_median(state: dict[str, Any] | None) -> float | None:
    clock = (state or {}).get("sm_clock_mhz")
    return None if clock is None else float(clock["median"])

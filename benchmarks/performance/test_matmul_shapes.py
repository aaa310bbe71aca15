"""The roofline group's matmul shapes: the achievable FLOP/s of every matmul the profile's training steps run, at its
shape and operand layout, per dtype, for the step-time model's calibration (:mod:`torchledger.reporting.calibration`
reads them beside the square matmuls). Small and skinny matmuls do not reach the peak, and a BLAS library runs
``x W^T`` (a Linear's forward, layout ``nt``), ``dY W`` (its input gradient, ``nn``) and ``dY^T X`` (its weight
gradient, ``tn``) through different kernels: a calibration that holds only one large square shape cannot say by
how much.

The matmuls are those the step-time model lists (:func:`~torchledger.formulas.steptime.transformer_step_ops` of the
profile's transformer, :func:`~torchledger.formulas.steptime.mlp_step_ops` of its MLP), named by the op that runs
them, so a case measures the same shape in every profile's sizes (gpt-tiny at 8 x 128 in the small profile,
GPT-2 small at 16 x 1024 in the full one), and the accumulation group's micro-batches of a quarter of the batch.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from benchmarks.performance.conftest import SIZES, Ledger, calibration_timing
from benchmarks.performance.test_accumulation_checkpointing import ACCUM
from torchledger.formulas import flops as F
from torchledger.formulas.hardware import matmul_intensity
from torchledger.formulas.specs import MLPSpec, get_preset
from torchledger.formulas.steptime import Op, mlp_step_ops, transformer_step_ops

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


# The accumulation group's micro-batches: the transformer's batch split in ACCUM (its steps run 32-true only)
MICRO = "gpt-micro:"


def step_matmuls(sizes: dict[str, Any]) -> dict[str, Op]:
    """The matmuls of the profile's steps by ``workload:op name`` (the attention kernel is timed on its own)."""
    spec = get_preset(sizes["gpt"])
    ops = {f"gpt:{op.name}": op for op in transformer_step_ops(spec, sizes["gpt_batch"], sizes["gpt_seq"])}
    ops.update({f"{MICRO}{op.name}": op for op in transformer_step_ops(spec, sizes["gpt_batch"] // ACCUM,
                                                                       sizes["gpt_seq"])})
    ops.update({f"mlp:{op.name}": op for op in mlp_step_ops(MLPSpec(sizes["mlp"]), sizes["mlp_batch"])})
    return {name: op for name, op in ops.items() if op.shape is not None and op.kernel is None}


# The same op names in every profile (one transformer family, one MLP depth): the names of the small one.
MATMULS = tuple(step_matmuls(SIZES["small"]))
assert tuple(step_matmuls(SIZES["full"])) == MATMULS, "the profiles' steps run different matmuls"


def _operands(m: int, k: int, n: int, layout: str, dtype: torch.dtype, device: str) -> tuple[torch.Tensor, ...]:
    """A (m, k) and B (k, n), stored as ``layout`` says (a transposed operand is a transposed view of its
    row-major transpose, as a Linear's weight and its gradient's transpose are)."""
    gen = torch.Generator(device="cpu").manual_seed(0)
    a = torch.randn(k, m, generator=gen).t() if layout == "tn" else torch.randn(m, k, generator=gen)
    b = torch.randn(n, k, generator=gen).t() if layout == "nt" else torch.randn(k, n, generator=gen)
    return a.to(device, dtype), b.to(device, dtype)


@pytest.mark.benchmark(group="roofline")
@pytest.mark.parametrize("op", MATMULS)
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_matmul_shape(ledger: Ledger, sizes: dict[str, Any], dtype: str, op: str) -> None:
    if op.startswith(MICRO) and dtype != "fp32":
        pytest.skip("the accumulation group's micro-batches run 32-true only")
    if op.startswith(MICRO) and ledger.cuda:
        pytest.skip("on CUDA the full profile's time budget leaves the micro-batches' shapes to interpolation")
    step_op = step_matmuls(sizes)[op]
    assert step_op.shape is not None
    m, k, n = step_op.shape
    a, b = _operands(m, k, n, step_op.layout, DTYPES[dtype], ledger.device)
    assert (a.t().is_contiguous(), b.t().is_contiguous()) == (step_op.layout == "tn", step_op.layout == "nt")
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")  # PyTorch's default: what a 32-true step runs
    try:
        ledger.time(lambda: a @ b, **calibration_timing(ledger, sizes), flops=F.matmul_flops(m, k, n),
                    mfu_dtype=dtype, work={"shape": [m, k, n], "layout": step_op.layout}, dtype=dtype,
                    shape=[m, k, n], layout=step_op.layout, matmul=op,
                    intensity=matmul_intensity(m, k, n, a.element_size()))
    finally:
        torch.set_float32_matmul_precision(previous)

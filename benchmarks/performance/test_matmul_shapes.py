"""The roofline group's matmul shapes: the achievable FLOP/s of the shapes the profile's training steps run, per
dtype, for the step-time model's calibration (:mod:`torchledger.reporting.calibration` reads them beside the
square matmuls). Small and skinny matmuls do not reach the peak; a calibration that holds only one large square
shape cannot say by how much.

Shapes, from the profile's workloads (n = batch x sequence tokens, d = d_model, V = vocab): a projection forward
(n, d, 3d), a weight gradient (4d, n, d) (output small, reduction long), the LM head (n, d, V), and the MLP's first
layer (batch, dims[0], dims[1]).
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from benchmarks.performance.conftest import Ledger
from torchledger.formulas import flops as F
from torchledger.formulas.hardware import matmul_intensity
from torchledger.formulas.specs import get_preset

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
SHAPES = ("projection", "weight-grad", "lm-head", "mlp")


def _shape(sizes: dict[str, Any], kind: str) -> tuple[int, int, int]:
    spec = get_preset(sizes["gpt"])
    n, d = sizes["gpt_batch"] * sizes["gpt_seq"], spec.d_model
    return {"projection": (n, d, 3 * d), "weight-grad": (spec.d_ff, n, d), "lm-head": (n, d, spec.vocab_size),
            "mlp": (sizes["mlp_batch"], sizes["mlp"][0], sizes["mlp"][1])}[kind]


@pytest.mark.benchmark(group="roofline")
@pytest.mark.parametrize("kind", SHAPES)
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_matmul_shape(ledger: Ledger, sizes: dict[str, Any], dtype: str, kind: str) -> None:
    if dtype == "fp16" and not ledger.cuda:
        pytest.skip("CPUs run fp16 matmuls without a fast path: the square fp16 matmul measures it")
    m, k, n = _shape(sizes, kind)
    gen = torch.Generator(device="cpu").manual_seed(0)
    a = torch.randn(m, k, generator=gen).to(ledger.device, DTYPES[dtype])  # (m, k)
    b = torch.randn(k, n, generator=gen).to(ledger.device, DTYPES[dtype])  # (k, n)
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")  # PyTorch's default: what a 32-true step runs
    try:
        ledger.time(lambda: a @ b, rounds=sizes["rounds"], warmup=2, flops=F.matmul_flops(m, k, n),
                    mfu_dtype=dtype, work={"shape": [m, k, n]}, dtype=dtype, shape=[m, k, n], matmul=kind,
                    intensity=matmul_intensity(m, k, n, a.element_size()))
    finally:
        torch.set_float32_matmul_precision(previous)

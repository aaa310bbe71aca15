"""The roofline group's step kernels: the measured rate of each kernel of a training step that is not a matmul and
whose time its bytes do not give, forward and backward, per dtype, for the step-time model's calibration
(:mod:`torchledger.reporting.calibration` reads them as :class:`~torchledger.formulas.steptime.KernelPoint`).

Each kernel runs at the profile's transformer shapes (n = batch x sequence tokens, d = d_model, f = d_ff,
V = vocab) with its operands laid out as the reference models lay them out (attention's q, k, v are transposed views
of one projection's output), through the functional PyTorch calls the models make; the backward is
``torch.autograd.grad`` over the kept graph, as the step's backward reaches it. What a rate counts (``units``) is
:data:`~torchledger.formulas.steptime.KERNELS`' definition: elements of the input (cross-entropy: of the logits), for
attention the FLOPs of :func:`~torchledger.formulas.flops.attention_flops` and ``attention_backward_flops``.

Why measure them: a flash-attention kernel reaches a fraction of the GEMM rate of its FLOPs, on a GPU and on a CPU
alike (the 2-core EPYC: 62 GFLOP/s in fp32 against about 190 for gpt-tiny's GEMMs), and a kernel that evaluates
transcendental functions per element (GELU's erf, SiLU's and the softmax's exp) can take longer than its bytes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from benchmarks.performance.conftest import Ledger, calibration_timing
from torchledger.counting.hooks import sdpa_is_fused
from torchledger.formulas import flops as FL
from torchledger.formulas.specs import get_preset
from torchledger.formulas.steptime import KERNELS

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DIRECTIONS = ("forward", "backward")


def _case(kernel: str, sizes: dict[str, Any], dtype: torch.dtype, device: str
          ) -> tuple[Callable[[], torch.Tensor], tuple[torch.Tensor, ...], int, int, list[int]]:
    """(forward, leaves, forward units, backward units, shape) of one kernel at the profile's sizes."""
    spec = get_preset(sizes["gpt"])
    batch, seq = sizes["gpt_batch"], sizes["gpt_seq"]
    n, d, f, vocab = batch * seq, spec.d_model, spec.d_ff, spec.vocab_size
    gen = torch.Generator(device="cpu").manual_seed(0)

    def leaf(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen) * scale).to(device, dtype).requires_grad_()

    if kernel == "attention":
        h, hd = spec.n_heads, spec.head_dim
        qkv = leaf(batch, seq, 3 * h * hd)  # (B, T, 3 H D), as the fused projection writes it
        q, k, v = (t.view(batch, seq, h, hd).transpose(1, 2) for t in qkv.split(h * hd, dim=2))  # (B, H, T, D)
        fused = sdpa_is_fused(q, k, v, is_causal=True)
        return (lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True), (qkv,),
                FL.attention_flops(batch, h, seq, seq, hd),
                FL.attention_backward_flops(batch, h, seq, seq, hd, recompute_scores=fused), [batch, h, seq, hd])
    if kernel in ("layer_norm", "rms_norm"):
        x, w = leaf(n, d), leaf(d)
        if kernel == "layer_norm":
            bias = leaf(d)
            return lambda: F.layer_norm(x, (d,), w, bias), (x, w, bias), n * d, n * d, [n, d]
        return lambda: F.rms_norm(x, (d,), w, 1e-5), (x, w), n * d, n * d, [n, d]
    if kernel in ("gelu", "silu"):
        x = leaf(n, f)
        fn = F.gelu if kernel == "gelu" else F.silu
        return lambda: fn(x), (x,), n * f, n * f, [n, f]
    assert kernel == "cross_entropy"
    logits = leaf(n, vocab)
    targets = torch.randint(0, vocab, (n,), generator=gen).to(device)
    return lambda: F.cross_entropy(logits, targets), (logits,), n * vocab, n * vocab, [n, vocab]


@pytest.mark.benchmark(group="roofline")
@pytest.mark.parametrize("direction", DIRECTIONS)
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("kernel", KERNELS)
def test_kernel_rate(ledger: Ledger, sizes: dict[str, Any], kernel: str, dtype: str, direction: str) -> None:
    try:
        forward, leaves, fwd_units, bwd_units, shape = _case(kernel, sizes, DTYPES[dtype], ledger.device)
        out = forward()
    except (RuntimeError, NotImplementedError) as exc:  # a dtype the device has no kernel for
        pytest.skip(f"{kernel} in {dtype} does not run on {ledger.device}: {exc}")
    if direction == "forward":
        fn: Callable[[], object] = forward
        units = fwd_units
    else:
        grad = torch.ones_like(out) if out.dim() == 0 else torch.randn_like(out)
        fn = lambda: torch.autograd.grad(out, leaves, grad, retain_graph=True)  # noqa: E731
        units = bwd_units
    name = kernel if direction == "forward" else f"{kernel}_backward"
    # The comparable figure: attention's FLOP/s; for the others the bytes of one input and the output forward, of
    # the input, the output's gradient and the input's gradient backward (what the op list charges them at least).
    figure: dict[str, int] = {"flops": units} if kernel == "attention" else {
        "bytes_moved": (2 if direction == "forward" else 3) * units * torch.finfo(DTYPES[dtype]).bits // 8}
    ledger.time(fn, **calibration_timing(ledger, sizes, calls=25), work={"kernel": name, "shape": shape},
                kernel=name, dtype=dtype, units=units, shape=shape, **figure)

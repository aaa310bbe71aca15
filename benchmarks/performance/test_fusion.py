"""The fusion group: eager against torch.compile, hand-written kernels against PyTorch's fused ones, and AdamW's
three implementations."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from benchmarks.performance.conftest import Ledger
from torchledger.formulas import flops as FL
from torchledger.formulas.specs import get_preset
from torchledger.workloads.models import build_transformer, token_batch
from torchledger.workloads.train_step import TrainConfig, make_optimizer

COMPILE_MODES = ["eager", "default", pytest.param("max-autotune-no-cudagraphs", marks=pytest.mark.cuda)]


@pytest.mark.benchmark(group="fusion")
@pytest.mark.parametrize("mode", COMPILE_MODES)
def test_compile_forward(ledger: Ledger, sizes: dict[str, Any], mode: str) -> None:
    device, spec = ledger.device, get_preset(sizes["gpt"])
    torch.manual_seed(0)
    model = build_transformer(spec, device=device).eval()
    idx, _ = token_batch(spec, sizes["gpt_batch"], sizes["gpt_seq"], device=device)
    forward = model if mode == "eager" else torch.compile(model, mode=mode)

    def run() -> torch.Tensor:
        with torch.no_grad():
            return forward(idx)[0]

    with torch.no_grad():
        reference = model(idx)[0]
    out = run()  # the first call compiles (seconds); timing starts after it
    rel_error = float((out - reference).norm() / reference.norm())
    ledger.time(run, rounds=sizes["rounds"], warmup=1, flops=FL.model_flops(spec, *idx.shape).forward,
                mode=mode, dtype="fp32", rel_error=rel_error)


def _layer_norm_by_hand(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    mean = x.mean(-1, keepdim=True)
    var = (x - mean).pow(2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + 1e-5) * weight + bias


@pytest.mark.benchmark(group="fusion")
@pytest.mark.parametrize("impl", ["by hand", "F.layer_norm"])
def test_layer_norm(ledger: Ledger, sizes: dict[str, Any], impl: str) -> None:
    device, rows, d = ledger.device, sizes["ln_rows"], 768
    x = torch.randn(rows, d, device=device, requires_grad=True)
    w = torch.ones(d, device=device, requires_grad=True)
    b = torch.zeros(d, device=device, requires_grad=True)
    fn = _layer_norm_by_hand if impl == "by hand" else (lambda x, w, b: F.layer_norm(x, (d,), w, b))
    grad = torch.randn(rows, d, device=device)

    def run() -> None:
        fn(x, w, b).backward(grad)

    rel_error = float((_layer_norm_by_hand(x, w, b) - F.layer_norm(x, (d,), w, b)).norm() / x.norm())
    # memory-bound: record the bytes the fused kernel must move (read x, write y; forward and backward)
    ledger.time(run, rounds=sizes["rounds"], warmup=2, impl=impl, dtype="fp32", bytes_min=4 * rows * d * 2 * 2,
                rel_error=rel_error)


def _attention_by_hand(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    t = q.shape[-2]
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])  # (B, H, T, T)
    mask = torch.ones(t, t, dtype=torch.bool, device=q.device).tril()
    return scores.masked_fill(~mask, float("-inf")).softmax(-1) @ v  # (B, H, T, D)


@pytest.mark.benchmark(group="fusion")
@pytest.mark.parametrize("impl", ["by hand", "SDPA"])
def test_attention(ledger: Ledger, sizes: dict[str, Any], impl: str) -> None:
    device = ledger.device
    b, h, t, d = sizes["attn"]
    q, k, v = (torch.randn(b, h, t, d, device=device, requires_grad=True) for _ in range(3))
    fn = _attention_by_hand if impl == "by hand" else (lambda q, k, v: F.scaled_dot_product_attention(
        q, k, v, is_causal=True))
    grad = torch.randn(b, h, t, d, device=device)

    def run() -> None:
        fn(q, k, v).backward(grad)

    rel_error = float((fn(q, k, v) - _attention_by_hand(q, k, v)).norm() / _attention_by_hand(q, k, v).norm())
    # model FLOPs (forward + 2x forward, dense) so that both rows compare on the same work
    ledger.time(run, rounds=sizes["rounds"], warmup=2, flops=3 * FL.attention_flops(b, h, t, t, d), impl=impl,
                dtype="fp32", rel_error=rel_error)


@pytest.mark.benchmark(group="fusion")
@pytest.mark.parametrize("impl", ["for-loop", "foreach", "fused"])
def test_adamw_step(ledger: Ledger, sizes: dict[str, Any], impl: str) -> None:
    device, spec = ledger.device, get_preset(sizes["gpt"])
    torch.manual_seed(0)
    model = build_transformer(spec, device=device)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    optimizer = make_optimizer(model.parameters(), TrainConfig(optimizer="adamw", optimizer_impl=impl))
    n = sum(p.numel() for p in model.parameters())
    ledger.time(optimizer.step, rounds=sizes["rounds"], warmup=2, impl=impl, dtype="fp32", params=n,
                tensors=len(list(model.parameters())))

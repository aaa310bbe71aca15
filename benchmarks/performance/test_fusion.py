"""The fusion group: eager against torch.compile, hand-written kernels against PyTorch's fused ones, and AdamW's
three implementations."""

from __future__ import annotations

import dataclasses
import math
import time
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
    """Eager against torch.compile on the profile's compile model: steady-state speed, with the compile time (the
    first call, after a reset of dynamo's caches: Inductor's on-disk caches may still shorten it) and the peak
    memory of one call beside it."""
    device, spec = ledger.device, get_preset(sizes["compile_gpt"])
    if sizes["compile_layers"]:
        spec = dataclasses.replace(spec, n_layers=sizes["compile_layers"])
    batch, seq = sizes["compile_batch"], sizes["compile_seq"]
    torch.manual_seed(0)
    model = build_transformer(spec, device=device).eval()
    idx, _ = token_batch(spec, batch, seq, device=device)
    torch._dynamo.reset()
    forward = model if mode == "eager" else torch.compile(model, mode=mode)

    def run() -> torch.Tensor:
        with torch.no_grad():
            return forward(idx)[0]

    with torch.no_grad():
        reference = model(idx)[0]
    ledger.sync()
    start = time.perf_counter()
    out = run()  # the first call compiles (seconds); timing starts after it
    ledger.sync()
    compile_s = 0.0 if mode == "eager" else time.perf_counter() - start
    rel_error = float((out - reference).norm() / reference.norm())
    del out, reference
    peak = _peak_bytes(ledger, run, compiled=mode != "eager")
    ledger.time(run, rounds=sizes["rounds"], warmup=1, flops=FL.model_flops(spec, batch, seq).forward,
                work={"model": sizes["compile_gpt"], "layers": spec.n_layers, "batch": batch, "seq_len": seq},
                mode=mode, dtype="fp32", rel_error=rel_error, compile_s=compile_s, peak_memory=peak)


def _peak_bytes(ledger: Ledger, fn: Any, compiled: bool) -> int | None:
    """Peak bytes one call of ``fn`` allocates above what is allocated before it: the CUDA allocator's figure, or
    on the CPU the storage tracker's. None for compiled code on the CPU: the tracker is a dispatch mode, under which
    a compiled module runs eagerly, so its figure would be eager's."""
    if not ledger.cuda and compiled:
        return None
    if ledger.cuda:
        ledger.sync()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        ledger.sync()
        return int(torch.cuda.max_memory_allocated() - before)
    from torchledger.measuring.memory import measure_cpu

    try:
        return int(measure_cpu(fn, None, None).peak)
    except Exception:
        return None


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
    ledger.time(run, rounds=sizes["rounds"], warmup=2, bytes_moved=4 * rows * d * 2 * 2,
                work={"shape": [rows, d]}, impl=impl, dtype="fp32", bytes_min=4 * rows * d * 2 * 2,
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
                work={"shape": [b, h, t, d]}, dtype="fp32", rel_error=rel_error)


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
    # memory-bound: reads parameter, gradient and both moments, writes parameter and both moments (fp32)
    ledger.time(optimizer.step, rounds=sizes["rounds"], warmup=2, bytes_moved=7 * 4 * n,
                work={"model": sizes["gpt"], "params": n}, impl=impl, dtype="fp32", params=n,
                tensors=len(list(model.parameters())))

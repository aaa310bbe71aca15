"""The counter checks: each case is a real module, a step that runs it, and the formula's figure for that step.

Shared by ``test_counting.py`` (which asserts formula == hooks == dispatch exactly, and marks the profiler's known
gaps as strict xfails) and ``capability_table.py`` (which runs the same checks to write docs/counters.md).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from torchledger.counting import FlopCount, count_with_dispatch, count_with_hooks, count_with_profiler, sdpa_is_fused
from torchledger.formulas import flops as F
from torchledger.formulas.flops import ModelFlops
from torchledger.formulas.specs import CNNSpec, MLPSpec, get_preset
from torchledger.workloads import CNN, MLP, build_transformer, quantize_int8, token_batch

PHASES = ("forward", "forward+backward", "checkpointed")


def count_with_bare_flop_counter_mode(model: nn.Module, step: Callable[[], Tensor], *, backward: bool) -> FlopCount:
    """PyTorch's FlopCounterMode as it ships: the upstream baseline the dispatch counter completes."""
    with FlopCounterMode(display=False) as mode:
        loss = step()
        forward = mode.get_total_flops()
        if backward:
            loss.backward()
    return FlopCount("FlopCounterMode", forward=forward, backward=mode.get_total_flops() - forward)


COUNTERS: dict[str, Callable[..., FlopCount]] = {
    "hooks": count_with_hooks,
    "dispatch": count_with_dispatch,
    "profiler": count_with_profiler,
    "FlopCounterMode": count_with_bare_flop_counter_mode,
}

Built = tuple[nn.Module, Callable[[], Tensor], ModelFlops]


@dataclass(frozen=True)
class Case:
    """One check: ``build(device, phase)`` returns the module, a step returning a scalar, and the expected FLOPs."""

    name: str
    build: Callable[[str, str], Built]
    phases: tuple[str, ...] = ("forward", "forward+backward")
    attention: bool = False  # runs scaled_dot_product_attention
    conv: str = ""  # the aten op its convolution dispatches to, if any
    grouped: bool = False  # a convolution with groups > 1
    integer: bool = False  # counts integer ops, not FLOPs


def _fused(device: str, b: int, h: int, t: int, s: int, d: int, *, h_kv: int | None = None, causal: bool) -> bool:
    """Whether SDPA takes a fused kernel for these shapes on ``device`` (fp32, inputs requiring grad)."""
    q = torch.empty(b, h, t, d, device=device, requires_grad=True)
    k = torch.empty(b, h_kv or h, s, d, device=device, requires_grad=True)
    return sdpa_is_fused(q, k, k, is_causal=causal, enable_gqa=h_kv is not None and h_kv != h)


def _transformer(preset: str, causal: bool) -> Callable[[str, str], Built]:
    def build(device: str, phase: str) -> Built:
        spec = get_preset(preset)
        torch.manual_seed(0)
        model = build_transformer(spec, device=device, causal=causal)
        model.set_checkpointing("full" if phase == "checkpointed" else "none")
        b, t = 2, 64
        idx, targets = token_batch(spec, b, t, device=device)
        fused = _fused(device, b, spec.n_heads, t, t, spec.head_dim, h_kv=spec.n_kv_heads, causal=causal)
        expected = F.model_flops(spec, b, t, checkpointing="full" if phase == "checkpointed" else "none",
                                 recompute_attention_scores=fused)

        def step() -> Tensor:
            loss = model(idx, targets)[1]
            assert loss is not None
            return loss

        return model, step, expected

    return build


def _mlp(device: str, phase: str) -> Built:
    spec = MLPSpec()  # the lecture notes' 1024 -> 4096 -> 4096 -> 1024
    torch.manual_seed(0)
    model = MLP(spec, device=device)
    x = torch.randn(8, spec.dims[0], device=device)
    return model, lambda: model(x).square().mean(), F.mlp_flops(spec, 8)


def _cnn(device: str, phase: str) -> Built:
    spec = CNNSpec()  # the lecture notes' CNN on 32 x 32 images
    torch.manual_seed(0)
    model = CNN(spec, device=device)
    x = torch.randn(4, 3, 32, 32, device=device)
    return model, lambda: model(x).square().mean(), F.cnn_flops(spec, 4)


def _conv(
    module: Callable[[str], nn.Module], x_shape: tuple[int, ...], **geometry: object
) -> Callable[[str, str], Built]:
    """A single convolution on an input that needs its gradient (so the backward has data-grad and weight-grad)."""

    def build(device: str, phase: str) -> Built:
        torch.manual_seed(0)
        conv = module(device)
        x = torch.randn(*x_shape, device=device, requires_grad=True)
        fwd = F.conv_flops(x_shape[0], x_shape[1], conv.out_channels, x_shape[2:], conv.kernel_size,  # type: ignore[arg-type]
                           **geometry)  # type: ignore[arg-type]
        return conv, lambda: conv(x).square().mean(), ModelFlops(fwd, F.conv_backward_flops(fwd), 0, x_shape[0])

    return build


def _mha(need_weights: bool) -> Callable[[str, str], Built]:
    def build(device: str, phase: str) -> Built:
        n, length, e, h = 2, 48, 64, 4
        torch.manual_seed(0)
        mha = nn.MultiheadAttention(e, h, batch_first=True, device=device)
        x = torch.randn(n, length, e, device=device, requires_grad=True)
        fused = not need_weights and _fused(device, n, h, length, length, e // h, causal=False)
        proj = 4 * F.linear_flops(n * length, e, e)  # q, k, v and output projections
        attn = F.attention_flops(n, h, length, length, e // h)
        attn_bwd = F.attention_backward_flops(n, h, length, length, e // h, recompute_scores=fused)

        def step() -> Tensor:
            return mha(x, x, x, need_weights=need_weights)[0].square().mean()

        return mha, step, ModelFlops(proj + attn, 2 * proj + attn_bwd, 0, n * length)

    return build


def _int8(device: str, phase: str) -> Built:
    spec = MLPSpec((64, 128, 32))
    torch.manual_seed(0)
    model = quantize_int8(MLP(spec, device=device))
    x = torch.randn(32, 64, device=device)
    int_ops = F.matmul_flops(32, 64, 128) + F.matmul_flops(32, 128, 32)
    return model, lambda: model(x).square().mean(), ModelFlops(int_ops, 0, 0, 32)


CASES: tuple[Case, ...] = (
    Case("mlp", _mlp),
    Case("cnn", _cnn, conv="aten::conv2d"),
    Case("gpt-tiny", _transformer("gpt-tiny", causal=True), PHASES, attention=True),
    Case("gpt-tiny, no mask", _transformer("gpt-tiny", causal=False), PHASES, attention=True),
    Case("llama-tiny", _transformer("llama-tiny", causal=True), PHASES, attention=True),
    Case("llama-tiny, no mask", _transformer("llama-tiny", causal=False), PHASES, attention=True),
    Case("conv1d stride 2, padding 4, dilation 2",
         _conv(lambda d: nn.Conv1d(16, 32, 5, stride=2, padding=4, dilation=2, device=d), (4, 16, 100),
               stride=2, padding=4, dilation=2), conv="aten::conv1d"),
    Case("conv2d groups 4, stride 2, dilation 2",
         _conv(lambda d: nn.Conv2d(8, 16, 3, stride=2, dilation=2, groups=4, device=d), (2, 8, 20, 20),
               stride=2, dilation=2, groups=4), conv="aten::conv2d", grouped=True),
    Case("conv2d depthwise",
         _conv(lambda d: nn.Conv2d(16, 16, 3, padding=1, groups=16, device=d), (2, 16, 12, 12), padding=1, groups=16),
         conv="aten::conv2d", grouped=True),
    Case("conv3d",
         _conv(lambda d: nn.Conv3d(4, 8, (3, 3, 1), stride=(1, 2, 2), device=d), (2, 4, 9, 16, 16),
               stride=(1, 2, 2)), conv="aten::conv3d"),
    Case("conv-transpose2d stride 2, groups 2",
         _conv(lambda d: nn.ConvTranspose2d(16, 8, 4, stride=2, padding=1, groups=2, device=d), (2, 16, 8, 8),
               stride=2, padding=1, groups=2, transposed=True), conv="aten::conv_transpose2d", grouped=True),
    Case("multihead attention (bmm path)", _mha(need_weights=True)),
    Case("multihead attention (SDPA path)", _mha(need_weights=False), attention=True),
    Case("int8 matmul (_int_mm)", _int8, ("forward",), integer=True),
)


def run(case: Case, counter: str, device: str, phase: str) -> tuple[FlopCount, ModelFlops]:
    """Run ``case`` under one counter; returns what it counted and what the formula says."""
    model, step, expected = case.build(device, phase)
    model.train()
    counted = COUNTERS[counter](model, step, backward=phase != "forward")
    return counted, expected


def measured_and_expected(case: Case, counted: FlopCount, expected: ModelFlops, phase: str) -> tuple[int, int]:
    """The two figures the check compares: forward only, or everything the step ran."""
    if case.integer:
        return counted.int_ops, expected.forward
    if phase == "forward":
        return counted.total, expected.forward
    return counted.total, expected.train


def profiler_gap(case: Case, device: str, phase: str) -> str | None:
    """Why torch.profiler cannot match the formula for this check, naming the ops; None where it can."""
    gaps = []
    if case.integer:
        gaps.append("estimates nothing for aten::_int_mm")
    if case.attention and device != "meta":
        kernel = _fused_attention_kernel(case, device)
        if kernel:
            gaps.append(f"counts 0 for the fused attention kernel {kernel}")
    if case.conv and case.conv != "aten::conv2d":
        gaps.append(f"counts 0 for {case.conv}")
    elif case.conv and phase != "forward":
        gaps.append("counts 0 for aten::convolution_backward")
    if phase == "checkpointed":
        gaps.append("counts the MLP down projection (aten::addmm/aten::mm) that checkpointing's early stop aborts "
                    "before it runs")
    return "torch.profiler " + "; ".join(gaps) if gaps else None


def flop_counter_mode_gap(case: Case, device: str, phase: str) -> str | None:
    """Why PyTorch's own FlopCounterMode cannot match the formula for this check; None where it can."""
    gaps = []
    if case.integer:
        gaps.append("counts 0 for aten::_int_mm")
    if case.attention and device == "cpu" and _fused_attention_kernel(case, device):
        gaps.append("counts 0 for aten::_scaled_dot_product_flash_attention_for_cpu (pytorch#195460)")
    if case.grouped and phase != "forward":
        gaps.append("counts a grouped convolution's weight gradient (aten::convolution_backward) groups times over")
    return "FlopCounterMode " + "; ".join(gaps) if gaps else None


GAPS: dict[str, Callable[[Case, str, str], str | None]] = {
    "profiler": profiler_gap,
    "FlopCounterMode": flop_counter_mode_gap,
}


def _fused_attention_kernel(case: Case, device: str) -> str:
    """The fused SDPA kernel this case runs on ``device`` (e.g. aten::_scaled_dot_product_flash_attention_for_cpu),
    or '' where it takes the math path."""
    model, step, _ = case.build(device, "forward")
    model.train()
    seen: list[str] = []

    class _Spy(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
            if func.overloadpacket.__name__.startswith("_scaled_dot_product"):
                seen.append(f"aten::{func.overloadpacket.__name__}")
            return func(*args, **(kwargs or {}))

    with _Spy():
        step()
    return seen[0] if seen else ""

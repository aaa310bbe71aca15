"""Counting FLOPs at the dispatcher: PyTorch's FlopCounterMode, completed where it misses ops.

FlopCounterMode sees every aten op but has no formula for some (pytorch#195460): PyTorch's fused CPU attention
kernel ``_scaled_dot_product_flash_attention_for_cpu`` (and its backward) counts 0, and so does ``torch._int_mm``.
This counter registers the missing attention formulas (forward: QK^T + AV; backward: 5 bmm-equivalents, since the
kernel recomputes QK^T, as FlopCounterMode counts its CUDA twins) and re-registers the CUDA fused kernels with
formulas that accept grouped-query shapes. It also replaces the formula for ``convolution_backward``, which counts
a grouped convolution's weight gradient ``groups`` times over. ``_int_mm`` is counted as integer ops, kept apart
from FLOPs.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from torchledger.counting.result import FlopCount
from torchledger.formulas import flops as F

aten = torch.ops.aten


def _sdpa_forward(query: Any, key: Any, value: Any, *args: Any, out_shape: Any = None, **kwargs: Any) -> int:
    # query: (B, H, T, D); key: (B, H_kv, S, D); value: (B, H_kv, S, D_v)
    b, h, t, d = query
    return F.attention_flops(b, h, t, key[-2], d, v_head_dim=value[-1])


def _sdpa_backward(grad_out: Any, query: Any, key: Any, value: Any, *args: Any, out_shape: Any = None,
                   **kwargs: Any) -> int:
    b, h, t, d = query
    return F.attention_backward_flops(b, h, t, key[-2], d, v_head_dim=value[-1], recompute_scores=True)


def _conv_backward(grad_out: Any, x: Any, weight: Any, bias_sizes: Any, stride: Any, padding: Any, dilation: Any,
                   transposed: bool, output_padding: Any, groups: int, output_mask: Any, *args: Any,
                   out_shape: Any = None, **kwargs: Any) -> int:
    # FlopCounterMode's own formula counts the weight gradient of a grouped convolution `groups` times over: each
    # gradient costs one forward, whatever the grouping.
    fwd = F.conv_flops_from_shapes(
        x[0], x[1], grad_out[1], weight[2:], input_size=x[2:], output_size=grad_out[2:], groups=groups,
        transposed=transposed,
    )
    return F.conv_backward_flops(fwd, input_grad=bool(output_mask[0]), weight_grad=bool(output_mask[1]))


def _extra_formulas() -> dict[Any, Callable[..., int]]:
    """Formulas for the fused attention ops (by overload packet), registered where the op exists in this build."""
    forward = ("_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_flash_attention",
               "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention")
    mapping: dict[Any, Callable[..., int]] = {aten.convolution_backward: _conv_backward}
    for name in forward:
        for op_name, formula in ((name, _sdpa_forward), (f"{name}_backward", _sdpa_backward)):
            if hasattr(aten, op_name):
                mapping[getattr(aten, op_name)] = formula
    return mapping


class _IntOpsMode(TorchDispatchMode):
    """Counts ``torch._int_mm`` as integer multiply-adds (2mkn), apart from FLOPs."""

    def __init__(self) -> None:
        super().__init__()
        self.int_ops = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        if func.overloadpacket is aten._int_mm:
            a, b = args[0], args[1]
            self.int_ops += F.matmul_flops(a.shape[0], a.shape[1], b.shape[1])
        return out


class DispatchCounter:
    """Context manager: FlopCounterMode with the missing formulas, plus integer ops and fused-attention calls.

    ``total`` can be read at any point inside the block (e.g. after the forward) to split phases.
    """

    def __init__(self) -> None:
        self._mode: FlopCounterMode | None = None
        self._ints = _IntOpsMode()

    @property
    def total(self) -> int:
        return 0 if self._mode is None else int(self._mode.get_total_flops())

    @property
    def int_ops(self) -> int:
        return self._ints.int_ops

    def by_op(self) -> dict[str, int]:
        if self._mode is None:
            return {}
        return {str(op): int(n) for op, n in self._mode.get_flop_counts().get("Global", {}).items()}

    def by_module(self) -> dict[str, int]:
        """FLOPs per module path relative to the root module (FlopCounterMode's hierarchy without its root name)."""
        if self._mode is None:
            return {}
        out: dict[str, int] = {}
        for name, ops in self._mode.get_flop_counts().items():
            if name == "Global" or "." not in name:
                continue
            out[name.split(".", 1)[1]] = int(sum(ops.values()))
        return out

    def __enter__(self) -> DispatchCounter:
        self._mode = FlopCounterMode(display=False, custom_mapping=_extra_formulas())
        self._mode.__enter__()
        self._ints = _IntOpsMode()
        self._ints.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._ints.__exit__(*exc)
        assert self._mode is not None
        self._mode.__exit__(*exc)


def count_with_dispatch(model: nn.Module, step: Callable[[], Tensor], *, backward: bool = True) -> FlopCount:
    """Run ``step()`` (a forward returning a scalar loss) and, if ``backward``, its backward; count at dispatch."""
    with DispatchCounter() as counter:
        loss = step()
        forward = counter.total
        if backward:
            loss.backward()
    return FlopCount(
        "dispatch", forward=forward, backward=counter.total - forward, int_ops=counter.int_ops,
        by_module=counter.by_module(), by_op=counter.by_op(),
    )

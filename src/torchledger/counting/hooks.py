"""Counting FLOPs with module hooks: the formula of each module type applied to the shapes it sees.

Forward hooks count Linear (and transformers' Conv1D), Conv1d/2d/3d, ConvTranspose1d/2d/3d, MultiheadAttention,
the project's attention core and its int8 matmul layers; full backward hooks count the backward: a data-grad only
where the module's input needs a gradient (``grad_input`` is None otherwise) and a weight-grad only where the
weight requires one. A forward
hook that fires during the backward pass (a checkpointed block being recomputed) counts as recompute.

Attention's backward follows the kernel that ran: fused kernels (flash, memory-efficient, cuDNN, and PyTorch's CPU
flash kernel) recompute QK^T in the backward (2.5x the forward), the math path does not (2x). The choice is read
from ``torch._fused_sdp_choice``, the function ``F.scaled_dot_product_attention`` itself dispatches on.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from torchledger.counting.result import FlopCount
from torchledger.formulas import flops as F

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CONV_T = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


def _in_backward() -> bool:
    return bool(torch._C._current_graph_task_id() != -1)


def sdpa_is_fused(q: Tensor, k: Tensor, v: Tensor, *, is_causal: bool, enable_gqa: bool = False,
                  attn_mask: Tensor | None = None, dropout_p: float = 0.0) -> bool:
    """Whether ``F.scaled_dot_product_attention`` picks a fused kernel (anything but the math path) for these inputs.

    The meta device always takes the math path.
    """
    if q.device.type == "meta":
        return False
    try:
        choice = torch._fused_sdp_choice(q, k, v, attn_mask, dropout_p, is_causal, scale=None, enable_gqa=enable_gqa)
    except (RuntimeError, TypeError):
        return False
    return int(choice) != 0


def _linear_tokens(x: Tensor, in_features: int) -> int:
    return x.numel() // in_features


def _is_linear(m: nn.Module) -> bool:
    """``nn.Linear``, or transformers' ``Conv1D`` (GPT-2's linear layer with a transposed (in, out) weight)."""
    return isinstance(m, nn.Linear) or (type(m).__name__ == "Conv1D" and hasattr(m, "nf"))


def _linear_dims(m: nn.Module) -> tuple[int, int]:
    if isinstance(m, nn.Linear):
        return m.in_features, m.out_features
    weight = getattr(m, "weight")  # noqa: B009
    return int(weight.shape[0]), int(getattr(m, "nf"))  # noqa: B009


class HookCounter:
    """Context manager: count FLOPs of ``model`` with forward and full backward hooks.

    Example::

        with HookCounter(model) as hc:
            model(x).sum().backward()
        hc.result.forward, hc.result.backward
    """

    def __init__(self, model: nn.Module, *, backward: bool = True) -> None:
        self.model = model
        self.count_backward = backward
        self.result = FlopCount("hooks")
        self._handles: list[Any] = []
        self._names: dict[nn.Module, str] = {}
        self._fused: dict[nn.Module, bool] = {}

    # -- bookkeeping
    def _add(self, module: nn.Module, flops: int, phase: str, *, integer: bool = False) -> None:
        name = self._names.get(module, type(module).__name__)
        if integer:
            self.result.int_ops += flops
            return
        if phase == "forward" and _in_backward():
            phase = "recompute"
        setattr(self.result, phase, getattr(self.result, phase) + flops)
        self.result.by_module[name] = self.result.by_module.get(name, 0) + flops

    # -- forward formulas
    def _linear_fwd(self, m: nn.Module, args: tuple[Any, ...], out: Any) -> None:
        n_in, n_out = _linear_dims(m)
        self._add(m, F.linear_flops(_linear_tokens(args[0], n_in), n_in, n_out), "forward")

    def _conv_fwd(self, m: nn.Module, args: tuple[Any, ...], out: Tensor) -> None:
        self._add(m, self._conv_flops(m, args[0], out), "forward")

    @staticmethod
    def _conv_flops(m: nn.Module, x: Tensor, out: Tensor) -> int:
        assert isinstance(m, _CONV + _CONV_T)
        nd = len(m.kernel_size)
        batched = x.dim() == nd + 2
        return F.conv_flops_from_shapes(
            x.shape[0] if batched else 1, m.in_channels, m.out_channels, m.kernel_size,
            input_size=tuple(x.shape[-nd:]), output_size=tuple(out.shape[-nd:]), groups=m.groups,
            transposed=isinstance(m, _CONV_T),
        )

    def _attn_core_fwd(self, m: nn.Module, args: tuple[Any, ...], out: Tensor) -> None:
        q, k, v = args[:3]
        self._fused[m] = sdpa_is_fused(q, k, v, is_causal=bool(m.is_causal), enable_gqa=bool(m.enable_gqa))
        self._add(m, self._sdpa_flops(q, k, v), "forward")

    @staticmethod
    def _sdpa_flops(q: Tensor, k: Tensor, v: Tensor) -> int:
        b, h, t, d = q.shape
        return F.attention_flops(b, h, t, k.shape[-2], d, v_head_dim=v.shape[-1])

    def _mha_fwd(self, m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> None:
        assert isinstance(m, nn.MultiheadAttention)
        q, k, v = (args[i] if i < len(args) else kwargs[n] for i, n in enumerate(("query", "key", "value")))
        need_weights = bool(kwargs.get("need_weights", args[4] if len(args) > 4 else True))
        if q.dim() == 2:  # unbatched (L, E)
            n, lq, s = 1, q.shape[0], k.shape[0]
        elif m.batch_first:
            n, lq, s = q.shape[0], q.shape[1], k.shape[1]
        else:
            n, lq, s = q.shape[1], q.shape[0], k.shape[0]
        # need_weights=True takes the bmm (math) path; otherwise F.multi_head_attention_forward calls SDPA on
        # (N, H, L, E/H) tensors, fused or not as SDPA itself decides.
        h = m.num_heads
        fused = not need_weights and sdpa_is_fused(
            *(q.new_empty((n, h, t, m.embed_dim // h)).requires_grad_(q.requires_grad) for t in (lq, s, s)),
            is_causal=False,
        )
        self._mha_geometry[m] = (n, lq, s, q is k and k is v, fused)
        e = m.embed_dim
        proj = F.linear_flops(n * lq, e, e) + F.linear_flops(n * s, m.kdim, e) + F.linear_flops(n * s, m.vdim, e)
        flops = proj + F.attention_flops(n, h, lq, s, e // h) + F.linear_flops(n * lq, e, e)
        self._add(m, flops, "forward")

    def _int_fwd(self, m: nn.Module, args: tuple[Any, ...], out: Tensor) -> None:
        in_features, out_features = int(getattr(m, "in_features")), int(getattr(m, "out_features"))  # noqa: B009
        self._add(m, F.matmul_flops(_linear_tokens(args[0], in_features), in_features, out_features), "forward",
                  integer=True)

    # -- backward formulas
    def _linear_bwd(self, m: nn.Module, grad_in: tuple[Tensor | None, ...], grad_out: tuple[Tensor, ...]) -> None:
        n_in, n_out = _linear_dims(m)
        weight = getattr(m, "weight")  # noqa: B009
        flops = F.linear_backward_flops(_linear_tokens(grad_out[0], n_out), n_in, n_out,
                                        input_grad=grad_in[0] is not None, weight_grad=bool(weight.requires_grad))
        self._add(m, flops, "backward")

    def _conv_bwd(self, m: nn.Module, grad_in: tuple[Tensor | None, ...], grad_out: tuple[Tensor, ...]) -> None:
        x_shape = self._conv_inputs.get(m)
        if x_shape is None:
            return
        fwd = self._conv_flops(m, torch.empty(x_shape, device="meta"), grad_out[0])
        weight = getattr(m, "weight", None)
        flops = F.conv_backward_flops(fwd, input_grad=grad_in[0] is not None,
                                      weight_grad=bool(weight is not None and weight.requires_grad))
        self._add(m, flops, "backward")

    def _attn_core_bwd(self, m: nn.Module, grad_in: tuple[Tensor | None, ...], grad_out: tuple[Tensor, ...]) -> None:
        q, k, v = self._attn_inputs[m]
        b, h, t, d = q
        flops = F.attention_backward_flops(b, h, t, k[-2], d, v_head_dim=v[-1], recompute_scores=self._fused[m])
        self._add(m, flops, "backward")

    def _mha_bwd(self, m: nn.Module, grad_in: tuple[Tensor | None, ...], grad_out: tuple[Tensor | None, ...]) -> None:
        assert isinstance(m, nn.MultiheadAttention)
        n, lq, s, packed, fused = self._mha_geometry[m]
        e, h = m.embed_dim, m.num_heads
        needs = [g is not None for g in grad_in[:3]]
        total = 0
        for (t, a), need in zip(((n * lq, e), (n * s, m.kdim), (n * s, m.vdim)), needs, strict=True):
            # a packed (E -> 3E) projection takes one data-grad matmul, as large as the three separate ones
            total += F.linear_backward_flops(t, a, e, input_grad=need or (packed and any(needs)))
        total += F.attention_backward_flops(n, h, lq, s, e // h, recompute_scores=fused)
        total += F.linear_backward_flops(n * lq, e, e)  # out_proj
        self._add(m, total, "backward")

    # -- registration
    def __enter__(self) -> HookCounter:
        # A first layer whose input needs no gradient is exactly what the backward hooks must see; PyTorch warns.
        self._warnings = warnings.catch_warnings()
        self._warnings.__enter__()
        warnings.filterwarnings("ignore", message="Full backward hook is firing when gradients are computed")
        self.result = FlopCount("hooks")
        self._names = {mod: (name or type(mod).__name__) for name, mod in self.model.named_modules()}
        self._conv_inputs: dict[nn.Module, torch.Size] = {}
        self._attn_inputs: dict[nn.Module, tuple[torch.Size, ...]] = {}
        self._mha_geometry: dict[nn.Module, tuple[int, int, int, bool, bool]] = {}
        for module in self.model.modules():
            fwd: Callable[..., None] | None = None
            bwd: Callable[..., None] | None = None
            if _is_linear(module):
                fwd, bwd = self._linear_fwd, self._linear_bwd
            elif isinstance(module, _CONV + _CONV_T):
                fwd, bwd = self._conv_fwd, self._conv_bwd
                self._handles.append(module.register_forward_pre_hook(self._remember_conv_input))
            elif getattr(module, "torchledger_attention_core", False):
                fwd, bwd = self._attn_core_fwd, self._attn_core_bwd
                self._handles.append(module.register_forward_pre_hook(self._remember_attn_inputs))
            elif getattr(module, "torchledger_int_matmul", False):
                fwd = self._int_fwd
            elif isinstance(module, nn.MultiheadAttention):
                self._handles.append(module.register_forward_hook(self._mha_fwd, with_kwargs=True))
                if self.count_backward:
                    self._handles.append(module.register_full_backward_hook(self._mha_bwd))
                continue
            if fwd is not None:
                self._handles.append(module.register_forward_hook(fwd))
            if bwd is not None and self.count_backward:
                self._handles.append(module.register_full_backward_hook(bwd))
        return self

    def _remember_conv_input(self, m: nn.Module, args: tuple[Any, ...]) -> None:
        self._conv_inputs[m] = args[0].shape

    def _remember_attn_inputs(self, m: nn.Module, args: tuple[Any, ...]) -> None:
        self._attn_inputs[m] = tuple(a.shape for a in args[:3])

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._warnings.__exit__(None, None, None)


def count_with_hooks(model: nn.Module, step: Callable[[], Tensor], *, backward: bool = True) -> FlopCount:
    """Run ``step()`` (a forward returning a scalar loss) and, if ``backward``, its backward; count with hooks."""
    with HookCounter(model, backward=backward) as counter:
        loss = step()
        if backward:
            loss.backward()
    return counter.result

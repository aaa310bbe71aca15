"""The counters and the step meter for any ``nn.Module``, without the command line.

- :func:`count_flops`: the FLOPs of ``module(*inputs)`` (and its backward) as module hooks, the dispatcher's
  ``FlopCounterMode`` and, when asked, ``torch.profiler`` count them (:mod:`torchledger.counting`).
- :func:`measure_step`: the peak memory of one steady-state training step of the module (after the warm-up steps
  that create the optimizer state), broken down by category (:mod:`torchledger.measuring.memory`), on the CPU, on CUDA,
  or simulated under ``FakeTensorMode`` (nothing allocated).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_leaves

from torchledger.counting.model_count import count_every_way
from torchledger.counting.result import FlopCount
from torchledger.measuring.memory import MemoryMeasurement
from torchledger.measuring.training import Built, check_simulable, measure_built
from torchledger.workloads.train_step import TrainConfig, TrainStep, param_dtype

__all__ = ["FlopReport", "count_flops", "measure_step"]


@dataclass(frozen=True)
class FlopReport:
    """What each counter counted; ``profiler`` is None unless asked for. :meth:`figure` gives a counter's FLOPs:
    the forward's, or forward + backward with ``backward=True``."""

    backward: bool
    hooks: FlopCount
    dispatch: FlopCount
    profiler: FlopCount | None = None

    def figure(self, counter: str) -> int | None:
        counted = {"hooks": self.hooks, "dispatch": self.dispatch, "profiler": self.profiler}.get(counter, False)
        if counted is False:
            raise ValueError(f"counter={counter!r} must be one of hooks, dispatch, profiler")
        if counted is None:
            return None
        assert isinstance(counted, FlopCount)
        return counted.total if self.backward else counted.forward

    def to_dict(self) -> dict[str, Any]:
        return {"backward": self.backward, **{k: self.figure(k) for k in ("hooks", "dispatch", "profiler")}}


def _check_module(module: object) -> nn.Module:
    if not isinstance(module, nn.Module):
        raise ValueError(f"module={module!r} must be a torch.nn.Module")
    return module


def _scalar(output: object, backward: bool) -> Tensor:
    """What the backward starts from: the output's sum (a sum's backward is an expand: it adds no FLOPs)."""
    tensors = [t for t in tree_leaves(output) if isinstance(t, Tensor) and t.requires_grad]
    if backward and not tensors:
        raise ValueError("backward=True: the module's output does not require grad (no parameter or input does)")
    if not tensors:
        return torch.zeros(())
    total = tensors[0].sum()
    for t in tensors[1:]:
        total = total + t.sum()
    return total


def count_flops(module: nn.Module, *inputs: Any, backward: bool = False, profiler: bool = False) -> FlopReport:
    """Count the FLOPs of ``module(*inputs)``, and of its backward with ``backward=True`` (from the sum of the
    output's tensors), with module hooks and at the dispatcher in one pass, and with ``torch.profiler`` in a pass of
    its own when ``profiler=True``. The parameters' ``.grad`` are restored afterwards; inputs may be meta tensors
    (a module built on the meta device counts without allocating its weights)."""
    _check_module(module)
    for name, flag in (("backward", backward), ("profiler", profiler)):
        if not isinstance(flag, bool):
            raise ValueError(f"{name}={flag!r} must be True or False")
    params = list(module.parameters())
    grads = [p.grad for p in params]

    def step() -> Tensor:
        return _scalar(module(*inputs), backward)

    try:
        counted = count_every_way(module, step, backward=backward, profiler=profiler)
    finally:
        for p, g in zip(params, grads, strict=True):
            p.grad = g
    return FlopReport(backward=backward, hooks=counted["hooks"], dispatch=counted["dispatch"],  # type: ignore[arg-type]
                      profiler=counted["profiler"])


LossFn = Callable[[nn.Module, tuple[Tensor, ...]], Any]


def _as_batches(batches: object, grad_accum: int) -> list[tuple[Tensor, ...]]:
    if isinstance(batches, Tensor) or not isinstance(batches, Sequence) or isinstance(batches, (str, bytes)):
        raise ValueError(f"batches={type(batches).__name__}: must be a list of {grad_accum} micro-batch(es), each a "
                         "tensor or a tuple of tensors")
    out = [tuple(b) if isinstance(b, (tuple, list)) else (b,) for b in batches]
    if len(out) != grad_accum:
        raise ValueError(f"batches: got {len(out)} micro-batches for grad_accum={grad_accum}")
    for b in out:
        if not b or not all(isinstance(t, Tensor) for t in b):
            raise ValueError(f"batches: a micro-batch of {[type(t).__name__ for t in b]} must hold tensors only")
    return out


def _step_loss(loss_fn: LossFn) -> Callable[[nn.Module, tuple[Tensor, ...]], tuple[Tensor, Tensor]]:
    """TrainStep's (output, loss) from a ``loss_fn`` that returns the loss, or (output, loss)."""

    def run(model: nn.Module, batch: tuple[Tensor, ...]) -> tuple[Tensor, Tensor]:
        result = loss_fn(model, batch)
        if isinstance(result, tuple):
            output, loss = result
            return output, loss
        if not isinstance(result, Tensor):
            raise ValueError(f"loss_fn returned {type(result).__name__}: it must return the loss (a scalar tensor) "
                             "or (output, loss)")
        return result, result

    return run


def _moved(batches: list[tuple[Tensor, ...]], device: str, dtype: torch.dtype) -> list[tuple[Tensor, ...]]:
    """The micro-batches as new tensors on ``device``, floating ones in the parameters' ``dtype``."""
    return [tuple(t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype, copy=True) for t in b)
            for b in batches]


def _fake_copy(module: nn.Module, dtype: torch.dtype) -> nn.Module:
    """A copy of ``module`` whose parameters and buffers are fake tensors on the CPU (floating ones in ``dtype``):
    shapes only, nothing allocated, whatever device the module's own tensors are on (meta included)."""
    memo: dict[int, Any] = {}
    for p in module.parameters():
        fake = torch.empty(p.shape, dtype=dtype if p.is_floating_point() else p.dtype, device="cpu")
        memo[id(p)] = nn.Parameter(fake, requires_grad=p.requires_grad)
    for b in module.buffers():
        memo[id(b)] = torch.empty(b.shape, dtype=dtype if b.is_floating_point() else b.dtype, device="cpu")
    return copy.deepcopy(module, memo)


def measure_step(
    module: nn.Module,
    loss_fn: LossFn,
    batches: Sequence[Tensor | tuple[Tensor, ...]],
    *,
    optimizer: str = "adamw",
    optimizer_impl: str = "foreach",
    precision: str = "32-true",
    grad_accum: int = 1,
    clip_grad_norm: float | None = None,
    device: str = "cpu",
    simulate: bool = False,
) -> MemoryMeasurement:
    """The measured peak of one steady-state training step of ``module``: warm-up steps create the optimizer
    state (:meth:`TrainStep.warm_up`), then the next step is measured; ``peak`` and ``by_category`` (params,
    grads, optimizer, activations, temporaries; on CUDA also ``allocator_overhead``), whose sum is the peak.

    ``loss_fn(module, batch)`` returns the loss (or ``(output, loss)``); ``batches`` holds the step's ``grad_accum``
    micro-batches, each a tensor or a tuple of tensors (floating ones are cast to the parameters' dtype). The step
    is :class:`torchledger.workloads.train_step.TrainStep`: autocast for ``*-mixed``, the loss scaled by
    1/``grad_accum``, optional clipping, the optimizer step and ``zero_grad(set_to_none=True)``. A copy of
    ``module`` is trained (on ``device``, in the recipe's parameter dtype); the module itself is left as it was.
    ``simulate=True`` runs the step under ``FakeTensorMode`` on the CPU: nothing is allocated, so a module of any
    size (built on the meta device, say) is measured from its shapes. Bad arguments raise ValueError naming the
    argument and the value.
    """
    _check_module(module)
    if not callable(loss_fn):
        raise ValueError(f"loss_fn={loss_fn!r} must be callable: loss_fn(module, batch) -> loss")
    config = TrainConfig(precision, optimizer, optimizer_impl, "none", grad_accum, clip_grad_norm)
    micro_batches = _as_batches(batches, grad_accum)
    if not isinstance(simulate, bool):
        raise ValueError(f"simulate={simulate!r} must be True or False")
    if not isinstance(device, str) or device.split(":")[0] not in ("cpu", "cuda"):
        raise ValueError(f"device={device!r} must be 'cpu' or 'cuda' (or 'cuda:N')")
    if not any(True for _ in module.parameters()):
        raise ValueError(f"module={type(module).__name__}: has no parameters to train")
    loss, dtype = _step_loss(loss_fn), param_dtype(precision)
    if simulate:
        if device != "cpu":
            raise ValueError(f"device={device!r} with simulate=True: the simulation runs on the CPU's fake tensors")
        check_simulable(precision)
        from torch._subclasses.fake_tensor import FakeTensorMode

        with FakeTensorMode(allow_non_fake_inputs=True) as mode:

            def build_fake() -> Built:
                model = _fake_copy(module, dtype)
                fakes = _moved([tuple(mode.from_tensor(t) for t in b) for b in micro_batches], "cpu", dtype)
                return model, TrainStep(model, config, loss), fakes

            return measure_built(build_fake, "simulated")

    def build() -> Built:
        # a copy of the module, in the recipe's dtype; the batches moved here are the caller's (left out of the peak)
        model = copy.deepcopy(module).to(device=device, dtype=dtype)
        return model, TrainStep(model, config, loss), _moved(micro_batches, device, dtype)

    return measure_built(build, device)

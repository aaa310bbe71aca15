"""Measuring the peak memory of a callable: the CUDA caching allocator, and a live-storage tracker elsewhere.

- CUDA: the allocator's own statistics. The cuBLAS workspace is created before the baseline (one matmul), the peak
  counters are reset, and the peak of allocated bytes is read after a synchronize. Reserved bytes (what the
  allocator holds from the driver, free blocks included) are reported beside it; the CUDA context is in neither.
- CPU, meta and FakeTensor: :class:`StorageTracker`, a TorchDispatchMode that follows every tensor storage an op
  creates until it is freed, and keeps the largest total with its breakdown into parameters, gradients, optimizer
  state, activations (tensors autograd saved for backward) and temporaries. Under ``FakeTensorMode`` nothing is
  allocated, so the same tracker predicts the peak of a model of any size.

Why not ``torch.distributed._tools.mem_tracker.MemTracker``: it refuses a second forward of the same module within
one tracking session (gradient accumulation runs k of them per step) and is a private API; the tracker here needs
no module hooks and gives the same totals on the cases both can run (checked in the tests).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode, is_traceable_wrapper_subclass
from torch.utils._pytree import tree_leaves

CATEGORIES = ("params", "grads", "optimizer", "activations", "temporaries")


@dataclass
class MemoryMeasurement:
    """Peak bytes of a call (model states included where they were tracked), with its breakdown at the peak."""

    device: str
    peak: int
    by_category: dict[str, int] = field(default_factory=dict)
    baseline: int = 0
    reserved_peak: int | None = None
    outside_allocator: int | None = None  # CUDA: device memory in use that the allocator does not hold


def _storage_of(t: Tensor) -> Any:
    return t.untyped_storage()


def _plain_tensors(t: Tensor) -> list[Tensor]:
    """The tensors that own memory: a wrapper subclass (DTensor, FSDP2's sharded parameters) holds inner tensors,
    and its own storage reports the global shape, not the bytes this process holds."""
    wrapper: Any = t
    if is_traceable_wrapper_subclass(wrapper):
        attrs, _ = wrapper.__tensor_flatten__()
        inner = (getattr(wrapper, a) for a in attrs)
        return [leaf for x in inner if isinstance(x, Tensor) for leaf in _plain_tensors(x)]
    return [t]


class StorageTracker(TorchDispatchMode):
    """Follows tensor storages created under it; ``peak`` is the largest total of live tracked bytes.

    Call :meth:`track` first with the model and optimizer so that their existing parameters, gradients and state
    count from the start. Inputs created before the block are not counted unless an op outputs their storage.
    """

    def __init__(self) -> None:
        super().__init__()
        self._live: dict[int, int] = {}  # storage key -> bytes
        self._refs: dict[int, Any] = {}
        self._saved: set[int] = set()
        self._model: nn.Module | None = None
        self._optimizer: torch.optim.Optimizer | None = None
        self.current = 0
        self.peak = 0
        self.peak_breakdown: dict[str, int] = {}
        self._hooks: Any = None

    # -- storage bookkeeping
    def _add(self, t: Tensor) -> None:
        for leaf in _plain_tensors(t):
            self._add_plain(leaf)

    def _add_plain(self, t: Tensor) -> None:
        st = _storage_of(t)
        key = st._cdata
        size = int(st.nbytes())
        if key in self._live:
            if size != self._live[key]:  # grown back in place (resize_) and written by this op
                self.current += size - self._live[key]
                self._live[key] = size
                self._maybe_peak()
            return
        self._live[key] = size
        self._refs[key] = weakref.ref(st, self._on_collect(key))
        self.current += size
        self._maybe_peak()

    def _maybe_peak(self) -> None:
        if self.current <= self.peak:
            return
        # Storages can shrink in place without an op (FSDP2 frees unsharded parameters with resize_(0)): re-read
        # every live size before taking a new peak.
        total = 0
        for key, ref in self._refs.items():
            st = ref()
            if st is not None:
                self._live[key] = int(st.nbytes())
                total += self._live[key]
        self.current = total
        if self.current > self.peak:
            self.peak = self.current
            self.peak_breakdown = self._categorize()

    def _on_collect(self, key: int) -> Callable[[Any], None]:
        return lambda _ref: self._free(key)

    def _free(self, key: int) -> None:
        size = self._live.pop(key, None)
        self._refs.pop(key, None)
        self._saved.discard(key)
        if size is not None:
            self.current -= size

    def _categorize(self) -> dict[str, int]:
        def keys(tensors: Iterable[Tensor | None]) -> set[int]:
            return {_storage_of(leaf)._cdata for t in tensors if isinstance(t, Tensor) for leaf in _plain_tensors(t)}

        params: set[int] = set()
        grads: set[int] = set()
        optim: set[int] = set()
        if self._model is not None:
            model_params = list(self._model.parameters())
            params = keys([*model_params, *self._model.buffers()])
            grads = keys(p.grad for p in model_params)
        if self._optimizer is not None:
            optim = keys(v for state in self._optimizer.state.values() for v in state.values())
        out = dict.fromkeys(CATEGORIES, 0)
        for key, size in self._live.items():
            if key in params:
                out["params"] += size
            elif key in grads:
                out["grads"] += size
            elif key in optim:
                out["optimizer"] += size
            elif key in self._saved:
                out["activations"] += size
            else:
                out["temporaries"] += size
        return out

    def track(self, model: nn.Module | None = None, optimizer: torch.optim.Optimizer | None = None) -> StorageTracker:
        """Count ``model``'s parameters, buffers and gradients and ``optimizer``'s state from the start."""
        self._model, self._optimizer = model, optimizer
        tensors: list[Tensor] = []
        if model is not None:
            tensors += [*model.parameters(), *model.buffers()]
            tensors += [p.grad for p in model.parameters() if p.grad is not None]
        if optimizer is not None:
            tensors += [v for state in optimizer.state.values() for v in state.values() if isinstance(v, Tensor)]
        for t in tensors:
            self._add(t)
        self.peak = self.current
        self.peak_breakdown = self._categorize()
        return self

    # -- the mode
    def __torch_dispatch__(self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, Tensor):
                self._add(t)
        return out

    def _pack(self, t: Tensor) -> Tensor:
        for leaf in _plain_tensors(t):
            key = _storage_of(leaf)._cdata
            if key in self._live:
                self._saved.add(key)
        return t

    def __enter__(self) -> StorageTracker:
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._hooks.__enter__()
        super().__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        super().__exit__(*exc)
        self._hooks.__exit__(*exc)


def measure_cpu(fn: Callable[[], object], model: nn.Module | None = None,
                optimizer: torch.optim.Optimizer | None = None, *, device: str = "cpu") -> MemoryMeasurement:
    """Peak live-storage bytes of ``fn()`` (model states included), tracked at the dispatcher."""
    tracker = StorageTracker().track(model, optimizer)
    baseline = tracker.current
    with tracker:
        fn()
    return MemoryMeasurement(device=device, peak=tracker.peak, by_category=dict(tracker.peak_breakdown),
                             baseline=baseline)


def cuda_warmup(device: torch.device | str = "cuda") -> None:
    """Create the cuBLAS workspace (about 8.5 MB on the first matmul, never freed) before any baseline is taken."""
    a = torch.ones(16, 16, device=device)
    (a @ a).sum().item()
    torch.cuda.synchronize(device)


def cuda_allocated(device: torch.device | str = "cuda") -> int:
    torch.cuda.synchronize(device)
    return int(torch.cuda.memory_allocated(device))


def measure_cuda(fn: Callable[[], object], *, base: int, device: torch.device | str = "cuda") -> MemoryMeasurement:
    """Peak allocated bytes of ``fn()`` above ``base`` (take it with :func:`cuda_allocated` before building the
    model, after :func:`cuda_warmup`), so that the model states it allocated count in the peak."""
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    stats = torch.cuda.memory_stats(device)
    free, total = torch.cuda.mem_get_info(device)
    return MemoryMeasurement(
        device=str(device), peak=int(stats["allocated_bytes.all.peak"]) - base, baseline=base,
        reserved_peak=int(stats["reserved_bytes.all.peak"]),
        # the CUDA context (and any other process on the device): used memory the caching allocator does not hold
        outside_allocator=int(total - free) - int(torch.cuda.memory_reserved(device)),
    )

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
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode, is_traceable_wrapper_subclass
from torch.utils._pytree import tree_leaves

from torchledger.formulas.device import allocator_block_bytes

CATEGORIES = ("params", "grads", "optimizer", "activations", "temporaries")
# CUDA only: what the caching allocator holds at its peak beyond the tracked tensors (512-byte rounding of every
# block, library workspaces made during the step, cuDNN's per-algorithm workspaces, the step's inputs excepted)
ALLOCATOR_OVERHEAD = "allocator_overhead"


@dataclass
class MemoryMeasurement:
    """Peak bytes of a call (model states included where they were tracked), with its breakdown at the peak."""

    device: str
    peak: int
    by_category: dict[str, int] = field(default_factory=dict)
    baseline: int = 0
    reserved_peak: int | None = None
    outside_allocator: int | None = None  # CUDA: device memory in use that the allocator does not hold
    peak_op: str = ""  # the op whose output made the tracked peak ("" when not tracked)
    tracked_peak: int | None = None  # CUDA: the storage tracker's peak beside the allocator's
    library_workspaces: int | None = None  # CUDA: bytes cuBLAS made at warm-up, before the baseline
    # a Mixture of Experts: the rows each expert of each block received in the measured call (its last forward)
    routing: list[list[int]] | None = None


@dataclass(frozen=True)
class MemoryEvent:
    """One change of tracked memory: a storage of ``size`` bytes made (``alloc``) or released (``free``);
    ``key`` identifies the storage while it lives, ``op`` is the last op dispatched before the change."""

    action: str
    key: int
    size: int
    op: str


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


def _op_name(op: Any) -> str:
    return str(getattr(op, "__name__", op))


class StorageTracker(TorchDispatchMode):
    """Follows tensor storages created under it; ``peak`` is the largest total of live tracked bytes.

    Call :meth:`track` first with the model and optimizer so that their existing parameters, gradients and state
    count from the start. Inputs created before the block are not counted unless an op outputs their storage.
    """

    def __init__(self, *, record_history: bool = False) -> None:
        super().__init__()
        self.record_history = record_history
        self.history: list[MemoryEvent] = []
        self._op: Any = "(alive before the step)"  # the last op dispatched (named only where it is read)
        self.peak_op = ""
        self._live: dict[int, int] = {}  # storage key -> bytes
        self._refs: dict[int, Any] = {}
        self._saved: set[int] = set()
        self._model: nn.Module | None = None
        self._optimizer: torch.optim.Optimizer | None = None
        self._extra: dict[str, Callable[[], Iterable[Tensor]]] = {}
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
                self._record("free", key, self._live[key])
                self._record("alloc", key, size)
                self.current += size - self._live[key]
                self._live[key] = size
                self._maybe_peak()
            return
        self._live[key] = size
        self._refs[key] = weakref.ref(st, self._on_collect(key))
        self.current += size
        self._record("alloc", key, size)
        self._maybe_peak()

    def _record(self, action: str, key: int, size: int) -> None:
        if self.record_history and size:
            # no torch call here: frees arrive in weakref callbacks, during a storage's destruction
            self.history.append(MemoryEvent(action, key, size, _op_name(self._op)))

    def _maybe_peak(self) -> None:
        if self.current <= self.peak:
            return
        # Storages can shrink in place without an op (FSDP2 frees unsharded parameters with resize_(0)): re-read
        # every live size before taking a new peak.
        total = 0
        for key, ref in self._refs.items():
            st = ref()
            if st is not None:
                size = int(st.nbytes())
                if size != self._live[key]:  # shrunk in place without an op (resize_(0))
                    self._record("free", key, self._live[key])
                    if size:
                        self._record("alloc", key, size)
                self._live[key] = size
                total += size
        self.current = total
        if self.current > self.peak:
            self.peak = self.current
            self.peak_breakdown = self._categorize()
            self.peak_op = _op_name(self._op)

    def _on_collect(self, key: int) -> Callable[[Any], None]:
        return lambda _ref: self._free(key)

    def _free(self, key: int) -> None:
        size = self._live.get(key)
        if size is not None:
            self._record("free", key, size)
            del self._live[key]
            self.current -= size
        self._refs.pop(key, None)
        self._saved.discard(key)

    def _categorize_keys(self) -> dict[str, set[int]]:
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
        return {"params": params, "grads": grads, "optimizer": optim}

    def add_category(self, name: str, tensors: Callable[[], Iterable[Tensor]]) -> StorageTracker:
        """File the storages of ``tensors()`` (called at each new peak) under ``name``: for example the KV cache
        that a prefill fills, which is otherwise a temporary."""
        self._extra[name] = tensors
        return self

    def _categorize(self) -> dict[str, int]:
        cats = self._categorize_keys()
        params, grads, optim = cats["params"], cats["grads"], cats["optimizer"]
        extra = {name: {_storage_of(leaf)._cdata for t in fn() for leaf in _plain_tensors(t)}
                 for name, fn in self._extra.items()}
        out = dict.fromkeys([*CATEGORIES, *self._extra], 0)
        for key, size in self._live.items():
            named = next((name for name, ks in extra.items() if key in ks), None)
            if named is not None:
                out[named] += size
            elif key in params:
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
        self.peak_op = _op_name(self._op)
        return self

    # -- the mode
    def __torch_dispatch__(self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None) -> Any:
        self._op = func
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
                optimizer: torch.optim.Optimizer | None = None, *, device: str = "cpu",
                tracker: StorageTracker | None = None, snapshot: str | Path | None = None) -> MemoryMeasurement:
    """Peak live-storage bytes of ``fn()`` (model states included), tracked at the dispatcher.

    Pass a ``StorageTracker(record_history=True)`` as ``tracker`` to keep its event history afterwards, or a path
    as ``snapshot`` to write that history as a memory_viz snapshot (see :mod:`torchledger.measuring.snapshot`)."""
    tracker = tracker or StorageTracker()
    if snapshot is not None:
        tracker.record_history = True
    tracker.track(model, optimizer)
    baseline = tracker.current
    with tracker:
        fn()
    if snapshot is not None:
        from torchledger.measuring.snapshot import tracker_snapshot, write_snapshot

        write_snapshot(tracker_snapshot(tracker, device=device), snapshot)
    return MemoryMeasurement(device=device, peak=tracker.peak, by_category=dict(tracker.peak_breakdown),
                             baseline=baseline, peak_op=tracker.peak_op)


def cuda_warmup(device: torch.device | str = "cuda") -> int:
    """Create the cuBLAS workspaces before any baseline is taken; returns the bytes that made.

    cuBLAS keeps a workspace per handle and stream, allocated through the caching allocator and never freed by
    ``empty_cache()``: 32 MiB on Hopper, 8,519,680 B (``:4096:2:16:8``) before it (PyTorch's CublasHandlePool.cpp,
    ``CUBLAS_WORKSPACE_CONFIG`` overrides). Handles are per thread, and the autograd engine runs the backward of
    CUDA tensors on a device thread of its own, so a forward matmul makes the calling thread's workspace and a
    backward matmul the autograd thread's: both run here. Without the second, a process's first training step
    shows one more workspace than a steady-state one (LLaMA-7B measured 33,562,624 B above its prediction on an
    H200, 32 MiB of it this workspace).
    """
    torch.cuda.synchronize(device)
    before = int(torch.cuda.memory_allocated(device))
    a = torch.ones(16, 16, device=device, requires_grad=True)
    bias = torch.ones(16, device=device, requires_grad=True)
    # a plain matmul (cuBLAS) and a biased Linear (addmm through cuBLASLt's bias epilogue, whose workspace is its
    # own unless PyTorch unifies the two), forward on this thread and backward on the autograd engine's
    (a @ a + torch.nn.functional.linear(a, a, bias)).sum().backward()
    torch.cuda.synchronize(device)
    del a, bias
    return int(torch.cuda.memory_allocated(device)) - before


def cuda_allocated(device: torch.device | str = "cuda") -> int:
    torch.cuda.synchronize(device)
    return int(torch.cuda.memory_allocated(device))


def measure_cuda(fn: Callable[[], object], *, base: int, device: torch.device | str = "cuda",
                 model: nn.Module | None = None, optimizer: torch.optim.Optimizer | None = None,
                 tracker: StorageTracker | None = None, inputs: Iterable[Tensor] = (),
                 library_workspaces: int | None = None, snapshot: str | Path | None = None) -> MemoryMeasurement:
    """Peak allocated bytes of ``fn()`` above ``base`` (take it with :func:`cuda_allocated` before building the
    model, after :func:`cuda_warmup`), so that the model states it allocated count in the peak.

    The storage tracker runs beside the allocator (it is a dispatch mode: it works on any device), so the peak is
    also broken down by category; ``allocator_overhead`` is the allocator's peak less the tracked peak. The bytes
    of ``inputs`` (the step's batches, made after ``base`` by the caller) are left out, as on the CPU."""
    tracker = (tracker or StorageTracker()).track(model, optimizer)
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in inputs}  # views share one
    caller = sum(allocator_block_bytes(n) for n in storages.values())
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    at_start = int(torch.cuda.memory_allocated(device))
    if snapshot is not None:
        torch.cuda.memory._record_memory_history(max_entries=1_000_000, device=device)
    try:
        with tracker:
            fn()
        torch.cuda.synchronize(device)
        if snapshot is not None:
            from torchledger.measuring.snapshot import write_snapshot

            data = torch.cuda.memory._snapshot(device)
            data["torchledger"] = {"source": "CUDA caching allocator", "device": str(device),
                                   "device_index": torch.device(device).index or 0,
                                   "allocated_at_start": at_start, "base": base, "inputs": caller}
            write_snapshot(data, snapshot)
    finally:
        if snapshot is not None:
            torch.cuda.memory._record_memory_history(enabled=None, device=device)
    stats = torch.cuda.memory_stats(device)
    free, total = torch.cuda.mem_get_info(device)
    peak = int(stats["allocated_bytes.all.peak"]) - base - caller
    by_category = dict(tracker.peak_breakdown)
    by_category[ALLOCATOR_OVERHEAD] = peak - tracker.peak
    return MemoryMeasurement(
        device=str(device), peak=peak, baseline=base, by_category=by_category,
        reserved_peak=int(stats["reserved_bytes.all.peak"]),
        # the CUDA context (and any other process on the device): used memory the caching allocator does not hold
        outside_allocator=int(total - free) - int(torch.cuda.memory_reserved(device)),
        peak_op=tracker.peak_op, tracked_peak=tracker.peak, library_workspaces=library_workspaces,
    )

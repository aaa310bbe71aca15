"""What a training step holds on a CUDA device beyond what the same step holds on the CPU, term by term.

Each term names the mechanism in PyTorch's source that makes it, and is pinned by a CPU-runnable test to the
figure of a real GPU run it explains (``benchmarks/verification/test_device_terms.py``, replaying
``results/cuda-nvidia-h200/memory-cases.jsonl``). The terms are chosen by device the way
``recompute_attention_scores`` is chosen from SDPA's own backend choice: :func:`device_terms` says which apply.

- **LayerNorm statistics.** CUDA's ``native_layer_norm`` keeps its mean and rstd in fp32 whatever the input's
  dtype; the CPU kernel keeps them in a 16-bit input's own dtype.
- **Allocation rounding.** The caching allocator rounds every request up to a multiple of 512 B (``kMinBlockSize``
  in ``c10/cuda/CUDACachingAllocator.cpp``), and ``memory_allocated`` counts the rounded size.
- **cuBLAS workspaces.** cuBLAS keeps one workspace per handle and stream, allocated through the caching allocator
  and kept for the life of the process: 32 MiB on Hopper (compute capability 9.x), ``:4096:2:16:8`` = 8,519,680 B
  before it (``parseChosenWorkspaceSize`` in ``aten/src/ATen/cuda/CublasHandlePool.cpp``;
  ``CUBLAS_WORKSPACE_CONFIG`` overrides). Handles are per thread, and the autograd engine runs a CUDA backward on a
  device thread of its own, so training holds two: the caller's and the autograd thread's.
- **Fused RMSNorm.** On CUDA ``F.rms_norm`` runs one fused kernel (``_fused_rms_norm``), which saves for backward
  its input as it is and the fp32 reciprocal RMS; the composite CPU path upcasts the input to fp32 and saves that
  copy and the fp32 normalized tensor.
- **log_softmax of 16-bit logits under autocast.** CUDA's autocast gives ``log_softmax`` (which cross-entropy calls)
  an fp32 output dtype instead of casting its input (the ``fp32_set_opt_dtype`` policy of
  ``aten/src/ATen/autocast_mode.cpp``), and the CUDA kernel reads the 16-bit logits directly (``half_to_float``);
  its backward writes the logits' gradient in their 16-bit dtype. On the CPU the logits are first copied to fp32,
  and the backward makes an fp32 gradient that is then cast down: at the start of the backward the CPU holds
  B x T x V x 4 bytes of gradient where CUDA holds B x T x V x 2.
"""

from __future__ import annotations

from dataclasses import dataclass

from ._validate import one_of

ALLOCATOR_BLOCK = 512
HOPPER_CUBLAS_WORKSPACE = 32 * 2**20
DEFAULT_CUBLAS_WORKSPACE = (4096 * 2 + 16 * 8) * 1024  # ":4096:2:16:8": two 4,096 KiB and eight 16 KiB chunks


def allocator_block_bytes(nbytes: int) -> int:
    """What the CUDA caching allocator counts for a request of ``nbytes``: rounded up to a multiple of 512 B."""
    if nbytes < 0:
        raise ValueError(f"nbytes={nbytes} must be >= 0")
    return -(-nbytes // ALLOCATOR_BLOCK) * ALLOCATOR_BLOCK


def cublas_workspace_bytes(compute_capability: tuple[int, int]) -> int:
    """Bytes of one cuBLAS workspace (one handle and stream) on a GPU of ``compute_capability``."""
    major = compute_capability[0]
    if not isinstance(major, int) or major < 1:
        raise ValueError(f"compute_capability={compute_capability!r} must be (major, minor) with major >= 1")
    return HOPPER_CUBLAS_WORKSPACE if major == 9 else DEFAULT_CUBLAS_WORKSPACE


@dataclass(frozen=True)
class DeviceTerms:
    """Which device-specific behaviours a prediction for ``device`` includes (see the module docstring)."""

    device: str
    fused_rms_norm: bool
    log_softmax_half_to_float: bool
    allocation_rounding: int
    fp32_layer_norm_stats: bool

    def round(self, nbytes: int) -> int:
        """``nbytes`` as the device's allocator counts it."""
        return allocator_block_bytes(nbytes) if self.allocation_rounding > 1 else nbytes


def device_terms(device: str) -> DeviceTerms:
    """The terms of ``device`` (``cpu`` or ``cuda``; ``simulated`` and ``meta`` behave as the CPU they run on)."""
    kind = one_of("device", device.split(":")[0], ("cpu", "cuda", "simulated", "meta"))
    cuda = kind == "cuda"
    return DeviceTerms(device=kind, fused_rms_norm=cuda, log_softmax_half_to_float=cuda,
                       allocation_rounding=ALLOCATOR_BLOCK if cuda else 1, fp32_layer_norm_stats=cuda)

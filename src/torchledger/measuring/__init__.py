"""Measuring what a workload does: peak memory (CUDA allocator, live-storage tracker, FakeTensor simulation)."""

from torchledger.measuring.memory import (
    CATEGORIES,
    MemoryMeasurement,
    StorageTracker,
    cuda_allocated,
    cuda_warmup,
    measure_cpu,
    measure_cuda,
)

__all__ = [
    "CATEGORIES", "MemoryMeasurement", "StorageTracker", "cuda_allocated", "cuda_warmup", "measure_cpu",
    "measure_cuda",
]

"""Each CUDA term of :mod:`torchledger.formulas.device`, pinned to the H200 figure it explains.

The figures are the first H200 run's (results/cuda-nvidia-h200/memory-cases.jsonl, torch 2.11 + CUDA 13.0): the
same configuration predicted without the term (the CPU's behaviour) misses the measurement; with it, the prediction
lands on it. These run on any machine.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from torchledger.formulas.device import (
    DEFAULT_CUBLAS_WORKSPACE,
    allocator_block_bytes,
    cublas_workspace_bytes,
    device_terms,
)
from torchledger.measuring.training import MemoryCase, relative_error

RECORDS = Path(__file__).resolve().parents[2] / "results" / "cuda-nvidia-h200" / "memory-cases.jsonl"


def _h200(workload: str, **config: Any) -> tuple[MemoryCase, dict[str, Any]]:
    for line in RECORDS.read_text().splitlines():
        record = json.loads(line)
        case = record["case"]
        if case["workload"] == workload and all(case[k] == v for k, v in config.items()) and "measured" in record:
            return MemoryCase.from_record(case), record
    raise LookupError(f"no measured H200 record of {workload} {config}")


def test_allocation_rounding() -> None:
    # kMinBlockSize = 512 in c10/cuda/CUDACachingAllocator.cpp
    assert [allocator_block_bytes(n) for n in (0, 1, 4, 511, 512, 513, 1025)] == [0, 512, 512, 512, 512, 1024, 1536]
    assert device_terms("cuda").round(4) == 512 and device_terms("cpu").round(4) == 4
    with pytest.raises(ValueError, match="nbytes=-1"):
        allocator_block_bytes(-1)


def test_cublas_workspace_sizes() -> None:
    # CublasHandlePool.cpp: ":4096:8" on Hopper = 8 chunks of 4,096 KiB; ":4096:2:16:8" before it
    assert cublas_workspace_bytes((9, 0)) == 8 * 4096 * 1024 == 32 * 2**20
    assert cublas_workspace_bytes((8, 0)) == DEFAULT_CUBLAS_WORKSPACE == 2 * 4096 * 1024 + 8 * 16 * 1024
    # the size PyTorch issue #95668 saw left allocated by one Linear on an A10G (compute capability 8.6)
    assert cublas_workspace_bytes((8, 6)) == 8_519_680
    with pytest.raises(ValueError, match="compute_capability"):
        cublas_workspace_bytes((0, 0))


def test_autograd_thread_workspace_explains_llama_7b() -> None:
    # LLaMA-7B, 1 x 512, bf16-true AdamW, `torchledger measure` in a fresh process: the autograd thread's workspace
    # was made by the warm-up step's backward, after the baseline, and is inside the measured peak
    case, record = _h200("llama-7b")
    measured = record["measured"]["peak"]
    predicted = case.predict("cuda").peak
    assert measured - predicted == pytest.approx(cublas_workspace_bytes((9, 0)), rel=0.01)
    assert relative_error(predicted + cublas_workspace_bytes((9, 0)), measured) < 1e-5


def test_fused_rms_norm_explains_llama_bf16() -> None:
    # llama-tiny 4 x 128, bf16-true, fused AdamW: the CPU's composite rms_norm saves an fp32 copy and the fp32
    # normalized tensor (8 B per element) where CUDA's fused kernel saves the bf16 input (2 B): 6 B x 512 tokens x
    # 128 x 5 norms (2 blocks x 2, the final norm) = 1,966,080 B fewer on CUDA
    case, record = _h200("llama-tiny", precision="bf16-true", optimizer_impl="fused")
    measured = record["measured"]["peak"]
    without = case.predict("cpu").peak
    assert without - measured == pytest.approx(6 * 512 * 128 * 5, rel=0.02)
    assert relative_error(case.predict("cuda").peak, measured) < 0.001


def test_log_softmax_half_to_float_explains_gpt_16_mixed() -> None:
    # gpt-tiny 4 x 128, 16-mixed SGD with clipping: at the start of the backward the CPU holds the fp32 gradient of
    # the logits (512 tokens x 1,000 x 4 B) where CUDA's log_softmax backward writes it in fp16 (x 2 B)
    case, record = _h200("gpt-tiny", precision="16-mixed", optimizer="sgd")
    measured = record["measured"]["peak"]
    without = case.predict("cpu").peak
    assert without - measured == pytest.approx(512 * 1000 * 2, rel=0.02)
    assert relative_error(case.predict("cuda").peak, measured) < 0.001


def test_both_terms_explain_llama_mixed() -> None:
    # llama-tiny bf16-mixed AdamW: the residual stream is fp32, so the fused norm saves no fp32 normalized tensor
    # (4 B x 512 x 128 x 5), and the logits' gradient is bf16 (2 B x 512 x 1,000)
    case, record = _h200("llama-tiny", precision="bf16-mixed", optimizer_impl="foreach")
    measured = record["measured"]["peak"]
    assert case.predict("cpu").peak - measured == pytest.approx(4 * 512 * 128 * 5 + 2 * 512 * 1000, rel=0.02)
    assert relative_error(case.predict("cuda").peak, measured) < 0.001


def test_unknown_device_is_refused() -> None:
    with pytest.raises(ValueError, match="device='tpu'"):
        device_terms("tpu")


def test_simulated_and_meta_take_the_cpu_terms() -> None:
    # FakeTensorMode runs the CPU's kernels: a simulated step is predicted as a CPU one (a 16-bit LayerNorm keeps its
    # statistics in 16 bits there); only CUDA keeps them in fp32
    from torchledger.measuring.training import MemoryCase
    from torchledger.workloads.train_step import TrainConfig

    case = MemoryCase("gpt-tiny", 4, TrainConfig("bf16-true"), seq_len=128)
    assert case.predict("simulated").peak == case.predict("meta").peak == case.predict("cpu").peak
    assert device_terms("cuda").fp32_layer_norm_stats and not device_terms("simulated").fp32_layer_norm_stats

"""Recorded GPU memory figures replayed against today's prediction, on any machine.

Every memory case a GPU run measured is kept under ``results/``: in ``results/<device>/memory-cases.jsonl`` (one
record per case: its configuration, the device, the measured peak, or the interval a passing check allows) and in
the ``extra_info`` of the benchmark JSON files (``memory_case``, ``peak_memory``). Each becomes one test here, so a
change to the formulas that breaks agreement with a real GPU fails on a CPU-only machine.

Tolerance: 3% on CUDA, 2% for the real-size cases (a peak above 1 GiB), as the measured verification holds them.
A case whose gap is not yet explained is an expected failure naming the unexplained part; it is strict, so the day
the formulas explain it, the mark must go.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from torchledger.formulas.device import cublas_workspace_bytes
from torchledger.measuring.training import MemoryCase, predict_inference, relative_error

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "results"
REAL_SIZE = 2**30


def _case_id(case: dict[str, Any]) -> str:
    if case.get("kind") == "inference":
        return f"prefill-{case['workload']}-{case['precision']}-{case['batch']}x{case['seq_len']}"
    clip = "-clip" if case.get("clip_grad_norm") else ""
    shape = f"{case['batch']}x{case['seq_len']}" if case.get("seq_len") else f"b{case['batch']}"
    return (f"{case['workload']}-{shape}-{case['precision']}-{case['optimizer']}-{case['optimizer_impl']}-"
            f"ckpt_{case['checkpointing']}-acc{case['grad_accum']}{clip}")


def _records() -> list[tuple[str, dict[str, Any]]]:
    out: list[tuple[str, dict[str, Any]]] = []
    for path in sorted(RESULTS.glob("*/memory-cases.jsonl")):
        for line in path.read_text().splitlines():
            if line.strip():
                record = json.loads(line)
                out.append((f"{path.parent.name}:{_case_id(record['case'])}", record))
    for path in sorted(RESULTS.glob("*/*/*.json")):
        try:
            run = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        for bench in run.get("benchmarks", []) if isinstance(run, dict) else []:
            info = bench.get("extra_info") or {}
            if isinstance(info.get("memory_case"), dict) and isinstance(info.get("peak_memory"), int):
                gpus = (run.get("machine_info") or {}).get("torchledger", {}).get("gpus") or []
                device = {"name": gpus[0].get("name"), "compute_capability": gpus[0].get("compute_capability")} \
                    if gpus else {"name": "cpu"}
                out.append((f"{path.parent.parent.name}:{_case_id(info['memory_case'])}", {
                    "source": f"{path.relative_to(ROOT)}::{bench.get('name')}", "case": info["memory_case"],
                    "device": device, "measured": {"peak": info["peak_memory"]}}))
    seen: dict[str, int] = {}
    unique = []
    for rid, record in out:  # the same configuration measured twice keeps both, numbered
        seen[rid] = seen.get(rid, 0) + 1
        unique.append((rid if seen[rid] == 1 else f"{rid}#{seen[rid]}", record))
    return unique


RECORDS = _records()

# Gaps the formulas do not explain yet: record id -> what is unexplained. The evidence command
# (scripts/gpu-evidence.sh) writes a memory snapshot of every case more than 1% off, which shows the allocations.
_LT = ("about +1 MiB measured in a GPT workload (biased Linear layers) on CUDA only: likely the cuBLASLt "
       "workspace (1 MiB by default) of the first addmm with a bias epilogue, made after the baseline when no earlier "
       "test of the same worker had made it; the warm-up now makes it before the baseline")
_CUDNN = ("+1.2 to +3.6 MB measured on CUDA only, in every CNN case: cuDNN's convolution workspaces, chosen per "
          "algorithm at run time (and the head's cuBLASLt workspace), are not predicted")
UNEXPLAINED: dict[str, str] = {
    "cuda-nvidia-h200:gpt-tiny-4x128-32-true-adamw-foreach-ckpt_none-acc1": _LT,
    "cuda-nvidia-h200:gpt-tiny-4x128-32-true-momentum-for-loop-ckpt_full-acc1": _LT,
    "cuda-nvidia-h200:gpt-tiny-4x128-bf16-mixed-adamw-fused-ckpt_full-acc4": _LT,
    "cuda-nvidia-h200:llama-tiny-4x128-bf16-mixed-adamw-fused-ckpt_full-acc4": (
        "predicted 4.6% above the measurement (756,224 B) under full checkpointing with 4 micro-batches in "
        "bf16-mixed; the same configuration in bf16-true is within 0.5%: not yet explained"),
    "cuda-nvidia-h200:prefill-gpt-tiny-32-true-1x256": (
        "predicted 391,168 B above the measurement, within 2,048 B of the fused qkv tensor (256 x 384 x 4 B): on "
        "CUDA the fp32 prefill seems not to keep it alive at the MLP; not yet explained"),
    **{f"cuda-nvidia-h200:cnn-b8-{c}": _CUDNN for c in (
        "32-true-adamw-foreach-ckpt_none-acc1", "bf16-true-adamw-for-loop-ckpt_none-acc1",
        "bf16-mixed-adamw-fused-ckpt_none-acc4-clip", "bf16-mixed-adamw-foreach-ckpt_none-acc1",
        "32-true-sgd-fused-ckpt_none-acc4", "16-mixed-momentum-foreach-ckpt_none-acc1-clip")},
}


def _included_terms(record: dict[str, Any]) -> int:
    """Bytes a record's measurement includes beyond the step, by the named mechanism."""
    extra = 0
    for item in record.get("includes", []):
        if item == "autograd-thread cuBLAS workspace":
            extra += cublas_workspace_bytes(tuple(record["device"]["compute_capability"]))
        else:
            raise ValueError(f"{record['source']}: unknown included term {item!r}")
    return extra


def _predict(record: dict[str, Any]) -> int:
    case = MemoryCase.from_record(record["case"])
    device = "cpu" if record["device"]["name"] == "cpu" else "cuda"
    if record["case"].get("kind") == "inference":
        return predict_inference(case).peak
    return case.predict(device).peak + _included_terms(record)


def _params() -> list[Any]:
    params = []
    for rid, record in RECORDS:
        marks = []
        if rid in UNEXPLAINED:
            marks.append(pytest.mark.xfail(strict=True, reason=UNEXPLAINED[rid]))
        params.append(pytest.param(record, id=rid, marks=marks))
    return params


def test_the_h200_run_is_on_record() -> None:
    # 37 cases of the first H200 run: 34 from the CUDA verification tests that ran (6 were skipped), 3 at real size
    ids = [rid for rid, _ in RECORDS if rid.startswith("cuda-nvidia-h200:")]
    assert len(ids) >= 37
    assert set(UNEXPLAINED) <= {rid for rid, _ in RECORDS}, set(UNEXPLAINED) - {rid for rid, _ in RECORDS}


@pytest.mark.parametrize("record", _params())
def test_recorded_gpu_case_is_predicted(record: dict[str, Any]) -> None:
    predicted = _predict(record)
    if "measured" in record:
        measured = record["measured"]["peak"]
        tolerance = 0.02 if measured > REAL_SIZE else 0.03
        err = relative_error(predicted, measured)
        assert err <= tolerance, (f"{record['source']}: predicted {predicted:,} B, measured {measured:,} B on "
                                  f"{record['device']['name']}: {100 * err:.2f}% apart")
    else:
        lo, hi = record["measured_within"]
        # the measured peak lies in [lo, hi]; the prediction must be within 3% of some point of it
        assert lo / 1.03 <= predicted <= hi * 1.03, (f"{record['source']}: predicted {predicted:,} B, measured "
                                                     f"between {lo:,} and {hi:,} B")

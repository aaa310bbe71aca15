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

import gc
import json
import weakref
from pathlib import Path
from typing import Any

import pytest
from torch import nn

from torchledger.formulas.device import cublas_workspace_bytes
from torchledger.formulas.memory import dtype_bytes, get_recipe
from torchledger.formulas.specs import get_preset
from torchledger.measuring import training
from torchledger.measuring.memory import MemoryMeasurement
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
# Two cases measured below their prediction by the same test worker (the one that also measured both 32-true GPT
# cases 1 MiB above theirs), in a run whose CUDA baseline was taken without collecting garbage first: memory that an
# earlier case left in a reference cycle, held at the baseline and freed during the step, lowers a measured peak (see
# torchledger.measuring.training.cuda_baseline), and is not ruled out.
_SAME_WORKER = "below the prediction, measured by the test worker that measured both 32-true GPT cases 1 MiB above: "
UNEXPLAINED: dict[str, str] = {
    "cuda-nvidia-h200:gpt-tiny-4x128-32-true-adamw-foreach-ckpt_none-acc1": _LT,
    "cuda-nvidia-h200:gpt-tiny-4x128-32-true-momentum-for-loop-ckpt_full-acc1": _LT,
    "cuda-nvidia-h200:llama-tiny-4x128-bf16-mixed-adamw-fused-ckpt_full-acc4": _SAME_WORKER + (
        "measured 16,550,400 B, with the batches made after that run's baseline (8 x 4,096 B, which the replay "
        "adds): the step peaked 784,896 B below the predicted moment (backward: log_softmax grad of "
        "micro-batches 2 to 4, 17,302,528 B with the fp32 gradients of micro-batch 1) and "
        "above the next one (nll_loss grad, 1,024,000 B lower); no tensor or set of tensors of that moment has "
        "this size. The CPU measures this configuration at the same moment within 0.07%; the same H200 run "
        "measured that loss head in bf16-mixed (1 micro-batch) within 7,168 B and checkpointing with 4 "
        "micro-batches (bf16-true) within 512 B. Decided by the case measured in a fresh process "
        "(scripts/gpu-evidence.sh, cli-llama-tiny-bf16-mixed-fused-full-acc4): 17,302,528 B within 3% clears "
        "this mark; about 16,517,632 B again makes it a CUDA term, which its snapshot then shows"),
    "cuda-nvidia-h200:prefill-gpt-tiny-32-true-1x256": _SAME_WORKER + (
        "measured 4,198,400 B, with the prompt's token ids (2,048 B) made after that run's baseline: the prefill "
        "peaked 393,216 B = 256 x 384 x 4 B, the fused qkv output, below the prediction, whose peak (the last "
        "block's GELU) holds qkv because the block's q, k, v views of it live until the block returns. The CPU "
        "measures this configuration at the prediction (0.00%); the same H200 run measured the 4 x 128 fp32 and "
        "1 x 256 bf16 prefills within 3% of predictions that hold qkv (without it 4 x 128 would read 6,166,528 "
        "B, below its measured interval [6,746,470, 7,163,777]). That run's baseline held 69,599,232 B = 2 x 32 "
        "MiB of cuBLAS workspaces + 2 MiB + 393,216 B: 384 KiB held before the baseline, the size of the gap. "
        "Decided by the case measured in a fresh process (scripts/gpu-evidence.sh, "
        "cli-prefill-gpt-tiny-32-true-1x256): 4,589,568 B within 3% clears this mark; 4,196,352 B again makes it "
        "a CUDA term, which its snapshot then shows"),
    **{f"cuda-nvidia-h200:cnn-b8-{c}": _CUDNN for c in (
        "32-true-adamw-foreach-ckpt_none-acc1", "bf16-true-adamw-for-loop-ckpt_none-acc1",
        "bf16-mixed-adamw-fused-ckpt_none-acc4-clip", "bf16-mixed-adamw-foreach-ckpt_none-acc1",
        "32-true-sgd-fused-ckpt_none-acc4", "16-mixed-momentum-foreach-ckpt_none-acc1-clip")},
}


# A baseline taken before the model was built (the first H200 run's) leaves the step's batches, made after it, in the
# measured peak; today's CUDA measurement leaves them out (measure_cuda's ``inputs``), and so does the prediction.
BATCHES_INCLUDED = "after a matmul, before the model is built"


def _batch_bytes(record: dict[str, Any]) -> int:
    """The bytes of every micro-batch of a recorded case, as the workloads make them: int64 token ids and targets
    (B x T each) for a transformer, the prompt's ids for a prefill; for the MLP and the CNN an input in the
    parameters' dtype and int64 class labels."""
    c = record["case"]
    case = MemoryCase.from_record(c)
    if c.get("kind") == "inference":
        return case.batch * case.seq_len * 8
    if case.workload in ("mlp", "cnn"):
        width = case.mlp.dims[0] if case.workload == "mlp" else \
            case.cnn.in_channels * case.cnn.image_size * case.cnn.image_size
        one = case.batch * width * dtype_bytes(get_recipe(case.config.precision).param_dtype) + case.batch * 8
    else:
        one = 2 * case.batch * case.seq_len * 8
    return one * case.config.grad_accum


def _included_terms(record: dict[str, Any]) -> int:
    """Bytes a record's measurement includes beyond the step, by the named mechanism."""
    extra = _batch_bytes(record) if record.get("baseline") == BATCHES_INCLUDED else 0
    for item in record.get("includes", []):
        if item == "autograd-thread cuBLAS workspace":
            extra += cublas_workspace_bytes(tuple(record["device"]["compute_capability"]))
        else:
            raise ValueError(f"{record['source']}: unknown included term {item!r}")
    return extra


def _predict(record: dict[str, Any]) -> int:
    """The case's prediction, a Mixture of Experts from the routing its measured step took where recorded."""
    case = MemoryCase.from_record(record["case"])
    device = "cpu" if record["device"]["name"] == "cpu" else "cuda"
    routing = record.get("measured", {}).get("routing")
    if record["case"].get("kind") == "inference":
        return predict_inference(case, routing).peak + _included_terms(record)
    return case.predict(device, routing).peak + _included_terms(record)


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


def _record(rid: str) -> dict[str, Any]:
    return next(record for r, record in RECORDS if r == rid)


def test_the_unexplained_prefill_gap_is_the_qkv_output() -> None:
    # The figures its mark states, from gpt-tiny's dimensions: that run's measurement included the prompt's token
    # ids (int64, made after its baseline; the replay adds them to the prediction), and the step peaked one fused
    # qkv output (T x 3d fp32) below the prediction
    spec = get_preset("gpt-tiny")
    record = _record("cuda-nvidia-h200:prefill-gpt-tiny-32-true-1x256")
    tokens = record["case"]["batch"] * record["case"]["seq_len"]
    assert _batch_bytes(record) == tokens * 8
    qkv = tokens * (spec.q_dim + 2 * spec.kv_dim) * 4
    assert qkv == 256 * 384 * 4
    assert _predict(record) - record["measured"]["peak"] == qkv


def test_the_unexplained_llama_gap_falls_between_two_predicted_moments() -> None:
    # The figures its mark states: the measurement included the 4 micro-batches of token ids and targets (int64, made
    # after its baseline; the replay adds them to the prediction), and the step peaked between the predicted peak
    # and the next moment, one bf16 log_softmax gradient (B T V x 2 B) lower
    spec = get_preset("llama-tiny")
    record = _record("cuda-nvidia-h200:llama-tiny-4x128-bf16-mixed-adamw-fused-ckpt_full-acc4")
    case = record["case"]
    tokens = case["batch"] * case["seq_len"]
    assert _batch_bytes(record) == 4 * 2 * tokens * 8
    predicted = _predict(record)
    assert predicted - tokens * spec.vocab_size * 2 < record["measured"]["peak"] < predicted


@pytest.mark.parametrize("kind", ["training", "inference"])
def test_a_cuda_measurement_collects_garbage_before_its_baseline(kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # An object only a reference cycle holds (as an earlier case's tensors can be) must be gone when the CUDA
    # baseline is read: freed later, inside the measured step, it would lower the measured peak. The CUDA calls are
    # replaced, so this runs anywhere.
    class Held:
        cycle: object = None

    held = Held()
    held.cycle = held
    ref = weakref.ref(held)
    del held
    alive_at_baseline: list[bool] = []

    def allocated(device: str) -> int:
        alive_at_baseline.append(ref() is not None)
        return 0

    class Step:
        optimizer = None

        def step(self, batches: object) -> None:
            pass

        def warm_up(self, batches: object) -> int:
            return 1

    monkeypatch.setattr(training, "cuda_warmup", lambda device: 0)
    monkeypatch.setattr(training, "cuda_allocated", allocated)
    monkeypatch.setattr(training, "measure_cuda", lambda fn, **kwargs: (fn(), MemoryMeasurement("cuda", 0))[1])
    monkeypatch.setattr(training, "_inference_run", lambda case, device: (nn.Module(), lambda: None, None, None))
    enabled = gc.isenabled()
    gc.disable()  # only an explicit collection may free it
    try:
        assert ref() is not None
        if kind == "training":
            training.measure_built(lambda: (nn.Module(), Step(), []), "cuda")  # type: ignore[arg-type, return-value]
        else:
            training.measure_inference(MemoryCase("gpt-tiny", 1, training.TrainConfig(), seq_len=8), "cuda")
    finally:
        if enabled:
            gc.enable()
    assert alive_at_baseline == [False]


def test_a_mixture_of_experts_record_replays_with_its_routing() -> None:
    # memory_record keeps measured.routing; the replay predicts from it, not from a balanced stand-in: here expert 0
    # of block 1 got no token, so its three matrices (3 x 128 x 344 fp32) have no gradient and no AdamW sqrt
    case = MemoryCase("mixtral-tiny", 2, training.TrainConfig(), seq_len=64)
    routing = [[64, 64, 64, 64], [0, 128, 64, 64]]
    record = {"case": case.to_record("train"), "device": {"name": "cpu"},
              "measured": {"peak": 1, "routing": routing}}
    assert _predict(record) == case.predict("cpu", routing).peak
    assert case.predict("cpu").peak - _predict(record) == 2 * 3 * 128 * 344 * 4

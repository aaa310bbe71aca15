"""The precision group: matmul in every dtype, training steps under each recipe, int8 inference; each with its
error against a higher-precision reference beside the time."""

from __future__ import annotations

from functools import partial
from typing import Any

import pytest
import torch

from benchmarks.performance.conftest import Ledger, PhaseTimes, memory_base, memory_info, peak_memory
from benchmarks.performance.predicted import predicted_step_s
from torchledger.counting.hooks import sdpa_is_fused
from torchledger.formulas import flops as F
from torchledger.formulas.specs import MLPSpec, get_preset
from torchledger.measuring.training import MemoryCase
from torchledger.workloads.models import MLP, quantize_int8
from torchledger.workloads.train_step import TrainConfig

MATMUL_DTYPES = ["fp32", "tf32", "fp16", "bf16", "int8", "int8 col-major b", "fp8"]


def _rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.double() - ref).norm() / ref.norm())


def _fp8_supported(device: str) -> str | None:
    if not device.startswith("cuda"):
        return "fp8 matmul (torch._scaled_mm) needs a CUDA GPU"
    if torch.cuda.get_device_capability() < (8, 9):
        return f"fp8 matmul needs compute capability 8.9+, this GPU has {torch.cuda.get_device_capability()}"
    return None


@pytest.mark.benchmark(group="precision")
@pytest.mark.parametrize("dtype", MATMUL_DTYPES)
def test_matmul(ledger: Ledger, sizes: dict[str, Any], dtype: str) -> None:
    device, n = ledger.device, sizes["matmul"]
    gen = torch.Generator(device="cpu").manual_seed(0)
    a32 = torch.randn(n, n, generator=gen).to(device)
    b32 = torch.randn(n, n, generator=gen).to(device)
    ref = a32.double() @ b32.double()
    previous = torch.get_float32_matmul_precision()
    fn: Any
    if dtype in ("fp32", "tf32"):
        torch.set_float32_matmul_precision("highest" if dtype == "fp32" else "high")
        fn = lambda: a32 @ b32  # noqa: E731
    elif dtype in ("fp16", "bf16"):
        a, b = (x.to(torch.float16 if dtype == "fp16" else torch.bfloat16) for x in (a32, b32))
        fn = lambda: a @ b  # noqa: E731
    elif dtype.startswith("int8"):
        scale_a, scale_b = a32.abs().max() / 127, b32.abs().max() / 127
        a8 = (a32 / scale_a).round().to(torch.int8)
        b8 = (b32 / scale_b).round().to(torch.int8)
        if dtype == "int8 col-major b":  # the layout cuBLASLt's int8 kernels take (as _scaled_mm's fp8 below)
            b8 = b8.t().contiguous().t()
        fn = lambda: torch._int_mm(a8, b8)  # noqa: E731
    else:
        reason = _fp8_supported(device)
        if reason:
            pytest.skip(reason)
        fp8 = torch.float8_e4m3fn
        scale_a = (a32.abs().max() / torch.finfo(fp8).max).float()
        scale_b = (b32.abs().max() / torch.finfo(fp8).max).float()
        a8 = (a32 / scale_a).to(fp8)
        b8 = (b32 / scale_b).to(fp8).t().contiguous().t()  # column-major second operand, as _scaled_mm requires
        fn = lambda: torch._scaled_mm(a8, b8, scale_a=scale_a, scale_b=scale_b, out_dtype=torch.bfloat16)  # noqa: E731
    try:
        out = fn()
        if dtype.startswith("int8"):
            out = out.double() * float(scale_a) * float(scale_b)
        peak = "int8" if dtype.startswith("int8") else dtype
        layout = "column-major" if dtype == "int8 col-major b" else "row-major"
        seconds = ledger.time(fn, rounds=sizes["rounds"], warmup=2, flops=F.matmul_flops(n, n, n), mfu_dtype=peak,
                              work={"shape": [n, n, n]}, dtype=peak, rel_error=_rel_error(out, ref), shape=[n, n, n],
                              b_layout=layout if peak in ("int8", "fp8") else "row-major")
        if peak == "int8" and seconds:
            ceiling = ledger.peak_flops("int8")
            tops = F.matmul_flops(n, n, n) / seconds
            ledger.record(tops=tops / 1e12, fraction_of_int8_peak=None if ceiling is None else tops / ceiling)
    finally:
        torch.set_float32_matmul_precision(previous)


RECIPES = ["32-true", "16-mixed", "bf16-mixed"]


def _step_case(workload: str, sizes: dict[str, Any], recipe: str) -> MemoryCase:
    config = TrainConfig(recipe, "adamw", "foreach")
    if workload == "mlp":
        return MemoryCase("mlp", sizes["mlp_batch"], config, mlp=MLPSpec(sizes["mlp"]))
    return MemoryCase(sizes["gpt"], sizes["gpt_batch"], config, seq_len=sizes["gpt_seq"])


@pytest.mark.benchmark(group="precision")
@pytest.mark.parametrize("recipe", RECIPES)
@pytest.mark.parametrize("workload", ["mlp", "gpt"])
def test_train_step(ledger: Ledger, sizes: dict[str, Any], workload: str, recipe: str) -> None:
    case = _step_case(workload, sizes, recipe)
    device = ledger.device
    base = memory_base(device)
    model, step, batches = case.build(device)
    # The fp32 reference: the same initial weights and batch; the error of the recipe's output (logits).
    ref_model, ref_step, _ = _step_case(workload, sizes, "32-true").build(device)
    with torch.no_grad(), torch.autocast(torch.device(device).type, dtype=torch.float16 if recipe == "16-mixed"
                                         else torch.bfloat16, enabled=recipe != "32-true"):
        out = step.loss_fn(model, batches[0])[0]
    with torch.no_grad():
        ref = ref_step.loss_fn(ref_model, batches[0])[0]
    rel_error = _rel_error(out.float(), ref.double())
    del ref_model, ref_step, out, ref
    if workload == "mlp":
        flops = F.mlp_flops(case.mlp, case.batch).train
    else:
        gpt = get_preset(sizes["gpt"])
        q = torch.empty(case.batch, gpt.n_heads, case.seq_len, gpt.head_dim, device=device, requires_grad=True)
        fused = sdpa_is_fused(q, q, q, is_causal=True)  # a fused kernel recomputes QK^T in the backward
        flops = F.model_flops(gpt, case.batch, case.seq_len, recompute_attention_scores=fused).train

    phases = PhaseTimes(step, device)

    def run() -> None:
        phases.step(batches)

    run()  # optimizer state, so the measured peak is the steady state the prediction describes
    measured = peak_memory(device, run, model, step.optimizer, base=base, inputs=[t for b in batches for t in b])
    work = {"model": "mlp", "dims": list(case.mlp.dims), "batch": case.batch} if workload == "mlp" else {
        "model": sizes["gpt"], "batch": case.batch, "seq_len": case.seq_len}
    seconds = ledger.time(run, rounds=sizes["rounds"], warmup=1, flops=flops, work=work,
                          refill=partial(phases.untimed, batches),
                mfu_dtype="fp32" if recipe == "32-true" else ("fp16" if recipe == "16-mixed" else "bf16"),
                recipe=recipe, workload=workload, rel_error=rel_error, predicted_step_s=predicted_step_s(ledger, case),
                **memory_info(case, measured))
    ledger.record(phase_median_s=phases.median(None if seconds is None else sizes["rounds"]))


@pytest.mark.benchmark(group="precision")
@pytest.mark.parametrize("scheme", ["int8 _int_mm (Int8Linear)", "torchao weight-only", "torchao dynamic",
                                    "torch.ao dynamic"])
def test_int8_inference(ledger: Ledger, sizes: dict[str, Any], scheme: str) -> None:
    device = ledger.device
    spec = MLPSpec(sizes["mlp"])
    torch.manual_seed(0)
    model = MLP(spec, device=device).eval()
    x = torch.randn(sizes["mlp_batch"] * 4, spec.dims[0], device=device)
    with torch.no_grad():
        ref = model(x)
    import copy

    quantized = copy.deepcopy(model)
    if scheme.startswith("int8 _int_mm"):
        quantize_int8(quantized)
    elif scheme.startswith("torchao"):
        pytest.importorskip("torchao", reason="torchao is not installed (pip install 'torchledger[int8]')")
        from torchao.quantization import Int8DynamicActivationInt8WeightConfig, Int8WeightOnlyConfig, quantize_

        config = Int8WeightOnlyConfig() if "weight-only" in scheme else Int8DynamicActivationInt8WeightConfig()
        quantize_(quantized, config)
    else:
        if device != "cpu":
            pytest.skip("torch.ao dynamic quantization runs on the CPU only")
        if _has_torchao():
            pytest.skip("torchao is installed: its quantize_ is the successor of torch.ao dynamic quantization")
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            quantized = torch.ao.quantization.quantize_dynamic(quantized, {torch.nn.Linear}, dtype=torch.qint8)

    def run() -> torch.Tensor:
        with torch.no_grad():
            return quantized(x)

    out = run()
    ledger.time(run, rounds=sizes["rounds"], warmup=2, flops=F.mlp_flops(spec, x.shape[0]).forward,
                work={"model": "mlp", "dims": list(spec.dims), "batch": x.shape[0]}, mfu_dtype="int8", dtype="int8",
                scheme=scheme, rel_error=_rel_error(out, ref.double()))


def _has_torchao() -> bool:
    try:
        import torchao  # noqa: F401
    except ImportError:
        return False
    return True

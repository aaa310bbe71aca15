"""The step-time model (formulas/steptime.py) and its calibration (reporting/calibration.py): the arithmetic of
one op, the interpolation, the op lists against the FLOP formulas on random configurations, MFU against HFU, and
the replay of recorded runs: every timed training step of a machine's run predicted from a calibration built only
from that run's roofline and precision matmuls and copy bandwidth (never from the steps themselves).

The replay reads recorded JSON: deterministic, no timing. Where the model holds, the prediction is within 10% (the
H200) or 15% (the 2-core CPU) of the measured median; where it does not, a strict xfail names the measured and
predicted figures and the suspected mechanism, so that a model that starts to hold is noticed.
"""

from __future__ import annotations

import json
import math
import os
import random
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import seed as hypothesis_seed
from hypothesis import strategies as st

from torchledger.formulas import flops as F
from torchledger.formulas.estimate import estimate
from torchledger.formulas.hardware import get_device
from torchledger.formulas.specs import MLPSpec, ModelSpec, get_preset
from torchledger.formulas.steptime import (
    Calibration,
    KernelPoint,
    MachineSpeed,
    MatmulPoint,
    Op,
    datasheet_calibration,
    mlp_step_ops,
    op_seconds,
    optimizer_ops,
    step_time,
    transformer_step_ops,
)
from torchledger.reporting.calibration import read_calibration

RESULTS = Path(__file__).resolve().parents[2] / "results"
# The runs replayed, pinned (a later run filed beside them does not change what these tests check): the H200's
# roofline and precision groups (one NVIDIA H200, torch 2.11, commit 59e1d7e), the 2-core CPU's second run (the
# calibration tests' base: no kernel, layout or update figures).
H200 = RESULTS / "cuda-nvidia-h200" / "Linux-CPython-3.12-64bit" / (
    "0001_59e1d7e22790d6f312809e3dd5baf71958bd5dde_20261127_050941.json")
_CPU_RUNS = RESULTS / "cpu-amd-epyc" / "Linux-CPython-3.11-64bit"
CPU = _CPU_RUNS / "0002_71749bfae053b4b47cebe6cf7c562a056ac1bb21_20261125_204629.json"
# The CPU's runs from which its steps are replayed. The third (commit 76d2f73): the first with the step kernels, every
# step matmul in its layout and the update bandwidth measured; the fourth (0989dd0): the first with checkpointing
# and accumulation timed round-robin with their base step; the fifth (4507218): the first with glibc's malloc
# thresholds fixed for the session (--ledger-malloc); the sixth (efb559d): the first with the steps predicted from
# ceilings measured in the same rounds.
CPU3 = _CPU_RUNS / "0003_76d2f734d3cbd511121e6c3bfbefa05c448918fd_20261127_151645.json"
CPU4 = _CPU_RUNS / "0004_0989dd0b294ef8ce87f14241e09e496f618c64c6_20261127_153522.json"
CPU5 = _CPU_RUNS / "0005_450721868c2f07bddfadc5bccdb1488c87cbccba_20261127_154222.json"
CPU6 = _CPU_RUNS / "0006_efb559d56d5cc5f47f469fd1db3d9574c6a6467c_20261127_154658.json"
# Runs 0007 (the speed probe timed cold) and 0008 (warm), replayed for their same-round predictions.
CPU7 = _CPU_RUNS / "0007_b2df765f4d20504ee5f758fe8f7b123efd9f8d32_20261127_171346.json"
CPU8 = _CPU_RUNS / "0008_bc8b1733589bef22fd428b51f12d7b762128d7d8_20261127_171631.json"
# The runs whose every figure records the machine speed it was measured at (a warm probe, 0008 on) and whose
# calibration measures the host's cost per op on the profile's transformer (0009 on); 0010 and 0011 record each
# step's phases. Their steps are predicted at their own machine speed (test_replay_recorded_step_at_its_speed).
CPU9 = _CPU_RUNS / "0009_f898a9fdbae288a515eb41f99d3a4cde0a14f352_20261127_172329.json"
CPU10 = _CPU_RUNS / "0010_4ebe518fa0d2ec3a231830f59b3abd3adb31f7a1_20261127_172732.json"
CPU11 = _CPU_RUNS / "0011_4b23c9b823005cad3c9cc6a663cbe6f8a505c4f7_20261127_173004.json"
# 0012 on: AdamW's own update bandwidth (test_optimizer_update); 0014 on: the host floor timed with the caches
# displaced.
CPU12 = _CPU_RUNS / "0012_0657710b4d9ba2aa845f3418736c16aec8306761_20261127_174909.json"
CPU13 = _CPU_RUNS / "0013_c7be5d6967f756331d35e958d336ecb12340cc56_20261127_175138.json"
CPU14 = _CPU_RUNS / "0014_6d3b331d08d0dca4f1abe44e5e676a58dc0b9b9b_20261127_175410.json"
# 0015 on: no refill after the probe for work whose refill lasts over 20 ms (the training steps).
CPU15 = _CPU_RUNS / "0015_b4c3cb2d8cc6b50b8261d40eaf6c60440fa3d910_20261127_180600.json"
# 0016 on: the same-round prediction times AdamW's own update in every round.
CPU16 = _CPU_RUNS / "0016_bf555276bb75bf8f45dd4f4cee5ce1c779f5d415_20261127_181111.json"
# 0017 on: the small-op probe recorded (small_op_s), not used.
CPU17 = _CPU_RUNS / "0017_deebdf6907f2f6c75415247c3fa78e9065bfe59b_20261127_185748.json"
CPU18 = _CPU_RUNS / "0018_5bd0eb92bacb21a16f37ae6c7319437b3d8050eb_20261127_221233.json"
# 0019 on: every benchmark on one CPU thread (--ledger-threads, the CPU's default), where runs 0001 to 0018 ran on
# torch's default of two: the slow phases of the shared machine slowed the second thread, not the first.
CPU19 = _CPU_RUNS / "0019_b8ec9e79b84d07dd11b2d4812d70a728d65a0f10_20261127_224408.json"
CPU20 = _CPU_RUNS / "0020_b8ec9e79b84d07dd11b2d4812d70a728d65a0f10_20261127_224624.json"
CPU21 = _CPU_RUNS / "0021_b8ec9e79b84d07dd11b2d4812d70a728d65a0f10_20261127_224834.json"
# 0022 on: the CPU's last-level cache recorded (llc_bytes), so the MLP's forward reads its weights from memory.
CPU22 = _CPU_RUNS / "0022_1502f2b8ced6b55742360915d8d3f6b45cf70cd6_20261127_230457.json"
CPU23 = _CPU_RUNS / "0023_1502f2b8ced6b55742360915d8d3f6b45cf70cd6_20261127_230715.json"
CPU24 = _CPU_RUNS / "0024_1502f2b8ced6b55742360915d8d3f6b45cf70cd6_20261127_230928.json"
# Seeded as test_memory_random.py is: the same examples every run unless TORCHLEDGER_RANDOM_SEED names a seed (or
# ``random``) or the hypothesis profile is ``nightly``.
_SEED_ENV = os.environ.get("TORCHLEDGER_RANDOM_SEED", "")
RANDOM = _SEED_ENV != "" or os.environ.get("HYPOTHESIS_PROFILE") == "nightly"
SEED = random.SystemRandom().randrange(2**32) if _SEED_ENV == "random" else int(_SEED_ENV or 0)


def _cal(**kw: Any) -> Calibration:
    base: dict[str, Any] = {"device": "test", "matmul": {"bf16": (MatmulPoint(1024, 1024, 1024, 100e12),
                                                                  MatmulPoint(8192, 8192, 8192, 800e12))},
                            "bandwidth": 2e12, "launch_s": 5e-6, "peaks": {"bf16": 1000e12}}
    return Calibration(**{**base, **kw})


def test_op_time_is_the_roofline_plus_launches() -> None:
    cal = _cal()
    # a 8192^3 bf16 matmul: 2 * 8192^3 FLOP at the measured 800 TFLOP/s; 3 * 8192^2 * 2 bytes at 2 TB/s
    op = Op("mm", "forward", flops=2 * 8192**3, bytes=3 * 8192**2 * 2, shape=(8192, 8192, 8192), dtype="bf16")
    compute, memory, launch = op_seconds(op, cal)
    assert compute == pytest.approx(2 * 8192**3 / 800e12)
    assert memory == pytest.approx(3 * 8192**2 * 2 / 2e12)
    assert launch == 5e-6
    # a copy of 1 GB read + 1 GB written: memory-bound, 2e9 / 2e12 s, plus two launches
    t = step_time([Op("copy", "forward", bytes=2 * 10**9, launches=2)], cal, tokens=1, model_flops=0)
    assert t.phases["forward"].seconds == pytest.approx(2e9 / 2e12 + 2 * 5e-6)
    assert t.phases["forward"].bound == "memory"
    assert t.step_s == pytest.approx(2e9 / 2e12 + 2 * 5e-6)


def test_a_weight_read_from_memory_adds_its_bytes_over_the_bandwidth() -> None:
    # a 32 x 2048 x 2048 fp32 forward matmul reading its 16 MiB weight, the step touching 100 MiB between two reads
    weight = 2048 * 2048 * 4
    op = Op("fc", "forward", flops=2 * 32 * 2048 * 2048, bytes=(32 * 2048 * 2 + 2048 * 2048) * 4,
            shape=(32, 2048, 2048), cold_bytes=weight, reuse_bytes=100 * 2**20)
    warm = 2 * 32 * 2048 * 2048 / 1e11
    cal = _cal(matmul={"fp32": (MatmulPoint(32, 2048, 2048, 1e11),)}, bandwidth=25e9)
    # no cache size known (a GPU run, or a run before it was recorded): the warm rate alone
    assert op_seconds(op, cal)[0] == pytest.approx(warm)
    # a 32 MiB last-level cache: 100 MiB went through it since the weight's last read, so the weight comes from
    # memory, on top of the rate the calibration timed with it cached
    assert op_seconds(op, replace(cal, cache_bytes=32 * 2**20))[0] == pytest.approx(warm + weight / 25e9)
    # a cache that holds what the step touches: the weight is still there
    assert op_seconds(op, replace(cal, cache_bytes=128 * 2**20))[0] == pytest.approx(warm)
    with pytest.raises(ValueError, match="cache_bytes"):
        replace(cal, cache_bytes=0)


def test_the_step_s_weights_and_weight_gradients_are_touched_a_step_apart() -> None:
    # the MLP 512-2048-2048-512 (6,299,648 parameters with biases) under AdamW: a forward matmul reads its fp32
    # weight and a weight-gradient matmul writes the gradient, and between two such touches the step touches the
    # parameters, gradients and two states, 16 bytes each
    spec = MLPSpec((512, 2048, 2048, 512))
    n = 512 * 2048 + 2048 + 2048 * 2048 + 2048 + 2048 * 512 + 512
    assert spec.n_params == n
    ops = mlp_step_ops(spec, 32, precision="32-true", device="cpu")
    cold = {op.name: (op.cold_bytes, op.reuse_bytes) for op in ops if op.cold_bytes}
    weights = {"linear0": 512 * 2048, "linear1": 2048 * 2048, "linear2": 2048 * 512}
    assert cold == {**{name: (w * 4, 16 * n) for name, w in weights.items()},
                    **{f"{name}.wgrad": (w * 4, 16 * n) for name, w in weights.items()}}
    # bf16-true: parameters, gradients and AdamW's two states (zeros_like the parameter) of 2 bytes each
    ops = mlp_step_ops(spec, 32, precision="bf16-true", device="cpu")
    cold = {op.name: (op.cold_bytes, op.reuse_bytes) for op in ops if op.cold_bytes}
    assert cold["linear1"] == cold["linear1.wgrad"] == (2048 * 2048 * 2, (2 + 2 + 2 * 2) * n)
    # under autocast the cast reads the fp32 weight (a memory-bound op at the bandwidth) and the matmul its copy;
    # the weight gradient is written in bf16 (fp32 parameters, gradients and states: 16 bytes between touches)
    ops = mlp_step_ops(spec, 32, precision="bf16-mixed")
    assert {op.name: (op.cold_bytes, op.reuse_bytes) for op in ops if op.cold_bytes} == {
        f"{name}.wgrad": (w * 2, 16 * n) for name, w in weights.items()}
    # the recompute and the input gradients read what the forward just read
    ops = transformer_step_ops(get_preset("gpt-tiny"), 2, 16, checkpointing="full")
    marked = {(op.phase, op.name.endswith(".wgrad")) for op in ops if op.cold_bytes}
    assert marked == {("forward", False), ("backward", True)}


def test_matmul_rate_interpolates_in_log_flops() -> None:
    cal = _cal()
    # 2048 x 2048 x 8192 = 2^35 MACs, between 1024^3 = 2^30 and 8192^3 = 2^39: in log(FLOPs) w = 5/9 of the way
    rate = cal.matmul_rate("bf16", 2048, 2048, 8192)
    assert rate == pytest.approx(100e12 + 5 / 9 * 700e12)
    assert cal.matmul_rate("bf16", 64, 64, 64) == 100e12  # below the smallest measured shape: held
    assert cal.matmul_rate("bfloat16", 16384, 16384, 16384) == 800e12  # above the largest: held
    with pytest.raises(ValueError, match="fp32"):
        cal.matmul_rate("fp32", 8, 8, 8)


def test_adamw_foreach_moves_80_bytes_per_fp32_parameter() -> None:
    # _multi_tensor_adam: mul_(p) 2, lerp_(m, g) 3, mul_(v) 2, addcmul_(v, g, g) 3, sqrt 2, div_ 2, add_ 2,
    # addcdiv_(p, m, denom) 4 = 20 element accesses of 4 bytes
    ops = optimizer_ops(1000, 10, optimizer="adamw", optimizer_impl="foreach")
    assert sum(op.bytes for op in ops) == 20 * 4 * 1000
    # fused: one kernel reading p, g, m, v and writing p, m, v
    assert sum(op.bytes for op in optimizer_ops(1000, 10, optimizer_impl="fused")) == 7 * 4 * 1000
    with pytest.raises(ValueError, match="optimizer_impl"):
        optimizer_ops(1000, 10, optimizer_impl="turbo")


def test_datasheet_fallback_is_the_peak_times_the_efficiency() -> None:
    cal = datasheet_calibration(get_device("H100 SXM"))
    assert cal.matmul_rate("bf16", 4096, 4096, 4096) == pytest.approx(989.4e12 * 0.75)
    assert cal.bandwidth == pytest.approx(3.35e12 * 0.75)


@st.composite
def _configs(draw: st.DrawFn) -> tuple[ModelSpec, int, int, str, str, int]:
    family: Any = draw(st.sampled_from(["gpt2", "llama", "mistral", "mixtral"]))
    heads = draw(st.sampled_from([2, 4, 8]))
    kv = heads if family == "gpt2" else draw(st.sampled_from([h for h in (1, 2, heads) if heads % h == 0]))
    extra: dict[str, Any] = {}
    if family == "mixtral":
        experts = draw(st.integers(2, 8))
        extra = {"n_experts": experts, "experts_per_token": draw(st.integers(1, min(2, experts)))}
    if family == "mistral":
        extra = {"sliding_window": draw(st.integers(1, 512))}
    spec = ModelSpec("random", family, draw(st.integers(1, 6)), heads * draw(st.sampled_from([16, 32, 64])),
                     heads, vocab_size=draw(st.integers(50, 5000)), max_seq_len=512, n_kv_heads=kv,
                     d_ff=draw(st.integers(16, 1024)), **extra)
    return (spec, draw(st.integers(1, 8)), draw(st.integers(1, 512)),
            draw(st.sampled_from(["32-true", "bf16-mixed", "16-mixed", "bf16-true"])),
            draw(st.sampled_from(["none", "full", "every-other"])), draw(st.integers(1, 4)))


@settings(derandomize=not RANDOM, max_examples=60, deadline=None, database=None)
@given(_configs())
def test_op_list_flops_are_the_flop_formulas(config: tuple[ModelSpec, int, int, str, str, int]) -> None:
    """The matmuls of the op list add up to flops.model_flops (fused attention recomputes QK^T; a sliding window
    attends fewer keys), on random specs of every family."""
    spec, batch, seq, precision, mode, accum = config
    ops = transformer_step_ops(spec, batch, seq, precision=precision, checkpointing=mode, grad_accum=accum)
    expected = accum * F.model_flops(spec, batch, seq, checkpointing=mode, recompute_attention_scores=True,
                                     window=spec.sliding_window).train
    assert sum(op.flops * op.count for op in ops) == expected
    t = step_time(ops, _cal(matmul={d: (MatmulPoint(64, 64, 64, 1e12),) for d in ("fp32", "bf16", "fp16")}),
                  tokens=batch * seq * accum, model_flops=1)
    assert t.step_s > 0 and all(p.seconds >= 0 for p in t.phases.values())


if RANDOM:  # TORCHLEDGER_RANDOM_SEED picks the examples (printed on failure, so a run can be repeated)
    test_op_list_flops_are_the_flop_formulas = hypothesis_seed(SEED)(test_op_list_flops_are_the_flop_formulas)


def test_mfu_and_hfu_are_named_apart() -> None:
    # LLaMA-2-7B at 4,096 tokens with full checkpointing: the recompute is counted in the hardware FLOPs only
    e = estimate(get_preset("llama-7b"), 1, 4096, precision="bf16-mixed", checkpointing="full")
    d = e.to_dict()["flops"]
    assert d["per_token_model"] == (e.flops.forward + e.flops.backward) / 4096
    assert d["per_token_hardware"] == d["per_token_train"] == (e.flops.forward + e.flops.backward
                                                               + e.flops.recompute) / 4096
    assert d["per_token_hardware"] > d["per_token_model"]
    from torchledger.formulas.planner import estimate_time

    t = estimate_time(e, datasheet_calibration(get_device("H100 SXM")))
    # MFU over the model's forward + backward; HFU over what runs: the recompute, and the QK^T that a fused
    # attention kernel recomputes in its backward
    assert t.model_flops == e.flops.forward + e.flops.backward
    hardware = F.model_flops(e.spec, 1, 4096, checkpointing="full", recompute_attention_scores=True).train
    assert t.hardware_flops == hardware
    assert t.mfu is not None and t.hfu is not None
    assert t.hfu == pytest.approx(t.mfu * hardware / t.model_flops)
    assert t.mfu == pytest.approx(t.model_flops / t.step_s / 989.4e12)  # the datasheet's dense bf16 peak


# ----------------------------------------------------------------------------------------------- replay


def _result(path: Path, name: str) -> Any:
    """The result ``name`` in the run the calibration reads (the newest run of the machine, its commit's runs
    merged)."""
    from torchledger.reporting.results import newest_results, read_runs

    (history,) = read_runs([path]).by_machine.values()
    (result,) = [r for r in newest_results(history).results.values() if r.name.endswith(f"::{name}")]
    return result


def _measured(path: Path, name: str) -> float:
    """The median of ``name`` in the run the calibration reads."""
    return float(_result(path, name).median)


def _predict(path: Path, case: dict[str, Any], at: MachineSpeed | None = None) -> float:
    """The step of ``case`` predicted from the run's calibration, at the machine speed ``at`` where given, with the
    host's cost per op measured on the case's model where the run has it."""
    cal = read_calibration(path, at=at)
    if case["workload"] != "mlp":
        cal = cal.for_model(case["model"], case["recipe"])
    if case["workload"] == "mlp":
        ops = mlp_step_ops(MLPSpec(case["dims"]), case["batch"], precision=case["recipe"], device=cal.kind)
    else:
        ops = transformer_step_ops(get_preset(case["model"]), case["batch"], case["seq"], precision=case["recipe"],
                                   checkpointing=case.get("checkpointing", "none"),
                                   grad_accum=case.get("accum", 1), device=cal.kind)
        if case.get("forward_only"):
            ops = [op for op in ops if op.phase == "forward" and "softmax" not in op.name and "logits" not in op.name]
    return step_time(ops, cal, tokens=1, model_flops=0).step_s


# The H200's profile (benchmarks/performance/conftest.py SIZES["full"]): GPT-2 small 16 x 1024, the MLP
# 4096-16384-16384-4096 at batch 1024; AdamW foreach.
_H200_GPT = {"workload": "gpt", "model": "gpt2-small", "batch": 16, "seq": 1024}
_H200_MLP = {"workload": "mlp", "dims": (4096, 16384, 16384, 4096), "batch": 1024}
# The CPU's profile (SIZES["small"]): gpt-tiny 8 x 128, the MLP 512-2048-2048-512 at batch 32.
_CPU_GPT = {"workload": "gpt", "model": "gpt-tiny", "batch": 8, "seq": 128}
_CPU_MLP = {"workload": "mlp", "dims": (512, 2048, 2048, 512), "batch": 32}

# The CPU's timed steps (the small profile), replayed from both runs that measure the whole calibration.
CPU_STEPS: list[tuple[str, dict[str, Any]]] = [
    ("test_train_step[gpt-32-true]", {**_CPU_GPT, "recipe": "32-true"}),
    ("test_train_step[gpt-bf16-mixed]", {**_CPU_GPT, "recipe": "bf16-mixed"}),
    ("test_train_step[gpt-16-mixed]", {**_CPU_GPT, "recipe": "16-mixed"}),
    ("test_train_step[mlp-32-true]", {**_CPU_MLP, "recipe": "32-true"}),
    ("test_train_step[mlp-bf16-mixed]", {**_CPU_MLP, "recipe": "bf16-mixed"}),
    ("test_train_step[mlp-16-mixed]", {**_CPU_MLP, "recipe": "16-mixed"}),
    ("test_same_effective_batch[1x]", {**_CPU_GPT, "recipe": "32-true"}),
    ("test_same_effective_batch[4x]", {**_CPU_GPT, "batch": 2, "accum": 4, "recipe": "32-true"}),
    ("test_checkpointing[none]", {**_CPU_GPT, "recipe": "32-true"}),
    ("test_checkpointing[every-other]", {**_CPU_GPT, "recipe": "32-true", "checkpointing": "every-other"}),
    ("test_checkpointing[full]", {**_CPU_GPT, "recipe": "32-true", "checkpointing": "full"}),
    ("test_compile_forward[eager]", {**_CPU_GPT, "recipe": "32-true", "forward_only": True}),
]
_FAULTS = ("first-touch page faults. Every step allocates the 24 MiB of gradients (zero_grad sets them to None) and "
           "AdamW's 24 MiB sqrt(v) afresh, and glibc hands back pages the OS must fault in: 44 MiB faulted per step, "
           "12.6 ms of the step (27.8 ms with glibc's mmap and trim thresholds raised); whether a step pays them "
           "depends on what the process freed before, and this run predates --ledger-malloc fixing the thresholds")
CPU3_MISSES: dict[str, str] = {
    "test_train_step[gpt-bf16-mixed]":
        "measured 28.6 ms, predicted 33.1 ms (+15.8%): 15.7 ms of it is the CPU's bf16 flash-attention backward, "
        "timed alone at 21 GFLOP/s; inside a step it took 6.6 ms a call (7.9 predicted), and between runs its rate "
        "varied from 21 to 36 GFLOP/s",
    "test_train_step[mlp-32-true]": f"measured 29.8 ms, predicted 21.2 ms: {_FAULTS}",
    "test_train_step[mlp-bf16-mixed]": f"measured 21.8 ms, predicted 15.2 ms: {_FAULTS}",
    "test_same_effective_batch[1x]":
        "measured 43.4 ms, predicted 30.9 ms: the same step as test_train_step[gpt-32-true] of the same run, which "
        "measured 32.3 ms: the shared 2-core machine drifts by this much between groups",
    "test_same_effective_batch[4x]":
        "measured 62.8 ms, predicted 34.5 ms: the group timed first, slow as its 1x twin (43.4 ms against 32.3 ms "
        "for the same step later); the next run measured 35.1 ms",
    "test_checkpointing[none]":
        "measured 38.1 ms, predicted 30.9 ms: the same step as test_train_step[gpt-32-true] (32.3 ms in this run)",
    "test_checkpointing[every-other]":
        "measured 43.8 ms, predicted 33.9 ms: the group's drift, as in checkpointing[none]; what recomputing adds, "
        "timed round-robin, is test_replay_what_a_technique_adds",
    "test_checkpointing[full]": "measured 48.5 ms, predicted 36.9 ms: the group's drift, as in checkpointing[none]",
}
CPU4_MISSES: dict[str, str] = {
    "test_train_step[gpt-32-true]":
        "measured 33.9 ms, predicted 28.3 ms (-16.6%): the same step measured 30.4 and 31.6 ms in the accumulation "
        "and checkpointing groups of this run (-6.9% and -10.4%)",
    "test_train_step[mlp-bf16-mixed]": f"measured 23.9 ms, predicted 16.4 ms: {_FAULTS}",
}
_FAST_CALIBRATION = ("this run's roofline group caught the machine in a faster phase than its steps: the copy and "
                     "in-place bandwidths measured 41.5 and 114.8 GB/s, against 33.1 / 67.1 and 26.7 / 59.3 GB/s in "
                     "the two runs before")
CPU5_MISSES: dict[str, str] = {
    "test_train_step[gpt-bf16-mixed]": f"measured 34.9 ms, predicted 27.3 ms (-21.8%): {_FAST_CALIBRATION}",
    "test_train_step[mlp-32-true]":
        f"measured 24.5 ms, predicted 18.2 ms: most of the MLP's step is its AdamW update over 6.3 M parameters, "
        f"charged at the in-place bandwidth; {_FAST_CALIBRATION}",
    "test_train_step[mlp-bf16-mixed]": "measured 20.6 ms, predicted 11.7 ms: as the 32-true MLP step",
    "test_same_effective_batch[4x]":
        "measured 41.5 ms, predicted 32.3 ms, below the 1 x 8 step's 32.8: the calibration timed gpt-tiny's "
        "1,024-row matmuls at 142 GFLOP/s on average and the 256-row ones of the micro-batches at 157, the "
        "machine's speed drifting within the group (the run before: 177 and 177)",
}

_DRIFT6 = ("the same step measured 31.8 ms (precision), 37.4 (accumulation) and 38.4 (checkpointing) in this run, "
           "its calibration timed in a fast phase; predicted from ceilings measured in the same rounds as the step "
           "(test_step_prediction_same_rounds), it came out +5.0%")
CPU6_MISSES: dict[str, str] = {
    "test_train_step[gpt-32-true]": f"measured 31.8 ms, predicted 26.0 ms (-18.2%): {_DRIFT6}",
    "test_train_step[mlp-32-true]":
        "measured 25.8 ms, predicted 19.7 ms (-23.7%): in the same rounds as its ceilings -8.6%",
    "test_train_step[mlp-bf16-mixed]":
        "measured 19.7 ms, predicted 15.6 ms (-20.7%): in the same rounds as its ceilings -6.5%",
    "test_same_effective_batch[1x]": f"measured 37.4 ms, predicted 26.0 ms: {_DRIFT6}",
    "test_same_effective_batch[4x]": f"measured 54.0 ms, predicted 28.7 ms: {_DRIFT6}; and 4 x 2 added 18.1 ms "
                                     "to 1 x 8 timed round-robin (3.7 and 7.0 ms in the two runs before)",
    "test_checkpointing[none]": f"measured 38.4 ms, predicted 26.0 ms: {_DRIFT6}",
    "test_checkpointing[every-other]": f"measured 43.3 ms, predicted 28.4 ms: {_DRIFT6}",
    "test_checkpointing[full]": f"measured 46.8 ms, predicted 30.8 ms: {_DRIFT6}",
}

REPLAY: list[tuple[str, Path, str, dict[str, Any], float, str | None]] = [
    ("h200", H200, "test_train_step[gpt-32-true]", {**_H200_GPT, "recipe": "32-true"}, 0.10, None),
    ("h200", H200, "test_train_step[mlp-32-true]", {**_H200_MLP, "recipe": "32-true"}, 0.10, None),
    ("h200", H200, "test_train_step[mlp-bf16-mixed]", {**_H200_MLP, "recipe": "bf16-mixed"}, 0.10, None),
    ("h200", H200, "test_train_step[mlp-16-mixed]", {**_H200_MLP, "recipe": "16-mixed"}, 0.10, None),
    ("h200", H200, "test_train_step[gpt-bf16-mixed]", {**_H200_GPT, "recipe": "bf16-mixed"}, 0.10,
     "measured 72.7 ms, predicted 39.3 ms: GPT-2 small's GEMMs (k = 768) and the flash-attention kernel run well "
     "below the 8192^3 matmul rate, the only bf16 shape the run measured; eager elementwise kernels below the copy "
     "bandwidth"),
    ("h200", H200, "test_train_step[gpt-16-mixed]", {**_H200_GPT, "recipe": "16-mixed"}, 0.10,
     "measured 78.3 ms, predicted 40.1 ms: as bf16-mixed (small-k GEMMs and flash attention below the one "
     "measured 8192^3 rate)"),
    *[("cpu-0003", CPU3, name, case, 0.15, CPU3_MISSES.get(name)) for name, case in CPU_STEPS],
    *[("cpu-0004", CPU4, name, case, 0.15, CPU4_MISSES.get(name)) for name, case in CPU_STEPS],
    *[("cpu-0005", CPU5, name, case, 0.15, CPU5_MISSES.get(name)) for name, case in CPU_STEPS],
    *[("cpu-0006", CPU6, name, case, 0.15, CPU6_MISSES.get(name)) for name, case in CPU_STEPS],
]


@pytest.mark.parametrize(("machine", "path", "name", "case", "tolerance", "xfail"),
                         [pytest.param(*r, marks=[pytest.mark.xfail(strict=True, reason=r[5])] if r[5] else [],
                                       id=f"{r[0]}-{r[2]}") for r in REPLAY])
def test_replay_recorded_step(machine: str, path: Path, name: str, case: dict[str, Any], tolerance: float,
                              xfail: str | None) -> None:
    measured = _measured(path, name)
    predicted = _predict(path, case)
    error = predicted / measured - 1
    assert math.isfinite(error)
    assert abs(error) <= tolerance, (f"{machine} {name}: predicted {predicted * 1e3:.2f} ms against measured "
                                     f"{measured * 1e3:.2f} ms ({error:+.1%})")


_MLP_OPTIMIZER = ("this run recorded no phase times; runs 0010 and 0011, which did, measured the MLP's optimizer "
                  "phase (AdamW foreach over 6.3 M parameters, and zero_grad) at 11.5 and 10.6 ms against 7.3 and "
                  "9.4 predicted: the bandwidth of x.mul_ over 64 MiB (58.6 to 113.8 GB/s between runs) is not what "
                  "the optimizer's updates reach inside the step")
AT_SPEED_MISSES: dict[tuple[str, str], str] = {
    ("0009", "test_train_step[mlp-32-true]"): f"measured 23.1 ms, predicted 19.3 ms (-16.1%): {_MLP_OPTIMIZER}",
    ("0009", "test_train_step[mlp-bf16-mixed]"): f"measured 18.2 ms, predicted 14.6 ms (-19.9%): {_MLP_OPTIMIZER}",
    ("0009", "test_train_step[mlp-16-mixed]"): f"measured 860 ms, predicted 726 ms (-15.6%): {_MLP_OPTIMIZER}",
    ("0010", "test_train_step[gpt-bf16-mixed]"):
        "measured 28.6 ms, predicted 33.5 ms (+17.0%): this run's one-token bf16-mixed step took 2.15 ms in the "
        "forward (47.5 us for each of its 42 launches; 35.1 and 28.3 us in runs 0009 and 0011) with the host probe "
        "at 1.01 us as in the others: the host floor moved, the probe did not; the forward then came out 8.3 ms "
        "against 7.4 measured, the backward 22.4 against 19.2",
}
_FIRST_GROUP = ("the accumulation and checkpointing groups run first in the session, and in this run they ran slow: "
                "the 1 x 8 step measured {first} ms there against {later} ms for the same step in the precision group "
                "later, with the matmul probe at {probe} GFLOP/s against {later_probe} and the copy probe faster "
                "({copy} GB/s against {later_copy}): the probes do not see what slowed the steps. Run alone, twice "
                "(pytest benchmarks/performance/test_accumulation_checkpointing.py), the five steps of these groups "
                "measured within 4.4% of run 0014's predictions for them")
AT_SPEED_MISSES.update({
    ("0012", "test_train_step[gpt-bf16-mixed]"):
        "measured 42.5 ms, predicted 33.4 ms (-21.5%): its backward took 30.1 ms against 23.6 predicted; the same step "
        "measured 28.6 to 36.8 ms in runs 0009 to 0011, and the matmul probe's 155 GFLOP/s (181 to 195 in the other "
        "steps of the run) carried part of it",
    **{("0013", name): f"measured {m}, predicted {p}: " + _FIRST_GROUP.format(
        first="37.3", later="33.8", probe="166", later_probe="182", copy="26", later_copy="24")
       for name, m, p in (("test_same_effective_batch[4x]", "45.1 ms", "38.2 ms (-15.2%)"),
                          ("test_checkpointing[full]", "45.8 ms", "38.6 ms (-15.6%)"))},
    **{("0014", name): f"measured {m}, predicted {p}: " + _FIRST_GROUP.format(
        first="36.4", later="31.8", probe="183", later_probe="191", copy="38", later_copy="30")
       for name, m, p in (("test_same_effective_batch[1x]", "36.4 ms", "30.8 ms (-15.6%)"),
                          ("test_same_effective_batch[4x]", "53.3 ms", "40.4 ms (-24.1%)"),
                          ("test_checkpointing[none]", "37.8 ms", "30.8 ms (-18.4%)"))},
    **{("0014", name): f"measured {m}, predicted {p}: its forward took {f} and its backward {b} ms against {pf} "
                       f"and {pb} predicted, the optimizer within 12%; the matmul probe read 191 and 179 GFLOP/s, "
                       "as in the gpt-tiny steps of the run that came out within 6%"
       for name, m, p, f, b, pf, pb in (
           ("test_train_step[mlp-32-true]", "23.7 ms", "19.9 ms (-16.2%)", "4.8", "7.5", "3.5", "6.0"),
           ("test_train_step[mlp-bf16-mixed]", "19.8 ms", "16.7 ms (-15.5%)", "3.3", "4.9", "2.7", "4.0"))},
})
AT_SPEED_MISSES[("0015", "test_train_step[mlp-32-true]")] = (
    "measured 25.8 ms, predicted 21.7 ms (-15.7%): the step's probes read the matmul at 169 GFLOP/s and the copy at "
    "45 GB/s, against 177 to 192 and 29 to 33 in the other steps of the run: a slow phase, in which the copy runs "
    "faster while the step runs slower (see the README); carried by the copy probe, the optimizer was predicted at "
    "7.9 ms against 9.8 measured")
_SLOW_PHASE = ("the small-op probe read {small} us a copy of 256 KiB and the copy probe {copy} GB/s, against 4.20 to "
               "4.65 us and 32.2 to 35.1 GB/s in the run's six steps timed in a calm phase (five of them within "
               "11.1%, the sixth the forward alone): a slow phase, which the probes detect but whose cost to the step "
               "the model does not know (see the README)")
AT_SPEED_MISSES.update({
    ("0018", name): f"measured {m}, predicted {p}: " + _SLOW_PHASE.format(small=small, copy=copy)
    for name, m, p, small, copy in (
        ("test_train_step[mlp-32-true]", "26.4 ms", "16.7 ms (-36.9%)", "7.05", "48.3"),
        ("test_same_effective_batch[4x]", "50.6 ms", "38.7 ms (-23.6%)", "5.70", "51.5"),
        ("test_checkpointing[none]", "36.6 ms", "30.2 ms (-17.6%)", "5.79", "49.7"),
        ("test_checkpointing[every-other]", "40.7 ms", "33.9 ms (-16.7%)", "5.70", "51.0"))})
AT_SPEED_MISSES[("0018", "test_compile_forward[eager]")] = (
    "measured 7.84 ms, predicted 9.32 ms (+18.8%): every probe read as in the calm steps of the run (matmul 193 "
    "GFLOP/s, copy 34.8 GB/s, small op 4.24 us); run 0017 measured the same forward at 9.50 ms with its probes at "
    "194 GFLOP/s, 34.1 GB/s and 4.21 us: the forward alone moved 18% between runs that the probes cannot tell apart")
AT_SPEED: list[tuple[str, Path]] = [("0009", CPU9), ("0010", CPU10), ("0011", CPU11), ("0012", CPU12),
                                    ("0013", CPU13), ("0014", CPU14), ("0015", CPU15), ("0016", CPU16),
                                    ("0017", CPU17), ("0018", CPU18), ("0019", CPU19), ("0020", CPU20),
                                    ("0021", CPU21), ("0022", CPU22), ("0023", CPU23), ("0024", CPU24)]


@pytest.mark.parametrize(("run", "path", "name", "case"), [
    pytest.param(run, path, name, case, id=f"{run}-{name}",
                 marks=[pytest.mark.xfail(strict=True, reason=AT_SPEED_MISSES[(run, name)])]
                 if (run, name) in AT_SPEED_MISSES else [])
    for run, path in AT_SPEED for name, case in CPU_STEPS])
def test_replay_recorded_step_at_its_speed(run: str, path: Path, name: str, case: dict[str, Any]) -> None:
    # the step predicted from the run's ceilings, each carried from the machine speed it was measured at to the
    # speed the step's own rounds measured (never from the step's time): within 15%, as the CPU target
    result = _result(path, name)
    speed = MachineSpeed.from_record(result.extra_info.get("machine_speed"))
    assert speed is not None, f"{run} {name} recorded no machine speed"
    measured, predicted = float(result.median), _predict(path, case, at=speed)
    error = predicted / measured - 1
    assert abs(error) <= 0.15, (f"{run} {name}: predicted {predicted * 1e3:.2f} ms against measured "
                                f"{measured * 1e3:.2f} ms ({error:+.1%})")


def test_the_at_speed_misses_name_recorded_steps() -> None:
    assert set(AT_SPEED_MISSES) <= {(run, name) for run, _ in AT_SPEED for name, _ in CPU_STEPS}


def test_the_later_runs_record_one_thread_and_the_cache() -> None:
    # what the single-thread replays stand on: the runs say so themselves, and the runs before them say nothing
    from torchledger.reporting.calibration import run_cpu_threads
    from torchledger.reporting.results import load_run

    threads = {run: run_cpu_threads(load_run(path)) for run, path in AT_SPEED}
    assert threads == {run: (1 if run >= "0019" else None) for run, _ in AT_SPEED}
    # and from run 0022 on, the last-level cache the forward's weight reads are judged against (32 MiB, lscpu)
    assert {run: read_calibration(path).cache_bytes for run, path in AT_SPEED} == {
        run: (32 * 2**20 if run >= "0022" else None) for run, _ in AT_SPEED}


# ----------------------------------------------------------------------------------------------- calibration, CLI


def test_calibration_reads_the_h200_run() -> None:
    cal = read_calibration(H200)
    assert cal.kind == "cuda" and cal.device == "NVIDIA H200"
    # bf16 8192^3 (2 * 8192^3 = 1,099,511,627,776 FLOP): the roofline group's median 1.415394 ms and the precision
    # group's 1.461979 ms, averaged as rates
    flops = 2 * 8192**3
    assert [(p.m, p.k, p.n) for p in cal.matmul["bf16"]] == [(8192, 8192, 8192)]
    assert cal.matmul["bf16"][0].flops_per_s == pytest.approx((flops / 0.001415393999998571
                                                               + flops / 0.0014619785000036245) / 2)
    # the copy: 4 GiB read + written (bytes_moved 4,294,967,296) in a median 1.036936 ms
    assert cal.bandwidth == pytest.approx(4294967296 / 0.0010369364999931463)
    assert cal.peak("bf16") == 989.4e12  # the table's H200 SXM entry, for MFU


def test_calibration_reads_the_cpu_run() -> None:
    cal = read_calibration(CPU)
    assert cal.kind == "cpu" and cal.peak("fp32") is None
    # the newest run: fp32 at 512^3 (precision) and 1024^3 (roofline)
    assert [p.m for p in cal.matmul["fp32"]] == [512, 1024]
    assert cal.matmul["fp32"][1].flops_per_s == pytest.approx(2 * 1024**3 / 0.011141, rel=1e-4)


def test_calibration_refuses_what_holds_no_run(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no benchmark run"):
        read_calibration(tmp_path)
    with pytest.raises(ValueError, match="machines"):
        read_calibration(RESULTS)


def test_calibration_reads_the_runs_made_at_a_thread_count(tmp_path: Path) -> None:
    # two runs of one machine: the older (run 0002, at torch's default, as every run before --ledger-threads) and a
    # newer copy of it made on one thread with its 1024^3 fp32 matmul twice as slow
    older = json.loads(CPU.read_text())
    newer = json.loads(CPU.read_text())
    newer["datetime"], newer["commit_info"]["id"] = "2026-11-28T00:00:00.000000+00:00", "f" * 40
    newer["machine_info"]["torchledger"]["cpu_threads"] = 1
    for bench in newer["benchmarks"]:
        if bench["name"] == "test_biggest_matmul[fp32]":  # the 1024^3 fp32 matmul of the roofline group
            bench["stats"]["median"] *= 2
    folder = tmp_path / CPU.parent.parent.name / CPU.parent.name
    folder.mkdir(parents=True)
    (folder / CPU.name).write_text(json.dumps(older))
    (folder / "0003_newer.json").write_text(json.dumps(newer))
    rate = 2 * 1024**3 / 0.011141  # run 0002's 1024^3 fp32 matmul, as test_calibration_reads_the_cpu_run reads it
    assert read_calibration(folder.parent).matmul["fp32"][1].flops_per_s == pytest.approx(rate / 2, rel=1e-4)
    assert read_calibration(folder.parent, cpu_threads=1).matmul["fp32"][1].flops_per_s == \
        pytest.approx(rate / 2, rel=1e-4)
    assert read_calibration(folder.parent, cpu_threads=None).matmul["fp32"][1].flops_per_s == \
        pytest.approx(rate, rel=1e-4)
    with pytest.raises(ValueError, match="no benchmark run made at cpu_threads=4"):
        read_calibration(folder.parent, cpu_threads=4)
    with pytest.raises(ValueError, match="cpu_threads must be"):
        read_calibration(folder.parent, cpu_threads=0)


@pytest.mark.parametrize("machine", ["cpu", "h200"])
def test_calibration_reads_the_cpu_s_last_level_cache(tmp_path: Path, machine: str) -> None:
    # a run records its CPU's last-level cache (llc_bytes); a CPU run's matmuls were timed with their operands
    # cached, so its calibration keeps the size; a GPU run's were not, so it keeps none
    source = CPU if machine == "cpu" else H200
    run = json.loads(source.read_text())
    run["machine_info"]["torchledger"]["llc_bytes"] = 32 * 2**20
    out = tmp_path / source.parent.parent.name / source.parent.name / source.name
    out.parent.mkdir(parents=True)
    out.write_text(json.dumps(run))
    cal = read_calibration(out)
    assert cal.cache_bytes == (32 * 2**20 if machine == "cpu" else None)
    assert read_calibration(source).cache_bytes is None  # recorded before llc_bytes: unknown


def _with_results(tmp_path: Path, entries: list[tuple[str, dict[str, Any]]]) -> Path:
    """The CPU run with synthetic roofline results added, (test name, extra_info) each, written under tmp_path."""
    run = json.loads(CPU.read_text())
    copy = next(b for b in run["benchmarks"] if b["name"] == "test_copy_bandwidth")
    for i, (test, extra) in enumerate(entries):
        run["benchmarks"].append({**copy, "name": f"{test}[{i}]", "group": "roofline",
                                  "fullname": f"benchmarks/performance/test_launch.py::{test}[{i}]",
                                  "extra_info": extra})
    out = tmp_path / CPU.parent.parent.name / CPU.parent.name / CPU.name
    out.parent.mkdir(parents=True)
    out.write_text(json.dumps(run))
    return out


# the tiny stack of test_host_overhead: 64 Linear(8, 8) with ReLU between them, batch 1
_STACK = MLPSpec((8,) * 65)


def test_calibration_reads_the_host_cost_per_op(tmp_path: Path) -> None:
    # the recorded run has no host benchmark: the documented 10 us of a CPU op for every phase, and the source says so
    documented = read_calibration(CPU)
    assert documented.launch_s == 10e-6 and documented.host_s == {}
    assert all(documented.per_launch(p) == 10e-6 for p in ("forward", "backward", "recompute", "optimizer"))
    assert "10 us documented for cpu" in documented.source and "test_host_overhead" in documented.source
    # a run that measured it twice: 6 and 8 us forward, 4 and 6 us backward, 2 and 3 us optimizer, averaged; a result
    # without figures (benchmarking disabled: None), the other stack's result (per dispatched kernel, not per
    # launch of the model) and the bare launch (1.2 us: not a step's op) are not charged
    host = [("test_host_overhead", {"host_overhead_s": {"forward": 6e-6, "backward": 4e-6, "optimizer": 2e-6}}),
            ("test_host_overhead", {"host_overhead_s": {"forward": 8e-6, "backward": 6e-6, "optimizer": 3e-6}}),
            ("test_host_overhead", {"host_overhead_s": None}),
            ("test_host_overhead", {"per_kernel_s": {"forward": 1e-3, "backward": 1e-3, "optimizer": 1e-3}}),
            ("test_launch_overhead", {"launch_overhead_s": 1.2e-6})]
    cal = read_calibration(_with_results(tmp_path, host))
    assert cal.host_s == pytest.approx({"forward": 7e-6, "backward": 5e-6, "optimizer": 2.5e-6})
    assert cal.launch_s == 10e-6
    assert "host cost per op measured (test_host_overhead): forward 7 us, backward 5 us, optimizer 2.5 us" \
        in cal.source
    assert cal.matmul == documented.matmul and cal.bandwidth == documented.bandwidth  # the rest: the same run's
    # per phase in the step: the stack's own op list. Forward: 64 addmm, 63 relu, 1 log_softmax = 128 launches;
    # backward: 63 dgrad mm (the first layer's input needs none), 64 wgrad mm, 64 bias sums, 63 relu backward, 3 for
    # nll + log_softmax = 257; optimizer: AdamW foreach on the CPU, 8 kernels x 128 tensors, one by one = 1,024
    ops = mlp_step_ops(_STACK, 1, device="cpu")
    t = step_time(ops, cal, tokens=1, model_flops=0)
    assert t.phases["forward"].launch_s == pytest.approx(128 * 7e-6)
    assert t.phases["backward"].launch_s == pytest.approx(257 * 5e-6)
    assert t.phases["optimizer"].launch_s == pytest.approx(1024 * 2.5e-6)
    # a run with the forward alone measured: the others fall back to the documented figure, and the source says so
    partial = read_calibration(_with_results(tmp_path / "partial",
                                             [("test_host_overhead", {"host_overhead_s": {"forward": 6e-6}})]))
    assert partial.per_launch("forward") == 6e-6 and partial.per_launch("backward") == 10e-6
    assert "backward, optimizer 10 us documented for cpu" in partial.source
    # only the figure counts: a result with none falls back as a run without one does
    assert read_calibration(_with_results(tmp_path / "none", [("test_host_overhead", {})])).host_s == {}


def test_calibration_reads_the_copy_as_the_benchmark_records_it_now(tmp_path: Path) -> None:
    # test_copy_bandwidth records the bytes copied as work.bytes (ledger.time keeps bytes_moved for its comparable
    # figure only): a copy reads and writes them, 2 x 64 MiB over the median
    run = json.loads(CPU.read_text())
    copy = next(b for b in run["benchmarks"] if b["name"] == "test_copy_bandwidth")
    copy["extra_info"] = {"work": {"profile": "small", "bytes": 64 * 2**20}}
    copy["stats"]["median"] = 0.004
    out = tmp_path / CPU.parent.parent.name / CPU.parent.name / CPU.name
    out.parent.mkdir(parents=True)
    out.write_text(json.dumps(run))
    assert read_calibration(out).bandwidth == pytest.approx(2 * 64 * 2**20 / 0.004)


def test_launches_are_charged_per_phase() -> None:
    cal = _cal(launch_s=10e-6, host_s={"forward": 7e-6, "backward": 5e-6, "optimizer": 2e-6})
    ops = [Op("a", "forward", bytes=0, launches=2), Op("b", "backward", bytes=0, launches=3, count=2),
           Op("c", "recompute", bytes=0, launches=1), Op("d", "optimizer", bytes=0, launches=4)]
    t = step_time(ops, cal, tokens=1, model_flops=0)
    assert t.phases["forward"].launch_s == pytest.approx(2 * 7e-6)
    assert t.phases["backward"].launch_s == pytest.approx(3 * 2 * 5e-6)
    assert t.phases["recompute"].launch_s == pytest.approx(7e-6)  # the forward's ops again: the forward's figure
    assert t.phases["optimizer"].launch_s == pytest.approx(4 * 2e-6)
    assert t.phases["optimizer"].bound == "launch"
    # a phase measured on its own keeps its figure; a phase not measured takes launch_s
    assert _cal(launch_s=10e-6, host_s={"recompute": 9e-6}).per_launch("recompute") == 9e-6
    assert _cal(launch_s=10e-6, host_s={"backward": 5e-6}).per_launch("forward") == 10e-6
    assert _cal(launch_s=10e-6, host_s={"backward": 5e-6}).per_launch("recompute") == 10e-6
    with pytest.raises(ValueError, match="host_s='communication'"):
        _cal(host_s={"communication": 1e-6})
    with pytest.raises(ValueError, match="host_s\\['forward'\\]"):
        _cal(host_s={"forward": -1e-6})
    with pytest.raises(ValueError, match="phase='sideways'"):
        _cal().per_launch("sideways")


def test_estimate_gpu_prints_time(capsys: pytest.CaptureFixture[str]) -> None:
    from torchledger.cli import main

    assert main(["estimate", "--model", "llama-7b", "--seq-len", "4096", "--precision", "bf16-mixed",
                 "--checkpointing", "full", "--gpu", "h100-sxm", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    t = out["time"]
    assert set(t) >= {"step_s", "tokens_per_s", "mfu", "hfu", "phases"}
    assert t["tokens_per_s"] == pytest.approx(4096 / t["step_s"])
    assert t["step_s"] == pytest.approx(sum(p["seconds"] for p in t["phases"].values()))
    assert all(p["bound"] in ("compute", "memory", "launch", "communication") for p in t["phases"].values())
    assert t["phases"]["recompute"]["seconds"] > 0 and t["hfu"] > t["mfu"]
    # the flops keys of before stay; MFU's and HFU's numerators are named apart
    f = out["flops"]
    assert f["per_token_train"] == f["per_token_hardware"] > f["per_token_model"]
    assert f["per_token_model"] == (f["forward"] + f["backward"]) / 4096
    assert main(["estimate", "--model", "gpt2-small", "--seq-len", "1024", "--batch-size", "16",
                 "--calibration", str(H200)]) == 0
    table = capsys.readouterr().out
    assert "step time (predicted)" in table and "NVIDIA H200" in table and "MFU / HFU" in table


def test_estimate_without_gpu_has_no_time(capsys: pytest.CaptureFixture[str]) -> None:
    from torchledger.cli import main

    assert main(["estimate", "--model", "gpt2-small", "--json"]) == 0
    assert "time" not in json.loads(capsys.readouterr().out)


def test_estimate_bad_calibration_exits_2(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    from torchledger.cli import main

    assert main(["estimate", "--model", "gpt2-small", "--calibration", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"torchledger estimate: error: --calibration {tmp_path}")
    assert len(err.strip().splitlines()) == 1
    assert main(["plan", "--model", "gpt2-small", "--gpu", "h100-sxm", "--gpus", "8", "--global-batch-tokens",
                 str(8 * 1024), "--calibration", str(tmp_path)]) == 2
    assert capsys.readouterr().err.startswith(f"torchledger plan: error: --calibration {tmp_path}")


def test_step_time_validates() -> None:
    with pytest.raises(ValueError, match="communication_s"):
        step_time([], _cal(), tokens=1, model_flops=0, communication_s=-1.0)
    with pytest.raises(ValueError, match="phase="):
        step_time([Op("x", "sideways", bytes=1)], _cal(), tokens=1, model_flops=0)
    with pytest.raises(ValueError, match="bandwidth"):
        _cal(bandwidth=0)


def test_measured_shape_wins_over_interpolation() -> None:
    skinny = MatmulPoint(16384, 768, 2304, 300e12)  # 2 * 16384 * 768 * 2304 FLOP, measured at 300 TFLOP/s
    cal = _cal(matmul={"bf16": (MatmulPoint(1024, 1024, 1024, 100e12), skinny,
                                MatmulPoint(8192, 8192, 8192, 800e12))})
    assert cal.matmul_rate("bf16", 16384, 768, 2304) == 300e12
    # (2304, 16384, 768) has the same FLOPs but is not the measured shape: the equal-FLOPs point's rate
    assert cal.matmul_rate("bf16", 2304, 16384, 768) == 300e12
    # between the skinny shape (log2 MACs = log2(16384 * 768 * 2304)) and 8192^3 (2^39): linear in log(FLOPs)
    lo, hi = math.log(16384 * 768 * 2304), math.log(8192**3)
    x = math.log(4096 * 4096 * 4096)
    assert cal.matmul_rate("bf16", 4096, 4096, 4096) == pytest.approx(300e12 + (x - lo) / (hi - lo) * 500e12)


def test_communication_is_its_own_phase() -> None:
    from torchledger.formulas.planner import config_time

    cal = datasheet_calibration(get_device("H100 SXM"))
    one = config_time(get_preset("gpt2-small"), 4, 1024, cal, precision="bf16-mixed")
    ddp = config_time(get_preset("gpt2-small"), 4, 1024, cal, precision="bf16-mixed", world_size=8,
                      link_bandwidth=50e9)
    assert one.phases["communication"].seconds == 0
    # DDP all-reduces the fp32 gradients once per step: a ring sends 2 (N - 1) / N of them per rank
    sent = 2 * 7 * 124_439_808 * 4 / 8
    assert ddp.phases["communication"].seconds == pytest.approx(sent / 50e9, rel=1e-6)
    assert ddp.phases["communication"].bound == "communication"
    assert ddp.step_s == pytest.approx(one.step_s + sent / 50e9, rel=1e-6)
    assert ddp.tokens_per_s == pytest.approx(8 * 4 * 1024 / ddp.step_s)  # over all ranks


def test_estimate_time_takes_the_interconnects_seconds(capsys: pytest.CaptureFixture[str]) -> None:
    from torchledger.cli import main

    args = ["estimate", "--model", "llama-tiny", "--world-size", "8", "--sharding", "fsdp", "--gpu", "h100-sxm",
            "--json"]
    assert main([*args, "--interconnect", "nvlink4"]) == 0
    out = json.loads(capsys.readouterr().out)
    total = out["communication_time"]["seconds"]["total"]
    assert out["time"]["phases"]["communication"]["seconds"] == pytest.approx(total)


def test_estimate_on_a_gpu_without_the_dtype_keeps_the_fit(capsys: pytest.CaptureFixture[str]) -> None:
    from torchledger.cli import main

    # the T4 has no bf16 tensor-core path in the table: the fit is answered, the time is not predicted
    assert main(["estimate", "--model", "gpt-tiny", "--gpu", "t4", "--precision", "bf16-mixed", "--json"]) == 0
    captured = capsys.readouterr()
    out = json.loads(captured.out)
    assert "time" not in out and out["fits"] is True
    assert "no step time: T4 has no bf16 matmul path" in captured.err


# ----------------------------------------------------------------------------------------------- measured kernels


def test_a_measured_kernel_takes_its_units_over_its_rate() -> None:
    # GELU over 1,000,000 fp32 elements: 8 MB read and written, 4 us at 2 TB/s; measured at 1e9 elements/s it takes
    # 1 ms, and that is its time (plus its launch). Unmeasured (another dtype, another kernel), its bytes stay.
    op = Op("mlp.act", "forward", bytes=8_000_000, dtype="fp32", kernel="gelu", units=1_000_000)
    cal = _cal(kernels=(KernelPoint("gelu", "fp32", 1_000_000, 1e9),))
    assert op_seconds(op, cal) == pytest.approx((1e-3, 4e-6, 5e-6))
    assert step_time([op], cal, tokens=1, model_flops=0).phases["forward"].bound == "compute"
    assert op_seconds(op, _cal(kernels=(KernelPoint("gelu", "bf16", 1_000_000, 1e9),)))[0] == 0.0
    assert op_seconds(op, _cal(kernels=(KernelPoint("silu", "fp32", 1_000_000, 1e9),)))[0] == 0.0
    # the dtype's names are one: float32 is fp32
    assert op_seconds(op, _cal(kernels=(KernelPoint("gelu", "float32", 1_000_000, 1e9),)))[0] == pytest.approx(1e-3)


def test_a_measured_attention_kernel_replaces_the_gemm_rate() -> None:
    # attention of 8 x 4 heads x 128 x 32: 4 B H T^2 D = 67,108,864 FLOPs (attention_flops); at the bf16 GEMM rate
    # of _cal's smallest shape, 100 TFLOP/s, 0.67 us; measured at 20 TFLOP/s, 3.36 us
    flops = F.attention_flops(8, 4, 128, 128, 32)
    assert flops == 4 * 8 * 4 * 128 * 128 * 32
    op = Op("attention", "forward", flops=flops, bytes=0, shape=(4096, 32, 128), dtype="bf16", kernel="attention",
            units=flops)
    assert op_seconds(op, _cal())[0] == pytest.approx(flops / 100e12)
    measured = _cal(kernels=(KernelPoint("attention", "bf16", flops, 20e12),))
    assert op_seconds(op, measured)[0] == pytest.approx(flops / 20e12)


def test_kernel_rates_interpolate_in_log_units() -> None:
    # measured at 1e4 units (1e9/s) and 1e6 units (3e9/s): 1e5 units lies halfway in log, 2e9/s; outside, held
    cal = _cal(kernels=(KernelPoint("layer_norm", "fp32", 10_000, 1e9), KernelPoint("layer_norm", "fp32", 10**6, 3e9),
                        KernelPoint("layer_norm", "fp32", 10**6, 5e9)))  # two of one size: averaged, 4e9
    assert cal.kernel_rate("layer_norm", "fp32", 10**6) == pytest.approx(4e9)
    assert cal.kernel_rate("layer_norm", "fp32", 10**5) == pytest.approx(2.5e9)
    assert cal.kernel_rate("layer_norm", "fp32", 10) == pytest.approx(1e9)
    assert cal.kernel_rate("layer_norm", "fp32", 10**9) == pytest.approx(4e9)
    assert cal.kernel_rate("layer_norm_backward", "fp32", 10**6) is None


def test_kernel_points_validate() -> None:
    with pytest.raises(ValueError, match="kernel='softmax'"):
        KernelPoint("softmax", "fp32", 10, 1.0)
    with pytest.raises(ValueError, match="units"):
        KernelPoint("gelu", "fp32", 0, 1.0)
    with pytest.raises(ValueError, match="per_s"):
        KernelPoint("gelu_backward", "fp32", 10, 0.0)
    with pytest.raises(ValueError, match="kernel='mm'"):
        _cal().kernel_rate("mm", "fp32", 10)


@pytest.mark.parametrize(("model", "precision", "norm", "act", "act_dtype", "loss_dtype"), [
    ("gpt-tiny", "32-true", "layer_norm", "gelu", "fp32", "fp32"),
    ("gpt-tiny", "bf16-mixed", "layer_norm", "gelu", "bf16", "fp32"),
    ("llama-tiny", "16-mixed", "rms_norm", "silu", "fp16", "fp32"),
    ("llama-tiny", "bf16-true", "rms_norm", "silu", "bf16", "bf16"),
])
def test_op_lists_name_their_kernels(model: str, precision: str, norm: str, act: str, act_dtype: str,
                                     loss_dtype: str) -> None:
    # 2 layers at batch 3 x 16 tokens: n = 48 rows. Norms: 2 per block and the final one over n x d in the residual
    # stream's dtype (fp32 under autocast, whose fp32 list holds layer_norm); the activation over n x d_ff in the
    # matmuls' dtype; cross-entropy over n x vocab, in fp32 under autocast; attention over its FLOPs.
    spec = get_preset(model)
    n = 3 * 16
    ops = transformer_step_ops(spec, 3, 16, precision=precision, device="cpu")
    named = {(op.name, op.phase): op for op in ops if op.kernel}
    stream = "fp32" if precision.endswith("mixed") else loss_dtype
    for name in ("norm_1", "norm_2"):
        assert (named[(name, "forward")].kernel, named[(name, "forward")].units) == (norm, n * spec.d_model)
        assert named[(name, "forward")].count == spec.n_layers
        assert named[(f"{name}.backward", "backward")].kernel == f"{norm}_backward"
        assert named[(name, "forward")].dtype == stream
    assert named[("final_norm", "forward")].kernel == norm
    assert (named[("mlp.act", "forward")].kernel, named[("mlp.act", "forward")].units) == (act, n * spec.d_ff)
    assert named[("mlp.act", "forward")].dtype == named[("mlp.act.backward", "backward")].dtype == act_dtype
    ce = named[("log_softmax", "forward")]
    assert (ce.kernel, ce.units, ce.dtype) == ("cross_entropy", n * spec.vocab_size, loss_dtype)
    assert named[("nll+log_softmax.backward", "backward")].kernel == "cross_entropy_backward"
    att = named[("attention", "forward")]
    assert att.units == att.flops == F.attention_flops(3, spec.n_heads, 16, 16, spec.head_dim)
    assert named[("attention.backward", "backward")].kernel == "attention_backward"
    # the MLP workload's loss: fp32 under autocast, the logits' dtype otherwise
    mlp = {op.name: op for op in mlp_step_ops(MLPSpec((8, 16, 4)), 5, precision=precision) if op.kernel}
    assert (mlp["log_softmax"].units, mlp["log_softmax"].dtype) == (5 * 4, loss_dtype)


def test_calibration_reads_the_kernel_rates(tmp_path: Path) -> None:
    # two gelu fp32 results of one size (0.5 ms and 1.5 ms over 524,288 elements: 1.05e9 and 0.35e9 per s,
    # averaged 0.70e9), a bf16 attention result (67,108,864 FLOPs in 1 ms), and what is not a rate: no units, a
    # kernel this version does not model, a dtype of no peak
    entries = [("test_kernel_rate", {"kernel": "gelu", "dtype": "fp32", "units": 524_288}, 0.5e-3),
               ("test_kernel_rate", {"kernel": "gelu", "dtype": "fp32", "units": 524_288}, 1.5e-3),
               ("test_kernel_rate", {"kernel": "attention", "dtype": "bf16", "units": 67_108_864}, 1e-3),
               ("test_kernel_rate", {"kernel": "gelu", "dtype": "fp32"}, 1e-3),
               ("test_kernel_rate", {"kernel": "softmax", "dtype": "fp32", "units": 10}, 1e-3),
               ("test_kernel_rate", {"kernel": "gelu", "dtype": "int4", "units": 10}, 1e-3)]
    path = _with_results(tmp_path, [(t, e) for t, e, _ in entries])
    run = json.loads(path.read_text())
    for bench, (_, _, median) in zip(run["benchmarks"][-len(entries):], entries, strict=True):
        bench["stats"] = {**bench["stats"], "median": median}
    path.write_text(json.dumps(run))
    cal = read_calibration(path)
    assert cal.kernel_rate("gelu", "fp32", 524_288) == pytest.approx((524_288 / 0.5e-3 + 524_288 / 1.5e-3) / 2)
    assert cal.kernel_rate("attention", "bf16", 1) == pytest.approx(67_108_864 / 1e-3)
    assert cal.kernel_rate("gelu", "bf16", 1) is None
    assert len(cal.kernels) == 2 and "2 kernel rates measured (test_kernel_rate)" in cal.source
    assert read_calibration(CPU).kernels == ()  # the recorded run has none


# ----------------------------------------------------------------------------------------------- layouts, updates


def test_matmul_rate_prefers_the_measured_layout() -> None:
    # one shape measured in two layouts: each layout its own rate; a third layout of that shape the two's mean;
    # another shape interpolates over all points by FLOPs as before
    nt = MatmulPoint(1024, 128, 512, 200e12, "nt")
    tn = MatmulPoint(1024, 128, 512, 100e12, "tn")
    cal = _cal(matmul={"bf16": (MatmulPoint(1024, 1024, 1024, 100e12), nt, tn,
                                MatmulPoint(8192, 8192, 8192, 800e12))})
    assert cal.matmul_rate("bf16", 1024, 128, 512, "nt") == 200e12
    assert cal.matmul_rate("bf16", 1024, 128, 512, "tn") == 100e12
    assert cal.matmul_rate("bf16", 1024, 128, 512, "nn") == pytest.approx(150e12)
    with pytest.raises(ValueError, match="layout='tt'"):
        cal.matmul_rate("bf16", 1024, 128, 512, "tt")
    with pytest.raises(ValueError, match="layout='tt'"):
        MatmulPoint(1, 1, 1, 1.0, "tt")


def test_a_linear_runs_its_three_matmuls_in_their_layouts() -> None:
    # nn.Linear: forward x W^T reads the (out, in) weight transposed (nt); the input gradient dY W (nn); the weight
    # gradient dY^T X reads dY transposed (tn)
    ops = {op.name: op for op in mlp_step_ops(MLPSpec((8, 16, 4)), 5)}
    assert (ops["linear1"].shape, ops["linear1"].layout) == ((5, 16, 4), "nt")
    assert (ops["linear1.dgrad"].shape, ops["linear1.dgrad"].layout) == ((5, 4, 16), "nn")
    assert (ops["linear1.wgrad"].shape, ops["linear1.wgrad"].layout) == ((4, 5, 16), "tn")
    cal = _cal(matmul={"fp32": (MatmulPoint(5, 16, 4, 1e9, "nt"), MatmulPoint(5, 16, 4, 4e9, "nn"))})
    assert op_seconds(ops["linear1"], cal)[0] == pytest.approx(2 * 5 * 16 * 4 / 1e9)


def test_updates_in_place_take_the_update_bandwidth() -> None:
    # AdamW foreach over 1,000 fp32 parameters: 80 bytes each in 8 kernels; all but sqrt(v) update in place. At a
    # copy bandwidth of 1e9 and an update bandwidth of 2e9: sqrt's 8,000 B take 8 us, the other 72,000 B 36 us.
    ops = optimizer_ops(1000, 1, device="cpu")
    assert [op.in_place for op in ops] == [True, True, True, True, False, True, True, True]
    cal = _cal(bandwidth=1e9, update_bandwidth=2e9, launch_s=0.0)
    t = step_time(ops, cal, tokens=1, model_flops=0)
    assert t.phases["optimizer"].memory_s == pytest.approx(8_000 / 1e9 + 72_000 / 2e9)
    # without an update bandwidth measured, the copy's
    assert step_time(ops, _cal(bandwidth=1e9, launch_s=0.0), tokens=1,
                     model_flops=0).phases["optimizer"].memory_s == pytest.approx(80_000 / 1e9)
    # the fused kernel and SGD update in place; accumulation adds into .grad in place
    assert all(op.in_place for op in optimizer_ops(10, 1, optimizer_impl="fused") + optimizer_ops(10, 1,
                                                                                             optimizer="sgd"))
    acc = {op.name: op for op in mlp_step_ops(MLPSpec((8, 4)), 2, grad_accum=3)}
    assert acc["grad_accumulate"].in_place and acc["grad_accumulate"].count == 2
    with pytest.raises(ValueError, match="update_bandwidth"):
        _cal(update_bandwidth=0.0)


def test_calibration_reads_layouts_and_the_update_bandwidth(tmp_path: Path) -> None:
    # a matmul of one shape in two layouts, 2 x 1024 x 128 x 512 FLOPs in 1 ms and 2 ms; an update in place of
    # 64 MiB in 4 ms: 2 x 64 MiB read and written back over 4 ms
    flops = 2 * 1024 * 128 * 512
    entries = [("test_matmul_shape", {"dtype": "fp32", "flops": flops, "shape": [1024, 128, 512], "layout": "nt"},
                1e-3),
               ("test_matmul_shape", {"dtype": "fp32", "flops": flops, "shape": [1024, 128, 512], "layout": "tn"},
                2e-3),
               ("test_update_bandwidth", {"work": {"bytes": 64 * 2**20, "in_place": True}}, 4e-3)]
    path = _with_results(tmp_path, [(t, e) for t, e, _ in entries])
    run = json.loads(path.read_text())
    for bench, (_, _, median) in zip(run["benchmarks"][-len(entries):], entries, strict=True):
        bench["stats"] = {**bench["stats"], "median": median}
    path.write_text(json.dumps(run))
    cal = read_calibration(path)
    assert cal.matmul_rate("fp32", 1024, 128, 512, "nt") == pytest.approx(flops / 1e-3)
    assert cal.matmul_rate("fp32", 1024, 128, 512, "tn") == pytest.approx(flops / 2e-3)
    assert cal.update_bandwidth == pytest.approx(2 * 64 * 2**20 / 4e-3)
    assert read_calibration(CPU).update_bandwidth is None  # the recorded run has none


# ----------------------------------------------------------------------------------------------- machine speed


def test_machine_speed_scales_each_ceiling_by_its_probe() -> None:
    measured_at = MachineSpeed(200e9, 100e9, 1e-6)
    slow = MachineSpeed(80e9, 40e9, 2e-6)  # the EPYC's slow phase: every probe at 40 to 50% of the fast one
    # a rate in proportion to its probe's rate, the host's seconds in proportion to the host probe's seconds
    assert measured_at.scale("compute", 150e9, slow) == pytest.approx(150e9 * 80 / 200)
    assert measured_at.scale("memory", 60e9, slow) == pytest.approx(60e9 * 40 / 100)
    assert measured_at.scale("host", 6e-6, slow) == pytest.approx(12e-6)
    with pytest.raises(ValueError, match=r"kind must be one of .* got 'launch'"):
        measured_at.scale("launch", 1.0, slow)
    with pytest.raises(ValueError, match="copy_bytes_per_s=0"):
        MachineSpeed(1.0, 0, 1.0)
    assert MachineSpeed.median([slow, measured_at, MachineSpeed(100e9, 60e9, 1.5e-6)]) == \
        MachineSpeed(100e9, 60e9, 1.5e-6)
    assert MachineSpeed.from_record({"matmul_flops_per_s": 2.0, "copy_bytes_per_s": 3.0, "host_op_s": 4.0,
                                     "samples": 15}) == MachineSpeed(2.0, 3.0, 4.0)
    for raw in (None, {}, {"matmul_flops_per_s": 2.0, "copy_bytes_per_s": -3.0, "host_op_s": 4.0}, "fast"):
        assert MachineSpeed.from_record(raw) is None


def test_calibration_carries_every_ceiling_to_one_machine_speed(tmp_path: Path) -> None:
    # one 64^3 matmul (524,288 FLOPs) timed at three machine speeds: 10, 20 and 40 us with the matmul probe at 200,
    # 100 and 50 GFLOP/s, the same 0.262144 of the probe each time. Carried to the median speed (100 GFLOP/s) each
    # is 26.2144 GFLOP/s; their plain mean would be 30.58. An update in place of 64 MiB in 4 ms and the host's cost
    # per op (6, 4, 2 us) at the copy probe 30 GB/s and host probe 1 us.
    flops = 2 * 64**3

    def speed(matmul: float) -> dict[str, float]:
        return {"matmul_flops_per_s": matmul, "copy_bytes_per_s": 30e9, "host_op_s": 1e-6, "samples": 5}
    matmul = {"dtype": "fp32", "flops": flops, "shape": [64, 64, 64], "layout": "nt"}
    entries = [("test_matmul_shape", {**matmul, "machine_speed": speed(200e9)}, 10e-6),
               ("test_matmul_shape", {**matmul, "machine_speed": speed(100e9)}, 20e-6),
               ("test_matmul_shape", {**matmul, "machine_speed": speed(50e9)}, 40e-6),
               ("test_update_bandwidth", {"work": {"bytes": 64 * 2**20}, "machine_speed": speed(100e9)}, 4e-3),
               ("test_host_overhead", {"host_overhead_s": {"forward": 6e-6, "backward": 4e-6, "optimizer": 2e-6},
                                       "machine_speed": speed(100e9)}, 1e-3),
               # timed steps are no ceilings: their speeds (here three far slower ones) leave the median alone
               *[("test_train_step", {"machine_speed": speed(1e9)}, 30e-3)] * 3]
    path = _with_results(tmp_path, [(t, e) for t, e, _ in entries])
    run = json.loads(path.read_text())
    for bench, (_, _, median) in zip(run["benchmarks"][-len(entries):], entries, strict=True):
        bench["stats"] = {**bench["stats"], "median": median}
    path.write_text(json.dumps(run))
    median = read_calibration(path)
    assert median.speed == MachineSpeed(100e9, 30e9, 1e-6)
    assert median.matmul_rate("fp32", 64, 64, 64, "nt") == pytest.approx(0.262144 * 100e9)
    assert median.update_bandwidth == pytest.approx(2 * 64 * 2**20 / 4e-3)
    assert median.host_s["forward"] == pytest.approx(6e-6)
    assert "5 results' ceilings carried to the machine speed median (matmul probe 100 GFLOP/s" in median.source
    # a step timed with the probes at 50 GFLOP/s, 15 GB/s and 2 us: every ceiling at that speed
    step = MachineSpeed(50e9, 15e9, 2e-6)
    at_step = read_calibration(path, at=step)
    assert at_step.speed == step and "machine speed of the step" in at_step.source
    assert at_step.matmul_rate("fp32", 64, 64, 64, "nt") == pytest.approx(0.262144 * 50e9)
    assert at_step.update_bandwidth == pytest.approx(2 * 64 * 2**20 / 4e-3 / 2)
    assert at_step.host_s == pytest.approx({"forward": 12e-6, "backward": 8e-6, "optimizer": 4e-6})
    # what recorded no speed is taken as measured: the run's own copy bandwidth, and a run of none
    assert at_step.bandwidth == pytest.approx(median.bandwidth)
    assert read_calibration(CPU).speed is None


def test_calibration_reads_the_host_cost_of_a_model_s_own_step(tmp_path: Path) -> None:
    # gpt-tiny's step at batch 1 and one token: each phase's seconds are the device time the calibration predicts
    # for that size plus 25, 20 and 5 us for each of the phase's launches (27, 49 and 224 as the op list counts
    # them); the calibration recovers the per-launch figures, and for_model puts them in place of host_s
    base = read_calibration(CPU)
    ops = transformer_step_ops(get_preset("gpt-tiny"), 1, 1, precision="32-true", device="cpu")
    per_op = {"forward": 25e-6, "backward": 20e-6, "optimizer": 5e-6}
    launches = {p: sum(op.launches * op.count for op in ops if op.phase == p) for p in per_op}
    assert launches == {"forward": 27, "backward": 49, "optimizer": 224}
    device = {p: sum(op.count * max(op_seconds(op, base)[:2]) for op in ops if op.phase == p) for p in per_op}
    seconds = {p: device[p] + launches[p] * per_op[p] for p in per_op}
    floor = {"model": "gpt-tiny", "recipe": "32-true", "batch": 1, "seq_len": 1, "phase_median_s": seconds}
    path = _with_results(tmp_path, [("test_model_host_cost", floor),
                                    ("test_model_host_cost", {**floor, "recipe": "bf16-mixed", "batch": 0})])
    cal = read_calibration(path)
    assert set(cal.model_host_s) == {("gpt-tiny", "32-true")}  # batch 0 is not a size: left out
    assert cal.model_host_s[("gpt-tiny", "32-true")] == pytest.approx(per_op)
    assert "host cost per op of 1 models measured (test_model_host_cost)" in cal.source
    own = cal.for_model("gpt-tiny", "32-true")
    assert own.per_launch("forward") == pytest.approx(25e-6) and own.per_launch("recompute") == pytest.approx(25e-6)
    assert "host cost per op of gpt-tiny 32-true: forward 25 us" in own.source
    assert cal.for_model("gpt-tiny", "bf16-mixed") is cal and cal.for_model("llama-tiny", "32-true") is cal
    # a phase faster than its predicted device time is charged no host time, not a negative one
    fast = _with_results(tmp_path / "fast", [("test_model_host_cost", {**floor, "phase_median_s": {
        **seconds, "optimizer": device["optimizer"] / 2}})])
    assert read_calibration(fast).model_host_s[("gpt-tiny", "32-true")]["optimizer"] == 0.0
    with pytest.raises(ValueError, match=r"model_host_s\[\('gpt-tiny', '32-true'\)\]\['forward'\]=-1"):
        replace(cal, model_host_s={("gpt-tiny", "32-true"): {"forward": -1}})
    # a GPU's run records the figure and does not apply it: the host overlaps the GPU's work there
    run = json.loads(H200.read_text())
    copy = next(b for b in run["benchmarks"] if b["group"] == "roofline")
    run["benchmarks"].append({**copy, "name": "test_model_host_cost[gpt-32-true]",
                              "fullname": "benchmarks/performance/test_launch.py::test_model_host_cost[gpt-32-true]",
                              "extra_info": {**floor, "model": "gpt2-small"}})
    gpu = tmp_path / "gpu" / H200.parent.parent.name / H200.parent.name / H200.name
    gpu.parent.mkdir(parents=True)
    gpu.write_text(json.dumps(run))
    h200 = read_calibration(gpu)
    assert h200.kind == "cuda" and h200.model_host_s == {} and "test_model_host_cost" not in h200.source


def test_calibration_reads_the_optimizer_s_own_bandwidth(tmp_path: Path) -> None:
    # AdamW foreach over 6,296,064 parameters: 80 bytes each (503,685,120), 48 launches. The recorded CPU run has no
    # host benchmark, so each launch costs the documented 10 us: a step of 503,685,120 / 50e9 s + 48 x 10 us is an
    # update at 50 GB/s
    moved, launches = 503_685_120, 48
    median = moved / 50e9 + launches * 10e-6
    entry = {"optimizer": "adamw", "impl": "foreach", "params": 6_296_064, "tensors": 6, "bytes": moved,
             "launches": launches}
    path = _with_results(tmp_path, [("test_optimizer_update", entry),
                                    ("test_optimizer_update", {**entry, "bytes": None})])  # no bytes: not read
    run = json.loads(path.read_text())
    for bench in run["benchmarks"][-2:]:
        bench["stats"] = {**bench["stats"], "median": median}
    path.write_text(json.dumps(run))
    cal = read_calibration(path)
    assert cal.optimizer_bandwidth == pytest.approx({"adamw.foreach": 50e9})
    assert "adamw.foreach updates measured at 50 GB/s (test_optimizer_update)" in cal.source
    # AdamW foreach's ops take that bandwidth, in place or not; another optimizer's keep the update's or the copy's
    adamw = optimizer_ops(6_296_064, 6, optimizer="adamw", optimizer_impl="foreach", device="cpu")
    assert sum(op_seconds(op, cal)[1] for op in adamw) == pytest.approx(moved / 50e9)
    (sgd,) = optimizer_ops(6_296_064, 6, optimizer="sgd", optimizer_impl="foreach", device="cpu")
    assert op_seconds(sgd, cal)[1] == pytest.approx(sgd.bytes / cal.bandwidth)
    assert read_calibration(CPU).optimizer_bandwidth == {}
    with pytest.raises(ValueError, match=r"optimizer_bandwidth\['adamw.foreach'\]=0"):
        replace(cal, optimizer_bandwidth={"adamw.foreach": 0})


@pytest.mark.parametrize("profile", ["small", "full"])
def test_the_shape_benchmarks_cover_every_matmul_the_profile_times(profile: str) -> None:
    # every matmul of every training step the profile times (the precision group's recipes, the accumulation
    # group's micro-batches, each checkpointing mode's recompute) has its shape and layout measured in the dtypes
    # it runs in: the calibration then holds it exactly and interpolates none of them (on CUDA the micro-batches'
    # shapes are skipped to keep the full profile's time budget, and interpolated)
    from benchmarks.performance.conftest import SIZES
    from benchmarks.performance.test_accumulation_checkpointing import ACCUM
    from benchmarks.performance.test_matmul_shapes import DTYPES, MICRO, step_matmuls

    sizes = SIZES[profile]
    measured = {(op.shape, op.layout, dtype) for name, op in step_matmuls(sizes).items()
                for dtype in (("fp32",) if name.startswith(MICRO) else DTYPES)}
    gpt, mlp = get_preset(sizes["gpt"]), MLPSpec(sizes["mlp"])
    steps = [op for recipe in ("32-true", "bf16-mixed", "16-mixed") for op in
             transformer_step_ops(gpt, sizes["gpt_batch"], sizes["gpt_seq"], precision=recipe)
             + mlp_step_ops(mlp, sizes["mlp_batch"], precision=recipe)]
    steps += transformer_step_ops(gpt, sizes["gpt_batch"] // ACCUM, sizes["gpt_seq"], grad_accum=ACCUM)
    steps += [op for mode in ("every-other", "full") for op in
              transformer_step_ops(gpt, sizes["gpt_batch"], sizes["gpt_seq"], checkpointing=mode)]
    timed = {(op.shape, op.layout, op.dtype) for op in steps if op.flops and op.kernel is None}
    assert timed and timed <= measured, sorted(timed - measured)


# ----------------------------------------------------------------------------------------------- interleaved steps


def _extra_info(path: Path, name: str) -> dict[str, Any]:
    return dict(_result(path, name).extra_info)



# What a technique adds to the step, timed round-robin with the step without it (the shared CPU's drift cancels):
# the benchmark, the variant, the step it is measured against, and the op lists' keywords of each.
INTERLEAVED: list[tuple[Path, str, str, str, dict[str, Any], dict[str, Any], str | None]] = [
    *[(run, "test_checkpointing_interleaved", "every-other", "none", {"checkpointing": "every-other"}, {}, None)
      for run in (CPU4, CPU5)],
    *[(run, "test_checkpointing_interleaved", "full", "none", {"checkpointing": "full"}, {}, None)
      for run in (CPU4, CPU5)],
    (CPU4, "test_accumulation_interleaved", "4x", "1x", {"batch": 2, "accum": 4}, {}, None),
    (CPU5, "test_accumulation_interleaved", "4x", "1x", {"batch": 2, "accum": 4}, {},
     "measured to add 6.95 ms, predicted to save 0.43 ms (-19.7% of the 4 x 2 step): the calibration's matmul "
     "rates drifted within the group (1,024-row shapes 142 GFLOP/s, the micro-batches' 256-row shapes 157)"),
    *[(CPU6, "test_checkpointing_interleaved", mode, "none", {"checkpointing": mode}, {}, None)
      for mode in ("every-other", "full")],
    (CPU6, "test_accumulation_interleaved", "4x", "1x", {"batch": 2, "accum": 4}, {},
     "measured to add 18.1 ms, predicted 2.7 ms (-27.0% of the 4 x 2 step): the same comparison added 3.7 and "
     "7.0 ms in the two runs before, and 7.8, 15.5 and 17.2 ms in three runs of it alone; in part the host's "
     "cost per op of the transformer, which this run's calibration takes from the Linear stack (7.7 us a forward "
     "launch): measured on gpt-tiny itself from run 0009 on (26 to 40 us)"),
    # from run 0009 on, with the host's cost per op measured on the transformer itself
    *[(run, "test_checkpointing_interleaved", mode, "none", {"checkpointing": mode}, {}, None)
      for run in (CPU9, CPU10, CPU11, CPU12, CPU13, CPU14, CPU15, CPU16, CPU17, CPU18, CPU19,
                  CPU20, CPU21, CPU22, CPU23, CPU24)
      for mode in ("every-other", "full")],
    *[(run, "test_accumulation_interleaved", "4x", "1x", {"batch": 2, "accum": 4}, {}, None)
      for run in (CPU9, CPU10, CPU11, CPU12, CPU13, CPU14, CPU15, CPU16, CPU17, CPU18, CPU19,
                  CPU20, CPU21, CPU22, CPU23, CPU24)],
]


# Each step predicted from ceilings measured in the same rounds as the step (test_step_prediction_same_rounds):
# the median over the rounds of predicted over measured, minus one, within 15%.
SAME_ROUNDS = ["gpt-32-true", "gpt-bf16-mixed", "mlp-32-true", "mlp-bf16-mixed"]


SAME_ROUND_RUNS = [("0006", CPU6), ("0007", CPU7), ("0008", CPU8), ("0009", CPU9), ("0010", CPU10),
                   ("0011", CPU11), ("0012", CPU12), ("0013", CPU13), ("0014", CPU14), ("0015", CPU15),
                   ("0016", CPU16), ("0017", CPU17), ("0018", CPU18), ("0019", CPU19), ("0020", CPU20),
                   ("0021", CPU21), ("0022", CPU22), ("0023", CPU23), ("0024", CPU24)]
SAME_ROUND_MISSES = {
    ("0015", "mlp-bf16-mixed"):
        "-17.0% in the median round: the per-round calibration charges AdamW's update at the bandwidth of x.mul_ "
        "timed in that round, which AdamW's multi-operand ops do not reach (test_optimizer_update measures AdamW "
        "itself; this benchmark does not). The MLP's steps came out -5.5% to -17.0% over runs 0007 to 0015, "
        "the gpt-tiny steps -5.4% to +7.6%",
}


@pytest.mark.parametrize(("run", "path", "step"), [
    pytest.param(run, path, step, id=f"{run}-{step}",
                 marks=[pytest.mark.xfail(strict=True, reason=SAME_ROUND_MISSES[(run, step)])]
                 if (run, step) in SAME_ROUND_MISSES else [])
    for run, path in SAME_ROUND_RUNS for step in SAME_ROUNDS])
def test_replay_same_round_prediction(run: str, path: Path, step: str) -> None:
    extra = _extra_info(path, f"test_step_prediction_same_rounds[{step}]")
    assert extra["matmul_probes"] > 0 and extra["step_median_s"] > 0
    if step.startswith("gpt"):  # attention, LayerNorm, GELU, cross-entropy: forward and backward
        assert extra["kernel_probes"] == 8
    assert abs(extra["round_error"]) <= 0.15, (f"{step}: predicted {extra['predicted_median_s'] * 1e3:.2f} ms "
                                               f"against {extra['step_median_s'] * 1e3:.2f} ms, "
                                               f"{extra['round_error']:+.1%} in the median round")


@pytest.mark.parametrize(("run", "name", "variant", "base", "variant_case", "base_case", "xfail"),
                         [pytest.param(*r, marks=[pytest.mark.xfail(strict=True, reason=r[6])] if r[6] else [],
                                       id=f"{r[0].name[:4]}-{r[1]}-{r[2]}") for r in INTERLEAVED])
def test_replay_what_a_technique_adds(run: Path, name: str, variant: str, base: str, variant_case: dict[str, Any],
                                      base_case: dict[str, Any], xfail: str | None) -> None:
    # The variant's step predicted as the measured step without the technique plus what the model says the technique
    # adds, against the variant measured in the same rounds: within 15%, the CPU's bound for a step
    extra = _extra_info(run, name)
    medians, added = extra["interleaved_median_s"], extra["added_s"]
    case = {**_CPU_GPT, "recipe": "32-true"}
    predicted_added = _predict(run, {**case, **variant_case}) - _predict(run, {**case, **base_case})
    predicted = medians[base] + predicted_added
    error = predicted / medians[variant] - 1
    assert abs(error) <= 0.15, (f"{name} {variant}: adds {added[variant] * 1e3:.2f} ms measured, "
                                f"{predicted_added * 1e3:.2f} ms predicted ({error:+.1%} of the step)")

"""Hook-, dispatcher- and profiler-counted FLOPs against the formulas, exactly (0 FLOPs apart).

Every reference workload and module case runs forward, forward+backward and (transformers) forward+backward under
full activation checkpointing, on the CPU, on the meta device (shapes only, the way ``torchledger count`` runs) and
on CUDA when present. Hooks and the dispatcher must equal the formula; where torch.profiler cannot count an op the
check is a strict xfail naming the op, so the suite notices the day PyTorch fixes it.
"""

from __future__ import annotations

import pytest
import torch

from benchmarks.verification.counter_cases import CASES, GAPS, Case, measured_and_expected, run

DEVICES = ["cpu", "meta", pytest.param("cuda", marks=pytest.mark.cuda)]
CHECKS = [pytest.param(case, phase, id=f"{case.name}-{phase}") for case in CASES for phase in case.phases]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(("case", "phase"), CHECKS)
@pytest.mark.parametrize("counter", ["hooks", "dispatch"])
def test_counter_equals_formula(counter: str, case: Case, phase: str, device: str) -> None:
    counted, expected = run(case, counter, device, phase)
    measured, predicted = measured_and_expected(case, counted, expected, phase)
    assert measured == predicted, f"{counter} counted {measured:,}, the formula says {predicted:,}"
    if not case.integer:
        assert counted.forward == expected.forward
        assert counted.int_ops == 0


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(("case", "phase"), CHECKS)
@pytest.mark.parametrize("counter", ["profiler", "FlopCounterMode"])
def test_upstream_counter_equals_formula(
    counter: str, case: Case, phase: str, device: str, request: pytest.FixtureRequest
) -> None:
    # torch.profiler and PyTorch's own FlopCounterMode, as they ship: where they cannot count an op the check is a
    # strict xfail that names it, so the day PyTorch fixes it this test says so.
    gap = GAPS[counter](case, device, phase)
    if gap:
        request.applymarker(pytest.mark.xfail(strict=True, reason=gap))
    counted, expected = run(case, counter, device, phase)
    measured, predicted = measured_and_expected(case, counted, expected, phase)
    assert measured == predicted, f"{counter} counted {measured:,}, the formula says {predicted:,}"


def test_hooks_split_recompute_from_backward() -> None:
    case = next(c for c in CASES if c.name == "gpt-tiny")
    counted, expected = run(case, "hooks", "meta", "checkpointed")
    assert counted.recompute == expected.recompute > 0
    assert counted.backward == expected.backward


def test_dispatch_breaks_down_by_module() -> None:
    case = next(c for c in CASES if c.name == "llama-tiny")
    counted, expected = run(case, "dispatch", "meta", "forward")
    # llama-tiny block 0's MLP: gate, up and down projections over 2 x 64 tokens, d 128 -> 344
    assert counted.by_module["blocks.0.gate_proj"] == 2 * (2 * 64) * 128 * 344
    assert counted.by_module["lm_head"] == 2 * (2 * 64) * 128 * 1000
    # the ModuleList is never called itself; its two blocks and the head make up the whole forward
    blocks = counted.by_module["blocks.0"] + counted.by_module["blocks.1"]
    assert blocks + counted.by_module["lm_head"] == expected.forward


def test_int_mm_is_counted_apart_from_flops() -> None:
    case = next(c for c in CASES if c.integer)
    counted, _ = run(case, "dispatch", "cpu", "forward")
    assert counted.int_ops == 2 * 32 * 64 * 128 + 2 * 32 * 128 * 32
    assert counted.total == 0  # no floating-point matmul ran


def test_bare_flop_counter_mode_misses_cpu_attention() -> None:
    # The gap this project's dispatch counter closes (pytorch#195460): fused CPU SDPA counts 0 in FlopCounterMode.
    from torch.utils.flop_counter import FlopCounterMode

    q = torch.randn(1, 2, 16, 8)
    with FlopCounterMode(display=False) as fc:
        torch.nn.functional.scaled_dot_product_attention(q, q, q)
    if fc.get_total_flops() != 0:
        pytest.fail("FlopCounterMode now counts CPU SDPA: the extra formula in counting/dispatch.py can go")


@pytest.mark.slow
def test_capability_table_is_current() -> None:
    from benchmarks.verification.capability_table import DOC, table

    doc = DOC.read_text()
    if f"torch {torch.__version__}." not in doc:
        pytest.skip(f"docs/counters.md was generated with another torch than {torch.__version__}")
    assert table(["cpu", "meta"]) == doc, (
        "docs/counters.md no longer matches what the counters do: regenerate it with "
        "`python -m benchmarks.verification.capability_table`"
    )

"""How fast the analytic core answers: it is meant to be cheap enough to call a million times (sweeps, search).

Pure Python, so it runs the same on every device; each case records what it computed beside the time.
"""

from __future__ import annotations

import platform
from itertools import pairwise

import pytest

from benchmarks.performance.conftest import record_work
from torchledger.formulas import estimate, get_preset, model_flops, train_peak_bytes


def _record(benchmark: pytest.FixtureRequest, profile: str, work: dict[str, object], calls: int,
            **info: object) -> None:
    """The case's figures, and as its comparable figure the configurations answered per second (``calls`` per
    round); the work is the same in every profile."""
    benchmark.extra_info.update({"device": f"cpu ({platform.machine()}, python)", **info})  # type: ignore[attr-defined]
    seconds = None if benchmark.disabled else benchmark.stats.stats.median  # type: ignore[attr-defined]
    record_work(benchmark, profile, work, {"name": "samples_per_s", "value": calls / seconds if seconds else None,
                                           "fraction_of_peak": None})


@pytest.mark.benchmark(group="formulas")
@pytest.mark.parametrize("preset", ["gpt2-small", "llama-7b", "gpt3-175b"])
def test_estimate_step(benchmark, ledger_size: str, preset: str) -> None:  # type: ignore[no-untyped-def]
    spec = get_preset(preset)
    result = benchmark(estimate, spec, 8, 1024, precision="bf16-mixed", optimizer="adamw")
    d = result.to_dict()
    _record(benchmark, ledger_size, {"model": preset, "batch": 8, "seq_len": 1024}, 1, model=preset,
            recipe="bf16-mixed", flops=d["flops"]["train_step"],
            predicted_memory=d["memory"]["peak_train"])
    assert d["flops"]["train_step"] == d["flops"]["forward"] + d["flops"]["backward"]


@pytest.mark.benchmark(group="formulas")
def test_model_flops_sweep(benchmark, ledger_size: str) -> None:  # type: ignore[no-untyped-def]
    # A sizing sweep: every preset at 10 sequence lengths within its context (GPT-2: 1,024), FLOPs and peak memory.
    specs = [get_preset(p) for p in ("gpt2-small", "gpt2-xl", "llama-7b", "llama-13b")]
    lengths = [2**k for k in range(1, 11)]

    def sweep() -> list[tuple[int, int]]:
        return [(model_flops(spec, 1, t).train, train_peak_bytes(spec, 1, t).peak) for spec in specs for t in lengths]

    result = benchmark(sweep)
    _record(benchmark, ledger_size, {"models": [s.name for s in specs], "seq_lens": lengths, "batch": 1},
            len(specs) * len(lengths), calls_per_round=2 * len(specs) * len(lengths))
    # what a sweep is for: per model, FLOPs grow with the sequence, and the peak never shrinks (short sequences peak
    # in the optimizer step, which the sequence does not change)
    for i in range(len(specs)):
        row = result[i * len(lengths):(i + 1) * len(lengths)]
        assert all(a[0] < b[0] and a[1] <= b[1] for a, b in pairwise(row)), specs[i].name

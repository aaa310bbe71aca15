"""How fast ``torchledger count`` sizes a large model: LLaMA-7B forward+backward at 2,048 tokens on the meta device.

Targets (on a 2-core CPU): the count under 2 s and the CLI process under 1 GB of peak RSS, and never more than 1.5x
a bare FlopCounterMode pass over the same model in the same run. Times are in-process (build on meta + count),
after the interpreter and torch are imported (importing torch alone takes about 1.4 s here); the CLI's own wall time
and peak RSS are recorded beside them from one subprocess.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.performance.conftest import record_work
from torchledger.counting.model_count import count_model
from torchledger.formulas import get_preset
from torchledger.workloads import build_transformer, token_batch

ROOT = Path(__file__).resolve().parents[2]
SPEC = get_preset("llama-7b")
SEQ = 2048


def _bare_flop_counter_mode() -> int:
    model = build_transformer(SPEC, device="meta")
    idx, targets = token_batch(SPEC, 1, SEQ, device="meta")
    with FlopCounterMode(display=False) as mode:
        loss = model(idx, targets)[1]
        assert loss is not None
        loss.backward()
    return int(mode.get_total_flops())


def _cli_wall_and_peak_rss() -> tuple[float, int]:
    """One `torchledger count` process: wall seconds and peak RSS in bytes (os.wait4 reports this child's own)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    cmd = [sys.executable, "-m", "torchledger", "count", "--model", "llama-7b", "--seq-len", str(SEQ), "--backward",
           "--json"]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    assert proc.returncode == 0
    return wall, usage.ru_maxrss * 1024


@pytest.mark.benchmark(group="count")
def test_count_llama_7b_on_meta(benchmark, ledger_size: str) -> None:  # type: ignore[no-untyped-def]
    report = benchmark.pedantic(count_model, args=(SPEC, 1, SEQ), kwargs={"backward": True}, rounds=3,
                                warmup_rounds=1, iterations=1)
    assert report.errors == []
    # LLaMA-2-7B (32 layers, d 4096, d_ff 11008, vocab 32000) at T = 2048, forward per layer: q, k, v, o 4 x 2Td^2,
    # SwiGLU 3 x 2Tdf, the two attention matmuls 2 x 2T^2d (dense); the LM head 2TdV; backward twice the forward
    t, d, f, v = SEQ, 4096, 11008, 32000
    forward = 32 * (8 * t * d * d + 6 * t * d * f + 4 * t * t * d) + 2 * t * d * v
    assert report.figure("hooks") == report.figure("dispatch") == report.formula == 3 * forward == 87_784_836_562_944
    benchmark.extra_info.update({"device": "meta", "model": "llama-7b", "seq_len": SEQ, "flops": report.formula})
    work = {"model": "llama-7b", "batch": 1, "seq_len": SEQ, "backward": True}
    if benchmark.disabled:
        record_work(benchmark, ledger_size, work, {"name": "samples_per_s", "value": None, "fraction_of_peak": None})
        return
    _bare_flop_counter_mode()  # warm-up, as the counted case had
    bare = []
    for _ in range(3):
        start = time.perf_counter()
        assert _bare_flop_counter_mode() == report.formula
        bare.append(time.perf_counter() - start)
    count_s = benchmark.stats.stats.median
    wall, rss = _cli_wall_and_peak_rss()
    benchmark.extra_info.update({
        "count_s": count_s,
        "bare_flop_counter_mode_s": statistics.median(bare),
        "ratio_to_bare": count_s / statistics.median(bare),
        "cli_wall_s_including_torch_import": wall,
        "cli_peak_rss": rss,
    })
    # models counted per second: the one figure of this case that compares across machines
    record_work(benchmark, ledger_size, work, {"name": "samples_per_s", "value": 1 / count_s, "fraction_of_peak": None})

"""The step-time model's prediction of a timed training step, recorded beside the measurement as
``predicted_step_s`` (:mod:`torchledger.formulas.steptime`).

The ceilings come from this machine's earlier runs (``results/<device tag>/``: their roofline and precision
matmuls and copy bandwidth, never their timed steps; on the CPU only runs made at this session's thread count,
``--ledger-threads``), else from the hardware table's datasheet figures for a GPU of the table; a CPU without such
runs records None.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path
from typing import Any

from torchledger.formulas.specs import get_preset
from torchledger.formulas.steptime import Calibration, mlp_step_ops, step_time, transformer_step_ops

ROOT = Path(__file__).resolve().parents[2]


@cache
def _calibration(cuda: bool, name: str, cpu_threads: int | None) -> Calibration | None:
    from torchledger.formulas.hardware import lookup_device
    from torchledger.formulas.steptime import datasheet_calibration
    from torchledger.measuring.machine import device_tag
    from torchledger.reporting.calibration import read_calibration

    runs = ROOT / "results" / device_tag()
    if any(runs.glob("*/*.json")):
        try:  # on the CPU, the runs made at this session's thread count only
            return read_calibration(runs, cpu_threads="any" if cuda else cpu_threads)
        except ValueError:
            pass
    dev = lookup_device(name, warn=False) if cuda else None
    return None if dev is None else datasheet_calibration(dev)


def predicted_step_s(ledger: Any, case: Any) -> float | None:
    """Predicted seconds of one step of ``case`` (a :class:`~torchledger.measuring.training.MemoryCase`) on the
    ledger's device; None without a calibration or for a workload the op lists do not describe."""
    from torchledger.pytest_plugin import benchmark_threads

    cal = _calibration(ledger.cuda, ledger.name, benchmark_threads())
    if cal is None:
        return None
    c = case.config
    kind = "cuda" if ledger.cuda else "cpu"
    if case.workload == "mlp":
        ops = mlp_step_ops(case.mlp, case.batch, precision=c.precision, optimizer=c.optimizer,
                           optimizer_impl=c.optimizer_impl, grad_accum=c.grad_accum, device=kind)
    elif case.workload == "cnn" or case.hf_config is not None:
        return None
    else:
        spec = case.spec or get_preset(case.workload)
        cal = cal.for_model(spec.name, c.precision)
        ops = transformer_step_ops(spec, case.batch, case.seq_len, precision=c.precision, optimizer=c.optimizer,
                                   optimizer_impl=c.optimizer_impl, checkpointing=c.checkpointing,
                                   grad_accum=c.grad_accum, device=kind)
    return step_time(ops, cal, tokens=1, model_flops=0).step_s

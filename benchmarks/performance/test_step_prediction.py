"""The roofline group's check of the step-time model on a CPU shared with other work: a training step predicted from
ceilings measured in the same rounds as the step itself.

A calibration measured by the roofline group and replayed against steps timed minutes later inherits the machine's
drift: on the 2-core EPYC one run's roofline group measured the copy at 41.5 GB/s where the two runs before measured
33.1 and 26.7, and the same step took 32.3 to 43.4 ms in three groups of one run. Here every round runs the step once
and then, each timed on its own, every matmul of the step's op list at its shape, layout and dtype, every named
kernel at the step's shapes (the transformer's), a copy and an update in place of the profile's copy size, and an
AdamW step over parameters of the step's own shapes (the bandwidth AdamW's ops are charged at, as the calibration's
``test_optimizer_update``; runs before 0016 charged them the update's). Each
round's figures make one :class:`~torchledger.formulas.steptime.Calibration`, with the host's cost per op measured
once before the rounds (:class:`~benchmarks.performance.test_launch.HostStep`), and the model predicts the round's
step from it; ``round_error`` is the median over the rounds of predicted over measured, minus one. Nothing of the
step's own time enters its prediction.

CPU only: a GPU holds its speed within a run (its clocks are recorded beside every figure), and its run's
calibration is replayed against its steps directly. The 16-bit recipe without a fast CPU path (``16-mixed``: 0.6 to
0.9 s a step) is left to the replay of the run.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import pytest
import torch

from benchmarks.performance.conftest import Ledger
from benchmarks.performance.test_kernels import DTYPES as KERNEL_DTYPES
from benchmarks.performance.test_kernels import _case as kernel_case
from benchmarks.performance.test_launch import HostStep, model_launches
from benchmarks.performance.test_matmul_shapes import DTYPES as MATMUL_DTYPES
from benchmarks.performance.test_matmul_shapes import _operands
from benchmarks.performance.test_precision import _step_case
from benchmarks.performance.test_roofline import adamw_update
from torchledger.formulas.specs import get_preset
from torchledger.formulas.steptime import (
    LAUNCH_OVERHEAD_S,
    Calibration,
    KernelPoint,
    MatmulPoint,
    Op,
    achieved_bandwidth,
    mlp_step_ops,
    step_time,
    transformer_step_ops,
)
from torchledger.reporting.calibration import HOST_PHASES

STEPS = (("gpt", "32-true"), ("gpt", "bf16-mixed"), ("mlp", "32-true"), ("mlp", "bf16-mixed"))
ROUNDS = 15


def _host_s(ledger: Ledger, steps: int = 30) -> dict[str, float]:
    """The host's seconds per op of each phase, as test_host_overhead measures them (its linear-relu stack)."""
    step = HostStep("linear-relu", ledger.device, ledger.sync)
    for _ in range(5 + steps):
        step()
    launches = model_launches(ledger.cuda)
    return {p: statistics.median(step.phases[p][-steps:]) / launches[p] for p in HOST_PHASES}


def _probes(ops: list[Op], sizes: dict[str, Any], device: str
            ) -> tuple[dict[tuple[Any, ...], Callable[[], object]], dict[tuple[Any, ...], int]]:
    """A callable per distinct matmul (shape, layout, dtype) and named kernel (name, dtype) of ``ops``, with the
    work (FLOPs or units) each call does."""
    calls: dict[tuple[Any, ...], Callable[[], object]] = {}
    work: dict[tuple[Any, ...], int] = {}
    for op in ops:
        if op.kernel is None and op.shape is not None:
            key: tuple[Any, ...] = ("matmul", op.dtype, op.shape, op.layout)
            if key not in calls:
                a, b = _operands(*op.shape, op.layout, MATMUL_DTYPES[op.dtype], device)
                calls[key] = lambda a=a, b=b: a @ b
                work[key] = op.flops
        elif op.kernel is not None:
            key = ("kernel", op.kernel, op.dtype)
            base = op.kernel.removesuffix("_backward")
            if key in calls or op.dtype not in KERNEL_DTYPES:
                continue
            forward, leaves, fwd_units, bwd_units, _ = kernel_case(base, sizes, KERNEL_DTYPES[op.dtype], device)
            if (fwd_units if base == op.kernel else bwd_units) != op.units:
                continue  # not the shape the benchmark builds (the MLP's loss): left to its bytes
            if base == op.kernel:
                calls[key] = forward
            else:
                out = forward()
                grad = torch.randn_like(out) if out.dim() else torch.ones_like(out)
                calls[key] = lambda out=out, leaves=leaves, grad=grad: torch.autograd.grad(out, leaves, grad,
                                                                                           retain_graph=True)
            work[key] = op.units
    return calls, work


def _calibration(times: dict[tuple[Any, ...], float], work: dict[tuple[Any, ...], int], copy_s: float,
                 update_s: float, nbytes: int, host: dict[str, float], adamw_s: float, adamw: list[Op]
                 ) -> Calibration:
    matmul: dict[str, list[MatmulPoint]] = {}
    kernels: list[KernelPoint] = []
    for key, seconds in times.items():
        if key[0] == "matmul":
            _, dtype, (m, k, n), layout = key
            matmul.setdefault(dtype, []).append(MatmulPoint(m, k, n, work[key] / seconds, layout))
        else:
            kernels.append(KernelPoint(key[1], key[2], work[key], work[key] / seconds))
    # AdamW's own update (as test_optimizer_update): its op list's bytes over its time less its launches' host cost
    bandwidth = achieved_bandwidth(sum(op.bytes for op in adamw), sum(op.launches * op.count for op in adamw),
                                   adamw_s, host["optimizer"])
    optimizer = {} if bandwidth is None else {"adamw.foreach": bandwidth}
    return Calibration("this round", {d: tuple(p) for d, p in matmul.items()}, 2 * nbytes / copy_s,
                       LAUNCH_OVERHEAD_S["cpu"], "cpu", host_s=host, kernels=tuple(kernels),
                       update_bandwidth=2 * nbytes / update_s, optimizer_bandwidth=optimizer)


@pytest.mark.benchmark(group="roofline")
@pytest.mark.parametrize(("workload", "recipe"), STEPS, ids=[f"{w}-{r}" for w, r in STEPS])
def test_step_prediction_same_rounds(ledger: Ledger, sizes: dict[str, Any], workload: str, recipe: str) -> None:
    if ledger.cuda:
        pytest.skip("a GPU holds its speed within a run: its run's calibration is replayed against its steps")
    device = ledger.device
    case = _step_case(workload, sizes, recipe)
    _, step, batches = case.build(device)
    c = case.config
    if workload == "mlp":
        ops = mlp_step_ops(case.mlp, case.batch, precision=c.precision, device="cpu")
    else:
        ops = transformer_step_ops(get_preset(sizes["gpt"]), case.batch, case.seq_len, precision=c.precision,
                                   device="cpu")
    calls, work = _probes(ops, sizes, device)
    nbytes = sizes["copy_bytes"]
    src = torch.ones(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    # an AdamW (foreach) step over parameters of the step's own shapes, beside the step's own optimizer
    adamw, adamw_ops = adamw_update([p.detach().clone() for p in step.model.parameters()], "cpu")
    probes: dict[tuple[Any, ...], Callable[[], object]] = {
        **calls, ("copy",): lambda: dst.copy_(src), ("update",): lambda: src.mul_(1.0), ("adamw",): adamw.step}
    host = _host_s(ledger)
    rounds: list[dict[tuple[Any, ...], float]] = []

    def one_round() -> None:
        times: dict[tuple[Any, ...], float] = {}
        for key, fn in (("step",), lambda: step.step(batches)), *probes.items():
            t0 = time.perf_counter()
            fn()
            times[key] = time.perf_counter() - t0
        rounds.append(times)

    one_round()  # the optimizer's state, every probe's first call
    # the comparable figure: rounds per second (one step and its probes a round)
    seconds = ledger.time(one_round, rounds=ROUNDS, warmup=1, events=False, batches=1, machine_speed=False,
                          work={"workload": workload, "recipe": recipe, "probes": len(probes)})
    if seconds is None:
        return
    measured, predicted = [], []
    for times in rounds[-ROUNDS:]:
        cal = _calibration({k: v for k, v in times.items() if k[0] in ("matmul", "kernel")}, work,
                           times[("copy",)], times[("update",)], nbytes, host, times[("adamw",)], adamw_ops)
        measured.append(times[("step",)])
        predicted.append(step_time(ops, cal, tokens=1, model_flops=0).step_s)
    errors = sorted(p / m - 1 for p, m in zip(predicted, measured, strict=True))
    ledger.record(workload=workload, recipe=recipe, step_median_s=statistics.median(measured),
                  predicted_median_s=statistics.median(predicted), round_error=statistics.median(errors),
                  round_error_quartiles=[errors[len(errors) // 4], errors[(3 * len(errors)) // 4]],
                  host_overhead_s=host, matmul_probes=sum(1 for k in calls if k[0] == "matmul"),
                  kernel_probes=sum(1 for k in calls if k[0] == "kernel"))

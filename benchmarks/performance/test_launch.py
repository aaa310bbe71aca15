"""The roofline group's per-op overheads, for the step-time model's calibration
(:mod:`torchledger.reporting.calibration` reads ``host_overhead_s``).

``test_launch_overhead``: one timed call issues :data:`LAUNCHES` adds of one-element tensors back to back, then waits
for the device (on CUDA a ``torch.cuda.synchronize()`` inside the call, so that the figure is the queue's throughput
and not only the host's issue rate, whatever timer the run uses). What remains is the Python binding, the
dispatcher, the allocation of the output and, on CUDA, the kernel launch: ``launch_overhead_s``, the median call over
``LAUNCHES``. NB: the add records no autograd graph and runs in no module: a floor under the cost of a step's op, not
that cost (the calibration does not charge it).

``test_host_overhead``: the host's cost per op inside a training step, per phase, on a step whose arithmetic is
negligible (see :data:`HOST_STACKS`): ``host_overhead_s`` (seconds per launch as the step-time model counts the
launches of that step, by phase), with the dispatched kernels and views, module calls and autograd nodes beside it.

``test_model_host_cost``: the same figure on the profile's own models, whose forward runs more Python per op than a
stack of Linear layers (the attention's reshapes and transposes, the loss, the embeddings): each model's training
step at the size where its arithmetic nearly vanishes (batch 1, one token), each phase timed
(:meth:`~torchledger.workloads.train_step.TrainStep.step`'s ``mark``). ``phase_median_s`` is recorded with the size;
the calibration takes the device time the model predicts for that size off each phase and divides the rest by the
phase's launches (:func:`torchledger.reporting.calibration.calibration_from_run`). On the 2-core EPYC gpt-tiny's
forward took 0.73 ms at one token, 27 launches: 27 us a launch, against 7 us on the Linear stack. 16-mixed is left
out: on a CPU without fast fp16 GEMMs its one-token matmuls are not negligible (0.4 GFLOP/s in ``nn``).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from functools import partial
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from benchmarks.performance.conftest import Ledger, PhaseTimes
from benchmarks.performance.test_precision import _step_case
from torchledger.formulas.specs import MLPSpec
from torchledger.formulas.steptime import mlp_step_ops
from torchledger.reporting.calibration import HOST_PHASES  # the phases the calibration reads back
from torchledger.workloads.models import MLP
from torchledger.workloads.train_step import TrainConfig, make_optimizer

LAUNCHES = 1000  # per timed call: about 5 to 10 ms at a few microseconds per op, far above the timer's resolution


@pytest.mark.benchmark(group="roofline")
def test_launch_overhead(ledger: Ledger, sizes: dict[str, Any]) -> None:
    a = torch.ones(1, device=ledger.device)
    b = torch.ones(1, device=ledger.device)

    def adds() -> None:
        for _ in range(LAUNCHES):
            torch.add(a, b)
        ledger.sync()

    # events=False: the stream is idle between the tiny kernels (host-bound work), and each call synchronizes itself
    seconds = ledger.time(adds, rounds=max(sizes["rounds"], 10), warmup=2, samples=LAUNCHES, events=False,
                          work={"launches": LAUNCHES})
    ledger.record(launch_overhead_s=None if seconds is None else seconds / LAUNCHES)


# ------------------------------------------------------------------------------------------------ host cost in a step

# A training step whose arithmetic is negligible: 64 Linear(8, 8) at batch 1. What it takes is the host's cost per
# op inside a step: nn.Module.__call__, autograd recording each op (forward), the autograd engine running each
# backward node and accumulating the gradients (backward), the optimizer's per-tensor Python and foreach ops
# (optimizer), on top of the binding and dispatch that the bare launch above measures.
HOST_DEPTH = 64
HOST_WIDTH = 8
# linear-relu: the reference MLP (Linear, ReLU, ..., Linear; cross-entropy), whose ops the step-time model lists
# itself (formulas/steptime.py mlp_step_ops): one module call per forward kernel. tanh-residual-block: blocks
# x + tanh(x W^T + b) * s, one module call per 4 forward kernels (addmm, tanh, mul, add), 3 parameters per block:
# if the host cost were per module call, per autograd node or per view rather than per kernel, the two stacks'
# figures per kernel would differ. They do on the 2-core EPYC (forward 6.4 against 4.2 us, backward 4.9 against
# 3.9, optimizer 1.4 in both): about 3.5 us per forward kernel plus 2.8 us per module call, 3.9 us per autograd
# node; the model charges the first stack's figure per launch (README, step time).
# NB: ops that enter an OpenMP region even on 8 elements are left out (LayerNorm's backward: about 40 us a call on
# this suite's 2-core EPYC, up to a millisecond while the other core is busy), and so is the exact GELU (about
# 24 us on 8 elements there): fixed costs of those kernels, not the host's cost per op.
HOST_STACKS = ("linear-relu", "tanh-residual-block")


class _Block(nn.Module):
    """x + tanh(x W^T + b) * s, in one module call."""

    def __init__(self, width: int, device: str) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(width, width, device=device) / width**0.5)
        self.bias = nn.Parameter(torch.zeros(width, device=device))
        self.scale = nn.Parameter(torch.ones(width, device=device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + torch.tanh(nn.functional.linear(x, self.weight, self.bias)) * self.scale  # (1, width)


class _OpCounter(TorchDispatchMode):
    """Kernels (ops that are not views) and views dispatched, per phase; a foreach op counts once per tensor."""

    def __init__(self) -> None:
        super().__init__()
        self.phase = HOST_PHASES[0]
        self.kernels = dict.fromkeys(HOST_PHASES, 0)
        self.views = dict.fromkeys(HOST_PHASES, 0)

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None) -> Any:
        first = args[0] if args else None
        n = len(first) if func.__name__.startswith("_foreach") and isinstance(first, (list, tuple)) else 1
        (self.views if func.is_view else self.kernels)[self.phase] += n
        return func(*args, **(kwargs or {}))


def _host_stack(stack: str, device: str) -> tuple[nn.Module, int]:
    """The stack's model and its forward module calls."""
    torch.manual_seed(0)
    if stack == "linear-relu":
        model: nn.Module = MLP(MLPSpec((HOST_WIDTH,) * (HOST_DEPTH + 1)), device=device)
    else:
        model = nn.Sequential(*(_Block(HOST_WIDTH, device) for _ in range(HOST_DEPTH)),
                              nn.Linear(HOST_WIDTH, HOST_WIDTH, device=device))
    return model, sum(1 for _ in model.modules()) - 1  # the root Sequential's call is one more


def _backward_nodes(loss: torch.Tensor) -> int:
    """The autograd graph's nodes behind ``loss`` (AccumulateGrad included): what the engine runs."""
    seen: set[Any] = set()
    todo = [loss.grad_fn]
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        todo.extend(fn for fn, _ in node.next_functions)
    return len(seen)


class HostStep:
    """One training step of a host stack (forward and cross-entropy, backward, AdamW foreach and zero_grad, as
    TrainStep runs 32-true), each phase timed inside every call and appended to ``phases``; ``counter``, when set,
    counts the dispatched ops by phase."""

    def __init__(self, stack: str, device: str, sync: Callable[[], None]) -> None:
        self.device, self.sync = device, sync
        self.model, self.modules = _host_stack(stack, device)
        self.optimizer = make_optimizer(self.model.parameters(), TrainConfig("32-true", "adamw", "foreach"))
        self.x = torch.randn(1, HOST_WIDTH, device=device)  # (1, 8)
        self.y = torch.zeros(1, dtype=torch.long, device=device)
        self.phases: dict[str, list[float]] = {p: [] for p in HOST_PHASES}
        self.counter: _OpCounter | None = None
        self.recording = True

    def untimed(self) -> None:
        """One step whose phase times are not kept (the call that refills the caches after the speed probe)."""
        self.recording = False
        try:
            self()
        finally:
            self.recording = True

    def loss(self) -> torch.Tensor:
        with torch.autocast(torch.device(self.device).type, enabled=False):  # as TrainStep enters it under 32-true
            return nn.functional.cross_entropy(self.model(self.x), self.y) / 1  # / grad_accum

    def __call__(self) -> None:
        t0 = time.perf_counter()
        loss = self.loss()
        self.sync()
        t1 = time.perf_counter()
        if self.counter is not None:
            self.counter.phase = "backward"
        loss.backward()
        self.sync()
        t2 = time.perf_counter()
        if self.counter is not None:
            self.counter.phase = "optimizer"
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.sync()
        t3 = time.perf_counter()
        if self.recording:
            for phase, seconds in zip(HOST_PHASES, (t1 - t0, t2 - t1, t3 - t2), strict=True):
                self.phases[phase].append(seconds)


def model_launches(cuda: bool) -> dict[str, int]:
    """The launches per phase the step-time model lists for the linear-relu stack's step."""
    ops = mlp_step_ops(MLPSpec((HOST_WIDTH,) * (HOST_DEPTH + 1)), 1, device="cuda" if cuda else "cpu")
    return {p: sum(op.launches * op.count for op in ops if op.phase == p) for p in HOST_PHASES}


@pytest.mark.benchmark(group="roofline")
@pytest.mark.parametrize("stack", HOST_STACKS)
def test_host_overhead(ledger: Ledger, sizes: dict[str, Any], stack: str) -> None:
    """One training step of a deep stack of tiny layers (:class:`HostStep`), timed like the other steps; each phase
    timed inside every call, its median over the rounds divided by the phase's kernels: the host's seconds per op of
    that phase."""
    step = HostStep(stack, ledger.device, ledger.sync)
    model, phases = step.model, step.phases
    step()  # the optimizer's state
    nodes = _backward_nodes(step.loss())
    step.optimizer.zero_grad(set_to_none=True)
    step.counter = _OpCounter()
    with step.counter:
        step()
    kernels, views = step.counter.kernels, step.counter.views
    step.counter = None
    for values in phases.values():
        values.clear()
    rounds = max(sizes["rounds"], 50)  # a few ms per step: 50 rounds for a median on a shared machine
    seconds = ledger.time(step, rounds=rounds, warmup=5, batches=1, events=False, refill=step.untimed,
                          work={"stack": stack, "depth": HOST_DEPTH, "width": HOST_WIDTH, "batch": 1})
    timed = {p: sorted(v[-rounds:]) for p, v in phases.items()}  # the timed rounds (warmup rounds come first)
    median = {p: statistics.median(v) for p, v in timed.items()}
    info: dict[str, Any] = {
        "stack": stack, "dispatched_kernels": kernels, "dispatched_views": views, "module_calls": step.modules + 1,
        "backward_nodes": nodes, "optimizer_tensors": sum(1 for _ in model.parameters()),
        "phase_median_s": None if seconds is None else median,
        "phase_quartiles_s": None if seconds is None else {
            p: [v[len(v) // 4], v[(3 * len(v)) // 4]] for p, v in timed.items()},
        "per_kernel_s": None if seconds is None else {p: median[p] / kernels[p] for p in HOST_PHASES},
    }
    if stack == "linear-relu":  # the stack whose ops the model lists: seconds per op as the model counts them
        launches = model_launches(ledger.cuda)
        info["model_launches"] = launches
        info["host_overhead_s"] = None if seconds is None else {p: median[p] / launches[p] for p in HOST_PHASES}
    ledger.record(**info)


# The models and recipes whose host cost per op the calibration reads: the profile's transformer in the precision
# group's recipes, 16-mixed aside. The MLP is a stack of Linear and ReLU layers, the host stack itself; at batch 1 its
# phases are device time (its forward reads 25 MB of weights in 6 launches: 2.2 ms), so the rest would be a small
# difference of large figures.
MODEL_HOST_STEPS = (("gpt", "32-true"), ("gpt", "bf16-mixed"))


@pytest.mark.benchmark(group="roofline")
@pytest.mark.parametrize(("workload", "recipe"), MODEL_HOST_STEPS, ids=[f"{w}-{r}" for w, r in MODEL_HOST_STEPS])
def test_model_host_cost(ledger: Ledger, sizes: dict[str, Any], workload: str, recipe: str) -> None:
    """A training step of the profile's ``workload`` at batch 1 (one token for the transformer), each phase timed
    inside every call, each round after the speed probe's copy has displaced the caches: its median over the rounds
    is ``phase_median_s``."""
    case = _step_case(workload, {**sizes, "mlp_batch": 1, "gpt_batch": 1, "gpt_seq": 1}, recipe)
    _, step, batches = case.build(ledger.device)
    phases = PhaseTimes(step, ledger.device, sync=ledger.sync)

    def refill() -> None:
        """Nothing after the speed probe: each phase starts with the caches holding other data, as in a step whose
        activations have passed through them (at one token the optimizer's state would otherwise stay cached: run
        0012 measured that phase at 1.2 ms here against 1.9 to 2.6 inside the 8 x 128 steps)."""

    for _ in range(3):  # the optimizer's state; the first calls
        step.step(batches)
    rounds = max(sizes["rounds"], 60)  # 5 to 8 ms per step, its median drifting by 40% between runs: 60 rounds
    seconds = ledger.time(partial(phases.step, batches), rounds=rounds, warmup=2, batches=1, events=False,
                          refill=refill,
                          work={"workload": workload, "recipe": recipe, "batch": case.batch, "seq_len": case.seq_len})
    ledger.record(workload=workload, recipe=recipe, model=case.workload, batch=case.batch, seq_len=case.seq_len,
                  phase_median_s=phases.median(None if seconds is None else rounds))

"""The accumulation and checkpointing groups: what a memory-saving technique costs in time and saves in bytes,
measured beside the prediction."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from functools import partial
from typing import Any

import pytest
import torch

from benchmarks.performance.conftest import Ledger, PhaseTimes, memory_base, memory_info, peak_memory
from benchmarks.performance.predicted import predicted_step_s
from torchledger.formulas.activations import activation_bytes
from torchledger.formulas.specs import get_preset
from torchledger.formulas.vocabulary import STEP_CHECKPOINTING, checkpointed_blocks
from torchledger.measuring.training import MemoryCase
from torchledger.workloads.models import build_transformer, token_batch
from torchledger.workloads.train_step import TrainConfig, TrainStep, lm_loss

ACCUM = 4


def _grads_after_one_step(model: torch.nn.Module, step: TrainStep, batches: list[tuple[torch.Tensor, ...]]) -> list[
        torch.Tensor]:
    """The gradients of one step's micro-batches (the optimizer step and zero_grad are skipped)."""
    for batch in batches:
        loss = step.loss_fn(model, batch)[1] / len(batches)
        loss.backward()
    grads = [p.grad.detach().clone() for p in model.parameters() if p.grad is not None]
    model.zero_grad(set_to_none=True)
    return grads


@pytest.mark.benchmark(group="accumulation")
@pytest.mark.parametrize("micro_batches", [1, ACCUM], ids=lambda k: f"{k}x")
def test_same_effective_batch(ledger: Ledger, sizes: dict[str, Any], micro_batches: int) -> None:
    device, spec = ledger.device, get_preset(sizes["gpt"])
    batch, seq = sizes["gpt_batch"], sizes["gpt_seq"]
    base = memory_base(device)
    torch.manual_seed(0)
    model = build_transformer(spec, device=device)
    config = TrainConfig(grad_accum=micro_batches)
    step = TrainStep(model, config, lm_loss)
    idx, targets = token_batch(spec, batch, seq, device=device)
    per = batch // micro_batches
    batches = [(idx[i * per:(i + 1) * per], targets[i * per:(i + 1) * per]) for i in range(micro_batches)]
    # The gradients of k micro-batches of B/k agree with one batch of B (the mean loss is split k ways).
    whole = _grads_after_one_step(model, step, [(idx, targets)])
    split = _grads_after_one_step(model, step, batches)
    grad_error = max(float((a - b).norm() / a.norm()) for a, b in zip(whole, split, strict=True))
    assert grad_error < 1e-4, f"accumulated gradients differ from the full batch's by {grad_error:.2e}"
    del whole, split  # two copies of the gradients: not part of the step being measured

    phases = PhaseTimes(step, device)

    def run() -> None:
        phases.step(batches)

    run()
    measured = peak_memory(device, run, model, step.optimizer, base=base, inputs=[idx, targets])
    case = MemoryCase(spec.name, per, config, seq_len=seq)
    seconds = ledger.time(run, rounds=sizes["rounds"], warmup=1, samples=batch, refill=partial(phases.untimed, batches),
                work={"model": spec.name, "batch": batch, "seq_len": seq, "micro_batches": micro_batches},
                recipe="32-true", effective_batch=batch,
                micro_batches=micro_batches, rel_error=grad_error, predicted_step_s=predicted_step_s(ledger, case),
                **memory_info(case, measured))
    ledger.record(phase_median_s=phases.median(None if seconds is None else sizes["rounds"]))


@pytest.mark.benchmark(group="checkpointing")
@pytest.mark.parametrize("mode", STEP_CHECKPOINTING)
def test_checkpointing(ledger: Ledger, sizes: dict[str, Any], mode: str) -> None:
    device, spec = ledger.device, get_preset(sizes["gpt"])
    batch, seq = sizes["gpt_batch"], sizes["gpt_seq"]
    base = memory_base(device)
    torch.manual_seed(0)
    model = build_transformer(spec, device=device)
    config = TrainConfig(checkpointing=mode)
    step = TrainStep(model, config, lm_loss)
    batches = [token_batch(spec, batch, seq, device=device)]

    phases = PhaseTimes(step, device)

    def run() -> None:
        phases.step(batches)

    run()
    measured = peak_memory(device, run, model, step.optimizer, base=base, inputs=list(batches[0]))
    none = activation_bytes(spec, batch, seq)
    kept = activation_bytes(spec, batch, seq, checkpointing=mode)
    seconds = ledger.time(run, rounds=sizes["rounds"], warmup=1, samples=batch, refill=partial(phases.untimed, batches),
                work={"model": spec.name, "batch": batch, "seq_len": seq, "checkpointing": mode},
                recipe="32-true", checkpointing=mode,
                checkpointed_blocks=len(checkpointed_blocks(mode, spec.n_layers)),
                predicted_activation_saving=none.saved - kept.saved,
                predicted_step_s=predicted_step_s(ledger, MemoryCase(spec.name, batch, config, seq_len=seq)),
                **memory_info(MemoryCase(spec.name, batch, config, seq_len=seq), measured))
    ledger.record(phase_median_s=phases.median(None if seconds is None else sizes["rounds"]))


def _interleaved(ledger: Ledger, sizes: dict[str, Any], steps: dict[str, Callable[[], None]], first: str,
                 **info: Any) -> None:
    """Time ``steps`` round-robin: one call of the benchmark runs each once, in turn, each timed on its own. On a
    shared machine whose speed drifts over seconds (the 2-core CPU: the same step 33 to 55 ms within 40 s), the
    steps of one round run at the same speed, so the per-round difference from ``first`` (its median recorded as
    ``added_s``) is what the variant costs, free of the drift that separate benchmarks see."""
    times: dict[str, list[float]] = {name: [] for name in steps}

    def round_robin() -> None:
        for name, step in steps.items():
            t0 = time.perf_counter()
            step()
            ledger.sync()
            times[name].append(time.perf_counter() - t0)

    round_robin()  # optimizer state
    rounds = max(sizes["rounds"], 15)
    seconds = ledger.time(round_robin, rounds=rounds, warmup=1, events=False, machine_speed=False, **info)
    timed = {name: v[-rounds:] for name, v in times.items()}
    ledger.record(
        interleaved_median_s=None if seconds is None else {n: statistics.median(v) for n, v in timed.items()},
        added_s=None if seconds is None else {
            n: statistics.median(a - b for a, b in zip(v, timed[first], strict=True)) for n, v in timed.items()
            if n != first})


def _interleaved_setup(ledger: Ledger, sizes: dict[str, Any]) -> tuple[str, Any, int, int]:
    """(device, transformer spec, batch, sequence length) of an interleaved comparison; skipped on CUDA."""
    if ledger.cuda:
        pytest.skip("a GPU runs each step at the clocks the sustained benchmarks record; interleaving is for CPUs "
                    "shared with other work")
    return ledger.device, get_preset(sizes["gpt"]), sizes["gpt_batch"], sizes["gpt_seq"]


@pytest.mark.benchmark(group="checkpointing")
def test_checkpointing_interleaved(ledger: Ledger, sizes: dict[str, Any]) -> None:
    """What each checkpointing mode adds to the step, the modes timed round-robin (see :func:`_interleaved`)."""
    device, spec, batch, seq = _interleaved_setup(ledger, sizes)
    steps: dict[str, Callable[[], None]] = {}
    for mode in STEP_CHECKPOINTING:
        torch.manual_seed(0)
        step = TrainStep(build_transformer(spec, device=device), TrainConfig(checkpointing=mode), lm_loss)
        batches = [token_batch(spec, batch, seq, device=device)]
        steps[mode] = partial(step.step, batches)
    _interleaved(ledger, sizes, steps, "none", samples=batch * len(steps),
                 work={"model": spec.name, "batch": batch, "seq_len": seq, "modes": list(STEP_CHECKPOINTING)},
                 recipe="32-true", modes=list(STEP_CHECKPOINTING))


@pytest.mark.benchmark(group="accumulation")
def test_accumulation_interleaved(ledger: Ledger, sizes: dict[str, Any]) -> None:
    """What splitting the batch into ACCUM micro-batches adds to the step, timed round-robin with the whole batch."""
    device, spec, batch, seq = _interleaved_setup(ledger, sizes)
    steps: dict[str, Callable[[], None]] = {}
    for k in (1, ACCUM):
        torch.manual_seed(0)
        step = TrainStep(build_transformer(spec, device=device), TrainConfig(grad_accum=k), lm_loss)
        idx, targets = token_batch(spec, batch, seq, device=device)
        per = batch // k
        steps[f"{k}x"] = partial(step.step, [(idx[i * per:(i + 1) * per], targets[i * per:(i + 1) * per])
                                             for i in range(k)])
    _interleaved(ledger, sizes, steps, "1x", samples=batch * len(steps),
                 work={"model": spec.name, "batch": batch, "seq_len": seq, "micro_batches": [1, ACCUM]},
                 recipe="32-true", micro_batches=[1, ACCUM])
